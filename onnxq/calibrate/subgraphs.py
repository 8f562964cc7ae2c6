"""Exposing tensors that live inside If/Loop/Scan bodies as main-graph outputs, for calibration.

ONNX Runtime returns only main-graph values, and a body's values are not in the main graph. On a copy
of the model, each body tensor to observe is lifted out, body by body, to the main graph:

- out of an ``If`` branch: it becomes an extra output of that branch, and the other branch gets an
  empty float tensor (``[0]``) in the same position; the If gets one more output. A run that takes the
  other branch returns the empty tensor, which the observer skips.
- out of a ``Loop`` or ``Scan`` body: a body output would be stacked over every iteration (memory
  growing with the iteration count), so the body computes ``ReduceMin`` and ``ReduceMax`` of the
  tensor instead (``+inf``/``-inf`` for an iteration where it holds nothing), and those scalars are
  stacked: two extra scan outputs of ``[iterations]`` floats.
  Values reduced this way give a min-max range whatever the calibration method (a histogram needs
  the values themselves).

Nested bodies lift step by step (a Loop inside an If: reduced in the Loop body, then passed out of the
branch). The copy is made once per calibration; the model itself is not changed. An If-branch tensor
whose element type shape inference could not tell is lifted as float; when ONNX Runtime refuses that
copy (the tensor is of another type), calibration makes a second copy without such tensors and reports
them as never observed, so the nodes around them stay float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.graph import NameScope, body_owners, home_graph

__all__ = ["Exposed", "expose_values", "merge_exposed"]


@dataclass(frozen=True)
class Exposed:
    """How one body tensor reaches the main graph: ``outputs`` are main-graph output names.

    ``reduced``: the outputs are (per-iteration minima, per-iteration maxima); else one output holding
    the tensor itself (empty when its branch was not taken).
    """

    outputs: tuple[str, ...]
    reduced: bool


class _UnexposableError(Exception):
    """A tensor of unknown element type inside an If branch: it cannot be lifted out."""


class _Lifter:
    def __init__(self, model: ir.Model, *, assume_float: bool) -> None:
        self.model = model
        self.assume_float = assume_float
        self.owners = body_owners(model)
        self.names = NameScope(model.graph)

    def _node(
        self,
        graph: ir.Graph,
        op_type: str,
        inputs: list[ir.Value],
        base: str,
        attributes: list[ir.Attr],
        like: ir.Value | None = None,
    ) -> ir.Value:
        """A new node at the end of ``graph``; its output typed like ``like`` (float when not given).

        A tensor whose type shape inference could not tell stays untyped, so that ONNX Runtime
        infers it: one that turns out not to be float is then reported, not refused.
        """
        node = ir.Node("", op_type, inputs, attributes, name=self.names.fresh(f"{base}_{op_type}"))
        node.outputs[0].name = self.names.fresh(f"{base}_{op_type.lower()}")
        known = like is not None and (like.type is not None or not self.assume_float)
        node.outputs[0].type = like.type if known and like is not None else ir.TensorType(ir.DataType.FLOAT)
        graph.append(node)
        return node.outputs[0]

    def _empty(self, graph: ir.Graph, base: str, like: ir.Value) -> ir.Value:
        dtype = like.dtype.numpy() if like.dtype is not None else np.float32
        empty = ir.AttrTensor("value", ir.tensor(np.zeros(0, dtype)))
        return self._node(graph, "Constant", [], base, [empty], like=like)

    def _reduce(self, graph: ir.Graph, op_type: str, value: ir.Value, base: str, identity: float) -> ir.Value:
        """``op_type`` of all of ``value``'s elements, or ``identity`` when it has none.

        The tensor is flattened and ``identity`` appended before reducing: an empty tensor (an If
        branch not taken in this iteration, a loop that ran zero times) is refused by some ONNX
        Runtime versions' reductions, and the identity is what :func:`merge_exposed` drops. A tensor
        of unknown element type is reduced as it is (an identity of the wrong type would not load).
        """
        keep = [ir.AttrInt64("keepdims", 0)]
        if value.dtype is None:  # no identity of an unknown type: reduced as it is
            return self._node(graph, op_type, [value], base, keep, like=value)
        flat_shape = ir.AttrTensor("value", ir.tensor(np.array([-1], np.int64)))
        shape = self._node(graph, "Constant", [], base, [flat_shape])
        shape.type = ir.TensorType(ir.DataType.INT64)
        flat = self._node(graph, "Reshape", [value, shape], base, [], like=value)
        fill = ir.AttrTensor("value", ir.tensor(np.array([identity], value.dtype.numpy())))
        pad = self._node(graph, "Constant", [], base, [fill], like=value)
        joined = self._node(graph, "Concat", [flat, pad], base, [ir.AttrInt64("axis", 0)], like=value)
        return self._node(graph, op_type, [joined], base, keep, like=value)

    def lift(self, values: list[ir.Value], graph: ir.Graph, reduced: bool) -> tuple[list[ir.Value], bool]:
        """``values`` of ``graph`` carried to the main graph (see the module docstring)."""
        if graph is self.model.graph:
            return values, reduced
        owner, attr_name = self.owners[id(graph)]
        outer = owner.graph
        assert outer is not None
        base = values[0].name or "value"
        if owner.op_type == "If":
            if not self.assume_float and any(v.dtype is None for v in values):
                # The other branch's placeholder must have the same element type, which is unknown.
                raise _UnexposableError
            other_name = "else_branch" if attr_name == "then_branch" else "then_branch"
            other = owner.attributes[other_name].as_graph()
            for value in values:
                # Through an Identity: a value listed twice among a body's outputs (it may be one
                # already) comes back from ONNX Runtime as garbage.
                graph.outputs.append(self._node(graph, "Identity", [value], base, [], like=value))
                other.outputs.append(self._empty(other, base, value))
        else:  # Loop / Scan: per-iteration scalars, stacked by the loop
            # Already [min, max] arrays from a nested loop: reduce each again.
            low, high = (values[0], values[1]) if reduced else (values[0], values[0])
            mins = self._reduce(graph, "ReduceMin", low, base, np.inf)
            maxes = self._reduce(graph, "ReduceMax", high, base, -np.inf)
            values, reduced = [mins, maxes], True
            graph.outputs.extend(values)
            if owner.op_type == "Scan":
                for key in ("scan_output_axes", "scan_output_directions"):
                    attr = owner.attributes.get(key)
                    if attr is not None:
                        owner.attributes[key] = ir.AttrInt64s(key, [*attr.as_ints(), 0, 0])
        count = len(owner.outputs)
        owner.resize_outputs(count + len(values))
        lifted = list(owner.outputs[count:])
        for value, inner in zip(lifted, values, strict=True):
            value.name = self.names.fresh(f"{base}_lifted")
            value.type = (
                inner.type
                if inner.type is not None or not self.assume_float
                else ir.TensorType(ir.DataType.FLOAT)
            )
        return self.lift(lifted, outer, reduced)


def expose_values(
    model: ir.Model, names: Sequence[str], *, assume_float: bool = True
) -> tuple[ir.Model, dict[str, Exposed]]:
    """A copy of ``model`` in which the body tensors named ``names`` reach main-graph outputs.

    Returns the copy (its graph outputs extended) and, per name, how the tensor is exposed. A name in
    the main graph itself is exposed as its own value. ``assume_float`` lifts If-branch tensors of
    unknown element type as float (what the planner expects); without it they are not lifted (for a
    second try when ONNX Runtime refused the first copy because one was not float).
    """
    copy = model.clone()
    found: dict[str, ir.Value] = {}
    for graph in (copy.graph, *copy.graph.subgraphs()):
        for value in graph.inputs:
            if value.name:
                found[value.name] = value
        for node in graph:
            for value in node.outputs:
                if value.name:
                    found[value.name] = value
    lifter = _Lifter(copy, assume_float=assume_float)
    exposed: dict[str, Exposed] = {}
    for name in names:
        value = found[name]
        home = home_graph(value)
        assert home is not None, f"{name} belongs to no graph"
        try:
            outputs, reduced = lifter.lift([value], home, reduced=False)
        except _UnexposableError:
            exposed[name] = Exposed((), reduced=False)
            continue
        for out in outputs:
            if not out.is_graph_output():
                copy.graph.outputs.append(out)
        exposed[name] = Exposed(tuple(out.name or "" for out in outputs), reduced)
    return copy, exposed


def merge_exposed(arrays: Sequence[np.ndarray], reduced: bool) -> np.ndarray:
    """What the observer of an exposed tensor sees: the values, or the per-iteration minima and maxima."""
    if not arrays:  # not exposable: observed as never holding a value
        return np.zeros(0, np.float32)
    if not reduced:
        return arrays[0]
    # An iteration without the tensor reduced to the identity (+inf minimum, -inf maximum): drop it.
    minima, maxima = (np.ravel(a) for a in arrays)
    return np.concatenate([minima[minima != np.inf], maxima[maxima != -np.inf]])
