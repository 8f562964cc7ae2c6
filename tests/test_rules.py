"""Tests for onnxq.rules: the match → check → rewrite traversal every rewrite pass is built on.

The rules here are written for the tests and are exact in float arithmetic, so every rewritten model is
run in ONNX Runtime (``ORT_DISABLE_ALL``) against its original and must agree bit for bit:

- ``ReluToMax``: ``Relu(x)`` → ``Max(x, 0)`` (a new zero initializer in the node's own graph);
- ``SubToAdd``: ``Sub(a, c)`` with a constant ``c`` → ``Add(a, -c)``; declines a non-constant ``c``;
- ``AddToSub``: the reverse, so a table holding both shows that new nodes are not visited again;
- ``FoldNegNeg``: ``Neg(Neg(x))`` → ``x``, matched on the first Neg, removing its consumer too.

Every rule records its calls in the context, so the tests can say which nodes were asked, in which
order, and that ``check``/``kernel``/``rewrite`` were (or were not) reached.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.declines import Decline, Reason
from onnxq.graph import NameScope, const_array, make_initializer, node_label
from onnxq.rules import Kernel, Rule, RuleOutcome, apply_rules, graphs_of
from onnxq.runtime.kernels import kernel_table
from onnxq.runtime.session import make_session, run

F32, I8, U8 = ir.DataType.FLOAT, ir.DataType.INT8, ir.DataType.UINT8
OPSET = 17

# ---------------------------------------------------------------------------------------------------
# Test rules


@dataclass
class Ctx:
    """What the rules share: fresh names, and a log of ``(step, node label)`` calls."""

    names: NameScope
    calls: list[tuple[str, str]] = field(default_factory=list)

    def asked(self, step: str) -> list[str]:
        return [label for s, label in self.calls if s == step]


def _ctx(model: ir.Model) -> Ctx:
    return Ctx(NameScope(model.graph))


def _replace(old: ir.Node, op_type: str, inputs: list[ir.Value]) -> ir.Node:
    """Put a new ``op_type`` node where ``old`` was: same name, same output value name and uses."""
    new = ir.Node("", op_type, inputs, name=old.name)
    ir.convenience.replace_nodes_and_values(
        old.graph,  # type: ignore[arg-type]
        old,
        [old],
        [new],
        [old.outputs[0]],
        [new.outputs[0]],
    )
    return new


@dataclass
class _Unary:
    node: ir.Node
    ctx: Ctx


class ReluToMax(Rule[_Unary, Ctx]):
    """``Relu(x)`` → ``Max(x, 0)``; ``kernel`` is what ``kernel()`` answers (default: nothing to check)."""

    op_types = ("Relu",)

    def __init__(self, kernel: Kernel | None = None) -> None:
        self._kernel = kernel

    def match(self, node: ir.Node, ctx: Ctx) -> _Unary | None:
        ctx.calls.append(("match", node_label(node)))
        return _Unary(node, ctx)

    def check(self, match: _Unary) -> Reason | None:
        match.ctx.calls.append(("check", node_label(match.node)))
        return None

    def kernel(self, match: _Unary) -> Kernel | None:
        match.ctx.calls.append(("kernel", node_label(match.node)))
        return self._kernel

    def rewrite(self, match: _Unary) -> str:
        match.ctx.calls.append(("rewrite", node_label(match.node)))
        graph = match.node.graph
        assert graph is not None
        zero = make_initializer(graph, match.ctx.names, "zero", np.array(0.0, np.float32))
        _replace(match.node, "Max", [match.node.inputs[0], zero])  # type: ignore[list-item]
        return "Max"


@dataclass
class _Binary:
    node: ir.Node
    constant: ir.Value
    ctx: Ctx


class _SwapConstantSign(Rule[_Binary, Ctx]):
    """``a ∘ c`` → ``a ∘' (-c)`` for a constant ``c``; declines ``not_constant`` otherwise."""

    target = ""

    def match(self, node: ir.Node, ctx: Ctx) -> _Binary | None:
        ctx.calls.append(("match", node_label(node)))
        return _Binary(node, node.inputs[1], ctx)  # type: ignore[arg-type]

    def check(self, match: _Binary) -> Reason | None:
        match.ctx.calls.append(("check", node_label(match.node)))
        if const_array(match.constant) is None:
            return Reason("not_constant", "second input is not a constant")
        return None

    def kernel(self, match: _Binary) -> Kernel | None:
        match.ctx.calls.append(("kernel", node_label(match.node)))
        return Kernel(self.target, {0: F32, 1: F32})

    def rewrite(self, match: _Binary) -> str:
        match.ctx.calls.append(("rewrite", node_label(match.node)))
        data = const_array(match.constant)
        assert data is not None
        graph = match.node.graph
        assert graph is not None
        negated = make_initializer(graph, match.ctx.names, f"{match.constant.name}_neg", -data)
        _replace(match.node, self.target, [match.node.inputs[0], negated])  # type: ignore[list-item]
        return self.target


class SubToAdd(_SwapConstantSign):
    op_types = ("Sub",)
    target = "Add"


class AddToSub(_SwapConstantSign):
    op_types = ("Add",)
    target = "Sub"


class FoldNegNeg(Rule[tuple[ir.Node, ir.Node, Ctx], Ctx]):
    """Matched on the *first* Neg of a pair, so the rewrite removes a node the traversal has not reached."""

    op_types = ("Neg",)

    def match(self, node: ir.Node, ctx: Ctx) -> tuple[ir.Node, ir.Node, Ctx] | None:
        ctx.calls.append(("match", node_label(node)))
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != "Neg":
            return None
        return node, uses[0].node, ctx

    def check(self, match: tuple[ir.Node, ir.Node, Ctx]) -> Reason | None:
        return None

    def rewrite(self, match: tuple[ir.Node, ir.Node, Ctx]) -> str:
        first, second, ctx = match
        ctx.calls.append(("rewrite", node_label(first)))
        ir.convenience.replace_all_uses_with(second.outputs[0], first.inputs[0])  # type: ignore[arg-type]
        graph = first.graph
        assert graph is not None
        graph.remove([second, first], safe=True)
        return "folded"


class Never(Rule[ir.Node, Ctx]):
    """Matches nothing: ``check`` and ``rewrite`` must never be reached."""

    def __init__(self, *op_types: str, domain: str = "") -> None:
        self.op_types = op_types
        self.domain = domain

    def match(self, node: ir.Node, ctx: Ctx) -> ir.Node | None:
        ctx.calls.append(("match", node_label(node)))
        return None

    def check(self, match: ir.Node) -> Reason | None:
        raise AssertionError("check called without a match")

    def rewrite(self, match: ir.Node) -> str:
        raise AssertionError("rewrite called without a match")


class Recorder(Rule[ir.Node, Ctx]):
    """Matches every node it is asked about and declines it with ``Reason(code, node name)``."""

    def __init__(self, *op_types: str, domain: str = "", code: str = "recorded") -> None:
        self.op_types = op_types
        self.domain = domain
        self.code = code

    def match(self, node: ir.Node, ctx: Ctx) -> ir.Node | None:
        ctx.calls.append((self.code, node_label(node)))
        return node

    def check(self, match: ir.Node) -> Reason | None:
        return Reason(self.code, f"seen by {self.code}")

    def rewrite(self, match: ir.Node) -> str:
        raise AssertionError("a declined match was rewritten")


# ---------------------------------------------------------------------------------------------------
# Models and helpers

RELUS = """
relus (float[2,5] x) => (float[2,5] y) {
    [r1] a = Relu (x)
    n = Neg (a)
    [r2] b = Relu (n)
    m = Neg (b)
    [r3] y = Relu (m)
}
"""

SUB_ADD = """
sub_add (float[3,4] x, float[4] v) => (float[3,4] y, float[3,4] z) {
    [sub_const] s = Sub (x, c1)
    [add_const] y = Add (s, c2)
    z = Sub (y, v)
}
"""

NEG_CHAIN = """
neg_chain (float[6] x) => (float[6] y) {
    [n1] a = Neg (x)
    [n2] b = Neg (a)
    [n3] c = Neg (b)
    [n4] d = Neg (c)
    [n5] e = Neg (d)
    [last] y = Relu (e)
}
"""

SUBGRAPHS = """
subgraphs (float[2,3] x, bool cond, int64 trip) => (float[2,3] y, float[2,3] z) {
    [main_relu] h = Relu (x)
    [branch] y = If (cond) <
        then_branch = then_g () => (float[2,3] t) {
            [then_relu] t = Relu (h)
        },
        else_branch = else_g () => (float[2,3] e) {
            [else_neg] e = Neg (h)
        }
    >
    [loop] z = Loop (trip, cond, x) <
        body = body_g (int64 i, bool c_in, float[2,3] acc) => (bool c_out, float[2,3] acc_out) {
            c_out = Identity (c_in)
            [body_relu] r = Relu (acc)
            [body_if] acc_out = If (c_in) <
                then_branch = deep_then () => (float[2,3] dt) {
                    [deep_relu] dt = Relu (r)
                },
                else_branch = deep_else () => (float[2,3] de) {
                    de = Identity (r)
                }
            >
        }
    >
}
"""


def _model(body: str, arrays: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    return ir.from_proto(builders.parse(body, arrays))


def _sub_add() -> ir.Model:
    rng = np.random.default_rng(1)
    arrays = {
        "c1": rng.normal(0, 1, (4,)).astype(np.float32),
        "c2": rng.normal(0, 1, (3, 4)).astype(np.float32),
    }
    return _model(SUB_ADD, arrays)


def _feed(model: onnx.ModelProto | ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    feed = builders.random_feeds(proto, 1, seed)[0]
    for value in proto.graph.input:  # small trip counts for Loop
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feed[value.name] = np.array(3, np.int64)
    return feed


def _outputs(model: onnx.ModelProto | ir.Model, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return run(make_session(builders.serialize(model), opt_level="disable"), feed)


def _assert_same_outputs(original: ir.Model, rewritten: ir.Model, feeds: list[dict[str, np.ndarray]]) -> None:
    for feed in feeds:
        for ref, got in zip(_outputs(original, feed), _outputs(rewritten, feed), strict=True):
            np.testing.assert_array_equal(got, ref)


def _apply(
    model: ir.Model,
    rules: Sequence[Rule[Any, Ctx]],
    *,
    stage: Literal["fold", "plan", "calibrate", "dynamic", "normalize", "lower"] = "lower",
    opset: int = OPSET,
    scope: Literal["all", "main"] = "all",
    nodes: list[ir.Node] | None = None,
) -> tuple[RuleOutcome, Ctx]:
    ctx = _ctx(model)
    outcome = apply_rules(model, rules, ctx, stage=stage, opset=opset, scope=scope, nodes=nodes)
    return outcome, ctx


def _by_name(model: ir.Model, name: str) -> ir.Node:
    return next(n for g in model.graphs() for n in g if n.name == name)


# ---------------------------------------------------------------------------------------------------
# match / check / rewrite


def test_match_none_records_nothing() -> None:
    model = _model(RELUS)
    before = builders.serialize(model)
    outcome, ctx = _apply(model, [Never("Relu", "Neg")])
    assert outcome.rewritten == collections.Counter()
    assert outcome.declines == []
    assert not outcome.modified
    assert ctx.asked("match") == ["r1", "<Neg -> n>", "r2", "<Neg -> m>", "r3"]
    assert builders.serialize(model) == before


def test_nodes_no_rule_covers_are_not_asked() -> None:
    model = _model(RELUS)
    _, ctx = _apply(model, [Never("Relu")])
    assert ctx.asked("match") == ["r1", "r2", "r3"]


def test_rewrite_replaces_and_counts_and_is_exact_in_onnxruntime() -> None:
    model = _model(RELUS)
    original = _model(RELUS)
    outcome, ctx = _apply(model, [ReluToMax()])
    assert outcome.rewritten == collections.Counter({"Max": 3})
    assert outcome.modified and outcome.declines == []
    assert builders.op_counts(model) == collections.Counter({"Max": 3, "Neg": 2})
    # match → check → kernel → rewrite, node by node (interleaved, not in phases)
    assert ctx.calls[:4] == [("match", "r1"), ("check", "r1"), ("kernel", "r1"), ("rewrite", "r1")]
    assert ctx.asked("rewrite") == ["r1", "r2", "r3"]
    assert [n.name for n in model.graph] == ["r1", "", "r2", "", "r3"]
    assert model.graph.outputs[0].name == "y"
    _assert_same_outputs(original, model, [_feed(original, seed) for seed in range(3)])


def test_check_reason_becomes_a_typed_decline() -> None:
    model = _sub_add()
    outcome, ctx = _apply(model, [SubToAdd()], stage="fold")
    # sub_const reads a constant (rewritten); the unnamed Sub reads the graph input v (declined)
    assert outcome.rewritten == collections.Counter({"Add": 1})
    assert outcome.declines == [
        Decline("fold", "not_constant", "second input is not a constant", "<Sub -> z>", "")
    ]
    assert builders.lines(outcome.declines) == ["<Sub -> z> not folded: second input is not a constant"]
    assert ctx.asked("check") == ["sub_const", "<Sub -> z>"]
    assert ctx.asked("rewrite") == ["sub_const"]
    assert "<Sub -> z>" not in ctx.asked("kernel")  # a failed check never asks for the kernel


@pytest.mark.parametrize("stage", ["fold", "plan", "calibrate", "dynamic", "normalize", "lower"])
def test_declines_carry_the_stage_given(
    stage: Literal["fold", "plan", "calibrate", "dynamic", "normalize", "lower"],
) -> None:
    outcome, _ = _apply(_model(RELUS), [Recorder("Relu")], stage=stage)
    assert [d.stage for d in outcome.declines] == [stage] * 3
    assert [d.node for d in outcome.declines] == ["r1", "r2", "r3"]
    assert {d.code for d in outcome.declines} == {"recorded"}
    assert not outcome.modified


def test_declined_nodes_are_left_as_they_were() -> None:
    model = _model(RELUS)
    before = builders.serialize(model)
    _apply(model, [Recorder("Relu", "Neg")])
    assert builders.serialize(model) == before


def test_rewrites_are_counted_by_the_op_type_returned() -> None:
    model = _sub_add()
    original = _sub_add()
    outcome, _ = _apply(model, [SubToAdd(), AddToSub()])
    assert outcome.rewritten == collections.Counter({"Add": 1, "Sub": 1})
    assert len(outcome.declines) == 1
    _assert_same_outputs(original, model, [_feed(original, seed) for seed in range(3)])


def test_nodes_created_by_a_rewrite_are_not_visited_again() -> None:
    """Sub→Add and Add→Sub in one table: each original node changes once, no ping-pong."""
    model = _sub_add()
    _, ctx = _apply(model, [SubToAdd(), AddToSub()])
    assert ctx.asked("match") == ["sub_const", "add_const", "<Sub -> z>"]
    ops = {n.name: n.op_type for n in model.graph if n.name}
    assert ops == {"sub_const": "Add", "add_const": "Sub"}


def test_nodes_removed_by_an_earlier_rewrite_are_skipped() -> None:
    model = _model(NEG_CHAIN)
    original = _model(NEG_CHAIN)
    outcome, ctx = _apply(model, [FoldNegNeg()])
    # n1 takes n2 with it, n3 takes n4; n2 and n4 are never asked; n5 has no Neg consumer.
    assert ctx.asked("match") == ["n1", "n3", "n5"]
    assert outcome.rewritten == collections.Counter({"folded": 2})
    assert [n.name for n in model.graph] == ["n5", "last"]
    assert model.graph.node(0).inputs[0] is model.graph.inputs[0]
    _assert_same_outputs(original, model, [_feed(original, seed) for seed in range(3)])


def test_rule_sees_the_graph_as_earlier_rewrites_left_it() -> None:
    """After n1+n2 fold, n3 reads ``x`` directly: it is matched against the rewritten graph."""
    model = _model(NEG_CHAIN)
    seen_inputs: list[str] = []

    class Spy(FoldNegNeg):
        def match(self, node: ir.Node, ctx: Ctx) -> tuple[ir.Node, ir.Node, Ctx] | None:
            seen_inputs.append(node.inputs[0].name or "")  # type: ignore[union-attr]
            return super().match(node, ctx)

    _apply(model, [Spy()])
    assert seen_inputs == ["x", "x", "x"]


# ---------------------------------------------------------------------------------------------------
# Traversal: scope and nodes=


def test_scope_main_visits_only_the_main_graph() -> None:
    model = _model(SUBGRAPHS)
    original = _model(SUBGRAPHS)
    outcome, ctx = _apply(model, [ReluToMax()], scope="main")
    assert ctx.asked("match") == ["main_relu"]
    assert outcome.rewritten == collections.Counter({"Max": 1})
    assert builders.op_counts(model, subgraphs=False)["Relu"] == 0
    assert builders.op_counts(model)["Relu"] == 3
    feeds = [{**_feed(original, seed), "cond": np.array(c)} for seed, c in ((0, True), (1, False))]
    _assert_same_outputs(original, model, feeds)


def test_scope_all_visits_if_and_loop_bodies_nested_too() -> None:
    model = _model(SUBGRAPHS)
    original = _model(SUBGRAPHS)
    outcome, ctx = _apply(model, [ReluToMax()])
    assert ctx.asked("match")[0] == "main_relu"  # the main graph first
    assert sorted(ctx.asked("match")) == ["body_relu", "deep_relu", "main_relu", "then_relu"]
    assert outcome.rewritten == collections.Counter({"Max": 4})
    assert builders.op_counts(model)["Relu"] == 0
    # each new zero constant lives in the graph of the node it serves
    for graph in model.graphs():
        for node in graph:
            if node.op_type == "Max":
                assert node.inputs[1] is not None
                assert node.inputs[1].name in graph.initializers
    feeds = [{**_feed(original, seed), "cond": np.array(c)} for seed, c in ((0, True), (1, False))]
    _assert_same_outputs(original, model, feeds)


def test_scope_all_is_the_default() -> None:
    model = _model(SUBGRAPHS)
    ctx = _ctx(model)
    apply_rules(model, [Never("Relu")], ctx, stage="lower", opset=OPSET)
    assert len(ctx.asked("match")) == 4


def test_graphs_of() -> None:
    model = _model(SUBGRAPHS)
    assert list(graphs_of(model, "main")) == [model.graph]
    graphs = list(graphs_of(model))
    assert graphs[0] is model.graph
    assert len(graphs) == 6  # main, then/else, Loop body, deep then/else
    assert len({id(g) for g in graphs}) == 6
    flat = _model(RELUS)
    assert list(graphs_of(flat)) == [flat.graph]


def test_nodes_restricts_and_orders_the_visit() -> None:
    model = _model(RELUS)
    outcome, ctx = _apply(model, [ReluToMax()], nodes=[_by_name(model, "r3"), _by_name(model, "r1")])
    assert ctx.asked("match") == ["r3", "r1"]
    assert outcome.rewritten == collections.Counter({"Max": 2})
    assert {n.name: n.op_type for n in model.graph if n.name} == {"r1": "Max", "r2": "Relu", "r3": "Max"}


def test_nodes_accepts_any_iterable() -> None:
    model = _model(RELUS)
    ctx = _ctx(model)
    chosen = (n for n in model.graph if n.name in ("r2", "r3"))
    apply_rules(model, [Never("Relu")], ctx, stage="lower", opset=OPSET, nodes=chosen)
    assert ctx.asked("match") == ["r2", "r3"]


def test_nodes_removed_before_their_turn_are_skipped() -> None:
    model = _model(NEG_CHAIN)
    order = [_by_name(model, name) for name in ("n1", "n2", "n5", "n4", "n3")]
    outcome, ctx = _apply(model, [FoldNegNeg()], nodes=order)
    # n1 removes n2; n5 has no Neg consumer; n4 is matched (its consumer n5 is a Neg) and removes n5; n3
    # now feeds Relu directly
    assert ctx.asked("match") == ["n1", "n5", "n4", "n3"]
    assert outcome.rewritten == collections.Counter({"folded": 2})
    assert [n.name for n in model.graph] == ["n3", "last"]


def test_nodes_of_a_subgraph_can_be_given() -> None:
    model = _model(SUBGRAPHS)
    outcome, ctx = _apply(model, [ReluToMax()], nodes=[_by_name(model, "deep_relu")])
    assert ctx.asked("match") == ["deep_relu"]
    assert outcome.rewritten == collections.Counter({"Max": 1})
    assert _by_name(model, "deep_relu").op_type == "Max"


def test_nodes_of_a_removed_subgraph_are_skipped() -> None:
    model = _model(SUBGRAPHS)

    class DropIf(Rule[ir.Node, Ctx]):
        """Replace the main-graph If by a plain Relu of ``h`` (its then-branch)."""

        op_types = ("If",)

        def match(self, node: ir.Node, ctx: Ctx) -> ir.Node | None:
            return node if node.name == "branch" else None

        def check(self, match: ir.Node) -> Reason | None:
            return None

        def rewrite(self, match: ir.Node) -> str:
            h = _by_name(model, "main_relu").outputs[0]
            _replace(match, "Relu", [h])
            return "Relu"

    outcome, ctx = _apply(model, [DropIf(), ReluToMax()])
    assert "then_relu" not in ctx.asked("match")  # then_relu left the model with its If
    assert outcome.rewritten == collections.Counter({"Relu": 1, "Max": 3})


# ---------------------------------------------------------------------------------------------------
# The rule table: the first rule that matches decides, domains


def test_the_first_matching_rule_for_an_op_type_decides() -> None:
    model = _model(RELUS)
    outcome, ctx = _apply(model, [Recorder("Relu", code="first"), Recorder("Relu", "Neg", code="second")])
    assert ctx.asked("first") == ["r1", "r2", "r3"]
    assert ctx.asked("second") == ["<Neg -> n>", "<Neg -> m>"]  # Neg is still the second rule's
    assert {d.code for d in outcome.declines if d.node.startswith("r")} == {"first"}


def test_a_later_rule_is_asked_when_the_first_does_not_match() -> None:
    model = _model(RELUS)
    outcome, ctx = _apply(model, [Never("Relu"), ReluToMax()])
    assert ctx.asked("match") == ["r1", "r1", "r2", "r2", "r3", "r3"]  # Never, then ReluToMax, per node
    assert ctx.asked("rewrite") == ["r1", "r2", "r3"]
    assert outcome.rewritten == {"Max": 3}
    assert builders.op_counts(model)["Relu"] == 0


GELUS = """<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
gelus (float[2,4] x) => (float[2,4] y1, float[2,4] y2) {
    [standard] y1 = Gelu (x)
    [microsoft] y2 = com.microsoft.Gelu (x)
}
"""


def test_rules_see_only_nodes_of_their_domain() -> None:
    model = ir.from_proto(builders.parse_model_text(GELUS))
    outcome, ctx = _apply(
        model, [Recorder("Gelu", domain="com.microsoft", code="ms"), Recorder("Gelu", code="std")]
    )
    assert ctx.asked("ms") == ["microsoft"]
    assert ctx.asked("std") == ["standard"]
    assert {(d.node, d.code) for d in outcome.declines} == {("microsoft", "ms"), ("standard", "std")}


def test_a_microsoft_rule_does_not_see_default_domain_nodes() -> None:
    model = _model(RELUS)
    _, ctx = _apply(model, [Never("Relu", domain="com.microsoft")])
    assert ctx.calls == []


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_default_domain_rules_either_spelling(domain: str) -> None:
    model = ir.from_proto(builders.parse_model_text(GELUS))
    _, ctx = _apply(model, [Recorder("Gelu", domain=domain, code="std")])
    assert ctx.asked("std") == ["standard"]


# ---------------------------------------------------------------------------------------------------
# The kernel check


def _missing_conv_integer_types() -> dict[int, ir.DataType | None]:
    """Input types for which the installed onnxruntime registers no ConvInteger kernel."""
    table = kernel_table()
    for x, w in ((I8, I8), (U8, I8), (I8, U8), (F32, U8), (F32, F32)):
        if table.problem("", "ConvInteger", OPSET, {0: x, 1: w}) is not None:
            return {0: x, 1: w}
    raise AssertionError("every ConvInteger type pair has a kernel, even float")


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        (Kernel("NoSuchOp", {}), "does not know the op NoSuchOp"),
        (Kernel("NoSuchOp", {}, domain="com.microsoft"), "does not know the op com.microsoft.NoSuchOp"),
        (
            Kernel("Add", {0: ir.DataType.BOOL, 1: ir.DataType.BOOL}),
            "has no CPU kernel for Add-14 with T=bool",
        ),
    ],
)
def test_a_kernel_onnxruntime_lacks_is_declined_and_never_rewritten(kernel: Kernel, expected: str) -> None:
    model = _model(RELUS)
    before = builders.serialize(model)
    outcome, ctx = _apply(model, [ReluToMax(kernel)])
    assert [d.code for d in outcome.declines] == ["no_kernel"] * 3
    assert [d.node for d in outcome.declines] == ["r1", "r2", "r3"]
    assert all(expected in d.message for d in outcome.declines)
    assert outcome.declines[0].message == kernel.problem(OPSET)
    assert outcome.rewritten == collections.Counter()
    assert ctx.asked("rewrite") == []
    assert builders.serialize(model) == before
    assert builders.lines(outcome.declines)[0] == f"r1 not lowered: {kernel.problem(OPSET)}"


def test_conv_integer_with_types_onnxruntime_does_not_register_is_declined() -> None:
    types = _missing_conv_integer_types()
    kernel = Kernel("ConvInteger", dict(types))
    problem = kernel.problem(OPSET)
    assert problem is not None and "ConvInteger" in problem
    model = _model(RELUS)
    outcome, ctx = _apply(model, [ReluToMax(kernel)])
    assert {d.code for d in outcome.declines} == {"no_kernel"}
    assert {d.message for d in outcome.declines} == {problem}
    assert ctx.asked("rewrite") == []
    assert builders.op_counts(model)["Relu"] == 3


def test_conv_integer_with_registered_types_is_rewritten() -> None:
    table = kernel_table()
    registered: list[dict[int, ir.DataType | None]] = [
        {0: x, 1: w}
        for x, w in ((U8, U8), (U8, I8), (I8, I8), (I8, U8))
        if table.problem("", "ConvInteger", OPSET, {0: x, 1: w}) is None
    ]
    assert registered, "onnxruntime registers ConvInteger for uint8 inputs in every supported version"
    outcome, _ = _apply(_model(RELUS), [ReluToMax(Kernel("ConvInteger", registered[0]))])
    assert outcome.rewritten == collections.Counter({"Max": 3})
    assert outcome.declines == []


def test_unknown_types_are_not_checked() -> None:
    """``None`` types are left out of the lookup: only the op and its opset must exist."""
    outcome, _ = _apply(_model(RELUS), [ReluToMax(Kernel("ConvInteger", {0: None, 1: None}))])
    assert outcome.rewritten == collections.Counter({"Max": 3})
    # a float input is never a ConvInteger type: the known type alone declines it
    declined, _ = _apply(_model(RELUS), [ReluToMax(Kernel("ConvInteger", {0: F32, 1: None}))])
    expected = kernel_table().problem("", "ConvInteger", OPSET, {0: F32})
    assert expected is not None
    assert [d.message for d in declined.declines] == [expected] * 3
    assert not declined.modified


def test_kernels_are_looked_up_at_the_opset_given() -> None:
    table = kernel_table()
    low = next((o for o in range(1, OPSET) if table.problem("", "Max", o, {0: F32}) is not None), None)
    if low is None:
        pytest.skip("this onnxruntime runs Max at every opset")
    kernel = Kernel("Max", {0: F32, 1: F32})
    declined, _ = _apply(_model(RELUS), [ReluToMax(kernel)], opset=low)
    assert {d.code for d in declined.declines} == {"no_kernel"}
    assert declined.declines[0].message == table.problem("", "Max", low, {0: F32, 1: F32})
    rewritten, _ = _apply(_model(RELUS), [ReluToMax(kernel)], opset=OPSET)
    assert rewritten.rewritten == collections.Counter({"Max": 3})


def test_kernel_problem_of_a_non_default_domain_ignores_the_opset() -> None:
    ok = Kernel("QLinearAdd", {0: I8}, domain="com.microsoft")
    assert ok.problem(1) is None and ok.problem(OPSET) is None
    wrong = Kernel("QLinearAdd", {0: F32}, domain="com.microsoft")
    assert wrong.problem(OPSET) == wrong.problem(5)
    assert "QLinearAdd-1" in (wrong.problem(OPSET) or "")


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_kernel_problem_of_the_default_domain_uses_the_opset(domain: str) -> None:
    kernel = Kernel("QuantizeLinear", {}, domain=domain)
    assert kernel.problem(OPSET) is None
    assert kernel.problem(5) == kernel_table().problem("", "QuantizeLinear", 5)
    assert kernel.problem(5) is not None


def test_a_failed_check_wins_over_a_missing_kernel() -> None:
    class Both(SubToAdd):
        def kernel(self, match: _Binary) -> Kernel | None:
            match.ctx.calls.append(("kernel", node_label(match.node)))
            return Kernel("NoSuchOp", {})

    outcome, ctx = _apply(_sub_add(), [Both()])
    codes = {d.node: d.code for d in outcome.declines}
    assert codes == {"sub_const": "no_kernel", "<Sub -> z>": "not_constant"}
    assert ctx.asked("kernel") == ["sub_const"]


# ---------------------------------------------------------------------------------------------------
# RuleOutcome and Rule


def test_rule_outcome_extend_and_modified() -> None:
    first = RuleOutcome()
    assert not first.modified
    first.declines.append(Decline("lower", "c", "m", "a"))
    assert not first.modified  # declines alone change nothing
    second = RuleOutcome(collections.Counter({"QLinearConv": 2}), [Decline("lower", "d", "n", "b")])
    first.extend(second)
    first.extend(RuleOutcome(collections.Counter({"QLinearConv": 1, "QGemm": 1})))
    assert first.modified
    assert first.rewritten == collections.Counter({"QLinearConv": 3, "QGemm": 1})
    assert [d.node for d in first.declines] == ["a", "b"]
    assert second.rewritten == collections.Counter({"QLinearConv": 2})  # the argument is not changed
