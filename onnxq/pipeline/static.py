"""Static quantization of a float model: plan → calibrate → insert Q/DQ.

Planning decides, before any data is run, which nodes are quantized and which tensors need a range;
calibration observes only those; insertion rewrites the graph with the calibrated ranges. When
calibration finds tensors that shape inference could not type and that turn out not to be float32,
the nodes touching them are kept float and the plan is made again.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import onnx_ir as ir

from onnxq.calibrate.bias_correction import correct_biases
from onnxq.calibrate.collect import CalibrationResult, collect_ranges
from onnxq.calibrate.input_rounding import InputRounding
from onnxq.config import ActivationScheme, QuantConfig
from onnxq.data import DataSource, Feeds, input_specs, load_feeds, random_data_hint
from onnxq.declines import Decline
from onnxq.errors import OnnxqError
from onnxq.graph import DEFAULT_DOMAINS
from onnxq.pipeline.range_choice import PER_TENSOR, choose_range_method
from onnxq.pipeline.range_rescue import RESCUE_NOTE, rescue_ranges
from onnxq.pipeline.state import StaticState, count_op_types, planning_config, write_qdq
from onnxq.pipeline.summary import CalibrationSummary, ModeSummary
from onnxq.plan.op_rules import ANCHOR_OPS
from onnxq.plan.planner import plan_quantization
from onnxq.plan.saturating_readers import narrowed_range
from onnxq.preprocess.smooth import smooth_outliers
from onnxq.rewrite.dynamic_quant import StaticLeftoversPass
from onnxq.tuning.latency_guard import LOG_FRONT_END, anchor_kinds
from onnxq.tuning.lossy_lstms import lossy_lstms

__all__ = ["NCHWC_DOMAIN", "explained_on_random_data", "nothing_to_quantize", "quantize_static"]

logger = logging.getLogger(__name__)

#: The domain of onnxruntime's blocked-layout CPU ops (ReorderInput, Conv, MaxPool, ...), which only a
#: model saved after its ORT_ENABLE_ALL optimization holds.
NCHWC_DOMAIN = "com.microsoft.nchwc"


#: Integer ops that quantization tools write (ONNX Runtime's dynamic and QOperator forms): a model
#: that holds them was quantized already, without Q/DQ to normalize.
INTEGER_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QGemm",
        "QAttention",
        "QLinearAdd",
        "QLinearMul",
    }
)


def nothing_to_quantize(model: ir.Model, label: str, declines: Sequence[Decline]) -> OnnxqError:
    """The error for a model in which no node can be quantized, with the first reasons why."""
    ops = sorted(
        {n.op_type if n.domain in DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}" for n in model.graph}
    )
    integer = sorted(INTEGER_OPS.intersection(n.op_type for n in model.graph.all_nodes()))
    if integer:
        return OnnxqError(
            f"nothing to quantize in {label}: it is quantized already ({', '.join(integer)}: onnxruntime's "
            "dynamic or QOperator form); quantize its float original instead"
        )
    blocked = collections.Counter(n.op_type for n in model.graph.all_nodes() if n.domain == NCHWC_DOMAIN)
    if blocked:
        held = ", ".join(f"{count} {op}" for op, count in sorted(blocked.items()))
        return OnnxqError(
            f"nothing to quantize in {label}: it holds onnxruntime's NCHWc layout ops ({NCHWC_DOMAIN}: "
            f"{held}), so it was saved after ORT_ENABLE_ALL optimization and is tied to the CPU that "
            "saved it; quantize the model as exported, or one saved at ORT_ENABLE_EXTENDED or lower"
        )
    why = f"; {'; '.join(str(d) for d in declines[:2])}" if declines else ""
    hint = "; --mode dynamic quantizes its LSTMs" if "LSTM" in ops else ""
    return OnnxqError(
        f"nothing to quantize in {label}: no eligible Conv/ConvTranspose/Gemm/MatMul "
        f"(op types present: {', '.join(ops) or 'none'}){why}{hint}"
    )


@contextlib.contextmanager
def explained_on_random_data(feeds: Feeds) -> Iterator[None]:
    """Make an ONNX Runtime failure on ``--calib random`` feeds say that real inputs are needed.

    The float model fails on them itself (a length of 16 where it needs 64, say), not onnxq's rewrite.
    """
    try:
        yield
    except OnnxqError as exc:
        if not feeds.is_random or not str(exc).startswith("onnxruntime:"):
            raise
        raise OnnxqError(f"{exc}; {random_data_hint()}") from exc


def _dynamic_rules_apply(model: ir.Model, config: QuantConfig) -> bool:
    """Whether the dynamic rules of static mode (LSTMs, embedding tables) rewrite a node of ``model``.

    A model whose only quantizable nodes are LSTMs (a tf2onnx or torch sequence encoder) has an empty
    static plan and is still worth quantizing: its LSTMs run as DynamicQuantizeLSTM.
    """
    trial = model.clone()
    leftovers = StaticLeftoversPass(config)
    leftovers(trial)
    return sum(leftovers.quantized.values()) > 0


def run_time_note(products: int) -> str:
    """The report's line for the products that quantize their input at run time."""
    return f"run-time ranges: {products} MatMul/Gemm quantize their input on each run"


def with_run_time_note(notes: Sequence[str], products: int) -> list[str]:
    """``notes`` with their run-time ranges line counting ``products`` (none: the line goes).

    The line is added when ``notes`` had none: a ``--target`` fix may turn run-time ranges on.
    """
    line = run_time_note(products) if products else None
    had_line = any(note.startswith("run-time ranges:") for note in notes)
    replaced = [line if note.startswith("run-time ranges:") else note for note in notes]
    if line is not None and not had_line:
        replaced.append(line)
    return [note for note in replaced if note is not None]


def _calibrated_alternative(
    model: ir.Model, config: QuantConfig, schemes: dict[ir.Value, ActivationScheme]
) -> list[ir.Value]:
    """The tensors the plan without run-time ranges observes beyond ``schemes`` (added to it).

    With :attr:`QuantConfig.run_time_ranges` the MatMul/Gemm inputs need no calibrated range, but
    they are observed in the same calibration runs (a few more outputs): a tensor holding an infinity
    or a sentinel there keeps its readers float: a run-time range over it would round every real
    value to zero.
    """
    alternative = plan_quantization(model, config.replace(run_time_ranges=False))
    extra = [v for v in alternative.observed_values() if v not in schemes]
    schemes.update({v: alternative.group_of[v].scheme for v in extra})
    return extra


def _touching(nodes: Sequence[ir.Node], names: set[str]) -> list[ir.Node]:
    """The nodes that read or write a tensor named in ``names``."""
    return [n for n in nodes if any(v is not None and v.name in names for v in (*n.inputs, *n.outputs))]


def quantize_static(
    model: ir.Model,
    calibration_data: DataSource | None,
    config: QuantConfig,
    *,
    label: str,
    providers: Sequence[str],
    show_progress: bool | None,
    random_samples: int,
) -> tuple[StaticState, ModeSummary]:
    """Plan, calibrate and insert Q/DQ in ``model``; returns the state for variants and the summary."""
    plan_config, run_time = planning_config(model, config)
    plan = plan_quantization(model, plan_config)
    if plan.empty and not run_time and not _dynamic_rules_apply(model, config):
        raise nothing_to_quantize(model, label, plan.declined)
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
    notes: list[str] = []
    smoothed: tuple[str, ...] = ()
    if config.smooth or config.equalize_depthwise_inputs:
        with explained_on_random_data(feeds):
            smoothing = smooth_outliers(
                model,
                feeds,
                providers,
                products=config.smooth,
                depthwise_inputs=config.equalize_depthwise_inputs,
            )
        if smoothing.candidates:  # (on by default: no note for the models it has nothing to do on)
            notes.append(smoothing.describe())
        smoothed = tuple(smoothing.smoothed)
        if smoothing.divided_in_front:  # Muls were added in front of products: plan the new graph
            plan = plan_quantization(model, planning_config(model, config)[0])  # (not for new weights)
    runtime_declines: list[Decline] = []
    runtime_excluded: set[str] = set()
    first: CalibrationResult | None = None
    known: dict[tuple[str, ActivationScheme], tuple[float, float]] = {}  # ranges of earlier rounds
    # (Method auto keeps every method's ranges for a round's tensors: it calibrates them all each round.)
    auto = config.calibration.method == "auto"
    while True:
        observed = plan.observed_values()
        schemes = {v: plan.group_of[v].scheme for v in observed}
        if run_time:  # the products' inputs too, in the same runs: a sentinel there keeps them float
            observed += _calibrated_alternative(model, config, schemes)
        # After a re-plan only tensors no earlier round observed are calibrated: the model is the same,
        # so a tensor's range under the same scheme is too.
        missing = [v for v in observed if auto or (v.name or "", schemes[v]) not in known]
        with explained_on_random_data(feeds):
            calibration = collect_ranges(
                model,
                missing,
                schemes,
                feeds,
                config.calibration,
                providers=providers,
                show_progress=show_progress,
            )
        known.update({(v.name or "", schemes[v]): r for v, r in calibration.ranges.items()})
        if first is None:
            first = calibration
        else:  # what this round found wrong is its own; the data and the totals are the first round's
            calibration = dataclasses.replace(
                calibration,
                samples=first.samples,
                fingerprint=first.fingerprint,
                runs=first.runs + calibration.runs,
                seconds=time.perf_counter() - start,
            )
        keys = {v: (v.name or "", schemes[v]) for v in observed}
        calibration = dataclasses.replace(
            calibration, ranges={v: known[k] for v, k in keys.items() if k in known}
        )
        if not (calibration.non_float or calibration.unobserved or calibration.non_finite):
            break
        # Shape inference could not type these tensors and they turned out not to be float32 at run
        # time; or they never held a finite value (a branch the data never takes, an always-empty
        # tensor), so there is no range to quantize them with; or they held an infinity or a
        # sentinel of float32's size (Log(0), a -inf or float-min attention mask), which no int8 grid
        # holds: keep every node that touches them float and plan again.
        touching: list[str] = []
        # The run-time products read these tensors too: a sentinel there keeps them float as well.
        readers = [*plan.quantized_nodes, *(n for n in model.graph if n.name in run_time)]
        for names, code, message in (
            (calibration.non_float, "not_float", "tensor {} is not float32"),
            (
                calibration.unobserved,
                "never_observed",
                "tensor {} never held a finite value in calibration (e.g. an If branch the data never takes)",
            ),
            (
                calibration.non_finite,
                "non_finite_range",
                (
                    "tensor {} held an infinity or a value beyond ±1e8 in calibration (e.g. Log(0), "
                    "an attention mask of -1e9 or float32's minimum): no int8 range quantizes it"
                ),
            ),
        ):
            for tensor in sorted(names):
                nodes = set(_touching(readers, {tensor}))
                # An absorbed activation's output is its producer's quantized output.
                nodes.update(
                    n.inputs[0].producer()  # type: ignore[misc]
                    for n in _touching(plan.absorbed_nodes, {tensor})
                    if n.inputs[0] is not None and n.inputs[0].producer() is not None
                )
                found = sorted({n.name or "" for n in nodes} - set(touching))
                text = message.format(repr(tensor))
                runtime_declines += [Decline("calibrate", code, text, name) for name in found]
                touching += found
        if not touching:
            break  # nothing left to keep float for them
        runtime_excluded.update(touching)
        config = config.replace(exclude_nodes=(*config.exclude_nodes, *touching))
        plan_config, run_time = planning_config(model, config)
        plan = plan_quantization(model, plan_config)
        if plan.empty and not run_time:
            raise OnnxqError(f"nothing to quantize in {label}: every candidate touches non-float tensors")
    narrow = config.calibration.narrow_to_readers
    if config.calibration.method == "auto":
        rewriter = StaticState(model, config, feeds, {}, tuple(providers), quantized_nodes=())
        choice = choose_range_method(model, calibration, feeds, rewriter.qdq_with_ranges, providers)
        calibration = dataclasses.replace(calibration, ranges=choice.ranges, method=choice.method)
        if choice.method != PER_TENSOR:  # a per-tensor mix stays "auto": no one method made its ranges
            chosen = dataclasses.replace(config.calibration, method=choice.method)  # type: ignore[arg-type]
            config = config.replace(calibration=chosen)
        notes.append(choice.describe())
    elif config.calibration.method == "minmax" and config.calibration.range_rescue and not feeds.is_random:
        if narrow is None:  # narrowing by default: the check below decides
            config = config.replace(
                calibration=dataclasses.replace(config.calibration, narrow_to_readers=True)
            )
        # Judged with a log-spectrum front end float, as the latency guard ships it wherever that costs
        # no time (onnxq.pipeline.range_rescue).
        anchors = [n.name or "" for n in plan.quantized_nodes if n.op_type in ANCHOR_OPS]
        front_end = anchor_kinds(model, anchors).get(LOG_FRONT_END, [])
        judged = config.replace(exclude_nodes=(*config.exclude_nodes, *front_end)) if front_end else config
        rewriter = StaticState(model, judged, feeds, {}, tuple(providers), quantized_nodes=())
        narrowable = _narrowable(calibration.ranges) if config.calibration.narrow_to_readers else 0
        whole = dataclasses.replace(
            rewriter,
            config=judged.replace(
                calibration=dataclasses.replace(judged.calibration, narrow_to_readers=False)
            ),
        )
        corrected = (
            None
            if config.bias_correction
            else _bias_corrected(rewriter, [a for a in anchors if a not in front_end])
        )
        try:
            rescue = rescue_ranges(
                model,
                calibration,
                observed,
                schemes,
                feeds,
                config,
                rewriter.qdq_with_ranges,
                providers,
                whole=whole.qdq_with_ranges if narrowable else None,
                corrected=corrected,
                show_progress=show_progress,
            )
        except Exception as exc:  # an optional improvement: a failure in it must not fail the model
            logger.warning("%s skipped: %s", RESCUE_NOTE, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            notes.append(f"{RESCUE_NOTE} skipped: {type(exc).__name__}: {exc}".splitlines()[0])
            rescue = None
        if rescue is not None and rescue.choice is not None:
            notes.append(rescue.describe())
        narrowing = rescue.narrowing_note(narrowable) if rescue is not None else None
        if narrowing:
            notes.append(narrowing)
        if (rescue is not None and not rescue.narrowed) or (rescue is None and narrow is None):
            config = config.replace(
                calibration=dataclasses.replace(config.calibration, narrow_to_readers=False)
            )
        if rescue is not None and rescue.bias_corrected:
            config = config.replace(bias_correction=True)
        if rescue is not None and rescue.rescued:
            assert rescue.choice is not None
            method = "auto" if rescue.choice.method == PER_TENSOR else rescue.choice.method
            calibration = dataclasses.replace(
                calibration, ranges={**calibration.ranges, **rescue.choice.ranges}, method=method
            )
            config = config.replace(calibration=dataclasses.replace(config.calibration, method=method))  # type: ignore[arg-type]
    if config.calibration.narrow_to_readers is None:  # no check ran: the whole ranges
        config = config.replace(calibration=dataclasses.replace(config.calibration, narrow_to_readers=False))
    calibrate_seconds = time.perf_counter() - start
    # The exclusions made above are the calibration's, not the user's configuration's; the run-time
    # products are excluded from the plan because they are quantized another way.
    plan_config, run_time = planning_config(model, config)
    not_declined = runtime_excluded | set(run_time)
    declines = [
        *runtime_declines,
        *(d for d in plan.declined if not (d.code == "excluded" and d.node in not_declined)),
    ]

    reference = None
    if config.bias_correction:  # after calibration: the ranges are the uncorrected model's, a step away
        reference = model.clone()  # the input's function: the accuracy reference, the all-float answer
        anchors = [n.name or "" for n in plan.quantized_nodes if n.op_type in ANCHOR_OPS]
        fixed = correct_biases(model, anchors, config.weights, feeds, providers)
        notes.append(f"bias correction: {fixed} of {len(anchors)} quantized layers' biases shifted")
    start = time.perf_counter()
    state = StaticState(
        float_model=model.clone(),
        config=config,
        feeds=feeds,
        ranges={v.name or "": r for v, r in calibration.ranges.items()},
        providers=tuple(providers),
        quantized_nodes=(
            *(n.name or "" for n in plan.quantized_nodes if n.op_type in ANCHOR_OPS),
            *run_time,
        ),
        reference=reference,
        rounding=InputRounding(feeds, tuple(providers)) if config.input_bias_correction else None,
    )
    lossy, lossy_declines = lossy_lstms(state)
    if lossy:  # their DynamicQuantizeLSTM would lose most of the input: they stay float
        config = config.replace(exclude_nodes=(*config.exclude_nodes, *lossy))
        state.config = config
        plan_config, run_time = planning_config(model, config)
        declines += lossy_declines
    written = write_qdq(model, plan, calibration.ranges, plan_config, run_time, state.rounding)
    if written.rounding_corrected:
        notes.append(
            f"input bias correction: {written.rounding_corrected} quantized layers' biases absorb their "
            "input's mean rounding error"
        )
    state.dynamic_ops = dict(written.dynamic)
    quantized_op_types, float_op_types = count_op_types(plan, written.dynamic + written.run_time)
    if written.run_time:
        notes.append(run_time_note(sum(written.run_time.values())))
    declines += [d for d in written.declines if not (d.code == "excluded" and d.node in lossy)]
    summary = ModeSummary(
        mode="static",
        smoothed=smoothed,
        quantized_op_types=quantized_op_types,
        notes=tuple(notes),
        float_op_types=float_op_types,
        declines=tuple(declines),
        activations_absorbed=len(plan.absorbed_nodes),
        subgraph_nodes=plan.subgraph_nodes,
        bodies=dict(plan.bodies),
        calibration=CalibrationSummary(
            method=calibration.method,
            samples=calibration.samples,
            runs=calibration.runs,
            seconds=calibration.seconds,
            tensors=len(observed),
            random=feeds.is_random,
            fingerprint=calibration.fingerprint,
        ),
        timings_s={"calibrate": calibrate_seconds, "rewrite": time.perf_counter() - start},
    )
    return state, summary


def _bias_corrected(
    rewriter: StaticState, anchors: Sequence[str]
) -> Callable[[dict[str, tuple[float, float]]], ir.Model]:
    """The range rescue's bias-correction candidate, a quantizer like ``rewriter.qdq_with_ranges``.

    ``rewriter`` with ``--target``'s ``bias_correction`` fix on ``anchors``
    (:meth:`~onnxq.pipeline.state.StaticState.with_fix`), made on first use: a model the check passes
    never pays for the float run it measures the mean inputs with.
    """
    made: list[StaticState] = []

    def quantize(ranges: dict[str, tuple[float, float]]) -> ir.Model:
        if not made:
            made.append(
                dataclasses.replace(rewriter, quantized_nodes=tuple(anchors)).with_fix("bias_correction")
            )
        return made[0].qdq_with_ranges(ranges)

    return quantize


def _narrowable(ranges: Mapping[ir.Value, tuple[float, float]]) -> int:
    """How many of ``ranges`` their readers' saturation narrows (:mod:`onnxq.plan.saturating_readers`)."""
    return sum(1 for value, (low, high) in ranges.items() if narrowed_range(value, low, high) != (low, high))
