"""Quantization arithmetic (``onnxq.qmath``), checked against hand-computed values and against ONNX
Runtime's own QuantizeLinear/DequantizeLinear kernels (bit-exact)."""

from __future__ import annotations

import builders
import numpy as np
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from onnxq.qmath import (
    BIAS_INT32_LIMIT,
    QuantParams,
    bias_safe_weight_scale,
    compute_qparams,
    dequantize,
    np_dtype,
    qrange,
    quantize,
    quantize_bias,
    quantize_weight,
)

_ONNX_TYPE = {"uint8": "uint8", "int8": "int8"}


def _ort_qdq(x: np.ndarray, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """(QuantizeLinear(x), DequantizeLinear(QuantizeLinear(x))) computed by onnxruntime."""
    dims = ",".join(str(d) for d in x.shape)
    axis = "" if params.axis is None else f" <axis = {params.axis}>"
    body = f"""
    qdq (float[{dims}] x) => ({_ONNX_TYPE[params.dtype]}[{dims}] q, float[{dims}] d) {{
        q = QuantizeLinear{axis} (x, scale, zero_point)
        d = DequantizeLinear{axis} (q, scale, zero_point)
    }}
    """
    arrays = {"scale": np.asarray(params.scale, np.float32), "zero_point": np.asarray(params.zero_point)}
    model = builders.parse(body, arrays)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    q, d = session.run(None, {"x": x})
    return np.asarray(q), np.asarray(d)


def _ort_dequantize_int32(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    axis = "" if scale.ndim == 0 else " <axis = 0>"
    body = f"""
    dq (int32[{q.shape[0]}] q) => (float[{q.shape[0]}] d) {{
        d = DequantizeLinear{axis} (q, scale)
    }}
    """
    model = builders.parse(body, {"scale": scale.astype(np.float32)})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"q": q})[0])


def _data(seed: int, shape: tuple[int, ...], spread: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Ranges and parameters


def test_qrange_and_dtypes() -> None:
    assert qrange("uint8", symmetric=False) == (0, 255)
    assert qrange("int8", symmetric=False) == (-128, 127)
    assert qrange("int8", symmetric=True) == (-127, 127)
    assert np_dtype("uint8") is np.uint8 and np_dtype("int8") is np.int8


def test_asymmetric_uint8() -> None:
    p = compute_qparams(-1.0, 3.0, "uint8", symmetric=False)
    assert p.scale.dtype == np.float32 and p.zero_point.dtype == np.uint8
    assert p.scale.shape == () and p.axis is None
    np.testing.assert_allclose(p.scale, 4.0 / 255.0, rtol=1e-7)
    assert int(p.zero_point) == 64  # round(1 / (4/255)) = round(63.75)
    # The ends of the range map to the ends of the integer range; zero is exact.
    q = quantize(np.array([-1.0, 0.0, 3.0], np.float32), p)
    assert q.tolist() == [0, 64, 255]
    assert dequantize(q, p)[1] == 0.0


def test_symmetric_int8_scalar() -> None:
    p = compute_qparams(-2.0, 1.0, "int8", symmetric=True)
    assert p.zero_point.dtype == np.int8 and int(p.zero_point) == 0
    np.testing.assert_allclose(p.scale, 2.0 / 127.0, rtol=1e-7)
    assert quantize(np.array([-2.0, 2.0, 1.0], np.float32), p).tolist() == [-127, 127, 64]


def test_symmetric_int8_per_axis() -> None:
    rmin = np.array([-1.0, -0.5, 0.0, -4.0])
    rmax = np.array([0.5, 2.0, 0.0, 1.0])
    p = compute_qparams(rmin, rmax, "int8", symmetric=True, axis=0)
    assert p.axis == 0
    assert p.scale.shape == (4,) and p.zero_point.shape == (4,)
    assert p.scale.dtype == np.float32 and p.zero_point.dtype == np.int8
    np.testing.assert_allclose(p.scale, np.array([1.0, 2.0, 1.0 * 127, 4.0]) / 127.0, rtol=1e-7)
    assert not p.zero_point.any()


def test_asymmetric_uint8_per_axis() -> None:
    p = compute_qparams(
        np.array([-1.0, 0.0, -2.0]), np.array([3.0, 5.1, -0.0]), "uint8", symmetric=False, axis=1
    )
    np.testing.assert_allclose(p.scale, [4 / 255, 5.1 / 255, 2 / 255], rtol=1e-6)
    assert p.zero_point.tolist() == [64, 0, 255]
    assert p.axis == 1
    # Zero is exact in every channel.
    zeros = np.zeros((2, 3), np.float32)
    assert not dequantize(quantize(zeros, p), p).any()


@pytest.mark.parametrize(
    ("rmin", "rmax", "zero_point"),
    [(2.0, 5.0, 0), (-5.0, -2.0, 255), (0.25, 0.25, 0)],
    ids=["positive", "negative", "single-value"],
)
def test_range_is_widened_to_include_zero(rmin: float, rmax: float, zero_point: int) -> None:
    p = compute_qparams(rmin, rmax, "uint8", symmetric=False)
    lo, hi = min(rmin, 0.0), max(rmax, 0.0)
    np.testing.assert_allclose(p.scale, (hi - lo) / 255.0, rtol=1e-7)
    assert int(p.zero_point) == zero_point
    values = np.array([0.0, rmin, rmax], np.float32)
    back = dequantize(quantize(values, p), p)
    assert back[0] == 0.0  # zero exactly representable
    np.testing.assert_allclose(back[1:], values[1:], atol=float(p.scale) / 2 + 1e-7)


@pytest.mark.parametrize(("dtype", "symmetric"), [("uint8", False), ("int8", False), ("int8", True)])
def test_zero_range(dtype: str, symmetric: bool) -> None:
    p = compute_qparams(0.0, 0.0, dtype, symmetric)
    assert float(p.scale) == 1.0
    assert np.isfinite(p.scale).all()
    zeros = np.zeros(5, np.float32)
    assert dequantize(quantize(zeros, p), p).tolist() == [0.0] * 5


def test_zero_range_per_axis_channel() -> None:
    p = compute_qparams(np.array([0.0, -1.0]), np.array([0.0, 1.0]), "int8", symmetric=True, axis=0)
    assert p.scale[0] == 1.0
    np.testing.assert_allclose(p.scale[1], 1 / 127, rtol=1e-7)


def test_tiny_range_keeps_a_positive_scale() -> None:
    p = compute_qparams(0.0, 1e-45, "uint8", symmetric=False)
    assert p.scale > 0 and np.isfinite(p.scale)
    q = quantize(np.array([0.0, 1e-45], np.float32), p)
    assert np.isfinite(dequantize(q, p)).all()


# ---------------------------------------------------------------------------------------------------
# Bit-exact against onnxruntime


def _with_edge_values(x: np.ndarray, scale: float) -> np.ndarray:
    """``x`` plus exact half steps and values far outside the range (saturation)."""
    edges = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1000.0, -1000.0], np.float32) * np.float32(scale)
    flat = x.reshape(-1).copy()
    flat[: edges.size] = edges
    return flat.reshape(x.shape)


@pytest.mark.parametrize(
    ("dtype", "symmetric"), [("uint8", False), ("int8", False), ("int8", True)], ids=["u8", "i8", "i8sym"]
)
def test_per_tensor_matches_onnxruntime(dtype: str, symmetric: bool) -> None:
    x = _data(0, (4, 64))
    p = compute_qparams(-2.0, 5.0, dtype, symmetric)
    x = _with_edge_values(x, float(p.scale))
    q_ort, d_ort = _ort_qdq(x, p)
    q = quantize(x, p)
    assert q.dtype == q_ort.dtype
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_array_equal(dequantize(q, p), d_ort)


@pytest.mark.parametrize(
    ("dtype", "symmetric", "axis"), [("int8", True, 0), ("int8", True, 1), ("uint8", False, 1)]
)
def test_per_axis_matches_onnxruntime(dtype: str, symmetric: bool, axis: int) -> None:
    x = _data(1, (6, 5, 3))
    x *= np.linspace(0.1, 4.0, x.shape[axis], dtype=np.float32).reshape(
        [-1 if a == axis else 1 for a in range(3)]
    )
    moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    p = compute_qparams(moved.min(axis=1), moved.max(axis=1), dtype, symmetric, axis=axis)
    q_ort, d_ort = _ort_qdq(x, p)
    q = quantize(x, p)
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_array_equal(dequantize(q, p), d_ort)


def test_awkward_scale_matches_onnxruntime() -> None:
    """Scales that are not powers of two and inputs near every rounding boundary."""
    p = QuantParams(np.array(0.0123, np.float32), np.array(131, np.uint8), "uint8", None)
    steps = np.arange(-140, 140, 0.25, dtype=np.float32)
    x = (steps * p.scale).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    q_ort, d_ort = _ort_qdq(x, p)
    np.testing.assert_array_equal(quantize(x, p), q_ort)
    np.testing.assert_array_equal(dequantize(q_ort, p), d_ort)


# ---------------------------------------------------------------------------------------------------
# Rounding


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([0.5, 1.5, 2.5, 3.5], [0, 2, 2, 4]),
        ([-0.5, -1.5, -2.5, -3.5], [0, -2, -2, -4]),
        ([0.49, 0.51, 2.49, 2.51], [0, 1, 2, 3]),
    ],
)
def test_round_half_to_even(steps: list[float], expected: list[int]) -> None:
    scale = 0.25  # a power of two, so that step * scale / scale is exact
    p = QuantParams(np.array(scale, np.float32), np.array(0, np.int8), "int8", None)
    x = np.array(steps, np.float32) * np.float32(scale)
    assert quantize(x, p).tolist() == expected


def test_round_half_to_even_with_zero_point() -> None:
    p = QuantParams(np.array(1.0, np.float32), np.array(10, np.uint8), "uint8", None)
    assert quantize(np.array([0.5, 1.5, 2.5, -0.5], np.float32), p).tolist() == [10, 12, 12, 10]


def test_saturation() -> None:
    p = QuantParams(np.array(0.1, np.float32), np.array(0, np.int8), "int8", None)
    assert quantize(np.array([100.0, -100.0], np.float32), p).tolist() == [127, -128]
    u = QuantParams(np.array(0.1, np.float32), np.array(0, np.uint8), "uint8", None)
    assert quantize(np.array([100.0, -100.0], np.float32), u).tolist() == [255, 0]


# ---------------------------------------------------------------------------------------------------
# Weights and biases


@pytest.mark.parametrize(
    ("shape", "axis"), [((8, 3, 3, 3), 0), ((3, 8, 2, 2), 1), ((16, 8), 1), ((16, 8), -1)]
)
def test_quantize_weight_per_channel_error_bound(shape: tuple[int, ...], axis: int) -> None:
    w = _data(2, shape, spread=1.0)
    channels = shape[axis]
    magnitudes = np.geomspace(1e-3, 10.0, channels).astype(np.float32)
    w *= magnitudes.reshape([-1 if a == axis % len(shape) else 1 for a in range(len(shape))])
    q, p = quantize_weight(w, "int8", symmetric=True, axis=axis)

    assert q.dtype == np.int8 and q.shape == w.shape
    assert p.axis == axis % len(shape)
    assert p.scale.shape == (channels,)
    assert not p.zero_point.any()
    assert q.min() >= -127 and q.max() <= 127
    error = np.abs(dequantize(q, p) - w)
    per_channel = np.moveaxis(error, p.axis, 0).reshape(channels, -1).max(axis=1)
    assert np.all(per_channel <= p.scale / 2 * (1 + 1e-5))
    # Every channel uses its own range: the largest |w| of each channel lands on ±127.
    peak = np.moveaxis(np.abs(q.astype(np.int32)), p.axis, 0).reshape(channels, -1).max(axis=1)
    assert peak.tolist() == [127] * channels


def test_quantize_weight_per_tensor() -> None:
    w = _data(3, (4, 3, 3, 3), spread=0.5)
    q, p = quantize_weight(w, "int8", symmetric=True, axis=None)
    assert p.axis is None and p.scale.shape == ()
    np.testing.assert_allclose(p.scale, np.abs(w).max() / 127.0, rtol=1e-6)
    assert np.max(np.abs(dequantize(q, p) - w)) <= float(p.scale) / 2 * (1 + 1e-5)


def test_quantize_weight_zero_channel() -> None:
    w = _data(4, (3, 4))
    w[1] = 0.0
    q, p = quantize_weight(w, "int8", symmetric=True, axis=0)
    assert p.scale[1] == 1.0
    assert not q[1].any()
    assert np.isfinite(dequantize(q, p)).all()


def test_quantize_weight_asymmetric_uint8() -> None:
    w = np.abs(_data(5, (4, 6))) + 0.5  # all positive: zero point 0
    q, p = quantize_weight(w, "uint8", symmetric=False, axis=0)
    assert q.dtype == np.uint8 and not p.zero_point.any()
    assert np.all(q.max(axis=1) == 255)


def test_quantize_bias_scale_is_input_times_weight_scale() -> None:
    bias = np.array([0.3, -1.25, 4.0, 0.0], np.float32)
    input_scale = np.array(0.02, np.float32)
    weight_scale = np.array([0.01, 0.002, 0.05, 0.1], np.float32)
    q, scale = quantize_bias(bias, input_scale, weight_scale)
    assert q.dtype == np.int32 and scale.dtype == np.float32
    np.testing.assert_array_equal(scale, input_scale * weight_scale)
    np.testing.assert_array_equal(
        q, np.rint(bias.astype(np.float64) / scale.astype(np.float64)).astype(np.int32)
    )
    assert np.all(np.abs(q * scale - bias) <= scale / 2 * (1 + 1e-6))
    np.testing.assert_array_equal(_ort_dequantize_int32(q, scale), (q * scale).astype(np.float32))


def test_quantize_bias_per_tensor() -> None:
    bias = np.array([0.5, -0.5, 1.0], np.float32)
    q, scale = quantize_bias(bias, np.array(0.5, np.float32), np.array(0.1, np.float32))
    np.testing.assert_allclose(scale, np.float32(0.5) * np.float32(0.1))
    assert q.tolist() == [10, -10, 20]


def test_quantize_bias_saturates_at_int32() -> None:
    q, _ = quantize_bias(
        np.array([1e30, -1e30], np.float32), np.array(1e-10, np.float32), np.array(1e-10, np.float32)
    )
    info = np.iinfo(np.int32)
    assert q.tolist() == [info.max, info.min]


def test_quantize_bias_matches_weight_scales_from_quantize_weight() -> None:
    w = _data(6, (4, 3, 3, 3), spread=0.4)
    bias = _data(7, (4,), spread=0.2)
    _, wp = quantize_weight(w, "int8", symmetric=True, axis=0)
    activation = compute_qparams(-1.0, 3.0, "uint8", symmetric=False)
    q, scale = quantize_bias(bias, activation.scale, wp.scale)
    np.testing.assert_array_equal(scale, (activation.scale * wp.scale).astype(np.float32))
    assert np.max(np.abs(q * scale - bias) / scale) <= 0.5 + 1e-6


def test_params_repr_mentions_fields() -> None:
    p = compute_qparams(-1.0, 1.0, "int8", symmetric=True)
    text = repr(p)
    assert "scale=" in text and "zero_point=" in text and "int8" in text


def test_onnx_numpy_helper_roundtrip_of_params() -> None:
    """Parameters survive being stored as ONNX initializers (dtype and shape preserved)."""
    p = compute_qparams(np.array([-1.0, -2.0]), np.array([1.0, 2.0]), "int8", symmetric=True, axis=0)
    scale = onnx.numpy_helper.to_array(onnx.numpy_helper.from_array(p.scale, "s"))
    zp = onnx.numpy_helper.to_array(onnx.numpy_helper.from_array(p.zero_point, "z"))
    assert scale.dtype == np.float32 and zp.dtype == np.int8
    np.testing.assert_array_equal(scale, p.scale)


def test_a_weight_scale_floor_keeps_the_bias_of_a_near_zero_channel() -> None:
    """PP-OCRv5's detector folds a BatchNorm with gamma near 0: weights of 1e-40, a bias of 0.3. Their
    scale floors at float32's smallest normal, and bias / (input scale x weight scale) saturates int32."""
    weights = np.stack(
        [np.full((3, 3, 3), 1e-40, np.float32), np.linspace(-1, 1, 27, dtype=np.float32).reshape(3, 3, 3)]
    )
    bias = np.array([0.3, -0.2], np.float32)
    input_scale = np.float32(0.05)
    _, plain = quantize_weight(weights, "int8", True, 0)
    saturated, _ = quantize_bias(bias, input_scale, plain.scale)
    assert abs(int(saturated[0])) == 2**31 - 1  # the bias is lost

    floor = bias_safe_weight_scale(bias, input_scale)
    for symmetric in (True, False):
        q, params = quantize_weight(weights, "int8", symmetric, 0, min_scale=floor)
        assert np.all(params.scale >= floor.astype(np.float32) * (1 - 1e-6))
        assert params.scale[1] == quantize_weight(weights, "int8", symmetric, 0)[1].scale[1]  # untouched
        bias_q, bias_scale = quantize_bias(bias, input_scale, params.scale)
        assert np.all(np.abs(bias_q.astype(np.int64)) <= BIAS_INT32_LIMIT)
        np.testing.assert_allclose(bias_q * bias_scale, bias, rtol=1e-6)  # exact within int32 rounding
        np.testing.assert_allclose(dequantize(q, params)[0], 0.0, atol=1e-30)  # the 1e-40 weights round to 0
