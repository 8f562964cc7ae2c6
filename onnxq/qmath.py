"""Quantization arithmetic: ranges to scale/zero point, and quantize/dequantize of numpy arrays.

Rounding is round-half-to-even, as ONNX ``QuantizeLinear`` specifies, so a weight quantized here is
bit-identical to what the runtime would compute from the same float data.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "QuantParams",
    "compute_qparams",
    "dequantize",
    "np_dtype",
    "qrange",
    "quantize",
    "quantize_bias",
    "quantize_weight",
]

QuantDType = Literal["uint8", "int8"]

_QRANGE: dict[str, tuple[int, int]] = {"uint8": (0, 255), "int8": (-128, 127)}


def qrange(dtype: str, symmetric: bool) -> tuple[int, int]:
    """Integer range used for a scheme; symmetric int8 uses [-127, 127] so that zero sits in the middle."""
    lo, hi = _QRANGE[dtype]
    if symmetric and dtype == "int8":
        return -127, 127
    return lo, hi


def np_dtype(dtype: str) -> type[np.integer]:
    """The numpy integer type for a quantized data type name."""
    return {"uint8": np.uint8, "int8": np.int8}[dtype]


class QuantParams:
    """Scale and zero point (scalars for per-tensor, 1-D arrays for per-axis) of one quantized tensor."""

    __slots__ = ("axis", "dtype", "scale", "zero_point")

    def __init__(
        self,
        scale: npt.NDArray[np.float32],
        zero_point: npt.NDArray[np.integer],
        dtype: str,
        axis: int | None,
    ) -> None:
        self.scale = scale
        self.zero_point = zero_point
        self.dtype = dtype
        self.axis = axis

    def __repr__(self) -> str:
        return (
            f"QuantParams(scale={self.scale!r}, zero_point={self.zero_point!r}, "
            f"dtype={self.dtype}, axis={self.axis})"
        )


def compute_qparams(
    rmin: npt.ArrayLike, rmax: npt.ArrayLike, dtype: str, symmetric: bool, axis: int | None = None
) -> QuantParams:
    """Scale/zero point covering [rmin, rmax] (scalars, or 1-D arrays for per-axis parameters).

    The range is widened to include 0 so that zero is exactly representable (padding, ReLU). An empty
    range (all zeros) gets scale 1 so that dequantization stays finite.
    """
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = qrange(dtype, symmetric)
    if symmetric:
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        scale = absmax / ((qmax - qmin) / 2.0)
        zero_point = np.zeros_like(scale)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    # A float32 scale can underflow to 0 for denormal ranges; keep it representable.
    scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    if not symmetric:
        # Recompute the zero point against the float32 scale that will actually be stored.
        zero_point = np.clip(np.rint(qmin - lo / scale.astype(np.float64)), qmin, qmax)
    return QuantParams(scale.astype(np.float32), zero_point.astype(np_dtype(dtype)), dtype, axis)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def quantize(x: npt.NDArray[np.floating], params: QuantParams) -> npt.NDArray[np.integer]:
    """``QuantizeLinear`` in numpy: round half to even, saturate to the data type's full range."""
    scale = _broadcast(params.scale.astype(np.float32), x.ndim, params.axis)
    zero_point = _broadcast(params.zero_point.astype(np.float32), x.ndim, params.axis)
    lo, hi = _QRANGE[params.dtype]
    q = np.rint(x.astype(np.float32) / scale) + zero_point
    clipped: npt.NDArray[np.integer] = np.clip(q, lo, hi).astype(np_dtype(params.dtype))
    return clipped


def dequantize(q: npt.NDArray[np.integer], params: QuantParams) -> npt.NDArray[np.float32]:
    """``DequantizeLinear`` in numpy."""
    scale = _broadcast(params.scale.astype(np.float32), q.ndim, params.axis)
    zero_point = _broadcast(params.zero_point.astype(np.int32), q.ndim, params.axis)
    real: npt.NDArray[np.float32] = ((q.astype(np.int32) - zero_point).astype(np.float32) * scale).astype(
        np.float32
    )
    return real


def quantize_weight(
    w: npt.NDArray[np.floating],
    dtype: str,
    symmetric: bool,
    axis: int | None,
    min_scale: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.integer], QuantParams]:
    """Quantize a constant weight per-tensor (``axis=None``) or per-channel along ``axis``.

    ``min_scale`` (a scalar, or one value per channel) is a floor for the scale: the range is widened
    until the scale reaches it (:func:`bias_safe_weight_scale`).
    """
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        finite = w[np.isfinite(w)]
        rmin: npt.ArrayLike = float(finite.min()) if finite.size else 0.0
        rmax: npt.ArrayLike = float(finite.max()) if finite.size else 0.0
    else:
        axis = axis % w.ndim
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        if moved.shape[1] == 0:
            rmin = rmax = np.zeros(w.shape[axis])
        else:
            rmin, rmax = moved.min(axis=1), moved.max(axis=1)
    if min_scale is not None:
        qmin, qmax = qrange(dtype, symmetric)
        floor = np.asarray(min_scale, np.float64)
        if symmetric:  # scale = max|r| / ((qmax - qmin) / 2)
            rmax = np.maximum(np.asarray(rmax, np.float64), floor * (qmax - qmin) / 2.0)
        else:  # scale = (rmax - rmin) / (qmax - qmin), with 0 in the range
            low = np.minimum(np.asarray(rmin, np.float64), 0.0)
            rmax = np.maximum(np.asarray(rmax, np.float64), low + floor * (qmax - qmin))
    params = compute_qparams(rmin, rmax, dtype, symmetric, axis=axis)
    return quantize(w, params), params


#: The largest int32 bias value :func:`bias_safe_weight_scale` allows: the type's whole range, so only
#: a bias that would saturate moves its channel's weight scale.
BIAS_INT32_LIMIT = 2**31 - 1


def bias_safe_weight_scale(bias: npt.ArrayLike, input_scale: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The least weight scale (per element of ``bias``) at which ``bias`` fits int32 beside it.

    The bias is stored with scale input scale × weight scale. A channel whose weights are nearly zero
    (a BatchNorm with γ ≈ 0 folded in: PP-OCRv5's detector has weights of 1e-40) gets a weight scale
    of float32's smallest normal number, and its bias (the BatchNorm's β, not small) divided by that
    overflows int32 and saturates: that channel outputs garbage. Raising the weight scale to this
    floor rounds such weights to zero, which they nearly are, and keeps the bias exact.
    """
    limit = float(BIAS_INT32_LIMIT)
    return np.abs(np.asarray(bias, np.float64)) / (np.asarray(input_scale, np.float64) * limit)


def quantize_bias(
    bias: npt.NDArray[np.floating], input_scale: np.ndarray, weight_scale: np.ndarray
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """int32 bias with scale = input scale × weight scale (per output channel when the weight is).

    This is the scale the integer accumulator of QLinearConv/QGemm has, so the bias adds in without
    requantization.
    """
    scale = (np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.ndim else scale
    scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(np.asarray(bias, np.float64) / scale.astype(np.float64)), info.min, info.max)
    return q.astype(np.int32), scale
