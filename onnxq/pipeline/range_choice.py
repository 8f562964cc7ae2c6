"""Range method ``auto``: the ranges whose quantized model is closest to float on held-out data.

No range method wins everywhere. Measured on the zoo (one calibration, task metric vs float on 24
evaluation samples): min-max is best on the PP-OCR recognizer (entropy clips its CTC logits' inputs and
reads nothing: 0.0 character accuracy), entropy on the PP-OCR detector (text-pixel IoU 0.952 vs 0.943
for min-max). Nor does one method win in every part of a model: the detector's backbone does best
with entropy ranges and its neck with min-max and MSE ones (IoU 0.967 with that mix). So ``auto``
decides by measurement, at a bounded cost:

1. Calibration keeps one histogram per tensor for the even-numbered batches and one for the odd ones
   (:class:`~onnxq.calibrate.observers.AutoObserver`); each method of
   :data:`~onnxq.config.AUTO_METHODS` gives its range from the same counts, so there is one
   calibration pass, not four.
2. Every candidate assignment of methods to tensors quantizes the model with the ranges fitted on the
   even batches and runs it on the odd ones (at most :data:`MAX_HELD_OUT`): data a range was not
   fitted to is what shows the clipping of a too-narrow range and the loss of resolution of a
   too-wide one. The score (:func:`_score`) is first the top-1 agreement with the float model on
   outputs that are probability distributions (a Softmax over classes, a CTC recognizer's per-step
   characters: the decision is what the user sees), then the lowest output SQNR, taken as the median over
   an output's channels (:func:`_channel_sqnr_db`).
3. Each method is first scored on every tensor (one uniform candidate per method); the best one is
   the start. Then, per tensor: the quantized tensors, in the order the graph computes them, are cut
   into :data:`REFINE_SEGMENTS` runs of consecutive layers, and for each run in turn, every other
   method is tried on that run alone; a change is kept when it raises the score by more than
   :data:`REFINE_MIN_DB` (or the top-1 agreement at all). Judging the whole model's output, not each
   tensor's own error, matters: giving every tensor the method with the lowest squared error on its
   own held-out values (tried) was worse than the best uniform method on all three zoo models it was
   tried on, since a clip that costs a tensor little can cost the output much.
4. The kept assignment's ranges from *all* batches (the two histograms merge exactly) are used.

Cost: one histogram calibration (about 2-3x a min-max one), then at most ``4 + 4 * 3 = 16`` Q/DQ
rewrites, each run on the held-out batches (PP-OCRv4 det: 11 s where min-max takes 1.7 s; ``auto``
is the method to ask for when accuracy matters more than quantization time). With a single
calibration batch there is nothing held out: the uniform methods are scored on that batch, which
favours min-max (the note says so), and nothing is refined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.calibrate.collect import CalibrationResult
from onnxq.config import AUTO_METHODS
from onnxq.data import Feeds
from onnxq.runtime.session import open_model, run
from onnxq.validate.metrics import (
    is_distribution,
    padding_mask,
    top1_agreement,
    without_padding,
    worst_sqnr_db,
)

__all__ = [
    "MAX_HELD_OUT",
    "PER_TENSOR",
    "REFINE_MIN_DB",
    "REFINE_SEGMENTS",
    "HeldOut",
    "RangeChoice",
    "beats",
    "choose_range_method",
]

#: Held-out batches each method is scored on, at most.
MAX_HELD_OUT = 8

#: What the choice is called when the refinement gave different tensors different methods.
PER_TENSOR = "per-tensor"

#: Runs of consecutive quantized tensors the refinement tries each other method on (step 3).
REFINE_SEGMENTS = 4

#: A refinement step is kept when it raises the held-out SQNR by more than this (dB): below it, the
#: gain is within what 8 held-out batches can tell apart.
REFINE_MIN_DB = 0.1

Ranges = dict[ir.Value, tuple[float, float]]

logger = logging.getLogger(__name__)


@dataclass
class RangeChoice:
    """The candidate kept, its ranges from all the data, and every candidate's held-out score.

    ``method`` is a method of :data:`AUTO_METHODS` or :data:`PER_TENSOR`; ``per_tensor`` counts the
    tensors of the per-tensor candidate by the method each got. A score is ``(top-1 agreement, dB)``.
    """

    method: str
    ranges: Ranges
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    held_out: int = 0
    per_tensor: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the report."""
        with_top1 = any(top1 < 1.0 for top1, _ in self.scores.values())

        def shown(top1: float, db: float) -> str:
            return f"top-1 {top1:.3f} / {db:.1f} dB" if with_top1 else f"{db:.1f} dB"

        scores = ", ".join(f"{name} {shown(*score)}" for name, score in self.scores.items())
        data = (
            f"on {self.held_out} held-out calibration batch(es)"
            if self.held_out
            else "on the only calibration batch (nothing held out: favours min-max)"
        )
        mix = ", ".join(f"{count} {name}" for name, count in self.per_tensor.items())
        mix = f"; the per-tensor candidate's tensors: {mix}" if mix else ""
        judged = (
            "top-1 agreement on class outputs, then lowest output SQNR" if with_top1 else "lowest output SQNR"
        )
        return f"range method auto: {self.method} ({judged} {data}: {scores}{mix})"


def _score(
    outputs: Sequence[Sequence[np.ndarray]],
    reference: Sequence[Sequence[np.ndarray]],
    masks: Sequence[np.ndarray | None] = (),
) -> tuple[float, float]:
    """Top-1 agreement on distribution outputs (1.0 when there is none), then the lowest output SQNR.

    Compared as a tuple: the decisions first. An output's SQNR is :func:`_channel_sqnr_db`. ``masks``
    (one per batch, :func:`~onnxq.validate.metrics.padding_mask`) leave padded positions out of
    per-token outputs, as validation does: else a transformer's ``[1, 128, hidden]`` hidden states,
    whose axis 1 is positions, were scored by the median position, a padding one for short sentences
    (all-mpnet-base-v2: ``auto`` read cosine 0.937 where min-max reads 0.993).
    """
    if masks:
        outputs = [
            [without_padding(np.asarray(a), m) for a in o] for o, m in zip(outputs, masks, strict=True)
        ]
        reference = [
            [without_padding(np.asarray(a), m) for a in r] for r, m in zip(reference, masks, strict=True)
        ]
    agreement = [
        float(np.mean([top1_agreement(r[i], o[i]) for r, o in zip(reference, outputs, strict=True)]))
        for i in range(len(reference[0]))
        if all(is_distribution(np.asarray(r[i])) for r in reference)
    ]
    sqnr = [
        _channel_sqnr_db([np.asarray(r[i]) for r in reference], [np.asarray(o[i]) for o in outputs])
        for i in range(len(reference[0]))
        if np.issubdtype(np.asarray(reference[0][i]).dtype, np.floating)
    ]
    return min(agreement, default=1.0), min(sqnr, default=math.inf)


def _channel_sqnr_db(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """An output's SQNR over the held-out batches, each channel (axis 1) weighing the same.

    One output often packs quantities of different scales along axis 1: YOLO's ``[N, 4 + classes,
    anchors]`` holds box coordinates in pixels beside class scores in [0, 1], and a plain SQNR sees
    only the boxes. So, when axis 1 has the same size in every batch, the SQNR is taken per channel
    (energies summed over the batches) and the median over the channels that carry signal is the
    score: the typical channel, whatever its scale. (A mean is the wrong summary: in the CDLA layout
    detector's ``[N, anchors, classes]`` scores, most anchors' energy is near zero, their SQNR is
    noise, and a mean of the ratios chose ranges that gave detection F1 0.0.) Otherwise the score is
    the SQNR of the whole output.
    """
    shapes = {np.shape(r) for r in reference} | {np.shape(a) for a in actual}
    if any(len(shape) < 3 for shape in shapes) or len({shape[1] for shape in shapes}) != 1:
        return worst_sqnr_db(
            [np.concatenate([np.ravel(r) for r in reference])],
            [np.concatenate([np.ravel(a) for a in actual])],
        )
    channels = int(np.shape(reference[0])[1])
    signal, noise = np.zeros(channels), np.zeros(channels)
    for want, got in zip(reference, actual, strict=True):
        want64 = np.moveaxis(want.astype(np.float64), 1, 0).reshape(channels, -1)
        got64 = np.moveaxis(got.astype(np.float64), 1, 0).reshape(channels, -1)
        signal += np.sum(want64 * want64, axis=1)
        noise += np.sum((want64 - got64) ** 2, axis=1)
    if not np.all(np.isfinite(noise)):
        return -math.inf
    carrying = signal > 0
    if not carrying.any():
        return math.inf if not noise.any() else -math.inf
    with np.errstate(divide="ignore"):
        decibels = 10.0 * np.log10(signal[carrying] / noise[carrying])
    return float(np.median(decibels))


def _mix(candidates: Mapping[str, Ranges], methods: Mapping[ir.Value, str]) -> Ranges:
    """Each tensor's range from its method's candidate ranges."""
    return {
        value: candidates[name][value] for value, name in methods.items() if value in candidates.get(name, {})
    }


#: Quantizes the float model with the given ranges (by tensor name), in QDQ form.
Quantizer = Callable[[dict[str, tuple[float, float]]], ir.Model]


class HeldOut:
    """The held-out calibration batches and the float model's outputs on them.

    The odd-numbered batches (at most :data:`MAX_HELD_OUT`): what a set of ranges fitted on the
    even-numbered ones is scored on (:func:`_score`).

    With a single batch there is nothing held out: that batch is scored (``count`` is 0).
    """

    def __init__(self, model: ir.Model, feeds: Feeds, providers: Sequence[str]) -> None:
        # Read up to the last batch kept, never the whole data: the range rescue builds one on every
        # default quantization, and calibration data may be far larger than memory.
        first: list[dict[str, np.ndarray]] = []
        held_out: list[dict[str, np.ndarray]] = []
        for index, batch in enumerate(feeds):
            if index == 0:
                first.append(dict(batch))
            elif index % 2 == 1:
                held_out.append(dict(batch))
                if len(held_out) == MAX_HELD_OUT:
                    break
        self.count = len(held_out)
        self.batches = held_out or first
        self.providers = tuple(providers)
        session = open_model(model, providers=self.providers, opt_level="all")
        self.reference = [run(session, dict(batch)) for batch in self.batches]
        self.masks = [padding_mask(dict(batch)) for batch in self.batches]
        #: Whether some output is a probability distribution (the score's top-1 agreement is real).
        self.classes = any(
            all(is_distribution(np.asarray(outputs[i])) for outputs in self.reference)
            for i in range(len(self.reference[0]))
        )

    def score(self, quantized: ir.Model) -> tuple[float, float]:
        """``quantized``'s (top-1 agreement, lowest output SQNR) against the float model's outputs."""
        session = open_model(quantized, providers=self.providers, opt_level="all")
        return _score([run(session, dict(batch)) for batch in self.batches], self.reference, self.masks)


def choose_range_method(
    model: ir.Model,
    calibration: CalibrationResult,
    feeds: Feeds,
    quantize: Quantizer,
    providers: Sequence[str],
    held_out: HeldOut | None = None,
) -> RangeChoice:
    """Score each method of :data:`AUTO_METHODS` on held-out batches, then refine per run of tensors.

    ``quantize`` rewrites ``model`` with a set of ranges (the caller's configuration; a rewrite,
    never a calibration). ``held_out`` reuses a caller's :class:`HeldOut` on the same ``feeds``.
    Returns the best assignment's ranges from all the data (module doc).
    """
    held = held_out if held_out is not None else HeldOut(model, feeds, providers)
    fitted: Mapping[str, Ranges] = calibration.fit_candidates if held.count else calibration.candidates

    def evaluate(methods: Mapping[ir.Value, str]) -> tuple[float, float]:
        ranges = {**calibration.ranges, **_mix(fitted, methods)}
        return held.score(quantize({v.name or "": r for v, r in ranges.items()}))

    tensors = _topological(model, {v for ranges in calibration.candidates.values() for v in ranges})
    scores: dict[str, tuple[float, float]] = {}
    for name in AUTO_METHODS:
        scores[name] = evaluate(dict.fromkeys(tensors, name))
    best = max(AUTO_METHODS, key=lambda name: (*scores[name], -AUTO_METHODS.index(name)))
    assignment = dict.fromkeys(tensors, best)
    best_score = scores[best]
    refined = 0
    if held.count and len(tensors) > 1:
        alternatives = sorted((n for n in AUTO_METHODS if n != best), key=lambda n: scores[n], reverse=True)
        size = math.ceil(len(tensors) / REFINE_SEGMENTS)
        for first in range(0, len(tensors), size):
            segment = tensors[first : first + size]
            for name in alternatives:
                trial = {**assignment, **dict.fromkeys(segment, name)}
                score = evaluate(trial)
                logger.debug(
                    "range method auto: tensors %d-%d as %s: %s", first, first + len(segment), name, score
                )
                if beats(score, best_score):
                    assignment, best_score = trial, score
                    refined += 1
    method = best if not refined else PER_TENSOR
    if refined:
        scores[PER_TENSOR] = best_score
    counts = {name: sum(1 for m in assignment.values() if m == name) for name in AUTO_METHODS}
    return RangeChoice(
        method,
        {**calibration.ranges, **_mix(calibration.candidates, assignment)},
        scores,
        held_out=held.count,
        per_tensor={name: count for name, count in counts.items() if count} if refined else {},
    )


def beats(score: tuple[float, float], than: tuple[float, float]) -> bool:
    """Whether ``score`` beats ``than`` by more than noise: more agreement, or as much and +0.1 dB."""
    return score[0] > than[0] or (score[0] == than[0] and score[1] > than[1] + REFINE_MIN_DB)


def _topological(model: ir.Model, values: set[ir.Value]) -> list[ir.Value]:
    """``values`` in the order the graph computes them (graph inputs first)."""
    position = {node: index for index, node in enumerate(model.graph.all_nodes())}

    def key(value: ir.Value) -> tuple[int, str]:
        producer = value.producer()
        return (position.get(producer, -1) if producer is not None else -1, value.name or "")

    return sorted(values, key=key)
