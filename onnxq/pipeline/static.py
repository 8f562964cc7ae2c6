"""Static quantization of a float model: plan → calibrate → insert Q/DQ.

Planning decides, before any data is run, which nodes are quantized and which tensors need a range;
calibration observes only those; insertion rewrites the graph with the calibrated ranges. When
calibration finds tensors that shape inference could not type and that turn out not to be float32,
the nodes touching them are kept float and the plan is made again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import onnx_ir as ir

from onnxq.calibrate.collect import collect_ranges
from onnxq.config import QuantConfig
from onnxq.data import DataSource, Feeds, input_specs, load_feeds
from onnxq.declines import Decline
from onnxq.errors import OnnxqError
from onnxq.pipeline.state import StaticState
from onnxq.pipeline.summary import CalibrationSummary, ModeSummary
from onnxq.plan.op_rules import ANCHOR_OPS
from onnxq.plan.planner import plan_quantization
from onnxq.rewrite.insert_qdq import InsertQDQPass, group_params

__all__ = ["nothing_to_quantize", "quantize_static"]


def nothing_to_quantize(model: ir.Model, label: str, declines: Sequence[Decline]) -> OnnxqError:
    """The error for a model in which no node can be quantized, with the first reasons why."""
    ops = sorted({n.op_type for n in model.graph})
    why = f"; {'; '.join(str(d) for d in declines[:2])}" if declines else ""
    return OnnxqError(
        f"nothing to quantize in {label}: no eligible Conv/ConvTranspose/Gemm/MatMul "
        f"(op types present: {', '.join(ops) or 'none'}){why}"
    )


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
    plan = plan_quantization(model, config)
    if plan.empty:
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
    runtime_declines: list[Decline] = []
    runtime_excluded: set[str] = set()
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
            Decline("calibrate", "not_float", "a tensor it reads or writes is not float32", name)
            for name in touching
        ]
        runtime_excluded.update(touching)
        config = config.replace(exclude_nodes=(*config.exclude_nodes, *touching))
        plan = plan_quantization(model, config)
        if plan.empty:
            raise OnnxqError(f"nothing to quantize in {label}: every candidate touches non-float tensors")
    calibrate_seconds = time.perf_counter() - start
    # The exclusions made above are the calibration's, not the user's configuration's.
    declines = [
        *runtime_declines,
        *(d for d in plan.declined if not (d.code == "excluded" and d.node in runtime_excluded)),
    ]

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
    summary = ModeSummary(
        mode="static",
        quantized_op_types=dict(plan.quantized_op_types()),
        float_op_types=dict(plan.float_op_types),
        declines=tuple(declines),
        activations_absorbed=len(plan.absorbed_nodes),
        subgraph_nodes=plan.subgraph_nodes,
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
