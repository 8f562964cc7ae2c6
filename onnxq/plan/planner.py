"""Deciding what to quantize: which nodes run on integers and which tensors get Q/DQ.

The plan is computed before calibration so that only the tensors that need a range are observed.

Rules (see :mod:`onnxq.plan.op_rules` for the table):

1. Anchors (Conv, ConvTranspose, Gemm, MatMul) are quantized unless excluded or ineligible (weight not
   a constant for Conv/ConvTranspose, non-float data, an input that is already dequantized).
2. Integer and pass-through ops are quantized when every float input arrives quantized and some
   consumer wants their output quantized. This is a greatest fixpoint: start with every eligible op
   quantized and drop those whose inputs or consumers are float, until nothing changes — so cycles of
   mutual dependence (a Resize feeding a Concat) stay quantized, and chains that begin or end in float
   code fall back to float. A small float operand a Mul broadcasts over a quantized map (a
   squeeze-and-excitation gate) counts as arriving quantized where that keeps the map on integers
   (:meth:`_Planner.broadcast_gate`).
3. Relu/Clip right after a quantized producer (whose output has no other use) are absorbed: no Q/DQ
   between the two (asymmetric activations only: a zero point at the range's bottom must clamp).
4. Tensors that must share parameters (pass-through input/output, Concat inputs/output) form groups;
   each group gets one scale and zero point. A Concat input joins its output's group only when
   nothing outside that group reads it (:meth:`_Planner.reads_only`); one read elsewhere keeps its
   own range, and the Concat (a ``QLinearConcat`` after ONNX Runtime's fusion) requantizes it.

The same rules apply inside If/Loop/Scan bodies: every graph's nodes are planned, a value is wanted
quantized only by readers of its own graph (a body reading an outer value reads it in float), and
the plan counts, per body, the nodes it quantizes (:attr:`QuantPlan.bodies`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.config import ActivationScheme, QuantConfig, WeightScheme
from onnxq.declines import Decline, Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    attr_int,
    attr_str,
    const_array,
    home_graph,
    is_constant,
    is_float,
    node_label,
)
from onnxq.plan.op_rules import ABSORBABLE_ACTIVATIONS, FLOAT_REASONS, OP_RULES, OpKind, OpRule

__all__ = ["ActivationGroup", "BiasTask", "QuantPlan", "WeightTask", "plan_quantization"]

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


@dataclass
class ActivationGroup:
    """Tensors that share one scale and zero point.

    ``observed`` are the members whose range calibration must measure; ``constants`` contribute their
    own min/max and are stored quantized.
    """

    index: int
    scheme: ActivationScheme
    members: list[ir.Value] = field(default_factory=list)
    observed: list[ir.Value] = field(default_factory=list)
    constants: list[ir.Value] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.members[0].name or f"group{self.index}"


@dataclass(frozen=True)
class WeightTask:
    """Quantize the constant at ``node.inputs[input_index]`` (per channel along ``axis`` when set)."""

    node: ir.Node
    input_index: int
    axis: int | None
    scheme: WeightScheme


@dataclass(frozen=True)
class BiasTask:
    """Quantize a bias to int32 with scale = scale of ``activation`` × scale of the weight input."""

    node: ir.Node
    input_index: int
    activation: ir.Value
    weight_index: int


@dataclass
class QuantPlan:
    """The outcome of planning: what gets quantized, and why the rest does not."""

    quantized_nodes: list[ir.Node] = field(default_factory=list)
    absorbed_nodes: list[ir.Node] = field(default_factory=list)
    groups: list[ActivationGroup] = field(default_factory=list)
    group_of: dict[ir.Value, ActivationGroup] = field(default_factory=dict)
    weights: list[WeightTask] = field(default_factory=list)
    biases: list[BiasTask] = field(default_factory=list)
    #: Values read quantized by each quantized node: (node, input index) pairs.
    quantized_inputs: list[tuple[ir.Node, int]] = field(default_factory=list)
    declined: list[Decline] = field(default_factory=list)
    float_op_types: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Nodes inside If/Loop/Scan bodies that stay float.
    subgraph_nodes: int = 0
    #: Per body (``"<If If_0>.then_branch"``): (nodes quantized, nodes in the body).
    bodies: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.quantized_nodes

    def observed_values(self) -> list[ir.Value]:
        """Every tensor calibration must observe, in a deterministic order."""
        return [v for g in self.groups for v in g.observed]

    def quantized_op_types(self) -> collections.Counter[str]:
        return collections.Counter(n.op_type for n in self.quantized_nodes)


#: Integer ops that may read a small float operand quantized (:meth:`_Planner.broadcast_gate`). Not
#: Add: a small operand added to a map is as often an attention mask of -inf/float32-min fills, which
#: no integer grid holds, as a bias.
_BROADCAST_READERS = ("Mul",)

#: The most values a broadcast operand may hold (per sample) to be quantized for its reader's sake.
BROADCAST_GATE_ELEMENTS = 4096


def _broadcasts_small(small: ir.Value, large: ir.Value) -> bool:
    """Whether ``small`` broadcasts over ``large`` along some axis and holds few values per sample.

    Both shapes must be known in rank; ``small``'s dims must be 1, or equal to ``large``'s at the same
    axis (the batch and channel dims), with at least one 1 against a dim of ``large`` that is not 1,
    and its known dims after the first must multiply to at most :data:`BROADCAST_GATE_ELEMENTS`.
    """
    if small.shape is None or large.shape is None or len(small.shape) != len(large.shape):
        return False
    spread = False
    count = 1
    for axis, (dim, other) in enumerate(zip(small.shape, large.shape, strict=True)):
        if dim == 1:
            spread = spread or other != 1
            continue
        if dim != other:
            return False
        if axis > 0:
            if not isinstance(dim, int):
                return False
            count *= dim
    return spread and count <= BROADCAST_GATE_ELEMENTS


#: The widest magnitude ratio (largest / smallest non-zero) a Mul's constant factor may span to be
#: stored on one 8-bit grid: beyond 51×, its smallest values fall below 5 steps and lose over 10 %
#: (a per-channel rescaling by factors that span orders of magnitude, as outlier smoothing's
#: divisors in front of depthwise Convs do, would zero whole channels).
MUL_CONSTANT_SPREAD = 51.0


def _constant_spread(node: ir.Node) -> float:
    """The magnitude ratio of a Mul's constant operand of more than one value (1.0 without one)."""
    spread = 1.0
    for operand in node.inputs:
        data = const_array(operand)
        if data is None or data.size < 2 or data.dtype.kind != "f":
            continue
        magnitude = np.abs(data[np.isfinite(data)].astype(np.float64))
        live = magnitude[magnitude > 0]
        if live.size:
            spread = max(spread, float(live.max() / live.min()))
    return spread


class _Planner:
    def __init__(self, model: ir.Model, config: QuantConfig) -> None:
        self.graph = model.graph
        self.config = config
        self.nodes = list(self.graph.all_nodes())
        self.plan = QuantPlan()
        self.rules: dict[ir.Node, OpRule] = {}
        self.kept: set[ir.Node] = set()
        self.absorbed: set[ir.Node] = set()

    # -- eligibility -------------------------------------------------------------------------------
    def eligible(self, node: ir.Node) -> OpRule | None:
        """The node's rule if it may be quantized at all; records why an anchor may not."""
        if node.domain not in DEFAULT_DOMAINS:
            return None
        rule = OP_RULES.get(node.op_type)
        if rule is None:
            return None
        label = node_label(node)
        settings = self.config.resolve(node.name or "", node.op_type)
        if not settings.quantize:
            if rule.kind is OpKind.ANCHOR:
                self.decline(label, "excluded", "excluded by configuration")
            return None
        data = self.data_inputs(node, rule)
        if not data or any(not is_float(v) for v in data):
            if rule.kind is OpKind.ANCHOR:
                self.decline(label, "not_float", "input is not float32")
            return None
        if any(v.producer() is not None and v.producer().op_type in _QDQ_OPS for v in data):  # type: ignore[union-attr]
            if rule.kind is OpKind.ANCHOR:
                self.decline(label, "already_quantized", "input is already quantized (Q/DQ)")
            return None
        reason = self.specific_check(node)
        if reason:
            self.plan.declined.append(Decline.of("plan", label, reason))
            return None
        return rule

    def data_inputs(self, node: ir.Node, rule: OpRule) -> list[ir.Value]:
        indices = range(len(node.inputs)) if rule.inputs is None else rule.inputs
        return [node.inputs[i] for i in indices if i < len(node.inputs) and node.inputs[i] is not None]  # type: ignore[misc]

    def decline(self, label: str, code: str, message: str) -> None:
        self.plan.declined.append(Decline("plan", code, message, label))

    def specific_check(self, node: ir.Node) -> Reason | None:
        """Op-specific conditions; a returned reason is why the node stays float."""
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if not is_constant(weight):
                return Reason("weight_not_constant", "weight is not a constant")
            if weight is not None and weight.dtype not in (None, ir.DataType.FLOAT):
                return Reason("not_float", "weight is not float32")
        if op == "MaxPool" and len(node.outputs) > 1:
            indices = node.outputs[1]
            if indices.uses() or indices.is_graph_output():
                return Reason("indices_used", "MaxPool indices output is used")
        if op == "Resize" and attr_str(node, "mode", "nearest") not in ("nearest", "linear"):
            return Reason("resize_mode", "Resize mode is not nearest/linear")
        if op == "Gather" and not is_float(node.inputs[0]):
            return Reason("not_float", "gathered data is not float32")
        if op == "Where":
            for branch in node.inputs[1:]:
                data = const_array(branch)
                if data is not None and data.size and not np.all(np.isfinite(data)):
                    return Reason("not_finite", "a constant branch holds inf/nan (a mask fill): no range")
        if op == "Pad":
            value = node.inputs[2] if len(node.inputs) > 2 else None
            if attr_str(node, "mode", "constant") == "constant" and value is not None:
                fill = const_array(value)
                if fill is None:
                    return Reason("pad_value", "the Pad fill value is not a constant")
                if not np.all(np.isfinite(fill)):
                    return Reason("not_finite", "the Pad fill value is inf/nan: no integer grid holds it")
        if op == "Mul":
            spread = _constant_spread(node)
            if spread > MUL_CONSTANT_SPREAD:
                return Reason(
                    "constant_precision",
                    f"a constant factor spans {spread:.0f}x in magnitude: on one 8-bit grid its small values "
                    f"would lose over 10 % (at most {MUL_CONSTANT_SPREAD:.0f}x)",
                )
        if op == "Clip" and len(node.inputs) > 1:
            for bound in node.inputs[1:]:
                if bound is not None and not is_constant(bound):
                    return Reason("clip_bounds", "Clip bounds are not constants")
        return None

    # -- fixpoint ----------------------------------------------------------------------------------
    def scheme_of(self, node: ir.Node) -> ActivationScheme:
        resolved = self.config.resolve(node.name or "", node.op_type).activations
        return resolved or self.config.activations

    def absorbable(self, node: ir.Node) -> bool:
        if node.op_type not in ABSORBABLE_ACTIVATIONS or node not in self.rules:
            return False
        x = node.inputs[0]
        producer = x.producer() if x is not None else None
        if x is None or producer is None or producer not in self.kept:
            return False
        if self.rules[producer].kind is OpKind.PASSTHROUGH:
            return False
        if len(x.uses()) != 1 or x.is_graph_output():
            return False
        return not self.scheme_of(producer).symmetric

    def available(self, value: ir.Value) -> bool:
        """Whether ``value`` will be quantized anyway, so that reading it quantized costs nothing.

        True for constants (stored quantized), outputs of quantized producers, and tensors an anchor
        reads quantized (every reader of a quantized tensor sees the same DequantizeLinear).
        """
        if is_constant(value):
            return True
        producer = value.producer()
        if producer is not None and producer in self.absorbed:
            return True
        if producer is not None and producer in self.kept:
            return True
        return self.read_by_anchor(value)

    def read_by_anchor(self, value: ir.Value) -> bool:
        """Whether a quantized anchor reads ``value`` at one of its quantized inputs."""
        for use in value.uses():
            consumer = use.node
            if consumer in self.kept and self.rules[consumer].kind is OpKind.ANCHOR:
                rule = self.rules[consumer]
                if rule.inputs is None or use.idx in rule.inputs:
                    return True
        return False

    def broadcast_gate(self, value: ir.Value, reader: ir.Node) -> bool:
        """Whether ``value`` is a small float operand that ``reader`` broadcasts over a quantized tensor.

        A squeeze-and-excitation gate (``x · HardSigmoid(…)`` of shape [N, C, 1, 1] over [N, C, H, W]):
        its producer has no integer kernel, so the gate is float, and without this rule the Mul, and
        every Add after it, ran in float on the full feature map between a DequantizeLinear and a
        QuantizeLinear (PP-OCRv4 det's residual SE blocks ``x + x · gate``: 5 ms of its 50 ms).
        Quantizing a tensor of at most :data:`BROADCAST_GATE_ELEMENTS` values costs one small
        QuantizeLinear and lets the Mul run as QLinearMul and the Adds after it as QLinearAdd.

        Only where the product would otherwise stay float: where an anchor reads it, it is quantized
        for that anchor anyway and the integer ops after it read that (PP-LCNet's SE blocks and the
        PP-OCRv6 recognizer's gained 0.5-3 % from a QLinearMul, while the gate's rounding cost 0.6 dB of
        output SQNR and 2 of 100 recognized lines); and only where an integer op reads it on.
        """
        if reader.op_type not in _BROADCAST_READERS or is_constant(value) or not is_float(value):
            return False
        others = [v for v in reader.inputs if v is not None and v is not value]
        if len(others) != 1 or is_constant(others[0]) or not self.available(others[0]):
            return False  # the map it scales must be a quantized activation
        readers = [use.node for out in reader.outputs for use in out.uses() if use.node in self.kept]
        if not any(self.rules[node].kind is OpKind.INTEGER for node in readers):
            return False
        if any(self.read_by_anchor(out) for out in reader.outputs):
            return False
        return _broadcasts_small(value, others[0])

    def wanted(self, value: ir.Value) -> bool:
        """Whether some consumer reads ``value`` quantized (directly, or through pass-through ops)."""
        for use in value.uses():
            consumer, index = use.node, use.idx
            if consumer.graph is not home_graph(value):
                continue  # read from inside a body: in float
            if consumer in self.absorbed:
                if any(self.wanted(out) for out in consumer.outputs):
                    return True
                continue
            if consumer not in self.kept:
                continue
            rule = self.rules[consumer]
            if rule.kind is OpKind.PASSTHROUGH:
                if index == 0 and any(self.wanted(out) for out in consumer.outputs if is_float(out)):
                    return True
                continue
            if rule.inputs is None or index in rule.inputs:
                return True
        return False

    def settle(self) -> None:
        for node in self.nodes:
            rule = self.eligible(node)
            if rule is not None:
                self.rules[node] = rule
                self.kept.add(node)
        changed = True
        while changed:
            changed = False
            for node in self.nodes:
                if node not in self.rules or self.rules[node].kind is OpKind.ANCHOR:
                    continue
                was_kept, was_absorbed = node in self.kept, node in self.absorbed
                if not (was_kept or was_absorbed):
                    continue
                if self.absorbable(node):
                    new_kept, new_absorbed = False, True
                else:
                    rule = self.rules[node]
                    data = self.data_inputs(node, rule)
                    inputs = [v for v in data if not is_constant(v)]
                    # A node of constants only is left to constant folding, except a pass-through
                    # over a constant table (Gather of embeddings), whose table is stored quantized.
                    ok = bool(inputs or (data and rule.kind is OpKind.PASSTHROUGH))
                    ok = ok and all(self.available(v) or self.broadcast_gate(v, node) for v in inputs)
                    float_outputs = [out for out in node.outputs if is_float(out)]
                    if float_outputs:
                        ok = ok and any(self.wanted(out) for out in float_outputs)
                    else:
                        ok = ok and rule.output == "none"
                    new_kept, new_absorbed = ok, False
                if (new_kept, new_absorbed) != (was_kept, was_absorbed):
                    self.kept.discard(node)
                    self.absorbed.discard(node)
                    if new_kept:
                        self.kept.add(node)
                    if new_absorbed:
                        self.absorbed.add(node)
                    changed = True

    # -- groups and tasks --------------------------------------------------------------------------
    def build(self) -> QuantPlan:
        self.settle()
        plan = self.plan
        parent: dict[ir.Value, ir.Value] = {}
        scheme: dict[ir.Value, ActivationScheme] = {}

        def find(v: ir.Value) -> ir.Value:
            parent.setdefault(v, v)
            while parent[v] is not v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v

        members: dict[ir.Value, list[ir.Value]] = {}
        joined: set[tuple[ir.Node, int]] = set()  # (reader, input index) edges inside a group

        def union(a: ir.Value, b: ir.Value) -> None:
            ra, rb = find(a), find(b)
            if ra is not rb:
                parent[rb] = ra
                members.setdefault(ra, [ra]).extend(members.pop(rb, [rb]))

        def add(v: ir.Value, node: ir.Node) -> None:
            find(v)
            scheme.setdefault(v, self.scheme_of(v.producer() or node))

        def join(node: ir.Node, index: int) -> None:
            value = node.inputs[index]
            assert value is not None
            joined.add((node, index))
            for out in node.outputs:
                if is_float(out) and out.name:
                    union(value, out)

        shared: list[tuple[ir.Node, int]] = []
        for node in self.nodes:
            if node not in self.kept:
                continue
            rule = self.rules[node]
            plan.quantized_nodes.append(node)
            weight_index = self.weight_index(node, rule)
            for index, value in enumerate(node.inputs):
                if value is None or (rule.inputs is not None and index not in rule.inputs):
                    continue
                if index == weight_index:
                    continue
                add(value, node)
                plan.quantized_inputs.append((node, index))
                if rule.shared_scale:
                    shared.append((node, index))  # decided below, once every move is grouped
                elif rule.kind is OpKind.PASSTHROUGH and index == 0:
                    join(node, index)
            fill = self.pad_fill(node)
            if fill is not None and node.inputs[0] is not None:
                # The fill value is written into the output: the shared range must hold it.
                add(fill, node)
                union(node.inputs[0], fill)
                joined.add((node, 2))
            if weight_index is not None:
                plan.weights.append(self.weight_task(node, weight_index))
                bias = self.bias_index(node, rule, weight_index)
                if bias is not None:
                    plan.biases.append(BiasTask(node, bias, node.inputs[0], weight_index))  # type: ignore[arg-type]
            for out in node.outputs:
                if not is_float(out) or (node.op_type == "MaxPool" and out is not node.outputs[0]):
                    continue
                target = out
                consumers = [u.node for u in out.uses()]
                absorbs = len(consumers) == 1 and consumers[0] in self.absorbed
                if absorbs:
                    target = consumers[0].outputs[0]
                if rule.output == "always" or self.wanted(target):
                    add(target, node)
                    if absorbs:  # (an activation after a float output runs in float: not absorbed)
                        plan.absorbed_nodes.append(consumers[0])

        apart: set[ir.Node] = set()
        for node, index in shared:  # in graph order: an earlier Concat's group is settled first
            value = node.inputs[index]
            assert value is not None
            root = find(value)
            if (
                is_constant(value)
                or any(find(out) is root for out in node.outputs if out in parent)
                or self.reads_only(members.get(root, [value]), node, joined)
            ):
                join(node, index)
            else:
                apart.add(node)

        groups: dict[ir.Value, ActivationGroup] = {}
        for value in list(parent):
            root = find(value)
            group = groups.get(root)
            if group is None:
                group = ActivationGroup(index=len(groups), scheme=scheme[root])
                groups[root] = group
                plan.groups.append(group)
            group.members.append(value)
            plan.group_of[value] = group
            producer = value.producer()
            if is_constant(value):
                group.constants.append(value)
            elif not (
                producer is not None
                and producer in self.kept
                and (self.rules[producer].kind is OpKind.PASSTHROUGH or self.rules[producer].shared_scale)
                and producer not in apart  # a Concat output holds values of inputs scaled apart
            ):
                group.observed.append(value)

        absorbed = set(plan.absorbed_nodes)
        for node in self.nodes:
            if node not in self.kept and node not in absorbed:
                plan.float_op_types[node.op_type] += 1
                reason = FLOAT_REASONS.get(node.op_type)
                decline = Decline("plan", "kept_float", reason or "", op_type=node.op_type)
                if reason and decline not in plan.declined:
                    plan.declined.append(decline)
        quantized = set(plan.quantized_nodes) | absorbed
        for owner in self.nodes:
            for attr in owner.attributes.values():
                bodies = (
                    [attr.as_graph()]
                    if attr.type == ir.AttributeType.GRAPH
                    else list(attr.as_graphs())
                    if attr.type == ir.AttributeType.GRAPHS
                    else []
                )
                for body in bodies:
                    count = sum(1 for n in body if n in quantized)
                    plan.bodies[f"{node_label(owner)}.{attr.name}"] = (count, len(body))
        plan.subgraph_nodes = sum(1 for g in self.graph.subgraphs() for n in g if n not in quantized)
        return plan

    @staticmethod
    def reads_only(members: list[ir.Value], node: ir.Node, joined: set[tuple[ir.Node, int]]) -> bool:
        """Whether ``node`` is the only reader of a group's ``members`` besides the group's own moves.

        A Concat input takes the Concat's scale only then: its values land on the output's grid in any
        case, so sharing costs it nothing and spares the Concat a requantization. An input something
        else also reads (a C2f block's Split output that the next bottleneck reads too, a DenseNet
        block's running Concat that its BatchNorm reads) keeps its own range, as in ONNX Runtime's
        quantizer: sharing would widen that reader's grid to the union of every input's range.
        """
        for value in members:
            if value.is_graph_output():
                return False
            for use in value.uses():
                if use.node is not node and (use.node, use.idx) not in joined:
                    return False
        return True

    @staticmethod
    def pad_fill(node: ir.Node) -> ir.Value | None:
        """The constant fill value of a constant-mode Pad (``None`` for other ops and modes)."""
        if node.op_type != "Pad" or attr_str(node, "mode", "constant") != "constant":
            return None
        value = node.inputs[2] if len(node.inputs) > 2 else None
        return value if value is not None and is_constant(value) else None

    def weight_index(self, node: ir.Node, rule: OpRule) -> int | None:
        if rule.kind is not OpKind.ANCHOR:
            return None
        if node.op_type == "MatMul":
            b = node.inputs[1]
            if is_constant(b) and b is not None and len(b.shape or ()) >= 2:
                return 1
            return None
        if rule.weight is not None and is_constant(node.inputs[rule.weight]):
            return rule.weight
        return None

    def weight_task(self, node: ir.Node, index: int) -> WeightTask:
        scheme = self.config.resolve(node.name or "", node.op_type).weights or self.config.weights
        weight = node.inputs[index]
        rank = len(weight.shape) if weight is not None and weight.shape is not None else 0
        axis: int | None = None
        if scheme.per_channel:
            if node.op_type == "Conv":
                axis = 0
            elif node.op_type == "ConvTranspose":
                # Weight is (C, M/group, k...): axis 1 is the output channel only without groups.
                axis = 1 if attr_int(node, "group", 1) == 1 else None
            elif node.op_type == "Gemm":
                axis = 0 if attr_int(node, "transB", 0) else 1
            elif node.op_type == "MatMul":
                # Per column only for a 2-D weight: ONNX Runtime's integer MatMul kernels (what its QDQ
                # fusion makes of a batched [B, K, N] weight) reject a 1-D per-column scale there.
                axis = rank - 1 if rank == 2 else None
        return WeightTask(node, index, axis, scheme)

    def bias_index(self, node: ir.Node, rule: OpRule, weight_index: int) -> int | None:
        if rule.bias is None or len(node.inputs) <= rule.bias:
            return None
        bias = node.inputs[rule.bias]
        data = const_array(bias)
        if data is None or data.dtype != "float32" or data.ndim != 1:
            return None
        if node.op_type == "Gemm":
            alpha = node.attributes.get("alpha")
            beta = node.attributes.get("beta")
            if (alpha is not None and alpha.as_float() != 1.0) or (
                beta is not None and beta.as_float() != 1.0
            ):
                return None
            weight = const_array(node.inputs[weight_index])
            if weight is None:
                return None
            n = weight.shape[0] if attr_int(node, "transB", 0) else weight.shape[1]
            if data.shape[0] != n:
                return None
        return rule.bias


def plan_quantization(model: ir.Model, config: QuantConfig) -> QuantPlan:
    """Decide, for every graph of the model, which nodes and tensors to quantize (see module docs)."""
    return _Planner(model, config).build()
