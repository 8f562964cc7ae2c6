"""Bias correction: the mean output error per channel that weight rounding adds is removed."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir

import onnxq
from onnxq.calibrate.bias_correction import bias_targets, correct_biases
from onnxq.config import LatencyGuardConfig, QuantConfig, WeightScheme
from onnxq.data import input_specs, load_feeds

# A depthwise 3x3 Conv (9 weights per channel: little to average the rounding out) on inputs with a
# large mean, then a 1x1 Conv; and a MatMul + bias Add.
DEPTHWISE = """
dw (float[1, 8, 12, 12] x, float[4, 16] t) => (float[1, 8, 12, 12] y, float[4, 8] m) {
    [dw] d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (x, Wd, Bd)
    [relu] r = Relu (d)
    [pw] y = Conv <kernel_shape = [1, 1]> (r, Wp, Bp)
    [mm] p = MatMul (t, Wm)
    [bias] m = Add (p, Bm)
}
"""


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {
        # coarse weights per channel: one large tap sets the step, the small ones round badly
        "Wd": (rng.normal(0, 0.05, (8, 1, 3, 3)) + np.eye(3)[None, None] * 1.0).astype(np.float32),
        "Bd": np.zeros(8, np.float32),
        "Wp": rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32),
        "Bp": np.zeros(8, np.float32),
        "Wm": (rng.normal(0, 0.05, (16, 8)) + np.eye(16, 8) * 2.0).astype(np.float32),
        "Bm": np.zeros(8, np.float32),
    }
    return builders.parse(DEPTHWISE, arrays)


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": (3.0 + rng.normal(0, 0.5, (1, 8, 12, 12))).astype(np.float32),
            "t": (2.0 + rng.normal(0, 0.5, (4, 16))).astype(np.float32),
        }
        for _ in range(count)
    ]


def _channel_bias(proto: onnx.ModelProto, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> float:
    """Mean over outputs and channels of |mean error per channel| (the shift, not the noise)."""
    shifts = []
    for index, axis in ((0, 1), (1, 1)):
        errors = [
            builders.run_disabled(proto, f)[index] - builders.run_disabled(model, f)[index] for f in feeds
        ]
        stacked = np.moveaxis(np.stack(errors), axis + 1, 0).reshape(8, -1)
        shifts.append(np.abs(stacked.mean(axis=1)).mean())
    return float(np.mean(shifts))


def test_targets_are_the_biased_anchors() -> None:
    model = ir.from_proto(_model())
    found = bias_targets(model, ["dw", "pw", "mm", "relu"])
    assert [(t.anchor, t.holder, t.index) for t in found] == [
        ("dw", "dw", 2),
        ("pw", "pw", 2),
        ("mm", "bias", 1),
    ]


def test_the_mean_shift_is_removed() -> None:
    proto = _model()
    calib, held_out = _feeds(16, seed=1), _feeds(8, seed=2)
    shifts = {}
    for correct in (False, True):
        config = QuantConfig(
            bias_correction=correct, latency_guard=LatencyGuardConfig(enabled=False), run_time_ranges=False
        )
        result = onnxq.quantize(proto, calib, config)
        shifts[correct] = _channel_bias(proto, result.model, held_out)
        if correct:
            assert any(note.startswith("bias correction: 3 of 3") for note in result.report.preprocess_notes)
    # Measured: 0.033 -> 0.002 (a sign error doubles it, a skipped layer leaves its share)
    assert shifts[True] <= 0.25 * shifts[False]


def test_it_leaves_the_graph_alone_and_changes_only_biases() -> None:
    model = ir.from_proto(_model())
    before = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}  # type: ignore[union-attr]
    anchors = [n.name or "" for n in model.graph]
    feeds = load_feeds(_feeds(4, seed=1), input_specs(model))
    ops = [n.op_type for n in model.graph]
    fixed = correct_biases(model, anchors, WeightScheme(), feeds, ("CPUExecutionProvider",))
    assert [n.op_type for n in model.graph] == ops
    after = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}  # type: ignore[union-attr]
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed <= {"Bd", "Bp", "Bm"} and fixed == 3


def test_the_reference_stays_the_input_function() -> None:
    """The corrected float model is only what gets quantized: accuracy targets and the latency
    guard's all-float answer use the input's function."""
    proto = _model()
    config = QuantConfig(
        bias_correction=True, latency_guard=LatencyGuardConfig(enabled=False), run_time_ranges=False
    )
    result = onnxq.quantize(proto, _feeds(8, seed=1), config)
    assert result.static is not None
    feed = _feeds(1, seed=3)[0]
    expected = builders.run_disabled(proto, feed)
    for got, want in zip(builders.run_disabled(result.static.reference_model, feed), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shifted = builders.run_disabled(result.static.float_model, feed)
    assert any(not np.allclose(got, want, atol=1e-5) for got, want in zip(shifted, expected, strict=True))


def test_a_layer_kept_float_gets_its_input_bias_back() -> None:
    """A correction cancels the layer's own weight rounding: kept float (an accuracy target, the
    latency guard), the layer computes the input's function again, and the quantized ones keep theirs."""
    proto = _model()
    config = QuantConfig(
        bias_correction=True, latency_guard=LatencyGuardConfig(enabled=False), run_time_ranges=False
    )
    result = onnxq.quantize(proto, _feeds(8, seed=1), config)
    state = result.static
    assert state is not None
    feed = _feeds(1, seed=3)[0]
    expected = builders.run_disabled(proto, feed)
    every_float = state.requantize(keep_float=["dw", "pw", "mm"])
    assert not any(n.op_type == "QuantizeLinear" for n in every_float.graph)
    for got, want in zip(builders.run_disabled(every_float, feed), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def bias(model: ir.Model, holder: str, index: int) -> np.ndarray:
        node = next(n for n in model.graph if n.name == holder)
        return node.inputs[index].const_value.numpy()  # type: ignore[union-attr]

    reference, corrected = state.reference_model, state.float_model
    corrected_dw = bias(corrected, "dw", 2).copy()
    partly = state.requantize(keep_float=["dw", "pw"])  # mm stays quantized, its bias Add float
    np.testing.assert_array_equal(bias(partly, "dw", 2), bias(reference, "dw", 2))
    np.testing.assert_array_equal(bias(partly, "pw", 2), bias(reference, "pw", 2))
    assert not np.array_equal(bias(corrected, "bias", 1), bias(reference, "bias", 1))
    np.testing.assert_array_equal(bias(partly, "bias", 1), bias(corrected, "bias", 1))
    np.testing.assert_array_equal(bias(state.float_model, "dw", 2), corrected_dw)  # the state untouched
