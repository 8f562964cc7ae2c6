"""Observers: ranges against direct numpy references, batch invariance, exact histogram merging."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from onnxq.calibrate.observers import (
    ENTROPY_MIN_KEPT,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    _entropy_candidates,
    make_observer,
)
from onnxq.config import CalibrationConfig
from onnxq.qmath import compute_qparams, dequantize, quantize

F32 = npt.NDArray[np.float32]

FACTORIES: dict[str, Callable[[], Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": lambda: MovingAverageMinMaxObserver(0.1),
    "percentile": lambda: PercentileObserver(99.9),
    "percentile_sym": lambda: PercentileObserver(99.0, symmetric=True),
    "entropy_u8": lambda: EntropyObserver("uint8"),
    "entropy_s8": lambda: EntropyObserver("int8", symmetric=True),
    "mse_u8": lambda: MSEObserver("uint8"),
    "mse_s8": lambda: MSEObserver("int8", symmetric=True),
    "mse_small": lambda: MSEObserver("int8", num_bins=64),
}
HISTOGRAM_FACTORIES = {k: v for k, v in FACTORIES.items() if k not in ("minmax", "moving_average")}


def _gaussian(n: int, seed: int = 0) -> F32:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _observe(observer: Observer, *batches: npt.ArrayLike) -> Observer:
    for batch in batches:
        observer.update(batch)
    return observer


def _range(observer: Observer, data: npt.ArrayLike) -> tuple[float, float]:
    return _observe(observer, data).compute_range()


def _batched_data() -> F32:
    """40 samples of shape (3, 5): leading all-zero samples, growing magnitude, outliers, nan/inf."""
    rng = np.random.default_rng(7)
    data = rng.standard_normal((40, 3, 5)).astype(np.float32)
    data[:3] = 0.0  # the histogram range cannot be chosen from these
    data *= (2.0 ** (np.arange(40) / 4.0)).astype(np.float32)[:, None, None]  # R doubles ~10 times
    data[5, 0, 0] = np.nan
    data[9, 1, 2] = np.inf
    data[12, 2, 4] = -np.inf
    data[20, 0, 1] = 1e-30
    data[30, 2, 2] = -900.0
    data[31, 0, 0] = 0.0
    data[33, 1, 1] = -0.0
    return data


def _splits(n: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n
    bounds = np.cumsum([0, *sizes]).tolist()
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


# -- batch invariance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_range_does_not_depend_on_batching(name: str) -> None:
    data = _batched_data()
    factory = FACTORIES[name]
    one = factory()
    one.update(data, num_samples=len(data))
    uneven = factory()
    for part in _splits(len(data), [1, 5, 2, 11, 3, 9, 9]):
        uneven.update(data[part], num_samples=part.stop - part.start)
    per_sample = factory()
    for sample in data:
        per_sample.update(sample)  # no batch axis: one sample
    expected = one.compute_range()
    assert uneven.compute_range() == expected
    assert per_sample.compute_range() == expected
    assert all(math.isfinite(v) for v in expected)
    assert expected[0] <= expected[1]


@pytest.mark.parametrize("name", sorted(HISTOGRAM_FACTORIES))
def test_histogram_state_does_not_depend_on_batching(name: str) -> None:
    data = _batched_data()
    one = HISTOGRAM_FACTORIES[name]()
    one.update(data)
    split = HISTOGRAM_FACTORIES[name]()
    for part in _splits(len(data), [7, 1, 1, 20, 11]):
        split.update(data[part])
    assert isinstance(one, HistogramObserver) and isinstance(split, HistogramObserver)
    counts_one, edges_one = one.histogram()
    counts_split, edges_split = split.histogram()
    np.testing.assert_array_equal(counts_one, counts_split)
    np.testing.assert_array_equal(edges_one, edges_split)


def test_moving_average_steps_once_per_sample() -> None:
    data = _batched_data()[3:]  # every sample has finite values
    c = 0.1
    finite = np.where(np.isfinite(data), data, np.nan).reshape(len(data), -1)
    lo, hi = float(np.nanmin(finite[0])), float(np.nanmax(finite[0]))
    for row in finite[1:]:
        lo += c * (float(np.nanmin(row)) - lo)
        hi += c * (float(np.nanmax(row)) - hi)
    observer = MovingAverageMinMaxObserver(c)
    for part in _splits(len(data), [4, 13, 1, 19]):
        observer.update(data[part], num_samples=part.stop - part.start)
    assert observer.compute_range() == (lo, hi)


def test_moving_average_without_sample_axis_averages_whole_batch() -> None:
    observer = MovingAverageMinMaxObserver(0.5)
    observer.update(np.array([[-1.0, 1.0]], np.float32))
    # num_samples does not match axis 0: the whole batch is one sample.
    observer.update(np.array([[-3.0, 5.0, 0.0]], np.float32), num_samples=3)
    assert observer.compute_range() == (-2.0, 3.0)
    # A sample with no finite value does not move the average.
    observer.update(np.array([[np.nan, np.inf], [-4.0, 7.0]], np.float32), num_samples=2)
    assert observer.compute_range() == (-3.0, 5.0)


# -- histogram ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bins", [8, 64, 4096])
def test_histogram_counts_equal_one_shot_histogram_after_doubling(num_bins: int) -> None:
    g = _gaussian(20_000, seed=1)
    # Growing scales force many doublings, one of them by more than num_bins/2 at once.
    batches = [g[:5000] * 1e-3, g[5000:10000], g[10000:15000] * 3.0, g[15000:] * 5e4]
    observer = PercentileObserver(num_bins=num_bins)
    _observe(observer, *batches)
    counts, edges = observer.histogram()
    data = np.concatenate(batches)
    largest = float(np.abs(data).max())
    r = edges[-1]
    assert edges[0] == -r and r > largest >= r / 2  # smallest power of two above max|x|
    assert math.log2(r).is_integer()
    reference, _ = np.histogram(data.astype(np.float64), bins=edges)
    np.testing.assert_array_equal(counts, reference)
    one_shot = PercentileObserver(num_bins=num_bins)
    one_shot.update(data)
    np.testing.assert_array_equal(one_shot.histogram()[0], counts)
    assert counts.sum() == data.size


def test_histogram_handles_float32_extremes() -> None:
    data = np.array([1e-45, -3e38, 1e-40, 2.5e38, -1e-20, 0.0], np.float32)
    observer = PercentileObserver(100.0)
    observer.update(data[:3])
    observer.update(data[3:])
    assert observer.compute_range() == (float(data.min()), float(data.max()))
    counts, edges = observer.histogram()
    np.testing.assert_array_equal(counts, np.histogram(data.astype(np.float64), bins=edges)[0])


@pytest.mark.parametrize("largest", [3.0, 1e-30, 1e6])
def test_histogram_bins_are_exact_for_subnormal_and_tiny_values(largest: float) -> None:
    """Bin numbers are computed in float32 when the scale factor is at least 1 (largest below
    num_bins / 2 bin widths' worth of range), in float64 otherwise: a negative subnormal must still
    land left of zero, and every count must equal numpy's float64 histogram."""
    tiny = np.array([-1e-45, 1e-45, -1e-40, 1e-40, -1e-38, 0.0, -0.0], np.float32)
    rng = np.random.default_rng(4)
    bulk = (rng.standard_normal(10_000) * largest / 4).astype(np.float32)
    data = np.concatenate([tiny, bulk, np.array([largest, -largest / 2], np.float32)])
    observer = PercentileObserver(num_bins=4096)
    observer.update(data)
    counts, edges = observer.histogram()
    np.testing.assert_array_equal(counts, np.histogram(data.astype(np.float64), bins=edges)[0])
    assert counts[: 4096 // 2].sum() == int(np.count_nonzero(data < 0))


def test_histogram_zeros_before_first_nonzero_value_land_in_zero_bin() -> None:
    observer = PercentileObserver(num_bins=64)
    observer.update(np.zeros(10, np.float32))
    counts, edges = observer.histogram()  # only zeros so far: nominal R = 1
    assert counts[32] == 10 and counts.sum() == 10 and edges[-1] == 1.0
    observer.update(np.array([0.001, -0.002], np.float32))
    counts, edges = observer.histogram()
    assert edges[-1] == 2.0**-8
    assert counts[32] == 10 and counts.sum() == 12


# -- min-max ------------------------------------------------------------------------------------------


def test_minmax_matches_numpy() -> None:
    data = _gaussian(10_000).reshape(10, 1000)
    observer = _observe(MinMaxObserver(), *data)
    assert observer.compute_range() == (float(data.min()), float(data.max()))


# -- percentile ---------------------------------------------------------------------------------------


def _gaussian_with_outliers() -> F32:
    outliers = np.array([50.0, -60.0, 75.0, 100.0, -80.0], np.float32)
    return np.concatenate([_gaussian(200_000, seed=3), outliers])


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99, 99.995])
def test_percentile_matches_numpy_within_one_bin(percentile: float) -> None:
    data = _gaussian_with_outliers()
    observer = PercentileObserver(percentile)
    lo, hi = _range(observer, data)
    width = observer.bin_width
    assert abs(hi - np.percentile(data, percentile)) <= width
    assert abs(lo - np.percentile(data, 100.0 - percentile)) <= width
    assert -6.0 < lo < 0.0 < hi < 6.0  # the outliers are clipped

    symmetric = PercentileObserver(percentile, symmetric=True)
    lo_s, hi_s = _range(symmetric, data)
    assert lo_s == -hi_s
    assert abs(hi_s - np.percentile(np.abs(data), percentile)) <= symmetric.bin_width


def test_percentile_with_few_samples_and_coarse_bins() -> None:
    data = np.array([-7.0, 0.25, 1.0, 1.5, 3.0, 64.0], np.float32)
    for percentile in (60.0, 75.0, 90.0):
        observer = PercentileObserver(percentile, num_bins=8)
        lo, hi = _range(observer, data)
        assert abs(hi - np.percentile(data, percentile)) <= observer.bin_width
        assert abs(lo - np.percentile(data, 100.0 - percentile)) <= observer.bin_width
        assert -7.0 <= lo <= hi <= 64.0


def test_percentile_100_is_minmax() -> None:
    data = _gaussian_with_outliers()
    assert _range(PercentileObserver(100.0), data) == (-80.0, 100.0)
    assert _range(PercentileObserver(100.0, symmetric=True), data) == (-100.0, 100.0)


# -- entropy ------------------------------------------------------------------------------------------


def _reference_kl(hist: npt.NDArray[np.int64], levels: int, keep: int) -> float:
    """KL(P||Q) of one threshold, built bin by bin as the algorithm describes it."""
    h = hist.astype(np.float64)
    total = h.sum()
    p = h[:keep].copy()
    p[-1] += h[keep:].sum()
    p /= total
    kept = h[:keep]
    q = np.zeros(keep)
    for group in range(levels):
        a, b = group * keep // levels, (group + 1) * keep // levels
        nonzero = kept[a:b] > 0
        if nonzero.any():
            q[a:b][nonzero] = kept[a:b].sum() / nonzero.sum()
    q /= kept.sum()
    q[(q == 0) & (p > 0)] = 0.5 / kept.sum()
    used = p > 0
    return float(np.sum(p[used] * np.log(p[used] / q[used])))


def test_entropy_candidates_match_direct_computation() -> None:
    rng = np.random.default_rng(5)
    hist = rng.poisson(40.0 * np.exp(-np.arange(300) / 60.0)).astype(np.int64)
    hist[100:110] = 0  # empty kept bins, and candidates whose last kept bin is empty
    hist[250:298] = 0
    hist[-1] = 3
    candidates, kl = _entropy_candidates(hist, levels=32)
    assert candidates[0] == 32 and candidates[-1] == 300
    expected = [_reference_kl(hist, 32, int(i)) for i in candidates]
    np.testing.assert_allclose(kl, expected, rtol=1e-9, atol=1e-12)


def test_entropy_candidates_are_strided() -> None:
    hist = np.ones(2048, np.int64)
    candidates, kl = _entropy_candidates(hist, levels=128)
    assert candidates.size <= 513 and candidates[0] == 128 and candidates[-1] == 2048
    assert np.all(np.isfinite(kl))


def test_entropy_clips_heavy_tail_but_not_the_bulk() -> None:
    data = np.random.default_rng(2).standard_t(3, size=200_000).astype(np.float32)
    largest = float(np.abs(data).max())
    lo, hi = _range(EntropyObserver("uint8"), data)
    assert lo == -hi  # threshold on |x|, both ends beyond it
    assert np.percentile(np.abs(data), 99.9) < hi < 0.5 * largest

    lo, hi = _range(EntropyObserver("int8", symmetric=True), _gaussian_with_outliers())
    assert lo == -hi and 3.0 < hi < 10.0


@pytest.mark.parametrize(("dtype", "symmetric"), [("uint8", False), ("int8", False), ("int8", True)])
def test_entropy_keeps_nearly_all_of_uniform_data(dtype: str, symmetric: bool) -> None:
    data = np.random.default_rng(4).uniform(-1.0, 1.0, 200_000).astype(np.float32)
    lo, hi = _range(EntropyObserver(dtype, symmetric=symmetric), data)
    assert lo <= -0.95 and hi >= 0.95


def test_entropy_non_negative_data() -> None:
    uniform = np.random.default_rng(6).uniform(0.5, 1.0, 200_000).astype(np.float32)
    lo, hi = _range(EntropyObserver("uint8"), uniform)
    assert lo == 0.0 and 0.95 <= hi <= float(uniform.max())
    # ReLU output: half exact zeros, which must not drag the threshold down into the bulk.
    relu = np.maximum(_gaussian(200_000, seed=8), 0.0)
    lo, hi = _range(EntropyObserver("uint8"), relu)
    assert lo == 0.0 and 3.0 < hi <= float(relu.max())


def test_entropy_does_not_clip_the_bulk_of_data_far_from_zero() -> None:
    """One value below a bulk far from zero (a GlobalAveragePool's output): the threshold just above it
    folds the rest into one spike of P that Q matches as well (KL 0). Such thresholds are not candidates."""
    rng = np.random.default_rng(0)
    for bulk in (rng.uniform(0.45, 1.35, 4095), np.clip(rng.normal(0.82, 0.15, 4095), 0.41, 1.36)):
        data = np.concatenate([[0.4039], bulk]).astype(np.float32)
        lo, hi = _range(EntropyObserver("uint8"), data)
        assert lo == 0.0 and np.mean(data > hi) <= 1.0 - ENTROPY_MIN_KEPT  # measured before: 0.404


# -- mse ----------------------------------------------------------------------------------------------


def _true_mse(data: F32, lo: float, hi: float, dtype: str, symmetric: bool) -> float:
    params = compute_qparams(lo, hi, dtype, symmetric)
    q = quantize(data, params)
    if symmetric:  # qmath saturates to the full dtype; a symmetric grid stops at ±127
        q = np.maximum(q, -127).astype(q.dtype)
    restored = dequantize(q, params)
    return float(np.mean((restored.astype(np.float64) - data) ** 2))


@pytest.mark.parametrize(("dtype", "symmetric"), [("uint8", False), ("int8", True)])
def test_mse_range_is_near_optimal_on_raw_data(dtype: str, symmetric: bool) -> None:
    data = np.random.default_rng(9).standard_t(3, size=100_000).astype(np.float32)
    lo, hi = _range(MSEObserver(dtype, symmetric=symmetric), data)
    rmin, rmax = float(data.min()), float(data.max())
    assert rmin < lo < 0.0 < hi < rmax
    assert hi - lo < 0.9 * (rmax - rmin)
    chosen = _true_mse(data, lo, hi, dtype, symmetric)
    candidates = [_true_mse(data, a * rmin, a * rmax, dtype, symmetric) for a in np.linspace(0.05, 1, 100)]
    assert chosen <= 1.05 * min(candidates)
    assert chosen < 0.9 * _true_mse(data, rmin, rmax, dtype, symmetric)


def test_mse_keeps_nearly_all_of_uniform_data() -> None:
    data = np.random.default_rng(10).uniform(-2.0, 3.0, 200_000).astype(np.float32)
    lo, hi = _range(MSEObserver("uint8"), data)
    assert -2.0 <= lo <= -1.9 and 2.85 <= hi <= 3.0


def test_mse_non_negative_range_stays_inside_observed_range() -> None:
    data = np.random.default_rng(11).uniform(1.0, 2.0, 10_000).astype(np.float32)
    lo, hi = _range(MSEObserver("uint8"), data)
    assert float(data.min()) <= lo < hi <= float(data.max())


# -- non-finite, empty and degenerate input -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_non_finite_values_are_ignored(name: str) -> None:
    data = _gaussian(4000, seed=12).reshape(40, 100)
    dirty = data.copy()
    dirty[3, 5], dirty[17, 0], dirty[25, 99] = np.nan, np.inf, -np.inf
    clean = FACTORIES[name]()
    noisy = FACTORIES[name]()
    for row, dirty_row in zip(data, dirty, strict=True):
        finite = np.isfinite(dirty_row)
        clean.update(row[finite])
        noisy.update(dirty_row)
    noisy.update(np.array([np.nan, np.inf], np.float32))
    assert noisy.compute_range() == clean.compute_range()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_empty_observer_raises(name: str) -> None:
    observer = FACTORIES[name]()
    assert observer.empty
    with pytest.raises(ValueError, match="no finite value"):
        observer.compute_range()
    observer.update(np.array([np.nan, -np.inf], np.float32))
    observer.update(np.zeros((0, 4), np.float32))
    assert observer.empty
    with pytest.raises(ValueError, match="no finite value"):
        observer.compute_range()
    observer.update(np.array([1.0], np.float32))
    assert not observer.empty


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_all_zero_data_gives_zero_range(name: str) -> None:
    observer = FACTORIES[name]()
    observer.update(np.zeros((2, 8), np.float32), num_samples=2)
    observer.update(-np.zeros(3, np.float32))
    assert not observer.empty
    lo, hi = observer.compute_range()
    assert (lo, hi) == (0.0, 0.0)
    assert math.copysign(1.0, lo) == 1.0  # never -0.0


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_constant_data_gives_valid_range(name: str) -> None:
    lo, hi = _range(FACTORIES[name](), np.full(100, 3.0, np.float32))
    assert lo <= hi and hi == pytest.approx(3.0, rel=1e-2)


def test_float64_and_float16_input_is_read_as_float32() -> None:
    data = _gaussian(1000)
    ref = _range(EntropyObserver(), data)
    assert _range(EntropyObserver(), data.astype(np.float64)) == ref
    assert _range(MinMaxObserver(), data.astype(np.float16)) == _range(
        MinMaxObserver(), data.astype(np.float16).astype(np.float32)
    )


# -- construction -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "cls"),
    [
        ("minmax", MinMaxObserver),
        ("moving_average", MovingAverageMinMaxObserver),
        ("percentile", PercentileObserver),
        ("entropy", EntropyObserver),
        ("mse", MSEObserver),
    ],
)
def test_make_observer_picks_class(method: str, cls: type[Observer]) -> None:
    config = CalibrationConfig(method=method, percentile=99.5, num_bins=256, averaging_constant=0.25)  # type: ignore[arg-type]
    observer = make_observer(config, dtype="int8", symmetric=True)
    assert type(observer) is cls
    if isinstance(observer, HistogramObserver):
        assert observer.num_bins == 256
    if isinstance(observer, PercentileObserver):
        assert observer.percentile == 99.5 and observer.symmetric
    if isinstance(observer, (EntropyObserver, MSEObserver)):
        assert observer.dtype == "int8" and observer.symmetric
    if isinstance(observer, MovingAverageMinMaxObserver):
        assert observer.averaging_constant == 0.25


def test_make_observer_rejects_bad_scheme() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        make_observer(CalibrationConfig(method="entropy"), dtype="uint8", symmetric=True)
    with pytest.raises(ValueError, match="dtype"):
        make_observer(CalibrationConfig(), dtype="int4", symmetric=False)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PercentileObserver(num_bins=100),
        lambda: MSEObserver(num_bins=4),
        lambda: PercentileObserver(percentile=40.0),
        lambda: MovingAverageMinMaxObserver(0.0),
        lambda: EntropyObserver("uint8", symmetric=True),
        lambda: MSEObserver("float8"),
    ],
)
def test_invalid_arguments_raise(build: Callable[[], Observer]) -> None:
    with pytest.raises(ValueError):
        build()


def test_num_samples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        MinMaxObserver().update(np.ones(3, np.float32), num_samples=0)
