"""Rewriting the graph into QDQ form from a :class:`~onnxq.plan.planner.QuantPlan` and calibrated ranges.

Rewrite rules:

- Each quantized activation tensor ``x`` gets ``QuantizeLinear → DequantizeLinear`` right after its
  producer and *every* reader of ``x`` reads the dequantized value (the QDQ convention ONNX Runtime's
  fusions expect: a producer whose only consumer is a ``QuantizeLinear`` fuses into an integer kernel).
  A graph output keeps its name: the dequantized value takes it over.
- Constant activation inputs (an Add's bias, a Gather's table, a Concat constant) are stored quantized
  with their group's parameters and read through a ``DequantizeLinear``.
- Weights are stored as int8 (per channel along the plan's axis) with a ``DequantizeLinear``.
- Biases are stored as int32 with scale = input scale × weight scale and zero point 0.

Tensors in one group share one scale/zero-point initializer pair, so ONNX Runtime sees identical
parameters around pass-through ops and drops the Q/DQ there.

Inside If/Loop/Scan bodies, the Q/DQ nodes and the initializers they read (parameters, quantized
weights) are created in the body that holds the tensor or node: ONNX Runtime's QDQ fusions look for
constant parameters in the node's own graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.graph import NameScope, const_array, home_graph, insert_after_producer, make_initializer
from onnxq.plan.planner import ActivationGroup, BiasTask, QuantPlan
from onnxq.plan.saturating_readers import joint_range
from onnxq.qmath import (
    QuantParams,
    bias_safe_weight_scale,
    compute_qparams,
    quantize,
    quantize_bias,
    quantize_weight,
)
from onnxq.rewrite.weight_memo import remembered

__all__ = ["InsertQDQPass", "group_params"]


def _quantized_weight(
    weight: ir.Value,
    data: np.ndarray,
    dtype: str,
    symmetric: bool,
    axis: int | None,
    floor: np.ndarray | None,
) -> tuple[np.ndarray, QuantParams]:
    """:func:`~onnxq.qmath.quantize_weight` of ``data``, remembered per tensor (:mod:`.weight_memo`).

    The bias floor depends on the input's range, so it is not part of the key: a weight whose own
    scales already reach the floor (nearly all: the floor only binds for channels of weights near
    zero) takes the remembered result, which is what quantizing with that floor gives; one where it
    binds is quantized again with it.
    """
    found = remembered(
        weight, (dtype, symmetric, axis), lambda: quantize_weight(data, dtype, symmetric, axis)
    )
    if floor is not None and np.any(found[1].scale < floor):
        return quantize_weight(data, dtype, symmetric, axis, min_scale=floor)
    return found


def group_params(
    plan: QuantPlan, ranges: dict[ir.Value, tuple[float, float]], *, narrow: bool = False
) -> dict[int, QuantParams]:
    """Scale and zero point per activation group from calibrated ranges (and constant members' data).

    ``narrow``: each member's range only as far as its readers tell values apart
    (:func:`~onnxq.plan.saturating_readers.joint_range`), else the members' whole ranges joined.
    """
    params: dict[int, QuantParams] = {}
    for group in plan.groups:
        members: list[tuple[ir.Value, float, float]] = [
            (value, *ranges[value]) for value in group.observed if value in ranges
        ]
        for value in group.constants:
            data = const_array(value)
            if data is not None and data.size:
                finite = data[np.isfinite(data)]
                if finite.size:
                    members.append((value, float(finite.min()), float(finite.max())))
        if narrow:  # no step spent on values no reader tells apart (a hard-swish's input below -3)
            lo, hi = joint_range(members)
        else:
            lo = min((low for _, low, _ in members), default=np.inf)
            hi = max((high for _, _, high in members), default=-np.inf)
        if lo > hi:  # never observed (e.g. a tensor that stayed empty): a harmless unit range
            lo, hi = 0.0, 1.0
        params[group.index] = compute_qparams(lo, hi, group.scheme.dtype, group.scheme.symmetric)
    return params


class InsertQDQPass(ir.passes.InPlacePass):
    """Insert QuantizeLinear/DequantizeLinear according to a plan (see module docstring)."""

    def __init__(self, plan: QuantPlan, params: dict[int, QuantParams]) -> None:
        super().__init__()
        self.plan = plan
        self.params = params

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if self.plan.empty:
            return ir.passes.PassResult(model, modified=False)
        names = NameScope(graph)
        rewriter = _Rewriter(graph, names, self.plan, self.params)
        for group in self.plan.groups:
            rewriter.quantize_group(group)
        for task in self.plan.weights:
            rewriter.quantize_weight(task.node, task.input_index, task.axis, task.scheme)
        for bias in self.plan.biases:
            rewriter.quantize_bias(bias.node, bias.input_index, bias.activation, bias.weight_index)
        return ir.passes.PassResult(model, modified=True)


class _Rewriter:
    def __init__(
        self, graph: ir.Graph, names: NameScope, plan: QuantPlan, params: dict[int, QuantParams]
    ) -> None:
        self.graph = graph
        self.names = names
        self.plan = plan
        self.params = params
        self.quantized_slots = set(plan.quantized_inputs)
        self.dq_of_weight: dict[tuple[object, ...], tuple[ir.Value, QuantParams]] = {}
        #: (id of the node, index of its weight input) -> the bias task that scales with that weight
        self.bias_of: dict[tuple[int, int], BiasTask] = {(id(b.node), b.weight_index): b for b in plan.biases}
        self.weight_params: dict[tuple[int, int], QuantParams] = {}
        self.zero_points: dict[tuple[int, str, tuple[int, ...], bytes], ir.Value] = {}
        self.group_params: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}

    def _param_values(self, base: str, params: QuantParams, graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
        scale = make_initializer(graph, self.names, f"{base}_scale", np.asarray(params.scale, np.float32))
        # Equal zero points (0, 128, the zeros of symmetric weights) share one initializer, so the
        # output is already in the canonical form NormalizeQDQPass would give it.
        data = np.asarray(params.zero_point)
        key = (id(graph), str(data.dtype), data.shape, data.tobytes())
        zero_point = self.zero_points.get(key)
        if zero_point is None:
            zero_point = make_initializer(graph, self.names, f"{base}_zero_point", data)
            self.zero_points[key] = zero_point
        return scale, zero_point

    def _group_values(self, group: ActivationGroup, graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
        """The group's scale and zero point as initializers of ``graph`` (one pair per graph)."""
        key = (group.index, id(graph))
        found = self.group_params.get(key)
        if found is None:
            found = self._param_values(group.name, self.params[group.index], graph)
            self.group_params[key] = found
        return found

    def _dq_node(
        self, data: ir.Value, scale: ir.Value, zero_point: ir.Value | None, base: str, axis: int | None
    ) -> ir.Node:
        attrs = {"axis": ir.AttrInt64("axis", axis)} if axis is not None else {}
        inputs = [data, scale] if zero_point is None else [data, scale, zero_point]
        node = ir.Node(
            "",
            "DequantizeLinear",
            inputs,
            attributes=attrs,
            name=self.names.fresh(f"{base}_DequantizeLinear"),
        )
        node.outputs[0].name = self.names.fresh(f"{base}_dequantized")
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        if data.shape is not None:
            node.outputs[0].shape = data.shape
        return node

    def quantize_group(self, group: ActivationGroup) -> None:
        params = self.params[group.index]
        for value in group.members:
            if value in group.constants:
                self._quantize_constant(value, group, params)
            else:
                graph = home_graph(value) or self.graph
                scale, zero_point = self._group_values(group, graph)
                self._insert_qdq(value, scale, zero_point, params, graph)

    def _insert_qdq(
        self, value: ir.Value, scale: ir.Value, zero_point: ir.Value, params: QuantParams, graph: ir.Graph
    ) -> None:
        base = value.name or "tensor"
        uses = list(value.uses())  # before the QuantizeLinear becomes a use itself
        q = ir.Node(
            "", "QuantizeLinear", [value, scale, zero_point], name=self.names.fresh(f"{base}_QuantizeLinear")
        )
        q.outputs[0].name = self.names.fresh(f"{base}_quantized")
        q.outputs[0].type = ir.TensorType(ir.DataType.UINT8 if params.dtype == "uint8" else ir.DataType.INT8)
        if value.shape is not None:
            q.outputs[0].shape = value.shape
        dq = self._dq_node(q.outputs[0], scale, zero_point, base, None)
        dq_out = dq.outputs[0]
        insert_after_producer(graph, value, [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq_out)
        # A graph input that is also a graph output keeps both roles and its name: renaming it would
        # change the model's inputs, and the output is the (exact) float input anyway.
        if value.is_graph_output() and not value.is_graph_input():
            original = value.name
            value.name = self.names.fresh(f"{original}_float")
            dq_out.name = original
            outputs = graph.outputs
            for i, out in enumerate(outputs):
                if out is value:
                    outputs[i] = dq_out

    def _quantize_constant(self, value: ir.Value, group: ActivationGroup, params: QuantParams) -> None:
        data = const_array(value)
        if data is None:
            return
        base = value.name or "constant"
        quantized = quantize(data.astype(np.float32), params)
        dq_in: dict[int, ir.Node] = {}  # one DequantizeLinear per graph that reads the constant
        for use in list(value.uses()):
            if (use.node, use.idx) not in self.quantized_slots:
                continue
            graph = use.node.graph or self.graph
            dq = dq_in.get(id(graph))
            if dq is None:
                stored = make_initializer(graph, self.names, f"{base}_quantized", quantized)
                scale, zero_point = self._group_values(group, graph)
                dq = self._dq_node(stored, scale, zero_point, base, None)
                graph.insert_before(use.node, [dq])
                dq_in[id(graph)] = dq
            use.node.replace_input_with(use.idx, dq.outputs[0])

    def quantize_weight(self, node: ir.Node, index: int, axis: int | None, scheme: object) -> None:
        from onnxq.config import WeightScheme

        assert isinstance(scheme, WeightScheme)
        weight = node.inputs[index]
        data = const_array(weight)
        if weight is None or data is None:
            return
        graph = node.graph or self.graph
        floor = self._bias_floor(node, index, axis, data.shape)
        key = (
            id(weight),
            id(graph),
            axis,
            scheme.dtype,
            scheme.symmetric,
            None if floor is None else floor.tobytes(),
        )
        cached = self.dq_of_weight.get(key)
        if cached is None:
            q, params = _quantized_weight(weight, data, scheme.dtype, scheme.symmetric, axis, floor)
            base = weight.name or f"{node.name}_weight"
            stored = make_initializer(graph, self.names, f"{base}_quantized", q)
            scale, zero_point = self._param_values(base, params, graph)
            dq = self._dq_node(stored, scale, zero_point, base, params.axis)
            graph.insert_before(node, [dq])
            cached = (dq.outputs[0], params)
            self.dq_of_weight[key] = cached
        dq_out, params = cached
        node.replace_input_with(index, dq_out)
        self.weight_params[(id(node), index)] = params

    def _bias_floor(
        self, node: ir.Node, index: int, axis: int | None, shape: tuple[int, ...]
    ) -> np.ndarray | None:
        """The weight scale floor that keeps ``node``'s int32 bias in range (None: no bias to protect).

        :func:`~onnxq.qmath.bias_safe_weight_scale` per output channel, or its maximum for a
        per-tensor weight.
        """
        task = self.bias_of.get((id(node), index))
        if task is None:
            return None
        bias = const_array(node.inputs[task.input_index]) if task.input_index < len(node.inputs) else None
        group = self.plan.group_of.get(task.activation)
        if bias is None or group is None:
            return None
        floor = bias_safe_weight_scale(bias.reshape(-1), self.params[group.index].scale)
        if axis is None:
            return np.asarray(floor.max() if floor.size else 0.0)
        return floor if floor.shape == (shape[axis % len(shape)],) else None

    def quantize_bias(self, node: ir.Node, index: int, activation: ir.Value, weight_index: int) -> None:
        bias = node.inputs[index]
        data = const_array(bias)
        weight = self.weight_params.get((id(node), weight_index))
        group = self.plan.group_of.get(activation)
        if bias is None or data is None or weight is None or group is None:
            return
        input_scale = self.params[group.index].scale
        q, scale = quantize_bias(data, input_scale, weight.scale)
        base = bias.name or f"{node.name}_bias"
        axis = 0 if scale.ndim == 1 and scale.shape[0] > 1 else None
        if axis is None:  # one scale for every channel: store it per-tensor
            scale = np.asarray(scale.reshape(-1)[0], np.float32)
        graph = node.graph or self.graph
        stored = make_initializer(graph, self.names, f"{base}_quantized", q)
        scale_value = make_initializer(graph, self.names, f"{base}_scale", scale)
        dq = self._dq_node(stored, scale_value, None, base, axis)
        graph.insert_before(node, [dq])
        node.replace_input_with(index, dq.outputs[0])
