"""Declines: typed records of what a stage left as it was, and why.

Every stage that may leave a node alone (folding, planning, calibration, dynamic quantization,
normalization, lowering) records a :class:`Decline` instead of a sentence: the node (one label format,
:func:`onnxq.graph.node_label`), the stage, a stable reason code and the message for people. The
report groups and de-duplicates them by stage, code and message without parsing any text, and scripts
read the same fields from the JSON report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["STAGE_VERBS", "Decline", "Reason", "Stage", "group_declines"]

Stage = Literal["fold", "canonicalize", "plan", "calibrate", "dynamic", "normalize", "lower"]

#: How a decline of each stage reads after the node's label.
STAGE_VERBS: dict[Stage, str] = {
    "fold": "not folded",
    "canonicalize": "not canonicalized",
    "plan": "not quantized",
    "calibrate": "not quantized",
    "dynamic": "not quantized",
    "normalize": "not normalized",
    "lower": "not lowered",
}


@dataclass(frozen=True)
class Reason:
    """Why a check failed: a stable ``code`` for scripts and a ``message`` for people."""

    code: str
    message: str


@dataclass(frozen=True)
class Decline:
    """One node (or, with ``node`` empty, one op type or a count) a stage left as it was."""

    stage: Stage
    code: str
    message: str
    node: str = ""
    op_type: str = ""

    @classmethod
    def of(cls, stage: Stage, node: str, reason: Reason, op_type: str = "") -> Decline:
        return cls(stage, reason.code, reason.message, node, op_type)

    def __str__(self) -> str:
        if self.node:
            return f"{self.node} {STAGE_VERBS[self.stage]}: {self.message}"
        if self.op_type:
            return f"{self.op_type}: {self.message}"
        return self.message

    def as_dict(self) -> dict[str, str]:
        return {
            "stage": self.stage,
            "code": self.code,
            "message": self.message,
            "node": self.node,
            "op_type": self.op_type,
        }


def group_declines(declines: Iterable[Decline], *, shown: int = 4) -> list[str]:
    """One line per (stage, code, message), naming up to ``shown`` nodes; duplicates count once."""
    groups: dict[tuple[Stage, str, str, str], list[str]] = {}
    for decline in declines:
        key = (decline.stage, decline.code, decline.message, decline.op_type)
        nodes = groups.setdefault(key, [])
        if decline.node and decline.node not in nodes:
            nodes.append(decline.node)
    lines = []
    for (stage, code, message, op_type), nodes in groups.items():
        if len(nodes) > 1:
            more = f"and {len(nodes) - shown} more" if len(nodes) > shown else ""
            listed = " ".join(part for part in (", ".join(nodes[:shown]), more) if part)
            lines.append(f"{len(nodes)} nodes {STAGE_VERBS[stage]}: {message} ({listed})")
        else:
            node = nodes[0] if nodes else ""
            lines.append(str(Decline(stage, code, message, node, op_type)))
    return lines
