"""Tensors that hold an infinity or a sentinel (beyond ±1e8) are never quantized with a range.

An attention mask of ``-inf`` or of float32's minimum, ``Log(0)``: a range that ignores the infinity
clamps it to a finite value (masked positions get weight again); a range that includes float32's
minimum (or -1e9) has a step of ~1e36 (~4e6), and every ordinary value becomes 0. Calibration
reports such tensors and the nodes that touch them stay float, with a ``non_finite_range`` decline
naming the tensor.
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest

import onnxq
from onnxq.calibrate import observers
from onnxq.calibrate.observers import make_observer
from onnxq.config import CalibrationConfig, LatencyGuardConfig, QuantConfig

# Masked max pooling (sentence-transformers' max pooling): padded tokens are filled with a sentinel
# before the maximum over tokens. Where and ReduceMax run on int8 data when their inputs are quantized,
# so without the guard the sentinel would set the range of the filled tensor.
MASKED_MAX_POOL = """
pool (float[1, 8, 16] x, bool[1, 8, 1] keep) => (float[1, 16] y) {
    h = MatMul (x, W1)
    masked = Where (keep, h, fill)
    pooled = ReduceMax <keepdims = 0, axes = [1]> (masked)
    y = MatMul (pooled, W2)
}
"""
FILLS = {"float-min": float(np.finfo(np.float32).min), "minus-1e9": -1e9, "-inf": -np.inf}


def _model(kind: str) -> onnx.ModelProto:
    arrays = builders.normal_arrays(0, W1=(16, 16), W2=(16, 16))
    arrays = {k: v * 0.25 for k, v in arrays.items()}
    arrays |= {"fill": np.array(FILLS[kind], np.float32)}
    return builders.parse(MASKED_MAX_POOL, arrays)


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    keep = np.ones((1, 8, 1), bool)
    keep[:, 5:] = False  # the last three tokens are padding
    return [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32), "keep": keep} for _ in range(count)]


def _sqnr(expected: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((expected - actual) ** 2))
    return 10 * np.log10(float(np.sum(expected**2)) / max(noise, 1e-30))


@pytest.mark.parametrize("kind", list(FILLS))
def test_sentinel_tensors_stay_float_and_the_model_stays_accurate(kind: str) -> None:
    proto = _model(kind)
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=False), run_time_ranges=False)
    result = onnxq.quantize(proto, _feeds(16, seed=1), config)
    if kind == "-inf":  # the planner already keeps a Where with a non-finite constant float
        assert any(d.node.startswith("Where") or "Where" in str(d) for d in result.report.declines)
    else:
        declines = [d for d in result.report.declines if d.code == "non_finite_range"]
        assert declines and all("'masked'" in d.message for d in declines)
    # The projections are still quantized.
    assert result.report.quantized_op_types.get("MatMul") == 2
    for feed in _feeds(8, seed=2):
        (expected,) = builders.run_disabled(proto, feed)
        (actual,) = builders.run_disabled(result.model, feed)
        assert np.all(np.isfinite(actual))
        # Measured ~40 dB; the sentinel's range (a step of 4e6 or more) gives about 0 dB.
        assert _sqnr(expected, actual) >= 25.0


def test_without_the_guard_the_sentinel_destroys_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the guard is what keeps the model accurate (a broken guard fails the test above)."""
    monkeypatch.setattr(observers, "EXTREME_RANGE", float("inf"))
    proto = _model("minus-1e9")
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=False), run_time_ranges=False)
    result = onnxq.quantize(proto, _feeds(16, seed=1), config)
    feed = _feeds(1, seed=2)[0]
    (expected,) = builders.run_disabled(proto, feed)
    (actual,) = builders.run_disabled(result.model, feed)
    assert _sqnr(expected, actual) < 10.0


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_observers_record_infinities(method: str) -> None:
    observer = make_observer(CalibrationConfig(method=method), dtype="uint8", symmetric=False)  # type: ignore[arg-type]
    observer.update(np.array([[0.0, 1.0, 2.0]], np.float32))
    assert not observer.infinite
    observer.update(np.array([[0.5, np.nan, 1.5]], np.float32))  # NaN is skipped, not an infinity
    assert not observer.infinite
    observer.update(np.array([[0.5, -np.inf, 1.5]], np.float32))
    assert observer.infinite
    lo, hi = observer.compute_range()  # the range itself stays finite
    assert np.isfinite(lo) and np.isfinite(hi)


def test_an_all_infinite_tensor_is_recorded() -> None:
    observer = make_observer(CalibrationConfig(method="minmax"), dtype="uint8", symmetric=False)
    observer.update(np.full((2, 3), -np.inf, np.float32))
    assert observer.empty and observer.infinite


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_a_sentinel_is_told_from_a_tensor_large_all_over(method: str) -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 64)).astype(np.float32) * 8.0
    masked = scores.copy()
    masked[:, 40:] = -1e9  # padding positions of an attention mask
    large = (rng.standard_normal((4, 64)) * 5e8).astype(np.float32)  # exploding activations
    verdict = {}
    for name, batch in (("scores", scores), ("masked", masked), ("large", large)):
        observer = make_observer(CalibrationConfig(method=method), dtype="uint8", symmetric=False)  # type: ignore[arg-type]
        for row in batch:
            observer.update(row[None])
        verdict[name] = observer.sentinel
    assert verdict == {"scores": False, "masked": True, "large": False}


def test_a_network_large_all_over_is_still_quantized() -> None:
    """Constant-fill weights (the ONNX model zoo's test copies) blow activations up past 1e8 with no
    sentinel in sight: the layers are quantized with their ranges, not kept float."""
    text = """
    big (float[1, 16] x) => (float[1, 16] y) {
        h = MatMul (x, W1)
        r = Relu (h)
        y = MatMul (r, W2)
    }
    """
    proto = builders.parse(
        text, {"W1": np.full((16, 16), 3e4, np.float32), "W2": np.full((16, 16), 1e4, np.float32)}
    )
    feeds = [
        {"x": np.abs(np.random.default_rng(i).standard_normal((1, 16))).astype(np.float32) * 100}
        for i in range(8)
    ]
    result = onnxq.quantize(proto, feeds, QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)))
    assert not [d for d in result.report.declines if d.code == "non_finite_range"]
    assert result.report.quantized_op_types.get("MatMul") == 2
    (expected,) = builders.run_disabled(proto, feeds[0])
    (actual,) = builders.run_disabled(result.model, feeds[0])
    assert _sqnr(expected, actual) >= 25.0
