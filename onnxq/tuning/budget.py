"""Accuracy-budgeted mixed precision: keep float the anchors that make a target hold at least cost.

:func:`meet_target` takes a static quantization result and an accuracy target and returns a model
with the cheapest set of anchor nodes (Conv, ConvTranspose, Gemm, MatMul, and the LSTMs static mode
runs as ``DynamicQuantizeLSTM``) left float that it found
meeting the target on the given evaluation data (cost: the latency keeping them float gives back,
:mod:`onnxq.tuning.cost`; the fewest nodes break ties). It does *not* quantize and evaluate once per layer:

1. evaluate the fully quantized model; if it meets the target, stop (1 evaluation);
1b. try the cheaper fixes that keep every layer quantized, so cost no speed or little (:data:`FIXES`:
   re-calibration with range method ``auto`` (per tensor), else with the percentile or MSE method,
   outlier smoothing, cross-layer equalization, bias correction, and — only while none of those met
   the target, as they may cost some speed — run-time ranges for the products with a constant weight
   (still int8: ``DynamicQuantizeMatMul``) and the evening-out of depthwise Conv inputs (a float op
   per input it changes; :data:`~onnxq.tuning.interfaces.COSTLY_FIXES`); one calibration and one
   evaluation each); the best-scoring one is kept if it beats
   the original, and if it meets the target the search stops there — the fastest model that meets
   the target is one with no layer kept float;
2. rank the anchors with the one-pass :func:`~onnxq.tuning.sensitivity.estimate_sensitivity` (two
   ONNX Runtime passes over the data, however many layers); for a top-1 target, by measurement
   instead: each of the (at most :data:`RANKING_MAX_ANCHORS`) anchors the estimate ranks first kept
   float alone, scored by a smooth proxy of the decisions on the first :data:`RANKING_BATCHES`
   evaluation batches (:func:`_ranks_by_measurement`; reported with the estimate's time, not counted
   as evaluations);
3. find the smallest ``k`` such that keeping the ``k`` top-ranked anchors float meets the target:
   ``k = 1, 2, 4, …`` until one passes (``k`` = every anchor but one last: a model with every anchor
   float is the float model, not an answer), then bisect between the last failing and the first
   passing ``k``;
4. greedy prune (at most ``prune_evaluations`` tries): re-quantize kept nodes one at a time,
   costliest first, keeping each change under which the target still holds. (A set the bisection
   already evaluated is skipped.) Among the sets that meet the target, the cheapest is the answer
   (:mod:`onnxq.tuning.cost`: what keeping each anchor float costs, measured by the latency guard per
   kind of layer, else its multiply-adds);
5. when the latency guard ran, a chosen model that keeps layers float is timed against the user's
   float model; if it is not faster, the float model is returned (it meets the target against
   itself). The outcome carries the measured latency next to the target it met.

With ``L`` anchors this costs about ``2·log2(k) + 1`` evaluations plus the fixes and prune tries,
instead of ``L`` (or ``2·L``) for one-at-a-time analysis (a top-1 target's ranking adds ``min(L, 64)``
rewrites run on at most 32 batches: EfficientNet-Lite0 18 s, where one evaluation on 128 crops takes
0.4 s), and never more than ``max_evaluations`` (12 by
default): the fixes get at most half of them (a fix that leaves the model as it was — equalization
without Conv chains, say — is recognised by its bytes and costs none); when the budget runs short
while ``k`` grows, the last evaluation goes to the largest ``k`` so that a passing model is found if
one can be, and the bisection and the prune stop where the budget does, with the best passing model
seen. Each variant is a rewrite of the calibrated model
(:meth:`~onnxq.pipeline.StaticState.requantize`), never a new calibration. When even one anchor left
quantized misses the target, the outcome has ``met=False`` and the best-scoring model found.

Only int8/uint8 quantization versus float is searched: 16-bit activations (int16/uint16 Q/DQ on the
sensitive tensors instead of float) are out of scope.

The search runs on the ``feeds`` given — held-out evaluation data, ideally not the calibration data —
and the chosen set may fit those feeds: leave margin in the target or check the result on other data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxq.config import TIMING_NOISE
from onnxq.data import Feeds
from onnxq.errors import OnnxqError
from onnxq.load.files import serialize_model
from onnxq.runtime.latency import time_sessions
from onnxq.runtime.session import ModelSource, OptLevel, make_session, open_model, run
from onnxq.tuning.cost import AnchorCosts, anchor_costs
from onnxq.tuning.interfaces import COSTLY_FIXES, FIXES, RequantizableState, StaticResult
from onnxq.tuning.latency_guard import dynamic_lstms, load_input_model
from onnxq.tuning.sensitivity import estimate_sensitivity, rank_by_estimate, score_each_kept_float
from onnxq.tuning.targets import AccuracyTarget, CustomTarget, TargetEvaluator, as_target, evaluation_feeds

__all__ = ["BudgetOutcome", "meet_target"]

logger = logging.getLogger(__name__)


@dataclass
class BudgetOutcome:
    """What :func:`meet_target` found and what the search cost.

    - ``model``: the chosen model (the input's quantized model when nothing had to be kept float);
    - ``kept_float``: the anchors left float, most sensitive first; ``kept_estimates`` their one-pass
      estimate (added noise in dB, the reason they were chosen); ``estimates`` every anchor's;
    - ``score_before`` / ``score_after``: the target's score of the fully quantized and the chosen
      model on the evaluation data; ``met``: whether the chosen model meets the target;
    - ``evaluations``: full evaluations made (the fully quantized model included; the estimate's two
      passes are not evaluations and are timed in ``estimate_seconds``);
    - ``search_seconds``: the whole search's wall time; ``full_evaluation_seconds``: the measured time
      of one re-quantize + evaluate (the mean over the variants evaluated; the evaluation of the fully
      quantized model when no variant was needed) — what a one-at-a-time analysis pays per layer;
    - ``history``: ``(number of anchors kept float, score)`` for every evaluation, in order.
    """

    model: ir.Model
    target: str
    kept_float: list[str]
    kept_estimates: dict[str, float]
    score_before: float
    score_after: float
    met: bool
    evaluations: int
    search_seconds: float
    full_evaluation_seconds: float
    estimate_seconds: float = 0.0
    #: A top-1 target's measured ranking (:func:`_ranks_by_measurement`): the kept-float anchors'
    #: gain in dB of the decision proxy with each alone kept float, how many anchors were measured
    #: and on how many batches (0: ranked by the estimate alone).
    measured: dict[str, float] = field(default_factory=dict)
    measured_anchors: int = 0
    measured_batches: int = 0
    #: The fix applied to every layer before any was kept float (``""``: none); ``fixes`` every fix
    #: tried with its score; ``state`` the quantization the chosen model comes from.
    fix: str = ""
    fixes: dict[str, float] = field(default_factory=dict)
    state: RequantizableState | None = None
    anchors: int = 0
    estimates: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)
    #: The chosen model's latency estimated from the latency guard's timings (:mod:`onnxq.tuning.cost`;
    #: NaN when the guard did not run) and the all-int8 model's; ``cost_share`` the fraction of the
    #: anchors' cost (measured, or multiply-adds) that the kept-float anchors carry.
    latency_ms: float = math.nan
    all_int8_latency_ms: float = math.nan
    cost_share: float = 0.0
    #: The chosen model timed against the user's float model, interleaved (NaN: not timed; it is when
    #: the latency guard ran and layers were kept float); ``float_returned``: the chosen model was not
    #: faster, so the float model is the answer (it meets an accuracy target by definition).
    measured_ms: float = math.nan
    float_ms: float = math.nan
    float_returned: bool = False

    def speed_line(self) -> str:
        """What the kept-float anchors cost in speed: measured when they were timed, else estimated."""
        if math.isfinite(self.measured_ms):
            line = (
                f"measured {self.measured_ms:.3g} ms against the float model's {self.float_ms:.3g} ms "
                f"({self.measured_ms / self.float_ms:.2f}x)"
            )
            if self.float_returned:
                line += "; not faster than float, so the float model is returned"
            return line
        if math.isfinite(self.latency_ms):
            return (
                f"estimated latency {self.latency_ms:.3g} ms (all int8 {self.all_int8_latency_ms:.3g} ms; "
                "from the latency guard's timings)"
            )
        return (
            f"kept-float anchors carry {100 * self.cost_share:.1f} % of the quantized layers' multiply-adds"
        )

    def summary(self) -> str:
        """A few lines for people: the verdict, the kept nodes with their estimates, the cost."""
        verdict = "met" if self.met else "NOT met"
        lines = [
            (
                f"target {self.target} {verdict}: {self.score_before:.4g} (all int8) -> "
                f"{self.score_after:.4g} with {len(self.kept_float)} of {self.anchors} anchors kept float"
            ),
        ]
        if self.fixes:
            tried = ", ".join(f"{fix} {score:.4g}" for fix, score in self.fixes.items())
            lines.append(f"  fixes tried (all layers int8): {tried}; applied: {self.fix or 'none'}")
        for name in self.kept_float:
            if name in self.measured:
                why = f"alone float it gains {self.measured[name]:+.1f} dB in the decision proxy"
            else:
                why = f"estimated added noise {self.kept_estimates.get(name, math.nan):.1f} dB"
            lines.append(f"  kept float: {name} ({why})")
        lines.append(f"  speed: {self.speed_line()}")
        ranking = (
            f"ranking: {self.measured_anchors} anchors kept float one at a time on {self.measured_batches} "
            f"batch(es), and the estimate, {_duration(self.estimate_seconds)}"
            if self.measured_anchors
            else f"estimate {_duration(self.estimate_seconds)}"
        )
        lines.append(
            f"  search: {self.evaluations} evaluations in {_duration(self.search_seconds)} "
            f"({ranking}; one re-quantize + evaluation {_duration(self.full_evaluation_seconds)})"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (the model left out)."""
        return {
            "target": self.target,
            "met": self.met,
            "kept_float": list(self.kept_float),
            "kept_estimates": dict(self.kept_estimates),
            "score_before": self.score_before,
            "score_after": self.score_after,
            "evaluations": self.evaluations,
            "search_seconds": self.search_seconds,
            "full_evaluation_seconds": self.full_evaluation_seconds,
            "estimate_seconds": self.estimate_seconds,
            "measured": dict(self.measured),
            "measured_anchors": self.measured_anchors,
            "measured_batches": self.measured_batches,
            "anchors": self.anchors,
            "fix": self.fix,
            "fixes": dict(self.fixes),
            "history": [list(h) for h in self.history],
            "latency_ms": self.latency_ms,
            "all_int8_latency_ms": self.all_int8_latency_ms,
            "cost_share": self.cost_share,
            "speed": self.speed_line(),
            "measured_ms": self.measured_ms,
            "float_ms": self.float_ms,
            "float_returned": self.float_returned,
        }


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


class _Search:
    """Evaluations of "top-k float" variants and of arbitrary kept sets, remembered and timed."""

    def __init__(
        self,
        result: StaticResult,
        evaluator: TargetEvaluator,
        ranked: list[str],
        limit: int,
        costs: AnchorCosts | None = None,
    ) -> None:
        assert result.static is not None
        self.state: RequantizableState = result.static
        self.evaluator = evaluator
        self.ranked = ranked
        #: The most evaluations the whole search may make (the evaluator counts them).
        self.limit = limit
        #: What keeping each anchor float costs: among passing sets, the cheapest is kept.
        self.costs = costs or AnchorCosts()
        self.scores: dict[frozenset[str], float] = {}
        self.history: list[tuple[int, float]] = []
        self.variant_seconds: list[float] = []
        self.best_pass: tuple[list[str], float, ir.Model] | None = None  # fewest kept, then best score
        self.best_any: tuple[list[str], float, ir.Model] | None = None  # best score

    def evaluate(self, kept: list[str], model: ir.Model | None = None) -> float:
        key = frozenset(kept)
        if key in self.scores:
            return self.scores[key]
        start = time.perf_counter()
        timed_rewrite = model is None
        if model is None:
            model = self.state.requantize(keep_float=kept)
        score = self.evaluator.score(model)
        if timed_rewrite:
            self.variant_seconds.append(time.perf_counter() - start)
        self.scores[key] = score
        self.history.append((len(kept), score))
        logger.info("%d kept float: %s = %.6g", len(kept), self.evaluator.target.name, score)
        entry = (list(kept), score, model)
        if self.evaluator.met(score):
            best = self.best_pass
            if best is None or (self.cost(kept), -score) < (self.cost(best[0]), -best[1]):
                self.best_pass = entry
        if not math.isnan(score) and (self.best_any is None or score > self.best_any[1]):
            self.best_any = entry
        return score

    def cost(self, kept: Sequence[str]) -> tuple[float, int]:
        """What keeping ``kept`` float costs (then how many they are: without costs, the fewest win)."""
        return (self.costs.of(kept), len(kept))

    def passes(self, kept: list[str]) -> bool:
        return self.evaluator.met(self.evaluate(kept))

    @property
    def remaining(self) -> int:
        """Evaluations left in the search's budget."""
        return max(0, self.limit - self.evaluator.evaluations)

    def top(self, k: int) -> list[str]:
        return self.ranked[:k]


def meet_target(
    result: StaticResult,
    target: AccuracyTarget | CustomTarget | str,
    feeds: Feeds | Iterable[Mapping[str, Any]] | str | None,
    *,
    prune_evaluations: int = 3,
    max_evaluations: int = 12,
    providers: Sequence[str] | None = None,
    opt_level: OptLevel = "all",
    fixes: Sequence[str] = FIXES,
    guard: Mapping[str, Any] | None = None,
    baseline: ModelSource | None = None,
) -> BudgetOutcome:
    """Keep float the cheapest anchor nodes that make ``result``'s model meet ``target`` on ``feeds``.

    ``result`` must come from static quantization of a float model (it carries ``result.static``).
    ``target`` is an :class:`AccuracyTarget`, a ``"sqnr>=30"``-style string or a :class:`CustomTarget`
    (the user's evaluation function). ``feeds`` is the evaluation data: scores are computed on it
    (accuracy targets) and the anchors ranked on it; ``None`` falls back to the calibration data, with
    a warning. Candidates are scored at ``opt_level`` (``"all"``: what a deployment computes).
    ``guard`` is the latency guard's report entry of ``result`` (``report.latency_guard``): with it, the
    cost of keeping each anchor float is measured rather than estimated from multiply-adds
    (:mod:`onnxq.tuning.cost`), and with ``baseline`` (the user's float model) a chosen model that keeps
    layers float is timed against it: when it is not faster (scattered float layers add Q/DQ pairs and
    break the integer kernels' fusions), the float model is returned instead. See the module docstring
    for the search; ``result`` itself is not modified.
    """
    start = time.perf_counter()
    state = result.static
    if state is None:
        raise OnnxqError(
            "accuracy-budgeted search needs the result of static quantization of a float model "
            "(this result has no static state: dynamic mode, or an input that was already quantized)"
        )
    goal = as_target(target)
    if isinstance(goal, AccuracyTarget) and goal.minimum == -math.inf:
        raise OnnxqError(f"target {target!r} has no minimum; write e.g. '{goal.metric}>=30'")
    if prune_evaluations < 0:
        raise OnnxqError(f"prune_evaluations must be at least 0, got {prune_evaluations}")
    if max_evaluations < 2:
        raise OnnxqError(
            f"max_evaluations must be at least 2 (the quantized model and one variant), got {max_evaluations}"
        )
    if feeds is None:
        logger.warning("no evaluation data given: searching on the calibration data (risk of overfitting)")
        eval_feeds = state.feeds
    else:
        eval_feeds = evaluation_feeds(feeds, state.float_model)
    providers = tuple(providers or state.providers)
    evaluator = TargetEvaluator(
        state.reference_model, eval_feeds, goal, providers=providers, opt_level=opt_level
    )
    evaluator.prepare()
    # The LSTMs static mode runs as DynamicQuantizeLSTM are candidates too: one whose input spans
    # orders of magnitude (a linear mel spectrogram) loses most of it to the run-time uint8 range.
    anchors = list(state.quantized_nodes) + dynamic_lstms(state)
    costs = anchor_costs(state.float_model, anchors, guard)

    search = _Search(result, evaluator, [], max_evaluations, costs)
    baseline_start = time.perf_counter()
    score_before = search.evaluate([], result.model)
    baseline_seconds = time.perf_counter() - baseline_start

    fixed, fix_scores = "", dict[str, float]()
    base_model = result.model
    if not evaluator.met(score_before) and anchors and fixes:
        fix_budget = max_evaluations // 2
        fixed, fix_scores, base_model = _try_fixes(search, fixes, score_before, base_model, fix_budget)
    estimates: dict[str, float] = {}
    estimate_seconds = 0.0
    measured: dict[str, float] = {}
    measured_batches = 0
    if search.best_pass is None and anchors:
        estimate_start = time.perf_counter()
        estimates = estimate_sensitivity(search.state, base_model, eval_feeds, providers=providers)
        search.ranked = rank_by_estimate(estimates, anchors)
        if _ranks_by_measurement(goal):
            ranking_feeds = eval_feeds.limit(RANKING_BATCHES * eval_feeds.samples_per_batch)
            first = search.ranked[:RANKING_MAX_ANCHORS]
            measured, measured_batches = score_each_kept_float(
                search.state, first, ranking_feeds, base=base_model, providers=providers, opt_level=opt_level
            )
            search.ranked = rank_by_estimate(measured, first) + search.ranked[RANKING_MAX_ANCHORS:]
        estimate_seconds = time.perf_counter() - estimate_start
        logger.info("anchors by %s sensitivity: %s", "measured" if measured else "estimated", search.ranked)
        _search_smallest_k(search, len(anchors) - 1)
        if search.best_pass is not None and min(prune_evaluations, search.remaining):
            _prune(search, min(prune_evaluations, search.remaining))

    chosen = search.best_pass or search.best_any
    assert chosen is not None  # the baseline was evaluated
    kept, score_after, model = chosen
    kept = [n for n in search.ranked if n in set(kept)]
    seconds = search.variant_seconds
    outcome = BudgetOutcome(
        model=model,
        target=str(goal),
        kept_float=kept,
        kept_estimates={n: estimates.get(n, math.nan) for n in kept},
        measured={n: measured[n] for n in kept if n in measured},
        measured_anchors=len(measured),
        measured_batches=measured_batches,
        score_before=score_before,
        score_after=score_after,
        met=evaluator.met(score_after),
        evaluations=evaluator.evaluations,
        search_seconds=time.perf_counter() - start,
        full_evaluation_seconds=sum(seconds) / len(seconds) if seconds else baseline_seconds,
        estimate_seconds=estimate_seconds,
        anchors=len(anchors),
        estimates=estimates,
        history=list(search.history),
        fix=fixed,
        fixes=fix_scores,
        state=search.state,
        latency_ms=costs.latency_ms(kept),
        all_int8_latency_ms=costs.latency_ms([]),
        cost_share=costs.share(kept),
    )
    if kept and guard is not None and baseline is not None:
        _check_against_float(
            outcome, evaluator, baseline, eval_feeds, int(guard.get("threads", 1)), providers
        )
        outcome.search_seconds = time.perf_counter() - start
    logger.info("%s", outcome.summary())
    return outcome


#: A top-1 target's anchors are ranked by measurement (:func:`_ranks_by_measurement`) on this many
#: evaluation batches at most ...
RANKING_BATCHES = 32
#: ... the ones the estimate ranks first, this many at most (the rest follow in the estimate's order).
RANKING_MAX_ANCHORS = 64


def _ranks_by_measurement(target: AccuracyTarget | CustomTarget) -> bool:
    """Whether the layer search ranks the anchors by measurement rather than by the one-pass estimate.

    A top-1 target: its score moves in steps, one near-tie at a time, so no evaluation tells a layer
    that helps from one that does not, and the estimate's local proxy ranks badly where the int8 error
    is spread over many layers and partly cancels at the output (EfficientNet-Lite0: keeping the six
    layers it ranks first float one at a time moved the output SQNR by -0.7 to +1.4 dB, the top 16
    together +0.9). So each anchor is kept float alone and scored on the first :data:`RANKING_BATCHES`
    evaluation batches by :func:`~onnxq.tuning.sensitivity.decision_proxy` (the KL divergence of
    class distributions, else the output SQNR: smooth where top-1 moves in steps); one rewrite and
    one run each, reported with the estimate's time, not as evaluations. On EfficientNet-Lite0's
    logits one layer alone gives +2.5 dB, and the SQNR rises with every ``k`` (23.7 dB all int8,
    26.2 / 27.0 / 28.3 with 1 / 4 / 16 float), so ``top1>=0.98`` on 128 crops is met with one to
    three layers float at 0.47-0.53x float, where the estimate's order reached 0.977 at best.

    One-at-a-time order is no better everywhere: a layer whose worth shows only with others gains
    next to nothing alone and can come last (PP-OCRv4 det, ``sqnr>=20`` searched in measured order as
    a test: 62 of 63 layers float read 18.9 dB, where the estimate's order met it with 34 float;
    all-mpnet-base-v2 ``cosine>=0.995`` went the other way, 24 -> 6 of 96 float). So ``sqnr`` and
    ``cosine`` targets, smooth already, keep the estimate's order. Reordering only the layers that
    gain 0.5 dB or more alone, the rest in the estimate's order, lost EfficientNet-Lite0's
    TorchScript export (``k`` = 4: 0.938, where the measured order read 0.984), whose estimate order
    keeps float the layers whose error cancels others'.
    """
    return isinstance(target, AccuracyTarget) and target.metric == "top1"


#: Wall time spent timing the chosen model against the float model, at most (at least 5 rounds).
TIMING_BUDGET_S = 1.0


def _check_against_float(
    outcome: BudgetOutcome,
    evaluator: TargetEvaluator,
    baseline: ModelSource,
    feeds: Feeds,
    threads: int,
    providers: Sequence[str],
) -> None:
    """Time ``outcome.model`` against the user's float model; return the float model if it is not slower.

    The search estimates latency from the guard's per-kind timings, which cannot see everything that
    scattering float layers among int8 ones costs (a Q/DQ pair at each boundary, fusions lost). The
    float model meets any accuracy target against itself (a user's function scores it: one more
    evaluation), so where it is not slower it is the fastest model known to meet the target.
    """
    feed = dict(next(iter(feeds)))
    sessions = {
        "float": make_session(baseline, providers=providers, threads=threads, spin=False),
        "chosen": open_model(outcome.model, providers=providers, threads=threads, spin=False),
    }
    start = time.perf_counter()
    for session in sessions.values():
        run(session, feed)
    once = (time.perf_counter() - start) / 2
    runs = int(min(max(TIMING_BUDGET_S / max(2 * once, 1e-6), 5), 30))
    timed = time_sessions(sessions, feed, threads=threads, runs=runs, warmup=1)
    outcome.measured_ms, outcome.float_ms = timed["chosen"].median_ms, timed["float"].median_ms
    # keeping layers float must still save more than the timings' noise to be worth the rounding error
    if outcome.measured_ms < outcome.float_ms * (1.0 - TIMING_NOISE):
        return
    float_model = load_input_model(baseline)
    target = evaluator.target
    score = _PERFECT[target.metric] if isinstance(target, AccuracyTarget) else evaluator.score(float_model)
    if not evaluator.met(score):
        return  # the user's metric says float misses the target: the slower model is the answer
    outcome.model, outcome.score_after, outcome.met = float_model, score, True
    outcome.float_returned = True
    outcome.evaluations = evaluator.evaluations
    logger.warning(
        "meeting %s keeps %d of %d layers float, and that model is not faster than the float model "
        "(%.3g ms vs %.3g ms): the float model is returned",
        outcome.target,
        len(outcome.kept_float),
        outcome.anchors,
        outcome.measured_ms,
        outcome.float_ms,
    )


#: The score of the float model against itself, per built-in metric.
_PERFECT = {"sqnr": math.inf, "cosine": 1.0, "top1": 1.0}


def _applies(fix: str, config: Any) -> bool:
    """Whether ``fix`` changes anything for a quantization made with ``config``.

    Each fix applies once (a second bias correction would correct what the first already did).
    """
    if fix.startswith("method="):
        return bool(config.calibration.method != fix.removeprefix("method="))
    return not getattr(config, fix, False)


def _try_fixes(
    search: _Search, fixes: Sequence[str], score_before: float, model: ir.Model, budget: int
) -> tuple[str, dict[str, float], ir.Model]:
    """Score each fix alone, then stack on the best one each other fix that helped alone and helps again.

    Every layer stays quantized throughout (one greedy round); the search continues from the result.
    Only fixes that raised the score on their own are stacked, and never a second range method (it
    would replace the first). When ``method=auto`` raised the score, the single range methods after it
    are not tried: auto scored each of them on held-out data already, and their evaluations are worth
    more to the layer search. At most ``budget`` evaluations are made; a fix whose model is byte for
    byte the one it started from (equalization without a Conv chain, bias correction without a bias
    to move) is not evaluated: it scores what the model it left alone scored.
    Returns the fixes kept (``"a+b"``; ``""``: none), every combination's score, and the model the
    search continues from.
    """
    scores: dict[str, float] = {}
    spent = 0
    original_bytes = serialize_model(model)

    def score_of(
        name: str, state: RequantizableState, unchanged: tuple[bytes, float]
    ) -> tuple[float, ir.Model, bytes]:
        """The fix's score, its model and that model's bytes (to tell the next fix's no-op by)."""
        nonlocal spent
        candidate = state.requantize()
        data = serialize_model(candidate)
        if data == unchanged[0]:
            logger.info("fix %s changes nothing here: not evaluated", name)
            scores[name] = unchanged[1]
            return unchanged[1], candidate, data
        spent += 1
        score = search.evaluator.score(candidate)
        scores[name] = score
        search.history.append((0, score))
        logger.info("fix %s, every layer int8: %s = %.6g", name, search.evaluator.target.name, score)
        return score, candidate, data

    original = search.state
    best: tuple[float, list[str], RequantizableState, ir.Model, bytes] | None = None
    for fix in fixes:
        if spent >= budget:
            break
        if not _applies(fix, original.config):
            continue
        if fix.startswith("method=") and scores.get("method=auto", -math.inf) > score_before:
            continue  # auto's choice beat the ranges it started from: it weighed these methods already
        if fix in COSTLY_FIXES and best is not None and search.evaluator.met(best[0]):
            continue  # a free fix met the target: no float op is worth adding
        state = original.with_fix(fix)
        score, candidate, data = score_of(fix, state, (original_bytes, score_before))
        if not math.isnan(score) and score > score_before and (best is None or score > best[0]):
            best = (score, [fix], state, candidate, data)
    if best is None:
        return "", scores, model
    helped = [
        fix for fix in fixes if fix in scores and not math.isnan(scores[fix]) and scores[fix] > score_before
    ]
    for fix in helped:
        score_now, applied, state_now, _, data_now = best
        if search.evaluator.met(score_now) or spent >= budget:
            break
        if fix in applied or not _applies(fix, state_now.config):
            continue
        if fix.startswith("method=") and any(a.startswith("method=") for a in applied):
            continue
        state = state_now.with_fix(fix)
        score, candidate, data = score_of("+".join([*applied, fix]), state, (data_now, score_now))
        if not math.isnan(score) and score > score_now:
            best = (score, [*applied, fix], state, candidate, data)
    score, applied, state, candidate, _ = best
    # The search goes on from the fixed quantization: "nothing kept float" is now this model.
    search.state = state
    search.scores = {frozenset(): score}
    entry: tuple[list[str], float, ir.Model] = ([], score, candidate)
    search.best_any = entry
    if search.evaluator.met(score):
        search.best_pass = entry
    return "+".join(applied), scores, candidate


def _search_smallest_k(search: _Search, n: int) -> None:
    """Exponential growth of k up to ``n``, then bisection between the last failing and first passing k.

    Within the search's budget: when one evaluation is left and no ``k`` has passed yet, it goes to
    ``k = n`` (the likeliest to pass); the one before it goes to the larger of the doubled ``k`` and
    the ``k`` where the line through the last two scores reaches the target
    (:func:`_extrapolated_k`), so that when that one passes, the last evaluation bisects instead of
    keeping every anchor but one float (all-mpnet-base-v2, ``cosine>=0.995``: 16 kept float scored
    0.99365, 32 0.99449, and the budget's last evaluation went to 95 of 96). The bisection stops when
    the budget does.
    """
    if n < 1:
        logger.warning("the target is not met, and the model has one anchor: nothing to keep float")
        return
    failing, passing = 0, None
    k = 1
    tried: list[tuple[int, float]] = []
    while search.remaining:
        k = n if search.remaining == 1 else min(k, n)
        if search.remaining == 2 and (guess := _extrapolated_k(tried, search.evaluator.target, n)):
            k = max(k, guess)
        score = search.evaluate(search.top(k))
        tried.append((k, score))
        if search.evaluator.met(score):
            passing = k
            break
        failing = k
        if k == n:
            logger.warning("the target is not met even with every anchor but one kept float")
            return
        k *= 2
    if passing is None:
        return
    while passing - failing > 1 and search.remaining:
        mid = (failing + passing) // 2
        if search.passes(search.top(mid)):
            passing = mid
        else:
            failing = mid


def _extrapolated_k(tried: Sequence[tuple[int, float]], target: Any, n: int) -> int | None:
    """The ``k`` at which the line through the last two ``(k, score)`` tried reaches the target.

    ``None`` when fewer than two were tried, the score did not rise, or the target has no numeric
    minimum; at least one more than the last ``k`` tried, at most ``n``.
    """
    minimum = getattr(target, "minimum", None)
    if len(tried) < 2 or not isinstance(minimum, (int, float)) or not math.isfinite(minimum):
        return None
    (k0, s0), (k1, s1) = tried[-2], tried[-1]
    if not (k1 > k0 and math.isfinite(s0) and math.isfinite(s1) and s1 > s0):
        return None
    reach = k1 + (minimum - s1) * (k1 - k0) / (s1 - s0)
    return int(min(n, max(k1 + 1, math.ceil(reach))))


def _prune(search: _Search, budget: int) -> None:
    """Re-quantize kept nodes, costliest first, while the target holds (at most ``budget`` tries).

    Without measured costs the costs are multiply-adds; ties go to the least sensitive (last ranked).
    """
    assert search.best_pass is not None
    kept = list(search.best_pass[0])
    tries = 0
    least_sensitive_first = kept[::-1]
    by_cost = sorted(least_sensitive_first, key=lambda n: -search.costs.costs.get(n, 0.0))
    for name in by_cost:
        if tries >= budget or len(kept) <= 1:
            break
        trial = [n for n in kept if n != name]
        if frozenset(trial) in search.scores:  # e.g. the k - 1 set the bisection saw fail
            continue
        tries += 1
        if search.passes(trial):
            kept = trial
