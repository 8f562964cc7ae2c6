"""SlowKernelsPass: LRN, PRelu, Softplus, Mish, the exponential linear units and Softmax over a
non-last axis, written in vectorized primitives, compute the same function.

Each expansion runs in ONNX Runtime at ORT_DISABLE_ALL against a float64 reference of the op's
definition. For LRN: the window arithmetic at the channel edges, even window sizes (the spec's
floor/ceil split, which ONNX Runtime's own kernel refuses), windows wider than the channel count, every
exponent form and the ranks an LRN meets; a wrong padding split, a missing ``/ size`` or a wrong
exponent moves the result by far more than the 1e-5 relative bound. For PRelu both forms (slopes in
[0, 1], and outside), for Softplus/Mish/Elu/Selu/Celu inputs out to ±100 (overflow) and down to −30
(cancellation); Softmax and LogSoftmax over a middle axis at both forms of the reduce ops' axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.preprocess import infer_shapes, preprocess
from onnxq.preprocess.slow_kernels import SlowKernelsPass
from onnxq.validate.metrics import sqnr_db


def _lrn_model(
    shape: tuple[int, ...], *, size: float, alpha: float, beta: float, bias: float, opset: int = 17
) -> onnx.ModelProto:
    dims = ", ".join(str(d) for d in shape)
    text = (
        f"g (float[{dims}] x) => (float[{dims}] y) {{\n"
        f"  y = LRN <size = {int(size)}, alpha = {alpha!r}, beta = {beta!r}, bias = {bias!r}> (x)\n}}"
    )
    proto: onnx.ModelProto = builders.parse(text, {}, opset=opset)
    return proto


def _expand(proto: onnx.ModelProto) -> tuple[ir.Model, SlowKernelsPass]:
    model = ir.from_proto(proto)
    infer_shapes(model)
    expand = SlowKernelsPass()
    expand(model)
    return model, expand


def _spec_lrn(x: np.ndarray, *, size: float, alpha: float, beta: float, bias: float) -> np.ndarray:
    """LRN as the ONNX spec writes it, in float64 (ONNX Runtime's kernel refuses even sizes)."""
    x64 = x.astype(np.float64)
    channels = x.shape[1]
    square_sum = np.zeros_like(x64)
    size = int(size)
    for c in range(channels):
        low = max(0, c - (size - 1) // 2)
        high = min(channels - 1, c + int(np.ceil((size - 1) / 2)))
        square_sum[:, c] = np.sum(x64[:, low : high + 1] ** 2, axis=1)
    return x64 / (bias + alpha / size * square_sum) ** beta


def _relative_error(want: np.ndarray, got: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@dataclass(frozen=True)
class _Case:
    shape: tuple[int, ...]
    size: int
    alpha: float
    beta: float
    bias: float

    @property
    def attributes(self) -> dict[str, float]:
        return {"size": self.size, "alpha": self.alpha, "beta": self.beta, "bias": self.bias}


CASES = {
    "alexnet": _Case((2, 16, 9, 7), 5, 1e-4, 0.75, 1.0),
    "large-alpha": _Case((1, 12, 5, 5), 5, 2.0, 0.75, 1.0),
    "even-size": _Case((1, 10, 4, 6), 4, 0.5, 0.75, 2.0),
    "window-wider-than-channels": _Case((1, 3, 4, 4), 7, 0.3, 0.75, 1.0),
    "size-1": _Case((1, 6, 3, 3), 1, 0.7, 0.75, 1.0),
    "sqrt-exponent": _Case((1, 8, 5, 5), 3, 0.4, 0.5, 1.5),
    "no-exponent": _Case((1, 8, 5, 5), 3, 0.4, 1.0, 1.5),
    "pow-exponent": _Case((1, 8, 5, 5), 3, 0.4, 0.6, 0.5),
    "rank-3": _Case((2, 9, 11), 5, 0.2, 0.75, 1.0),
    "rank-2": _Case((4, 9), 3, 0.2, 0.75, 1.0),
}


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("case", list(CASES))
def test_expansion_computes_lrn(case: str, opset: int) -> None:
    params = CASES[case]
    shape = params.shape
    proto = _lrn_model(shape, opset=opset, **params.attributes)
    model, expand = _expand(proto)
    assert expand.rewritten == {"LRN → Mul/AveragePool/Sqrt/Div": 1} and expand.declined == []
    op_types = {node.op_type for node in model.graph}
    assert "LRN" not in op_types and {"AveragePool", "Div"} <= op_types
    rng = np.random.default_rng(0)
    for scale in (1.0, 30.0):  # the bias dominates / the window sum dominates
        feed = (rng.standard_normal(shape) * scale).astype(np.float32)
        want = _spec_lrn(feed, **params.attributes)
        [got] = builders.run_disabled(model, {"x": feed})
        assert _relative_error(want, got) < 1e-5
        if params.size % 2 and len(shape) == 4:  # what ONNX Runtime's own LRN runs
            [kernel] = builders.run_disabled(proto, {"x": feed})
            assert _relative_error(want, kernel) < 1e-4  # (its powf loop is the less exact one)


def test_expansion_keeps_the_output_name_and_shape() -> None:
    model, _ = _expand(_lrn_model((1, 8, 4, 4), size=5, alpha=1e-4, beta=0.75, bias=1.0))
    [output] = model.graph.outputs
    assert output.name == "y" and output.producer() is not None and output.producer().op_type == "Div"
    assert list(output.shape or []) == [1, 8, 4, 4]


def test_unknown_rank_is_declined_and_the_lrn_kept() -> None:
    text = """g (float[2, 8, 4, 4] x, int64[?] s) => (float y) {
      r = Reshape (x, s)
      y = LRN <size = 3> (r)
    }"""
    proto = builders.parse(text, {}, opset=17)
    model, expand = _expand(proto)
    assert expand.rewritten == {}
    assert [node.op_type for node in model.graph] == ["Reshape", "LRN"]
    assert [decline.code for decline in expand.declined] == ["rank_unknown"]


def test_rank_above_four_is_declined() -> None:
    """ONNX Runtime pools over at most 3 spatial axes; the channel axis makes a fourth."""
    model, expand = _expand(_lrn_model((1, 6, 3, 4, 5), size=3, alpha=0.2, beta=0.75, bias=1.0))
    assert expand.rewritten == {} and [d.code for d in expand.declined] == ["rank"]
    assert [node.op_type for node in model.graph] == ["LRN"]


def _cnn_with_lrn(seed: int = 0) -> onnx.ModelProto:
    """Conv → Relu → LRN → MaxPool → Conv, AlexNet's first block in small."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32),
    }
    text = """g (float[1, 3, 32, 32] x) => (float[1, 8, 13, 13] y) {
      c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      r = Relu (c)
      n = LRN <size = 5, alpha = 0.02, beta = 0.75, bias = 1.0> (r)
      p = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (n)
      y = Conv (p, w2)
    }"""
    proto: onnx.ModelProto = builders.parse(text, arrays, opset=13)
    return proto


def test_preprocess_reports_the_expansion() -> None:
    model = ir.from_proto(_cnn_with_lrn())
    summary = preprocess(model)
    assert summary.canonicalized == {"LRN → Mul/AveragePool/Sqrt/Div": 1}
    assert not any(node.op_type == "LRN" for node in model.graph)


def test_quantized_model_with_an_lrn_stays_accurate_and_keeps_the_expansion_float() -> None:
    proto = _cnn_with_lrn()
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]
    held_out = [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    result = onnxq.quantize(proto, calibration)
    quantized = result.model
    op_types = [node.op_type for node in quantized.graph]
    assert "LRN" not in op_types
    # The squares and window sums are never quantized: no QuantizeLinear reads them.
    producers = {out.name: node for node in quantized.graph for out in node.outputs}
    for node in quantized.graph:
        if node.op_type == "QuantizeLinear":
            source = producers.get(node.inputs[0].name)
            assert source is None or source.op_type not in ("Mul", "AveragePool", "Squeeze", "Sqrt", "Add")
    want = np.concatenate([builders.run_disabled(proto, feed)[0].ravel() for feed in held_out])
    got = np.concatenate([builders.run_disabled(quantized, feed)[0].ravel() for feed in held_out])
    assert sqnr_db(want, got) > 25.0


# ---------------------------------------------------------------------------------------------------
# PRelu, Softplus, Mish


def _activation_feed(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(3)
    data = (rng.standard_normal(shape) * 6).astype(np.float32)
    edges = np.array([0.0, -0.0, 1e-6, -1e-6, -30.0, -100.0, 100.0, 20.0, 25.0, -5.0], np.float32)
    data.reshape(-1)[: edges.size] = edges
    return data


def _check(
    text: str, arrays: dict[str, np.ndarray], want: np.ndarray, feed: np.ndarray, rewritten: str
) -> None:
    proto = builders.parse(text, arrays, opset=18)
    model, expand = _expand(proto)
    assert expand.rewritten == {rewritten: 1} and expand.declined == []
    [got] = builders.run_disabled(model, {"x": feed})
    assert got.shape == want.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    [kernel] = builders.run_disabled(proto, {"x": feed})  # ONNX Runtime's own op agrees with the reference
    np.testing.assert_allclose(kernel, want, rtol=2e-6, atol=2e-6)


IO4 = "(float[2, 6, 5, 5] x) => (float[2, 6, 5, 5] y)"


@pytest.mark.parametrize(
    ("slopes", "rewritten"),
    [
        (np.array([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), "PRelu → Mul/Max"),
        (np.array([0.0, -0.3, 0.25, 1.7, 0.9, 1.0]), "PRelu → Relu/Min/Mul/Add"),
    ],
)
def test_prelu_forms(slopes: np.ndarray, rewritten: str) -> None:
    slope = slopes.astype(np.float32).reshape(6, 1, 1)
    feed = _activation_feed((2, 6, 5, 5))
    want = np.where(feed >= 0, feed, slope * feed)
    _check(f"g {IO4} {{\n y = PRelu (x, slope)\n}}", {"slope": slope}, want, feed, rewritten)


def test_softplus() -> None:
    feed = _activation_feed((2, 6, 5, 5))
    want = np.logaddexp(0.0, feed.astype(np.float64))
    _check(f"g {IO4} {{\n y = Softplus (x)\n}}", {}, want, feed, "Softplus → Relu/Exp/Log/Add")


def _mish(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 * np.tanh(np.logaddexp(0.0, x64))


def test_native_mish() -> None:
    feed = _activation_feed((2, 6, 5, 5))
    _check(f"g {IO4} {{\n y = Mish (x)\n}}", {}, _mish(feed), feed, "Mish → Exp/Mul/Div")


@pytest.mark.parametrize("order", ["x-first", "x-second"])
def test_decomposed_mish_becomes_the_mish_form(order: str) -> None:
    product = "y = Mul (x, t)" if order == "x-first" else "y = Mul (t, x)"
    text = f"g {IO4} {{\n s = Softplus (x)\n t = Tanh (s)\n {product}\n}}"
    feed = _activation_feed((2, 6, 5, 5))
    _check(text, {}, _mish(feed), feed, "x·Tanh(Softplus(x)) → Mish form")


def test_softplus_read_elsewhere_is_not_taken_for_mish() -> None:
    text = """g (float[2, 6, 5, 5] x) => (float[2, 6, 5, 5] y, float[2, 6, 5, 5] s) {
      s = Softplus (x)
      t = Tanh (s)
      y = Mul (x, t)
    }"""
    model, expand = _expand(builders.parse(text, {}, opset=18))
    assert expand.rewritten == {"Softplus → Relu/Exp/Log/Add": 1}
    assert [n.op_type for n in model.graph].count("Tanh") == 1


# ---------------------------------------------------------------------------------------------------
# Elu, Selu, Celu


def _exp_linear(x: np.ndarray, scale: float, alpha: float, inner: float) -> np.ndarray:
    """``scale · (x if x > 0 else alpha · (exp(inner · x) − 1))`` in float64 (the specs' definitions)."""
    x64 = x.astype(np.float64)
    return scale * np.where(x64 > 0, x64, alpha * np.expm1(inner * np.minimum(x64, 0.0)))


@pytest.mark.parametrize(
    ("node", "scale", "alpha", "inner"),
    [
        ("Elu", 1.0, 1.0, 1.0),
        ("Elu <alpha = 0.5>", 1.0, 0.5, 1.0),
        ("Selu", 1.0507009873554805, 1.6732632423543772, 1.0),
        ("Selu <alpha = 1.5, gamma = 2.0>", 2.0, 1.5, 1.0),
        ("Celu <alpha = 2.0>", 1.0, 2.0, 0.5),
    ],
)
def test_exponential_linear_units(node: str, scale: float, alpha: float, inner: float) -> None:
    feed = _activation_feed((2, 6, 5, 5))
    want = _exp_linear(feed, scale, alpha, inner)
    op = node.split()[0]
    _check(f"g {IO4} {{\n y = {node} (x)\n}}", {}, want, feed, f"{op} → Relu/Min/Exp/Add")


# ---------------------------------------------------------------------------------------------------
# Softmax / LogSoftmax over an axis that is not the last


def _softmax(x: np.ndarray, axis: int, log: bool) -> np.ndarray:
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=axis, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted - log_sum if log else np.exp(shifted - log_sum)


@pytest.mark.parametrize("opset", [13, 18])  # ReduceMax's axes: an attribute, then an input
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [1, -3, 2])
def test_softmax_over_a_middle_axis(opset: int, op: str, axis: int) -> None:
    feed = _activation_feed((2, 6, 5, 4))
    text = f"g (float[2, 6, 5, 4] x) => (float[2, 6, 5, 4] y) {{\n y = {op} <axis = {axis}> (x)\n}}"
    proto = builders.parse(text, {}, opset=opset)
    model, expand = _expand(proto)
    assert expand.rewritten == {f"{op} over axis {axis % 4} → ReduceMax/Exp/ReduceSum": 1}
    assert op not in builders.op_counts(model)
    [got] = builders.run_disabled(model, {"x": feed})
    want = _softmax(feed, axis, op == "LogSoftmax")
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    [kernel] = builders.run_disabled(proto, {"x": feed})
    np.testing.assert_allclose(kernel, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    ("shape", "axis", "opset"),
    [((2, 6, 5, 4), -1, 17), ((2, 6, 5, 4), 3, 17), ((2, 6, 1, 1), 1, 17), ((2, 6, 5, 4), 1, 11)],
    ids=["last", "last-by-index", "trailing-ones", "opset-11-coerces-to-2d"],
)
def test_softmax_already_over_the_last_axis_is_left_alone(
    shape: tuple[int, ...], axis: int, opset: int
) -> None:
    dims = ", ".join(map(str, shape))
    text = f"g (float[{dims}] x) => (float[{dims}] y) {{\n y = Softmax <axis = {axis}> (x)\n}}"
    model, expand = _expand(builders.parse(text, {}, opset=opset))
    assert expand.rewritten == {} and expand.declined == []
    assert builders.op_counts(model) == {"Softmax": 1}


def test_softmax_of_unknown_rank_is_declined() -> None:
    text = """g (float[2, 8, 4, 4] x, int64[?] s) => (float y) {
      r = Reshape (x, s)
      y = Softmax <axis = 1> (r)
    }"""
    model, expand = _expand(builders.parse(text, {}, opset=17))
    assert [decline.code for decline in expand.declined] == ["rank_unknown"]
    assert [node.op_type for node in model.graph] == ["Reshape", "Softmax"]


# ---------------------------------------------------------------------------------------------------
# Pow by 2, 0.5, -0.5, -1


@pytest.mark.parametrize(
    ("exponent", "form"),
    [
        ("float 2.0", "Pow(2) → Mul"),
        ("int64 2", "Pow(2) → Mul"),
        ("float[1] {0.5}", "Pow(0.5) → Sqrt"),
        ("float -0.5", "Pow(-0.5) → Reciprocal/Sqrt"),
        ("float -1.0", "Pow(-1) → Reciprocal"),
    ],
)
def test_pow_by_a_cheap_exponent(exponent: str, form: str) -> None:
    dtype, _, literal = exponent.partition(" ")
    value = float(literal.strip("{}"))
    text = f"g {IO4} {{\n e = Constant <value = {dtype} {{{literal.strip('{}')}}}> ()\n y = Pow (x, e)\n}}"
    feed = _activation_feed((2, 6, 5, 5))
    if value in (0.5, -0.5):
        feed = np.abs(feed) + np.float32(1e-3)  # roots of positive numbers
    feed[feed == 0] = 1.0  # (1/0 is inf both ways; the reference's division would warn)
    want = np.power(feed.astype(np.float64), value)
    _check(text, {}, want, feed, form)


@pytest.mark.parametrize("value", ["3.0", "1.5", "-2.0"])
def test_pow_by_another_exponent_is_left_alone(value: str) -> None:
    text = f"g {IO4} {{\n e = Constant <value = float {{{value}}}> ()\n y = Pow (x, e)\n}}"
    model, expand = _expand(builders.parse(text, {}, opset=18))
    assert expand.rewritten == {} and builders.op_counts(model)["Pow"] == 1


def test_pow_of_a_scalar_by_a_one_element_exponent_keeps_its_shape() -> None:
    """Pow(scalar, [0.5]) has shape [1]: Sqrt(scalar) would not, so it is left alone."""
    text = "g (float x) => (float[1] y) {\n e = Constant <value = float[1] {0.5}> ()\n y = Pow (x, e)\n}"
    model, expand = _expand(builders.parse(text, {}, opset=18))
    assert expand.rewritten == {} and builders.op_counts(model)["Pow"] == 1
