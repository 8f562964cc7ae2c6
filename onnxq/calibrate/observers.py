"""Observers: turn a stream of activation batches into one calibrated float range per tensor.

An observer sees one tensor's values batch by batch (:meth:`Observer.update`) and finally answers
:meth:`Observer.compute_range`. Two properties hold for every observer here:

* **Bounded memory.** The state is a few scalars or one fixed-size histogram; it never grows with the
  number of calibration samples (ONNX Runtime's calibrator keeps every activation and runs out of memory
  on large models).
* **Batch invariance.** Feeding the same samples in the same order, split into batches differently,
  gives the same range bit for bit. Min-max is trivially invariant; the moving average is made
  invariant by stepping its average once per *sample*; the histogram methods are made invariant by
  binning on power-of-two ranges, where every bin edge and every bin index is computed exactly, so
  that growing the range merges bins without any re-binning error (see :class:`HistogramObserver`).

Non-finite values (nan, ±inf) are ignored everywhere: one overflowing sample must not turn a whole
tensor's range into inf. Values are read as float32, the activation type being calibrated.
"""

from __future__ import annotations

import abc
import logging
import math

import numpy as np
import numpy.typing as npt

from onnxq.config import CalibrationConfig
from onnxq.qmath import compute_qparams, qrange

__all__ = [
    "AutoObserver",
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Elements binned per step: bounds the float64/int64 temporaries of one huge batch to ~16 MB each.
_CHUNK = 1 << 21
# The entropy search evaluates at most this many thresholds (on a stride), which keeps it ~1 ms.
_MAX_ENTROPY_CANDIDATES = 512
# The MSE search scales the observed range by these factors.
_MSE_SCALES = np.linspace(0.05, 1.0, 100)


def _as_float32(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The values as float32: float16/bfloat16 widen exactly, float64 rounds to what ONNX would store."""
    arr = np.asarray(x)
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


#: A calibrated range this wide may be a sentinel, not data: attention masks of float32's minimum or
#: ``-1e9`` standing for ``-inf``, overflowed sums. Activations of real networks stay far below it
#: (float16's limit is 65504).
EXTREME_RANGE = 1e8

#: How far below :data:`EXTREME_RANGE` the other values of a tensor must stay for its extreme values
#: to count as sentinels (:attr:`Observer.sentinel`).
SENTINEL_GAP = 1e3


def _finite(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The finite values of a flat array (no copy when all are finite, the common case)."""
    mask = np.isfinite(values)
    return values if mask.all() else values[mask]


def _finite_min_max(values: npt.NDArray[np.float32]) -> tuple[float, float, bool] | None:
    """Minimum and maximum of the finite values of a flat array, and whether it holds an infinity.

    ``None`` when there is no finite value.
    Two reductions in the common all-finite case (a NaN or infinity shows in one of them), the
    masked copy only when one appears.
    """
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi, False
    infinite = bool(np.isinf(values).any())
    finite = _finite(values)
    return (float(finite.min()), float(finite.max()), infinite) if finite.size else None


def _canonical(value: float) -> float:
    """``-0.0`` becomes ``0.0``: which zero a reduction returns depends on element order, a range must not."""
    return value + 0.0


def _check_dtype(dtype: str, symmetric: bool) -> None:
    if dtype not in ("uint8", "int8"):
        raise ValueError(f"dtype must be 'uint8' or 'int8', got {dtype!r}")
    if symmetric and dtype == "uint8":
        raise ValueError("symmetric ranges need dtype 'int8' (uint8 is always affine)")


class Observer(abc.ABC):
    """Accumulates statistics of one tensor over calibration batches and returns its float range.

    Subclasses implement :meth:`_update` (called with float32 data) and :meth:`_compute_range` (called
    only once a finite value was seen); the public methods hold the argument checks shared by all.
    """

    def __init__(self) -> None:
        self._empty = True
        self.infinite = False
        # The extremes seen (or their moving averages): every subclass keeps them up to date.
        self._min = math.inf
        self._max = -math.inf
        #: Largest magnitude seen among values below :data:`EXTREME_RANGE` once the range reached it
        #: (tracked only then: it tells a sentinel from a tensor that is large all over).
        self.bulk_absmax = 0.0

    @property
    def empty(self) -> bool:
        """True until a finite value was seen: there is no range to report yet."""
        return self._empty

    def _note_infinities(self, values: npt.NDArray[np.float32], finite: npt.NDArray[np.bool_]) -> None:
        """Record whether ``values`` (where ``finite`` is not all true) held an infinity.

        The range ignores infinities, but a tensor that holds one (``Log(0)``, a ``-inf`` attention
        mask) cannot be quantized with any finite range: clamping ``-inf`` to the range's minimum
        changes what the model computes. Calibration reports such tensors (:attr:`infinite`).
        """
        if not self.infinite:
            self.infinite = bool(np.isinf(values[~finite]).any())

    def update(self, x: npt.ArrayLike, num_samples: int = 1) -> None:
        """Observe one batch ``x`` of the tensor, holding ``num_samples`` calibration samples.

        When the batch axis is 0, ``x.shape[0] == num_samples``; observers whose statistic depends on
        sample boundaries (the moving average) use that to stay independent of the batching.
        Non-finite values are ignored.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        array = _as_float32(x)
        self._update(array, num_samples)
        self._note_bulk(array)

    def _note_bulk(self, x: npt.NDArray[np.float32]) -> None:
        """Track :attr:`bulk_absmax`: one masked pass, only for batches of a tensor in sentinel range."""
        seen = max(-self._min, self._max)
        if not seen >= EXTREME_RANGE:
            self.bulk_absmax = max(self.bulk_absmax, seen) if math.isfinite(seen) else self.bulk_absmax
            return
        magnitude = np.abs(x.reshape(-1))
        below = magnitude[magnitude < EXTREME_RANGE]
        if below.size:
            self.bulk_absmax = max(self.bulk_absmax, float(below.max()))

    @property
    def sentinel(self) -> bool:
        """The range reaches :data:`EXTREME_RANGE` through a few sentinel values, not real data.

        An attention mask of ``-1e9`` or float32's minimum added to scores within ±30: the values
        below the threshold stay :data:`SENTINEL_GAP` times smaller than it, and an int8 grid over
        the whole range would hold nothing else. A tensor that is large all over (a network with
        exploding activations, or synthetic constant-fill weights) has values near the threshold
        too and is quantized with its range like any other.
        """
        if self._empty:
            return False
        lo, hi = self._compute_range()
        return max(-lo, hi) >= EXTREME_RANGE and self.bulk_absmax < EXTREME_RANGE / SENTINEL_GAP

    def compute_range(self) -> tuple[float, float]:
        """The calibrated ``(rmin, rmax)``; raises ValueError if no finite value was ever observed."""
        if self._empty:
            raise ValueError(f"{type(self).__name__} has observed no finite value; there is no range")
        lo, hi = self._compute_range()
        return _canonical(float(lo)), _canonical(float(hi))

    @abc.abstractmethod
    def _update(self, x: npt.NDArray[np.float32], num_samples: int) -> None:
        """Fold one float32 batch into the state."""

    @abc.abstractmethod
    def _compute_range(self) -> tuple[float, float]:
        """The range from a non-empty state."""


class MinMaxObserver(Observer):
    """Running minimum and maximum of all finite values: never clips, so outliers set the scale."""

    def __init__(self) -> None:
        super().__init__()
        self._min = math.inf
        self._max = -math.inf

    def _update(self, x: npt.NDArray[np.float32], num_samples: int) -> None:
        flat = x.reshape(-1)
        found = _finite_min_max(flat)
        if found is None:
            self.infinite = self.infinite or bool(np.isinf(flat).any())
            return
        self.infinite = self.infinite or found[2]
        self._min = min(self._min, found[0])
        self._max = max(self._max, found[1])
        self._empty = False

    def _compute_range(self) -> tuple[float, float]:
        return self._min, self._max


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-sample minima and maxima, damping rare extreme samples.

    ``new = old + c * (sample_stat - old)``; the first sample initialises the average. The average is
    stepped once per calibration sample, not once per batch: when ``num_samples > 1`` and
    ``x.shape[0] == num_samples`` the batch is split along axis 0 (one vectorised reduction gives every
    sample's min/max, then a cheap scalar loop steps the average). So batching the same samples
    differently gives the identical result. Any other batch counts as one sample.
    """

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)
        self._min = 0.0
        self._max = 0.0

    def _update(self, x: npt.NDArray[np.float32], num_samples: int) -> None:
        if num_samples > 1 and x.ndim >= 1 and x.shape[0] == num_samples:
            rows = x.reshape(num_samples, -1)
        else:
            if num_samples > 1:
                logger.debug(
                    "batch of shape %s does not hold %d samples on axis 0; averaging it as one sample",
                    x.shape,
                    num_samples,
                )
            rows = x.reshape(1, -1)
        if rows.shape[1] == 0:
            return
        finite = np.isfinite(rows)
        if finite.all():
            mins, maxs = rows.min(axis=1), rows.max(axis=1)
        else:
            self._note_infinities(rows, finite)
            keep = finite.any(axis=1)
            mins = np.where(finite, rows, np.inf).min(axis=1)[keep]
            maxs = np.where(finite, rows, -np.inf).max(axis=1)[keep]
        c = self.averaging_constant
        for lo, hi in zip(mins.tolist(), maxs.tolist(), strict=True):
            if self._empty:
                self._min, self._max = lo, hi
                self._empty = False
            else:
                self._min += c * (lo - self._min)
                self._max += c * (hi - self._max)

    def _compute_range(self) -> tuple[float, float]:
        return self._min, self._max


class HistogramObserver(Observer):
    """Shared state of the histogram methods: a fixed-size, exactly mergeable histogram plus min/max.

    The histogram has ``num_bins`` (a power of two) int64 counts over ``[-R, R)`` with ``R = 2**k``,
    the smallest power of two *strictly* above the largest magnitude seen (strictly, so that no value
    sits on the closed upper edge and needs clamping into the last bin, which would not merge exactly).
    The bin width ``2R / num_bins`` is a power of two, so a value's bin ``floor(x / width) + num_bins/2``
    is computed exactly (in float64, where no float32 value underflows). When a batch exceeds ``R``,
    ``R`` doubles as often as needed and aligned bin pairs merge; because ``floor(floor(x/w)/2) ==
    floor(x/2w)``, the counts always equal those of a one-shot histogram at the final ``R``, however
    the data was batched. ``R`` itself depends only on the overall largest magnitude.

    Until a non-zero value arrives there is no scale to pick ``R`` from; zeros seen before that are
    only counted and put into the zero bin when ``R`` is first set, so leading all-zero batches do not
    pin ``R`` to an arbitrary value. Exact zeros are counted separately as well: zero is exactly
    representable on every quantization grid, so the entropy and MSE searches leave them out (a ReLU
    output's spike of zeros would otherwise dominate the KL divergence of the first bin).

    Subclasses turn ``(counts, bin width, exact min, exact max)`` into a range.
    """

    def __init__(self, num_bins: int = 4096) -> None:
        super().__init__()
        if num_bins < 8 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 8, got {num_bins}")
        self.num_bins = int(num_bins)
        self._log2_bins = self.num_bins.bit_length() - 1
        self._half = self.num_bins // 2
        self._counts: IntArray = np.zeros(self.num_bins, dtype=np.int64)
        self._exp: int | None = None  # R = 2**_exp once a non-zero value was seen
        self._zeros = 0  # exact zeros seen (also counted in the zero bin once R is set)
        self._min = math.inf
        self._max = -math.inf

    # -- state ---------------------------------------------------------------------------------------

    @property
    def bin_width(self) -> float:
        """Width of one bin (a power of two); 2/num_bins while only zeros were seen."""
        exp = 0 if self._exp is None else self._exp
        return math.ldexp(1.0, exp + 1 - self._log2_bins)

    def histogram(self) -> tuple[IntArray, FloatArray]:
        """A copy of the counts and the ``num_bins + 1`` bin edges (``np.histogram``'s convention).

        While only zeros were seen the edges are those of ``R = 1``.
        """
        if self._empty:
            raise ValueError(f"{type(self).__name__} has observed no finite value; there is no histogram")
        counts = self._counts.copy()
        if self._exp is None:
            counts[self._half] = self._zeros
        edges = (np.arange(self.num_bins + 1, dtype=np.float64) - self._half) * self.bin_width
        return counts, edges

    # -- update --------------------------------------------------------------------------------------

    def _update(self, x: npt.NDArray[np.float32], num_samples: int) -> None:
        flat = x.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            if chunk.size == 0:
                continue
            # min/max propagate NaN and show an infinity: finite extremes mean an all-finite chunk.
            lo, hi = float(chunk.min()), float(chunk.max())
            if math.isfinite(lo) and math.isfinite(hi):
                self._add(chunk, lo, hi)
                continue
            finite = np.isfinite(chunk)
            self._note_infinities(chunk, finite)
            values = chunk[finite]
            if values.size:
                self._add(values, float(values.min()), float(values.max()))

    def _add(self, values: npt.NDArray[np.float32], lo: float, hi: float) -> None:
        """Count finite ``values`` whose minimum and maximum are ``lo`` and ``hi``."""
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        self._empty = False
        largest = max(-lo, hi)
        if largest == 0.0:
            self._zeros += values.size
            if self._exp is not None:
                self._counts[self._half] += values.size
            return
        # frexp: largest = m * 2**e with 0.5 <= m < 1, so 2**e is the smallest power of two above it.
        exp = math.frexp(largest)[1]
        if self._exp is None:
            self._exp = exp
            self._counts[self._half] += self._zeros
        elif exp > self._exp:
            self._grow(exp)
        shift = self._log2_bins - 1 - self._exp  # x * 2**shift: x in bin widths, |x| < num_bins / 2
        # A power-of-two factor of at least 1 is exact in float32 too (nothing underflows): four
        # float32 passes instead of five float64 ones. A smaller one (|x| beyond num_bins / 2) could
        # flush a tiny negative value to -0.0, whose bin is wrong: that case stays in float64.
        in_float32 = shift >= 0 and self.num_bins <= 1 << 24  # bin numbers exact in float32
        scaled = values * np.float32(math.ldexp(1.0, shift)) if in_float32 else values.astype(np.float64)
        if not in_float32:
            scaled *= math.ldexp(1.0, shift)
        np.floor(scaled, out=scaled)
        scaled += self._half  # an integer of magnitude below num_bins / 2, plus num_bins / 2: exact
        self._counts += np.bincount(scaled.astype(np.intp), minlength=self.num_bins)
        if lo <= 0.0 <= hi:
            self._zeros += int(np.count_nonzero(values == 0.0))

    def _grow(self, exp: int) -> None:
        """Widen to ``R = 2**exp`` by merging aligned groups of ``2**(exp - old)`` bins (exact)."""
        assert self._exp is not None
        # Beyond a factor num_bins/2 every negative bin lands in bin half-1 and every other in bin half.
        factor = 1 << min(exp - self._exp, self._log2_bins - 1)
        merged = self._counts.reshape(-1, factor).sum(axis=1)
        counts = np.zeros_like(self._counts)
        start = self._half - merged.size // 2
        counts[start : start + merged.size] = merged
        self._counts = counts
        self._exp = exp

    # -- helpers for the subclasses -------------------------------------------------------------------

    @property
    def _largest(self) -> float:
        return max(-self._min, self._max)

    def _nonzero_counts(self) -> IntArray:
        """The counts without the exact zeros (which every quantization grid represents exactly)."""
        counts = self._counts.copy()
        counts[self._half] -= self._zeros
        return counts

    def _magnitude_histogram(self, counts: IntArray) -> IntArray:
        """Counts of ``|x|`` in ``num_bins/2`` bins of the same width, starting at 0."""
        return counts[self._half :] + counts[self._half - 1 :: -1]


def _order_statistics(counts: IntArray, origin: float, width: float, ranks: IntArray) -> FloatArray:
    """Estimate the values of given 0-based order statistics from a histogram.

    The ``k``-th smallest value lies in the first bin whose cumulative count exceeds ``k``; the values
    in a bin are taken as evenly spread, so the estimate is within one bin width of the truth.
    """
    cdf = np.cumsum(counts)
    bins = np.searchsorted(cdf, ranks + 1, side="left")
    before = cdf[bins] - counts[bins]
    frac = (ranks - before + 0.5) / counts[bins]
    return origin + (bins + frac) * width


class PercentileObserver(HistogramObserver):
    """Clip the range at a percentile of the observed values, cutting off rare outliers.

    Asymmetric: ``(value at the (100-p)-th percentile, value at the p-th percentile)``, clamped to the
    true ``[min, max]``. Symmetric: ``(-t, t)`` with ``t`` the p-th percentile of ``|x|``. Percentiles
    follow ``np.percentile``'s linear interpolation between order statistics, each estimated inside its
    histogram bin, so the result is within one bin width of ``np.percentile`` on all the data; the
    extreme order statistics are the exact min/max (``p = 100`` reproduces min-max).
    """

    def __init__(self, percentile: float = 99.999, symmetric: bool = False, num_bins: int = 4096) -> None:
        super().__init__(num_bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)
        self.symmetric = bool(symmetric)

    def _compute_range(self) -> tuple[float, float]:
        if self._exp is None:
            return 0.0, 0.0
        counts = self._counts
        width = self.bin_width
        if self.symmetric:
            magnitudes = self._magnitude_histogram(self._counts)
            t = self._percentile(magnitudes, 0.0, width, self.percentile, None, self._largest)
            t = min(max(t, 0.0), self._largest)
            return -t, t
        origin = -self._half * width
        lo = self._percentile(counts, origin, width, 100.0 - self.percentile, self._min, self._max)
        hi = self._percentile(counts, origin, width, self.percentile, self._min, self._max)
        return min(max(lo, self._min), self._max), min(max(hi, self._min), self._max)

    @staticmethod
    def _percentile(
        counts: IntArray, origin: float, width: float, q: float, first: float | None, last: float
    ) -> float:
        """``np.percentile``-style percentile ``q`` from a histogram; exact ``first``/``last`` values."""
        n = int(counts.sum())
        rank = q / 100.0 * (n - 1)
        k0 = math.floor(rank)
        k1 = min(k0 + 1, n - 1)
        v0, v1 = _order_statistics(counts, origin, width, np.array([k0, k1], dtype=np.int64)).tolist()
        exact = {n - 1: last} if first is None else {0: first, n - 1: last}
        v0, v1 = exact.get(k0, v0), exact.get(k1, v1)
        return float(v0 + (rank - k0) * (v1 - v0))


def _entropy_candidates(hist: IntArray, levels: int) -> tuple[IntArray, FloatArray]:
    """KL divergence of every candidate threshold (TensorRT's entropy calibration), vectorised.

    ``hist`` are counts over ``[0, len(hist) * w)`` whose last bin is non-empty. A candidate ``i`` keeps
    bins ``[0, i)``: the reference ``P`` is those bins with all outliers (bins ``>= i``) added to the
    last; the candidate ``Q`` quantizes the kept bins (without outliers) into ``levels`` equal groups
    and spreads each group's mass evenly over its non-empty bins. A bin where ``Q`` is empty but ``P``
    is not gets half a count of ``Q`` mass (additive smoothing). Returns the candidates and
    ``KL(P || Q)`` for each (inf where the kept bins are empty).

    Per candidate the sum over bins collapses to a sum over groups: with ``H`` the counts, ``N`` their
    total, ``S`` the kept total, a group of mass ``m`` over ``z`` non-empty bins contributes
    ``sum(H log H) - m log m + m log z``, and ``KL = (sum of groups + S log(S/N)) / N`` plus a correction
    for the outlier-laden last bin. Prefix sums make that ``O(levels)`` per candidate, so about 500
    candidates cost ~1 ms instead of ~500 passes over the histogram.
    """
    length = hist.size
    counts = hist.astype(np.float64)
    total = float(counts.sum())
    cum = np.concatenate(([0.0], np.cumsum(counts)))
    cum_nonzero = np.concatenate(([0], np.cumsum(hist > 0)))
    safe = np.where(counts > 0, counts, 1.0)
    cum_hlogh = np.concatenate(([0.0], np.cumsum(counts * np.log(safe))))

    stride = max(1, -(-(length - levels + 1) // _MAX_ENTROPY_CANDIDATES))
    candidates = np.arange(levels, length + 1, stride, dtype=np.int64)
    if candidates[-1] != length:
        candidates = np.append(candidates, length)

    bounds = candidates[:, None] * np.arange(levels + 1, dtype=np.int64)[None, :] // levels
    mass = np.diff(cum[bounds], axis=1)
    nonzero = np.diff(cum_nonzero[bounds], axis=1).astype(np.float64)
    hlogh = np.diff(cum_hlogh[bounds], axis=1)
    groups = hlogh - mass * np.log(np.where(mass > 0, mass, 1.0)) + mass * np.log(np.maximum(nonzero, 1.0))

    kept = cum[candidates]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (groups.sum(axis=1) + kept * (np.log(kept) - math.log(total))) / total
        # The last kept bin also carries the outliers in P; Q there is its group's spread mass.
        last = counts[candidates - 1]
        outliers = total - kept
        q_last = np.where(last > 0, mass[:, -1] / (nonzero[:, -1] * kept), 0.5 / kept)
        p_old = last / total
        p_new = (last + outliers) / total
        old_term = np.where(last > 0, p_old * np.log(p_old / q_last), 0.0)
        new_term = np.where(p_new > 0, p_new * np.log(p_new / q_last), 0.0)
        kl = np.where(outliers > 0, kl - old_term + new_term, kl)
    kl = np.where(kept > 0, kl, np.inf)
    return candidates, kl


#: The entropy threshold keeps at least this share of the (non-zero) values. KL divergence against the
#: clipped histogram is degenerate for data far from zero: for a GlobalAveragePool's output in
#: [0.40, 1.35], a threshold just above the minimum folds 99.95 % of the values into one spike that
#: the quantized form matches as well, and torchvision's R3D-18 fell from 30 to 5.5 dB output SQNR.
#: Tail clipping that pays stays well below 1 % of the values.
ENTROPY_MIN_KEPT = 0.99


class EntropyObserver(HistogramObserver):
    """Choose the threshold that minimises the KL divergence between the data and its quantized form.

    TensorRT's entropy calibration: it trades clipping of a sparse tail against resolution for the
    bulk, which suits activations with long tails. Non-negative data (min >= 0) searches a threshold
    ``T`` on the positive histogram with 255 levels (127 for symmetric int8) and returns ``(0, T)``.
    Data with negatives searches ``T`` on the ``|x|`` histogram with 127 levels (symmetric int8) or 128
    (asymmetric: roughly half of the 256 codes on each side of zero) and returns
    ``(max(min, -T), min(max, T))``, or ``(-T, T)`` when symmetric. At most ~512 thresholds are tried,
    on a stride over the bins, each keeping at least :data:`ENTROPY_MIN_KEPT` of the values. Exact
    zeros are left out of the histogram searched: they quantize without error, and a ReLU's spike of
    zeros would otherwise make the first quantization group look badly flattened and push the
    threshold far down.
    """

    def __init__(self, dtype: str = "uint8", symmetric: bool = False, num_bins: int = 4096) -> None:
        super().__init__(num_bins)
        _check_dtype(dtype, symmetric)
        self.dtype = dtype
        self.symmetric = bool(symmetric)

    def _compute_range(self) -> tuple[float, float]:
        if self._exp is None:
            return 0.0, 0.0
        counts = self._nonzero_counts()
        non_negative = self._min >= 0.0
        if non_negative:
            hist = counts[self._half :]
            levels = 127 if self.symmetric else 255
        else:
            hist = self._magnitude_histogram(counts)
            levels = 127 if self.symmetric else 128
        hist = hist[: int(np.flatnonzero(hist)[-1]) + 1]
        if hist.size <= levels:
            keep = hist.size  # coarser than the quantization grid: nothing to gain from clipping
        else:
            candidates, kl = _entropy_candidates(hist, levels)
            kept = np.cumsum(hist)[candidates - 1]
            kl = np.where(kept >= ENTROPY_MIN_KEPT * float(kept[-1]), kl, np.inf)
            # Ties go to the widest threshold: clip only when it pays.
            keep = int(candidates[candidates.size - 1 - int(np.argmin(kl[::-1]))])
        threshold = min(keep * self.bin_width, self._largest)
        if self.symmetric:
            return -threshold, threshold
        if non_negative:
            return 0.0, threshold
        return max(self._min, -threshold), min(self._max, threshold)


class MSEObserver(HistogramObserver):
    """Choose the clipping range that minimises the expected squared quantization error.

    Candidates scale the zero-including range ``[min(min, 0), max(max, 0)]`` by 100 factors in
    ``[0.05, 1]``. For each, :func:`onnxq.qmath.compute_qparams` gives the step and the representable
    interval; the error over the histogram (bin centres with counts) is the squared distance to the
    interval for values outside it plus ``step**2 / 12`` (uniform rounding error) for each value inside.
    Exact zeros are left out (they quantize without error on every grid). Prefix sums of ``n``,
    ``n*c`` and ``n*c**2`` make every candidate O(log bins). The chosen range is intersected with the
    observed ``[min, max]`` when they overlap (quantization adds zero back anyway).
    """

    def __init__(self, dtype: str = "uint8", symmetric: bool = False, num_bins: int = 4096) -> None:
        super().__init__(num_bins)
        _check_dtype(dtype, symmetric)
        self.dtype = dtype
        self.symmetric = bool(symmetric)

    def _compute_range(self) -> tuple[float, float]:
        if self._exp is None:
            return 0.0, 0.0
        all_counts = self._nonzero_counts()  # exact zeros have no error on any grid
        occupied = np.flatnonzero(all_counts)
        first, last = int(occupied[0]), int(occupied[-1])
        counts = all_counts[first : last + 1].astype(np.float64)
        width = self.bin_width
        centres = (np.arange(first, last + 1, dtype=np.float64) - self._half + 0.5) * width
        centres = np.clip(centres, self._min, self._max)

        lo_all, hi_all = min(self._min, 0.0), max(self._max, 0.0)
        cand_lo, cand_hi = _MSE_SCALES * lo_all, _MSE_SCALES * hi_all
        params = compute_qparams(cand_lo, cand_hi, self.dtype, self.symmetric)
        step = params.scale.astype(np.float64)
        zero_point = params.zero_point.astype(np.float64)
        qmin, qmax = qrange(self.dtype, self.symmetric)
        clip_lo, clip_hi = (qmin - zero_point) * step, (qmax - zero_point) * step

        moments = np.stack([counts, counts * centres, counts * centres * centres])
        prefix = np.concatenate([np.zeros((3, 1)), np.cumsum(moments, axis=1)], axis=1)
        suffix = np.concatenate([np.cumsum(moments[:, ::-1], axis=1)[:, ::-1], np.zeros((3, 1))], axis=1)
        below = np.searchsorted(centres, clip_lo, side="left")  # bins [0, below) clip to clip_lo
        above = np.searchsorted(centres, clip_hi, side="right")  # bins [above, end) clip to clip_hi
        n_lo, s1_lo, s2_lo = prefix[:, below]
        n_hi, s1_hi, s2_hi = suffix[:, above]
        err_lo = np.maximum(s2_lo - 2.0 * clip_lo * s1_lo + clip_lo * clip_lo * n_lo, 0.0)
        err_hi = np.maximum(s2_hi - 2.0 * clip_hi * s1_hi + clip_hi * clip_hi * n_hi, 0.0)
        inside = counts.sum() - n_lo - n_hi
        error = err_lo + err_hi + inside * step * step / 12.0
        # Ties go to the widest range: clip only when it pays.
        best = error.size - 1 - int(np.argmin(error[::-1]))
        lo, hi = float(cand_lo[best]), float(cand_hi[best])
        if max(lo, self._min) <= min(hi, self._max):
            lo, hi = max(lo, self._min), min(hi, self._max)
        return lo, hi


class AutoObserver(HistogramObserver):
    """One histogram, the range of every method of :data:`~onnxq.config.AUTO_METHODS` from it.

    :meth:`candidate_ranges` evaluates the percentile, MSE and entropy searches (and min-max) on the
    same counts, so choosing among them costs one calibration pass; :meth:`merge` adds another
    observer's counts exactly (the two halves of the calibration data, see
    :mod:`onnxq.pipeline.range_choice`). :meth:`compute_range` gives the min-max range.
    """

    def __init__(
        self, dtype: str = "uint8", symmetric: bool = False, percentile: float = 99.999, num_bins: int = 4096
    ) -> None:
        super().__init__(num_bins)
        _check_dtype(dtype, symmetric)
        self.dtype = dtype
        self.symmetric = bool(symmetric)
        self.percentile = float(percentile)

    def _compute_range(self) -> tuple[float, float]:
        return self._min, self._max

    def candidate_ranges(self) -> dict[str, tuple[float, float]]:
        """Each method's ``(rmin, rmax)`` for the counts seen so far."""
        if self._empty:
            raise ValueError("AutoObserver has observed no finite value; there is no range")
        ranges = {"minmax": (self._min, self._max)}
        for name, kind in (
            ("percentile", PercentileObserver),
            ("mse", MSEObserver),
            ("entropy", EntropyObserver),
        ):
            view = kind.__new__(kind)  # the same state, read by that method's search
            view.__dict__.update(self.__dict__)
            ranges[name] = view._compute_range()
        return {name: (_canonical(float(lo)), _canonical(float(hi))) for name, (lo, hi) in ranges.items()}

    def merge(self, other: AutoObserver) -> None:
        """Add ``other``'s observations (exact: both histograms are aligned to the wider ``R``)."""
        if other.num_bins != self.num_bins:
            raise ValueError("cannot merge histograms of different sizes")
        self.infinite = self.infinite or other.infinite
        self.bulk_absmax = max(self.bulk_absmax, other.bulk_absmax)
        if other._empty:
            return
        counts = other._counts.copy()
        if other._exp is not None and self._exp is not None:
            if other._exp > self._exp:
                self._grow(other._exp)
            elif self._exp > other._exp:
                twin = AutoObserver(num_bins=other.num_bins)
                twin._counts, twin._exp = counts, other._exp
                twin._grow(self._exp)
                counts = twin._counts
        elif other._exp is not None:  # self saw only zeros so far: its zeros go into other's zero bin
            self._exp = other._exp
            self._counts = counts.copy()
            counts = np.zeros_like(counts)
            counts[self._half] = self._zeros
        else:  # other saw only zeros: they sit in no bin yet
            counts = np.zeros_like(counts)
            if self._exp is not None:
                counts[self._half] = other._zeros
        self._counts = self._counts + counts
        self._zeros += other._zeros
        self._min, self._max = min(self._min, other._min), max(self._max, other._max)
        self._empty = False


def make_observer(config: CalibrationConfig, *, dtype: str, symmetric: bool) -> Observer:
    """A fresh observer for one tensor, chosen by ``config.method``.

    ``dtype``/``symmetric`` describe how the tensor will be quantized; the entropy and MSE methods
    optimise for that grid, and a symmetric scheme makes the percentile method clip ``|x|``.
    """
    _check_dtype(dtype, symmetric)
    method = config.method
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageMinMaxObserver(config.averaging_constant)
    if method == "percentile":
        return PercentileObserver(config.percentile, symmetric=symmetric, num_bins=config.num_bins)
    if method == "entropy":
        return EntropyObserver(dtype, symmetric=symmetric, num_bins=config.num_bins)
    if method == "mse":
        return MSEObserver(dtype, symmetric=symmetric, num_bins=config.num_bins)
    if method == "auto":
        return AutoObserver(
            dtype, symmetric=symmetric, percentile=config.percentile, num_bins=config.num_bins
        )
    raise ValueError(f"unknown calibration method {method!r}")
