"""Keep ONNX Runtime's QDQ propagation away from values that If/Loop/Scan bodies read from outside.

ONNX Runtime's ``QDQPropagationTransformer`` moves a ``DequantizeLinear`` forward past the data-movement
ops after it (:data:`PROPAGATED_OPS`), re-creating a Q/DQ pair on each output edge of the op. When
such an output is read inside a subgraph (an outer-scope value of an If/Loop/Scan body), that edge is
an implicit input of the subgraph's node, and onnxruntime 1.19–1.32 indexes past the node's explicit
inputs and aborts the process: an assertion, not an exception, so nothing can catch it and no error is
printed. Found on Silero VAD v4 (openwakeword 0.5.1): a quantized Conv's output is transposed in an If
branch and read by the LSTMs of a nested If. The set of ops was measured on a one-node-at-a-time model
(Transpose, Reshape, Squeeze, Unsqueeze, Slice, Expand and MaxPool abort; Flatten, Gather, Tile, Split,
Concat, Resize and Pad do not).

:func:`move_dequantize_past_captured` makes that move itself wherever it would crash:
``DQ(q) → op → y`` with ``y`` (or a value further down a chain of such ops) read in a subgraph becomes
``op(q) → DQ → y``. The ops only move or pick elements, so with one scale and zero point for the whole
tensor the result is the same number for number; ``y`` keeps its name, which the bodies refer to.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, NameScope, const_array, default_opset, home_graph

__all__ = ["PROPAGATED_OPS", "move_dequantize_past_captured"]

#: Ops ONNX Runtime's QDQ propagation moves a DequantizeLinear past (data input 0).
PROPAGATED_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Expand", "MaxPool"})

#: MaxPool takes 8-bit integers from opset 12 on; the other ops take any type.
_MAXPOOL_INT8_OPSET = 12


def _read_in_subgraph(value: ir.Value) -> bool:
    """Whether a node of another graph (a body nested in ``value``'s graph) reads ``value``."""
    home = home_graph(value)
    return any(use.node.graph is not home for use in value.uses())


def _propagating_reader(node: ir.Node, index: int, graph: ir.Graph | None) -> bool:
    return (
        index == 0
        and node.graph is graph
        and node.op_type in PROPAGATED_OPS
        and node.domain in DEFAULT_DOMAINS
        and len(node.outputs) == 1  # MaxPool with Indices is not a pure data move
    )


def _reaches_subgraph(value: ir.Value, graph: ir.Graph | None) -> bool:
    """Whether ``value``, or a value down a chain of :data:`PROPAGATED_OPS` from it, is read in a body."""
    seen: set[int] = set()
    pending = [value]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _read_in_subgraph(current):
            return True
        pending.extend(u.node.outputs[0] for u in current.uses() if _propagating_reader(u.node, u.idx, graph))
    return False


def _per_tensor(dq: ir.Node) -> bool:
    scale = const_array(dq.inputs[1]) if len(dq.inputs) > 1 else None
    return scale is not None and scale.size == 1


def _move_past(dq: ir.Node, node: ir.Node, names: NameScope) -> ir.Node:
    """``DQ(q) → node → y`` ⇒ ``node(q) → DQ → y`` (``y`` keeps its name and its readers)."""
    quantized = dq.inputs[0]
    assert quantized is not None
    float_out = node.outputs[0]
    original = float_out.name
    node.replace_input_with(0, quantized)
    float_out.name = names.fresh(f"{original}_quantized")
    float_out.type = quantized.type
    readers = list(float_out.uses())
    moved = ir.Node(
        "",
        "DequantizeLinear",
        [float_out, *dq.inputs[1:]],
        attributes=[ir.Attr(a.name, a.type, a.value) for a in dq.attributes.values()],
        name=names.fresh(f"{original}_DequantizeLinear"),
    )
    out = moved.outputs[0]
    out.name = original
    out.type = ir.TensorType(ir.DataType.FLOAT)
    out.shape = float_out.shape
    node.graph.insert_after(node, [moved])  # type: ignore[union-attr]
    for use in readers:
        use.node.replace_input_with(use.idx, out)
    graph = node.graph
    if graph is not None and float_out.is_graph_output():
        outputs = graph.outputs
        for i, value in enumerate(outputs):
            if value is float_out:
                outputs[i] = out
    return moved


def move_dequantize_past_captured(model: ir.Model) -> int:
    """Apply the move (module docstring) in every graph of ``model``; returns the number of moves."""
    names = NameScope(model.graph)
    maxpool_ok = default_opset(model) >= _MAXPOOL_INT8_OPSET
    moves = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        pending = [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in DEFAULT_DOMAINS]
        while pending:
            dq = pending.pop()
            if dq.inputs[0] is None or not _per_tensor(dq):
                continue
            for use in list(dq.outputs[0].uses()):
                node = use.node
                if not _propagating_reader(node, use.idx, graph):
                    continue
                if node.op_type == "MaxPool" and not maxpool_ok:
                    continue
                if _reaches_subgraph(node.outputs[0], graph):
                    pending.append(_move_past(dq, node, names))  # the moved DQ: the chain goes on
                    moves += 1
    return moves
