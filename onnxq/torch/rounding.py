"""The fake-quant arithmetic itself, shared by the training modules and the export functions.

``fake_quantize`` is ``DequantizeLinear(QuantizeLinear(x))`` in float32 with a straight-through
rounding; it has no state, so :mod:`onnxq.torch.fake_quant` (the modules) and
:mod:`onnxq.torch.symbolic` (the export) can both use it without importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["RoundSTE", "fake_quantize"]


class RoundSTE(torch.autograd.Function):
    """Round half to even; the gradient passes through unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` in float32, straight-through for the rounding.

    ``scale`` and ``zero_point`` broadcast against ``x`` (shape them ``[C, 1, 1, 1]`` for per-channel
    weights). The division is a true float32 division as in ONNX (not a multiplication by ``1/scale``),
    so the result is bit-identical to :func:`onnxq.qmath.quantize` then :func:`onnxq.qmath.dequantize`.
    """
    q = RoundSTE.apply(x / scale) + zero_point  # type: ignore[no-untyped-call]
    q = torch.clamp(q, qmin, qmax)
    return (q - zero_point) * scale
