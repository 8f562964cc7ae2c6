"""Residual Adds before LayerNormalization written as ``Sum``: the same numbers, another fusion.

Why: ONNX Runtime fuses ``Add → LayerNormalization`` (a transformer's residual connection and the norm
after it, with the preceding bias Add) into ``com.microsoft.SkipLayerNormalization``. Whether that is
faster depends on the release and the CPU: on onnxruntime 1.19 the fused kernel takes 30 µs where Add
+ LayerNormalization take 51 µs ([1, 128, 256], one thread), on 1.32 it takes 139 µs where they take
21 µs, and a quantized BERT spends a third of its time in it (RoBERTa, dynamo export: 0.63× float
with the fusion, 0.46× without). ``Sum`` of two inputs computes what ``Add`` does (with the same
broadcasting) and the fusion does not match it, so the rewrite turns the fusion off without changing a
value; the latency guard (:mod:`onnxq.tuning.latency_guard`) times both and keeps the faster.

What: a default-domain ``Add`` of two inputs whose output is read by ``LayerNormalization`` nodes only
(not a graph output) becomes ``Sum``, in the main graph.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS

__all__ = ["residual_adds", "write_residual_adds_as_sum"]


def residual_adds(model: ir.Model) -> list[ir.Node]:
    """The Adds of the main graph that feed LayerNormalization only (ONNX Runtime fuses those)."""
    outputs = set(model.graph.outputs)
    found = []
    for node in model.graph:
        if node.op_type != "Add" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
            continue
        out = node.outputs[0]
        readers = [use.node for use in out.uses()]
        if out in outputs or not readers:
            continue
        if all(r.op_type == "LayerNormalization" and r.domain in DEFAULT_DOMAINS for r in readers):
            found.append(node)
    return found


def write_residual_adds_as_sum(model: ir.Model) -> int:
    """Rewrite :func:`residual_adds` of ``model`` in place as ``Sum``; returns how many."""
    adds = residual_adds(model)
    for add in adds:  # same inputs, outputs and names: only the op changes
        add.op_type = "Sum"
    return len(adds)
