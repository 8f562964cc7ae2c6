"""Autograd functions whose ``symbolic`` writes QuantizeLinear/DequantizeLinear in the TorchScript export.

Used only while :func:`onnxq.torch.export_qat` exports: their forward computes exactly the fake-quant
result (so tracing sees the same values), and their symbolic emits the ONNX ops with the learned
parameters as constants:

- :class:`ActivationQDQ`: ``QuantizeLinear → DequantizeLinear`` with a scalar scale and zero point
  (uint8 or int8, as the grid stores them);
- :class:`WeightDQ`: an int8 constant (the weight's integer values; 4-bit weights are int8 constants
  holding values in [-7, 7], since int4 needs opset 21 and onnxruntime's support for it varies) read by
  a per-channel ``DequantizeLinear`` (axis 0, zero points 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from onnxq.torch.rounding import fake_quantize

__all__ = ["ActivationQDQ", "WeightDQ"]

_TORCH_TYPES = {"uint8": torch.uint8, "int8": torch.int8}


class ActivationQDQ(torch.autograd.Function):
    """Fake quantization of an activation with constant parameters (export only)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, storage: str
    ) -> torch.Tensor:
        s = torch.tensor(scale, dtype=torch.float32)
        z = torch.tensor(float(zero_point), dtype=torch.float32)
        return fake_quantize(x, s, z, qmin, qmax)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, zero_point: int, qmin: int, qmax: int, storage: str) -> Any:
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=_TORCH_TYPES[storage]))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class WeightDQ(torch.autograd.Function):
    """A fake-quantized weight, exported as ``DequantizeLinear(int8 constant, per-channel scale)``."""

    @staticmethod
    def forward(ctx: Any, dequantized: torch.Tensor, q: np.ndarray, scale: np.ndarray) -> torch.Tensor:
        return dequantized.clone()

    @staticmethod
    def symbolic(g: Any, dequantized: Any, q: np.ndarray, scale: np.ndarray) -> Any:
        values = g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(q, dtype=np.int8)))
        s = g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)))
        z = g.op("Constant", value_t=torch.zeros(scale.shape, dtype=torch.int8))
        return g.op("DequantizeLinear", values, s, z, axis_i=0)
