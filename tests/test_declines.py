"""Tests for onnxq.declines: typed records of what a stage left alone, and how the report groups them.

One line per decline (``<node> <stage verb>: <message>``, or ``<op type>: <message>`` / the bare
message when no node is named), the JSON form, and :func:`group_declines`: grouping by stage, reason code
and message, each node counted once, at most ``shown`` nodes named, groups in order of first appearance.
"""

from __future__ import annotations

import dataclasses
import json
from typing import get_args

import builders
import pytest

from onnxq.declines import STAGE_VERBS, Decline, Reason, Stage, group_declines

STAGES: tuple[Stage, ...] = get_args(Stage)

# ---------------------------------------------------------------------------------------------------
# Decline and Reason


def test_every_stage_has_a_verb() -> None:
    assert set(STAGE_VERBS) == set(STAGES)
    assert STAGE_VERBS == {
        "fold": "not folded",
        "canonicalize": "not canonicalized",
        "plan": "not quantized",
        "calibrate": "not quantized",
        "dynamic": "not quantized",
        "normalize": "not normalized",
        "lower": "not lowered",
    }


@pytest.mark.parametrize(
    ("stage", "line"),
    [
        ("fold", "conv1 not folded: weight is not a constant"),
        ("plan", "conv1 not quantized: weight is not a constant"),
        ("calibrate", "conv1 not quantized: weight is not a constant"),
        ("dynamic", "conv1 not quantized: weight is not a constant"),
        ("normalize", "conv1 not normalized: weight is not a constant"),
        ("lower", "conv1 not lowered: weight is not a constant"),
    ],
)
def test_str_of_a_node_decline_uses_the_stage_verb(stage: Stage, line: str) -> None:
    decline = Decline(stage, "weight_not_constant", "weight is not a constant", "conv1")
    assert str(decline) == line


def test_str_of_a_node_decline_ignores_its_op_type() -> None:
    decline = Decline("lower", "code", "no kernel", node="<Conv -> c>", op_type="Conv")
    assert str(decline) == "<Conv -> c> not lowered: no kernel"


def test_str_of_an_op_type_decline() -> None:
    decline = Decline("plan", "kept_float", "stays float (no integer kernel)", op_type="Softmax")
    assert str(decline) == "Softmax: stays float (no integer kernel)"


def test_str_of_a_decline_without_node_or_op_type_is_the_message() -> None:
    decline = Decline("dynamic", "subgraph", "3 nodes inside If/Loop bodies stay float")
    assert str(decline) == "3 nodes inside If/Loop bodies stay float"


def test_of_takes_code_and_message_from_the_reason() -> None:
    reason = Reason("no_kernel", "onnxruntime has no QLinearAdd kernel")
    decline = Decline.of("lower", "add1", reason)
    assert decline == Decline("lower", "no_kernel", "onnxruntime has no QLinearAdd kernel", "add1", "")
    assert Decline.of("plan", "", reason, op_type="Add").op_type == "Add"
    assert str(Decline.of("plan", "", reason, op_type="Add")) == "Add: onnxruntime has no QLinearAdd kernel"


def test_decline_fields_and_defaults() -> None:
    decline = Decline("plan", "c", "m")
    assert (decline.stage, decline.code, decline.message, decline.node, decline.op_type) == (
        "plan",
        "c",
        "m",
        "",
        "",
    )


def test_declines_and_reasons_are_frozen_and_hashable() -> None:
    decline = Decline("plan", "c", "m", "n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decline.node = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Reason("c", "m").code = "d"  # type: ignore[misc]
    assert len({decline, Decline("plan", "c", "m", "n"), Decline("plan", "c", "m", "n2")}) == 2


def test_as_dict_has_every_field() -> None:
    decline = Decline("normalize", "no_range", "tensor has no range", "q1", "QuantizeLinear")
    assert decline.as_dict() == {
        "stage": "normalize",
        "code": "no_range",
        "message": "tensor has no range",
        "node": "q1",
        "op_type": "QuantizeLinear",
    }


@pytest.mark.parametrize(
    "decline",
    [
        Decline("fold", "shared_weight", "weight read by 2 nodes", "bn1"),
        Decline("plan", "kept_float", "stays float", op_type="Softmax"),
        Decline("dynamic", "subgraph", "2 nodes in subgraphs stay float"),
        Decline("lower", "no_kernel", "quotes ' and \" and a → arrow", "<Conv -> c>", "Conv"),
    ],
)
def test_as_dict_round_trips_through_json(decline: Decline) -> None:
    data = json.loads(json.dumps(decline.as_dict()))
    assert Decline(**data) == decline
    assert str(Decline(**data)) == str(decline)


# ---------------------------------------------------------------------------------------------------
# group_declines


def _nodes(stage: Stage, code: str, message: str, *nodes: str) -> list[Decline]:
    return [Decline(stage, code, message, node) for node in nodes]


def test_no_declines_no_lines() -> None:
    assert group_declines([]) == []
    assert group_declines(iter(())) == []


def test_a_single_decline_reads_like_its_str() -> None:
    decline = Decline("lower", "no_kernel", "no kernel", "conv1")
    assert group_declines([decline]) == [str(decline)] == ["conv1 not lowered: no kernel"]


def test_same_stage_code_and_message_share_a_line() -> None:
    declines = _nodes("plan", "excluded", "excluded by configuration", "conv1", "conv2", "conv3")
    assert group_declines(declines) == [
        "3 nodes not quantized: excluded by configuration (conv1, conv2, conv3)"
    ]


def test_the_same_node_counts_once() -> None:
    declines = _nodes("lower", "no_kernel", "no kernel", "a", "b", "a", "a", "b")
    assert group_declines(declines) == ["2 nodes not lowered: no kernel (a, b)"]


def test_a_node_repeated_alone_is_one_single_line() -> None:
    declines = _nodes("fold", "dyn", "dynamic weight", "bn", "bn", "bn")
    assert group_declines(declines) == ["bn not folded: dynamic weight"]


@pytest.mark.parametrize(
    ("count", "listed"),
    [
        (4, "(n0, n1, n2, n3)"),
        (5, "(n0, n1, n2, n3 and 1 more)"),
        (9, "(n0, n1, n2, n3 and 5 more)"),
    ],
)
def test_at_most_four_nodes_are_named_by_default(count: int, listed: str) -> None:
    declines = _nodes("plan", "c", "msg", *(f"n{i}" for i in range(count)))
    assert group_declines(declines) == [f"{count} nodes not quantized: msg {listed}"]


@pytest.mark.parametrize(
    ("shown", "listed"),
    [
        (1, "(n0 and 5 more)"),
        (2, "(n0, n1 and 4 more)"),
        (6, "(n0, n1, n2, n3, n4, n5)"),
        (10, "(n0, n1, n2, n3, n4, n5)"),
    ],
)
def test_shown_sets_the_cut(shown: int, listed: str) -> None:
    declines = _nodes("lower", "c", "msg", *(f"n{i}" for i in range(6)))
    assert group_declines(declines, shown=shown) == [f"6 nodes not lowered: msg {listed}"]


def test_duplicates_do_not_count_towards_the_cut() -> None:
    declines = _nodes("plan", "c", "msg", "a", "b", "a", "c", "b", "d", "e")
    assert group_declines(declines) == ["5 nodes not quantized: msg (a, b, c, d and 1 more)"]


def test_different_codes_with_the_same_message_stay_separate() -> None:
    declines = [
        *_nodes("lower", "no_kernel", "cannot lower", "a", "b"),
        *_nodes("lower", "not_constant", "cannot lower", "c", "d"),
    ]
    assert group_declines(declines) == [
        "2 nodes not lowered: cannot lower (a, b)",
        "2 nodes not lowered: cannot lower (c, d)",
    ]


def test_different_stages_with_the_same_code_and_message_stay_separate() -> None:
    declines = [
        Decline("plan", "not_float", "not float32", "a"),
        Decline("calibrate", "not_float", "not float32", "b"),
    ]
    assert group_declines(declines) == ["a not quantized: not float32", "b not quantized: not float32"]


def test_different_messages_stay_separate() -> None:
    declines = [Decline("fold", "c", "first", "a"), Decline("fold", "c", "second", "a")]
    assert group_declines(declines) == ["a not folded: first", "a not folded: second"]


def test_groups_come_in_order_of_first_appearance() -> None:
    declines = [
        Decline("lower", "k", "late stage first", "x1"),
        Decline("fold", "f", "folding", "bn1"),
        Decline("lower", "k", "late stage first", "x2"),
        Decline("plan", "p", "planning", "conv"),
        Decline("fold", "f", "folding", "bn2"),
    ]
    assert group_declines(declines) == [
        "2 nodes not lowered: late stage first (x1, x2)",
        "2 nodes not folded: folding (bn1, bn2)",
        "conv not quantized: planning",
    ]


def test_nodes_keep_their_order_of_first_appearance() -> None:
    declines = _nodes("plan", "c", "msg", "zeta", "alpha", "mu", "alpha")
    assert group_declines(declines) == ["3 nodes not quantized: msg (zeta, alpha, mu)"]


def test_op_type_declines_are_one_line_per_op_type() -> None:
    declines = [
        Decline("plan", "kept_float", "stays float", op_type="Softmax"),
        Decline("plan", "kept_float", "stays float", op_type="LayerNormalization"),
        Decline("plan", "kept_float", "stays float", op_type="Softmax"),
    ]
    assert group_declines(declines) == ["Softmax: stays float", "LayerNormalization: stays float"]


def test_node_less_declines_are_kept_once() -> None:
    declines = [
        Decline("dynamic", "subgraph", "2 nodes in If/Loop bodies stay float"),
        Decline("dynamic", "subgraph", "2 nodes in If/Loop bodies stay float"),
        Decline("dynamic", "option_off", "Conv stays float (use --dynamic-conv)"),
    ]
    assert group_declines(declines) == [
        "2 nodes in If/Loop bodies stay float",
        "Conv stays float (use --dynamic-conv)",
    ]


def test_grouping_does_not_parse_the_text() -> None:
    """A message that looks like a grouped line is carried through as it is."""
    message = "2 nodes not quantized: x (a, b)"
    assert group_declines(_nodes("plan", "c", message, "n1", "n2")) == [
        f"2 nodes not quantized: {message} (n1, n2)"
    ]


def test_group_declines_accepts_a_generator_and_matches_builders_lines() -> None:
    declines = [Decline("lower", "c", "m", "a"), Decline("fold", "d", "n", "b")]
    assert group_declines(d for d in declines) == builders.lines(declines)


def test_showing_no_names_still_counts_them_cleanly() -> None:
    declines = [Decline("plan", "c", "m", name) for name in ("a", "b", "c")]
    assert group_declines(declines, shown=0) == ["3 nodes not quantized: m (and 3 more)"]
