"""Accuracy targets, and scoring candidate models against the float model on evaluation data.

A *target* is a score with a minimum; a candidate model meets it when its score is at least the
minimum (higher is always better). Two kinds:

- :class:`AccuracyTarget`: a built-in metric comparing the candidate's outputs with the float model's on
  the evaluation feeds, written ``"sqnr>=30"``, ``"cosine>=0.995"`` or ``"top1>=0.99"``:

  * ``sqnr``: global SQNR in dB (summed signal and error energy over all feeds) of each output; the
    score is the *minimum over the outputs*, so every output of a multi-output model must meet it (for
    a single-output model it is simply that output's SQNR);
  * ``cosine``: mean over feeds of the cosine similarity of each flattened output, minimum over outputs;
  * ``top1``: fraction of rows whose argmax agrees, over the outputs that look like class scores
    (``[N, C]`` or ``[C]``, rows of probabilities, or an output named ``…logits…`` at any rank; see
    :func:`~onnxq.validate.metrics.looks_like_class_scores`), minimum over those outputs; a model with
    no such output cannot be scored this way.

- :class:`CustomTarget`: the user's own evaluation function, ``fn(model) -> score`` (for instance a task
  accuracy on labelled data), with a minimum.

:class:`TargetEvaluator` scores models: it runs the float reference once and keeps its outputs (up to a
memory limit, above which it re-runs the reference for every candidate), and counts evaluations so that
searches can report what they cost.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import onnx_ir as ir

from onnxq.data import Feeds, input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.runtime.session import OptLevel, open_model, run
from onnxq.validate.metrics import PADDING_MASK_INPUTS, OutputStats, padding_mask

__all__ = [
    "METRICS",
    "AccuracyTarget",
    "CustomTarget",
    "MetricName",
    "Target",
    "TargetEvaluator",
    "as_target",
    "evaluation_feeds",
]

logger = logging.getLogger(__name__)

MetricName = Literal["sqnr", "cosine", "top1"]
METRICS: tuple[str, ...] = ("sqnr", "cosine", "top1")

_FORMS = (
    "'sqnr>=DB' (e.g. sqnr>=30), 'cosine>=VALUE' (e.g. cosine>=0.995) or 'top1>=FRACTION' (e.g. top1>=0.99)"
)
_TARGET_RE = re.compile(
    r"^\s*(?P<metric>[a-z0-9]+)\s*>=\s*(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$",
    re.IGNORECASE,
)

#: Reference outputs kept in memory by :class:`TargetEvaluator` up to this many bytes by default.
REFERENCE_CACHE_BYTES = 256 << 20


def _worst(values: Iterable[float]) -> float:
    """The minimum, NaN when any value is NaN (Python's ``min`` would depend on the order)."""
    items = list(values)
    if any(math.isnan(v) for v in items):
        return math.nan
    return min(items)


def _is_met(score: float, minimum: float) -> bool:
    return not math.isnan(score) and score >= minimum


@dataclass(frozen=True)
class AccuracyTarget:
    """A built-in metric of the candidate against the float model, and its minimum (see module doc)."""

    metric: MetricName
    minimum: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise OnnxqError(f"unknown accuracy metric {self.metric!r}; expected one of {', '.join(METRICS)}")
        if math.isnan(self.minimum) or self.minimum == math.inf:
            raise OnnxqError(f"accuracy target minimum must be a finite number, got {self.minimum}")
        if self.metric == "cosine" and self.minimum > 1.0:
            raise OnnxqError(f"a cosine similarity is at most 1, so cosine>={self.minimum:g} cannot be met")
        if self.metric == "top1" and self.minimum > 1.0:
            raise OnnxqError(
                f"top-1 agreement is a fraction in [0, 1], so top1>={self.minimum:g} cannot be met "
                "(write 0.99, not 99)"
            )

    @classmethod
    def parse(cls, text: str) -> AccuracyTarget:
        """``"sqnr>=30"``, ``"cosine>=0.995"``, ``"top1>=0.99"`` (spaces allowed, case ignored)."""
        match = _TARGET_RE.match(text) if isinstance(text, str) else None
        metric = match.group("metric").lower() if match else ""
        if match is None or metric not in METRICS:
            raise OnnxqError(f"accuracy target {text!r} not understood; expected {_FORMS}")
        return cls(metric, float(match.group("value")))  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.metric

    def __str__(self) -> str:
        return f"{self.metric}>={self.minimum:g}"

    def met(self, score: float) -> bool:
        """Whether ``score`` reaches the minimum (NaN never does)."""
        return _is_met(score, self.minimum)

    def score_stats(self, stats: Sequence[OutputStats]) -> float:
        """The score from per-output streaming statistics (minimum over outputs, see module doc)."""
        if not stats or stats[0].samples == 0:
            raise OnnxqError("no evaluation data to score the model on")
        numeric = [s for s in stats if not s.exact]
        if self.metric in ("sqnr", "cosine") and not numeric:
            # only labels or indices: they agree exactly, or the target is missed
            agree = all(s.top1 == 1.0 for s in stats)
            return (math.inf if self.metric == "sqnr" else 1.0) if agree else -math.inf
        if self.metric == "sqnr":
            return _worst(s.sqnr_db for s in numeric)
        if self.metric == "cosine":
            return _worst(s.cosine for s in numeric)
        top1 = [s.top1 for s in stats if s.top1 is not None]
        if not top1:
            names = ", ".join(repr(s.name) for s in stats)
            raise OnnxqError(
                f"top-1 agreement needs an output that looks like class scores ([N, C] or [C]); "
                f"the model's outputs {names} do not; use sqnr>=DB or cosine>=VALUE instead"
            )
        return _worst(top1)

    def score(
        self,
        reference_outputs: Iterable[Sequence[np.ndarray]],
        candidate_outputs: Iterable[Sequence[np.ndarray]],
        names: Sequence[str] | None = None,
        masks: Iterable[np.ndarray | None] | None = None,
    ) -> float:
        """Score the candidate's outputs against the reference's, over all outputs of all feeds.

        Both arguments yield, per feed, the list of model outputs in the same order; they are consumed
        in step and never held whole (generators are fine). ``names`` labels outputs in messages;
        ``masks`` yields each feed's padding mask (:func:`~onnxq.validate.metrics.padding_mask`), so
        that per-token outputs are scored on real tokens only, as the report compares them.
        """
        stats: list[OutputStats] = []
        pairs = itertools.zip_longest(reference_outputs, candidate_outputs)
        keeps = iter(masks) if masks is not None else itertools.repeat(None)
        for feed, (ref, cand) in enumerate(pairs):
            keep = next(keeps, None)
            if ref is None or cand is None:
                which = "candidate" if cand is None else "reference"
                raise OnnxqError(
                    f"the {which} model gave no outputs for feed {feed}: the feeds differ in number"
                )
            if not stats:
                labels = list(names) if names is not None else [f"output {i}" for i in range(len(ref))]
                stats = [OutputStats(label) for label in labels]
            if len(ref) != len(stats) or len(cand) != len(stats):
                raise OnnxqError(
                    f"expected {len(stats)} outputs per feed, got {len(ref)} (reference) and "
                    f"{len(cand)} (candidate)"
                )
            for stat, r, c in zip(stats, ref, cand, strict=True):
                try:
                    stat.update(r, c, keep)
                except ValueError as exc:
                    raise OnnxqError(str(exc)) from exc
        return self.score_stats(stats)


@dataclass(frozen=True)
class CustomTarget:
    """The user's evaluation function: ``fn(model)`` returns a score (higher is better) to reach ``minimum``.

    ``fn`` gets the candidate :class:`onnx_ir.Model` (serialize it with
    :func:`onnxq.load.files.serialize_model` for an ONNX Runtime session) and must not modify it. ``name``
    labels the score in reports and, with the function's qualified name, keys cached sensitivity
    results: rename the target (or clear the cache) when the function's meaning changes.
    """

    fn: Callable[[ir.Model], float]
    minimum: float
    name: str = "custom"

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise OnnxqError(f"a custom target needs a callable, got {type(self.fn).__name__}")
        if math.isnan(self.minimum) or self.minimum == math.inf:
            raise OnnxqError(f"custom target minimum must be a finite number, got {self.minimum}")

    def __str__(self) -> str:
        return f"{self.name}>={self.minimum:g}"

    def met(self, score: float) -> bool:
        """Whether ``score`` reaches the minimum (NaN never does)."""
        return _is_met(score, self.minimum)

    def evaluate(self, model: ir.Model) -> float:
        """The user function's score for ``model``, checked to be a real number."""
        value = self.fn(model)
        try:
            score = float(value)
        except (TypeError, ValueError) as exc:
            raise OnnxqError(
                f"custom target {self.name!r} returned {type(value).__name__}, expected a number"
            ) from exc
        return score

    @property
    def cache_key(self) -> str:
        fn = self.fn
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
        return f"custom:{self.name}:{getattr(fn, '__module__', '?')}.{qualname}"


Target: TypeAlias = "AccuracyTarget | CustomTarget"


def as_target(spec: AccuracyTarget | CustomTarget | str) -> AccuracyTarget | CustomTarget:
    """A target from a target object, a ``"metric>=minimum"`` string, or a bare metric name.

    A bare name (``"sqnr"``) has no minimum (``-inf``): enough for ranking, where only scores matter.
    """
    if isinstance(spec, AccuracyTarget | CustomTarget):
        return spec
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in METRICS:
            return AccuracyTarget(name, -math.inf)  # type: ignore[arg-type]
        return AccuracyTarget.parse(spec)
    raise OnnxqError(f"expected an accuracy target such as 'sqnr>=30', got {type(spec).__name__}")


def evaluation_feeds(
    feeds: Feeds | Iterable[Mapping[str, Any]] | str, model: ir.Model, *, what: str = "evaluation data"
) -> Feeds:
    """``feeds`` as checked :class:`~onnxq.data.Feeds` for ``model`` (passed through when already so)."""
    if isinstance(feeds, Feeds):
        return feeds
    return load_feeds(feeds, input_specs(model), what=what)


def _open(model: ir.Model, providers: Sequence[str], opt_level: OptLevel) -> Any:
    return open_model(model, providers=providers, opt_level=opt_level)


class TargetEvaluator:
    """Scores candidate models for one target on fixed feeds, and counts what that cost.

    For an :class:`AccuracyTarget` the float ``reference`` runs once (lazily, or on :meth:`prepare`)
    and its outputs are kept for the following candidates while they fit in ``cache_bytes``; beyond
    that it is re-run alongside each candidate, so memory stays bounded. Candidates run at
    ``opt_level`` (``"all"`` by default: the accuracy a deployment sees, with ONNX Runtime's QDQ fusions;
    ``"disable"`` checks the graph's own semantics). For a :class:`CustomTarget` the user function is
    called and no feeds are run.

    ``evaluations`` counts scored candidates and ``seconds`` the time spent scoring them (the reference
    run excluded).
    """

    def __init__(
        self,
        reference: ir.Model,
        feeds: Feeds,
        target: AccuracyTarget | CustomTarget,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        opt_level: OptLevel = "all",
        cache_bytes: int = REFERENCE_CACHE_BYTES,
    ) -> None:
        self.reference = reference
        self.feeds = feeds
        self.target = target
        self.providers = tuple(providers)
        self.opt_level: OptLevel = opt_level
        self.cache_bytes = cache_bytes
        self.evaluations = 0
        self.seconds = 0.0
        self.output_names = [v.name or "" for v in reference.graph.outputs]
        self._ref_session: Any = None
        self._cache: list[list[np.ndarray]] | None = None  # complete reference outputs, when they fit
        self._cache_failed = False
        self._masks: list[np.ndarray | None] | None = None  # each feed's padding mask, read once

    def met(self, score: float) -> bool:
        return self.target.met(score)

    def prepare(self) -> None:
        """Run the reference now (so that later timings are of candidates only)."""
        if isinstance(self.target, AccuracyTarget) and self._cache is None and not self._cache_failed:
            for _ in self._reference_outputs():
                pass

    def score(self, model: ir.Model) -> float:
        """The target's score for ``model`` (one full evaluation)."""
        start = time.perf_counter()
        if isinstance(self.target, CustomTarget):
            value = self.target.evaluate(model)
        else:
            value = self._score_accuracy(model, self.target)
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
        logger.debug("evaluation %d: %s = %.6g", self.evaluations, self.target.name, value)
        return value

    # -- accuracy targets ----------------------------------------------------------------------------
    def _score_accuracy(self, model: ir.Model, target: AccuracyTarget) -> float:
        session = _open(model, self.providers, self.opt_level)
        missing = sorted(set(self.output_names) - {arg.name for arg in session.get_outputs()})
        if missing:
            raise OnnxqError(f"candidate model lacks output(s) {', '.join(missing)} of the float model")
        candidate = (run(session, feed, self.output_names) for feed in self.feeds)
        if self._masks is None:  # one pass over the feeds for all evaluations, for models with a mask input
            inputs = {value.name for value in self.reference.graph.inputs}
            masked = bool(inputs & set(PADDING_MASK_INPUTS))
            self._masks = [padding_mask(feed) for feed in self.feeds] if masked else []
        masks = self._masks or None
        return target.score(self._reference_outputs(), candidate, self.output_names, masks)

    def _reference_outputs(self) -> Iterable[list[np.ndarray]]:
        if self._cache is not None:
            yield from self._cache
            return
        if self._ref_session is None:
            self._ref_session = _open(self.reference, self.providers, self.opt_level)
        collecting: list[list[np.ndarray]] | None = None if self._cache_failed else []
        size = 0
        for feed in self.feeds:
            outputs = run(self._ref_session, feed, self.output_names)
            if collecting is not None:
                size += sum(a.nbytes for a in outputs)
                if size > self.cache_bytes:
                    logger.info(
                        "float reference outputs exceed %d MiB: re-running the float model per evaluation",
                        self.cache_bytes >> 20,
                    )
                    collecting = None
                    self._cache_failed = True
                else:
                    collecting.append(outputs)
            yield outputs
        if collecting is not None:
            self._cache = collecting
            self._ref_session = None  # not needed any more
