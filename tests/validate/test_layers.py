"""The per-layer numeric suite, checked against numpy computations of the same figures."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import onnxq
from onnxq.config import CalibrationConfig, LatencyGuardConfig, QuantConfig
from onnxq.errors import OnnxqError
from onnxq.qmath import QuantParams, dequantize, quantize
from onnxq.runtime.session import make_session, run
from onnxq.validate.layers import LayerReport, LayerStats, format_layers, inspect_layers, layers_to_dict
from onnxq.validate.metrics import sqnr_db

TWO_CONV = """
two_conv (float[N,3,8,8] x) => (float[N,4,8,8] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (c1)
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


def two_conv_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0.0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0.0, 0.1, (4,)).astype(np.float32),
        "w2": rng.normal(0.0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        "b2": rng.normal(0.0, 0.1, (4,)).astype(np.float32),
    }


def two_conv_model(arrays: dict[str, np.ndarray] | None = None, body: str = TWO_CONV) -> onnx.ModelProto:
    """x → Conv → Relu (``r``) → Conv → ``y``; nodes unnamed (onnxq names them Conv, Relu, Conv_1)."""
    return builders.parse(body, arrays if arrays is not None else two_conv_arrays())


def calibration() -> list[dict[str, np.ndarray]]:
    return [{"x": a} for a in builders.conv_calibration(8)]


def evaluation() -> list[dict[str, np.ndarray]]:
    """Wider than the calibration data, so that some activations are clipped."""
    return [{"x": a * 1.5} for a in builders.conv_calibration(6, seed=11)]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def with_output(model: onnx.ModelProto, name: str) -> bytes:
    """The model with tensor ``name`` as an extra graph output, serialized."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy.SerializeToString()


def run_all(model: bytes, feeds: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    session = make_session(model, opt_level="disable")
    return np.concatenate([run(session, feed, [name])[0] for feed in feeds])


@pytest.fixture(scope="module")
def float_model() -> onnx.ModelProto:
    return two_conv_model()


@pytest.fixture(scope="module")
def quantized(float_model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.to_proto(onnxq.quantize(float_model, calibration()).model)


@pytest.fixture(scope="module")
def report(quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> LayerReport:
    return inspect_layers(quantized, float_model, evaluation())


def row(report: Sequence[LayerStats], tensor: str) -> LayerStats:
    matches = [r for r in report if r.tensor == tensor]
    assert len(matches) == 1, [r.tensor for r in report]
    return matches[0]


def value(metric: float | None) -> float:
    assert metric is not None
    return metric


# --- figures against numpy -------------------------------------------------------------------------


def test_every_quantized_tensor_has_a_row(report: LayerReport) -> None:
    kinds = {(r.tensor, r.kind) for r in report}
    assert kinds == {
        ("x", "activation"),
        ("r", "activation"),
        ("y", "activation"),
        ("w1", "weight"),
        ("b1", "weight"),
        ("w2", "weight"),
        ("b2", "weight"),
    }
    assert report.notes == []
    # The quantized graph output is renamed on the producer side; the row names the float tensor.
    assert row(report, "y").quantized_tensor == "y_float"
    assert row(report, "r").node == "Conv_1"
    assert row(report, "w2").node == "Conv_1"


def test_activation_figures_match_numpy(
    report: LayerReport, quantized: onnx.ModelProto, float_model: onnx.ModelProto
) -> None:
    feeds = evaluation()
    reference = run_all(with_output(float_model, "r"), feeds, "r").astype(np.float64)
    # The tensor as the quantized model computes it (upstream error included), then Q/DQ in numpy.
    before_q = run_all(with_output(quantized, "r"), feeds, "r")
    scale = initializer(quantized, "r_scale")
    zero_point = initializer(quantized, "r_zero_point")
    params = QuantParams(scale, zero_point, "uint8", None)
    qdq = dequantize(quantize(before_q, params), params)

    r = row(report, "r")
    assert r.activation_sqnr_db == pytest.approx(sqnr_db(reference, qdq), rel=1e-6)
    lo = (0 - float(zero_point)) * float(scale)
    hi = (255 - float(zero_point)) * float(scale)
    half = float(scale) / 2
    clipped = np.mean((reference < lo - half) | (reference > hi + half))
    assert clipped > 0  # the evaluation data is wider than the calibration data
    assert r.clipped == pytest.approx(clipped, rel=1e-12)
    assert r.range == pytest.approx((lo, hi))
    assert r.observed_min == pytest.approx(reference.min())
    assert r.observed_max == pytest.approx(reference.max())
    assert r.scale == pytest.approx(float(scale)) and r.zero_point == int(zero_point)
    assert r.axis is None and r.dtype == "uint8" and r.samples == len(feeds)


def test_input_activation_compares_the_feed(report: LayerReport, quantized: onnx.ModelProto) -> None:
    feeds = evaluation()
    x = np.concatenate([f["x"] for f in feeds])
    params = QuantParams(
        initializer(quantized, "x_scale"), initializer(quantized, "x_zero_point"), "uint8", None
    )
    expected = sqnr_db(x, dequantize(quantize(x, params), params))
    assert row(report, "x").activation_sqnr_db == pytest.approx(expected, rel=1e-6)


def test_weight_figures_match_numpy(report: LayerReport, quantized: onnx.ModelProto) -> None:
    arrays = two_conv_arrays()
    scale = initializer(quantized, "w2_scale")
    zero_point = np.zeros(scale.shape, np.int8)
    dequantized = dequantize(
        initializer(quantized, "w2_quantized"), QuantParams(scale, zero_point, "int8", 0)
    )
    w2 = row(report, "w2")
    assert w2.weight_sqnr_db == pytest.approx(sqnr_db(arrays["w2"], dequantized), rel=1e-9)
    assert w2.activation_sqnr_db is None and w2.clipped is None and w2.observed_min is None
    assert w2.axis == 0 and w2.dtype == "int8" and w2.zero_point == 0
    assert w2.scale == pytest.approx(float(scale.max())) and w2.scale_min == pytest.approx(float(scale.min()))
    widest = int(np.argmax(scale))
    assert w2.range == pytest.approx((-128 * float(scale[widest]), 127 * float(scale[widest])))
    assert row(report, "b2").dtype == "int32"


def test_rows_are_sorted_worst_first(report: LayerReport) -> None:
    metrics = [value(r.sqnr_db) for r in report]
    assert metrics == sorted(metrics)


def test_outlier_channel_layer_comes_first() -> None:
    arrays = two_conv_arrays()
    arrays["w1"][0] *= 100.0  # channel 0 of r becomes 100x larger and sets r's (per-tensor) scale ...
    arrays["w2"][:, 0] /= 100.0  # ... while y stays as it was: the other channels of r carry it
    float_model = two_conv_model(arrays)
    # Without outlier smoothing, which would even r's channels out through the first Conv.
    config = QuantConfig(smooth=False, calibration=CalibrationConfig(range_rescue=False))
    stats = inspect_layers(
        onnxq.quantize(float_model, calibration(), config).model, float_model, calibration()
    )
    clean = inspect_layers(
        onnxq.quantize(two_conv_model(), calibration(), config).model, two_conv_model(), calibration()
    )
    # r's own SQNR is dominated by the outlier channel; the damage shows where r is read.
    assert stats[0].tensor == "y" and stats[0].kind == "activation"
    assert value(row(clean, "y").activation_sqnr_db) - value(stats[0].activation_sqnr_db) > 20
    assert row(stats, "r").scale > 50 * row(clean, "r").scale
    assert row(stats, "r").clipped == 0.0


def test_outlier_activation_comes_first(quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    feeds = calibration()
    feeds[3] = {"x": feeds[3]["x"].copy()}
    feeds[3]["x"][0, 1, 2, 2] = 1000.0
    stats = inspect_layers(quantized, float_model, feeds)
    assert stats[0].tensor == "x" and stats[0].kind == "activation"
    assert stats[0].clipped == pytest.approx(1 / (len(feeds) * 3 * 8 * 8))
    assert stats[0].observed_max == pytest.approx(1000.0)


# --- other models ----------------------------------------------------------------------------------


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def test_onnxruntime_quantized_model(tmp_path: Path, float_model: onnx.ModelProto) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    float_path = builders.save(float_model, tmp_path / "float.onnx")
    quant_path = tmp_path / "ort.onnx"
    quantize_static(
        str(float_path),
        str(quant_path),
        Reader(calibration()),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    stats = inspect_layers(quant_path, float_path, calibration())
    assert stats.notes == []
    by_kind = {(r.tensor, r.kind) for r in stats}
    assert {("x", "activation"), ("y", "activation"), ("w1", "weight"), ("w2", "weight")} <= by_kind
    for r in stats:
        assert r.sqnr_db is not None and r.sqnr_db > 20, (r.tensor, r.sqnr_db)
    # onnxruntime's weight: numpy dequantization of its integers against the float weight.
    quant = onnx.load(quant_path)
    scale = initializer(quant, "w1_scale")
    dequantized = dequantize(
        initializer(quant, "w1_quantized"), QuantParams(scale, np.zeros(scale.shape, np.int8), "int8", 0)
    )
    expected = sqnr_db(two_conv_arrays()["w1"], dequantized)
    assert row(stats, "w1").weight_sqnr_db == pytest.approx(expected, rel=1e-9)


def test_unmatched_tensor_is_skipped_with_a_note(quantized: onnx.ModelProto) -> None:
    renamed = two_conv_model(
        body=TWO_CONV.replace("r = Relu (c1)", "r2 = Relu (c1)").replace("(r, w2", "(r2, w2")
    )
    stats = inspect_layers(quantized, renamed, calibration())
    assert "r" not in {r.tensor for r in stats}
    assert {"x", "y", "w2"} <= {r.tensor for r in stats}
    assert len(stats.notes) == 1 and "'r'" in stats.notes[0]
    assert "'r'" in format_layers(stats)


def test_weight_without_float_counterpart_has_no_sqnr(quantized: onnx.ModelProto) -> None:
    arrays = two_conv_arrays()
    arrays["w1_other"] = arrays.pop("w1")
    other = two_conv_model(arrays, body=TWO_CONV.replace("(x, w1, b1)", "(x, w1_other, b1)"))
    other.graph.node[0].name = "first_conv"
    # No node of the float model is called Conv (as the reader of w1 is), and no initializer w1.
    stats = inspect_layers(quantized, other, calibration())
    assert row(stats, "w1").weight_sqnr_db is None
    assert stats[-1].tensor == "w1"  # rows without a metric come last
    assert any("w1_quantized" in note for note in stats.notes)


def test_batchnorm_folded_weight_is_found() -> None:
    rng = np.random.default_rng(3)
    body = """
    conv_bn (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    arrays = {
        "w": rng.normal(0.0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.2, 3.0, (4,)).astype(np.float32),
        "beta": rng.normal(0.0, 0.1, (4,)).astype(np.float32),
        "mean": rng.normal(0.0, 0.1, (4,)).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, (4,)).astype(np.float32),
    }
    float_model = builders.parse(body, arrays)
    result = onnxq.quantize(float_model, calibration())
    assert result.report.batchnorms_folded == 1
    stats = inspect_layers(result.model, float_model, calibration())
    weights = [r for r in stats if r.kind == "weight" and r.dtype == "int8"]
    assert len(weights) == 1 and weights[0].weight_sqnr_db is not None
    assert weights[0].weight_sqnr_db > 35  # the folded weight, not the one before folding
    assert value(row(stats, "y").activation_sqnr_db) > 25


def test_model_without_qdq_gives_no_rows(float_model: onnx.ModelProto) -> None:
    stats = inspect_layers(float_model, float_model, calibration())
    assert list(stats) == [] and stats.notes == []
    assert "no quantized tensors" in format_layers(stats)


def test_empty_data_raises(quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    with pytest.raises(OnnxqError, match="no input data"):
        inspect_layers(quantized, float_model, [])


def test_generator_feeds_and_ir_models(quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    import onnx_ir as ir

    qmodel, fmodel = ir.from_proto(quantized), ir.from_proto(float_model)
    outputs_before = [v.name for v in qmodel.graph.outputs]
    stats = inspect_layers(qmodel, fmodel, (feed for feed in calibration()))
    assert len(stats) == 7
    assert [v.name for v in qmodel.graph.outputs] == outputs_before  # the caller's model is unchanged


# --- presentation ----------------------------------------------------------------------------------


def test_format_layers_limits_rows(report: LayerReport) -> None:
    text = format_layers(report, limit=2)
    assert report[0].tensor in text and report[1].tensor in text
    assert "5 more rows not shown" in text
    full = format_layers(report, limit=None)
    assert all(r.tensor in full for r in report)
    assert text.splitlines()[1].split("│")[1].strip() == "tensor"


def test_layers_to_dict_is_json(report: LayerReport) -> None:
    data = layers_to_dict(report)
    assert json.loads(json.dumps(data)) == data
    assert data[0]["tensor"] == report[0].tensor
    assert isinstance(data[0]["range"], list) and len(data[0]["range"]) == 2
    inf_row = layers_to_dict([dataclasses.replace(report[0], activation_sqnr_db=math.inf)])
    assert inf_row[0]["activation_sqnr_db"] == "inf"


def _dequantized_weight(model: object, name: str) -> np.ndarray:
    """The weight ``name`` as the quantized model's DequantizeLinear gives it (per-channel, axis 1)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(builders.serialize(model))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = next(
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}_quantized"
    )
    data, scale = arrays[node.input[0]].astype(np.float64), arrays[node.input[1]].astype(np.float64)
    zero = arrays[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * data.ndim
    shape[axis] = -1
    return (data - np.reshape(zero, shape)) * np.reshape(scale, shape)


def test_tensors_outlier_smoothing_rescaled_are_compared_after_the_rescale(tmp_path: Path) -> None:
    """Smoothing divides the outlier tensor by ``s`` per channel and multiplies its reader's weight rows by
    ``s``: compared as they are, the reader's weight would read far below its rounding. The row reports
    the SQNR after the best per-channel factor (what int8 per-channel rounding gives), flagged."""
    proto = builders.outlier_chain_model((3,))
    config = QuantConfig(run_time_ranges=False, latency_guard=LatencyGuardConfig(enabled=False))
    result = onnxq.quantize(proto, builders.chain_feeds(64, seed=1), config)
    assert any("outlier smoothing" in note for note in result.report.preprocess_notes)
    assert result.report.smoothed_tensors == ["r0", "r1", "r2", "r3", "r4"]
    saved = result.save(tmp_path / "q.onnx")  # the saved model names them in its metadata
    report = inspect_layers(saved, proto, builders.chain_feeds(4, seed=2))
    rows = {row.tensor: row for row in report}
    reader = rows["w3"]  # reads the smoothed tensor r2: its rows were multiplied by s
    assert reader.rescaled and reader.weight_sqnr_db is not None and reader.weight_sqnr_db > 35.0
    float_w3 = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w3"))
    plain = sqnr_db(float_w3, _dequantized_weight(result.model, "w3"))
    assert plain < reader.weight_sqnr_db - 6.0  # the rescale the comparison took out
    assert not rows["x"].rescaled  # the input, which smoothing leaves alone, is compared as it is
    smoothed = {row.tensor for row in report if row.rescaled}
    assert {"w2", "w3", "r2"} <= smoothed  # r2's producer (columns / s), reader (rows * s), r2 itself
    assert all(row.sqnr_db is not None and row.sqnr_db > 30.0 for row in report)
    assert "compared after a per-channel rescale" in format_layers(report)
    unmarked = inspect_layers(saved, proto, builders.chain_feeds(4, seed=2), smoothed=())  # as they are
    assert not any(row.rescaled for row in unmarked)
    assert {row.tensor: row.sqnr_db for row in unmarked}["w3"] < rows["w3"].sqnr_db - 6.0
