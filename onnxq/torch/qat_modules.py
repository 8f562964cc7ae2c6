"""The fused modules QAT trains: Conv2d(+BatchNorm2d)(+ReLU) and Linear(+ReLU) with fake-quant weights.

Each replaces the chain it fuses, so that what trains is what onnxq deploys: a BatchNorm after a Conv
is folded into the Conv's weight and bias (onnxq's preprocess folds it too), the weight fake-quant
sees the *folded* weight, and a ReLU after the layer is part of it (onnxq absorbs it: no Q/DQ between
the layer and its ReLU).

BatchNorm training follows the folding scheme of Jacob et al. (2018) / Krishnamoorthi (2018): the
convolution runs with the fake-quantized folded weight (scaled by ``γ/σ_running``), its output is
scaled back and normalised with the batch statistics, so BN still trains and updates its running
statistics. After ``freeze_bn_after`` training steps the running statistics freeze and the layer
computes exactly its deployed form ``conv(x, fq(W·γ/σ)) + β - μ·γ/σ``.

In export mode (:func:`onnxq.torch.qat.exporting`) the weight goes through
:class:`onnxq.torch.symbolic.WeightDQ`, which the TorchScript exporter writes as an int8 initializer
read by a ``DequantizeLinear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from onnxq.torch.fake_quant import Grid, WeightFakeQuant
from onnxq.torch.symbolic import WeightDQ

__all__ = ["QATConv2d", "QATLinear"]


class _QATLayer(nn.Module):
    """What the fused layers share: a weight fake-quant, an optional ReLU, the export switch."""

    def __init__(self, grid: Grid, channels: int, relu: bool, learnable: bool) -> None:
        super().__init__()
        self.weight_fake_quant = WeightFakeQuant(grid, channels, learnable=learnable)
        self.relu = relu
        self.exporting = False
        #: False while calibrating: the layer runs in float (ranges are observed on the float model).
        self.quantize_weights = True

    def quantized_weight(self, w: torch.Tensor) -> torch.Tensor:
        if not self.quantize_weights:
            return w
        if self.exporting:
            q, scale = self.weight_fake_quant.integers(w)
            return WeightDQ.apply(self.weight_fake_quant(w).detach(), q, scale)  # type: ignore[no-untyped-call, no-any-return]
        return self.weight_fake_quant(w)  # type: ignore[no-any-return]

    def activation(self, y: torch.Tensor) -> torch.Tensor:
        return F.relu(y) if self.relu else y


class QATConv2d(_QATLayer):
    """Conv2d, optionally with the BatchNorm2d after it folded in and the ReLU after that fused."""

    step: torch.Tensor

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        *,
        relu: bool,
        grid: Grid,
        learnable: bool,
        freeze_bn_after: int | None,
    ) -> None:
        super().__init__(grid, conv.out_channels, relu, learnable)
        self.conv = conv
        self.bn = bn
        self.freeze_bn_after = freeze_bn_after
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    @property
    def bn_frozen(self) -> bool:
        return self.freeze_bn_after is not None and int(self.step) >= self.freeze_bn_after

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        if c.padding_mode != "zeros":
            raise NotImplementedError("QAT supports Conv2d with padding_mode='zeros' only")
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(folded weight, folded bias, γ/σ per channel or None without BatchNorm), running statistics."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b, None
        bn = self.bn
        assert bn.running_var is not None and bn.running_mean is not None
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        bias = b if b is not None else torch.zeros_like(bn.running_mean)
        return w * factor.reshape(-1, 1, 1, 1), beta + (bias - bn.running_mean) * factor, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, factor = self.folded()
        qweight = self.quantized_weight(weight)
        bn = self.bn
        if self.training:
            self.step += 1
        if bn is None or factor is None or not self.training or self.bn_frozen:
            return self.activation(self._conv(x, qweight, bias))
        # Scale the folded conv back to the unnormalised output, then normalise with batch statistics
        # (which also updates the running statistics the fold uses).
        y = self._conv(x, qweight, None) / factor.reshape(1, -1, 1, 1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        y = F.batch_norm(
            y,
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=True,
            momentum=bn.momentum if bn.momentum is not None else 0.1,
            eps=bn.eps,
        )
        return self.activation(y)


class QATLinear(_QATLayer):
    """Linear with a fake-quant weight, optionally with the ReLU after it fused."""

    def __init__(self, linear: nn.Linear, *, relu: bool, grid: Grid, learnable: bool) -> None:
        super().__init__(grid, linear.out_features, relu, learnable)
        self.linear = linear

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        return self.linear.weight, self.linear.bias, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.linear(x, self.quantized_weight(self.linear.weight), self.linear.bias))
