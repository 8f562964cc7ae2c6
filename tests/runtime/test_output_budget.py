"""Tests for groups_within: consecutive groups within a byte budget, order kept, oversized items alone."""

from __future__ import annotations

import pytest

from onnxq.runtime.output_budget import groups_within


@pytest.mark.parametrize(
    ("sizes", "budget", "groups"),
    [
        ([1, 2, 3], 10, [["a", "b", "c"]]),  # all fit: one group
        ([4, 4, 4], 8, [["a", "b"], ["c"]]),  # exactly the budget fills a group
        ([4, 5, 4], 8, [["a"], ["b"], ["c"]]),
        ([20, 1, 1], 8, [["a"], ["b", "c"]]),  # larger than the budget: a group of its own
        ([1, 20, 1], 8, [["a"], ["b"], ["c"]]),
    ],
)
def test_groups_within(sizes: list[int], budget: int, groups: list[list[str]]) -> None:
    found = groups_within(["a", "b", "c"], sizes, budget)
    assert found == groups
    assert [item for group in found for item in group] == ["a", "b", "c"]


def test_sizes_must_match_the_items() -> None:
    with pytest.raises(ValueError):
        groups_within(["a", "b"], [1], 8)
