"""Quantization-aware training in plain torch: prepare, calibrate, train, export as QDQ ONNX.

:func:`prepare_qat` traces the model with ``torch.fx`` and places fake quantization where onnxq's
static planner (:mod:`onnxq.plan.planner`, :mod:`onnxq.plan.op_rules`) places Q/DQ, so that the
trained model is the model onnxq deploys:

- Conv2d (with a following BatchNorm2d folded in and a following ReLU fused) and Linear are the
  *anchors*: their weights are fake-quantized per output channel, their data input is quantized (a
  fake-quant is inserted where it does not already arrive quantized).
- A Conv's output is always quantized, after its fused ReLU (no fake-quant between Conv and ReLU); a
  Linear's output only when a consumer reads it quantized (onnxq's ``if_wanted``).
- MaxPool, Flatten, view/reshape, Dropout and Identity pass their input's grid through (ReLU too,
  once its input is quantized: a uint8 grid with its zero point at 0 is closed under ReLU).
- Add and average pooling are quantized when all their inputs arrive quantized and a consumer wants
  the output quantized, with their own output scale (a ReLU right after them is absorbed the same way).
- Concat of quantized inputs: the fake-quants that feed it and its output share one instance (one
  scale), as onnxq requires for QLinearConcat.

Supported: modules that ``torch.fx.symbolic_trace`` can trace, made of Conv2d, BatchNorm2d (right
after a Conv2d), ReLU, Linear, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, Identity,
and the functions ``relu``, ``flatten``, ``add``/``+``, ``cat``, ``view``/``reshape``/``size``.
Anything else raises :class:`~onnxq.errors.OnnxqError` naming the node.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from onnxq.errors import OnnxqError
from onnxq.torch.export import DynamicShapes, Inputs, export_proto, write_atomic
from onnxq.torch.fake_quant import ActivationFakeQuant, GridReuse, activation_grid, weight_grid
from onnxq.torch.qat_modules import QATConv2d, QATLinear

__all__ = ["QATConfig", "calibrate_qat", "export_qat", "prepare_qat"]


@dataclass(frozen=True)
class QATConfig:
    """How QAT fake-quantizes.

    ``weight_bits`` 8 (int8, symmetric [-127, 127], onnxq's default) or 4 (symmetric [-7, 7], stored as
    int8 on export). Activations follow :class:`onnxq.config.ActivationScheme`: ``activation_dtype``
    uint8 (affine, the default) or int8 (``symmetric_activations`` for zero point 0).
    ``learnable_scales`` trains the scales with LSQ instead of following the observed ranges.
    ``freeze_bn_after``: training steps after which BatchNorm running statistics stop updating
    (``None``: never). ``averaging_constant``: weight of each batch in the moving-average activation
    ranges during training with fixed scales.
    """

    weight_bits: int = 8
    activation_dtype: str = "uint8"
    symmetric_activations: bool = False
    learnable_scales: bool = False
    freeze_bn_after: int | None = 200
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        weight_grid(self.weight_bits)
        activation_grid(self.activation_dtype, self.symmetric_activations)
        if self.freeze_bn_after is not None and self.freeze_bn_after < 0:
            raise OnnxqError(f"freeze_bn_after must be >= 0 or None, got {self.freeze_bn_after}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise OnnxqError(f"averaging_constant must be in (0, 1], got {self.averaging_constant}")


# Node kinds --------------------------------------------------------------------------------------

_PASS_MODULES = (nn.Flatten, nn.MaxPool2d, nn.Dropout, nn.Identity)
_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCTIONS = {torch.flatten, F.max_pool2d, F.dropout}
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD_FUNCTIONS = {operator.add, torch.add}
_POOL_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous"}
_SHAPE = "shape"


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """One of placeholder, output, conv, bn, linear, relu, pass, pool, add, cat, shape, qat, fq, reuse."""
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "call_module":
        module = modules[str(node.target)]
        for kind, types in (
            ("conv", (nn.Conv2d,)),
            ("bn", (nn.BatchNorm2d,)),
            ("linear", (nn.Linear,)),
            ("relu", (nn.ReLU,)),
            ("pass", _PASS_MODULES),
            ("pool", _POOL_MODULES),
            ("qat", (QATConv2d, QATLinear)),
            ("fq", (ActivationFakeQuant,)),
            ("reuse", (GridReuse,)),
        ):
            if isinstance(module, types):
                return kind
        raise OnnxqError(f"QAT does not support module {node.target!r} ({type(module).__name__})")
    if node.op == "call_function":
        for kind, functions in (
            ("pass", _PASS_FUNCTIONS),
            ("relu", _RELU_FUNCTIONS),
            ("add", _ADD_FUNCTIONS),
            ("pool", _POOL_FUNCTIONS),
        ):
            if node.target in functions:
                return kind
        if node.target is torch.cat:
            return "cat"
        if node.target is getattr:
            return _SHAPE
    if node.op == "call_method":
        if node.target in _PASS_METHODS:
            return "pass"
        if node.target == "relu":
            return "relu"
        if node.target == "add":
            return "add"
        if node.target == "size":
            return _SHAPE
    raise OnnxqError(
        f"QAT does not support node {node.name!r} ({node.op} {node.target}); see onnxq.torch.qat"
    )


# Preparation --------------------------------------------------------------------------------------


class _Preparer:
    """Rewrites one traced graph: fuse the anchors, then place the activation fake-quants."""

    def __init__(self, gm: fx.GraphModule, config: QATConfig) -> None:
        self.gm = gm
        self.config = config
        self.modules = dict(gm.named_modules())
        self.count = 0

    def kind(self, node: fx.Node) -> str:
        return _kind(node, self.modules)

    def _only_user(self, node: fx.Node, kind: str) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 and self.kind(users[0]) == kind else None

    def _add_module(self, prefix: str, module: nn.Module) -> str:
        name = f"{prefix}_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, module)
        self.modules[name] = module
        return name

    def fuse(self) -> None:
        """Conv2d(+BN)(+ReLU) → QATConv2d and Linear(+ReLU) → QATLinear, in the graph."""
        grid = weight_grid(self.config.weight_bits)
        learn = self.config.learnable_scales
        erased: set[fx.Node] = set()
        for node in list(self.gm.graph.nodes):
            if node in erased:
                continue
            kind = self.kind(node)
            if kind == "bn":
                raise OnnxqError(f"QAT supports BatchNorm2d only right after a Conv2d; {node.name!r} is not")
            if kind not in ("conv", "linear"):
                continue
            chain = [node]
            bn_node = self._only_user(node, "bn") if kind == "conv" else None
            if bn_node is not None:
                chain.append(bn_node)
            relu_node = self._only_user(chain[-1], "relu")
            if relu_node is not None:
                chain.append(relu_node)
            module = self.modules[str(node.target)]
            fused: nn.Module
            if isinstance(module, nn.Conv2d):
                bn = self.modules[str(bn_node.target)] if bn_node is not None else None
                assert bn is None or isinstance(bn, nn.BatchNorm2d)
                fused = QATConv2d(
                    module,
                    bn,
                    relu=relu_node is not None,
                    grid=grid,
                    learnable=learn,
                    freeze_bn_after=self.config.freeze_bn_after,
                )
            else:
                assert isinstance(module, nn.Linear)
                fused = QATLinear(module, relu=relu_node is not None, grid=grid, learnable=learn)
            node.target = self._add_module("qat", fused)
            chain[-1].replace_all_uses_with(node)
            for extra in reversed(chain[1:]):
                self.gm.graph.erase_node(extra)
                erased.add(extra)

    def _new_fq(self) -> str:
        config = self.config
        grid = activation_grid(config.activation_dtype, config.symmetric_activations)
        module = ActivationFakeQuant(
            grid, learnable=config.learnable_scales, averaging_constant=config.averaging_constant
        )
        return self._add_module("fq", module)

    def _insert_after(self, value: fx.Node, target: str) -> fx.Node:
        """A fake-quant node reading ``value``; every other reader of ``value`` reads it instead."""
        graph = self.gm.graph
        with graph.inserting_after(value):
            fq = graph.call_module(target, (value,))
        value.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
        return fq

    def _wants_quantized(self, node: fx.Node) -> bool:
        """Whether a consumer reads ``node``'s output quantized (through pass-through ops)."""
        for user in node.users:
            kind = self.kind(user)
            if kind in ("qat", "add", "cat", "pool"):
                return True
            if kind in ("pass", "relu", "fq", "reuse") and self._wants_quantized(user):
                return True
        return False

    def _output_point(self, node: fx.Node) -> fx.Node:
        """Where the output fake-quant of ``node`` goes: after a ReLU that is its only reader."""
        relu = self._only_user(node, "relu")
        return relu if relu is not None else node

    def place(self) -> None:
        """Walk the graph in order, tracking which values are on a grid (the fake-quant that made it)."""
        grid_of: dict[fx.Node, str | None] = {}
        for node in list(self.gm.graph.nodes):
            if node in grid_of:  # a fake-quant or absorbed ReLU already handled
                continue
            kind = self.kind(node)
            tensors = [a for a in node.all_input_nodes if self.kind(a) != _SHAPE]
            if kind in ("placeholder", "output", _SHAPE):
                grid_of[node] = None
            elif kind == "qat":
                data = tensors[0]
                if grid_of.get(data) is None:
                    fq = self._insert_after(data, self._new_fq())
                    grid_of[fq] = str(fq.target)
                    grid_of[data] = str(fq.target)
                elif self.kind(data) != "fq":
                    self._reuse_grid(data, node, grid_of)
                module = self.modules[str(node.target)]
                if isinstance(module, QATConv2d) or self._wants_quantized(node):
                    self._quantize_output(node, grid_of)
                else:
                    grid_of[node] = None
            elif kind in ("pass", "relu"):
                grid_of[node] = grid_of.get(tensors[0]) if tensors else None
            elif kind in ("add", "pool"):
                if tensors and all(grid_of.get(t) for t in tensors) and self._wants_quantized(node):
                    self._quantize_output(self._output_point(node), grid_of)
                    grid_of.setdefault(node, None)
                else:
                    grid_of[node] = None
            elif kind == "cat":
                self._share(node, tensors, grid_of)
            else:
                grid_of[node] = None

    def _reuse_grid(self, data: fx.Node, anchor: fx.Node, grid_of: dict[fx.Node, str | None]) -> None:
        """Re-apply ``data``'s grid right before ``anchor`` (exported as the Q/DQ the anchor reads)."""
        source = self.modules[str(grid_of[data])]
        assert isinstance(source, ActivationFakeQuant)
        graph = self.gm.graph
        with graph.inserting_before(anchor):
            reuse = graph.call_module(self._add_module("requant", GridReuse(source)), (data,))
        anchor.replace_input_with(data, reuse)
        grid_of[reuse] = grid_of[data]

    def _quantize_output(self, point: fx.Node, grid_of: dict[fx.Node, str | None]) -> None:
        fq = self._insert_after(point, self._new_fq())
        grid_of[point] = grid_of[fq] = str(fq.target)

    def _share(self, node: fx.Node, inputs: list[fx.Node], grid_of: dict[fx.Node, str | None]) -> None:
        """Concat of quantized inputs: one fake-quant instance for all its inputs and its output."""
        if not inputs or not all(grid_of.get(t) for t in inputs):
            grid_of[node] = None
            return
        shared = grid_of[inputs[0]]
        assert shared is not None
        for value in inputs:
            producer = value if self.kind(value) == "fq" else None
            if producer is not None:
                producer.target = shared
                grid_of[producer] = shared
        grid_of[node] = shared


def prepare_qat(
    model: nn.Module,
    config: QATConfig | None = None,
    calibration_data: Iterable[Any] | None = None,
) -> fx.GraphModule:
    """A copy of ``model`` with fake quantization placed as onnxq's planner places Q/DQ (see module doc).

    The copy is a ``torch.fx.GraphModule`` that trains like the original. Its activation ranges must
    be initialised before training: pass ``calibration_data`` (an iterable of input tensors or tuples
    of tensors) here, or call :func:`calibrate_qat` afterwards.
    """
    config = config or QATConfig()
    original = copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(original)
    except Exception as exc:
        raise OnnxqError(f"QAT needs a torch.fx-traceable model: {str(exc).splitlines()[0]}") from exc
    preparer = _Preparer(gm, config)
    for node in gm.graph.nodes:
        preparer.kind(node)  # raises for anything unsupported, before any change
    preparer.fuse()
    preparer.place()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(model.training)
    if calibration_data is not None:
        calibrate_qat(gm, calibration_data)
    return gm


def _fake_quants(model: nn.Module) -> list[ActivationFakeQuant]:
    return [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]


def _layers(model: nn.Module) -> list[QATConv2d | QATLinear]:
    return [m for m in model.modules() if isinstance(m, (QATConv2d, QATLinear))]


@torch.no_grad()
def calibrate_qat(model: nn.Module, batches: Iterable[Any]) -> None:
    """Initialise the activation ranges (min-max, as onnxq's default calibration) and weight scales.

    The model runs in eval mode and in float (weights unquantized, activations observed, BatchNorm
    with its running statistics) on ``batches`` (tensors or tuples of tensors); then every fake-quant
    gets its scale and zero point (also the starting point of learnable scales). Resets earlier ranges.
    """
    fqs, layers = _fake_quants(model), _layers(model)
    if not fqs and not layers:
        raise OnnxqError("the model has no fake quantization: call prepare_qat first")
    was_training = model.training
    model.eval()
    for fq in fqs:
        fq.reset_range()
        fq.observing = True
    for layer in layers:
        layer.quantize_weights = False
    seen = 0
    try:
        for batch in batches:
            args = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
            model(*args)
            seen += 1
    finally:
        for fq in fqs:
            fq.observing = False
        for layer in layers:
            layer.quantize_weights = True
        model.train(was_training)
    if seen == 0:
        raise OnnxqError("calibrate_qat got no batches")
    for fq in fqs:
        fq.update_qparams()
    for layer in layers:
        layer.weight_fake_quant.init_scale(layer.folded()[0])


@contextlib.contextmanager
def exporting(model: nn.Module) -> Iterator[None]:
    """Switch every fake-quant of ``model`` to its ONNX-emitting form for the duration."""
    parts: list[ActivationFakeQuant | QATConv2d | QATLinear] = [*_fake_quants(model), *_layers(model)]
    for part in parts:
        part.exporting = True
    try:
        yield
    finally:
        for part in parts:
            part.exporting = False


def export_qat(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    dynamic_shapes: DynamicShapes | None = None,
) -> Path:
    """Export a QAT model (eval mode) as a QDQ ONNX model with the learned scales and zero points.

    Activation fake-quants become ``QuantizeLinear → DequantizeLinear`` (scalar scale, uint8/int8 zero
    point); weights become int8 initializers (the BatchNorm folded in) read by a per-channel
    ``DequantizeLinear``. 4-bit weights are stored in int8 with values in [-7, 7]: int4 needs opset 21,
    which onnxruntime does not run everywhere. Uses the TorchScript exporter (the fake-quants emit
    their ops through ``autograd.Function.symbolic``). ``onnxq.quantize(path)`` normalizes the result
    without recalibration; ``QuantConfig(format="qoperator")`` lowers it to integer operators.
    Without ``dynamic_shapes``, axis 0 of every input is a dynamic batch axis.
    """
    if not _fake_quants(model) and not _layers(model):
        raise OnnxqError("the model has no fake quantization: call prepare_qat first")
    if any(not fq.calibrated for fq in _fake_quants(model)):
        raise OnnxqError("the QAT model is not calibrated: run calibrate_qat(model, batches) first")
    if dynamic_shapes is None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        dynamic_shapes = [{0: "batch"} if t.dim() > 0 else None for t in args]
    with exporting(model):
        proto = export_proto(model, example_inputs, dynamic_shapes, dynamo=False)
    return write_atomic(proto, path)
