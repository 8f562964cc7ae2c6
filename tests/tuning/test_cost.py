"""What keeping an anchor float costs (onnxq.tuning.cost), and the search that keeps the cheapest set."""

from __future__ import annotations

import math
from typing import Any

import builders
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.runtime.latency import LatencyResult
from onnxq.tuning import budget
from onnxq.tuning.budget import meet_target
from onnxq.tuning.cost import AnchorCosts, anchor_costs
from onnxq.tuning.targets import CustomTarget

CHAIN = """
chain (float[1, 8, 32, 32] x) => (float[1, 8, 32, 32] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w3)
    c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (c1, wdw)
    y = Conv <kernel_shape = [1, 1]> (c2, w1)
}
"""
# multiply-adds per sample: c1 8·1024·72 = 589824 ("Conv"), c2 8·1024·9 = 73728 ("small depthwise
# Conv"), y 8·1024·8 = 65536 ("small 1x1 Conv")


def chain_model() -> ir.Model:
    arrays = builders.normal_arrays(0, w3=(8, 8, 3, 3), wdw=(8, 1, 3, 3), w1=(8, 8, 1, 1))
    model = ir.from_proto(onnx.shape_inference.infer_shapes(builders.parse(CHAIN, arrays)))
    for node in model.graph:
        node.name = node.outputs[0].name
    return model


def test_without_timings_the_cost_is_multiply_adds() -> None:
    costs = anchor_costs(chain_model(), ["c1", "c2", "y"])
    assert costs.unit == "MACs" and costs.costs == {"c1": 589824, "c2": 73728, "y": 65536}
    assert math.isnan(costs.latency_ms(["c1"]))
    assert costs.share(["c1"]) == pytest.approx(589824 / (589824 + 73728 + 65536))


def test_the_guards_timings_give_each_anchor_its_measured_cost() -> None:
    guard: dict[str, Any] = {
        "latency_ms": {
            "input": 10.0,
            "quantized": 4.0,
            "keep small depthwise Conv float": 4.5,  # the depthwise Conv costs 0.5 ms float
            "keep small 1x1 Conv float": 3.9,  # as fast float: free within the timings' noise
        },
        "chosen": "quantized",
    }
    costs = anchor_costs(chain_model(), ["c1", "c2", "y"], guard)
    assert costs.unit == "ms"
    assert costs.costs["c2"] == pytest.approx(0.5)
    # the untimed (trusted) kind carries what float costs beyond the timed kinds: 10 - 4 - 0.5
    assert costs.costs["c1"] == pytest.approx(5.5)
    # measured free, floored at 1 % of the mean cost
    assert 0 < costs.costs["y"] < 0.05
    assert costs.latency_ms([]) == 4.0
    assert costs.latency_ms(["c1", "c2"]) == pytest.approx(10.0)


def test_the_prune_drops_the_costliest_kept_layer_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target holds once the 2nd and 3rd most sensitive MatMuls are float: the growth finds the top
    three; the one prune try then drops the most sensitive one, which costs the most, and the outcome
    estimates the answer's latency."""
    result = onnxq.quantize(builders.outlier_chain_model(), builders.chain_feeds(4, seed=1))
    assert result.static is not None
    anchors = list(result.static.quantized_nodes)
    feeds = builders.chain_feeds(4, seed=2)
    estimates = budget.estimate_sensitivity(result.static, result.model, feeds)
    first, second, third = sorted(anchors, key=lambda n: -estimates[n])[:3]
    made_up = AnchorCosts({n: 1e6 if n == first else 1.0 for n in anchors}, "ms", 2.0)
    monkeypatch.setattr(budget, "anchor_costs", lambda model, names, guard: made_up)

    def score(model: ir.Model) -> float:
        kept = {n.name for n in model.graph if n.op_type == "MatMul" and not _reads_dequantized(n)}
        return float({second, third} <= kept)

    outcome = meet_target(result, CustomTarget(score, 1.0), feeds, fixes=(), prune_evaluations=1)
    assert outcome.met and set(outcome.kept_float) == {second, third}
    assert outcome.latency_ms == pytest.approx(4.0) and outcome.all_int8_latency_ms == 2.0
    assert "estimated latency 4 ms (all int8 2 ms" in outcome.summary()
    # without costs, the one try goes to the least sensitive kept layer, and fails
    monkeypatch.setattr(budget, "anchor_costs", lambda model, names, guard: AnchorCosts())
    outcome = meet_target(result, CustomTarget(score, 1.0), feeds, fixes=(), prune_evaluations=1)
    assert set(outcome.kept_float) == {first, second, third}


def _reads_dequantized(node: ir.Node) -> bool:
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def test_the_report_shows_the_speed_next_to_the_target() -> None:
    result = onnxq.quantize(builders.outlier_chain_model(), builders.chain_feeds(4, seed=1))
    outcome = result.meet_target("sqnr>=25", builders.chain_feeds(4, seed=2))
    # no latency guard in the tests: the cost is the kept layers' share of the multiply-adds
    assert outcome.speed_line().startswith("kept-float anchors carry")
    assert 0.0 <= outcome.cost_share < 1.0
    row = next(line for line in result.report.format_table().splitlines() if "accuracy budget" in line)
    assert "of the quantized layers' multiply-adds" in row


@pytest.mark.parametrize(("chosen_ms", "returned"), [(1.0, False), (2.0, True)], ids=["faster", "as-slow"])
def test_a_model_no_faster_than_float_gives_the_float_model(
    monkeypatch: pytest.MonkeyPatch, chosen_ms: float, returned: bool
) -> None:
    """With the guard's settings, the chosen model is timed against the user's float model (timings made
    up here: float 2 ms): as slow as float, the float model is returned, meeting the target."""
    proto = builders.outlier_chain_model()
    result = onnxq.quantize(proto, builders.chain_feeds(4, seed=1), onnxq.QuantConfig(run_time_ranges=False))

    def time_sessions(sessions: dict[str, Any], feed: object, **_: object) -> dict[str, LatencyResult]:
        ms = {"float": 2.0, "chosen": chosen_ms}
        return {name: LatencyResult(name, 1, ms[name], ms[name], 5, (ms[name],)) for name in sessions}

    monkeypatch.setattr(budget, "time_sessions", time_sessions)
    guard = {"threads": 1, "latency_ms": {"input": 2.0, "quantized": 1.0}, "chosen": "quantized"}
    feeds = builders.chain_feeds(4, seed=2)
    outcome = meet_target(
        result, "sqnr>=30", feeds, fixes=(), guard=guard, baseline=proto.SerializeToString()
    )
    assert outcome.met and outcome.kept_float and outcome.float_returned is returned
    assert (outcome.measured_ms, outcome.float_ms) == (chosen_ms, 2.0)
    ops = {n.op_type for n in outcome.model.graph}
    assert ("DequantizeLinear" not in ops) is returned
    assert ("the float model is returned" in outcome.speed_line()) is returned
    if returned:
        assert outcome.score_after == math.inf
