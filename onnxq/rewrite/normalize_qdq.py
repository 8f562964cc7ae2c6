"""Putting models that already hold QuantizeLinear/DequantizeLinear into one canonical QDQ form.

Such models come from PyTorch QAT (fake-quant exported as ``Q → DQ`` on weights *and* activations, the
weights still float), from other tools (``onnxruntime.quantization``, NNCF, TensorRT-style symmetric
int8) or from onnxq itself. :class:`NormalizeQDQPass` rewrites them, without recalibration, into the
form onnxq's :class:`~onnxq.rewrite.insert_qdq.InsertQDQPass` writes: integer weights read through a
``DequantizeLinear``, scale/zero-point initializers shared by name, scalar per-tensor parameters.

Rewrite rules, in the order they run (every graph, subgraphs included):

1. ``com.microsoft`` ``QuantizeLinear``/``DequantizeLinear`` become default-domain ops. Declined (the
   node stays as it is, with a note) when the default-domain opset cannot express it: opset < 10,
   per-axis parameters below opset 13, a quantized type the opset lacks (int16/int4 need 21), a
   float16 scale below 19, an attribute other than ``axis``.
2. ``Constant`` nodes that feed a scale or zero point of a Q/DQ become initializers (same name).
3. Constant weight fake-quant: a ``QuantizeLinear`` whose input is a float constant (initializer or
   ``Constant``, also reached through ``Identity``/``Cast``) and whose scale and zero point are
   constants is computed once with :func:`onnxq.qmath.quantize` (round half to even, as the runtime
   does) and replaced by an integer initializer; the ``DequantizeLinear`` after it stays. Declined
   with a note for block-wise parameters (opset 21 ``block_size``), quantized types other than
   int8/uint8, non-float32 data, scales or arithmetic (opset 25 ``precision``), scales that do not
   fit the weight, and a ``QuantizeLinear`` whose output is a graph output.
4. ``[1]``-shaped scales and zero points of per-tensor Q/DQ (no ``axis`` attribute) become scalars;
   in place when every reader is such a slot, else through a scalar copy for those slots.
5. Duplicate scale/zero-point initializers (same data type, shape and bytes) are merged into the first
   one, so that pairs that are equal by value are equal by name too. A duplicate in a subgraph is
   merged only into one of the main graph or of its own graph (a name it can see). Written here
   rather than with onnx-ir's ``DeduplicateInitializersPass``, which merges every initializer
   (weights and shape tensors too) and never across graph scopes.
6. ``DequantizeLinear → QuantizeLinear`` with identical constant parameters (scale, zero point,
   integer type, axis and float type, compared by value) collapses to the integer tensor the
   ``DequantizeLinear`` reads. This also merges a double fake-quant ``Q → DQ → Q → DQ`` into one pair.
7. Q/DQ nodes in one graph that read the same tensor with identical parameters (two fake-quants of
   one tensor) are merged into the first one.

Nodes and initializers that these rewrites leave unused (the float weights, ``Identity``/``Cast``
chains, the collapsed pairs) are removed; nothing else is. Rules never apply to tensors with
parameters computed at run time (not constants), and never rename or retarget a graph output.

The pass also lists, in ``missing_ranges``, every float non-constant tensor read as data or weight by
a Conv/ConvTranspose/MatMul/Gemm that no ``DequantizeLinear`` produces (directly or through
scale-preserving ops such as Reshape or MaxPool): those nodes have no range and cannot be lowered to
integer operators. Nothing is changed for them. A model without any Q/DQ is left alone entirely
(``modified`` False, both lists empty).

Running the pass on its own output changes nothing.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Decline, Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    NameScope,
    attr_int,
    const_array,
    default_opset,
    is_float,
    make_initializer,
    node_label,
)
from onnxq.plan.op_rules import ANCHOR_OPS, PASSTHROUGH_OPS
from onnxq.qmath import QuantParams, quantize

__all__ = ["PHASES", "NormalizeQDQPass", "Phase", "is_quantized"]

logger = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_PASSTHROUGH = frozenset(PASSTHROUGH_OPS)
#: Ops through which a constant weight may reach a QuantizeLinear.
_CONST_FORWARDING = ("Identity", "Cast")
_FLOAT_CASTS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
#: Quantized types each default-domain opset accepts for QuantizeLinear/DequantizeLinear.
_TYPES_SINCE: dict[ir.DataType, int] = {
    ir.DataType.UINT8: 10,
    ir.DataType.INT8: 10,
    ir.DataType.INT16: 21,
    ir.DataType.UINT16: 21,
    ir.DataType.INT4: 21,
    ir.DataType.UINT4: 21,
}
_FOLDABLE_TYPES: dict[ir.DataType, str] = {ir.DataType.UINT8: "uint8", ir.DataType.INT8: "int8"}
#: Ops that the dead-code sweep may remove once their outputs are unused.
_SWEEPABLE = frozenset((*_QDQ_OPS, "Constant", *_CONST_FORWARDING))


def is_quantized(model: ir.Model) -> bool:
    """Whether any graph of ``model`` (subgraphs included) holds a QuantizeLinear/DequantizeLinear.

    Default-domain ops and their ``com.microsoft`` variants count.
    """
    return any(_is_qdq(node, ms=True) for node in model.graph.all_nodes())


def _is_qdq(node: ir.Node, *, ms: bool = False) -> bool:
    if node.op_type not in _QDQ_OPS:
        return False
    return node.domain in DEFAULT_DOMAINS or (ms and node.domain == _MS_DOMAIN)


@dataclass(frozen=True)
class _ParamsKey:
    """The constant parameters of one Q/DQ node, normalized so that equal computations compare equal.

    Size-1 scales are per-tensor whatever their shape and ``axis``; a missing zero point is zeros of
    the quantized type.
    """

    qtype: ir.DataType
    scale_dtype: ir.DataType
    #: The float type of the arithmetic: a DQ's ``output_dtype`` or a Q's ``precision`` (opset 25),
    #: by default the scale's type.
    float_dtype: ir.DataType
    axis: int | None
    block_size: int
    shape: tuple[int, ...]
    scale: bytes
    zero_point: bytes


class NormalizeQDQPass(ir.passes.InPlacePass):
    """Normalize an existing QDQ model without recalibration (rules in the module docstring).

    After a call, ``notes`` says what changed (one line per rule that applied), ``declined`` which
    nodes a rule left as they were and why, and ``missing_ranges`` names the Conv/MatMul/Gemm inputs
    that have no Q/DQ.
    """

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []
        self.declined: list[Decline] = []
        self.missing_ranges: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.notes = []
        self.declined = []
        self.missing_ranges = []
        if not is_quantized(model):
            return ir.passes.PassResult(model, modified=False)
        ctx = _Normalizer(model)
        for phase in PHASES:
            phase.apply(ctx)
        self.notes = ctx.notes
        self.declined = ctx.declined
        self.missing_ranges = missing_ranges(model)
        return ir.passes.PassResult(model, modified=ctx.modified)


def missing_ranges(model: ir.Model) -> list[str]:
    """One line per float non-constant data/weight input of an anchor op that has no Q/DQ."""
    lines: list[str] = []
    for node in model.graph.all_nodes():
        if node.op_type not in ANCHOR_OPS or node.domain not in DEFAULT_DOMAINS:
            continue
        for value in node.inputs[:2]:
            if value is None or not is_float(value) or const_array(value) is not None:
                continue
            if _has_range(value):
                continue
            lines.append(
                f"{node_label(node)}: input '{value.name}' has no QuantizeLinear/DequantizeLinear (no range)"
            )
    return lines


def _has_range(value: ir.Value) -> bool:
    """Whether a DequantizeLinear produces ``value``, directly or through scale-preserving ops."""
    seen: set[int] = set()
    current: ir.Value | None = value
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        producer = current.producer()
        if producer is None:
            return False
        if _is_qdq(producer, ms=True):
            return producer.op_type == "DequantizeLinear"
        if producer.domain not in DEFAULT_DOMAINS or producer.op_type not in _PASSTHROUGH:
            return False
        current = producer.inputs[0] if producer.inputs else None
    return False


class _Normalizer:
    """The state of one normalization run: names, notes, and nodes left for the dead-code sweep."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.main = model.graph
        self.names = NameScope(model.graph)
        self.opset = default_opset(model)
        self.notes: list[str] = []
        self.declined: list[Decline] = []
        self.modified = False
        self.dead: list[ir.Node] = []
        #: Counters the rules of a phase fill and the phase reports (``note``).
        self.counts: collections.Counter[str] = collections.Counter()
        #: Per-phase plans made before its rules run (values to make scalar or merge, by value).
        self.scalar_in_place: set[ir.Value] = set()
        self.scalar_copies: dict[ir.Value, ir.Value] = {}
        self.merge_into: dict[ir.Value, ir.Value] = {}
        self.fold_cache: dict[tuple[int, _ParamsKey], ir.Value] = {}
        self.first_reader: dict[int, dict[tuple[str, int, _ParamsKey], ir.Node]] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def graphs(self) -> list[ir.Graph]:
        return [self.main, *self.main.subgraphs()]

    def qdq_nodes(self) -> list[ir.Node]:
        return [node for node in self.main.all_nodes() if _is_qdq(node)]

    def note(self, count: int, text: str) -> None:
        """Record ``count`` changes described by ``text`` (``{s}`` marks the plural endings)."""
        if count:
            self.notes.append(f"{count} " + text.replace("{s}", "" if count == 1 else "s"))
            logger.debug("normalize_qdq: %s", self.notes[-1])
            self.modified = True

    def qtype(self, node: ir.Node) -> ir.DataType | None:
        """The integer type a Q writes or a DQ reads."""
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_point is not None:
            return zero_point.dtype
        if node.op_type == "DequantizeLinear":
            data = node.inputs[0]
            return data.dtype if data is not None else None
        if self.opset >= 21 and "output_dtype" in node.attributes:
            dtype = attr_int(node, "output_dtype", 0)
            return ir.DataType(dtype) if dtype else ir.DataType.UINT8
        return ir.DataType.UINT8

    def params(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray, ir.DataType] | None:
        """Constant scale and zero point (zeros when absent) and the quantized type, else ``None``."""
        scale_value = node.inputs[1] if len(node.inputs) > 1 else None
        scale = const_array(scale_value)
        qtype = self.qtype(node)
        if scale is None or qtype is None or scale_value is None:
            return None
        zero_value = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_value is None:
            try:
                zero_point = np.zeros(scale.shape, dtype=qtype.numpy())
            except (TypeError, ValueError):
                return None
        else:
            zp = const_array(zero_value)
            if zp is None:
                return None
            zero_point = zp
        return scale, zero_point, qtype

    def block_size(self, node: ir.Node) -> int:
        return attr_int(node, "block_size", 0) if self.opset >= 21 else 0

    def key(self, node: ir.Node) -> _ParamsKey | None:
        """Comparable parameters of a Q/DQ node, or ``None`` when they are not all constants."""
        found = self.params(node)
        if found is None:
            return None
        scale, zero_point, qtype = found
        if zero_point.shape != scale.shape and zero_point.size != scale.size:
            return None
        block = self.block_size(node)
        axis: int | None = None
        if scale.size == 1 and not block:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        else:
            axis = attr_int(node, "axis", 1)
            data = node.inputs[0]
            rank = len(data.shape) if data is not None and data.shape is not None else None
            if axis < 0 and rank:
                axis += rank
        scale_dtype = ir.DataType.from_numpy(scale.dtype)
        float_attr = "output_dtype" if node.op_type == "DequantizeLinear" else "precision"
        float_dtype = attr_int(node, float_attr, 0) if self.opset >= 21 else 0
        return _ParamsKey(
            qtype,
            scale_dtype,
            ir.DataType(float_dtype) if float_dtype else scale_dtype,
            axis,
            block,
            tuple(scale.shape),
            np.ascontiguousarray(scale).tobytes(),
            np.ascontiguousarray(zero_point).tobytes(),
        )

    def run_phase(self, phase: Phase) -> None:
        """Apply one phase's rules to the Q/DQ nodes as they are now, then note what changed."""
        self.counts = collections.Counter()
        nodes = [n for n in self.main.all_nodes() if n.op_type in _QDQ_OPS]
        outcome = rules.apply_rules(
            self.model, phase.rules, self, stage="normalize", opset=self.opset, nodes=nodes
        )
        self.declined.extend(outcome.declines)
        for key, text in phase.notes:
            self.note(self.counts[key], text)

    def ms_decline_reason(self, node: ir.Node) -> str | None:
        if self.opset < 10:
            return f"default-domain opset {self.opset} has no {node.op_type}"
        extra = sorted(name for name in node.attributes if name != "axis")
        if extra:
            return f"attribute {', '.join(extra)} has no default-domain equivalent"
        qtype = self.qtype(node)
        if qtype is None:
            return "quantized type unknown"
        since = _TYPES_SINCE.get(qtype)
        if since is None or self.opset < since:
            return f"{qtype.name.lower()} needs a newer default-domain opset than {self.opset}"
        scale_value = node.inputs[1] if len(node.inputs) > 1 else None
        if scale_value is None:
            return "no scale"
        if scale_value.dtype not in (None, ir.DataType.FLOAT) and self.opset < 19:
            return f"{scale_value.dtype.name.lower()} scale needs default-domain opset 19"
        if self.opset < 13:
            scale = const_array(scale_value)
            shape = scale.shape if scale is not None else scale_value.shape
            if shape is None or int(np.prod(tuple(shape), dtype=np.int64)) != 1:
                return f"per-axis parameters need default-domain opset 13 (model has {self.opset})"
        return None

    def fold_problem(self, m: _Match) -> Reason | None:
        """Rule 3's check for one constant QuantizeLinear; leaves the quantization in ``m.params``."""
        node, data = m.node, m.data
        assert data is not None
        key = self.key(node)
        found = self.params(node)
        if key is None or found is None:
            return _not_folded("not_constant", "scale or zero point is not a constant")
        scale, zero_point, qtype = found
        if key.block_size:
            return _not_folded(
                "block_wise", f"block-wise quantization (block_size={key.block_size}) is kept as it is"
            )
        dtype = _FOLDABLE_TYPES.get(qtype)
        if dtype is None:
            return _not_folded("type", f"quantized type {qtype.name.lower()} is not supported")
        if data.dtype != np.float32:
            return _not_folded("type", f"weight type {data.dtype} is not float32")
        if scale.dtype != np.float32 or key.float_dtype != ir.DataType.FLOAT:
            return _not_folded("type", f"arithmetic type {key.float_dtype.name.lower()} is not float32")
        if node.outputs[0].is_graph_output():
            return _not_folded("graph_output", "its output is a graph output")
        if key.axis is None:
            m.params = QuantParams(scale.reshape(()), zero_point.reshape(()), dtype, None)
        else:
            axis = key.axis
            if not -data.ndim <= axis < data.ndim or scale.ndim != 1:
                return _not_folded("shape", f"axis {axis} does not fit a weight of shape {list(data.shape)}")
            axis %= data.ndim
            if data.shape[axis] != scale.shape[0] or zero_point.shape != scale.shape:
                return _not_folded(
                    "shape", f"{scale.shape[0]} scales do not fit a weight of shape {list(data.shape)}"
                )
            m.params = QuantParams(scale, zero_point, dtype, axis)
        m.key = key
        return None

    def fold(self, m: _Match) -> str:
        """Rule 3's rewrite: the weight stored quantized, read by the DequantizeLinear(s) after it."""
        assert m.params is not None and m.key is not None and m.data is not None and m.root is not None
        node = m.node
        cached = self.fold_cache.get((id(node.inputs[0]), m.key))
        if cached is None:
            quantized = quantize(m.data, m.params)
            cached = make_initializer(
                self.main, self.names, f"{m.root.name or 'weight'}_quantized", quantized
            )
            self.fold_cache[(id(node.inputs[0]), m.key)] = cached
        node.outputs[0].replace_all_uses_with(cached)
        self.dead.append(node)
        self.counts[f"folded_{m.params.dtype}"] += 1
        return node.op_type

    # -- rule 4: plan which [1]-shaped parameters become scalars ----------------------------------
    def plan_scalars(self) -> None:
        """Decide how each [1]-shaped per-tensor parameter initializer becomes a scalar.

        In place when every reader is such a slot; else through one scalar copy for those slots.
        """
        slots: collections.Counter[ir.Value] = collections.Counter()
        for node in self.qdq_nodes():
            for _, value in _scalar_slots(self, node):
                slots[value] += 1
        self.scalar_in_place = {value for value, count in slots.items() if len(list(value.uses())) == count}
        self.scalar_copies = {}

    # -- rule 5: plan which duplicate parameter initializers merge into which --------------------------
    def plan_merges(self) -> None:
        """Map each duplicate scale/zero-point initializer to the first equal one it can see.

        Main-graph values are considered first, so a duplicate in a subgraph merges into one of the main
        graph (visible everywhere) or of its own graph.
        """
        candidates: dict[ir.Value, None] = {}
        for node in self.qdq_nodes():
            for value in node.inputs[1:3]:
                if value is None or not value.is_initializer() or value.const_value is None:
                    continue
                if value.is_graph_input() or value.is_graph_output():
                    continue
                candidates[value] = None
        ordered = sorted(candidates, key=lambda v: 0 if v.graph is self.main else 1)
        kept: dict[tuple[ir.DataType, tuple[int, ...], bytes], list[ir.Value]] = {}
        self.merge_into = {}
        for value in ordered:
            tensor = value.const_value
            assert tensor is not None
            key = (tensor.dtype, tuple(tensor.shape.numpy()), tensor.tobytes())
            same = kept.setdefault(key, [])
            target = next((v for v in same if v.graph is self.main or v.graph is value.graph), None)
            if target is None:
                same.append(value)
            else:
                self.merge_into[value] = target

    # -- dead code -----------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Remove the nodes that rewrites left unused, and what only they read."""
        work = list(self.dead)
        self.dead = []
        while work:
            node = work.pop()
            graph = node.graph
            if graph is None:
                continue
            if any(out.uses() or out.is_graph_output() for out in node.outputs):
                continue
            inputs = [v for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            for value in inputs:
                if value.uses() or value.is_graph_output() or value.is_graph_input():
                    continue
                if value.is_initializer():
                    owner = value.graph
                    if isinstance(owner, ir.Graph) and value.name in owner.initializers:
                        owner.initializers.pop(value.name)  # type: ignore[arg-type]
                    continue
                producer = value.producer()
                if producer is not None and producer.op_type in _SWEEPABLE:
                    work.append(producer)


@dataclass
class _Match:
    """A Q/DQ node a rule looks at, and what its check found for the rewrite."""

    node: ir.Node
    ctx: _Normalizer
    data: np.ndarray | None = None
    root: ir.Value | None = None
    params: QuantParams | None = None
    key: _ParamsKey | None = None


def _not_folded(code: str, message: str) -> Reason:
    return Reason(code, f"weight not folded: {message}")


def _scalar_slots(ctx: _Normalizer, node: ir.Node) -> list[tuple[int, ir.Value]]:
    """The [1]-shaped constant scale/zero-point inputs of a per-tensor Q/DQ (rule 4's slots)."""
    if "axis" in node.attributes or ctx.block_size(node):
        return []
    slots = []
    for index in (1, 2):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None or not value.is_initializer() or value.is_graph_input():
            continue
        if value.is_graph_output() or value.const_value is None:
            continue
        if tuple(value.const_value.shape) == (1,):
            slots.append((index, value))
    return slots


class _Rule(rules.Rule[_Match, "_Normalizer"]):
    """Rules over default-domain Q/DQ nodes; ``match`` narrows, ``check`` passes unless overridden."""

    op_types: tuple[str, ...] = _QDQ_OPS

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        return _Match(node, ctx)

    def check(self, m: _Match) -> Reason | None:
        return None


class ConvertMsRule(_Rule):
    """Rule 1: a com.microsoft QuantizeLinear/DequantizeLinear becomes the default-domain op."""

    domain = _MS_DOMAIN

    def check(self, m: _Match) -> Reason | None:
        reason = m.ctx.ms_decline_reason(m.node)
        return Reason("ms_domain", f"kept in com.microsoft: {reason}") if reason else None

    def rewrite(self, m: _Match) -> str:
        node = m.node
        if "axis" in node.attributes and m.ctx.opset < 13:
            node.attributes.pop("axis")  # per-tensor (checked): the attribute does not exist yet
        node.domain = ""
        node.version = None
        m.ctx.counts["converted"] += 1
        return node.op_type


class LiftParamsRule(_Rule):
    """Rule 2: Constant nodes feeding a scale or zero point become initializers (same name)."""

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        return _Match(node, ctx) if self._constants(node) else None

    @staticmethod
    def _constants(node: ir.Node) -> list[ir.Value]:
        found = []
        for value in node.inputs[1:3]:
            if value is None or value.is_graph_output():
                continue
            producer = value.producer()
            if producer is None or producer.op_type != "Constant" or producer.domain != "":
                continue
            if ir.convenience.get_const_tensor(value) is not None:
                found.append(value)
        return found

    def rewrite(self, m: _Match) -> str:
        ctx = m.ctx
        for value in self._constants(m.node):
            producer = value.producer()
            tensor = ir.convenience.get_const_tensor(value)
            assert producer is not None and tensor is not None
            array = tensor.numpy()
            name = value.name if value.name and value.name not in ctx.main.initializers else None
            name = name or ctx.names.fresh(f"{node_label(producer)}_value")
            lifted = ir.Value(
                name=name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.tensor(array, name=name),
            )
            value.replace_all_uses_with(lifted)
            assert producer.graph is not None
            producer.graph.remove(producer, safe=True)
            value.name = None
            ctx.main.register_initializer(lifted)
            ctx.counts["lifted"] += 1
        return m.node.op_type


class FoldWeightRule(_Rule):
    """Rule 3: a QuantizeLinear of a float constant is computed once into an integer initializer."""

    op_types = ("QuantizeLinear",)

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        if not node.inputs or node.inputs[0] is None:
            return None
        resolved = _resolve_constant(node.inputs[0])
        if resolved is None:
            return None
        return _Match(node, ctx, data=resolved[0], root=resolved[1])

    def check(self, m: _Match) -> Reason | None:
        return m.ctx.fold_problem(m)

    def rewrite(self, m: _Match) -> str:
        return m.ctx.fold(m)


class ScalarizeRule(_Rule):
    """Rule 4: [1]-shaped per-tensor parameters become scalars (in place, or a scalar copy)."""

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        return _Match(node, ctx) if _scalar_slots(ctx, node) else None

    def rewrite(self, m: _Match) -> str:
        ctx = m.ctx
        for index, value in _scalar_slots(ctx, m.node):
            assert value.const_value is not None
            if value in ctx.scalar_in_place:
                array = value.const_value.numpy().reshape(())
                value.const_value = ir.tensor(array, name=value.name)
                value.shape = ir.Shape([])
                ctx.counts["scalar"] += 1
                continue
            copy = ctx.scalar_copies.get(value)
            if copy is None:
                array = value.const_value.numpy().reshape(())
                graph = value.graph if isinstance(value.graph, ir.Graph) else ctx.main
                copy = make_initializer(graph, ctx.names, f"{value.name}_scalar", array)
                ctx.scalar_copies[value] = copy
                ctx.counts["scalar"] += 1
            m.node.replace_input_with(index, copy)
        return m.node.op_type


class MergeParamsRule(_Rule):
    """Rule 5: duplicate scale/zero-point initializers are merged into the first equal one."""

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        return _Match(node, ctx) if any(v in ctx.merge_into for v in node.inputs[1:3]) else None

    def rewrite(self, m: _Match) -> str:
        ctx = m.ctx
        for value in [v for v in m.node.inputs[1:3] if v is not None and v in ctx.merge_into]:
            graph = value.graph
            assert isinstance(graph, ir.Graph) and value.name is not None
            value.replace_all_uses_with(ctx.merge_into.pop(value))  # (every reader: done once)
            graph.initializers.pop(value.name)
            ctx.counts["merged_params"] += 1
        return m.node.op_type


class CollapseRule(_Rule):
    """Rule 6: DequantizeLinear → QuantizeLinear with identical parameters: the integer tensor itself."""

    op_types = ("QuantizeLinear",)

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        if not node.inputs or node.inputs[0] is None or node.outputs[0].is_graph_output():
            return None
        producer = node.inputs[0].producer()
        if producer is None or not _is_qdq(producer) or producer.op_type != "DequantizeLinear":
            return None
        if producer.inputs[0] is None:
            return None
        key = ctx.key(node)
        return _Match(node, ctx) if key is not None and key == ctx.key(producer) else None

    def rewrite(self, m: _Match) -> str:
        source = m.node.inputs[0].producer().inputs[0]  # type: ignore[union-attr]
        assert source is not None
        m.node.outputs[0].replace_all_uses_with(source)
        m.ctx.dead.append(m.node)
        m.ctx.counts["collapsed"] += 1
        return m.node.op_type


class MergeNodesRule(_Rule):
    """Rule 7: Q/DQ nodes of one graph reading one tensor with identical parameters: the first one."""

    def match(self, node: ir.Node, ctx: _Normalizer) -> _Match | None:
        if not node.inputs or node.inputs[0] is None:
            return None
        key = ctx.key(node)
        if key is None:
            return None
        seen = ctx.first_reader.setdefault(id(node.graph), {})
        signature = (node.op_type, id(node.inputs[0]), key)
        first = seen.get(signature)
        if first is None:
            seen[signature] = node
            return None
        return _Match(node, ctx) if not node.outputs[0].is_graph_output() else None

    def rewrite(self, m: _Match) -> str:
        node = m.node
        assert node.inputs[0] is not None
        key = m.ctx.key(node)
        assert key is not None
        first = m.ctx.first_reader[id(node.graph)][(node.op_type, id(node.inputs[0]), key)]
        node.outputs[0].replace_all_uses_with(first.outputs[0])
        m.ctx.dead.append(node)
        m.ctx.counts["merged_nodes"] += 1
        return node.op_type


@dataclass(frozen=True)
class Phase:
    """Rules applied together over the Q/DQ nodes, with what to do before and after, and the notes."""

    rules: tuple[_Rule, ...]
    notes: tuple[tuple[str, str], ...]
    before: Callable[[_Normalizer], None] | None = None
    after: Callable[[_Normalizer], None] | None = None

    def apply(self, ctx: _Normalizer) -> None:
        if self.before is not None:
            self.before(ctx)
        ctx.run_phase(self)
        if self.after is not None:
            self.after(ctx)


#: The pass's rule tables, in the order of the module docstring (each phase sees the one before done).
PHASES: tuple[Phase, ...] = (
    Phase(
        (ConvertMsRule(),),
        (
            (
                "converted",
                "com.microsoft QuantizeLinear/DequantizeLinear node{s} converted to default-domain ops",
            ),
        ),
    ),
    Phase((LiftParamsRule(),), (("lifted", "Constant scale/zero-point node{s} lifted to initializer{s}"),)),
    Phase(
        (FoldWeightRule(),),
        tuple(
            (f"folded_{dtype}", f"weight Q→DQ pair{{s}} folded into {dtype} initializer{{s}}")
            for dtype in sorted(_FOLDABLE_TYPES.values())
        ),
    ),
    Phase(
        (ScalarizeRule(),),
        (("scalar", "[1]-shaped per-tensor scale/zero-point initializer{s} made scalar{s}"),),
        before=_Normalizer.plan_scalars,
    ),
    Phase(
        (MergeParamsRule(),),
        (("merged_params", "duplicate scale/zero-point initializer{s} merged"),),
        before=_Normalizer.plan_merges,
    ),
    Phase(
        (CollapseRule(),),
        (("collapsed", "DQ→Q pair{s} with identical parameters collapsed to the integer tensor"),),
        after=_Normalizer.sweep,
    ),
    Phase(
        (MergeNodesRule(),),
        (("merged_nodes", "duplicate QuantizeLinear/DequantizeLinear node{s} merged"),),
        after=_Normalizer.sweep,
    ),
)


def _resolve_constant(value: ir.Value) -> tuple[np.ndarray, ir.Value] | None:
    """The data of a float constant, possibly reached through Identity/Cast, and the constant's value."""
    casts: list[ir.DataType] = []
    current = value
    for _ in range(16):
        data = const_array(current)
        if data is not None:
            for dtype in reversed(casts):
                data = data.astype(dtype.numpy())
            return (data, current) if np.issubdtype(data.dtype, np.floating) else None
        producer = current.producer()
        if producer is None or producer.domain not in DEFAULT_DOMAINS:
            return None
        if producer.op_type not in _CONST_FORWARDING or not producer.inputs:
            return None
        if producer.op_type == "Cast":
            target = ir.DataType(attr_int(producer, "to", 0))
            if target not in _FLOAT_CASTS:
                return None
            casts.append(target)
        source = producer.inputs[0]
        if source is None:
            return None
        current = source
    return None
