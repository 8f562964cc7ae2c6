"""The static quantization pipeline and its library entry point, :func:`quantize`.

load → normalize versions → preprocess → plan → calibrate → insert Q/DQ → cleanup; then, on request,
validate in ONNX Runtime. Each step lives in its own module; this one only orders them and fills the
report.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import onnx_ir as ir

from onnxq.config import QuantConfig, ValidationConfig
from onnxq.data import Feeds, input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.graph import default_opset
from onnxq.load.files import load_model, model_size_bytes, save_model, serialize_model
from onnxq.load.versions import MIN_QDQ_PER_AXIS_OPSET, check_runtime_ops, normalize_versions
from onnxq.plan.planner import QuantPlan, plan_quantization
from onnxq.preprocess import preprocess
from onnxq.provenance import stamp_provenance
from onnxq.report import AccuracyRow, LatencyRow, QuantReport
from onnxq.rewrite.cleanup import cleanup
from onnxq.rewrite.insert_qdq import InsertQDQPass, group_params
from onnxq.runtime.kernels import onnxruntime_version
from onnxq.runtime.session import runtime_source

__all__ = ["ANCHOR_OPS", "QuantizationResult", "StaticState", "quantize"]

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
        calibration: Feeds | None,
        input_path: Path | None,
        static: StaticState | None = None,
    ) -> None:
        self.model = model
        self.report = report
        #: Set for static quantization of a float model: re-quantize variants without recalibrating.
        self.static = static
        self._float_source = float_source
        self._calibration = calibration
        self._input_path = input_path
        self._saved: Path | None = None
        #: Whether ``model`` (as it is now) has run in ONNX Runtime at ORT_ENABLE_ALL.
        self._ran = False

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the quantized model atomically; never overwrites the input model.

        A model is written only once it has run in ONNX Runtime at ``ORT_ENABLE_ALL``: by
        :meth:`validate`, or else by a smoke run on one feed here (:meth:`check_runs`). The file records
        its provenance in ``metadata_props`` (onnxq version, settings, calibration data fingerprint,
        the ONNX Runtime it was validated with), deterministically.
        """
        start = time.perf_counter()
        if not self._ran:
            self.check_runs()
        stamp_provenance(self.model, self.report)
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
        calibration data, and to random inputs (with a warning) when there was none.
        """
        from onnxq.runtime.session import resolve_providers

        config = config or ValidationConfig()
        start = time.perf_counter()
        providers = resolve_providers(config.provider)
        feeds = self._eval_feeds(data)
        with contextlib.ExitStack() as stack:
            quantized: bytes | Path = (
                self._saved if self._saved is not None else stack.enter_context(runtime_source(self.model))
            )
            self._compare(quantized, feeds, providers)
            self._ran = True
            self._time(quantized, feeds, providers, config)
        self.report.validated_with = f"onnxruntime {onnxruntime_version()} {providers[0]}"
        self.report.timings_s["validate"] = time.perf_counter() - start
        slower = [row for row in self.report.latency if row.speedup < 1.0]
        for row in slower:
            logger.warning(
                "the quantized model is SLOWER than the input at %d thread(s): %.3f ms vs %.3f ms (%.2fx)",
                row.threads,
                row.quantized_ms,
                row.float_ms,
                row.speedup,
            )
        return self.report

    def check_runs(self) -> None:
        """Load the model in ONNX Runtime at ``ORT_ENABLE_ALL`` and run it once; raise if it fails.

        The feed is the first calibration sample, else random inputs from the declared shapes (when
        the float model runs on them). A failure raises :class:`OnnxqError` naming the node.
        """
        from onnxq.validate.smoke import check_runs

        feeds = self._calibration
        if feeds is None:
            with contextlib.suppress(OnnxqError):
                feeds = load_feeds(
                    "random", input_specs(self.model), random_samples=1, what="smoke-test data", quiet=True
                )
        first = next(iter(feeds), None) if feeds is not None else None
        random = feeds is None or feeds.is_random
        providers = ("CPUExecutionProvider",)
        with runtime_source(self.model) as quantized:
            check_runs(quantized, self._float_source, first, random_feed=random, providers=providers)
        self._ran = True
        if not self.report.validated_with:
            self.report.validated_with = f"onnxruntime {onnxruntime_version()} {providers[0]}"

    def meet_target(self, target: Any, data: DataSource | None = None) -> Any:
        """Keep the most sensitive layers float until ``target`` holds on ``data`` (an accuracy budget).

        ``target`` is an :class:`onnxq.tuning.AccuracyTarget` (``AccuracyTarget.parse("sqnr>=30")``) or
        an :class:`onnxq.tuning.CustomTarget` wrapping the user's own evaluation function. Replaces
        ``model`` with the result and records the search in the report; returns the search outcome.
        """
        from onnxq.tuning.budget import meet_target

        if self.static is None:
            raise OnnxqError("an accuracy target needs static quantization of a float model")
        start = time.perf_counter()
        outcome = meet_target(self, target, self._eval_feeds(data))
        self.model = outcome.model
        self._saved = None
        self._ran = False
        self.report.budget = outcome.as_dict()
        # The report counts what the chosen model quantizes, not what the first plan did.
        plan = self.static.plan(keep_float=outcome.kept_float)
        self.report.quantized_op_types = dict(sorted(plan.quantized_op_types().items()))
        self.report.activations_absorbed = len(plan.absorbed_nodes)
        self.report.float_op_types = dict(sorted(plan.float_op_types.items()))
        self.report.size_quantized_bytes = _serialized_size(self.model)
        self.report.timings_s["budget"] = time.perf_counter() - start
        return outcome

    def inspect_layers(self, data: DataSource | None = None, *, limit: int | None = 30) -> str:
        """Per-layer numeric suite against the float model; stored in the report, returned as a table."""
        from onnxq.validate.layers import format_layers, inspect_layers, layers_to_dict

        reference = (
            self.static.float_model if self.static is not None else load_model(self._float_reference())
        )
        stats = inspect_layers(self.model, reference, self._eval_feeds(data))
        self.report.layers = layers_to_dict(stats)
        return format_layers(stats, limit=limit)

    def _float_reference(self) -> Any:
        if isinstance(self._float_source, Path):
            return self._float_source
        import onnx

        return onnx.load_model_from_string(self._float_source)

    def _eval_feeds(self, data: DataSource | None) -> Feeds:
        """Evaluation data: given, else the calibration data, else random inputs with a warning."""
        if isinstance(data, Feeds):
            return data
        if data is not None:
            return load_feeds(data, input_specs(self.model), what="evaluation data")
        if self._calibration is not None:
            return self._calibration
        return load_feeds("random", input_specs(self.model), what="evaluation data")

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
        from onnxq.runtime.latency import measure_latency

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
    calibration_data: DataSource | None = None,
    config: QuantConfig | None = None,
    *,
    show_progress: bool | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    random_samples: int = 16,
) -> QuantizationResult:
    """Quantize an ONNX model and return the result (model, report, ``save``, ``validate``).

    ``model`` is a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified).
    ``calibration_data`` is an ``.npz`` file, a directory of ``.npz`` files, an iterable of
    ``{input_name: array}`` feeds, or ``"random"`` (smoke tests only); static quantization of a float
    model needs it, dynamic quantization and models that already hold Q/DQ do not.

    What happens depends on the model and ``config``:

    - a float model, ``mode="static"``: calibrated Q/DQ (then lowered to QOperator form when
      ``format="qoperator"``);
    - a float model, ``mode="dynamic"``: int8 weights, activations quantized at run time;
    - a model that already holds Q/DQ (PyTorch QAT export, another tool, onnxq): normalized and
      re-emitted (or lowered) without recalibration.

    Raises :class:`OnnxqError` for input that does not fit.
    """
    config = config or QuantConfig()
    start = time.perf_counter()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    ir_model = load_model(model)
    label = str(input_path) if input_path is not None else (ir_model.graph.name or "<in-memory model>")
    check_runtime_ops(ir_model, label)
    input_names = _node_names(ir_model)
    report = QuantReport(model=label, timings_s={}, source_producer=_producer(ir_model))
    report.version_notes = normalize_versions(ir_model)
    # The reference for validation: the user's file when onnxruntime can load it as it is, else the
    # version-normalized model (same computation).
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

    from onnxq.rewrite.normalize_qdq import is_quantized

    feeds: Feeds | None = None
    static: StaticState | None = None
    if is_quantized(ir_model):
        # Preprocess first: exporters compute fake-quant scales in the graph (Abs → ReduceMax → Div of a
        # weight); constant folding turns them into the constants normalization needs.
        _preprocess(ir_model, report)
        _normalize_existing(ir_model, report)
        report.mode = "requantize"
        feeds = _reference_feeds(ir_model, calibration_data)
    elif config.mode == "dynamic":
        _preprocess(ir_model, report)
        _check_config_names(config, input_names, ir_model)
        _quantize_dynamic(ir_model, config, report, label)
        report.mode = "dynamic"
        feeds = _reference_feeds(ir_model, calibration_data)
    else:
        _preprocess(ir_model, report)
        _check_config_names(config, input_names, ir_model)
        static = _quantize_static(
            ir_model, calibration_data, config, report, label, providers, show_progress, random_samples
        )
        feeds = static.feeds
        report.mode = "static"
    if config.format == "qoperator":
        _lower_to_qoperator(ir_model, report)
    cleanup(ir_model)

    report.scheme = _describe_scheme(config, report.mode)
    report.settings = _settings(config, report.mode)
    report.size_quantized_bytes = _serialized_size(ir_model)
    report.timings_s["total"] = time.perf_counter() - start
    return QuantizationResult(
        ir_model, report, float_source=float_source, calibration=feeds, input_path=input_path, static=static
    )


def _reference_feeds(model: ir.Model, data: DataSource | None) -> Feeds | None:
    """Data given to a mode that needs none (dynamic, already quantized): the default evaluation data."""
    if data is None or isinstance(data, Feeds):
        return data
    return load_feeds(data, input_specs(model), what="calibration data")


def _node_names(model: ir.Model) -> tuple[set[str], set[str]]:
    """(node names, op types) of every graph of the model."""
    nodes = list(model.graph.all_nodes())
    return {n.name for n in nodes if n.name}, {n.op_type for n in nodes}


def _check_config_names(config: QuantConfig, before: tuple[set[str], set[str]], model: ir.Model) -> None:
    """Names in the configuration must exist: a typo would otherwise be ignored without a word.

    Node names may be those of the input model or of the preprocessed one (unnamed nodes get their
    op type as name); op types must be ONNX or ONNX Runtime op types (absent ones are fine).
    """
    from onnxq.runtime.kernels import kernel_table

    after = _node_names(model)
    config.check_names(
        node_names=before[0] | after[0],
        model_op_types=before[1] | after[1],
        known_op_types=kernel_table().op_types(),
    )


def _producer(model: ir.Model) -> str:
    return " ".join(p for p in (model.producer_name, model.producer_version) if p)


def _preprocess(model: ir.Model, report: QuantReport) -> None:
    start = time.perf_counter()
    summary = preprocess(model)
    report.preprocess_notes = summary.notes
    report.batchnorms_folded = summary.batchnorms_folded
    report.nodes_before = summary.nodes_before
    report.nodes_after = summary.nodes_after
    report.timings_s["preprocess"] = time.perf_counter() - start


def _nothing_to_quantize(model: ir.Model, label: str, declined: Sequence[str]) -> OnnxqError:
    ops = sorted({n.op_type for n in model.graph})
    why = f"; {'; '.join(declined[:2])}" if declined else ""
    return OnnxqError(
        f"nothing to quantize in {label}: no eligible Conv/ConvTranspose/Gemm/MatMul "
        f"(op types present: {', '.join(ops) or 'none'}){why}"
    )


def _quantize_static(
    model: ir.Model,
    calibration_data: DataSource | None,
    config: QuantConfig,
    report: QuantReport,
    label: str,
    providers: Sequence[str],
    show_progress: bool | None,
    random_samples: int,
) -> StaticState:
    """Plan, calibrate and insert Q/DQ; returns what re-quantizing with other exclusions needs."""
    from onnxq.calibrate.collect import collect_ranges

    plan = plan_quantization(model, config)
    if plan.empty:
        raise _nothing_to_quantize(model, label, plan.declined)
    if calibration_data is None:
        raise OnnxqError(
            "static quantization needs calibration data (--calib DATA: an .npz file, a directory of "
            ".npz files, or 'random' for a smoke test); or use --mode dynamic"
        )
    if isinstance(calibration_data, Feeds):
        feeds = calibration_data
    else:
        feeds = load_feeds(
            calibration_data,
            input_specs(model),
            batch_size=config.calibration.batch_size,
            random_samples=random_samples,
        )

    start = time.perf_counter()
    runtime_declines: list[str] = []
    runtime_excluded: list[str] = []
    while True:
        observed = plan.observed_values()
        schemes = {v: plan.group_of[v].scheme for v in observed}
        calibration = collect_ranges(
            model,
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
        plan = plan_quantization(model, config)
        if plan.empty:
            raise OnnxqError(f"nothing to quantize in {label}: every candidate touches non-float tensors")
    replaced = {f"{name} not quantized: excluded by configuration" for name in runtime_excluded}
    report.declined = [*runtime_declines, *(d for d in plan.declined if d not in replaced)]
    report.subgraph_nodes = plan.subgraph_nodes
    report.timings_s["calibrate"] = time.perf_counter() - start
    report.calibration = {
        "method": calibration.method,
        "samples": calibration.samples,
        "runs": calibration.runs,
        "seconds": calibration.seconds,
        "tensors": len(observed),
        "random": feeds.is_random,
        "fingerprint": calibration.fingerprint,
    }

    start = time.perf_counter()
    state = StaticState(
        float_model=model.clone(),
        config=config,
        feeds=feeds,
        ranges={v.name or "": r for v, r in calibration.ranges.items()},
        providers=tuple(providers),
        quantized_nodes=tuple(n.name or "" for n in plan.quantized_nodes if n.op_type in ANCHOR_OPS),
    )
    InsertQDQPass(plan, group_params(plan, calibration.ranges))(model)
    report.timings_s["rewrite"] = time.perf_counter() - start
    report.quantized_op_types = dict(sorted(plan.quantized_op_types().items()))
    report.activations_absorbed = len(plan.absorbed_nodes)
    report.float_op_types = dict(sorted(plan.float_op_types.items()))
    return state


#: Op types whose quantization decides the speed and the accuracy (what sensitivity analysis ranks).
ANCHOR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class StaticState:
    """What a static quantization learned, kept so that variants cost a rewrite, not a calibration.

    ``float_model`` is the preprocessed float model (before Q/DQ); ``ranges`` the calibrated range
    of every observed tensor by name; ``quantized_nodes`` the anchor nodes that were quantized.
    """

    float_model: ir.Model
    config: QuantConfig
    feeds: Feeds
    ranges: dict[str, tuple[float, float]]
    providers: tuple[str, ...]
    quantized_nodes: tuple[str, ...]

    def plan(self, keep_float: Iterable[str] = ()) -> QuantPlan:
        """The plan of :meth:`requantize` for the same ``keep_float`` (what it would quantize)."""
        config = self.config.replace(exclude_nodes=(*self.config.exclude_nodes, *keep_float))
        return plan_quantization(self.float_model.clone(), config)

    def requantize(self, keep_float: Iterable[str] = ()) -> ir.Model:
        """The same quantization with the nodes named in ``keep_float`` left float.

        Calibrated ranges are reused; only tensors that no earlier run observed are calibrated now.
        """
        from onnxq.calibrate.collect import collect_ranges

        model = self.float_model.clone()
        config = self.config.replace(exclude_nodes=(*self.config.exclude_nodes, *keep_float))
        plan = plan_quantization(model, config)
        observed = plan.observed_values()
        missing = [v for v in observed if (v.name or "") not in self.ranges]
        if missing:
            schemes = {v: plan.group_of[v].scheme for v in missing}
            extra = collect_ranges(
                model, missing, schemes, self.feeds, config.calibration, providers=self.providers
            )
            self.ranges.update({v.name or "": r for v, r in extra.ranges.items()})
        ranges = {v: self.ranges[v.name or ""] for v in observed if (v.name or "") in self.ranges}
        InsertQDQPass(plan, group_params(plan, ranges))(model)
        if config.format == "qoperator":
            from onnxq.rewrite.fuse_qlinear import FuseQLinearPass

            FuseQLinearPass()(model)
        cleanup(model)
        return model


def _quantize_dynamic(model: ir.Model, config: QuantConfig, report: QuantReport, label: str) -> None:
    """Int8 weights with activations quantized at run time (no calibration)."""
    from onnxq.rewrite.dynamic_quant import DynamicQuantizePass

    start = time.perf_counter()
    rewrite = DynamicQuantizePass(config)
    rewrite(model)
    if not rewrite.quantized:
        raise _nothing_to_quantize(model, label, rewrite.declined)
    report.quantized_op_types = dict(sorted(rewrite.quantized.items()))
    report.declined = list(rewrite.declined)
    report.float_op_types = dict(sorted(_float_ops(model).items()))
    report.subgraph_nodes = sum(len(g) for g in model.graph.subgraphs())
    report.timings_s["rewrite"] = time.perf_counter() - start


def _normalize_existing(model: ir.Model, report: QuantReport) -> None:
    """A model that already holds Q/DQ: canonical form, no recalibration."""
    from onnxq.rewrite.normalize_qdq import NormalizeQDQPass

    start = time.perf_counter()
    normalize = NormalizeQDQPass()
    normalize(model)
    report.preprocess_notes = [*report.preprocess_notes, *normalize.notes, *normalize.missing_ranges]
    counts = collections.Counter(
        n.op_type for n in model.graph.all_nodes() if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    )
    report.quantized_op_types = dict(sorted(counts.items()))
    report.nodes_after = sum(1 for _ in model.graph.all_nodes())
    report.timings_s["normalize"] = time.perf_counter() - start


def _lower_to_qoperator(model: ir.Model, report: QuantReport) -> None:
    """QDQ → integer operators; what could not be lowered stays in QDQ form, with the reason."""
    from onnxq.rewrite.fuse_qlinear import FuseQLinearPass

    start = time.perf_counter()
    lower = FuseQLinearPass()
    lower(model)
    report.lowered_op_types = dict(sorted(lower.lowered.items()))
    report.lowering_declined = list(lower.declined)
    report.timings_s["lower"] = time.perf_counter() - start


def _float_ops(model: ir.Model) -> collections.Counter[str]:
    quantized = {
        "DynamicQuantizeMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeLinear",
        "DequantizeLinear",
        "QuantizeLinear",
        "Cast",
        "MatMulIntegerToFloat",
    }
    return collections.Counter(n.op_type for n in model.graph if n.op_type not in quantized)


def _settings(config: QuantConfig, mode: str) -> dict[str, Any]:
    """The configuration that shaped the model, as JSON-friendly data (recorded in the output file)."""
    settings: dict[str, Any] = {"mode": mode, "format": config.format}
    if mode == "requantize":
        return settings
    settings["weights"] = dataclasses.asdict(config.weights)
    if mode == "static":
        settings["activations"] = dataclasses.asdict(config.activations)
        calibration = dataclasses.asdict(config.calibration)
        settings["calibration"] = {k: v for k, v in calibration.items() if k != "batch_size"}
    else:
        settings["dynamic"] = dataclasses.asdict(config.dynamic)
    settings["exclude_nodes"] = sorted(config.exclude_nodes)
    settings["exclude_op_types"] = sorted(config.exclude_op_types)
    for key, overrides in (
        ("op_type_overrides", config.op_type_overrides),
        ("node_overrides", config.node_overrides),
    ):
        if overrides:
            settings[key] = {name: dataclasses.asdict(o) for name, o in sorted(overrides.items())}
    return settings


def _describe_scheme(config: QuantConfig, mode: str) -> dict[str, str]:
    scheme = {"mode": mode, "format": config.format}
    if mode == "static":
        symmetric = "symmetric" if config.activations.symmetric else "affine"
        scheme["activations"] = f"{config.activations.dtype} {symmetric}"
        scheme["calibration"] = config.calibration.method
    elif mode == "dynamic":
        scheme["activations"] = "uint8 at run time"
    if mode != "requantize":
        scheme["weights"] = config.weights.dtype + (
            " per-channel" if config.weights.per_channel else " per-tensor"
        )
    return scheme


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
