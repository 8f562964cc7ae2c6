"""From a torch module to an ONNX file ONNX Runtime loads, and to a validated int8 model.

:func:`export` wraps ``torch.onnx.export`` (either exporter) and fixes what the installed onnxruntime
would refuse: the IR version is clamped to what it loads (:func:`onnxq.runtime.kernels.ort_max_versions`)
and the opset kept at one it has kernels for (17 for the TorchScript exporter, 18 — the dynamo
exporter's minimum — otherwise; onnxq's loader converts further when it quantizes). Files are written
atomically: a failed export leaves nothing behind.

:func:`quantize_module` is export → :func:`onnxq.quantize` (static PTQ) → validation in one call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.load.files import save_model

if TYPE_CHECKING:
    from onnxq.pipeline.result import QuantizationResult

__all__ = ["DynamicShapes", "Inputs", "export", "quantize_module", "to_feeds"]

#: One tensor or a tuple of tensors: the positional inputs of the module.
Inputs = torch.Tensor | Sequence[torch.Tensor]
#: Per input (in order, or by input name), ``{axis: name}``; names may be ``torch.export.Dim`` objects.
DynamicShapes = Sequence[Mapping[int, Any] | None] | Mapping[str, Mapping[int, Any] | None]

#: Opsets written: the TorchScript exporter's is one every supported onnxruntime runs; dynamo's minimum is 18.
_LEGACY_OPSET = 17
_DYNAMO_OPSET = 18


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    items = tuple(inputs)
    if not all(isinstance(t, torch.Tensor) for t in items):
        raise OnnxqError("example inputs must be a torch.Tensor or a tuple of torch.Tensor")
    return items


def input_names_for(count: int) -> list[str]:
    """Graph input names: ``input`` for one input, ``input_0``, ``input_1``, ... for several."""
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _per_input(dynamic_shapes: DynamicShapes | None, names: Sequence[str]) -> list[Mapping[int, Any] | None]:
    if dynamic_shapes is None:
        return [None] * len(names)
    if isinstance(dynamic_shapes, Mapping):
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise OnnxqError(f"dynamic_shapes names unknown input(s) {unknown}; the inputs are {list(names)}")
        return [dynamic_shapes.get(name) for name in names]
    shapes = list(dynamic_shapes)
    if len(shapes) != len(names):
        raise OnnxqError(f"dynamic_shapes has {len(shapes)} entries for {len(names)} input(s)")
    return shapes


def _dim_name(dim: Any, axis: int) -> str:
    if isinstance(dim, str):
        return dim
    return str(getattr(dim, "__name__", None) or f"dim_{axis}")


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Keep the exporters' deprecation and tracer warnings and info logs off the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _export_proto(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    shapes: list[Mapping[int, Any] | None],
    names: list[str],
    dynamo: bool,
) -> onnx.ModelProto:
    outputs = ["output"]
    if dynamo:
        dims: dict[str, Any] = {}

        def convert(axes: Mapping[int, Any] | None) -> dict[int, Any] | None:
            if not axes:
                return None
            # A named axis becomes Dim.AUTO: torch.export keeps it dynamic where the model allows
            # and specializes it (rather than failing) where the example batch of 1 is baked in.
            return {
                a: (dims.setdefault(d, torch.export.Dim.AUTO) if isinstance(d, str) else d)
                for a, d in axes.items()
            }

        program = torch.onnx.export(
            model,
            args,
            None,
            dynamo=True,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=tuple(convert(s) for s in shapes) if any(shapes) else None,
            opset_version=_DYNAMO_OPSET,
            external_data=False,
            optimize=True,
            verbose=False,
        )
        if program is None:
            raise OnnxqError("torch.onnx.export(dynamo=True) returned no model")
        return program.model_proto
    dynamic_axes = {
        name: {axis: _dim_name(dim, axis) for axis, dim in axes.items()}
        for name, axes in zip(names, shapes, strict=True)
        if axes
    }
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        torch.onnx.export(
            model,
            args,
            raw,
            dynamo=False,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic_axes or None,
            opset_version=_LEGACY_OPSET,
            do_constant_folding=True,
        )
        return onnx.load(raw)


def write_atomic(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``proto`` to ``path`` atomically, as onnxq writes its own outputs (:func:`save_model`)."""
    return save_model(ir.from_proto(proto), path)


def export_proto(
    model: torch.nn.Module,
    example_inputs: Inputs,
    dynamic_shapes: DynamicShapes | None = None,
    *,
    dynamo: bool = False,
) -> onnx.ModelProto:
    """:func:`export` without the file: the ONNX model, IR version clamped for onnxruntime."""
    from onnxq.runtime.kernels import ort_max_versions

    args = _as_tuple(example_inputs)
    names = input_names_for(len(args))
    shapes = _per_input(dynamic_shapes, names)
    was_training = model.training
    model.eval()
    try:
        with quiet_exporters(), torch.no_grad():
            proto = _export_proto(model, args, shapes, names, dynamo)
    except OnnxqError:
        raise
    except Exception as exc:
        which = "dynamo" if dynamo else "TorchScript"
        hint = "; try dynamo=False" if dynamo else ""
        raise OnnxqError(f"the {which} ONNX exporter failed: {_first_line(exc)}{hint}") from exc
    finally:
        model.train(was_training)
    max_ir, _ = ort_max_versions()
    proto.ir_version = min(proto.ir_version, max_ir)
    return proto


def export(
    model: torch.nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    dynamic_shapes: DynamicShapes | None = None,
    *,
    dynamo: bool = False,
) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file the installed onnxruntime loads; returns the path.

    Inputs are named ``input`` (or ``input_0``, ``input_1``, ...) and the output ``output``.
    ``dynamic_shapes`` gives, per input (a sequence in input order or a mapping by input name),
    ``{axis: name}``, e.g. ``({0: "batch"},)``; ``torch.export.Dim`` objects are accepted too. The
    TorchScript exporter (``dynamo=False``, the default: it writes the plainer graph) uses opset 17;
    the dynamo exporter opset 18. An exporter failure raises :class:`~onnxq.errors.OnnxqError`.
    """
    proto = export_proto(model, example_inputs, dynamic_shapes, dynamo=dynamo)
    return write_atomic(proto, path)


def _graph_inputs(proto: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def to_feeds(data: Iterable[Any], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Calibration or evaluation samples as onnxq feeds ``{input_name: array}``.

    A sample is a tensor (one input), a tuple/list of tensors (the inputs in order) or already a
    mapping ``{name: array or tensor}``. Tensors are detached and converted to numpy.
    """

    def array(value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            return np.ascontiguousarray(value.detach().cpu().numpy())
        return np.asarray(value)

    feeds = []
    for index, sample in enumerate(data):
        if isinstance(sample, Mapping):
            feeds.append({str(k): array(v) for k, v in sample.items()})
            continue
        items = (sample,) if isinstance(sample, (torch.Tensor, np.ndarray)) else tuple(sample)
        if len(items) != len(names):
            raise OnnxqError(
                f"sample {index} has {len(items)} tensor(s) but the model takes {len(names)} input(s) "
                f"({', '.join(names)}); pass the inputs only (no labels)"
            )
        feeds.append({name: array(item) for name, item in zip(names, items, strict=True)})
    if not feeds:
        raise OnnxqError("the calibration data is empty")
    return feeds


def quantize_module(
    model: torch.nn.Module,
    example_inputs: Inputs,
    calibration_data: Iterable[Any],
    config: QuantConfig | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    eval_data: Iterable[Any] | None = None,
    dynamic_shapes: DynamicShapes | None = None,
    dynamo: bool = False,
) -> QuantizationResult:
    """Export ``model``, quantize it statically with onnxq, validate it in ONNX Runtime; save if ``path``.

    ``calibration_data`` (and ``eval_data``, default: the calibration data) is an iterable of samples:
    tensors, tuples of tensors (the module's positional inputs) or ``{input_name: array}`` feeds.
    Without ``dynamic_shapes``, axis 0 of every input is a dynamic batch axis, so samples may have any
    batch size. Returns onnxq's :class:`~onnxq.pipeline.result.QuantizationResult` (``.model``,
    ``.report``, ``.save``), already validated (accuracy and latency against the float export).
    """
    import onnxq

    args = _as_tuple(example_inputs)
    if dynamic_shapes is None:
        dynamic_shapes = [{0: "batch"} if t.dim() > 0 else None for t in args]
    proto = export_proto(model, args, dynamic_shapes, dynamo=dynamo)
    names = _graph_inputs(proto)
    calibration = to_feeds(calibration_data, names)
    evaluation = to_feeds(eval_data, names) if eval_data is not None else calibration
    result = onnxq.quantize(proto, calibration, config or QuantConfig(), show_progress=False)
    result.validate(evaluation, show_progress=False)
    if path is not None:
        result.save(path)
    return result
