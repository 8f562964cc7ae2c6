"""The library entry point, :func:`quantize`: load, normalize versions, preprocess, run one mode.

load → versions → preprocess → (static | dynamic | requantize) → (lower) → cleanup. Each stage lives
in its own package and returns a typed summary; this module only orders them and builds the report
(:func:`~onnxq.pipeline.summary.build_report`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq.config import QuantConfig, WeightScheme
from onnxq.data import DataSource, Feeds, input_specs, load_feeds
from onnxq.graph import default_opset, initializer_bytes
from onnxq.load.files import file_size, load_model, serialize_model, serialized_size
from onnxq.load.versions import MIN_QDQ_PER_AXIS_OPSET, check_runtime_ops, normalize_versions
from onnxq.pipeline.dynamic import quantize_dynamic
from onnxq.pipeline.lower import lower_to_qoperator
from onnxq.pipeline.requantize import normalize_existing
from onnxq.pipeline.result import QuantizationResult
from onnxq.pipeline.state import StaticState
from onnxq.pipeline.static import quantize_static, with_run_time_note
from onnxq.pipeline.summary import Mode, ModeSummary, build_report
from onnxq.preprocess import preprocess
from onnxq.preprocess.canonicalize import write_float_forms
from onnxq.rewrite.cleanup import cleanup, drop_unused_initializers
from onnxq.rewrite.normalize_qdq import is_quantized
from onnxq.rewrite.sum_form import write_bias_adds_as_sum
from onnxq.runtime.kernels import kernel_table
from onnxq.tuning.latency_guard import DYNAMIC_LSTM, GuardOutcome, guard_latency

__all__ = ["quantize"]


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
    model needs it, dynamic quantization and models that already hold Q/DQ do not (given, it is their
    default evaluation data).

    What happens depends on the model and ``config``:

    - a float model, ``mode="static"``: calibrated Q/DQ (then lowered to QOperator form when
      ``format="qoperator"``);
    - a float model, ``mode="dynamic"``: int8 weights, activations quantized at run time;
    - a model that already holds Q/DQ (PyTorch QAT export, another tool, onnxq): normalized and
      re-emitted (or lowered) without recalibration.

    Raises :class:`~onnxq.errors.OnnxqError` for input that does not fit.
    """
    start = time.perf_counter()
    config = config or QuantConfig()
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    ir_model = load_model(model)
    label = str(input_path) if input_path is not None else (ir_model.graph.name or "<in-memory model>")
    check_runtime_ops(ir_model, label)
    input_names = _node_names(ir_model)
    source_producer = " ".join(p for p in (ir_model.producer_name, ir_model.producer_version) if p)
    version_notes = normalize_versions(ir_model)
    # The reference for validation: the user's file when onnxruntime can load it as it is, else the
    # version-normalized model (same computation).
    float_source: bytes | Path
    if input_path is not None and not version_notes:
        float_source = input_path
        size_float = file_size(input_path)
    else:
        float_source = serialize_model(ir_model)
        size_float = len(float_source)
    if default_opset(ir_model) < MIN_QDQ_PER_AXIS_OPSET and config.weights.per_channel:
        config = config.replace(weights=WeightScheme(config.weights.dtype, config.weights.symmetric, False))
    config = for_providers(config, providers)

    already_quantized = is_quantized(ir_model)
    # Preprocess first, for every mode: exporters compute fake-quant scales in the graph (Abs →
    # ReduceMax → Div of a weight); constant folding turns them into the constants normalization needs.
    # Cross-layer equalization (opt-in) only where ranges will be calibrated: float, static mode.
    preprocessed = preprocess(
        ir_model,
        equalize=config.equalize and config.mode == "static" and not already_quantized,
        upcast=not already_quantized,
    )
    static: StaticState | None = None
    feeds: Feeds | None
    summary: ModeSummary
    if already_quantized:
        summary = normalize_existing(ir_model)
        feeds = _reference_feeds(ir_model, calibration_data)
    elif config.mode == "dynamic":
        _check_config_names(config, input_names, ir_model)
        feeds = _reference_feeds(ir_model, calibration_data)
        summary = quantize_dynamic(ir_model, config, label=label, feeds=feeds, providers=providers)
    else:
        _check_config_names(config, input_names, ir_model)
        static, summary = quantize_static(
            ir_model,
            calibration_data,
            config,
            label=label,
            providers=providers,
            show_progress=show_progress,
            random_samples=random_samples,
        )
        feeds = static.feeds
    lowering = lower_to_qoperator(ir_model) if config.format == "qoperator" else None
    cleanup(ir_model)
    if config.format == "qdq":  # keep ONNX Runtime from fusing quantized MatMuls into float Gemms
        write_bias_adds_as_sum(ir_model)
    write_float_forms(ir_model)
    guard = None
    if static is not None and config.latency_guard.enabled:
        # a half-precision input computed in float32 is twice its size: it does not replace the input
        ir_model, guard = _guard_latency(
            static,
            ir_model,
            config,
            float_source,
            preprocessed_may_win=_may_replace_input(static, size_float, preprocessed.upcast),
        )

    if guard is None or not guard.wrote_input:  # (the user's input is written as it came)
        drop_unused_initializers(ir_model)
    report = build_report(
        label=label,
        source_producer=source_producer,
        version_notes=version_notes,
        preprocessed=preprocessed,
        mode=summary,
        lowering=lowering,
        scheme=_describe_scheme(config, summary),
        settings=_settings(config, summary.mode),
        size_float_bytes=size_float,
        size_quantized_bytes=serialized_size(ir_model),
    )
    if guard is not None and static is not None:
        report.latency_guard = guard.as_dict()
        report.timings_s["latency_guard"] = guard.seconds
        if guard.all_float:  # the input (or preprocessed) float model is written: nothing in it is int8
            report.quantized_op_types, report.activations_absorbed = {}, 0
            report.float_op_types = dict(sorted(Counter(n.op_type for n in ir_model.graph).items()))
            report.preprocess_notes = with_run_time_note(report.preprocess_notes, 0)
        elif guard.reverted or guard.silu_islands:
            counts = static.counts()
            report.quantized_op_types, report.float_op_types = counts.quantized, counts.floating
            report.activations_absorbed = counts.absorbed
            report.preprocess_notes = with_run_time_note(report.preprocess_notes, counts.run_time)
    report.timings_s["total"] = time.perf_counter() - start
    return QuantizationResult(
        ir_model, report, float_source=float_source, calibration=feeds, input_path=input_path, static=static
    )


#: The preprocessed float model may replace the input as the all-float answer only while its weights
#: stay within this factor of the input file's size (plus :data:`_GROWTH_SLACK` bytes).
_GROWTH_LIMIT = 1.1
_GROWTH_SLACK = 64 * 1024


def _may_replace_input(state: StaticState, input_bytes: int, upcast: int) -> bool:
    """Whether the latency guard may answer with the preprocessed float model instead of the input.

    Not when preprocessing made it larger: a half-precision input computed in float32 (twice its
    size), or constant folding that stored what the input computes from a few numbers (onnx_asr's
    resampler: its 76 k-element sinc kernel, 0.01 → 0.31 MB, for a speed-up within the timings' noise).
    """
    grown = initializer_bytes(state.reference_model) > _GROWTH_LIMIT * input_bytes + _GROWTH_SLACK
    return not upcast and not grown


def for_providers(config: QuantConfig, providers: Sequence[str]) -> QuantConfig:
    """``config`` as it applies to a model that runs on ``providers``.

    Run-time ranges write ``com.microsoft.DynamicQuantizeMatMul``, which ONNX Runtime runs on its CPU
    provider only: for another provider (CUDA) the calibrated Q/DQ form keeps the products on the
    device, so run-time ranges are turned off there.
    """
    if config.run_time_ranges and any(p != "CPUExecutionProvider" for p in providers):
        return config.replace(run_time_ranges=False)
    return config


def _guard_latency(
    state: StaticState,
    model: ir.Model,
    config: QuantConfig,
    float_source: bytes | Path,
    *,
    preprocessed_may_win: bool,
) -> tuple[ir.Model, GuardOutcome]:
    """Run the latency guard against the user's model (``float_source``).

    The anchors it keeps float stay float in later variants (``--target``). ``preprocessed_may_win``:
    see :func:`guard_latency`.
    """
    feed = next(iter(state.feeds))
    outcome = guard_latency(
        state,
        model,
        dict(feed),
        config.latency_guard,
        input_model=float_source,
        preprocessed_may_win=preprocessed_may_win,
    )
    state.residual_sums = outcome.residual_sums > 0
    state.silu_islands = outcome.silu_islands > 0
    if outcome.all_float:  # every anchor and every dynamic LSTM
        everything = sorted({*state.quantized_nodes, *outcome.reverted.get(DYNAMIC_LSTM, ())})
        state.config = state.config.replace(exclude_nodes=(*state.config.exclude_nodes, *everything))
        state.quantized_nodes = ()
    elif outcome.kept_float:
        kept = set(outcome.kept_float)
        state.config = state.config.replace(exclude_nodes=(*state.config.exclude_nodes, *sorted(kept)))
        state.quantized_nodes = tuple(n for n in state.quantized_nodes if n not in kept)
    lstms = len(outcome.reverted.get(DYNAMIC_LSTM, ()))
    if lstms:  # kept float LSTMs are not DynamicQuantizeLSTM any more
        state.dynamic_ops = {**state.dynamic_ops, "LSTM": state.dynamic_ops.get("LSTM", 0) - lstms}
        state.dynamic_ops = {op: n for op, n in state.dynamic_ops.items() if n > 0}
    return outcome.model, outcome


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
    after = _node_names(model)
    config.check_names(
        node_names=before[0] | after[0],
        model_op_types=before[1] | after[1],
        known_op_types=kernel_table().op_types(),
    )


def _settings(config: QuantConfig, mode: Mode) -> dict[str, Any]:
    """The configuration that shaped the model, as JSON-friendly data (recorded in the output file)."""
    settings: dict[str, Any] = {"mode": mode, "format": config.format}
    if mode == "requantize":
        return settings
    settings["weights"] = dataclasses.asdict(config.weights)
    if mode == "static":
        settings["activations"] = dataclasses.asdict(config.activations)
        if config.equalize:
            settings["equalize"] = True
        settings["smooth"] = config.smooth
        if config.equalize_depthwise_inputs:
            settings["equalize_depthwise_inputs"] = True
        if config.bias_correction:
            settings["bias_correction"] = True
        if not config.input_bias_correction:
            settings["input_bias_correction"] = False
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


def _describe_scheme(config: QuantConfig, summary: ModeSummary) -> dict[str, str]:
    mode = summary.mode
    scheme: dict[str, str] = {"mode": mode, "format": config.format}
    if mode == "static":
        symmetric = "symmetric" if config.activations.symmetric else "affine"
        scheme["activations"] = f"{config.activations.dtype} {symmetric}"
        scheme["calibration"] = config.calibration.method
        calibrated = summary.calibration.method if summary.calibration is not None else "minmax"
        if config.calibration.method == "minmax" and calibrated != "minmax":
            # the range rescue replaced min-max's ranges (onnxq.pipeline.range_rescue)
            scheme["calibration"] = f"{calibrated} (range rescue)"
    elif mode == "dynamic":
        scheme["activations"] = "uint8 at run time"
    if mode != "requantize":
        scheme["weights"] = config.weights.dtype + (
            " per-channel" if config.weights.per_channel else " per-tensor"
        )
    return scheme
