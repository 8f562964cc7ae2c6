"""SiLU in integer form (QLinearSigmoid + QLinearMul, or their QDQ pattern) as a float QuickGelu island.

The island computes ``Q(DQ(x) · sigmoid(DQ(x)))`` with the product's output parameters: checked
against numpy exactly, and through a quantized Conv → SiLU → Conv model against the float model.
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.config import LatencyGuardConfig, QuantConfig
from onnxq.pipeline.state import StaticState
from onnxq.rewrite.silu_island import integer_silus, write_silu_islands

#: A squeeze-and-excitation gate: x · Sigmoid(other), not a SiLU.
GATE_NET = """
gate_net (float[1, 3, 16, 16] x) => (float[1, 8, 16, 16] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
    c2 = Conv <kernel_shape = [1, 1]> (x, w3)
    s = Sigmoid (c2)
    a = Mul (c1, s)
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a, w2)
}
"""


def _gate_model() -> onnx.ModelProto:
    arrays = builders.normal_arrays(0, w1=(8, 3, 3, 3), w2=(8, 8, 3, 3), w3=(8, 3, 1, 1))
    return builders.parse(GATE_NET, {k: v * 0.3 for k, v in arrays.items()})


def _quantize(proto: onnx.ModelProto, fmt: str) -> ir.Model:
    config = QuantConfig(format=fmt, latency_guard=LatencyGuardConfig(enabled=False))  # type: ignore[arg-type]
    result = onnxq.quantize(proto, builders.random_feeds(proto, 8, seed=1), config, show_progress=False)
    return result.model


def _run(model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(builders.serialize(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


def _sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - actual) ** 2)))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_integer_silus_become_quickgelu_islands(fmt: str) -> None:
    proto = builders.silu_convs()
    quantized = _quantize(proto, fmt)
    sigmoid = "Sigmoid" if fmt == "qdq" else "QLinearSigmoid"
    assert [n.op_type for n in quantized.graph].count(sigmoid) == 2
    assert len(integer_silus(quantized)) == 2  # both operand orders of the Mul
    islands = quantized.clone()
    assert write_silu_islands(islands) == 2
    onnx.checker.check_model(ir.to_proto(islands))
    ops = [n.op_type for n in islands.graph]
    assert ops.count("QuickGelu") == 2 and sigmoid not in ops
    assert "Mul" not in ops and "QLinearMul" not in ops
    assert ir.to_proto(islands).graph.output[0].name == "y"
    for seed in (2, 3):
        feed = builders.random_feeds(proto, 1, seed=seed)[0]
        reference, before, after = _run(proto, feed), _run(quantized, feed), _run(islands, feed)
        # one rounding fewer (the sigmoid's): as accurate as the integer form, within noise
        assert _sqnr(reference, after) > 25.0
        assert _sqnr(reference, after) > _sqnr(reference, before) - 1.0
        step = float(np.max(np.abs(reference))) / 100
        assert np.max(np.abs(after - before)) < 4 * step  # a few output steps, not another function


def test_the_island_computes_the_quantized_silu_exactly() -> None:
    text = """
    island (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
        xq = QuantizeLinear (x, xs, xz)
        xd = DequantizeLinear (xq, xs, xz)
        s = Sigmoid (xd)
        sq = QuantizeLinear (s, ss, sz)
        sd = DequantizeLinear (sq, ss, sz)
        m = Mul (xd, sd)
        mq = QuantizeLinear (m, ys, yz)
        y = DequantizeLinear (mq, ys, yz)
    }
    """
    arrays = {
        "xs": np.float32(0.05),
        "xz": np.uint8(128),
        "ss": np.float32(1 / 255),
        "sz": np.uint8(0),
        "ys": np.float32(0.03),
        "yz": np.uint8(12),
    }
    proto = builders.parse(text, arrays)
    model = ir.from_proto(proto)
    assert write_silu_islands(model) == 1
    x = np.random.default_rng(4).normal(0, 2, (1, 4, 8, 8)).astype(np.float32)
    xd = (np.clip(np.round(x / 0.05) + 128, 0, 255) - 128) * np.float32(0.05)
    silu = xd / (1 + np.exp(-xd.astype(np.float64)))
    expected = (np.clip(np.round(silu / 0.03) + 12, 0, 255) - 12) * 0.03
    np.testing.assert_allclose(_run(model, {"x": x}), expected, atol=1e-6)


def test_a_gate_is_not_a_silu() -> None:
    """x · Sigmoid(other) (a squeeze-and-excitation gate) keeps its integer ops."""
    quantized = _quantize(_gate_model(), "qdq")
    assert not integer_silus(quantized)
    assert write_silu_islands(quantized) == 0 and "QuickGelu" not in [n.op_type for n in quantized.graph]


def test_the_plan_counts_the_silus_the_written_model_has() -> None:
    """planned_silus (the report's count, before writing) agrees with what the rewrite finds after."""
    from onnxq.rewrite.silu_island import planned_silus

    for proto, expected in ((builders.silu_convs(), 2), (_gate_model(), 0)):
        state = result_static(proto)
        planned = planned_silus(state.plan().quantized_nodes)
        assert planned == expected == len(integer_silus(state.requantize()))
    # the first Conv kept float leaves the first SiLU's input float: that SiLU is neither planned nor written
    state = result_static(builders.silu_convs())
    kept = state.quantized_nodes[:1]
    assert planned_silus(state.plan(kept).quantized_nodes) == len(integer_silus(state.requantize(kept))) == 1


def result_static(proto: onnx.ModelProto) -> StaticState:
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=False))
    result = onnxq.quantize(proto, builders.random_feeds(proto, 8, seed=1), config, show_progress=False)
    assert result.static is not None
    return result.static
