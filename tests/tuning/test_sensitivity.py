"""Sensitivity analysis: the one-pass estimate and the exact one-at-a-time analysis (with its cache).

The test model is a chain of MatMul → Relu layers in which one tensor carries a few huge outlier
channels: the producing layer's weight columns for those channels are scaled ×50 and the reading
layer's matching weight rows ÷50, so the float function is unchanged but that tensor's per-tensor
activation range is set by the outliers and quantization rounds the other channels away. In onnxq's
plan that tensor is quantized because the reading MatMul reads it quantized, so the reading layer is
the outlier-heavy (sensitive) one: keeping it float removes the damage, keeping the producer float
does not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

import onnxq
from onnxq.config import CalibrationConfig, QuantConfig
from onnxq.errors import OnnxqError
from onnxq.pipeline import QuantizationResult
from onnxq.tuning import (
    AccuracyTarget,
    CustomTarget,
    NodeSensitivity,
    TargetEvaluator,
    estimate_sensitivity,
    measure_sensitivity,
)
from onnxq.tuning import sensitivity as sensitivity_module
from onnxq.tuning.sensitivity import decision_proxy
from onnxq.tuning.targets import as_target

LAYERS = builders.CHAIN_LAYERS
WIDTH = builders.CHAIN_WIDTH
OUTLIER_READER = 3  # layer 2's output has the outlier channels; layer 3 reads them

#: Min-max ranges as they are (no range rescue).
MINMAX_ONLY = QuantConfig(calibration=CalibrationConfig(range_rescue=False))


def chain_model(outlier_reader: int | None = OUTLIER_READER, *, seed: int = 0) -> onnx.ModelProto:
    """The MatMul chain of :func:`builders.outlier_chain_model` with (at most) one outlier reader."""
    return builders.outlier_chain_model(() if outlier_reader is None else (outlier_reader,), seed=seed)


@pytest.fixture(scope="module")
def outlier_result() -> QuantizationResult:
    # min-max as it is (no range rescue): the outlier layer's loss is what the estimate must find
    return onnxq.quantize(chain_model(), builders.chain_feeds(4, seed=1), MINMAX_ONLY)


@pytest.fixture(scope="module")
def eval_feeds() -> list[dict[str, np.ndarray]]:
    return builders.chain_feeds(4, seed=2)


def _outlier_node(result: QuantizationResult) -> str:
    assert result.static is not None
    return builders.node_reading(result.static.float_model, f"w{OUTLIER_READER}")


# ---------------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(
    ("text", "metric", "minimum"),
    [
        ("sqnr>=30", "sqnr", 30.0),
        (" cosine >= 0.995 ", "cosine", 0.995),
        ("top1>=0.99", "top1", 0.99),
        ("SQNR>=-5.5", "sqnr", -5.5),
        ("sqnr>=1e1", "sqnr", 10.0),
    ],
)
def test_target_parse_valid(text: str, metric: str, minimum: float) -> None:
    target = AccuracyTarget.parse(text)
    assert (target.metric, target.minimum) == (metric, minimum)
    assert AccuracyTarget.parse(str(target)) == target


@pytest.mark.parametrize(
    "text",
    ["sqnr>30", "sqnr<=30", "psnr>=30", "sqnr>=", ">=30", "sqnr>=thirty", "", "top1>=99", "cosine>=1.5"],
)
def test_target_parse_invalid(text: str) -> None:
    with pytest.raises(OnnxqError, match=r"sqnr>=|cannot be met"):
        AccuracyTarget.parse(text)


def test_target_parse_error_names_the_accepted_forms() -> None:
    with pytest.raises(OnnxqError) as info:
        AccuracyTarget.parse("accuracy>=0.9")
    message = str(info.value)
    assert "sqnr>=" in message and "cosine>=" in message and "top1>=" in message


def test_as_target_accepts_objects_strings_and_bare_metrics() -> None:
    custom = CustomTarget(lambda model: 1.0, 0.5)
    assert as_target(custom) is custom
    assert as_target("cosine>=0.9") == AccuracyTarget("cosine", 0.9)
    assert as_target("sqnr") == AccuracyTarget("sqnr", -math.inf)
    with pytest.raises(OnnxqError):
        as_target(30)  # type: ignore[arg-type]


def test_accuracy_target_scores_over_all_outputs_and_feeds() -> None:
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((4, 10)), rng.standard_normal((4, 3))] for _ in range(3)]
    exact = [[a.copy(), b.copy()] for a, b in ref]
    noisy = [
        [a + 0.01 * rng.standard_normal(a.shape), b + 0.1 * rng.standard_normal(b.shape)] for a, b in ref
    ]
    sqnr = AccuracyTarget("sqnr", 30.0)
    assert sqnr.score(ref, exact) == math.inf
    score = sqnr.score(ref, noisy)
    # the minimum over outputs: the second output's noise is 10x larger (about 20 dB)
    assert 15.0 < score < 25.0
    assert not sqnr.met(score)
    assert AccuracyTarget("cosine", 0.99).score(ref, noisy) < 1.0
    flipped = [[-a, b] for a, b in ref]
    assert AccuracyTarget("top1", 0.5).score(ref, exact) == 1.0
    assert AccuracyTarget("top1", 0.5).score(ref, flipped) < 0.5
    assert not AccuracyTarget("sqnr", 0.0).met(math.nan)


def test_top1_needs_class_scores() -> None:
    images = [[np.ones((1, 4, 8, 8), np.float32)]]
    with pytest.raises(OnnxqError, match="class scores"):
        AccuracyTarget("top1", 0.9).score(images, images)


def test_custom_target_calls_the_user_function(outlier_result: QuantizationResult) -> None:
    seen: list[ir.Model] = []

    def evaluate(model: ir.Model) -> float:
        seen.append(model)
        return 0.75

    target = CustomTarget(evaluate, minimum=0.7, name="accuracy")
    assert str(target) == "accuracy>=0.7"
    assert outlier_result.static is not None
    evaluator = TargetEvaluator(outlier_result.static.float_model, outlier_result.static.feeds, target)
    assert evaluator.score(outlier_result.model) == 0.75
    assert seen == [outlier_result.model]
    assert evaluator.met(0.75) and not evaluator.met(0.69)
    assert evaluator.evaluations == 1
    with pytest.raises(OnnxqError, match="expected a number"):
        CustomTarget(lambda model: "high", 0.5).evaluate(outlier_result.model)  # type: ignore[arg-type,return-value]


def test_evaluator_reruns_the_reference_when_its_outputs_do_not_fit(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]]
) -> None:
    state = outlier_result.static
    assert state is not None
    feeds = onnxq.data.load_feeds(eval_feeds, onnxq.data.input_specs(state.float_model))
    target = AccuracyTarget("sqnr", 0.0)
    cached = TargetEvaluator(state.float_model, feeds, target)
    streaming = TargetEvaluator(state.float_model, feeds, target, cache_bytes=0)
    first = cached.score(outlier_result.model)
    assert cached.score(outlier_result.model) == first
    assert streaming.score(outlier_result.model) == first
    assert streaming.score(outlier_result.model) == first
    assert cached.evaluations == streaming.evaluations == 2


# ---------------------------------------------------------------------------------------------------
# One-pass estimate


def test_estimate_ranks_the_outlier_layer_first(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]]
) -> None:
    state = outlier_result.static
    assert state is not None
    estimates = estimate_sensitivity(state, outlier_result.model, eval_feeds)
    assert set(estimates) == set(state.quantized_nodes)
    ranked = sorted(estimates, key=lambda n: -estimates[n])
    outlier = _outlier_node(outlier_result)
    assert ranked[0] == outlier
    # clearly first: at least 6 dB more added noise than any other layer, and large in absolute terms
    others = [v for n, v in estimates.items() if n != outlier]
    assert estimates[outlier] > max(others) + 6.0
    assert estimates[outlier] > -20.0
    # the layer that *produces* the outlier tensor adds little: its own output is fine
    producer = builders.node_reading(state.float_model, f"w{OUTLIER_READER - 1}")
    assert estimates[producer] < estimates[outlier] - 15.0


def test_estimate_of_a_well_behaved_model_is_small() -> None:
    result = onnxq.quantize(chain_model(None), builders.chain_feeds(4, seed=1))
    assert result.static is not None
    estimates = estimate_sensitivity(result.static, result.model, builders.chain_feeds(2, seed=2))
    assert len(estimates) == LAYERS
    assert max(estimates.values()) < -25.0  # each int8 layer adds well under 0.3 % noise


def test_estimate_builds_a_qdq_model_for_qoperator_results(eval_feeds: list[dict[str, np.ndarray]]) -> None:
    result = onnxq.quantize(
        chain_model(), builders.chain_feeds(4, seed=1), onnxq.QuantConfig(format="qoperator")
    )
    assert result.static is not None
    assert not any(n.op_type == "MatMul" for n in result.model.graph)  # lowered to QLinearMatMul
    estimates = estimate_sensitivity(result.static, result.model, eval_feeds)
    assert max(estimates, key=lambda n: estimates[n]) == _outlier_node(result)


def test_estimate_does_not_change_the_models(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]]
) -> None:
    state = outlier_result.static
    assert state is not None
    float_outputs = [v.name for v in state.float_model.graph.outputs]
    quant_outputs = [v.name for v in outlier_result.model.graph.outputs]
    estimate_sensitivity(state, outlier_result.model, eval_feeds)
    assert [v.name for v in state.float_model.graph.outputs] == float_outputs
    assert [v.name for v in outlier_result.model.graph.outputs] == quant_outputs


# ---------------------------------------------------------------------------------------------------
# Exact one-at-a-time analysis


def test_measure_ranks_the_outlier_layer_first_in_both_modes(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]]
) -> None:
    state = outlier_result.static
    assert state is not None
    results = measure_sensitivity(state, "sqnr", eval_feeds, mode="both")
    assert len(results) == LAYERS
    assert all(isinstance(r, NodeSensitivity) and r.op_type == "MatMul" for r in results)
    outlier = _outlier_node(outlier_result)
    first = results[0]
    assert first.node == outlier
    assert first.only_this_quantized is not None and first.all_but_this_quantized is not None
    others = results[1:]
    # keeping the outlier layer float recovers more than 10 dB over keeping any other layer float
    assert all(
        r.all_but_this_quantized is not None
        and first.all_but_this_quantized > r.all_but_this_quantized + 10.0
        for r in others
    )
    # quantizing only the outlier layer costs far more than quantizing only any other layer
    assert all(
        r.only_this_quantized is not None and first.only_this_quantized < r.only_this_quantized - 10.0
        for r in others
    )
    # the estimate rides along
    assert first.estimate == max(r.estimate for r in results)


def test_measure_only_mode_ranks_by_damage(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]]
) -> None:
    state = outlier_result.static
    assert state is not None
    results = measure_sensitivity(state, AccuracyTarget.parse("cosine>=0.999"), eval_feeds, mode="only")
    assert results[0].node == _outlier_node(outlier_result)
    assert all(r.all_but_this_quantized is None for r in results)
    scores = [r.only_this_quantized for r in results]
    assert scores == sorted(scores)  # type: ignore[type-var]


def test_measure_selected_nodes_and_bad_arguments(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]]
) -> None:
    state = outlier_result.static
    assert state is not None
    some = list(state.quantized_nodes[:2])
    results = measure_sensitivity(state, "sqnr", eval_feeds, nodes=some)
    assert sorted(r.node for r in results) == sorted(some)
    with pytest.raises(OnnxqError, match="not a quantized anchor"):
        measure_sensitivity(state, "sqnr", eval_feeds, nodes=["no_such_node"])
    with pytest.raises(OnnxqError, match="mode"):
        measure_sensitivity(state, "sqnr", eval_feeds, mode="each")  # type: ignore[arg-type]


def test_measure_is_cached(
    outlier_result: QuantizationResult,
    eval_feeds: list[dict[str, np.ndarray]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = outlier_result.static
    assert state is not None
    calls = {"score": 0, "estimate": 0}
    real_score = TargetEvaluator.score
    real_estimate = sensitivity_module.estimate_sensitivity

    def counting_score(self: TargetEvaluator, model: ir.Model) -> float:
        calls["score"] += 1
        return real_score(self, model)

    def counting_estimate(*args: object, **kwargs: object) -> dict[str, float]:
        calls["estimate"] += 1
        return real_estimate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TargetEvaluator, "score", counting_score)
    monkeypatch.setattr(sensitivity_module, "estimate_sensitivity", counting_estimate)

    first = measure_sensitivity(state, "sqnr", eval_feeds, cache_dir=tmp_path)
    assert calls == {"score": LAYERS, "estimate": 1}
    files = list(tmp_path.glob("sensitivity-*.json"))
    assert len(files) == 1
    content = json.loads(files[0].read_text())
    assert set(content["all_but"]) == set(state.quantized_nodes)

    second = measure_sensitivity(
        state, "sqnr>=40", eval_feeds, cache_dir=tmp_path
    )  # the minimum plays no part
    assert calls == {"score": LAYERS, "estimate": 1}  # no ONNX Runtime evaluation at all
    assert second == first

    # the other mode reuses the estimate and evaluates only what is missing
    measure_sensitivity(state, "sqnr", eval_feeds, mode="both", cache_dir=tmp_path)
    assert calls == {"score": 2 * LAYERS, "estimate": 1}

    # other data, or another metric, is another cache entry
    measure_sensitivity(
        state, "sqnr", builders.chain_feeds(2, seed=9), nodes=state.quantized_nodes[:1], cache_dir=tmp_path
    )
    measure_sensitivity(state, "cosine", eval_feeds, nodes=state.quantized_nodes[:1], cache_dir=tmp_path)
    assert calls["score"] == 2 * LAYERS + 2
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 3


def test_unreadable_cache_is_ignored(
    outlier_result: QuantizationResult, eval_feeds: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    state = outlier_result.static
    assert state is not None
    nodes = state.quantized_nodes[:1]
    measure_sensitivity(state, "sqnr", eval_feeds, nodes=nodes, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("sensitivity-*.json")
    cache.write_text("{not json")
    again = measure_sensitivity(state, "sqnr", eval_feeds, nodes=nodes, cache_dir=tmp_path)
    assert again[0].all_but_this_quantized is not None
    assert json.loads(cache.read_text())["all_but"]


# ---------------------------------------------------------------------------------------------------
# The decision proxy of the measured ranking (top-1 targets)


def test_the_decision_proxy_is_the_kl_divergence_in_db_on_distributions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 16, 10))

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    reference = [[softmax(batch)] for batch in logits]
    assert decision_proxy(reference, reference) == math.inf
    scores = []
    for noise in (0.05, 0.2, 0.8):
        actual = [[softmax(batch + noise * rng.standard_normal(batch.shape))] for batch in logits]
        p, q = np.concatenate([r[0] for r in reference]), np.concatenate([a[0] for a in actual])
        kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
        scores.append(decision_proxy(reference, actual))
        assert scores[-1] == pytest.approx(-10 * math.log10(kl), rel=1e-4)
    assert scores[0] > scores[1] > scores[2]  # smooth: more logit noise, lower


def test_the_decision_proxy_is_the_lowest_output_sqnr_elsewhere() -> None:
    rng = np.random.default_rng(1)
    logits = [rng.standard_normal((4, 10)).astype(np.float32) for _ in range(3)]
    boxes = [rng.standard_normal((4, 4)).astype(np.float32) for _ in range(3)]
    noisy = [b + np.float32(0.1) * rng.standard_normal(b.shape).astype(np.float32) for b in boxes]
    reference = [[a, b] for a, b in zip(logits, boxes, strict=True)]
    actual = [[a, b] for a, b in zip(logits, noisy, strict=True)]
    expected = 10 * math.log10(
        sum(float(np.sum(b.astype(np.float64) ** 2)) for b in boxes)
        / sum(float(np.sum((b - n).astype(np.float64) ** 2)) for b, n in zip(boxes, noisy, strict=True))
    )
    assert decision_proxy(reference, actual) == pytest.approx(expected, rel=1e-6)
