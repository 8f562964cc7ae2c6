"""The static quantization pipeline and its library entry point, :func:`quantize`.

load → normalize versions → preprocess → plan → calibrate → insert Q/DQ → cleanup; then, on request,
validate in ONNX Runtime. Each step lives in its own module; this one only orders them and fills the
report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import onnx_ir as ir

from onnxq.config import QuantConfig, ValidationConfig
from onnxq.data import Feeds, input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.model_io import (
    MIN_QDQ_PER_AXIS_OPSET,
    default_opset,
    load_model,
    model_size_bytes,
    normalize_versions,
    runtime_source,
    save_model,
    serialize_model,
)
from onnxq.passes.cleanup import cleanup, preprocess
from onnxq.passes.insert_qdq import InsertQDQPass, group_params
from onnxq.passes.plan import plan_quantization
from onnxq.report import AccuracyRow, LatencyRow, QuantReport

__all__ = ["QuantizationResult", "quantize"]

logger = logging.getLogger(__name__)

DataSource: TypeAlias = "str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Feeds"


class QuantizationResult:
    """The quantized model, its report, and the means to save and validate it."""

    def __init__(
        self,
        model: ir.Model,
        report: QuantReport,
        *,
        float_source: bytes | Path,
        calibration: Feeds,
        input_path: Path | None,
    ) -> None:
        self.model = model
        self.report = report
        self._float_source = float_source
        self._calibration = calibration
        self._input_path = input_path
        self._saved: Path | None = None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the quantized model atomically; never overwrites the input model."""
        start = time.perf_counter()
        self._saved = save_model(self.model, path, input_path=self._input_path)
        self.report.output = str(self._saved)
        self.report.size_quantized_bytes = _file_size(self._saved)
        self.report.timings_s["save"] = time.perf_counter() - start
        return self._saved

    def validate(
        self,
        data: DataSource | None = None,
        config: ValidationConfig | None = None,
        *,
        show_progress: bool | None = None,
    ) -> QuantReport:
        """Compare float and quantized models in ONNX Runtime and time both; fills ``report``.

        Accuracy is measured at ``ORT_ENABLE_ALL`` (what a deployment computes, with ONNX Runtime's QDQ
        fusions); latency at ``ORT_ENABLE_ALL`` with interleaved runs. ``data`` defaults to the
        calibration data.
        """
        from onnxq.validate.runtime import resolve_providers

        config = config or ValidationConfig()
        start = time.perf_counter()
        providers = resolve_providers(config.provider)
        if data is None:
            feeds = self._calibration
        elif isinstance(data, Feeds):
            feeds = data
        else:
            feeds = load_feeds(data, self._calibration.specs, what="evaluation data")
        with contextlib.ExitStack() as stack:
            quantized: bytes | Path = (
                self._saved if self._saved is not None else stack.enter_context(runtime_source(self.model))
            )
            self._compare(quantized, feeds, providers)
            self._time(quantized, feeds, providers, config)
        self.report.timings_s["validate"] = time.perf_counter() - start
        return self.report

    def _compare(self, quantized: bytes | Path, feeds: Feeds, providers: list[str]) -> None:
        from onnxq.validate.metrics import compare_models

        stats = compare_models(
            self._float_source,
            quantized,
            feeds,
            providers=providers,
            opt_level="all",
            progress_total=feeds.num_batches,
            progress_desc="validate",
        )
        self.report.provider = providers[0]
        self.report.accuracy_opt_level = "ORT_ENABLE_ALL"
        self.report.accuracy = [
            AccuracyRow(s.name, s.sqnr_db, s.cosine, s.max_abs_error, s.top1, s.samples) for s in stats
        ]

    def _time(
        self, quantized: bytes | Path, feeds: Feeds, providers: list[str], config: ValidationConfig
    ) -> None:
        from onnxq.validate.runtime import measure_latency

        self.report.latency = []
        first = next(iter(feeds), None)
        if first is None:
            return
        for threads in config.threads:
            timing = measure_latency(
                {"float": self._float_source, "quantized": quantized},
                first,
                threads=threads,
                runs=config.latency_runs,
                warmup=config.warmup_runs,
                providers=providers,
            )
            self.report.latency.append(
                LatencyRow(
                    threads, timing["float"].median_ms, timing["quantized"].median_ms, config.latency_runs
                )
            )


def quantize(
    model: Any,
    calibration_data: DataSource,
    config: QuantConfig | None = None,
    *,
    show_progress: bool | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    random_samples: int = 16,
) -> QuantizationResult:
    """Quantize a float ONNX model statically (QDQ form) using calibration data.

    ``model`` is a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified).
    ``calibration_data`` is an ``.npz`` file, a directory of ``.npz`` files, an iterable of
    ``{input_name: array}`` feeds, or ``"random"`` (smoke tests only). Raises :class:`OnnxqError`
    for input that does not fit.
    """
    config = config or QuantConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    ir_model = load_model(model)
    label = str(input_path) if input_path is not None else (ir_model.graph.name or "<in-memory model>")
    report = QuantReport(model=label)
    report.version_notes = normalize_versions(ir_model)
    # The float reference for validation: the user's file when onnxruntime can load it as it is,
    # else the version-normalized model (same computation).
    float_source: bytes | Path
    if input_path is not None and not report.version_notes:
        float_source = input_path
        report.size_float_bytes = _file_size(input_path)
    else:
        float_source = serialize_model(ir_model)
        report.size_float_bytes = len(float_source)
    if default_opset(ir_model) < MIN_QDQ_PER_AXIS_OPSET and config.weights.per_channel:
        config = config.replace(
            weights=type(config.weights)(config.weights.dtype, config.weights.symmetric, False)
        )

    summary = preprocess(ir_model)
    report.preprocess_notes = summary.notes
    report.batchnorms_folded = summary.batchnorms_folded
    report.nodes_before = summary.nodes_before
    timings["preprocess"] = time.perf_counter() - start

    plan = plan_quantization(ir_model, config)
    if plan.empty:
        ops = sorted({n.op_type for n in ir_model.graph})
        why = f"; {'; '.join(plan.declined[:2])}" if plan.declined else ""
        raise OnnxqError(
            f"nothing to quantize in {label}: no eligible Conv/ConvTranspose/Gemm/MatMul "
            f"(op types present: {', '.join(ops) or 'none'}){why}"
        )

    if isinstance(calibration_data, Feeds):
        feeds = calibration_data
    else:
        feeds = load_feeds(
            calibration_data,
            input_specs(ir_model),
            batch_size=config.calibration.batch_size,
            random_samples=random_samples,
        )
    from onnxq.calibrate.collect import collect_ranges

    t = time.perf_counter()
    runtime_declines: list[str] = []
    runtime_excluded: list[str] = []
    while True:
        observed = plan.observed_values()
        schemes = {v: plan.group_of[v].scheme for v in observed}
        calibration = collect_ranges(
            ir_model,
            observed,
            schemes,
            feeds,
            config.calibration,
            providers=providers,
            show_progress=show_progress,
        )
        if not calibration.non_float:
            break
        # Shape inference could not type these tensors and they turned out not to be float32 at run
        # time: keep every node that touches them float and plan again.
        bad = set(calibration.non_float)
        touching = sorted(
            n.name or ""
            for n in plan.quantized_nodes
            if any(v is not None and v.name in bad for v in (*n.inputs, *n.outputs))
        )
        runtime_declines += [
            f"{name} not quantized: a tensor it reads or writes is not float32" for name in touching
        ]
        runtime_excluded += touching
        config = config.replace(exclude_nodes=(*config.exclude_nodes, *touching))
        plan = plan_quantization(ir_model, config)
        if plan.empty:
            raise OnnxqError(f"nothing to quantize in {label}: every candidate touches non-float tensors")
    replaced = {f"{name} not quantized: excluded by configuration" for name in runtime_excluded}
    report.declined = [*runtime_declines, *(d for d in plan.declined if d not in replaced)]
    report.subgraph_nodes = plan.subgraph_nodes
    timings["calibrate"] = time.perf_counter() - t
    report.calibration = {
        "method": calibration.method,
        "samples": calibration.samples,
        "runs": calibration.runs,
        "seconds": calibration.seconds,
        "tensors": len(observed),
        "random": feeds.is_random,
    }

    t = time.perf_counter()
    params = group_params(plan, calibration.ranges)
    InsertQDQPass(plan, params)(ir_model)
    cleanup(ir_model)
    timings["rewrite"] = time.perf_counter() - t

    report.scheme = {
        "format": "qdq",
        "activations": f"{config.activations.dtype} "
        + ("symmetric" if config.activations.symmetric else "affine"),
        "weights": config.weights.dtype + (" per-channel" if config.weights.per_channel else " per-tensor"),
        "calibration": config.calibration.method,
    }
    report.quantized_op_types = dict(sorted(plan.quantized_op_types().items()))
    report.activations_absorbed = len(plan.absorbed_nodes)
    report.float_op_types = dict(sorted(plan.float_op_types.items()))
    report.nodes_after = summary.nodes_after
    report.size_quantized_bytes = _serialized_size(ir_model)
    timings["total"] = time.perf_counter() - start
    report.timings_s = timings
    return QuantizationResult(
        ir_model, report, float_source=float_source, calibration=feeds, input_path=input_path
    )


def _file_size(path: Path) -> int:
    """Bytes on disk of a model file plus the external data files beside it that it references."""
    return path.stat().st_size + sum(
        p.stat().st_size for p in path.parent.glob(path.name + ".data") if p.is_file()
    )


def _serialized_size(model: ir.Model) -> int:
    try:
        return len(serialize_model(model))
    except ValueError:  # over protobuf's 2 GiB: count the tensor data instead
        return model_size_bytes(model)
