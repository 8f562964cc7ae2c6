"""LRN written out in the primitives ONNX Runtime runs vectorized: about 10× faster than its LRN kernel.

ONNX Runtime's CPU kernel for ``LRN`` (local response normalization, AlexNet-era networks: AlexNet,
CaffeNet, ZFNet, GoogLeNet) is a scalar loop with a ``powf`` per element. In GoogLeNet (the ONNX model
zoo's inception_v1) its two LRNs take 15 of the float model's 28 ms, and 64 % of the int8 model's
time, since the convolutions around them got faster and the LRNs did not. The ONNX spec defines

    square_sum[n, c, …] = Σ x[n, i, …]²   for  max(0, c − ⌊(size − 1)/2⌋) ≤ i ≤ min(C − 1, c + ⌈(size − 1)/2⌉)
    y = x / (bias + alpha / size · square_sum) ^ beta

and :class:`ExpandLrnPass` writes exactly that with ops ONNX Runtime runs fast:

    Mul(x, x) → Unsqueeze(axis 1) → AveragePool(kernel [size, 1, …], zero padding counted) → Squeeze
    → · alpha → + bias → the power → Div(x, ·)

The window sum over channels is an average pool over the channel axis once it is moved to a spatial
position (the unsqueezed axis 1 is the pool's single "channel"); with the padding counted, the mean is
``square_sum / size`` exactly, so ``alpha / size · square_sum`` is ``alpha · mean``. The power
``t ^ 0.75`` (every LRN in the ONNX model zoo) is ``√t · √√t``: two Sqrt and a Mul run 2.4× faster than
one Pow; 0.5 and 1 need one Sqrt or nothing; other exponents use Pow.

Measured with onnxruntime 1.32 on one thread: an LRN over [1, 192, 56, 56] takes 11.5 ms, the expansion
1.07 ms (2.55 ms with Pow). The result is the same function up to float32 rounding (relative deviation
below 1e-6, checked in the tests). The expansion stays float in a quantized model: its intermediate
values (squares, window sums) are never worth quantizing, and the planner leaves a chain that ends in a
float op float.

Needs the input's rank (the pool's kernel has one entry per spatial axis), and at most 4 (ONNX Runtime
pools over 3 spatial axes at most, and the channel axis becomes one): other LRNs are left as they are,
with the reason in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Decline, Reason
from onnxq.graph import DEFAULT_DOMAINS, attr_float, attr_int, make_initializer

__all__ = ["ExpandLrnPass"]

_Context = rules.RewriteContext


@dataclass
class _Match:
    node: ir.Node
    ctx: _Context
    x: ir.Value
    rank: int | None


class LrnExpandRule(rules.Rule[_Match, _Context]):
    """``LRN(x)`` ⇒ its definition in Mul/Unsqueeze/AveragePool/Squeeze/Add/Sqrt|Pow/Div (module doc)."""

    op_types = ("LRN",)

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or node.inputs[0] is None:
            return None
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        return _Match(node, ctx, x, rank)

    def check(self, m: _Match) -> Reason | None:
        if m.rank is None:
            return Reason("rank_unknown", "the input's rank is unknown (shape inference could not tell)")
        if m.rank < 2:
            return Reason("rank", f"the input has rank {m.rank}; LRN needs N x C x ...")
        if m.rank > 4:
            return Reason(
                "rank",
                f"the input has rank {m.rank}: the pool over channels would need {m.rank - 1} spatial axes, "
                "ONNX Runtime pools over 3 at most",
            )
        if m.x.dtype not in (None, ir.DataType.FLOAT):
            return Reason("not_float", "the input is not float32")
        if attr_int(m.node, "size", 0) < 1:
            return Reason("size", "the window size is not a positive integer")
        return None

    def rewrite(self, m: _Match) -> str:
        node, ctx = m.node, m.ctx
        graph = node.graph
        assert graph is not None and m.rank is not None
        size = attr_int(node, "size", 1)
        alpha = attr_float(node, "alpha", 1e-4)
        beta = attr_float(node, "beta", 0.75)
        bias = attr_float(node, "bias", 1.0)
        base = node.name or "LRN"
        names = ctx.names
        out_type = node.outputs[0].type or m.x.type
        shape = m.x.shape

        def constant(label: str, array: np.ndarray) -> ir.Value:
            return make_initializer(graph, names, f"{base}_{label}", array)

        def emit(
            op: str, inputs: list[ir.Value], label: str, out_shape: ir.Shape | None, **attrs: object
        ) -> ir.Value:
            new = ir.Node(
                "",
                op,
                inputs,
                [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],  # type: ignore[arg-type]
                name=names.fresh(f"{base}_{label}"),
            )
            graph.insert_before(node, new)
            out = new.outputs[0]
            out.name, out.type, out.shape = names.fresh(f"{base}_{label}_out"), out_type, out_shape
            return out

        axes_as_input = ctx.opset >= 13
        axes = constant("axis", np.array([1], np.int64)) if axes_as_input else None

        def reshaping(op: str, value: ir.Value, label: str, out_shape: ir.Shape | None) -> ir.Value:
            if axes is not None:
                return emit(op, [value, axes], label, out_shape)
            return emit(op, [value], label, out_shape, axes=[1])

        lifted = None
        if shape is not None:
            dims = list(shape)
            lifted = ir.Shape([dims[0], 1, *dims[1:]])
        squares = emit("Mul", [m.x, m.x], "square", shape)
        moved = reshaping("Unsqueeze", squares, "channels_as_space", lifted)
        before = (size - 1) // 2
        after = size - 1 - before
        spatial = m.rank - 1  # the channel axis and the original spatial axes
        mean = emit(
            "AveragePool",
            [moved],
            "window_mean",
            lifted,
            kernel_shape=[size] + [1] * (spatial - 1),
            pads=[before] + [0] * (spatial - 1) + [after] + [0] * (spatial - 1),
            count_include_pad=1,
        )
        window = reshaping("Squeeze", mean, "window", shape)
        scaled = emit("Mul", [window, constant("alpha", np.array(alpha, np.float32))], "alpha", shape)
        base_value = emit("Add", [scaled, constant("bias", np.array(bias, np.float32))], "bias", shape)
        if abs(beta - 0.75) < 1e-7:
            root = emit("Sqrt", [base_value], "sqrt", shape)
            fourth_root = emit("Sqrt", [root], "fourth_root", shape)
            divisor = emit("Mul", [root, fourth_root], "power", shape)
        elif abs(beta - 0.5) < 1e-7:
            divisor = emit("Sqrt", [base_value], "power", shape)
        elif abs(beta - 1.0) < 1e-7:
            divisor = base_value
        else:
            exponent = constant("beta", np.array(beta, np.float32))
            divisor = emit("Pow", [base_value, exponent], "power", shape)
        result = emit("Div", [m.x, divisor], "normalized", node.outputs[0].shape or shape)
        output = node.outputs[0]
        name = output.name
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        output.name = None
        result.name = name
        graph.remove(node, safe=True)
        return "LRN → Mul/AveragePool/Sqrt/Div"


class ExpandLrnPass(ir.passes.InPlacePass):
    """Write every LRN as the primitives ONNX Runtime runs vectorized (module docstring).

    After a call, ``expanded`` counts the LRNs rewritten and ``declined`` lists those left as they were.
    """

    def __init__(self) -> None:
        super().__init__()
        self.expanded = 0
        self.declined: list[Decline] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = _Context.of(model)
        outcome = rules.apply_rules(model, (LrnExpandRule(),), ctx, stage="canonicalize", opset=ctx.opset)
        self.expanded = sum(outcome.rewritten.values())
        self.declined = outcome.declines
        return ir.passes.PassResult(model, modified=outcome.modified)
