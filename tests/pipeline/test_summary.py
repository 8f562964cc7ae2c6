"""build_report: every report field comes from the stages' typed summaries, in a fixed order."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import builders

import onnxq
from onnxq.declines import Decline
from onnxq.pipeline.summary import CalibrationSummary, LoweringSummary, ModeSummary, build_report
from onnxq.preprocess import PreprocessSummary
from onnxq.report import QuantReport

FOLD = Decline("fold", "not_constant", "scale is not a constant", "bn_1", "BatchNormalization")
PLAN_A = Decline("plan", "excluded", "excluded by the user", "conv_2", "Conv")
PLAN_B = Decline("plan", "no_kernel", "no integer kernel", "", "Softmax")
LOWER = Decline("lower", "weight_not_constant", "weight is not a constant", "matmul_3", "MatMul")

CALIBRATION = CalibrationSummary(
    method="percentile",
    samples=32,
    runs=8,
    seconds=0.25,
    tensors=5,
    random=False,
    fingerprint="sha256:" + "ab" * 32,
)


def preprocessed(**changes: Any) -> PreprocessSummary:
    summary = PreprocessSummary(
        nodes_before=12,
        nodes_after=10,
        batchnorms_folded=2,
        notes=["shape inference failed; tensors of unknown type are treated as float"],
        declines=[FOLD],
        seconds=0.5,
    )
    return dataclasses.replace(summary, **changes)


def mode(**changes: Any) -> ModeSummary:
    summary = ModeSummary(
        mode="static",
        quantized_op_types={"MatMul": 1, "Conv": 3, "Add": 2},
        float_op_types={"Softmax": 1, "Gather": 2},
        declines=(PLAN_A, PLAN_B),
        notes=("2 Relu absorbed",),
        activations_absorbed=2,
        subgraph_nodes=4,
        calibration=CALIBRATION,
        timings_s={"calibrate": 1.5, "insert_qdq": 0.125},
    )
    return dataclasses.replace(summary, **changes)


def report(
    *,
    pre: PreprocessSummary | None = None,
    summary: ModeSummary | None = None,
    lowering: LoweringSummary | None = None,
    version_notes: list[str] | None = None,
) -> QuantReport:
    return build_report(
        label="net.onnx",
        source_producer="pytorch 2.13.0",
        version_notes=["opset 11 converted to 13"] if version_notes is None else version_notes,
        preprocessed=pre or preprocessed(),
        mode=summary or mode(),
        lowering=lowering,
        scheme={"activations": "uint8 affine per-tensor", "weights": "int8 symmetric per-channel"},
        settings={"method": "percentile", "percentile": 99.99},
        size_float_bytes=4000,
        size_quantized_bytes=1100,
    )


def test_every_field_comes_from_the_summaries() -> None:
    rep = report()
    assert rep.model == "net.onnx"
    assert rep.output is None
    assert rep.mode == "static" and not rep.requantized
    assert rep.scheme == {"activations": "uint8 affine per-tensor", "weights": "int8 symmetric per-channel"}
    assert rep.settings == {"method": "percentile", "percentile": 99.99}
    assert rep.source_producer == "pytorch 2.13.0"
    assert rep.version_notes == ["opset 11 converted to 13"]
    assert rep.preprocess_notes == [
        "shape inference failed; tensors of unknown type are treated as float",
        "2 Relu absorbed",
    ]
    assert rep.batchnorms_folded == 2
    assert (rep.nodes_before, rep.nodes_after) == (12, 10)
    assert rep.quantized_op_types == {"Add": 2, "Conv": 3, "MatMul": 1}
    assert rep.nodes_quantized == 6
    assert rep.activations_absorbed == 2
    assert rep.float_op_types == {"Gather": 2, "Softmax": 1}
    assert rep.subgraph_nodes == 4
    assert rep.declines == [FOLD, PLAN_A, PLAN_B]
    assert rep.lowered_op_types == {}
    assert (rep.size_float_bytes, rep.size_quantized_bytes) == (4000, 1100)
    assert rep.timings_s == {"preprocess": 0.5, "calibrate": 1.5, "insert_qdq": 0.125}
    # fields that later steps fill stay empty
    assert rep.accuracy == [] and rep.latency == [] and rep.layers == [] and rep.budget == {}
    assert rep.validated_with == ""


def test_op_type_counts_are_sorted_by_name() -> None:
    rep = report()
    assert list(rep.quantized_op_types) == ["Add", "Conv", "MatMul"]
    assert list(rep.float_op_types) == ["Gather", "Softmax"]


def test_calibration_becomes_a_dict() -> None:
    rep = report()
    assert rep.calibration == {
        "method": "percentile",
        "samples": 32,
        "runs": 8,
        "seconds": 0.25,
        "tensors": 5,
        "random": False,
        "fingerprint": "sha256:" + "ab" * 32,
    }
    assert CALIBRATION.as_dict() == rep.calibration
    assert set(CALIBRATION.as_dict()) == {f.name for f in dataclasses.fields(CalibrationSummary)}


def test_no_calibration_gives_an_empty_dict() -> None:
    rep = report(summary=mode(mode="dynamic", calibration=None))
    assert rep.calibration == {}
    assert rep.mode == "dynamic"


def test_mode_nodes_after_overrides_preprocessing() -> None:
    assert report(summary=mode(nodes_after=None)).nodes_after == 10
    assert report(summary=mode(mode="requantize", nodes_after=7)).nodes_after == 7
    assert report(summary=mode(nodes_after=0)).nodes_after == 0  # zero is a count, not "unset"
    assert report(summary=mode(mode="requantize", nodes_after=7)).requantized


def test_lowering_section() -> None:
    lowering = LoweringSummary(
        lowered_op_types={"QLinearMatMul": 1, "QLinearConv": 3}, declines=(LOWER,), seconds=0.75
    )
    rep = report(lowering=lowering)
    assert rep.lowered_op_types == {"QLinearConv": 3, "QLinearMatMul": 1}
    assert list(rep.lowered_op_types) == ["QLinearConv", "QLinearMatMul"]
    # declines of every stage, in pipeline order: preprocessing, the mode, lowering
    assert rep.declines == [FOLD, PLAN_A, PLAN_B, LOWER]
    assert list(rep.timings_s) == ["preprocess", "calibrate", "insert_qdq", "lower"]
    assert rep.timings_s["lower"] == 0.75


def test_without_lowering_there_is_no_lower_timing() -> None:
    rep = report(lowering=None)
    assert "lower" not in rep.timings_s
    assert LOWER not in rep.declines


def test_empty_summaries() -> None:
    rep = build_report(
        label="m",
        source_producer="",
        version_notes=[],
        preprocessed=PreprocessSummary(),
        mode=ModeSummary(mode="static", quantized_op_types={}),
        lowering=LoweringSummary({}, (), 0.0),
        scheme={},
        settings={},
        size_float_bytes=0,
        size_quantized_bytes=0,
    )
    assert rep.declines == [] and rep.preprocess_notes == [] and rep.version_notes == []
    assert rep.quantized_op_types == {} and rep.float_op_types == {} and rep.lowered_op_types == {}
    assert rep.timings_s == {"preprocess": 0.0, "lower": 0.0}
    assert rep.calibration == {}


def test_the_report_does_not_share_lists_with_the_summaries() -> None:
    notes = ["opset 11 converted to 13"]
    pre = preprocessed()
    summary = mode()
    rep = report(pre=pre, summary=summary, version_notes=notes)
    rep.version_notes.append("changed")
    rep.declines.append(LOWER)
    rep.preprocess_notes.append("changed")
    rep.quantized_op_types["Gemm"] = 9
    assert notes == ["opset 11 converted to 13"]
    assert pre.declines == [FOLD]
    assert pre.notes == ["shape inference failed; tensors of unknown type are treated as float"]
    assert summary.quantized_op_types == {"MatMul": 1, "Conv": 3, "Add": 2}
    assert summary.timings_s == {"calibrate": 1.5, "insert_qdq": 0.125}
    # a second report from the same summaries is unaffected
    assert report(pre=pre, summary=summary).declines == [FOLD, PLAN_A, PLAN_B]


def test_declines_reach_the_table_and_json() -> None:
    lowering = LoweringSummary({"QLinearMatMul": 1}, (LOWER,), 0.1)
    rep = report(lowering=lowering)
    table = rep.format_table()
    for decline in (FOLD, PLAN_A, PLAN_B, LOWER):
        assert str(decline) in table
    data = json.loads(json.dumps(rep.to_dict()))
    assert [d["stage"] for d in data["declines"]] == ["fold", "plan", "plan", "lower"]
    assert data["calibration"]["fingerprint"] == CALIBRATION.fingerprint
    assert data["nodes_quantized"] == 6


def test_a_real_quantization_fills_the_report_from_its_summaries() -> None:
    calibration = [{"x": sample} for sample in builders.conv_calibration(4)]
    rep = onnxq.quantize(builders.conv_relu_model(), calibration).report
    assert rep.mode == "static"
    assert rep.quantized_op_types == {"Conv": 1}
    assert rep.nodes_before == 2
    assert set(rep.calibration) == {f.name for f in dataclasses.fields(CalibrationSummary)}
    assert rep.calibration["samples"] == 4 and rep.calibration["runs"] == 4
    assert rep.calibration["method"] == "minmax" and rep.calibration["random"] is False
    assert next(iter(rep.timings_s)) == "preprocess"
    assert rep.lowered_op_types == {}
    assert rep.size_float_bytes > 0 and rep.size_quantized_bytes > 0  # a tiny model: Q/DQ add bytes
