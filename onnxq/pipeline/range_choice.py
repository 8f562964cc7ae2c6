"""Range method ``auto``: keep the method whose quantized model is closest to float on held-out data.

No range method wins everywhere. Measured on the zoo (one calibration, task metric vs float): min-max
is best on the PP-OCR recognizer (entropy clips its CTC logits' inputs and reads nothing: 0.0 character
accuracy), entropy is best on the PP-OCR detector (text-pixel IoU 0.950 vs 0.932 for min-max), min-max
on MiniLM after smoothing. So ``auto`` decides per model, by measurement, at a bounded cost:

1. Calibration keeps one histogram per tensor for the even-numbered batches and one for the odd ones
   (:class:`~onnxq.calibrate.observers.AutoObserver`); each method of
   :data:`~onnxq.config.AUTO_METHODS` gives its range from the same counts, so there is one
   calibration pass, not four.
2. For each method, the model is quantized with the ranges of the even batches only and run on the
   odd ones (at most :data:`MAX_HELD_OUT`); its score is the lowest SQNR over the model's float
   outputs against the float model. Data a range was not fitted to is what shows the clipping of a
   too-narrow range, and the loss of resolution of a too-wide one.
3. The best-scoring method's ranges from *all* batches (the two histograms merge exactly) are used.

Cost: one histogram calibration (about 2-3x a min-max one), four Q/DQ rewrites and ``4 + 1`` runs of
each held-out batch. With a single calibration batch there is nothing held out: the methods are scored
on that batch, which favours min-max (the note says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.calibrate.collect import CalibrationResult
from onnxq.config import AUTO_METHODS, QuantConfig
from onnxq.data import Feeds
from onnxq.pipeline.state import StaticState
from onnxq.runtime.session import open_model, run
from onnxq.validate.metrics import worst_sqnr_db

__all__ = ["MAX_HELD_OUT", "RangeChoice", "choose_range_method"]

#: Held-out batches each method is scored on, at most.
MAX_HELD_OUT = 8

Ranges = dict[ir.Value, tuple[float, float]]


@dataclass
class RangeChoice:
    """The method kept, its ranges from all the data, and every method's held-out score (dB)."""

    method: str
    ranges: Ranges
    scores: dict[str, float] = field(default_factory=dict)
    held_out: int = 0

    def describe(self) -> str:
        """One line for the report."""
        scores = ", ".join(f"{name} {score:.1f} dB" for name, score in self.scores.items())
        data = (
            f"on {self.held_out} held-out calibration batch(es)"
            if self.held_out
            else "on the only calibration batch (nothing held out: favours min-max)"
        )
        return f"range method auto: {self.method} (lowest output SQNR {data}: {scores})"


def _score(outputs: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]]) -> float:
    """The lowest SQNR over the float outputs, all held-out batches pooled per output."""

    def pooled(batches: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        return [np.concatenate([np.ravel(b[i]) for b in batches]) for i in range(len(batches[0]))]

    return worst_sqnr_db(pooled(reference), pooled(outputs))


def choose_range_method(
    model: ir.Model,
    calibration: CalibrationResult,
    feeds: Feeds,
    config: QuantConfig,
    providers: Sequence[str],
) -> RangeChoice:
    """Score each method of :data:`AUTO_METHODS` on held-out batches and return the best (module doc)."""
    batches = list(feeds)
    held_out = [batch for index, batch in enumerate(batches) if index % 2 == 1][:MAX_HELD_OUT]
    fitted: Mapping[str, Ranges] = calibration.fit_candidates if held_out else calibration.candidates
    scored = held_out or batches[:1]
    reference_session = open_model(model, providers=providers, opt_level="all")
    reference = [run(reference_session, dict(batch)) for batch in scored]
    scores: dict[str, float] = {}
    for method in AUTO_METHODS:
        ranges = {**calibration.ranges, **fitted.get(method, {})}
        state = StaticState(
            float_model=model,
            config=config,
            feeds=feeds,
            ranges={v.name or "": r for v, r in ranges.items()},
            providers=tuple(providers),
            quantized_nodes=(),
        )
        session = open_model(state.requantize(output_format="qdq"), providers=providers, opt_level="all")
        scores[method] = _score([run(session, dict(batch)) for batch in scored], reference)
    best = max(AUTO_METHODS, key=lambda name: (scores[name], -AUTO_METHODS.index(name)))
    chosen = {**calibration.ranges, **calibration.candidates.get(best, {})}
    return RangeChoice(best, chosen, scores, held_out=len(held_out))
