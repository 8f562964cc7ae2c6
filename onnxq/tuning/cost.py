"""What keeping an anchor float costs in latency, for a search that wants the fastest passing model.

An accuracy target is met by keeping some anchors float; which ones decides the speed given back. A
large MatMul kept float costs far more than a small Conv, so "the fewest anchors" is not "the fastest
model". :func:`anchor_costs` estimates, per anchor, the latency that keeping it float adds:

- **Measured, where the latency guard ran** (:mod:`onnxq.tuning.latency_guard`). The guard timed the
  fully quantized model, the float model, and one variant per suspect kind (``keep <kind> float``). A
  suspect kind's cost is its variant's latency minus the quantized model's (never below zero: a kind
  whose float version was as fast costs nothing measurable); what float costs beyond those
  (float − quantized − the suspect kinds' costs) is the trusted kinds' (large Conv/MatMul/Gemm). Each
  kind's cost is shared among its anchors by their multiply-adds. The unit is milliseconds at the
  guard's thread count, and the chosen model's latency can be estimated from it.
- **Otherwise** each anchor's multiply-adds per sample (from the inferred shapes; the median where a
  shape is unknown): a relative cost, with no latency estimate.

The search keeps the cheapest of the sets that meet the target and prunes the costliest kept anchors
first. It still ranks anchors by sensitivity alone: a target usually hinges on the few noisiest
layers, and discounting sensitivity by cost put cheap, quieter layers first (on PP-OCRv4 rec,
``top1>=0.98`` then needed 50 of 51 layers float, 0.80x float latency, where the four noisiest alone
met it at 0.58x).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.tuning.latency_guard import anchor_kinds, anchor_macs

__all__ = ["AnchorCosts", "anchor_costs"]

#: An anchor costs at least this fraction of the mean anchor cost: a kind measured as free (within the
#: timings' noise) is cheap, not free, so accuracy still decides between such anchors.
COST_FLOOR = 0.01


@dataclass
class AnchorCosts:
    """Per-anchor cost of keeping it float (``unit``: ``"ms"`` measured, or ``"MACs"``).

    ``quantized_ms`` is the latency of the model the search starts from (the guard's choice) when the
    costs are measured; NaN otherwise.
    """

    costs: dict[str, float] = field(default_factory=dict)
    unit: str = "MACs"
    quantized_ms: float = math.nan

    def of(self, names: Sequence[str]) -> float:
        """The total cost of keeping ``names`` float."""
        return float(sum(self.costs.get(n, 0.0) for n in names))

    def latency_ms(self, kept_float: Sequence[str]) -> float:
        """Estimated latency (ms) with ``kept_float`` float; NaN without the guard's timings."""
        return self.quantized_ms + self.of(kept_float) if self.unit == "ms" else math.nan

    def share(self, kept_float: Sequence[str]) -> float:
        """The fraction of the anchors' total cost that ``kept_float`` carries."""
        total = sum(self.costs.values())
        return self.of(kept_float) / total if total > 0 else 0.0


def anchor_costs(
    model: ir.Model, anchors: Sequence[str], guard: Mapping[str, Any] | None = None
) -> AnchorCosts:
    """The cost of keeping each of ``anchors`` (nodes of the float ``model``) float; see the module doc.

    ``guard`` is the latency guard's report entry (:meth:`GuardOutcome.as_dict`), or ``None``.
    """
    macs = _macs_by_anchor(model, anchors)
    timed: dict[str, float] = {k: float(v) for k, v in (guard or {}).get("latency_ms", {}).items()}
    float_ms = timed.get("input", timed.get("float", math.nan))
    quantized_ms = timed.get("quantized", math.nan)
    if not anchors or not (math.isfinite(float_ms) and math.isfinite(quantized_ms)):
        return AnchorCosts(_floored(macs), "MACs")
    kinds = anchor_kinds(model, anchors)
    kind_cost: dict[str, float] = {}
    for kind in kinds:
        variant = timed.get(f"keep {kind} float")
        if variant is not None and math.isfinite(variant):
            kind_cost[kind] = max(variant - quantized_ms, 0.0)
    untimed = [kind for kind in kinds if kind not in kind_cost]
    rest = max(float_ms - quantized_ms - sum(kind_cost.values()), 0.0)
    untimed_macs = sum(macs[n] for kind in untimed for n in kinds[kind])
    costs: dict[str, float] = {}
    for kind, names in kinds.items():
        if kind in kind_cost:
            total, weight = kind_cost[kind], sum(macs[n] for n in names)
        else:
            total, weight = rest, untimed_macs
        for name in names:
            costs[name] = total * macs[name] / weight if weight > 0 else 0.0
    chosen_ms = float(timed.get(str((guard or {}).get("chosen", "quantized")), quantized_ms))
    return AnchorCosts(_floored(costs), "ms", chosen_ms if math.isfinite(chosen_ms) else quantized_ms)


def _macs_by_anchor(model: ir.Model, anchors: Sequence[str]) -> dict[str, float]:
    """Multiply-adds per sample of each anchor; the median of the known ones where a shape is unknown."""
    wanted = set(anchors)
    known: dict[str, float] = {}
    for node in model.graph.all_nodes():
        if node.name in wanted:
            value = anchor_macs(node)
            if value is not None:
                known[node.name or ""] = float(value)
    fallback = float(np.median(list(known.values()))) if known else 1.0
    return {name: known.get(name, fallback) for name in anchors}


def _floored(costs: Mapping[str, float]) -> dict[str, float]:
    """Costs with :data:`COST_FLOOR` of the mean as the least (no anchor is free)."""
    if not costs:
        return {}
    floor = COST_FLOOR * max(float(np.mean(list(costs.values()))), 1e-12)
    return {name: max(cost, floor) for name, cost in costs.items()}
