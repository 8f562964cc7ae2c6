"""Ops whose ONNX Runtime CPU kernels are scalar loops, written out in primitives it runs vectorized.

A few ONNX ops have CPU kernels in ONNX Runtime that compute element by element with a libm call (or
a broadcasting loop) where a vectorized equivalent of a handful of ops is several times faster. In a
float model they cost what they cost; in a quantized model the convolutions around them got 2-4×
faster and they did not, so they dominate. Measured with onnxruntime 1.32, one thread, on [1, 192, 56,
56] (the kernel → the expansion):

======== ========== ======================================================================
op        ms         written as
======== ========== ======================================================================
LRN       11.5 → 1.07  Mul(x, x), an AveragePool over the channel axis, ·α, +bias, the power, Div
PRelu     2.68 → 0.19  Max(x, slope · x) when every slope is in [0, 1]; else Relu(x) + slope · Min(x, 0)
Softplus  5.70 → 1.21  Relu(x) + Log(1 + Exp(−|x|))
Mish      6.03 → 0.53  x · t / (t + 2) with t = e · (e + 2), e = Exp(Min(x, 20)) (tanh of softplus)
Elu       0.89 → 0.28  a · Relu(x) + b · (Exp(c · Min(x, 0)) − 1); Selu 0.90 → 0.43, Celu 1.06 → 0.44
Softmax   3.22 → 0.79  over axis 1 (not the last): ReduceMax, Sub, Exp, ReduceSum, Div; LogSoftmax too
Pow       1.78 → 0.17  by 0.5: Sqrt; by −0.5: 1/Sqrt (0.27), by −1: Reciprocal (0.11), by 2: x·x
======== ========== ======================================================================

Each is the same function up to float32 rounding (checked in the tests against a float64 reference),
and each stays float in a quantized model: the planner leaves a chain that ends in a float op (Div,
Max, Log, …) float, so the expansion is one float island between the quantized neighbours, like the
op it replaces.

**LRN** (AlexNet, CaffeNet, ZFNet, GoogLeNet: its two LRNs took 64 % of GoogLeNet's int8 time). The
ONNX spec defines

    square_sum[n, c, …] = Σ x[n, i, …]²   for  max(0, c − ⌊(size − 1)/2⌋) ≤ i ≤ min(C − 1, c + ⌈(size − 1)/2⌉)
    y = x / (bias + alpha / size · square_sum) ^ beta

The window sum over channels is an average pool over the channel axis once it is moved to a spatial
position (Unsqueeze at axis 1; the unsqueezed axis is the pool's single "channel"); with the padding
counted, the mean is ``square_sum / size`` exactly, so ``alpha / size · square_sum`` is ``alpha ·
mean``. ``t ^ 0.75`` (every LRN in the ONNX model zoo) is ``√t · √√t``: two Sqrt and a Mul run 2.4×
faster than one Pow; 0.5 and 1 need one Sqrt or nothing; other exponents use Pow. The pool needs the
input's rank, and at most 4 (ONNX Runtime pools over 3 spatial axes at most, and the channel axis
becomes one): other LRNs stay, with the reason in the report.

**PRelu** (face recognition ResNets, super-resolution nets): its per-channel slope makes ONNX Runtime
take a broadcasting loop. For a slope in [0, 1], ``max(x, slope · x)`` is PRelu exactly (for x ≥ 0
``slope · x ≤ x``, for x < 0 ``slope · x ≥ x``); any other slope takes the general form.

**Softplus and Mish** (YOLOv4-family detectors, timm nets): ``log(1 + eˣ)`` as ``relu(x) + log(1 +
e^−|x|)`` never overflows. Mish is ``x · tanh(softplus(x))``, and ``tanh(log(1 + eˣ)) = ((1 + eˣ)² −
1) / ((1 + eˣ)² + 1) = t / (t + 2)`` with ``t = eˣ (eˣ + 2)``: no cancellation for very negative x,
and ``Min(x, 20)`` keeps ``eˣ`` finite (there the ratio is 1 in float32 anyway). The native Mish op
(opset 18) and the ``x · Tanh(Softplus(x))`` that exporters write below opset 18 both take this form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Reason
from onnxq.graph import DEFAULT_DOMAINS, attr_float, attr_int, const_array, make_initializer

__all__ = ["SlowKernelsPass"]

_Context = rules.RewriteContext


@dataclass
class _Match:
    """The op to replace (``node``), the tensor it reads, the nodes that go with it."""

    node: ir.Node
    ctx: _Context
    x: ir.Value
    nodes: list[ir.Node] = field(default_factory=list)


class _Writer:
    """Emits float nodes in front of ``m.node`` (typed like its output) and rewires its output to them."""

    def __init__(self, m: _Match) -> None:
        graph = m.node.graph
        assert graph is not None
        self.m, self.graph = m, graph
        self.base = m.node.name or m.node.op_type
        self.type = m.node.outputs[0].type or m.x.type
        self.shape = m.x.shape

    def constant(self, label: str, value: float | np.ndarray, dtype: type = np.float32) -> ir.Value:
        return make_initializer(self.graph, self.m.ctx.names, f"{self.base}_{label}", np.array(value, dtype))

    def node(
        self, op: str, inputs: list[ir.Value], label: str, shape: ir.Shape | None = None, **attrs: object
    ) -> ir.Value:
        names = self.m.ctx.names
        new = ir.Node(
            "",
            op,
            inputs,
            [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],  # type: ignore[arg-type]
            name=names.fresh(f"{self.base}_{label}"),
        )
        self.graph.insert_before(self.m.node, new)
        out = new.outputs[0]
        out.name, out.type = names.fresh(f"{self.base}_{label}_out"), self.type
        out.shape = shape if shape is not None else self.shape
        return out

    def replace_with(self, result: ir.Value) -> None:
        """``result`` takes the replaced output's name and readers; the replaced nodes go."""
        output = self.m.node.outputs[0]
        name = output.name
        if output.shape is not None:
            result.shape = output.shape
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        output.name = None
        result.name = name
        self.graph.remove([self.m.node, *reversed(self.m.nodes)], safe=True)


def _float_input(node: ir.Node) -> ir.Value | None:
    """The first input of a default-domain node when it is (or may be) float32."""
    if node.domain not in DEFAULT_DOMAINS or not node.inputs or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    return x if x.dtype in (None, ir.DataType.FLOAT) else None


class _OnFloatInput(rules.Rule[_Match, _Context]):
    """A rule about an op of :attr:`op_types` reading a float32 tensor; nothing to check by default."""

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        x = _float_input(node)
        return _Match(node, ctx, x) if x is not None else None

    def check(self, m: _Match) -> Reason | None:
        return None


class LrnRule(_OnFloatInput):
    """``LRN(x)`` ⇒ Mul/Unsqueeze/AveragePool/Squeeze/Mul/Add/Sqrt|Pow/Div (module doc)."""

    op_types = ("LRN",)

    def check(self, m: _Match) -> Reason | None:
        rank = len(m.x.shape) if m.x.shape is not None else None
        if rank is None:
            return Reason("rank_unknown", "the input's rank is unknown (shape inference could not tell)")
        if rank < 2:
            return Reason("rank", f"the input has rank {rank}; LRN needs N x C x ...")
        if rank > 4:
            return Reason(
                "rank",
                f"the input has rank {rank}: the pool over channels would need {rank - 1} spatial axes, "
                "ONNX Runtime pools over 3 at most",
            )
        if attr_int(m.node, "size", 0) < 1:
            return Reason("size", "the window size is not a positive integer")
        return None

    def rewrite(self, m: _Match) -> str:
        node = m.node
        assert m.x.shape is not None
        rank = len(m.x.shape)
        size = attr_int(node, "size", 1)
        alpha = attr_float(node, "alpha", 1e-4)
        beta = attr_float(node, "beta", 0.75)
        bias = attr_float(node, "bias", 1.0)
        w = _Writer(m)
        dims = list(m.x.shape)
        lifted = ir.Shape([dims[0], 1, *dims[1:]])
        axes = w.constant("axis", np.array([1]), np.int64) if m.ctx.opset >= 13 else None

        def reshaping(op: str, value: ir.Value, label: str, shape: ir.Shape | None) -> ir.Value:
            if axes is not None:
                return w.node(op, [value, axes], label, shape)
            return w.node(op, [value], label, shape, axes=[1])

        squares = w.node("Mul", [m.x, m.x], "square")
        moved = reshaping("Unsqueeze", squares, "channels_as_space", lifted)
        before = (size - 1) // 2
        spatial = rank - 1  # the channel axis and the original spatial axes
        mean = w.node(
            "AveragePool",
            [moved],
            "window_mean",
            lifted,
            kernel_shape=[size] + [1] * (spatial - 1),
            pads=[before] + [0] * (spatial - 1) + [size - 1 - before] + [0] * (spatial - 1),
            count_include_pad=1,
        )
        window = reshaping("Squeeze", mean, "window", m.x.shape)
        scaled = w.node("Mul", [window, w.constant("alpha", alpha)], "alpha")
        base = w.node("Add", [scaled, w.constant("bias", bias)], "bias")
        if abs(beta - 0.75) < 1e-7:
            root = w.node("Sqrt", [base], "sqrt")
            divisor = w.node("Mul", [root, w.node("Sqrt", [root], "fourth_root")], "power")
        elif abs(beta - 0.5) < 1e-7:
            divisor = w.node("Sqrt", [base], "power")
        elif abs(beta - 1.0) < 1e-7:
            divisor = base
        else:
            divisor = w.node("Pow", [base, w.constant("beta", beta)], "power")
        w.replace_with(w.node("Div", [m.x, divisor], "normalized"))
        return "LRN → Mul/AveragePool/Sqrt/Div"


class PReluRule(_OnFloatInput):
    """``PRelu(x, slope)`` ⇒ ``Max(x, slope · x)`` (slopes in [0, 1]), else ``Relu(x) + slope·Min(x, 0)``."""

    op_types = ("PRelu",)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return None
        return super().match(node, ctx)

    def check(self, m: _Match) -> Reason | None:
        slope = m.node.inputs[1]
        assert slope is not None
        if slope.dtype not in (None, ir.DataType.FLOAT):
            return Reason("not_float", "the slope is not float32")
        return None

    def rewrite(self, m: _Match) -> str:
        slope = m.node.inputs[1]
        assert slope is not None
        w = _Writer(m)
        values = const_array(slope)
        if values is not None and values.size and np.all((values >= 0) & (values <= 1)):
            w.replace_with(w.node("Max", [m.x, w.node("Mul", [m.x, slope], "scaled")], "max"))
            return "PRelu → Mul/Max"
        positive = w.node("Relu", [m.x], "positive")
        negative = w.node("Min", [m.x, w.constant("zero", 0.0)], "negative")
        w.replace_with(w.node("Add", [positive, w.node("Mul", [negative, slope], "scaled")], "sum"))
        return "PRelu → Relu/Min/Mul/Add"


def _softplus(w: _Writer, x: ir.Value) -> ir.Value:
    """``relu(x) + log(1 + exp(−|x|))``: no overflow for any x."""
    magnitude = w.node("Neg", [w.node("Abs", [x], "abs")], "minus_abs")
    tail = w.node(
        "Log", [w.node("Add", [w.node("Exp", [magnitude], "exp"), w.constant("one", 1.0)], "one_plus")], "log"
    )
    return w.node("Add", [w.node("Relu", [x], "relu"), tail], "softplus")


def _mish(w: _Writer, x: ir.Value) -> ir.Value:
    """``x · t / (t + 2)`` with ``t = e (e + 2)``, ``e = exp(min(x, 20))`` (= x · tanh(softplus(x)))."""
    e = w.node("Exp", [w.node("Min", [x, w.constant("cap", 20.0)], "capped")], "exp")
    two = w.constant("two", 2.0)
    t = w.node("Mul", [e, w.node("Add", [e, two], "e_plus_two")], "t")
    ratio = w.node("Div", [t, w.node("Add", [t, two], "t_plus_two")], "tanh_softplus")
    return w.node("Mul", [x, ratio], "mish")


class SoftplusRule(_OnFloatInput):
    """``Softplus(x)`` ⇒ ``Relu(x) + Log(1 + Exp(−|x|))``; ``x · Tanh(Softplus(x))`` ⇒ the Mish form."""

    op_types = ("Softplus",)

    def rewrite(self, m: _Match) -> str:
        mish = self._mish_around(m)
        if mish is not None:
            w = _Writer(mish)
            w.replace_with(_mish(w, m.x))
            return "x·Tanh(Softplus(x)) → Mish form"
        w = _Writer(m)
        w.replace_with(_softplus(w, m.x))
        return "Softplus → Relu/Exp/Log/Add"

    @staticmethod
    def _mish_around(m: _Match) -> _Match | None:
        """The ``Mul(x, Tanh(Softplus(x)))`` this Softplus is part of (its values read only there)."""
        soft = m.node.outputs[0]
        uses = list(soft.uses())
        if soft.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Tanh":
            return None
        tanh = uses[0].node
        gate = tanh.outputs[0]
        gate_uses = list(gate.uses())
        if tanh.domain not in DEFAULT_DOMAINS or gate.is_graph_output() or len(gate_uses) != 1:
            return None
        product = gate_uses[0].node
        if product.op_type != "Mul" or product.domain not in DEFAULT_DOMAINS or len(product.inputs) != 2:
            return None
        other = product.inputs[1 - gate_uses[0].idx]
        if other is not m.x:
            return None
        return _Match(product, m.ctx, m.x, [m.node, tanh])


class MishRule(_OnFloatInput):
    """``Mish(x)`` (opset 18) ⇒ ``x · t / (t + 2)``, ``t = e (e + 2)``, ``e = Exp(Min(x, 20))``."""

    op_types = ("Mish",)

    def rewrite(self, m: _Match) -> str:
        w = _Writer(m)
        w.replace_with(_mish(w, m.x))
        return "Mish → Exp/Mul/Div"


def _exp_linear_constants(node: ir.Node) -> tuple[float, float, float]:
    """(a, b, c) of ``a · relu(x) + b · (exp(c · min(x, 0)) − 1)`` for an Elu, Selu or Celu node."""
    if node.op_type == "Selu":
        alpha = attr_float(node, "alpha", 1.67326319217681884765625)
        gamma = attr_float(node, "gamma", 1.05070102214813232421875)
        return gamma, gamma * alpha, 1.0
    alpha = attr_float(node, "alpha", 1.0)
    return (1.0, alpha, 1.0 / alpha) if node.op_type == "Celu" else (1.0, alpha, 1.0)


class ExpLinearRule(_OnFloatInput):
    """``Elu``/``Selu``/``Celu`` ⇒ ``a · Relu(x) + b · (Exp(c · Min(x, 0)) − 1)``.

    Elu is ``(1, α, 1)``, Selu ``(γ, γα, 1)``, Celu ``(1, α, 1/α)``: for x ≥ 0 the exponential term is
    ``b · (e⁰ − 1) = 0``, for x < 0 the Relu term is 0. Eigen evaluates ONNX Runtime's kernels with a
    select per element (Elu 0.89 ms on [1, 192, 56, 56], written out 0.28 ms).
    """

    op_types = ("Elu", "Selu", "Celu")

    def check(self, m: _Match) -> Reason | None:
        if m.node.op_type == "Celu" and attr_float(m.node, "alpha", 1.0) == 0.0:
            return Reason("alpha", "Celu with alpha 0 is not defined")
        return None

    def rewrite(self, m: _Match) -> str:
        a, b, c = _exp_linear_constants(m.node)
        w = _Writer(m)
        negative = w.node("Min", [m.x, w.constant("zero", 0.0)], "negative")
        if c != 1.0:
            negative = w.node("Mul", [negative, w.constant("inner", c)], "inner")
        curve = w.node("Sub", [w.node("Exp", [negative], "exp"), w.constant("one", 1.0)], "expm1")
        if b != 1.0:
            curve = w.node("Mul", [curve, w.constant("outer", b)], "outer")
        linear = w.node("Relu", [m.x], "positive")
        if a != 1.0:
            linear = w.node("Mul", [linear, w.constant("scale", a)], "scaled")
        w.replace_with(w.node("Add", [linear, curve], "sum"))
        return f"{m.node.op_type} → Relu/Min/Exp/Add"


class SoftmaxAxisRule(_OnFloatInput):
    """``Softmax``/``LogSoftmax`` over an axis that is not the last ⇒ ReduceMax/Sub/Exp/ReduceSum/Div.

    From opset 13 these normalize along one axis; ONNX Runtime transposes that axis to the end and back
    around its kernel: 3.19 ms for YOLOv8/11's distribution-focal head (axis 1 of [1, 16, 4, 8400]),
    0.56 ms written out; a segmentation head's per-pixel Softmax over 21 classes at 224×224 had taken
    43 % of a small int8 network's time. ``e = exp(x − max)`` over the axis, then ``e / Σe``
    (``x − max − log Σe`` for LogSoftmax): the same function, reduced where the data lies. Below opset
    13 the axis coerces the input to 2-D and the kernel works on the last axis already.
    """

    op_types = ("Softmax", "LogSoftmax")

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if ctx.opset < 13:
            return None
        found = super().match(node, ctx)
        if found is None:
            return None
        axis = attr_int(node, "axis", -1)
        shape = found.x.shape
        if axis == -1 or (shape is not None and self._trailing(shape, axis) == []):
            return None  # already the last axis
        return found

    @staticmethod
    def _trailing(shape: ir.Shape, axis: int) -> list[object] | None:
        """The dims after ``axis`` other than 1 (``None`` if the axis is out of range)."""
        rank = len(shape)
        if not -rank <= axis < rank:
            return None
        return [dim for dim in list(shape)[axis % rank + 1 :] if dim != 1]

    def check(self, m: _Match) -> Reason | None:
        if m.x.shape is None:
            return Reason("rank_unknown", "the input's rank is unknown (shape inference could not tell)")
        if self._trailing(m.x.shape, attr_int(m.node, "axis", -1)) is None:
            return Reason("axis", "the axis is out of range")
        return None

    def rewrite(self, m: _Match) -> str:
        assert m.x.shape is not None
        rank = len(m.x.shape)
        axis = attr_int(m.node, "axis", -1) % rank
        w = _Writer(m)
        reduced = ir.Shape([1 if i == axis else dim for i, dim in enumerate(m.x.shape)])
        axes = w.constant("axes", np.array([axis]), np.int64)
        if m.ctx.opset >= 18:
            peak = w.node("ReduceMax", [m.x, axes], "max", reduced, keepdims=1)
        else:
            peak = w.node("ReduceMax", [m.x], "max", reduced, axes=[axis], keepdims=1)
        shifted = w.node("Sub", [m.x, peak], "shifted")
        exp = w.node("Exp", [shifted], "exp")
        total = w.node("ReduceSum", [exp, axes], "sum", reduced, keepdims=1)
        if m.node.op_type == "Softmax":
            w.replace_with(w.node("Div", [exp, total], "normalized"))
        else:
            w.replace_with(w.node("Sub", [shifted, w.node("Log", [total], "log_sum", reduced)], "normalized"))
        return f"{m.node.op_type} over axis {axis} → ReduceMax/Exp/ReduceSum"


#: Exponents of ``Pow`` with a cheaper exact form (2 is exact as x·x; the roots differ from ``powf``
#: only at −0 and −∞, which a normalization's variance never is).
_POW_FORMS = {2.0: "Mul", 0.5: "Sqrt", -0.5: "Reciprocal/Sqrt", -1.0: "Reciprocal"}


class PowRule(_OnFloatInput):
    """``Pow(x, c)`` for a constant ``c`` of 2, 0.5, −0.5 or −1 ⇒ ``x·x``, Sqrt, 1/Sqrt, Reciprocal.

    ONNX Runtime calls ``powf`` per element for any exponent it does not special-case: 1.78 ms on
    [1, 192, 56, 56] for 0.5, −0.5 and −1, against 0.17 (Sqrt), 0.27 (Reciprocal of Sqrt) and 0.11 ms
    (Reciprocal); its Pow by 2 takes 0.155 ms, x·x 0.110. Variances and RMS norms are written with
    these exponents by hand (``var ** 0.5``, ``x.pow(2).mean()``, ``.pow(-0.5)``).
    """

    op_types = ("Pow",)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        found = super().match(node, ctx)
        if found is None or len(node.inputs) < 2 or self._exponent(node) not in _POW_FORMS:
            return None
        exponent = const_array(node.inputs[1])
        assert exponent is not None
        # An exponent of shape [1] broadcasts a scalar base to [1]: only where x has that rank already.
        if exponent.ndim and (found.x.shape is None or len(found.x.shape) < exponent.ndim):
            return None
        return found

    @staticmethod
    def _exponent(node: ir.Node) -> float | None:
        value = const_array(node.inputs[1])
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.number):
            return None
        return float(value.reshape(-1)[0])

    def rewrite(self, m: _Match) -> str:
        exponent = self._exponent(m.node)
        assert exponent is not None
        w = _Writer(m)
        if exponent == 2.0:
            w.replace_with(w.node("Mul", [m.x, m.x], "square"))
        elif exponent == 0.5:
            w.replace_with(w.node("Sqrt", [m.x], "sqrt"))
        elif exponent == -0.5:
            w.replace_with(w.node("Reciprocal", [w.node("Sqrt", [m.x], "sqrt")], "rsqrt"))
        else:
            w.replace_with(w.node("Reciprocal", [m.x], "reciprocal"))
        return f"Pow({exponent:g}) → {_POW_FORMS[exponent]}"


#: The rules, one per slow kernel.
RULES = (LrnRule(), PReluRule(), SoftplusRule(), MishRule(), ExpLinearRule(), SoftmaxAxisRule(), PowRule())


class SlowKernelsPass(rules.RuleTablePass):
    """Write the ops of :data:`RULES` out in vectorized primitives (module docstring).

    After a call, ``rewritten`` counts the rewrites by what they became and ``declined`` lists the ops
    left as they were.
    """

    def __init__(self) -> None:
        super().__init__(RULES)
