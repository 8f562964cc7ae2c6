"""Undo ONNX Runtime's fusions whose fused ops hide a weight product from quantization.

``onnxruntime.transformers.optimizer`` (and Optimum's ``ORTOptimizer``, which calls it) rewrites a
BERT-class encoder into ``com.microsoft`` ops: ``Attention`` holds the merged Q/K/V projection weight
inside it, ``SkipLayerNormalization`` the residual Add, the dense layer's bias and the LayerNorm. Such
a model loses most of what quantization gives: the Q/K/V projections (a quarter of an encoder's
multiply-adds) stay float, and outlier smoothing cannot fold its divisors into a LayerNorm it does
not see, and the word embeddings stay float inside ``EmbedLayerNormalization``. On the zoo's
all-MiniLM-L6, optimized that way, onnxq's output ran 0.62× the fused float model at 66.6 MB; with
these rules 0.40× at 23 MB, as for the unfused export. These rules write the fused ops back in standard form,
each exact in float (checked against ONNX Runtime's own kernels in the tests):

1. ``Attention(x, W, b, mask)`` ⇒ ``MatMul(x, W)`` → ``Split`` into Q, K, V →
   ``com.microsoft.MultiHeadAttention(q, k, v, b, mask)``: the projection is an ordinary MatMul with
   a constant weight (int8 like any other), the attention core stays one fused float kernel. The
   mask formats both ops share are kept (none, per-sequence lengths ``[batch]``, raw ``[batch,
   total]`` and ``[batch, sequence, total]`` masks); past/present state, rotary embeddings, an
   attention bias (onnxruntime 1.19's Attention kernel does not add a broadcast one consistently), a
   4-D mask and the left-padding ``[2·batch]`` index decline.
2. ``SkipLayerNormalization(x, skip, γ, β, bias)`` ⇒ ``Add(x, bias)`` → ``Add(·, skip)`` →
   ``LayerNormalization(·, γ, β)`` (opset ≥ 17; its ``input_skip_bias_sum`` output, when read, is the
   second Add). Nodes that return the training outputs (mean, inverse standard deviation) decline.
3. ``EmbedLayerNormalization`` ⇒ ``Gather`` of the word, position (and segment) tables → ``Add`` →
   ``LayerNormalization`` (opset ≥ 17), its mask index as the count of non-zero mask entries per
   row: the tables become ordinary Gathers, stored int8 like any embedding table. It runs after the
   other rules (:data:`LATE_DEFUSE_RULES`), so that rule 1 still sees who made its mask index.

A model saved by ONNX Runtime at its extended optimization level has its products fused with their
activations, which hides a Conv from the quantizer as well:

4. ``FusedConv(X, W, B, Z)`` ⇒ ``Conv`` [→ ``Add(Z)``] → its activation (Relu, Tanh, Sigmoid,
   LeakyRelu, HardSigmoid, Clip);
5. ``FusedGemm`` ⇒ ``Gemm`` → its activation;
6. ``FusedMatMul(A, W)`` with a constant ``W`` ⇒ ``MatMul(A, α·op(W))`` (a product of two
   activations stays fused).

``BiasGelu``/``FastGelu`` and ``MultiHeadAttention`` stay as they are:
they hold no weight product, and ONNX Runtime runs them between quantized neighbours in one float
kernel each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Reason
from onnxq.graph import attr_float, attr_int, const_array, make_initializer, take_over, trim_inputs

__all__ = ["DEFUSE_RULES", "LATE_DEFUSE_RULES", "DefusePass"]

_MS_DOMAIN = "com.microsoft"
_Context = rules.RewriteContext


@dataclass
class _Fused:
    """A fused node and the context to rewrite it in."""

    node: ir.Node
    ctx: _Context


def _given(node: ir.Node, index: int) -> ir.Value | None:
    """Input ``index`` of ``node``, ``None`` when absent or left empty."""
    value = node.inputs[index] if index < len(node.inputs) else None
    return value if value is not None and value.name != "" else None


def _read(node: ir.Node, index: int) -> bool:
    """Whether output ``index`` of ``node`` exists and something reads it."""
    if index >= len(node.outputs):
        return False
    value = node.outputs[index]
    return bool(value.uses()) or value.is_graph_output()


def _like(value: ir.Value, model: ir.Value) -> None:
    """Give ``value`` the element type of ``model`` when that is known."""
    if model.dtype is not None:
        value.dtype = model.dtype


@dataclass
class _Writer:
    """The nodes a rewrite writes in place of a fused node, each named after it (``base``)."""

    ctx: _Context
    graph: ir.Graph
    base: str
    created: list[ir.Node] = field(default_factory=list)

    @classmethod
    def of(cls, m: _Fused, default: str) -> _Writer:
        """A writer for ``m``'s node, its nodes named after the node (``default`` when it has no name)."""
        graph = m.node.graph
        assert graph is not None
        return cls(m.ctx, graph, m.node.name or default)

    def node(
        self,
        op: str,
        inputs: Sequence[ir.Value | None],
        label: str,
        attrs: list[ir.Attr] | None = None,
        *,
        outputs: int = 1,
        domain: str = "",
    ) -> ir.Node:
        """A new node ``<base>_<label>`` (``<base>`` for an empty label), written after the earlier ones."""
        name = self.ctx.names.fresh(f"{self.base}_{label}" if label else self.base)
        new = ir.Node(domain, op, inputs, attrs or [], num_outputs=outputs, name=name)
        self.created.append(new)
        return new

    def value(
        self,
        op: str,
        inputs: Sequence[ir.Value | None],
        label: str,
        attrs: list[ir.Attr] | None = None,
        *,
        out: str = "",
        like: ir.Value | None = None,
    ) -> ir.Value:
        """The output of a new one-output node, named ``<base>_<out>`` (default ``<label>_out``).

        It takes the element type of ``like`` when given.
        """
        result = self.node(op, inputs, label, attrs).outputs[0]
        result.name = self.ctx.names.fresh(f"{self.base}_{out or label + '_out'}")
        if like is not None:
            _like(result, like)
        return result

    def constant(self, label: str, array: np.ndarray) -> ir.Value:
        """A new initializer ``<base>_<label>`` in the fused node's graph."""
        return make_initializer(self.graph, self.ctx.names, f"{self.base}_{label}", array)

    def splice(self, node: ir.Node, outputs: dict[int, ir.Value]) -> None:
        """Put the written nodes where ``node`` is; its output ``i`` becomes ``outputs[i]``; remove it."""
        for new in self.created:
            self.graph.insert_before(node, new)
        for index, value in outputs.items():
            take_over(node.outputs[index], value)
        self.graph.remove(node, safe=True)


def _no_layer_norm(m: _Fused) -> Reason | None:
    """Why the model's opset cannot hold the LayerNormalization a rewrite writes (``None``: it can)."""
    if m.ctx.opset < 17:
        return Reason("no_target", f"LayerNormalization needs opset 17, the model has {m.ctx.opset}")
    return None


def _layer_norm_attrs(node: ir.Node) -> list[ir.Attr]:
    """A LayerNormalization over the last axis with the fused node's epsilon."""
    return [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", attr_float(node, "epsilon", 1e-12))]


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else None


class _DefuseRule(rules.Rule[_Fused, _Context]):
    domain = _MS_DOMAIN

    def match(self, node: ir.Node, ctx: _Context) -> _Fused | None:
        return _Fused(node, ctx)


class AttentionRule(_DefuseRule):
    """Rule 1: ``Attention`` ⇒ ``MatMul`` → ``Split`` → ``MultiHeadAttention`` (module docstring)."""

    op_types = ("Attention",)

    def sizes(self, m: _Fused) -> list[int] | None:
        """The Q, K and V widths of the merged weight (``None``: not a 2-D constant)."""
        weights = const_array(_given(m.node, 1))
        if weights is None or weights.ndim != 2:
            return None
        given = _ints(m.node, "qkv_hidden_sizes")
        if given:
            return given
        width = int(weights.shape[1])
        return [width // 3] * 3 if width % 3 == 0 else None

    def check(self, m: _Fused) -> Reason | None:
        node = m.node
        sizes = self.sizes(m)
        if sizes is None or len(sizes) != 3:
            return Reason("weight_not_constant", "its merged Q/K/V weight is not a 2-D constant")
        if sizes[0] != sizes[1]:
            return Reason("qk_sizes", f"Q and K widths differ ({sizes[0]} vs {sizes[1]})")
        bias = _given(node, 2)
        if bias is not None and const_array(bias) is None:
            return Reason("bias_not_constant", "its Q/K/V bias is not a constant")
        if any(_given(node, i) is not None for i in (4, 6)) or _read(node, 1):
            return Reason("past_state", "it reads or returns past/present key-value state")
        if _given(node, 5) is not None:
            # onnxruntime 1.19's Attention reads a broadcast bias differently from graph to graph.
            return Reason("attention_bias", "it adds an attention bias (relative position bias)")
        if attr_int(node, "do_rotary", 0) or attr_int(node, "past_present_share_buffer", 0):
            return Reason("rotary_or_shared_buffer", "it applies rotary embeddings or shares a KV buffer")
        mask = _given(node, 3)
        if mask is not None and not self.mask_supported(mask, _given(node, 0)):
            return Reason(
                "mask_format",
                "its mask_index is neither per-sequence lengths [batch] nor a raw 2-D/3-D mask",
            )
        return None

    @staticmethod
    def mask_supported(mask: ir.Value, data: ir.Value | None) -> bool:
        """Whether MultiHeadAttention reads ``mask`` as Attention does.

        A 1-D index may list lengths (``[batch]``) or end and start positions (``[2·batch]``, which
        MultiHeadAttention does not take): it is accepted when EmbedLayerNormalization made it (always
        lengths) or its length is the batch dimension of the input.
        """
        producer = mask.producer()
        if producer is not None and producer.op_type == "EmbedLayerNormalization":
            return True
        rank = len(mask.shape) if mask.shape is not None else None
        if rank in (2, 3):
            return True
        if rank != 1 or mask.shape is None:
            return False
        if data is None or data.shape is None or len(data.shape) != 3:
            return False
        batch, length = data.shape[0], mask.shape[0]
        # Two unknown dims compare equal in onnx-ir: only a known size or a named dim proves it.
        known = isinstance(batch, int) or (isinstance(batch, ir.SymbolicDim) and batch.value is not None)
        return known and batch == length

    def kernel(self, m: _Fused) -> rules.Kernel | None:
        return rules.Kernel("MultiHeadAttention", {0: ir.DataType.FLOAT}, _MS_DOMAIN)

    def rewrite(self, m: _Fused) -> str:
        node, ctx = m.node, m.ctx
        sizes = self.sizes(m)
        assert sizes is not None
        write = _Writer.of(m, "Attention")
        x, weights = _given(node, 0), _given(node, 1)
        assert x is not None and weights is not None
        projected = write.value("MatMul", [x, weights], "qkv", like=x)
        split_sizes = np.asarray(sizes, np.int64)
        if ctx.opset >= 13:
            sizes_value = write.constant("qkv_sizes", split_sizes)
            split_inputs, attrs = [projected, sizes_value], [ir.AttrInt64("axis", -1)]
        else:
            split_inputs = [projected]
            attrs = [ir.AttrInt64("axis", -1), ir.AttrInt64s("split", [int(s) for s in sizes])]
        split = write.node("Split", split_inputs, "split", attrs, outputs=3)
        for part, value in zip("qkv", split.outputs, strict=True):
            value.name = ctx.names.fresh(f"{write.base}_{part}")
            _like(value, x)
        attributes = [ir.AttrInt64("num_heads", attr_int(node, "num_heads", 1))]
        if "scale" in node.attributes:
            attributes.append(ir.AttrFloat32("scale", attr_float(node, "scale", 0.0)))
        if "mask_filter_value" in node.attributes:
            attributes.append(ir.AttrFloat32("mask_filter_value", attr_float(node, "mask_filter_value", 0.0)))
        if attr_int(node, "unidirectional", 0):
            attributes.append(ir.AttrInt64("unidirectional", 1))
        inputs = trim_inputs([*split.outputs, _given(node, 2), _given(node, 3)])
        attention = write.node("MultiHeadAttention", inputs, "", attributes, domain=_MS_DOMAIN)
        write.splice(node, {0: attention.outputs[0]})
        return "fused Attention → MatMul + MultiHeadAttention"


class SkipLayerNormRule(_DefuseRule):
    """Rule 2: ``SkipLayerNormalization`` ⇒ ``Add`` → ``Add`` → ``LayerNormalization`` (module docstring)."""

    op_types = ("SkipLayerNormalization",)

    def check(self, m: _Fused) -> Reason | None:
        if (problem := _no_layer_norm(m)) is not None:
            return problem
        if _read(m.node, 1) or _read(m.node, 2):
            return Reason("training_outputs", "its mean or inverse standard deviation output is read")
        if _given(m.node, 2) is None:
            return Reason("no_gamma", "it has no gamma")
        return None

    def rewrite(self, m: _Fused) -> str:
        node = m.node
        write = _Writer.of(m, "SkipLayerNormalization")
        x, skip, gamma, beta, bias = (_given(node, i) for i in range(5))
        assert x is not None and skip is not None and gamma is not None
        total = x
        # The dense layer's bias first: MatMul → Add(bias) is the form the quantizer and ONNX Runtime's
        # MatMul fusions know.
        for operand, label in ((bias, "bias"), (skip, "skip")):
            if operand is None:
                continue
            total = write.value("Add", [total, operand], label, out=f"{label}_sum", like=x)
            total.shape = x.shape
        inputs = [total, gamma] if beta is None else [total, gamma, beta]
        norm = write.node("LayerNormalization", inputs, "", _layer_norm_attrs(node))
        write.splice(node, {0: norm.outputs[0], **({3: total} if _read(node, 3) else {})})
        return "fused SkipLayerNormalization → Add + LayerNormalization"


class EmbedLayerNormRule(_DefuseRule):
    """Rule 3: ``EmbedLayerNormalization`` ⇒ ``Gather``s of its tables → ``Add`` → ``LayerNormalization``.

    Its word, position and segment tables are then ordinary Gathers, which embedding quantization
    stores int8 (the fused MiniLM's file: 0.65 → 0.26 of float). Positions are ``position_ids`` when
    given, else ``0 … S−1``; the mask index is the count of non-zero mask entries per row (what ONNX
    Runtime's kernel computes); the ``embedding_sum`` output is the sum before normalization.
    """

    op_types = ("EmbedLayerNormalization",)

    def check(self, m: _Fused) -> Reason | None:
        if (problem := _no_layer_norm(m)) is not None:
            return problem
        if _read(m.node, 1) and _given(m.node, 7) is None:
            return Reason("mask_index_without_mask", "its mask index is read but it has no mask")
        if _given(m.node, 6) is None:
            return Reason("no_beta", "it has no beta")
        return None

    def rewrite(self, m: _Fused) -> str:
        node = m.node
        write = _Writer.of(m, "EmbedLayerNormalization")
        ids, segments, words, positions, segment_table, gamma, beta, mask, position_ids = (
            _given(node, i) for i in range(9)
        )
        assert ids is not None and words is not None and positions is not None and gamma is not None
        total = write.value("Gather", [words, ids], "words")
        if position_ids is None:
            shape = write.value("Shape", [ids], "shape")
            length = write.value(
                "Gather", [shape, write.constant("seq_axis", np.array(1, np.int64))], "length"
            )
            position_ids = write.value(
                "Range",
                [
                    write.constant("start", np.array(0, np.int64)),
                    length,
                    write.constant("step", np.array(1, np.int64)),
                ],
                "range",
            )
        total = write.value(
            "Add", [total, write.value("Gather", [positions, position_ids], "positions")], "sum"
        )
        if segments is not None and segment_table is not None:
            total = write.value(
                "Add", [total, write.value("Gather", [segment_table, segments], "segments")], "segment_sum"
            )
        normed = write.value("LayerNormalization", [total, gamma, beta], "norm", _layer_norm_attrs(node))
        outputs = {0: normed}
        if _read(node, 1):
            assert mask is not None
            zero = write.value("Equal", [mask, write.constant("zero", np.array(0, np.int32))], "padding")
            kept = write.value(
                "Cast",
                [write.value("Not", [zero], "kept")],
                "kept_int",
                [ir.AttrInt64("to", ir.DataType.INT32)],
            )
            outputs[1] = write.value(
                "ReduceSum",
                [kept, write.constant("row_axis", np.array([1], np.int64))],
                "lengths",
                [ir.AttrInt64("keepdims", 0)],
            )
        if _read(node, 2):
            outputs[2] = total
        write.splice(node, outputs)
        return "fused EmbedLayerNormalization → Gather + Add + LayerNormalization"


def _activation_attrs(name: str, params: list[float]) -> list[ir.Attr] | None:
    """Attributes of the standard op ``name`` from a fused node's activation parameters.

    ``None`` for an activation the rewrite does not write (Clip, whose bounds are inputs, is handled
    by the caller).
    """
    if name in ("Relu", "Tanh", "Sigmoid"):
        return []
    if name == "LeakyRelu":
        return [ir.AttrFloat32("alpha", params[0] if params else 0.01)]
    if name == "HardSigmoid":
        return [
            ir.AttrFloat32("alpha", params[0] if params else 0.2),
            ir.AttrFloat32("beta", params[1] if len(params) > 1 else 0.5),
        ]
    return None


def _activation(node: ir.Node) -> tuple[str, list[float]]:
    """A FusedConv's or FusedGemm's activation and its parameters (``""``: none)."""
    attr = node.attributes.get("activation")
    name = attr.as_string() if attr is not None else ""
    if node.op_type == "FusedConv":
        given = node.attributes.get("activation_params")
        return name, list(given.as_floats()) if given is not None else []
    keys = ("activation_alpha", "activation_beta", "activation_gamma")
    return name, [attr_float(node, key, 0.0) for key in keys if key in node.attributes]


class _ActivationRule(_DefuseRule):
    """Rules 4–5: a fused product with an activation ⇒ the standard product, then the activation."""

    #: The standard op the fused one extends, and the attributes that belong to the activation.
    product: str = ""
    fused_only: tuple[str, ...] = (
        "activation",
        "activation_params",
        "activation_alpha",
        "activation_beta",
        "activation_gamma",
    )

    def check(self, m: _Fused) -> Reason | None:
        name, params = _activation(m.node)
        if name and name != "Clip" and _activation_attrs(name, params) is None:
            return Reason("activation", f"its activation {name} is not one the rewrite writes")
        if name == "Clip" and len(params) != 2:
            return Reason("activation", "its Clip has no bounds")
        return None

    def rewrite(self, m: _Fused) -> str:
        node, ctx = m.node, m.ctx
        write = _Writer.of(m, node.op_type)
        attributes = [a for name, a in node.attributes.items() if name not in self.fused_only]
        data_inputs = trim_inputs([_given(node, i) for i in range(3)])
        out = write.value(self.product, data_inputs, "", attributes, out=self.product.lower())
        summand = _given(node, 3) if node.op_type == "FusedConv" else None
        if summand is not None:
            out = write.value("Add", [out, summand], "sum")
        name, params = _activation(node)
        if name:
            inputs: list[ir.Value | None] = [out]
            attrs = _activation_attrs(name, params) or []
            if name == "Clip":
                if ctx.opset >= 11:
                    low, high = (np.asarray(p, np.float32) for p in params)
                    inputs += [write.constant("min", low), write.constant("max", high)]
                else:
                    attrs = [ir.AttrFloat32("min", params[0]), ir.AttrFloat32("max", params[1])]
            out = write.node(name, inputs, name, attrs).outputs[0]
        write.splice(node, {0: out})
        return f"fused {node.op_type} → {self.product}" + (f" + {name}" if name else "")


class FusedConvRule(_ActivationRule):
    """Rule 4: ``FusedConv(X, W, B, Z)`` ⇒ ``Conv`` [→ ``Add(Z)``] → activation."""

    op_types = ("FusedConv",)
    product = "Conv"


class FusedGemmRule(_ActivationRule):
    """Rule 5: ``FusedGemm(A, B, C)`` ⇒ ``Gemm`` → activation."""

    op_types = ("FusedGemm",)
    product = "Gemm"


class FusedMatMulRule(_DefuseRule):
    """Rule 6: ``FusedMatMul(A, W)`` with a constant ``W`` ⇒ ``MatMul(A, α·op(W))``.

    ``transB`` and ``alpha`` go into a new constant. Products of two activations (attention scores,
    which ONNX Runtime fuses with their scale) stay fused.
    """

    op_types = ("FusedMatMul",)

    def check(self, m: _Fused) -> Reason | None:
        weight = const_array(_given(m.node, 1))
        if weight is None or weight.ndim < 2:
            return Reason("activation_product", "its second input is not a constant weight")
        if any(attr_int(m.node, key, 0) for key in ("transA", "transBatchA", "transBatchB")):
            return Reason("transposed_input", "it transposes its first input or batch dimensions")
        return None

    def rewrite(self, m: _Fused) -> str:
        node = m.node
        write = _Writer.of(m, "FusedMatMul")
        weight = const_array(_given(node, 1))
        assert weight is not None
        if attr_int(node, "transB", 0):
            weight = np.swapaxes(weight, -1, -2)
        alpha = attr_float(node, "alpha", 1.0)
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, weight.dtype)
        constant = write.constant("weight", np.ascontiguousarray(weight))
        matmul = write.node("MatMul", [_given(node, 0), constant], "")
        write.splice(node, {0: matmul.outputs[0]})
        return "fused FusedMatMul → MatMul"


#: Every rule, in the order tried.
DEFUSE_RULES: tuple[_DefuseRule, ...] = (
    AttentionRule(),
    SkipLayerNormRule(),
    FusedConvRule(),
    FusedGemmRule(),
    FusedMatMulRule(),
)

#: Run after :data:`DEFUSE_RULES`: an Attention recognizes the mask index EmbedLayerNormalization makes
#: (lengths, never left-padding positions) by its producer.
LATE_DEFUSE_RULES: tuple[_DefuseRule, ...] = (EmbedLayerNormRule(),)


class DefusePass(rules.RuleTablePass):
    """Write ONNX Runtime's fused transformer ops back in standard form (module docstring)."""

    stage = "canonicalize"

    def __init__(self) -> None:
        super().__init__(DEFUSE_RULES, LATE_DEFUSE_RULES)
