"""Fake quantization in plain torch autograd, with onnxq's arithmetic.

The forward pass is exactly what ONNX ``QuantizeLinear`` → ``DequantizeLinear`` compute, and what
:mod:`onnxq.qmath` computes in numpy: ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``
in float32, then ``(q - zero_point) * scale``. So a model trained with these modules computes, up to
float accumulation order, what its exported QDQ model computes in ONNX Runtime.

Gradients use the straight-through estimator (the rounding passes gradients unchanged; values
clamped away get none). With ``learnable=True`` the scale is a parameter trained as in LSQ (Esser et
al., 2020): the gradient of ``x̂`` w.r.t. the scale is ``round(x/s) - x/s`` inside the range and the
clamp bound (minus the zero point) outside it — which autograd derives by itself once the rounding is
straight-through — scaled by ``1/sqrt(numel · qmax)`` so that scale updates keep pace with weight
updates.

Scales and zero points come from ranges the way :func:`onnxq.qmath.compute_qparams` computes them
(:func:`qparams`), so ranges observed here give the same parameters onnxq's calibration would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onnxq.errors import OnnxqError
from onnxq.torch.rounding import fake_quantize
from onnxq.torch.symbolic import ActivationQDQ

__all__ = [
    "ActivationFakeQuant",
    "Grid",
    "GridReuse",
    "WeightFakeQuant",
    "activation_grid",
    "fake_quantize",
    "qparams",
    "weight_grid",
]


@dataclass(frozen=True)
class Grid:
    """An integer grid: ``[qmin, qmax]``, whether it is symmetric, and the ONNX type that stores it.

    ``scale_span`` is the number of steps the range is divided into when computing the scale:
    ``qmax - qmin`` for affine grids, ``2 · qmax`` for symmetric ones (as in :func:`onnxq.qmath.qrange`,
    where symmetric int8 uses [-127, 127] so that zero sits in the middle).
    """

    qmin: int
    qmax: int
    symmetric: bool
    storage: str  # "uint8" or "int8"

    @property
    def scale_span(self) -> float:
        return (self.qmax - self.qmin) / 2.0 if self.symmetric else float(self.qmax - self.qmin)


def weight_grid(bits: int) -> Grid:
    """The symmetric grid of weights: [-127, 127] for 8 bits (onnxq's int8 convention), [-7, 7] for 4.

    onnxq's :mod:`~onnxq.qmath` has no int4 type; 4-bit weights follow its int8 convention, a
    symmetric range without the lowest code (so zero is in the middle and ``-w`` is representable).
    They are stored in int8 (the values never leave [-7, 7]).
    """
    if bits not in (4, 8):
        raise OnnxqError(f"weight_bits must be 4 or 8, got {bits}")
    half = (1 << (bits - 1)) - 1
    return Grid(-half, half, True, "int8")


def activation_grid(dtype: str, symmetric: bool) -> Grid:
    """The grid of activations, per :class:`onnxq.config.ActivationScheme` (uint8 affine by default).

    Activations saturate to the full range of their type, as ``QuantizeLinear`` does.
    """
    if dtype == "uint8":
        if symmetric:
            raise OnnxqError("symmetric activations need dtype 'int8' (uint8 is always affine)")
        return Grid(0, 255, False, "uint8")
    if dtype == "int8":
        return Grid(-128, 127, symmetric, "int8")
    raise OnnxqError(f"activation dtype must be 'uint8' or 'int8', got {dtype!r}")


def qparams(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float32 holding integers) covering ``[lo, hi]``.

    A torch transcription of :func:`onnxq.qmath.compute_qparams` (float64 arithmetic, the range
    widened to include zero, scale 1 for an empty range, the smallest normal float32 as the floor, the
    zero point recomputed against the stored float32 scale), so both give identical parameters. For
    symmetric grids the scale is ``absmax / (2·qmax / 2)`` as there, which uses
    ``(qmax - qmin) / 2`` of :func:`onnxq.qmath.qrange`.
    """
    lo64 = torch.clamp(lo.detach().to(torch.float64), max=0.0)
    hi64 = torch.clamp(hi.detach().to(torch.float64), min=0.0)
    qmin, qmax = _scale_range(grid)
    if grid.symmetric:
        scale = torch.maximum(lo64.abs(), hi64.abs()) / ((qmax - qmin) / 2.0)
    else:
        scale = (hi64 - lo64) / float(qmax - qmin)
    scale32 = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    scale32 = torch.clamp(scale32, min=float(np.finfo(np.float32).tiny))
    if grid.symmetric:
        zero_point = torch.zeros_like(scale32)
    else:
        zero_point = torch.clamp(torch.round(qmin - lo64 / scale32.to(torch.float64)), qmin, qmax)
    return scale32, zero_point.to(torch.float32)


def _scale_range(grid: Grid) -> tuple[int, int]:
    """The range the scale is computed for: the grid itself, or [-qmax, qmax] when symmetric."""
    return (-grid.qmax, grid.qmax) if grid.symmetric else (grid.qmin, grid.qmax)


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """A learned scale as used: its magnitude, never below the smallest normal float32."""
    return torch.clamp(scale.abs(), min=float(np.finfo(np.float32).tiny))


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` (LSQ's gradient scaling)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


class ActivationFakeQuant(nn.Module):
    """Per-tensor fake quantization of an activation, with a min-max observer.

    States: *observing* (calibration: records the running min/max, output unchanged) and *quantizing*
    (training and evaluation). With fixed scales the range keeps following the data during training
    as an exponential moving average (``averaging_constant``, as onnxq's ``moving_average`` method),
    and the scale/zero point are recomputed from it with :func:`qparams`; with ``learnable=True`` the
    scale is initialised from the calibrated range and then trained (LSQ), the zero point kept.
    Several quantization points may share one instance (a Concat's inputs and output share one scale,
    as onnxq's planner requires).
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, grid: Grid, *, learnable: bool = False, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.grid = grid
        self.learnable = learnable
        self.averaging_constant = averaging_constant
        self.observing = False
        self.exporting = False
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.scale: torch.Tensor
        if learnable:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(1.0))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.min_val).item())

    def reset_range(self) -> None:
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)

    def observe(self, x: torch.Tensor, *, averaging: bool) -> None:
        """Widen (calibration) or move (training, ``averaging``) the recorded range to include ``x``."""
        data = x.detach()
        finite = data[torch.isfinite(data)]
        if finite.numel() == 0:
            return
        lo, hi = finite.min().to(self.min_val.dtype), finite.max().to(self.max_val.dtype)
        if averaging and self.calibrated:
            c = self.averaging_constant
            self.min_val.mul_(1 - c).add_(c * lo)
            self.max_val.mul_(1 - c).add_(c * hi)
        else:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))

    def export_params(self) -> tuple[float, int]:
        """The scale (a float32 value) and the integer zero point the export writes."""
        scale = _positive(self.scale.detach()) if self.learnable else self.scale.detach()
        return float(scale.to(torch.float32)), int(self.zero_point.item())

    def update_qparams(self) -> None:
        """Scale and zero point from the recorded range (also the LSQ scale's starting point)."""
        if not self.calibrated:
            raise OnnxqError("an activation fake-quant has no range: run calibrate_qat on some batches first")
        scale, zero_point = qparams(self.min_val, self.max_val, self.grid)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x, averaging=False)
            return x
        if self.training and not self.learnable and not self.exporting:
            self.observe(x, averaging=True)
            self.update_qparams()
        return self.apply_grid(x)

    def apply_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the current parameters (no observation)."""
        if self.observing:
            return x
        if not self.calibrated:
            raise OnnxqError("the QAT model is not calibrated: run calibrate_qat(model, batches) first")
        if self.exporting:
            scale_value, zero_point = self.export_params()
            g = self.grid
            return ActivationQDQ.apply(x, scale_value, zero_point, g.qmin, g.qmax, g.storage)  # type: ignore[no-untyped-call, no-any-return]
        scale = self.scale
        if self.learnable:
            numel = max(x[0].numel() if x.dim() > 1 else x.numel(), 1)
            scale = _grad_scale(_positive(scale), 1.0 / math.sqrt(numel * self.grid.qmax))
        return fake_quantize(x, scale, self.zero_point, self.grid.qmin, self.grid.qmax)


class GridReuse(nn.Module):
    """The grid of another :class:`ActivationFakeQuant`, applied again after a pass-through op.

    MaxPool, Flatten and reshapes keep their input's grid, so fake-quantizing their output again with
    the same parameters changes nothing in torch; it is there for the export, where it writes the
    ``QuantizeLinear → DequantizeLinear`` that onnxq's planner puts at every anchor input (and that
    lowering to QLinearConv/QGemm needs). It never observes, so ranges are not counted twice.
    """

    def __init__(self, source: ActivationFakeQuant) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.apply_grid(x)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric fake quantization of a weight (axis 0).

    Fixed scales are recomputed from the weight at every call (absmax per channel, as onnxq quantizes
    weights); learnable scales (LSQ) are initialised that way by :meth:`init_scale` and then trained.
    """

    initialised: torch.Tensor

    def __init__(self, grid: Grid, channels: int, *, learnable: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.learnable = learnable
        self.scale: torch.Tensor
        if learnable:
            self.scale = nn.Parameter(torch.ones(channels))
        else:
            self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("initialised", torch.tensor(False))

    def _per_channel_qparams(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.detach().reshape(w.shape[0], -1)
        scale, _ = qparams(flat.min(dim=1).values, flat.max(dim=1).values, self.grid)
        return scale

    def init_scale(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(self._per_channel_qparams(w))
            self.initialised.fill_(True)

    def current_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-channel scale used for ``w`` now (detached; what the export stores)."""
        if self.learnable:
            return _positive(self.scale.detach()).to(torch.float32)
        return self._per_channel_qparams(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (w.dim() - 1)
        if self.learnable:
            if not bool(self.initialised):
                self.init_scale(w)
            per_channel = max(w[0].numel(), 1)
            scale = _grad_scale(_positive(self.scale), 1.0 / math.sqrt(per_channel * self.grid.qmax))
        else:
            scale = self._per_channel_qparams(w)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        return fake_quantize(w, scale.reshape(shape), zero, self.grid.qmin, self.grid.qmax)

    def integers(self, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The weight's integer values (int8 storage) and float32 per-channel scale, for export."""
        scale = self.current_scale(w).to(torch.float32)
        shape = (-1,) + (1,) * (w.dim() - 1)
        q = torch.clamp(torch.round(w.detach() / scale.reshape(shape)), self.grid.qmin, self.grid.qmax)
        return q.to(torch.int8).numpy(), scale.numpy().astype(np.float32)
