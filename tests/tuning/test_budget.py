"""Accuracy-budgeted mixed precision: the search keeps few anchors float, cheaply, and the result holds
on held-out data.

The test model is the MatMul chain of ``test_sensitivity`` (rebuilt here): one layer reads a tensor with
a few ×50 outlier channels, which per-tensor activation quantization ruins.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable
from typing import Any

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

import onnxq
from onnxq.config import CalibrationConfig, LatencyGuardConfig
from onnxq.data import input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.pipeline import QuantizationResult
from onnxq.tuning import AccuracyTarget, BudgetOutcome, CustomTarget, TargetEvaluator, budget, meet_target
from onnxq.tuning.sensitivity import estimate_sensitivity, rank_by_estimate

LAYERS = builders.CHAIN_LAYERS
WIDTH = builders.CHAIN_WIDTH

#: Min-max ranges as they are (no range rescue).
MINMAX_ONLY = onnxq.QuantConfig(calibration=CalibrationConfig(range_rescue=False))


def held_out_score(result: QuantizationResult, model: ir.Model, target: AccuracyTarget, seed: int) -> float:
    assert result.static is not None
    float_model = result.static.float_model
    feeds = load_feeds(builders.chain_feeds(6, seed=seed), input_specs(float_model), what="evaluation")
    return TargetEvaluator(float_model, feeds, target).score(model)


def layer_search(*args: Any, **kwargs: Any) -> BudgetOutcome:
    """:func:`meet_target` without the cheaper fixes: these tests pin down the layer search itself
    (the fixes have their own tests below)."""
    return meet_target(*args, fixes=(), **kwargs)


@pytest.fixture(scope="module")
def outlier_result() -> QuantizationResult:
    # min-max as it is (no range rescue): the search has the outlier layer's loss to recover
    return onnxq.quantize(builders.outlier_chain_model(), builders.chain_feeds(4, seed=1), MINMAX_ONLY)


def count_float_anchors(model: ir.Model) -> int:
    """Anchors whose data input is not dequantized: what a user function might inspect."""
    count = 0
    for node in model.graph:
        if node.op_type == "MatMul":
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            if producer is None or producer.op_type != "DequantizeLinear":
                count += 1
    return count


# ---------------------------------------------------------------------------------------------------
# The search on a real metric


def test_meets_the_target_on_held_out_data_keeping_one_layer_float(
    outlier_result: QuantizationResult,
) -> None:
    target = AccuracyTarget.parse("sqnr>=25")
    outcome = layer_search(outlier_result, target, builders.chain_feeds(6, seed=2))
    assert isinstance(outcome, BudgetOutcome)
    assert outcome.met
    assert outcome.score_before < 20.0 <= 25.0 <= outcome.score_after
    assert outcome.target == "sqnr>=25"
    assert outcome.anchors == LAYERS
    # the outlier layer, and nothing else, stays float; its estimate says why
    assert outlier_result.static is not None
    outlier = builders.node_reading(outlier_result.static.float_model, "w3")
    assert outcome.kept_float == [outlier]
    assert outcome.kept_estimates[outlier] == max(outcome.estimates.values())
    assert outcome.kept_estimates[outlier] > -20.0
    # far fewer evaluations than one per layer, let alone two
    assert outcome.evaluations <= 3 < LAYERS
    assert outcome.history[0] == (0, outcome.score_before)
    assert outcome.history[-1] == (1, outcome.score_after)
    assert len(outcome.history) == outcome.evaluations
    # costs are reported
    assert outcome.search_seconds > 0.0
    assert 0.0 < outcome.full_evaluation_seconds < outcome.search_seconds
    assert outcome.estimate_seconds > 0.0
    # and the result holds on other data, with a little margin
    assert held_out_score(outlier_result, outcome.model, AccuracyTarget("sqnr", 22.0), seed=3) >= 22.0
    assert held_out_score(outlier_result, outlier_result.model, AccuracyTarget("sqnr", 22.0), seed=3) < 22.0
    # the model is a QDQ model with exactly one MatMul left float
    assert count_float_anchors(outcome.model) == 1
    assert "kept float" in outcome.summary() and outlier in outcome.summary()
    assert outcome.as_dict()["kept_float"] == [outlier]


def test_two_outlier_layers_need_two_float_layers() -> None:
    result = onnxq.quantize(builders.outlier_chain_model((2, 4)), builders.chain_feeds(4, seed=1))
    assert result.static is not None
    outcome = layer_search(result, "sqnr>=25", builders.chain_feeds(6, seed=2))
    assert outcome.met
    expected = {builders.node_reading(result.static.float_model, w) for w in ("w2", "w4")}
    assert set(outcome.kept_float) == expected
    assert outcome.evaluations <= 4  # k = 0, 1, 2 (and perhaps a prune try)
    assert held_out_score(result, outcome.model, AccuracyTarget("sqnr", 22.0), seed=3) >= 22.0


def test_a_model_that_already_meets_the_target_is_returned_as_is() -> None:
    result = onnxq.quantize(builders.outlier_chain_model(()), builders.chain_feeds(4, seed=1))
    outcome = layer_search(result, AccuracyTarget.parse("cosine>=0.99"), builders.chain_feeds(4, seed=2))
    assert outcome.met
    assert outcome.kept_float == []
    assert outcome.evaluations == 1
    assert outcome.model is result.model
    assert outcome.history == [(0, outcome.score_before)]
    assert outcome.score_after == outcome.score_before
    assert outcome.full_evaluation_seconds > 0.0
    assert outcome.estimates == {}  # no ranking needed


def test_custom_target_with_a_user_evaluation_function(outlier_result: QuantizationResult) -> None:
    """A user function: mean squared error against the float model on the user's own data."""
    import onnxruntime as ort

    from onnxq.load.files import serialize_model

    assert outlier_result.static is not None
    data = builders.chain_feeds(4, seed=5)
    float_session = ort.InferenceSession(
        serialize_model(outlier_result.static.float_model), providers=["CPUExecutionProvider"]
    )
    expected = [float_session.run(None, feed)[0] for feed in data]
    calls: list[int] = []

    def negative_mse(model: ir.Model) -> float:
        calls.append(1)
        session = ort.InferenceSession(serialize_model(model), providers=["CPUExecutionProvider"])
        errors = [np.mean((session.run(None, f)[0] - e) ** 2) for f, e in zip(data, expected, strict=True)]
        return -float(np.mean(errors))

    baseline = negative_mse(outlier_result.model)
    calls.clear()
    target = CustomTarget(negative_mse, minimum=baseline / 10.0, name="-mse")
    outcome = layer_search(outlier_result, target, builders.chain_feeds(4, seed=2))
    assert outcome.met
    assert len(calls) == outcome.evaluations <= 3
    assert outcome.score_after >= baseline / 10.0
    assert len(outcome.kept_float) == 1
    assert outcome.target.startswith("-mse>=")


# ---------------------------------------------------------------------------------------------------
# The search logic, with user functions that make the answer known


def _ranked(result: QuantizationResult, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    assert result.static is not None
    estimates = estimate_sensitivity(result.static, result.model, feeds)
    return rank_by_estimate(estimates, list(result.static.quantized_nodes))


def _float_names(model: ir.Model) -> set[str]:
    names = set()
    for node in model.graph:
        if node.op_type == "MatMul":
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            if producer is None or producer.op_type != "DequantizeLinear":
                names.add(node.name or "")
    return names


def test_exponential_growth_then_bisection(outlier_result: QuantizationResult) -> None:
    feeds = builders.chain_feeds(4, seed=2)
    ranked = _ranked(outlier_result, feeds)
    needed = set(ranked[:5])  # the target holds once the 5 most sensitive layers are float

    def score(model: ir.Model) -> float:
        return float(len(needed & _float_names(model)))

    outcome = layer_search(outlier_result, CustomTarget(score, 5.0), feeds)
    assert outcome.met
    assert outcome.kept_float == ranked[:5]
    # 0 (all int8), 1, 2, 4 fail; 8 is capped at 5 (one anchor must stay quantized) and passes;
    # nothing left to bisect; then prune tries (4 is known to fail)
    assert [k for k, _ in outcome.history[:5]] == [0, 1, 2, 4, 5]
    assert [k for k, _ in outcome.history[5:]] == [4, 4, 4]  # three prune tries, all failing
    assert outcome.evaluations == 8


def test_greedy_prune_drops_nodes_the_ranking_put_too_high(outlier_result: QuantizationResult) -> None:
    feeds = builders.chain_feeds(4, seed=2)
    ranked = _ranked(outlier_result, feeds)
    needed = {ranked[0], ranked[3]}

    def score(model: ir.Model) -> float:
        return float(len(needed & _float_names(model)))

    outcome = layer_search(outlier_result, CustomTarget(score, 2.0), feeds)
    assert outcome.met
    assert outcome.kept_float == [ranked[0], ranked[3]]
    # 0, 1, 2 fail; 4 passes; 3 fails; prune (ranked[3] is skipped: dropping it gives the failed
    # top-3): drop ranked[2] (passes), drop ranked[1] (passes), drop ranked[0] (fails)
    assert [k for k, _ in outcome.history] == [0, 1, 2, 4, 3, 3, 2, 1]
    assert outcome.evaluations == 8

    no_prune = layer_search(outlier_result, CustomTarget(score, 2.0), feeds, prune_evaluations=0)
    assert no_prune.kept_float == ranked[:4]
    assert no_prune.evaluations == 5


def test_a_target_that_cannot_be_met(outlier_result: QuantizationResult) -> None:
    scores = iter(float(i) for i in range(100))

    outcome = layer_search(
        outlier_result, CustomTarget(lambda model: next(scores), 1000.0), builders.chain_feeds(2, 2)
    )
    assert not outcome.met
    # Up to every anchor but one float (all float would be the float model, not an answer), then stop.
    assert [k for k, _ in outcome.history] == [0, 1, 2, 4, 5]
    assert outcome.score_after == 4.0  # the best found: the last variant
    assert outcome.kept_float and len(outcome.kept_float) == LAYERS - 1


def test_bad_inputs(outlier_result: QuantizationResult) -> None:
    feeds = builders.chain_feeds(2, seed=2)
    dynamic = onnxq.quantize(builders.outlier_chain_model(), config=onnxq.QuantConfig(mode="dynamic"))
    with pytest.raises(OnnxqError, match="static quantization"):
        meet_target(dynamic, "sqnr>=30", feeds)
    with pytest.raises(OnnxqError, match="not understood"):
        meet_target(outlier_result, "sqnr>30", feeds)
    with pytest.raises(OnnxqError, match="no minimum"):
        meet_target(outlier_result, "sqnr", feeds)
    with pytest.raises(OnnxqError, match="top-1"):
        meet_target(onnxq.quantize(_conv_model(), _conv_feeds()), "top1>=0.9", _conv_feeds())


def test_calibration_data_is_used_when_no_evaluation_data_is_given(
    outlier_result: QuantizationResult, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = layer_search(outlier_result, "sqnr>=25", None)
    assert outcome.met and len(outcome.kept_float) == 1
    assert "calibration data" in caplog.text
    assert not math.isnan(outcome.score_after)


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
            y = Conv<pads = [1, 1, 1, 1]>(x, w)
        }"""
    )
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    )
    return model


def _conv_feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]


# ---------------------------------------------------------------------------------------------------
# Cheaper fixes first: every layer stays quantized when one of them meets the target


#: The fix tests start from a quantization without the default outlier smoothing, so that smoothing
#: is one of the fixes to find.
NO_SMOOTH = onnxq.QuantConfig(
    smooth=False, run_time_ranges=False, calibration=CalibrationConfig(range_rescue=False)
)


def test_a_fix_that_meets_the_target_keeps_every_layer_quantized() -> None:
    """Five outlier layers: keeping layers float would need several of them; smoothing (with enough
    calibration rows) meets sqnr>=25 with none kept float — the fastest model that meets it."""
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    result = onnxq.quantize(proto, builders.chain_feeds(64, seed=1), NO_SMOOTH)  # smoothing is a fix here
    outcome = meet_target(result, "sqnr>=25", builders.chain_feeds(8, seed=2))
    assert outcome.met and outcome.kept_float == []
    assert outcome.fix == "smooth" and outcome.fixes["smooth"] >= 25.0 > outcome.score_before
    assert {"method=auto", "smooth", "equalize", "bias_correction"} <= set(outcome.fixes)
    # auto raised the score, so the single range methods it weighed already cost no evaluation
    assert outcome.fixes["method=auto"] > outcome.score_before
    assert not {"method=percentile", "method=mse"} & set(outcome.fixes)
    assert count_float_anchors(outcome.model) == 0
    assert "applied: smooth" in outcome.summary()
    assert held_out_score(result, outcome.model, AccuracyTarget("sqnr", 22.0), seed=3) >= 22.0


def test_range_method_auto_is_a_fix_that_keeps_every_layer_quantized() -> None:
    """Two MatMuls whose inputs want different range methods (entropy for a spiky one, a wide range
    for one with a large channel): no uniform method reaches sqnr>=22 (min-max, percentile and MSE
    ~9.5 dB), the per-tensor choice of ``method=auto`` does (23.0 dB measured) with no layer float."""
    proto, calib, held_out = builders.two_branch_model_and_data()
    config = onnxq.QuantConfig(
        smooth=False,
        latency_guard=LatencyGuardConfig(enabled=False),
        run_time_ranges=False,
        calibration=CalibrationConfig(range_rescue=False),  # auto is the fix to find
    )
    result = onnxq.quantize(proto, calib, config)
    outcome = result.meet_target(AccuracyTarget.parse("sqnr>=22"), held_out)
    assert outcome.met and outcome.kept_float == [] and outcome.fix == "method=auto"
    assert outcome.fixes["method=auto"] >= 22.0 > outcome.score_before
    assert "method=percentile" not in outcome.fixes  # auto helped: the methods it weighed are not retried
    assert result.static is not None and result.static.config.calibration.method == "auto"
    # The report says which ranges the written model has, and which fix the search applied.
    assert result.report.scheme["calibration"] == "auto"
    text = result.report.format_table()
    assert "calibration=auto" in text and "applied to every layer: method=auto" in text


def test_single_range_methods_are_tried_when_auto_does_not_help() -> None:
    """One Conv on Gaussian data: auto keeps min-max (its model is the quantized one, byte for byte),
    so percentile and MSE ranges get their own evaluations."""
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    config = onnxq.QuantConfig(latency_guard=LatencyGuardConfig(enabled=False))
    outcome = meet_target(onnxq.quantize(_conv_model(), calib, config), "sqnr>=80", _conv_feeds())
    assert outcome.fixes["method=auto"] == outcome.score_before
    assert {"method=percentile", "method=mse"} <= set(outcome.fixes)
    assert outcome.fixes["method=percentile"] != outcome.score_before  # really evaluated


def test_a_fix_that_helps_is_kept_under_the_layer_search() -> None:
    """With a target no fix reaches alone, the layer search continues from the best fix, and keeps
    fewer layers float than without it."""
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    result = onnxq.quantize(proto, builders.chain_feeds(64, seed=1), NO_SMOOTH)  # smoothing is a fix here
    feeds = builders.chain_feeds(8, seed=2)
    with_fixes = meet_target(result, "sqnr>=38", feeds)
    without = layer_search(result, "sqnr>=38", feeds)
    assert "smooth" in with_fixes.fix.split("+")  # run-time ranges may stack on it: they help here too
    assert with_fixes.met and without.met
    assert len(with_fixes.kept_float) < len(without.kept_float)


def test_the_result_keeps_the_fixed_quantization() -> None:
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    result = onnxq.quantize(proto, builders.chain_feeds(64, seed=1), NO_SMOOTH)  # smoothing is a fix here
    before = result.static
    outcome = result.meet_target(AccuracyTarget.parse("sqnr>=25"), builders.chain_feeds(8, seed=2))
    assert outcome.fix == "smooth" and result.static is not before
    assert result.static is not None and result.static.config.smooth
    assert result.report.budget["fix"] == "smooth"


def test_only_fixes_that_helped_alone_are_stacked() -> None:
    """An unreachable target runs every stacking step: each stacked fix raised the score alone, and
    no combination holds two range methods (the second would replace the first)."""
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    result = onnxq.quantize(proto, builders.chain_feeds(64, seed=1), NO_SMOOTH)
    outcome = meet_target(result, "sqnr>=80", builders.chain_feeds(8, seed=2))
    alone = {name: score for name, score in outcome.fixes.items() if "+" not in name}
    helped = {name for name, score in alone.items() if score > outcome.score_before}
    combos = [name.split("+") for name in outcome.fixes if "+" in name]
    assert helped and combos
    for parts in combos:
        assert set(parts[1:]) <= helped, parts
        assert sum(p.startswith("method=") for p in parts) <= 1, parts
    assert len(combos) <= len(helped) - 1  # one try per other helpful fix, on top of the best one


def test_the_search_stays_within_its_evaluation_budget(outlier_result: QuantizationResult) -> None:
    """Short of budget while k grows, the last evaluation goes to the largest k: a passing model is
    still found, and no more evaluations are made than allowed."""
    feeds = builders.chain_feeds(4, seed=2)
    ranked = _ranked(outlier_result, feeds)
    needed = set(ranked[:5])

    def score(model: ir.Model) -> float:
        return float(len(needed & _float_names(model)))

    outcome = layer_search(outlier_result, CustomTarget(score, 5.0), feeds, max_evaluations=4)
    assert outcome.met and outcome.kept_float == ranked[:5]
    # 0 (all int8), 1, 2 fail; the one evaluation left goes to k = 5 (every anchor but one)
    assert [k for k, _ in outcome.history] == [0, 1, 2, 5]
    assert outcome.evaluations == 4
    # the default budget covers the whole search here (8 evaluations, test above)
    assert layer_search(outlier_result, CustomTarget(score, 5.0), feeds).evaluations == 8
    with pytest.raises(OnnxqError, match="max_evaluations"):
        layer_search(outlier_result, CustomTarget(score, 5.0), feeds, max_evaluations=1)


def test_a_fix_that_changes_nothing_costs_no_evaluation() -> None:
    """Equalization finds no Conv chain in a MatMul chain and bias correction no bias: their models are
    the quantized model byte for byte, so they score what it scored, without an evaluation."""
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    result = onnxq.quantize(proto, builders.chain_feeds(64, seed=1), NO_SMOOTH)
    outcome = meet_target(result, "sqnr>=80", builders.chain_feeds(8, seed=2))
    assert outcome.fixes["equalize"] == outcome.fixes["bias_correction"] == outcome.score_before
    evaluated_fixes = [score for kept, score in outcome.history[1:] if kept == 0]
    assert outcome.fixes["smooth"] in evaluated_fixes
    assert outcome.score_before not in evaluated_fixes
    assert len(outcome.history) == outcome.evaluations <= 12


class _ScoreOfK:
    """A stand-in for the search: the score of keeping the top ``k`` float is ``score(k)``."""

    def __init__(self, budget: int, score: Callable[[int], float], minimum: float) -> None:
        self.left = budget
        self.score = score
        self.evaluator = types.SimpleNamespace(
            target=types.SimpleNamespace(minimum=minimum), met=lambda s: s >= minimum
        )
        self.tried: list[int] = []

    @property
    def remaining(self) -> int:
        return self.left

    def top(self, k: int) -> list[str]:
        return [f"n{i}" for i in range(k)]

    def evaluate(self, kept: list[str]) -> float:
        self.left -= 1
        self.tried.append(len(kept))
        return self.score(len(kept))

    def passes(self, kept: list[str]) -> bool:
        return bool(self.evaluator.met(self.evaluate(kept)))


def test_the_second_last_evaluation_goes_where_the_scores_reach_the_target() -> None:
    """96 anchors, a score rising by 1e-4 per anchor kept float, met from 50 on: 1, 2, 4, 8, 16 fail;
    the line through 8 and 16 reaches the target at 50 (not the doubled 32, which would fail and leave
    the last evaluation to 95); then one bisection step (33 fails)."""
    search = _ScoreOfK(7, lambda k: 0.99 + 1e-4 * k, 0.99495)
    budget._search_smallest_k(search, 95)  # type: ignore[arg-type]
    assert search.tried == [1, 2, 4, 8, 16, 50, 33]
    # A score that does not rise gives no line: the doubled k, then every anchor but one.
    flat = _ScoreOfK(7, lambda k: 0.99 if k < 95 else 1.0, 0.995)
    budget._search_smallest_k(flat, 95)  # type: ignore[arg-type]
    assert flat.tried == [1, 2, 4, 8, 16, 32, 95]


def test_the_extrapolated_k_is_bounded() -> None:
    target = types.SimpleNamespace(minimum=1.0)
    assert budget._extrapolated_k([(1, 0.1)], target, 10) is None
    assert budget._extrapolated_k([(1, 0.5), (2, 0.5)], target, 10) is None  # no rise, no line
    assert budget._extrapolated_k([(1, 0.1), (2, 0.2)], target, 5) == 5  # capped at n
    assert budget._extrapolated_k([(1, 0.1), (2, 0.99)], target, 10) == 3  # at least one more
    assert budget._extrapolated_k([(1, 0.1), (2, 0.2)], types.SimpleNamespace(), 10) is None


def test_a_dynamic_lstm_is_a_candidate_to_keep_float() -> None:
    """Static mode runs LSTMs as DynamicQuantizeLSTM. One over an input spread enough to cost accuracy
    (28.8 dB) but not so much that the default keeps it float (its own noise -29 dB, the limit -20 dB):
    the one-pass estimate ranks it above the MatMul, and keeping it float meets ``sqnr>=35``. Before,
    the search only knew the Conv/Gemm/MatMul anchors ("nothing to keep float")."""
    proto, calib, held_out = builders.lstm_on_spread_input(spread=1.3)
    result = onnxq.quantize(proto, calib, onnxq.QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)))
    assert result.static is not None
    assert builders.op_counts(result.model)["DynamicQuantizeLSTM"] == 1
    estimates = estimate_sensitivity(result.static, result.model, held_out)
    assert rank_by_estimate(estimates, ["MatMul", "LSTM"]) == ["LSTM", "MatMul"]
    outcome = meet_target(result, "sqnr>=35", held_out)
    assert outcome.score_before < 32.0
    assert outcome.met and outcome.kept_float == ["LSTM"] and outcome.score_after > 40.0
    assert builders.op_counts(outcome.model).get("DynamicQuantizeLSTM", 0) == 0


# ---------------------------------------------------------------------------------------------------
# Top-1 targets: the anchors ranked by measurement


@pytest.fixture(scope="module")
def classifier_result() -> QuantizationResult:
    """The outlier chain with calibrated ranges on every MatMul; its 32 outputs read as class scores
    (top-1 agreement with float 0.67 all int8, 1.0 with the outlier layer float)."""
    config = onnxq.QuantConfig(calibration=CalibrationConfig(range_rescue=False), run_time_ranges=False)
    return onnxq.quantize(builders.outlier_chain_model(), builders.chain_feeds(4, seed=1), config)


def _estimate_ranking_the_outlier_last(monkeypatch: pytest.MonkeyPatch, outlier: str) -> None:
    def misleading(state: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        return {name: (-100.0 if name == outlier else -10.0) for name in state.quantized_nodes}

    monkeypatch.setattr(budget, "estimate_sensitivity", misleading)


def test_a_top1_target_ranks_the_layers_by_measurement(
    classifier_result: QuantizationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The top-1 score moves in steps and the estimate's local proxy can misrank (module doc): with an
    estimate that puts the outlier layer last, a search in its order misses the target even with five
    of six layers float, while the measured ranking puts that layer first and meets it with one."""
    assert classifier_result.static is not None
    outlier = builders.node_reading(classifier_result.static.float_model, "w3")
    _estimate_ranking_the_outlier_last(monkeypatch, outlier)
    feeds = builders.chain_feeds(6, seed=2)

    outcome = layer_search(classifier_result, "top1>=0.99", feeds)
    assert outcome.score_before < 0.9
    assert outcome.met and outcome.kept_float == [outlier] and outcome.score_after == 1.0
    assert outcome.evaluations == 2  # all int8, then the top-ranked layer float
    assert outcome.measured_anchors == LAYERS and outcome.measured_batches == len(feeds)
    assert set(outcome.measured) == {outlier}
    assert "ranking: 6 anchors kept float one at a time" in outcome.summary()
    assert outcome.as_dict()["measured_anchors"] == LAYERS
    # The report's budget line says what the ranking cost.
    report = copy.deepcopy(classifier_result.report)
    report.budget = outcome.as_dict()
    (line,) = [row[1] for row in report._summary_rows() if row[0] == "accuracy budget"]
    assert "layers ranked by keeping each of 6 float alone on 6 batch(es)" in line
    # An SQNR target keeps the estimate's ranking (it is smooth already): in this one's order, the
    # outlier layer comes last and stays int8 even at five of six float.
    by_estimate = layer_search(classifier_result, "sqnr>=25", feeds)
    assert by_estimate.measured_anchors == 0 and not by_estimate.met
    assert outlier not in by_estimate.kept_float


def test_the_measured_ranking_is_bounded(
    classifier_result: QuantizationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the anchors the estimate ranks first are measured, on the first evaluation batches."""
    assert classifier_result.static is not None
    monkeypatch.setattr(budget, "RANKING_MAX_ANCHORS", 2)
    monkeypatch.setattr(budget, "RANKING_BATCHES", 3)
    outcome = layer_search(classifier_result, "top1>=0.99", builders.chain_feeds(6, seed=2))
    assert outcome.measured_anchors == 2 and outcome.measured_batches == 3
    assert outcome.met
