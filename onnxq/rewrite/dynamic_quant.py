"""Dynamic quantization: int8 weights stored in the model, activations quantized at run time.

No calibration data is needed: each activation is quantized per-tensor (uint8, affine) from its own
range on every run, and the weights are quantized here once, with the node's resolved
:class:`~onnxq.config.WeightScheme`.

Rewrite rules (nodes of the main graph, visited in graph order):

1. ``MatMul(A, B)`` with ``A`` a float activation and ``B`` a constant float32 ``[K, N]`` becomes
   ``com.microsoft.DynamicQuantizeMatMul(A, B_q, b_scale, b_zero_point[, bias])`` (other forms
   below); ``B`` is stored int8 (per column, i.e. per output channel along ``N``, when the scheme is
   per-channel; else one scale). When the MatMul's only reader is an ``Add`` of a constant float32
   ``[N]`` (either input order), that vector becomes the ``bias`` input and the Add disappears; the
   result keeps the Add's output name.
2. ``Gemm(A, B, C)`` with ``transA = 0`` and constant ``B``: ``B`` is transposed to ``[K, N]`` when
   ``transB = 1`` and multiplied by ``alpha`` before quantization (exact: quantization is scale
   invariant), then rule 1 applies. ``beta * C`` becomes the bias when ``C`` is a constant scalar,
   ``[N]`` or ``[1, N]``; a constant ``C`` of another shape is added by an ``Add`` after the product.
   Without ``C``, a following bias ``Add`` is folded as in rule 1.
3. ``LSTM`` with constant ``W [D, 4H, I]`` and ``R [D, 4H, H]`` becomes ``com.microsoft.
   DynamicQuantizeLSTM(X, W_q, R_q, B, sequence_lens, initial_h, initial_c, P, W_scale,
   W_zero_point, R_scale, R_zero_point)``. That op wants the weights transposed to ``[D, I, 4H]`` and
   ``[D, H, 4H]``, with scales/zero points of shape ``[D, 4H]`` (per channel) or ``[D]`` (per
   direction). Every other input and all attributes are kept (``hidden_size`` is filled in from ``R``
   when absent).
4. ``Conv`` (only with ``DynamicConfig.conv``): ``DynamicQuantizeLinear(X) → ConvInteger(X_q, W_q,
   x_zero_point, 128) → Cast(float) → Mul(x_scale · w_scale) [→ Add(bias)]``, with ``w_scale`` of
   shape ``[1, M, 1, 1]`` for per-channel weights. ONNX Runtime's ConvInteger takes a single weight
   zero point and its int8-weight kernel is ~4× slower than the uint8 one, so the symmetric int8
   grid is stored shifted into uint8 with zero point 128 (same values, per-channel scales kept);
   an affine (uint8) scheme is quantized per-tensor. Off by default because even so the chain is
   slower than float Conv at ``ORT_ENABLE_ALL`` (1.6× on a 16→32 channel 3×3 Conv at 32×32, one
   thread).
5. ``Gather(table, indices)`` with a constant float32 ``[V, D]`` table and ``axis = 0``, ``D ≥ 8`` and
   ``V·D ≥ 4096`` (``DynamicConfig.embeddings``, on by default as in ONNX Runtime's quantizers: a
   BERT-class model's word embeddings are a third to a half of its file): the table is stored as
   symmetric int8. Per-channel schemes give one
   scale per row, kept as a ``[V, 1]`` table: ``Gather(table_q, indices) → Cast(float) →
   Mul(Gather(row_scales, indices))``, so only the gathered rows are dequantized (the ``[V, 1]``
   shape plays the role of an Unsqueeze on the last axis). Per-tensor schemes give
   ``Gather(table_q, indices) → DequantizeLinear(scale)``. Per-row is the accurate choice (a table
   of word vectors has rows of very different norms: on MiniLM the sentence-embedding cosine is
   0.9938 per-row vs 0.9919 per-tensor) and costs the same within measurement noise.

Forms of rules 1 and 2. ONNX Runtime 1.31 accepts signed int8 ``B`` with per-column (``[N]``) scales
and zero points in every form below, and all of them compute the same numbers:

- default (``ms_domain=True``): ``DynamicQuantizeMatMul`` as above. An activation that two or more
  rewritten MatMul/Gemm read (the Q/K/V projections of a transformer layer) is quantized once:
  ``DynamicQuantizeLinear(A)`` feeds one ``com.microsoft.MatMulIntegerToFloat(A_q, B_q, a_scale,
  b_scale, a_zero_point, b_zero_point[, bias])`` per reader (needs opset ≥ 11).
- ``ms_domain=False``, portable (default-domain ops only, opset ≥ 11): ``DynamicQuantizeLinear(A) →
  MatMulInteger(A_q, B_q, a_zero_point, b_zero_point) → Cast(float) → Mul(a_scale · b_scale)
  [→ Add(bias)]``, again with one ``DynamicQuantizeLinear`` per activation.

Measured on one thread (``[1,128,384] × [384,1536]``, median of 300 interleaved runs):
``DynamicQuantizeMatMul`` 0.17 ms vs portable 0.22 ms at ``ORT_DISABLE_ALL`` (float MatMul 0.87 ms);
at ``ORT_ENABLE_ALL`` ONNX Runtime fuses the portable chain into the same kernels (0.17 ms both). On
MiniLM (seq 128) at ``ORT_ENABLE_ALL`` the forms are within 1 % of each other once the activation is
shared; sharing is what ONNX Runtime's fusion makes of the portable form, and the default form gets
there without depending on that fusion, so it is the default.

Declines (each recorded in :attr:`DynamicQuantizePass.declined` as ``"<node> not quantized: <why>"``):
nodes excluded by the configuration; a weight that is not a constant (activation × activation
MatMuls stay float), has a rank other than 2 (MatMul/Gemm), or is not float32; a constant ``A``;
``Gemm`` with ``transA = 1`` or a non-constant ``C``; ``LSTM`` with ``layout = 1`` or inconsistent
weight shapes; a Conv bias that is not constant; a default-domain opset below 11 where
``DynamicQuantizeLinear`` is needed. Nodes inside If/Loop/Scan bodies are left float and counted in
one line, as are Conv and Gather nodes when their flag is off.

Activations are always quantized as uint8 (affine): that is what ``DynamicQuantizeLinear`` produces,
so the configuration's activation scheme does not apply here.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.config import QuantConfig, WeightScheme
from onnxq.declines import Decline, Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    NameScope,
    attr_float,
    attr_int,
    const_array,
    default_opset,
    is_constant,
    is_float,
    make_initializer,
    rounded_from,
    trim_inputs,
)
from onnxq.qmath import QuantParams, quantize_weight
from onnxq.rewrite.weight_memo import remembered
from onnxq.rules import Kernel

__all__ = [
    "MS_DOMAIN",
    "QUANTIZED_OP_TYPES",
    "RULES",
    "DynamicQuantizePass",
    "StaticLeftoversPass",
    "run_time_products",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
#: Op types the dynamic rewrite writes (everything else in its output stayed float).
QUANTIZED_OP_TYPES = frozenset(
    {
        "DynamicQuantizeMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeLinear",
        "DequantizeLinear",
        "QuantizeLinear",
        "Cast",
        "MatMulIntegerToFloat",
    }
)
#: DynamicQuantizeLinear exists from this default-domain opset on.
_MIN_DQL_OPSET = 11
#: Attributes of ONNX LSTM that com.microsoft.DynamicQuantizeLSTM also has.
_LSTM_ATTRIBUTES = (
    "activation_alpha",
    "activation_beta",
    "activations",
    "clip",
    "direction",
    "hidden_size",
    "input_forget",
)


@dataclass
class _QuantizedWeight:
    """A weight stored quantized: the integer data, its scale and zero point as graph values."""

    data: ir.Value
    scale: ir.Value
    zero_point: ir.Value


@dataclass
class _Product:
    """A MatMul or Gemm that passed its checks, and what its rewrite needs.

    ``b`` is the float weight, used as ``[K, N]`` after a transpose (``trans_b``) and scaling by
    ``alpha`` (the weight array is only derived at rewrite time, so matching every node of a large
    model holds no copies); ``n`` is ``N``; ``bias`` is the ``[N]`` bias input, ``add_after`` a
    constant added after the product (a Gemm ``C`` that is no ``[N]`` vector), ``fold_add`` whether a
    following bias ``Add`` may be folded and ``consumed`` the float constants the rewrite stops reading.
    """

    node: ir.Node
    b: ir.Value
    n: int
    trans_b: bool = False
    alpha: float = 1.0
    bias: ir.Value | np.ndarray | None = None
    add_after: ir.Value | np.ndarray | None = None
    fold_add: bool = True
    consumed: tuple[ir.Value, ...] = ()


class DynamicQuantizePass(ir.passes.InPlacePass):
    """Quantize weights to int8 and activations at run time (see the module docstring for the rules).

    ``config`` gives exclusions and weight schemes (:meth:`QuantConfig.resolve`) and the Conv and
    embedding flags (:attr:`QuantConfig.dynamic`); ``ms_domain`` picks the ``com.microsoft`` ops
    (default: ``DynamicQuantizeMatMul``/``MatMulIntegerToFloat``) or the portable default-domain form
    for MatMul/Gemm. Expects a preprocessed model (:func:`onnxq.preprocess.preprocess`). After
    a call, :attr:`quantized` counts the rewritten nodes by their original op type and
    :attr:`declined` says why others were not.
    """

    def __init__(self, config: QuantConfig | None = None, *, ms_domain: bool = True) -> None:
        super().__init__()
        self.config = config or QuantConfig()
        self.ms_domain = ms_domain
        self.quantized: collections.Counter[str] = collections.Counter()
        self.declined: list[Decline] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = _Rewriter(model, self.config, self.ms_domain)
        # MatMul/Gemm are matched first: the rewrite of one needs to know which other readers of
        # its activation will be rewritten too (they share one run-time quantization).
        ctx.products = {
            node: ctx.match_product(node)
            for node in model.graph
            if node.op_type in ("MatMul", "Gemm")
            and node.domain in DEFAULT_DOMAINS
            and self.config.resolve(node.name or "", node.op_type).quantize
        }
        ctx.rewritable = {node for node, match in ctx.products.items() if isinstance(match, _Product)}
        table: list[_Rule] = [PRODUCT_RULE]
        if self.config.dynamic.lstm:
            table.append(LSTM_RULE)
        if self.config.dynamic.conv:
            table.append(CONV_RULE)
        if self.config.dynamic.embeddings:
            table.append(GATHER_RULE)
        outcome = rules.apply_rules(model, table, ctx, stage="dynamic", opset=ctx.opset)
        self.quantized = outcome.rewritten
        self.declined = outcome.declines + self._left_float(model)
        modified = bool(self.quantized)
        if modified:
            ctx.drop_replaced_initializers()
            if ctx.used_ms_domain:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
        for decline in self.declined:
            logger.debug("%s", decline)
        return ir.passes.PassResult(model, modified=modified)

    def _left_float(self, model: ir.Model) -> list[Decline]:
        """One line per kind of node this pass leaves float without looking at it: options off."""
        main = [n for n in model.graph.all_nodes() if n.domain in DEFAULT_DOMAINS]
        lines: list[Decline] = []
        conv = sum(1 for n in main if n.op_type == "Conv")
        if conv and not self.config.dynamic.conv:
            message = (
                f"{conv} Conv node(s) left float: dynamic Conv is off (DynamicConfig.conv; "
                "ConvInteger is slower than float Conv in ONNX Runtime)"
            )
            lines.append(Decline("dynamic", "option_off", message, op_type=""))
        gather = sum(1 for n in main if n.op_type == "Gather" and _embedding_table(n) is not None)
        if gather and not self.config.dynamic.embeddings:
            message = f"{gather} embedding Gather node(s) left float: DynamicConfig.embeddings is off"
            lines.append(Decline("dynamic", "option_off", message))
        return lines


def run_time_products(model: ir.Model, config: QuantConfig) -> tuple[str, ...]:
    """The MatMul/Gemm nodes static mode quantizes at run time (:attr:`QuantConfig.run_time_ranges`).

    Those of the main graph that ``config`` quantizes and rules 1 and 2 can rewrite (a constant
    float32 weight, a float activation): their input is quantized by ``DynamicQuantizeLinear`` from
    its own range on each run instead of a calibrated one. Except a product fed by another layer with
    a constant weight through ops that keep its integer output integer (:func:`_integer_fed`: the
    fully connected layers of a CNN, an MLP): there the calibrated form runs kernel to kernel in
    int8, and a run-time range would dequantize the tensor and quantize it again (AlexNet's head:
    6.8 ms run-time against 5.4 ms calibrated). Empty when the option is off.
    """
    if not config.run_time_ranges:
        return ()
    ctx = _Rewriter(model, config, ms_domain=True)
    return tuple(
        node.name or ""
        for node in model.graph
        if node.op_type in ("MatMul", "Gemm")
        and node.domain in DEFAULT_DOMAINS
        and config.resolve(node.name or "", node.op_type).quantize
        and not _integer_fed(node.inputs[0])
        and isinstance(ctx.match_product(node), _Product)
    )


#: Ops through which ONNX Runtime keeps a quantized tensor quantized (an absorbed activation, integer
#: pooling, a reshuffle of the bytes): a weighted layer's int8 output stays int8 through them.
_INTEGER_PASS_THROUGH = frozenset(
    {
        "Relu",
        "Clip",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Dropout",
    }
)


def _integer_fed(value: ir.Value | None) -> bool:
    """Whether a weighted layer's quantized output reaches ``value``.

    That is, ``value`` comes from a Conv/ConvTranspose/MatMul/Gemm with a constant weight through
    :data:`_INTEGER_PASS_THROUGH` ops only.
    """
    for _ in range(32):  # a chain of pass-through ops is short; a bound keeps a cycle-free walk cheap
        node = value.producer() if value is not None else None
        if node is None or node.domain not in DEFAULT_DOMAINS:
            return False
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            return weight is not None and const_array(weight) is not None
        if node.op_type not in _INTEGER_PASS_THROUGH:
            return False
        value = node.inputs[0]
    return False


class StaticLeftoversPass(ir.passes.InPlacePass):
    """Rules 1, 2, 3 and 5 for static quantization, on what its plan leaves float.

    LSTMs with ``DynamicConfig.lstm`` (ONNX Runtime has no static int8 LSTM), embedding tables with
    ``DynamicConfig.embeddings`` (``--quantize-embeddings``), and the MatMul/Gemm nodes named in
    ``products`` (:func:`run_time_products`: the plan leaves them float, and they quantize their input
    at run time). Run after Q/DQ insertion: a Gather whose table the static plan already quantized
    reads a DequantizeLinear, not a constant, and is left as it is; an LSTM or a product whose input is
    dequantized reads a float activation like any other. After a call, :attr:`quantized` counts the
    nodes rewritten by op type.
    """

    def __init__(self, config: QuantConfig, products: Collection[str] = ()) -> None:
        super().__init__()
        self.config = config
        self.products = frozenset(products)
        self.quantized: collections.Counter[str] = collections.Counter()
        #: The part of :attr:`quantized` that ``products`` account for.
        self.run_time: collections.Counter[str] = collections.Counter()
        self.declined: list[Decline] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        table = [
            rule
            for rule, on in (
                (LSTM_RULE, self.config.dynamic.lstm),
                (GATHER_RULE, self.config.dynamic.embeddings),
            )
            if on
        ]
        self.quantized, self.run_time = collections.Counter(), collections.Counter()
        self.declined = []
        if self.products:
            self._rewrite_products(model)
            self.quantized.update(self.run_time)
        if table:
            ctx = _Rewriter(model, self.config, ms_domain=True)
            outcome = rules.apply_rules(model, table, ctx, stage="dynamic", opset=ctx.opset)
            self.quantized.update(outcome.rewritten)
            self.declined += outcome.declines
            if outcome.rewritten:
                ctx.drop_replaced_initializers()
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def _rewrite_products(self, model: ir.Model) -> None:
        """Rules 1 and 2 on the nodes of :attr:`products` only (the static plan excluded them).

        A product whose input the plan quantized for another reader (it reads ``DequantizeLinear(
        QuantizeLinear(x))``) is given ``x`` itself: its own run-time range fits each input, and the
        calibrated grid in front of it would round away what that range keeps.
        """
        selected = [n for n in model.graph if n.name in self.products and n.op_type in ("MatMul", "Gemm")]
        for node in selected:
            original = rounded_from(node.inputs[0])
            if original is not None and original.dtype == ir.DataType.FLOAT:
                node.replace_input_with(0, original)
        # The configuration excludes them from the static plan; here they are what is quantized.
        config = self.config.replace(
            exclude_nodes=tuple(n for n in self.config.exclude_nodes if n not in self.products)
        )
        ctx = _Rewriter(model, config, ms_domain=True)
        ctx.products = {node: ctx.match_product(node) for node in selected}
        ctx.rewritable = {node for node, match in ctx.products.items() if isinstance(match, _Product)}
        outcome = rules.apply_rules(
            model, [PRODUCT_RULE], ctx, stage="dynamic", opset=ctx.opset, nodes=selected
        )
        self.run_time.update(outcome.rewritten)
        self.declined += outcome.declines
        if outcome.rewritten:
            ctx.drop_replaced_initializers()
            if ctx.used_ms_domain:
                model.opset_imports.setdefault(MS_DOMAIN, 1)


@dataclass
class _Match:
    """A node a rule looks at; ``product`` is set by the MatMul/Gemm rule's check."""

    node: ir.Node
    ctx: _Rewriter
    product: _Product | None = None


def _excluded(m: _Match) -> Reason | None:
    if m.ctx.config.resolve(m.node.name or "", m.node.op_type).quantize:
        return None
    return Reason("excluded", "excluded by configuration")


class _Rule(rules.Rule[_Match, "_Rewriter"]):
    """The rules of this pass all match every node of their op types; ``check`` decides."""

    def match(self, node: ir.Node, ctx: _Rewriter) -> _Match | None:
        return _Match(node, ctx)


class _ProductRule(_Rule):
    """Rules 1 and 2: MatMul/Gemm with a constant weight → DynamicQuantizeMatMul (or its forms)."""

    op_types = ("MatMul", "Gemm")

    def check(self, m: _Match) -> Reason | None:
        found = _excluded(m) or m.ctx.products.get(m.node) or m.ctx.match_product(m.node)
        if isinstance(found, Reason):
            return found
        m.product = found
        return None

    def kernel(self, m: _Match) -> Kernel | None:
        weight = ir.DataType.INT8 if m.ctx.scheme(m.node).dtype == "int8" else ir.DataType.UINT8
        if m.ctx.ms_domain:
            return Kernel("MatMulIntegerToFloat", {0: ir.DataType.UINT8, 1: weight}, MS_DOMAIN)
        return Kernel("MatMulInteger", {0: ir.DataType.UINT8, 1: weight})

    def rewrite(self, m: _Match) -> str:
        assert m.product is not None
        m.ctx.rewrite_product(m.product, m.ctx.rewritable)
        return m.node.op_type


class _LSTMRule(_Rule):
    """Rule 3: LSTM → com.microsoft.DynamicQuantizeLSTM."""

    op_types = ("LSTM",)

    def check(self, m: _Match) -> Reason | None:
        return _excluded(m) or m.ctx.lstm_problem(m.node)

    def kernel(self, m: _Match) -> Kernel | None:
        weight = ir.DataType.INT8 if m.ctx.scheme(m.node).dtype == "int8" else ir.DataType.UINT8
        return Kernel("DynamicQuantizeLSTM", {1: weight}, MS_DOMAIN)

    def rewrite(self, m: _Match) -> str:
        m.ctx.lstm(m.node)
        return "LSTM"


class _ConvRule(_Rule):
    """Rule 4 (``DynamicConfig.conv``): Conv → DynamicQuantizeLinear → ConvInteger (uint8 weights)."""

    op_types = ("Conv",)

    def check(self, m: _Match) -> Reason | None:
        return _excluded(m) or m.ctx.conv_problem(m.node)

    def kernel(self, m: _Match) -> Kernel | None:
        return Kernel("ConvInteger", {0: ir.DataType.UINT8, 1: ir.DataType.UINT8})

    def rewrite(self, m: _Match) -> str:
        m.ctx.conv(m.node)
        return "Conv"


class _GatherRule(_Rule):
    """Rule 5 (``DynamicConfig.embeddings``): a Gather of a constant [V, D] table → int8 table."""

    op_types = ("Gather",)

    def match(self, node: ir.Node, ctx: _Rewriter) -> _Match | None:
        return _Match(node, ctx) if _embedding_table(node) is not None else None

    def check(self, m: _Match) -> Reason | None:
        return _excluded(m)

    def rewrite(self, m: _Match) -> str:
        m.ctx.gather(m.node)
        return "Gather"


PRODUCT_RULE = _ProductRule()
LSTM_RULE = _LSTMRule()
CONV_RULE = _ConvRule()
GATHER_RULE = _GatherRule()
#: Every rule of the pass (the pass uses the flagged ones only when their flag is on).
RULES: tuple[_Rule, ...] = (PRODUCT_RULE, LSTM_RULE, CONV_RULE, GATHER_RULE)


#: An embedding table has at least this many columns: narrower constant tables gathered by index are
#: coordinates (a detector's anchor boxes, [A, 4]), which int8 rows would move by a fraction of a pixel.
EMBEDDING_MIN_COLUMNS = 8

#: ... and at least this many values: smaller lookup tables (T5's [32, heads] relative-position bias)
#: gain nothing worth storing them int8.
EMBEDDING_MIN_VALUES = 4096


def _embedding_table(node: ir.Node) -> np.ndarray | None:
    """The constant float32 ``[V, D]`` table a ``Gather(axis=0)`` reads, else ``None``.

    Only tables of at least :data:`EMBEDDING_MIN_COLUMNS` columns and :data:`EMBEDDING_MIN_VALUES`
    values count (token and position embeddings; not anchor boxes or small lookup tables).
    """
    if node.op_type != "Gather" or len(node.inputs) < 2:
        return None
    table = const_array(node.inputs[0])
    if table is None or table.dtype != np.float32 or table.ndim != 2:
        return None
    if table.shape[1] < EMBEDDING_MIN_COLUMNS or table.size < EMBEDDING_MIN_VALUES:
        return None
    if attr_int(node, "axis", 0) % 2 != 0:
        return None
    return table


def _graph_of(node: ir.Node) -> ir.Graph:
    """The graph (main graph or If/Loop/Scan body) that holds ``node``."""
    graph = node.graph
    assert isinstance(graph, ir.Graph), f"node {node.name!r} is not in a graph"
    return graph


def _inputs(node: ir.Node, count: int) -> list[ir.Value | None]:
    """The node's first ``count`` inputs, ``None`` for those it does not have."""
    inputs = list(node.inputs)[:count]
    return inputs + [None] * (count - len(inputs))


def _take_name(old: ir.Value, new: ir.Value) -> None:
    """``new`` takes over the name of ``old`` (which is no longer used), so readers see no change."""
    name = old.name
    if name:
        old.name = None
        new.name = name


class _Rewriter:
    """Match → check → rewrite for each op type; each handler returns ``None`` or a decline reason."""

    def __init__(self, model: ir.Model, config: QuantConfig, ms_domain: bool) -> None:
        self.model = model
        self.graph = model.graph
        self.config = config
        self.ms_domain = ms_domain
        self.names = NameScope(self.graph)
        self.opset = default_opset(model)
        self.used_ms_domain = False
        self.replaced: list[ir.Value] = []
        self._weights: dict[tuple[object, ...], _QuantizedWeight] = {}
        #: DynamicQuantizeLinear outputs per (activation, graph of its readers): a body cannot read
        #: values another body computes, so each graph quantizes an outer activation on its own.
        self._activations: dict[tuple[ir.Value, ir.Graph], tuple[ir.Value, ir.Value, ir.Value]] = {}
        #: MatMul/Gemm nodes of the main graph matched before any rewrite, and those that will be.
        self.products: dict[ir.Node, _Product | Reason] = {}
        self.rewritable: set[ir.Node] = set()

    # ------------------------------------------------------------------------------------------
    # Helpers

    def scheme(self, node: ir.Node) -> WeightScheme:
        weights = self.config.resolve(node.name or "", node.op_type).weights
        return weights if weights is not None else self.config.weights

    def _new_node(
        self,
        domain: str,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        base: str,
        *,
        attributes: Sequence[ir.Attr] = (),
        outputs: Sequence[tuple[str, ir.DataType]] = (("out", ir.DataType.FLOAT),),
    ) -> ir.Node:
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=attributes,
            num_outputs=len(outputs),
            name=self.names.fresh(f"{base}_{op_type}"),
        )
        for value, (suffix, dtype) in zip(node.outputs, outputs, strict=True):
            value.name = self.names.fresh(f"{base}_{suffix}")
            value.type = ir.TensorType(dtype)
        return node

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        return make_initializer(self.graph, self.names, base, array)

    def _store(self, base: str, q: np.ndarray, params: QuantParams) -> _QuantizedWeight:
        return _QuantizedWeight(
            self._initializer(f"{base}_quantized", q),
            self._initializer(f"{base}_scale", np.asarray(params.scale, np.float32)),
            self._initializer(f"{base}_zero_point", np.asarray(params.zero_point)),
        )

    def _matrix_weight(
        self, source: ir.Value, scheme: WeightScheme, trans_b: bool, alpha: float
    ) -> _QuantizedWeight:
        """The constant ``source`` as ``[K, N]``, quantized per column.

        Transposed when ``trans_b`` and multiplied by ``alpha`` first; one copy per distinct weight and
        transform.
        """
        key = (source, "matrix", trans_b, alpha, scheme)
        if key not in self._weights:

            def compute() -> tuple[np.ndarray, QuantParams]:
                w = const_array(source)
                assert w is not None
                if trans_b:
                    w = w.T
                if alpha != 1.0:
                    w = w * np.float32(alpha)
                return quantize_weight(w, scheme.dtype, scheme.symmetric, 1 if scheme.per_channel else None)

            q, params = remembered(source, key[1:], compute)
            self._weights[key] = self._store(source.name or "weight", q, params)
        self.replaced.append(source)
        return self._weights[key]

    def _quantize_activation(self, value: ir.Value, before: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``DynamicQuantizeLinear(value)`` outputs (data, scale, zero point), one node per value."""
        key = (value, _graph_of(before))
        if key not in self._activations:
            base = value.name or "activation"
            node = self._new_node(
                "",
                "DynamicQuantizeLinear",
                [value],
                base,
                outputs=(
                    ("quantized", ir.DataType.UINT8),
                    ("scale", ir.DataType.FLOAT),
                    ("zero_point", ir.DataType.UINT8),
                ),
            )
            node.outputs[0].shape = value.shape
            node.outputs[1].shape = ir.Shape([])
            node.outputs[2].shape = ir.Shape([])
            _graph_of(before).insert_before(before, node)
            q, s, z = node.outputs
            self._activations[key] = (q, s, z)
        return self._activations[key]

    def _replace(self, old_nodes: Sequence[ir.Node], old: ir.Value, new: ir.Value) -> None:
        """Route readers of ``old`` to ``new`` (which takes over ``old``'s name) and drop ``old_nodes``."""
        new.type = old.type or new.type
        new.shape = old.shape or new.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        _graph_of(old_nodes[0]).remove(old_nodes, safe=True)
        _take_name(old, new)

    def _bias_add(self, node: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
        """The ``Add`` that is the only reader of ``node``'s output and adds a constant float32 ``[N]``."""
        out = node.outputs[0]
        if out.is_graph_output():
            return None
        uses = list(out.uses())
        if len(uses) != 1:
            return None
        add = uses[0].node
        if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or add.graph is not node.graph:
            return None
        if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
            return None
        other = add.inputs[1 - uses[0].idx]
        data = const_array(other)
        if other is None or data is None or data.dtype != np.float32 or data.shape != (n,):
            return None
        return add, other

    def drop_replaced_initializers(self) -> None:
        """Remove float initializers that nothing reads any more (the weights that were quantized)."""
        graphs: tuple[ir.Graph, ...] | None = None  # a body may hold its own weights
        for value in dict.fromkeys(self.replaced):
            unused = value.is_initializer() and not value.uses() and not value.is_graph_output()
            if not unused or value.name is None:
                continue
            if graphs is None:  # one walk of the graph, not one per weight (mpnet: 1368 of them)
                graphs = (self.graph, *self.graph.subgraphs())
            for graph in graphs:
                if graph.initializers.get(value.name) is value:
                    graph.initializers.pop(value.name)

    # ------------------------------------------------------------------------------------------
    # MatMul / Gemm

    def _check_activation(self, a: ir.Value | None) -> Reason | None:
        if a is None:
            return Reason("activation_form", "input A is missing")
        if is_constant(a):
            return Reason("activation_form", "input A is a constant (nothing to quantize at run time)")
        if not is_float(a):
            return Reason("activation_form", f"input A is {a.dtype}, not float32")
        return None

    def _check_weight(self, b: ir.Value | None, what: str) -> np.ndarray | Reason:
        if b is None:
            return Reason("weight_form", f"{what} is missing")
        data = const_array(b)
        if data is None:
            return Reason(
                "weight_form", f"{what} is not a constant (activation × activation products stay float)"
            )
        if data.dtype != np.float32:
            return Reason("weight_form", f"{what} is {data.dtype}, not float32")
        if data.ndim != 2:
            return Reason(
                "weight_form", f"{what} has rank {data.ndim}; DynamicQuantizeMatMul needs a 2-D weight"
            )
        return data

    def _check_form(self) -> Reason | None:
        if not self.ms_domain and self.opset < _MIN_DQL_OPSET:
            return Reason(
                "opset", f"opset {self.opset} has no DynamicQuantizeLinear (needs {_MIN_DQL_OPSET})"
            )
        return None

    def match_product(self, node: ir.Node) -> _Product | Reason:
        """Check a MatMul or Gemm (rules 1 and 2); the graph is not touched."""
        a, b, c = _inputs(node, 3)
        if node.op_type == "Gemm" and attr_int(node, "transA", 0) != 0:
            return Reason("form", "Gemm with transA = 1")
        if (reason := self._check_activation(a)) is not None:
            return reason
        w = self._check_weight(b, "weight B")
        if isinstance(w, Reason):
            return w
        if (reason := self._check_form()) is not None:
            return reason
        assert b is not None
        if node.op_type == "MatMul":
            return _Product(node, b, w.shape[1])
        trans_b = attr_int(node, "transB", 0) != 0
        alpha = attr_float(node, "alpha", 1.0)
        beta = attr_float(node, "beta", 1.0)
        product = _Product(node, b, w.shape[0] if trans_b else w.shape[1], trans_b, alpha)
        if c is None:
            return product
        product.fold_add = False
        product.consumed = (c,)
        c_data = const_array(c)
        if c_data is None:
            return Reason("form", "input C is not a constant")
        if c_data.dtype != np.float32:
            return Reason("form", f"input C is {c_data.dtype}, not float32")
        if beta == 0.0:
            return product
        n = product.n
        scaled = c_data if beta == 1.0 else (c_data * np.float32(beta)).astype(np.float32)
        if c_data.size == 1 or c_data.shape in ((n,), (1, n)):
            product.bias = (
                c if beta == 1.0 and c_data.shape == (n,) else np.broadcast_to(scaled.reshape(-1), (n,))
            )
        else:
            product.add_after = c if beta == 1.0 else scaled
        return product

    def _constant(self, base: str, value: ir.Value | np.ndarray | None) -> ir.Value | None:
        if value is None or isinstance(value, ir.Value):
            return value
        return self._initializer(base, np.ascontiguousarray(value, np.float32))

    def rewrite_product(self, product: _Product, rewritable: set[ir.Node]) -> None:
        """Rewrite a matched MatMul/Gemm (see :meth:`match_product`).

        ``rewritable`` holds the products that will be rewritten: an activation read by two or more
        of them is quantized once (shared ``DynamicQuantizeLinear``) in both forms.
        """
        node = product.node
        a = node.inputs[0]  # (read now: an earlier rewrite may have replaced the producer's output)
        assert a is not None
        base = node.name or node.op_type
        n = product.n
        qw = self._matrix_weight(product.b, self.scheme(node), product.trans_b, product.alpha)
        self.replaced.extend(product.consumed)
        old_nodes = [node]
        final = node.outputs[0]
        bias = self._constant(f"{base}_bias", product.bias)
        if product.fold_add and bias is None and (found := self._bias_add(node, n)) is not None:
            add, bias = found
            old_nodes.append(add)
            final = add.outputs[0]
            self.replaced.append(bias)
        shared = self.opset >= _MIN_DQL_OPSET and (
            (a, _graph_of(node)) in self._activations
            or sum(1 for use in a.uses() if use.idx == 0 and use.node in rewritable) >= 2
        )
        new_nodes: list[ir.Node] = []
        if self.ms_domain and not shared:
            inputs = [a, qw.data, qw.scale, qw.zero_point, bias]
            fused = self._new_node(MS_DOMAIN, "DynamicQuantizeMatMul", trim_inputs(inputs), base)
            new_nodes.append(fused)
            result = fused.outputs[0]
            self.used_ms_domain = True
        elif self.ms_domain:
            a_q, a_scale, a_zero = self._quantize_activation(a, node)
            inputs = [a_q, qw.data, a_scale, qw.scale, a_zero, qw.zero_point, bias]
            fused = self._new_node(MS_DOMAIN, "MatMulIntegerToFloat", trim_inputs(inputs), base)
            new_nodes.append(fused)
            result = fused.outputs[0]
            self.used_ms_domain = True
        else:
            a_q, a_scale, a_zero = self._quantize_activation(a, node)
            integer = self._new_node(
                "",
                "MatMulInteger",
                [a_q, qw.data, a_zero, qw.zero_point],
                base,
                outputs=(("int32", ir.DataType.INT32),),
            )
            new_nodes.append(integer)
            result = self._dequantize_accumulator(integer.outputs[0], a_scale, qw.scale, base, new_nodes)
            if bias is not None:
                add = self._new_node(
                    "", "Add", [result, bias], base, outputs=(("biased", ir.DataType.FLOAT),)
                )
                new_nodes.append(add)
                result = add.outputs[0]
        extra = self._constant(f"{base}_C", product.add_after)
        if extra is not None:
            add = self._new_node("", "Add", [result, extra], base, outputs=(("plus_c", ir.DataType.FLOAT),))
            new_nodes.append(add)
            result = add.outputs[0]
        _graph_of(node).insert_before(node, new_nodes)
        self._replace(old_nodes, final, result)

    def _dequantize_accumulator(
        self, acc: ir.Value, x_scale: ir.Value, w_scale: ir.Value, base: str, new_nodes: list[ir.Node]
    ) -> ir.Value:
        """``Cast(acc, float) * (x_scale * w_scale)``; the nodes are appended to ``new_nodes``."""
        cast = self._new_node(
            "",
            "Cast",
            [acc],
            base,
            attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
            outputs=(("float", ir.DataType.FLOAT),),
        )
        scale = self._new_node("", "Mul", [x_scale, w_scale], base, outputs=(("scale", ir.DataType.FLOAT),))
        mul = self._new_node(
            "",
            "Mul",
            [cast.outputs[0], scale.outputs[0]],
            base,
            outputs=(("dequantized", ir.DataType.FLOAT),),
        )
        new_nodes.extend([cast, scale, mul])
        return mul.outputs[0]

    # ------------------------------------------------------------------------------------------
    # LSTM

    def lstm_problem(self, node: ir.Node) -> Reason | None:
        """Rule 3's check: why this LSTM cannot become DynamicQuantizeLSTM."""
        inputs = _inputs(node, 8)
        x, w_value, r_value = inputs[:3]
        if attr_int(node, "layout", 0) != 0:
            return Reason("form", "LSTM with layout = 1 (DynamicQuantizeLSTM has no batch-first layout)")
        if (reason := self._check_activation(x)) is not None:
            return Reason(reason.code, reason.message.replace("input A", "input X"))
        w = const_array(w_value)
        r = const_array(r_value)
        if w is None or r is None:
            return Reason("weight_form", "weights W and R must both be constants")
        if w.dtype != np.float32 or r.dtype != np.float32:
            return Reason("weight_form", "weights W and R must be float32")
        if w.ndim != 3 or r.ndim != 3 or w.shape[:2] != r.shape[:2] or r.shape[1] != 4 * r.shape[2]:
            return Reason("weight_form", f"unexpected weight shapes W {list(w.shape)}, R {list(r.shape)}")
        if attr_int(node, "hidden_size", r.shape[2]) != r.shape[2]:
            return Reason("form", "hidden_size does not match R")
        return None

    def lstm(self, node: ir.Node) -> None:
        """Rule 3's rewrite (after :meth:`lstm_problem` found nothing)."""
        inputs = _inputs(node, 8)
        x, w_value, r_value = inputs[:3]
        w, r = const_array(w_value), const_array(r_value)
        assert w is not None and r is not None and w_value is not None and r_value is not None
        hidden = r.shape[2]
        scheme = self.scheme(node)
        base = node.name or "LSTM"
        qw = self._lstm_weight(w_value, w, scheme)
        qr = self._lstm_weight(r_value, r, scheme)
        attributes = [node.attributes[k] for k in _LSTM_ATTRIBUTES if k in node.attributes]
        if "hidden_size" not in node.attributes:
            attributes.append(ir.AttrInt64("hidden_size", hidden))
        new = ir.Node(
            MS_DOMAIN,
            "DynamicQuantizeLSTM",
            [x, qw.data, qr.data, *inputs[3:8], qw.scale, qw.zero_point, qr.scale, qr.zero_point],
            attributes=attributes,
            num_outputs=len(node.outputs),
            name=self.names.fresh(f"{base}_DynamicQuantizeLSTM"),
        )
        _graph_of(node).insert_before(node, new)
        for old, fresh in zip(node.outputs, new.outputs, strict=True):
            fresh.type, fresh.shape = old.type, old.shape
            old.replace_all_uses_with(fresh, replace_graph_outputs=True)
        _graph_of(node).remove(node, safe=True)
        for old, fresh in zip(node.outputs, new.outputs, strict=True):
            _take_name(old, fresh)
        self.used_ms_domain = True

    def _lstm_weight(self, source: ir.Value, w: np.ndarray, scheme: WeightScheme) -> _QuantizedWeight:
        """``[D, 4H, X]`` → transposed ``[D, X, 4H]``, quantized per direction (and per gate column)."""
        key = (source, "LSTM", scheme)
        if key not in self._weights:

            def compute() -> tuple[np.ndarray, QuantParams]:
                transposed = np.ascontiguousarray(np.transpose(w, (0, 2, 1)))
                data, scales, zeros = [], [], []
                for direction in transposed:
                    q, params = quantize_weight(
                        direction, scheme.dtype, scheme.symmetric, 1 if scheme.per_channel else None
                    )
                    data.append(q)
                    scales.append(params.scale)
                    zeros.append(params.zero_point)
                return np.stack(data), QuantParams(np.stack(scales), np.stack(zeros), scheme.dtype, None)

            q, params = remembered(source, key[1:], compute)
            self._weights[key] = self._store(source.name or "weight", q, params)
        self.replaced.append(source)
        return self._weights[key]

    # ------------------------------------------------------------------------------------------
    # Conv

    def conv_problem(self, node: ir.Node) -> Reason | None:
        """Rule 4's check: why this Conv cannot become DynamicQuantizeLinear → ConvInteger."""
        x, w_value, b_value = _inputs(node, 3)
        if (reason := self._check_activation(x)) is not None:
            return Reason(reason.code, reason.message.replace("input A", "input X"))
        w = const_array(w_value)
        if w is None:
            return Reason("weight_form", "weight is not a constant")
        if w.dtype != np.float32 or w.ndim < 3:
            return Reason(
                "weight_form", f"weight must be a float32 tensor of rank >= 3, got {w.dtype} rank {w.ndim}"
            )
        if b_value is not None and const_array(b_value) is None:
            return Reason("bias_form", "bias is not a constant")
        if self.opset < _MIN_DQL_OPSET:
            return Reason(
                "opset", f"opset {self.opset} has no DynamicQuantizeLinear (needs {_MIN_DQL_OPSET})"
            )
        return None

    def conv(self, node: ir.Node) -> None:
        """Rule 4's rewrite (after :meth:`conv_problem` found nothing)."""
        x, w_value, b_value = _inputs(node, 3)
        w = const_array(w_value)
        bias = const_array(b_value) if b_value is not None else None
        assert x is not None and w_value is not None and w is not None
        scheme = self.scheme(node)
        base = node.name or "Conv"
        qw = self._conv_weight(w_value, w, scheme)
        x_q, x_scale, x_zero = self._quantize_activation(x, node)
        new_nodes: list[ir.Node] = []
        integer = self._new_node(
            "",
            "ConvInteger",
            [x_q, qw.data, x_zero, qw.zero_point],
            base,
            attributes=list(node.attributes.values()),
            outputs=(("int32", ir.DataType.INT32),),
        )
        new_nodes.append(integer)
        result = self._dequantize_accumulator(integer.outputs[0], x_scale, qw.scale, base, new_nodes)
        if bias is not None and b_value is not None:
            self.replaced.append(b_value)
            shaped = bias.astype(np.float32).reshape((1, -1) + (1,) * (w.ndim - 2))
            b = self._initializer(f"{base}_bias", shaped)
            add = self._new_node("", "Add", [result, b], base, outputs=(("biased", ir.DataType.FLOAT),))
            new_nodes.append(add)
            result = add.outputs[0]
        _graph_of(node).insert_before(node, new_nodes)
        self._replace([node], node.outputs[0], result)

    def _conv_weight(self, source: ir.Value, w: np.ndarray, scheme: WeightScheme) -> _QuantizedWeight:
        """Symmetric int8 grid shifted to uint8 (zero point 128), or affine uint8 per-tensor."""
        key = (source, "Conv", scheme)
        if key not in self._weights:

            def compute() -> tuple[np.ndarray, QuantParams]:
                if not scheme.symmetric:
                    return quantize_weight(w, "uint8", False, None)
                q, params = quantize_weight(w, "int8", True, 0 if scheme.per_channel else None)
                shifted = (q.astype(np.int16) + 128).astype(np.uint8)
                scale = params.scale
                if scale.ndim:
                    scale = scale.reshape((1, -1) + (1,) * (w.ndim - 2))
                return shifted, QuantParams(scale, np.asarray(128, np.uint8), "uint8", None)

            q, params = remembered(source, key[1:], compute)
            self._weights[key] = self._store(source.name or "weight", q, params)
        self.replaced.append(source)
        return self._weights[key]

    # ------------------------------------------------------------------------------------------
    # Gather (embeddings)

    def gather(self, node: ir.Node) -> None:
        """Rule 5's rewrite: the table stored int8, only the gathered rows dequantized."""
        table = _embedding_table(node)
        assert table is not None
        source, indices = node.inputs[0], node.inputs[1]
        assert source is not None and indices is not None
        scheme = self.scheme(node)
        base = node.name or "Gather"
        key = (source, "Gather", scheme.per_channel)
        if key not in self._weights:

            def compute() -> tuple[np.ndarray, QuantParams]:
                q, params = quantize_weight(table, "int8", True, 0 if scheme.per_channel else None)
                scale = params.scale.reshape(-1, 1) if scheme.per_channel else params.scale
                return q, QuantParams(scale, params.zero_point, "int8", None)

            q, params = remembered(source, key[1:], compute)
            self._weights[key] = self._store(source.name or "table", q, params)
        self.replaced.append(source)
        qt = self._weights[key]
        rows = self._new_node(
            "",
            "Gather",
            [qt.data, indices],
            base,
            attributes=[ir.AttrInt64("axis", 0)],
            outputs=(("rows", ir.DataType.INT8),),
        )
        new_nodes = [rows]
        if scheme.per_channel:
            cast = self._new_node(
                "",
                "Cast",
                [rows.outputs[0]],
                base,
                attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                outputs=(("float", ir.DataType.FLOAT),),
            )
            row_scales = self._new_node(
                "",
                "Gather",
                [qt.scale, indices],
                base,
                attributes=[ir.AttrInt64("axis", 0)],
                outputs=(("row_scales", ir.DataType.FLOAT),),
            )
            mul = self._new_node(
                "",
                "Mul",
                [cast.outputs[0], row_scales.outputs[0]],
                base,
                outputs=(("dequantized", ir.DataType.FLOAT),),
            )
            new_nodes += [cast, row_scales, mul]
            result = mul.outputs[0]
        else:
            dq = self._new_node(
                "",
                "DequantizeLinear",
                [rows.outputs[0], qt.scale, qt.zero_point],
                base,
                outputs=(("dequantized", ir.DataType.FLOAT),),
            )
            new_nodes.append(dq)
            result = dq.outputs[0]
        _graph_of(node).insert_before(node, new_nodes)
        self._replace([node], node.outputs[0], result)
