"""Cutting the tensors one run fetches into groups that fit a memory budget.

A run holds every tensor it fetches until it ends (ONNX Runtime cannot reuse their buffers), so a
pass that needs activations whole (the histogram calibration methods, outlier smoothing's statistics)
fetches them in groups, one pass over the data per group, instead of all at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["groups_within"]

T = TypeVar("T")


def groups_within(items: Sequence[T], sizes: Sequence[int], budget: int) -> list[list[T]]:
    """``items`` in order, in consecutive groups whose ``sizes`` (bytes) sum to ``budget`` at most.

    An item larger than the budget is a group of its own; one group when all fit.
    """
    groups: list[list[T]] = [[]]
    held = 0
    for item, size in zip(items, sizes, strict=True):
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(item)
        held += size
    return groups
