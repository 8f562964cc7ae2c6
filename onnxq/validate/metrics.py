"""Float-versus-quantized comparison: SQNR, cosine similarity, maximum error and top-1 agreement.

The one-shot functions take two numpy arrays of the same shape and accumulate in float64.
:class:`OutputStats` accumulates the same quantities over a stream of feeds, so that validating on many
samples needs memory proportional to the number of model outputs, never to the number of samples.
:func:`compare_models` runs a reference and a candidate model in ONNX Runtime and fills one
:class:`OutputStats` per output.

Conventions, chosen so that a report never shows an exception for a legal input:

- SQNR is ``10·log10(Σ ref² / Σ (ref − act)²)`` in dB: ``inf`` when the arrays are identical (even
  when both are zero), ``-inf`` when the reference is all zero but the candidate is not.
- Cosine similarity of flattened arrays is 1.0 when both are zero and 0.0 when only one is.
- Padding is not output: when the feed has an attention mask (:func:`padding_mask`), a per-token output
  (``[batch, seq, ...]``) is compared on the positions the mask keeps. A transformer's hidden states at
  padded positions are computed but read by nobody, and their quantization error is larger (all-mpnet-base:
  12 dB SQNR there, 18 dB on the tokens), so counting them reports a loss that no user sees.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxq.errors import OnnxqError
from onnxq.runtime.session import OptLevel, make_session, run

__all__ = [
    "PADDING_MASK_INPUTS",
    "OutputStats",
    "as_array",
    "compare_models",
    "cosine_similarity",
    "fixed_last_axis",
    "is_distribution",
    "looks_like_class_scores",
    "max_abs_error",
    "named_logits",
    "output_stats",
    "padding_mask",
    "sqnr_db",
    "top1_agreement",
    "without_padding",
    "worst_sqnr_db",
]

logger = logging.getLogger(__name__)


#: dtype kinds of outputs compared exactly: strings and objects, signed and unsigned integers, booleans.
_EXACT_KINDS = "OSUiub"


def as_array(output: Any) -> np.ndarray:
    """An ONNX Runtime output as an array, so that every output can be compared.

    Tensors stay as they are. A sequence of maps (label -> score: scikit-learn's ZipMap output) becomes
    one row of scores per map, in label order; a sequence of tensors of one shape is stacked.
    """
    if isinstance(output, np.ndarray):
        if output.dtype != object or not any(isinstance(x, (dict, list, np.ndarray)) for x in output.flat):
            return output
        output = output.tolist()
    if isinstance(output, dict):
        return np.asarray([output[key] for key in sorted(output)])
    if isinstance(output, (list, tuple)) and output and all(isinstance(x, dict) for x in output):
        return np.asarray([[row[key] for key in sorted(row)] for row in output])
    if isinstance(output, (list, tuple)) and output:
        items = [np.asarray(x) for x in output]
        if all(item.shape == items[0].shape for item in items):
            return np.stack(items)
    return np.asarray(output)


def _pair(reference: npt.ArrayLike, actual: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 of one shape.

    Equal infinities (a masked score, -inf in both) are exact agreement and count as zeros; other
    non-finite values stay and make the metrics NaN or inf.
    """
    ref = np.asarray(as_array(reference), dtype=np.float64)
    act = np.asarray(as_array(actual), dtype=np.float64)
    if ref.shape != act.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs actual {act.shape}")
    agreeing_infinities = np.isinf(ref) & (ref == act)
    if agreeing_infinities.any():
        ref = np.where(agreeing_infinities, 0.0, ref)
        act = np.where(agreeing_infinities, 0.0, act)
    return ref, act


def _padded_to_common(array: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``array`` padded at the end of each axis to the larger of its and ``other``'s length (same rank).

    Numbers pad with 0, strings with "", booleans with False: what a shorter output did not produce.
    """
    target = tuple(max(a, b) for a, b in zip(array.shape, other.shape, strict=True))
    if target == array.shape:
        return array
    padded = np.zeros(target, dtype=array.dtype) if array.dtype.kind != "O" else np.full(target, "", object)
    padded[tuple(slice(0, n) for n in array.shape)] = array
    return padded


def _sqnr_from_energies(signal: float, noise: float) -> float:
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or math.isinf(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(ref: np.ndarray, act: np.ndarray) -> float:
    a = ref.ravel()
    b = act.ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        return _cosine_from_sums(float(np.dot(a, b)), float(np.dot(a, a)), float(np.dot(b, b)))


def _cosine_from_sums(dot: float, ref_energy: float, act_energy: float) -> float:
    """The cosine of two vectors from their dot product and energies.

    1 for two zero vectors, 0 when only one is zero, clipped to [-1, 1].
    """
    if ref_energy == 0.0 and act_energy == 0.0:
        return 1.0
    if ref_energy == 0.0 or act_energy == 0.0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        value = dot / (float(np.sqrt(ref_energy)) * float(np.sqrt(act_energy)))
    return value if math.isnan(value) else min(1.0, max(-1.0, value))


def sqnr_db(reference: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB (higher is better)."""
    ref, act = _pair(reference, actual)
    with np.errstate(invalid="ignore", over="ignore"):
        err = ref - act
        return _sqnr_from_energies(float(np.sum(ref * ref)), float(np.sum(err * err)))


def worst_sqnr_db(reference: Sequence[npt.ArrayLike], actual: Sequence[npt.ArrayLike]) -> float:
    """The lowest :func:`sqnr_db` over a model's floating-point outputs (``inf`` when it has none).

    ``reference`` and ``actual`` hold the outputs in the same order; a pair whose shapes differ is
    skipped, and a NaN score (a NaN output) counts as ``-inf``: the worst.
    """
    worst = math.inf
    for want, got in zip(reference, actual, strict=True):
        want, got = as_array(want), as_array(got)
        if not np.issubdtype(want.dtype, np.floating) or want.shape != got.shape:
            continue
        value = sqnr_db(want, got)
        worst = min(worst, -math.inf if math.isnan(value) else value)
    return worst


def cosine_similarity(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Cosine similarity of the flattened arrays, in [-1, 1]; 1.0 when both are all zero."""
    x, y = _pair(a, b)
    return _cosine(x, y)


def max_abs_error(reference: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Largest absolute element-wise difference; 0.0 for empty arrays."""
    ref, act = _pair(reference, actual)
    with np.errstate(invalid="ignore"):
        return float(np.max(np.abs(ref - act))) if ref.size else 0.0


def top1_agreement(reference: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Fraction of rows whose argmax over the last axis is the same in both arrays."""
    ref, act = _pair(reference, actual)
    if ref.ndim == 0:
        raise ValueError("top-1 agreement needs at least one axis of class scores")
    same = np.argmax(ref, axis=-1) == np.argmax(act, axis=-1)
    if same.size == 0:
        raise ValueError(f"top-1 agreement of an empty array of shape {ref.shape}")
    return float(np.mean(same))


#: Input names that hold a padding mask, by the Hugging Face and TensorFlow BERT conventions.
PADDING_MASK_INPUTS = ("attention_mask", "input_mask")


def padding_mask(feed: Mapping[str, Any]) -> np.ndarray | None:
    """The ``[batch, seq]`` boolean mask of real (non-padding) tokens in ``feed``, or None.

    From an input named as in :data:`PADDING_MASK_INPUTS` that is 2-D, integer or boolean, and holds only
    0 and 1 with at least one 0 (a mask of ones hides nothing).
    """
    for name in PADDING_MASK_INPUTS:
        mask = feed.get(name)
        if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype.kind not in "iub":
            continue
        if mask.size and bool(np.all((mask == 0) | (mask == 1))) and not bool(np.all(mask)):
            keep: np.ndarray = mask.astype(bool)
            return keep
    return None


def without_padding(array: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """``array``'s real-token rows, or ``array`` itself when it is no per-token output of the feed.

    Per-token: ``[batch, seq, ...]``, leading axes those of the feed's padding mask ``keep``
    (:func:`padding_mask`).
    """
    if keep is not None and array.ndim > keep.ndim and array.shape[: keep.ndim] == keep.shape:
        kept: np.ndarray = array[keep]
        return kept
    return array


def fixed_last_axis(shape: Sequence[int | str | None] | None) -> bool:
    """Whether an output's declared shape (as ONNX Runtime lists it) may end in a class axis.

    Not when its last dimension is symbolic (``"seq_len"``): a number of classes is fixed in the graph.
    """
    return not shape or not isinstance(shape[-1], str)


def output_stats(session: Any, names: Sequence[str]) -> list[OutputStats]:
    """Empty statistics for the outputs ``names`` of the reference ``session``.

    An output whose declared last dimension is symbolic gets no top-1 (:func:`fixed_last_axis`).
    """
    shapes = {arg.name: arg.shape for arg in session.get_outputs()}
    return [OutputStats(name, class_axis=fixed_last_axis(shapes.get(name))) for name in names]


def looks_like_class_scores(array: np.ndarray, name: str = "") -> bool:
    """Whether an output is plausibly classification scores, for which top-1 agreement is meaningful.

    Accepted: floating point ``[N, C]`` (a batch of score vectors) or ``[C]`` (one unbatched score
    vector), with ``C >= 2``. The rule is deliberately simple and errs on the side of reporting:
    a ``[N, hidden]`` embedding also passes, which costs one harmless extra number. Rank 3 and higher
    passes when the last axis holds probability distributions (non-negative, summing to 1 within
    1e-3: a Softmax over classes, such as a CTC recognizer's ``[N, T, C]``), or when the output's
    ``name`` says it holds logits (:func:`named_logits`: a language model's or token classifier's
    ``[N, T, vocab]``, where top-1 agreement is the next-token / per-token decision); otherwise the
    last axis is as often a spatial or feature axis (``[N, C, H, W]``, ``[N, T, hidden]``) as a class
    axis, and an argmax over it would be noise.
    """
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.floating):
        return False
    if arr.ndim == 2:
        return bool(arr.shape[1] >= 2)
    if arr.ndim == 1:
        return bool(arr.shape[0] >= 2)
    return is_distribution(arr) or (named_logits(name) and arr.shape[-1] >= 2)


def named_logits(name: str) -> bool:
    """Whether an output's name says it holds class scores before the softmax.

    ``logits`` is what Hugging Face models return and what their ONNX exports (``optimum``,
    ``transformers.onnx``) name the output (``start_logits`` / ``end_logits`` for question answering);
    a shape alone cannot tell ``[N, T, vocab]`` logits from ``[N, T, hidden]`` states.
    """
    return "logits" in name.lower()


def is_distribution(array: np.ndarray) -> bool:
    """Whether the last axis of a floating-point array of rank 2 or more holds probability distributions.

    Non-negative, summing to 1 within 1e-3, at least two entries: a Softmax over classes or characters.
    """
    arr = np.asarray(array)
    if arr.ndim < 2 or arr.size == 0 or arr.shape[-1] < 2 or not np.issubdtype(arr.dtype, np.floating):
        return False
    with np.errstate(invalid="ignore"):
        sums = arr.sum(axis=-1, dtype=np.float64)
        return bool(np.all(arr >= 0.0) and np.all(np.abs(sums - 1.0) <= 1e-3))


@dataclass
class OutputStats:
    """Streaming comparison of one model output, updated once per feed.

    - ``sqnr_db`` is global: the summed energies of the reference and of the error over all updates,
      so it equals :func:`sqnr_db` on the concatenated data (up to float64 summation order).
    - ``cosine`` is the mean over updates of the cosine similarity of each flattened pair, so one
      badly wrong sample is visible even when the others dominate the energy. An output of one value
      per feed (a score, a probability) has no direction within a feed, only a sign: its cosine is
      taken over all feeds together (the vector of its values), like its SQNR.
    - ``max_abs_error`` is the maximum over all elements.
    - ``top1`` is the fraction of matching argmax rows over all updates whose reference looks like
      class scores (:func:`looks_like_class_scores`), or ``None`` when none did. An axis whose length
      changes from feed to feed holds no classes (silero VAD v6's per-frame probabilities over a clip):
      a ``class_axis=False`` output (its last dimension is symbolic in the graph, see
      :func:`fixed_last_axis`), or one whose last axis changed length between updates, has no top-1.
    - ``samples`` counts updates (feeds), not rows.
    - With a padding mask (``keep`` in :meth:`update`), a per-token output counts only the positions it
      keeps; ``padding_excluded`` says whether that happened.
    """

    name: str
    class_axis: bool = True
    _classes: int | None = field(default=None, init=False, repr=False)
    _ref_energy: float = field(default=0.0, init=False, repr=False)
    _err_energy: float = field(default=0.0, init=False, repr=False)
    _cosine_sum: float = field(default=0.0, init=False, repr=False)
    _dot: float = field(default=0.0, init=False, repr=False)
    _act_energy: float = field(default=0.0, init=False, repr=False)
    _scalar_only: bool = field(default=True, init=False, repr=False)
    _max_err: float = field(default=0.0, init=False, repr=False)
    _top1_matches: int = field(default=0, init=False, repr=False)
    _top1_rows: int = field(default=0, init=False, repr=False)
    _samples: int = field(default=0, init=False, repr=False)
    _exact: bool = field(default=False, init=False, repr=False)
    _length_changes: int = field(default=0, init=False, repr=False)
    padding_excluded: bool = field(default=False, init=False)

    def update(self, reference: np.ndarray, actual: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Add one pair of outputs; raises ValueError when their ranks differ.

        Outputs of labels or indices (strings, integers, booleans) are compared *exactly*: the share of
        elements that agree is their top-1 agreement, and SQNR and cosine (meaningless for a class
        number: label 8 for 7 is not "close") are NaN.

        Outputs of one rank and different lengths (a decoder loop that stopped at another step, a
        detector that kept another number of boxes) are a result, not an error: both are padded with
        zeros (empty strings, ``False``) to the larger length on each axis, so the missing or extra part
        counts as error, and :attr:`length_changes` counts such feeds.

        ``keep`` (a ``[batch, seq]`` boolean padding mask, :func:`padding_mask`) selects the positions of
        an output whose leading axes are exactly those (and that has more: a per-token vector); other
        outputs ignore it.
        """
        ref_array, act_array = as_array(reference), as_array(actual)
        # Judged on the output as the model gives it: [batch, seq, hidden] holds no classes, though its
        # real-token rows [tokens, hidden] would pass for a batch of score vectors.
        class_scores = looks_like_class_scores(ref_array, self.name)
        if keep is not None and ref_array.shape == act_array.shape:
            unpadded = without_padding(ref_array, keep)
            if unpadded is not ref_array:
                ref_array, act_array = unpadded, without_padding(act_array, keep)
                self.padding_excluded = True
        if ref_array.shape != act_array.shape and ref_array.ndim == act_array.ndim:
            ref_array, act_array = (
                _padded_to_common(ref_array, act_array),
                _padded_to_common(act_array, ref_array),
            )
            self._length_changes += 1
        if ref_array.dtype.kind in _EXACT_KINDS or act_array.dtype.kind in _EXACT_KINDS:
            self._exact = True
            if ref_array.shape != act_array.shape:
                raise ValueError(
                    f"output {self.name!r}: shape mismatch {ref_array.shape} vs {act_array.shape}"
                )
            same = ref_array == act_array
            self._top1_matches += int(np.sum(same))
            self._top1_rows += int(same.size)
            self._samples += 1
            return
        try:
            ref, act = _pair(ref_array, act_array)
        except ValueError as exc:
            raise ValueError(f"output {self.name!r}: {exc}") from exc
        with np.errstate(invalid="ignore", over="ignore"):
            err = ref - act
            self._ref_energy += float(np.sum(ref * ref))
            self._err_energy += float(np.sum(err * err))
            if err.size:
                self._max_err = max(self._max_err, float(np.max(np.abs(err))))
            self._cosine_sum += _cosine(ref, act)
            self._dot += float(np.sum(ref * act))
            self._act_energy += float(np.sum(act * act))
            self._scalar_only = self._scalar_only and ref.size <= 1
        if ref_array.ndim and self.class_axis:
            if self._classes is not None and ref_array.shape[-1] != self._classes:
                self.class_axis = False  # a length that varies is no class count
                self._top1_matches = self._top1_rows = 0
            self._classes = ref_array.shape[-1]
        if self.class_axis and class_scores:
            same = np.argmax(ref, axis=-1) == np.argmax(act, axis=-1)
            self._top1_matches += int(np.sum(same))
            self._top1_rows += int(same.size)
        self._samples += 1

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def length_changes(self) -> int:
        """Feeds on which the two outputs differed in length (compared zero-padded, see :meth:`update`)."""
        return self._length_changes

    @property
    def exact(self) -> bool:
        """Whether the output holds labels or indices, compared exactly (see :meth:`update`)."""
        return self._exact

    @property
    def sqnr_db(self) -> float:
        """Global SQNR in dB over all updates; NaN before the first update and for exact outputs."""
        if not self._samples or self._exact:
            return math.nan
        return _sqnr_from_energies(self._ref_energy, self._err_energy)

    @property
    def cosine(self) -> float:
        """Mean per-update cosine similarity, or over all updates for one-value outputs.

        NaN before the first update and for exact outputs.
        """
        if not self._samples or self._exact:
            return math.nan
        if self._scalar_only and self._samples > 1:
            return _cosine_from_sums(self._dot, self._ref_energy, self._act_energy)
        return self._cosine_sum / self._samples

    @property
    def max_abs_error(self) -> float:
        """Largest absolute error seen; NaN before the first update and for exact outputs."""
        return self._max_err if self._samples and not self._exact else math.nan

    @property
    def top1(self) -> float | None:
        """Top-1 agreement over class-score rows, or None when the output is not class scores."""
        if not self._top1_rows:
            return None
        return self._top1_matches / self._top1_rows

    def as_dict(self) -> dict[str, float | int | str | None]:
        """The statistics as a flat, JSON-friendly row."""
        return {
            "output": self.name,
            "samples": self.samples,
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "max_abs_error": self.max_abs_error,
            "top1": self.top1,
            "length_changes": self.length_changes,
            "padding_excluded": self.padding_excluded,
        }


def _progress(
    iterable: Iterable[Mapping[str, np.ndarray]], *, total: int | None, desc: str
) -> Iterator[Mapping[str, np.ndarray]]:
    # Imported lazily: onnxq.progress is written separately and may be absent; then iterate plainly.
    try:
        from onnxq.progress import progress
    except ImportError:
        return iter(iterable)
    return iter(progress(iterable, total=total, desc=desc))


def compare_models(
    reference: bytes | str | os.PathLike[str],
    candidate: bytes | str | os.PathLike[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    opt_level: OptLevel = "disable",
    progress_total: int | None = None,
    progress_desc: str = "validate",
) -> list[OutputStats]:
    """Run both models on every feed and compare the candidate's outputs with the reference's.

    Outputs are matched by name, so the candidate may list them in another order or have extra ones;
    an output of the reference that the candidate lacks raises :class:`OnnxqError`. Returns one
    :class:`OutputStats` per reference output, in the reference's order. ``feeds`` is consumed once
    and may be a generator.

    The default ``opt_level="disable"`` checks what the candidate graph computes. Pass ``"all"`` to
    measure the accuracy of the deployed model, where ONNX Runtime fuses Q/DQ into QLinear kernels and
    may lower the accuracy of int4 MatMuls; report which level was used.
    """
    ref_session = make_session(reference, providers=providers, opt_level=opt_level)
    cand_session = make_session(candidate, providers=providers, opt_level=opt_level)
    names = [arg.name for arg in ref_session.get_outputs()]
    cand_names = {arg.name for arg in cand_session.get_outputs()}
    missing = [name for name in names if name not in cand_names]
    if missing:
        raise OnnxqError(
            f"candidate model lacks output(s) {', '.join(repr(n) for n in missing)} of the reference model"
        )

    stats = output_stats(ref_session, names)
    for feed in _progress(feeds, total=progress_total, desc=progress_desc):
        try:
            ref_out = run(ref_session, feed, names)
        except OnnxqError as exc:
            raise OnnxqError(f"reference model: {exc}") from exc
        try:
            cand_out = run(cand_session, feed, names)
        except OnnxqError as exc:
            raise OnnxqError(f"candidate model: {exc}") from exc
        keep = padding_mask(feed)
        for stat, ref, act in zip(stats, ref_out, cand_out, strict=True):
            try:
                stat.update(ref, act, keep)
            except ValueError as exc:
                raise OnnxqError(str(exc)) from exc
    if stats and stats[0].samples == 0:
        raise OnnxqError("no input data to compare the models on")
    logger.debug("compared %d outputs over %d feeds", len(stats), stats[0].samples if stats else 0)
    return stats
