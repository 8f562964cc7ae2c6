"""Fake quantization: bit-identical to onnxq.qmath's quantize → dequantize; STE and LSQ gradients."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from onnxq import qmath
from onnxq.errors import OnnxqError
from onnxq.torch.fake_quant import (
    ActivationFakeQuant,
    WeightFakeQuant,
    activation_grid,
    fake_quantize,
    qparams,
    weight_grid,
)


def _numpy_fake_quant(x: np.ndarray, params: qmath.QuantParams, lo: int, hi: int) -> np.ndarray:
    """qmath's quantize → dequantize, with the clamp of the grid (= the dtype's range for activations)."""
    q = qmath.quantize(x, params)
    return qmath.dequantize(np.clip(q, lo, hi).astype(q.dtype), params)


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", False), ("int8", True)])
def test_activation_matches_qmath_bit_for_bit(dtype: str, symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 7, 7)) * 3 + 0.7).astype(np.float32)
    # Values exactly on .5 steps exercise round-half-to-even.
    x.reshape(-1)[:64] = (np.arange(64, dtype=np.float32) - 32) * 0.05
    lo, hi = float(x.min() * np.float32(0.8)), float(x.max() * np.float32(0.8))  # some values saturate
    params = qmath.compute_qparams(lo, hi, dtype, symmetric)
    scale, zero_point = qparams(torch.tensor(lo), torch.tensor(hi), activation_grid(dtype, symmetric))
    assert scale.item() == params.scale.item() and zero_point.item() == float(params.zero_point)
    grid = activation_grid(dtype, symmetric)
    got = fake_quantize(torch.from_numpy(x), scale, zero_point, grid.qmin, grid.qmax).numpy()
    np.testing.assert_array_equal(got, _numpy_fake_quant(x, params, grid.qmin, grid.qmax))


def test_weight_per_channel_matches_qmath_quantize_weight() -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 4, 3, 3)) * rng.uniform(0.01, 2.0, (8, 1, 1, 1))).astype(np.float32)
    q, params = qmath.quantize_weight(w, "int8", True, axis=0)
    expected = qmath.dequantize(q, params)
    fq = WeightFakeQuant(weight_grid(8), 8)
    np.testing.assert_array_equal(fq(torch.from_numpy(w)).detach().numpy(), expected)
    ints, scale = fq.integers(torch.from_numpy(w))
    np.testing.assert_array_equal(ints, q)
    np.testing.assert_array_equal(scale, params.scale)


def test_four_bit_weights_use_symmetric_minus7_to_7() -> None:
    w = torch.randn(6, 10)
    fq = WeightFakeQuant(weight_grid(4), 6)
    ints, scale = fq.integers(w)
    assert ints.min() >= -7 and ints.max() <= 7 and (np.abs(ints).max(axis=1) == 7).all()
    np.testing.assert_allclose(scale, w.abs().amax(1).numpy() / 7, rtol=1e-6)
    with pytest.raises(OnnxqError, match="weight_bits"):
        weight_grid(3)


def test_ste_gradients_flow_and_clamped_values_get_none() -> None:
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.01), torch.tensor(0.0), -127, 127)
    y.sum().backward()
    assert x.grad is not None
    inside = x.detach().abs() <= 1.27
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[~inside] == 0)


def test_lsq_scales_change_under_training() -> None:
    torch.manual_seed(0)
    act = ActivationFakeQuant(activation_grid("uint8", False), learnable=True)
    act.observing = True
    act(torch.rand(64, 16) * 4)
    act.observing = False
    act.update_qparams()
    weight = WeightFakeQuant(weight_grid(4), 16, learnable=True)
    w = torch.nn.Parameter(torch.randn(16, 16))
    weight.init_scale(w)
    start = (act.scale.detach().clone(), weight.scale.detach().clone())
    optimizer = torch.optim.SGD([act.scale, weight.scale, w], lr=0.05)
    target = torch.randn(64, 16)
    for _ in range(20):
        loss = (act(torch.rand(64, 16) * 6) @ weight(w).t() - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert act.scale.grad is not None and act.scale.grad.abs().item() > 0
        assert weight.scale.grad is not None and weight.scale.grad.abs().sum().item() > 0
        optimizer.step()
    assert act.scale.item() != start[0].item()
    assert not torch.equal(weight.scale.detach(), start[1])


def test_uncalibrated_activation_is_a_clear_error() -> None:
    with pytest.raises(OnnxqError, match="calibrate_qat"):
        ActivationFakeQuant(activation_grid("uint8", False)).eval()(torch.ones(2))
