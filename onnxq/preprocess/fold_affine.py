"""Fold per-channel affine ops and zero padding into the Conv/ConvTranspose/Gemm next to them.

Exporters leave float work around the convolutions that a quantized model would have to run in float
between quantized neighbours: Paddle2ONNX writes PP-LCNet's learnable affine blocks as ``Mul`` and
``Add`` by constants right after a Conv, and torch exports EfficientNet-style "same" padding as an
explicit ``Pad`` before each Conv. Folding them into the Conv is exact in float and leaves the integer
kernel with nothing in between.

Rewrite rules (:data:`RULES`, run by :func:`onnxq.rules.apply_rules` in every graph):

1. ``Mul(P(x), s)`` with ``P`` a Conv, ConvTranspose (``group`` 1) or Gemm whose output has no other
   reader, and ``s`` a constant that scales whole output channels (a scalar, or one value per output
   channel broadcast over the spatial axes) ⇒ ``P`` with ``W' = W·s`` along the output-channel axis and
   ``b' = b·s``.
2. ``Add(P(x), t)`` (either input order, ``Sub(P(x), t)`` too) with ``t`` such a per-channel constant ⇒
   ``P`` with ``b' = b + t`` (a missing bias is created).
3. ``Pad(x, pads, 0)`` in ``constant`` mode whose only reader is a Conv with explicit pads (``auto_pad``
   ``NOTSET``), padding spatial axes only, by non-negative amounts ⇒ the Conv with those pads added to
   its own.

Each rule declines (reason in the report) when a constant does not broadcast per channel, the weight or
bias is not a float constant, or the producer's output is read elsewhere. New weights are new
initializers (a weight shared with another node is never changed); originals left unused are removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Decline, Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    NameScope,
    attr_int,
    attr_str,
    const_array,
    default_opset,
    make_initializer,
)

__all__ = ["RULES", "FoldAffinePass"]

logger = logging.getLogger(__name__)

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class _Context:
    model: ir.Model
    names: NameScope
    opset: int


@dataclass
class _Match:
    node: ir.Node
    ctx: _Context
    producer: ir.Node
    constant: np.ndarray
    #: Per output channel, what the rewrite multiplies (Mul) or adds (Add/Sub) — set by ``check``.
    channel_values: np.ndarray | None = None


def _output_layout(producer: ir.Node) -> tuple[int, int, int] | None:
    """(output channels, output rank, channel axis) of a foldable producer, or ``None``."""
    weight = const_array(producer.inputs[1] if len(producer.inputs) > 1 else None)
    if weight is None or weight.ndim < 2:
        return None
    if producer.op_type == "Conv":
        return int(weight.shape[0]), weight.ndim, 1
    if producer.op_type == "ConvTranspose":
        if attr_int(producer, "group", 1) != 1:
            return None
        return int(weight.shape[1]), weight.ndim, 1
    trans_b = attr_int(producer, "transB", 0)
    return int(weight.shape[0] if trans_b else weight.shape[1]), 2, 1


def _per_channel(constant: np.ndarray, producer: ir.Node) -> np.ndarray | None:
    """``constant`` as one value per output channel of ``producer``, if it broadcasts that way.

    Broadcasting aligns shapes on the right: every axis of the constant must be 1 except the one that
    lands on the output's channel axis, which must hold one value per channel (or the constant is a
    single value).
    """
    layout = _output_layout(producer)
    if layout is None:
        return None
    channels, rank, channel_axis = layout
    if constant.size == 1:
        return np.full(channels, float(constant.reshape(-1)[0]), dtype=np.float64)
    offset = rank - constant.ndim
    if offset < 0 or offset > channel_axis:
        return None
    for index, size in enumerate(constant.shape):
        wanted = channels if index + offset == channel_axis else 1
        if size != wanted:
            return None
    return constant.reshape(channels).astype(np.float64)


def _sole_producer(value: ir.Value | None) -> ir.Node | None:
    """The Conv/ConvTranspose/Gemm that writes ``value`` for this one reader only."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None or producer.op_type not in _PRODUCERS or producer.domain not in DEFAULT_DOMAINS:
        return None
    return producer


class _AffineRule(rules.Rule[_Match, _Context]):
    """Rules 1 and 2: a constant Mul/Add/Sub right after a linear producer."""

    op_types = ("Mul", "Add", "Sub")

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if len(node.inputs) != 2:
            return None
        for index in (0, 1):
            if node.op_type == "Sub" and index == 1:
                break  # Sub(t, P(x)) negates P: not an affine fold of this kind
            producer = _sole_producer(node.inputs[index])
            constant = const_array(node.inputs[1 - index])
            if producer is not None and constant is not None and producer.graph is node.graph:
                return _Match(node, ctx, producer, constant)
        return None

    def check(self, m: _Match) -> Reason | None:
        if not np.issubdtype(m.constant.dtype, np.floating):
            return Reason("type", f"the constant is {m.constant.dtype}, not float")
        values = _per_channel(m.constant, m.producer)
        if values is None:
            return Reason(
                "broadcast", f"a constant of shape {list(m.constant.shape)} is not per output channel"
            )
        weight = const_array(m.producer.inputs[1])
        if weight is None or weight.dtype != np.float32:
            return Reason("weight", "the weight is not a float32 constant")
        bias_value = m.producer.inputs[2] if len(m.producer.inputs) > 2 else None
        if bias_value is not None:
            bias = const_array(bias_value)
            if bias is None or bias.dtype != np.float32 or bias.size != values.size:
                return Reason("bias", "the bias is not a float32 constant of one value per channel")
        if m.producer.op_type == "Gemm" and m.node.op_type != "Mul" and attr_float_beta(m.producer) != 1.0:
            return Reason("gemm", "Gemm has beta != 1")
        m.channel_values = -values if m.node.op_type == "Sub" else values
        return None

    def rewrite(self, m: _Match) -> str:
        assert m.channel_values is not None
        producer, ctx = m.producer, m.ctx
        graph = producer.graph
        assert graph is not None
        weight = const_array(producer.inputs[1])
        assert weight is not None
        channels = m.channel_values.size
        bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        bias = const_array(bias_value) if bias_value is not None else None
        old = [producer.inputs[1], bias_value]
        base = producer.name or producer.op_type
        if m.node.op_type == "Mul":
            new_weight = _scale_output_channels(producer, weight, m.channel_values)
            producer.replace_input_with(
                1, make_initializer(graph, ctx.names, f"{base}_weight_scaled", new_weight)
            )
            if bias is not None:
                scaled = (bias.astype(np.float64) * m.channel_values).astype(np.float32)
                producer.replace_input_with(
                    2, make_initializer(graph, ctx.names, f"{base}_bias_scaled", scaled)
                )
        else:
            current = np.zeros(channels) if bias is None else bias.astype(np.float64)
            if producer.op_type == "Gemm":
                current = current * attr_float_beta(producer)
            shifted = (current + m.channel_values).astype(np.float32)
            if len(producer.inputs) < 3:
                producer.resize_inputs(3)
            producer.replace_input_with(
                2, make_initializer(graph, ctx.names, f"{base}_bias_shifted", shifted)
            )
        out = m.node.outputs[0]
        name = out.name
        kept = producer.outputs[0]
        kept.type = kept.type or out.type
        kept.shape = kept.shape or out.shape
        out.replace_all_uses_with(kept, replace_graph_outputs=True)
        graph.remove(m.node, safe=True)
        if name:
            out.name = None
            producer.outputs[0].name = name
        for value in old:
            _drop_if_unused(value)
        return producer.op_type


def attr_float_beta(node: ir.Node) -> float:
    attr = node.attributes.get("beta")
    return 1.0 if attr is None else float(attr.as_float())


def _scale_output_channels(producer: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if producer.op_type == "Conv":
        shape = (scale.size,) + (1,) * (weight.ndim - 1)
    elif producer.op_type == "ConvTranspose":
        shape = (1, scale.size) + (1,) * (weight.ndim - 2)
    elif attr_int(producer, "transB", 0):
        shape = (scale.size, 1)
    else:
        shape = (1, scale.size)
    scaled: np.ndarray = (weight.astype(np.float64) * scale.reshape(shape)).astype(np.float32)
    return scaled


def _drop_if_unused(value: ir.Value | None) -> None:
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    graph = value.graph
    if value.is_initializer() and isinstance(graph, ir.Graph) and value.name in graph.initializers:
        graph.initializers.pop(value.name)  # type: ignore[arg-type]


@dataclass
class _PadMatch:
    node: ir.Node
    ctx: _Context
    conv: ir.Node
    pads: np.ndarray | None = None


class _PadRule(rules.Rule[_PadMatch, _Context]):
    """Rule 3: a zero ``Pad`` of spatial axes before a Conv becomes the Conv's own padding."""

    op_types = ("Pad",)

    def match(self, node: ir.Node, ctx: _Context) -> _PadMatch | None:
        out = node.outputs[0]
        if out.is_graph_output() or len(out.uses()) != 1:
            return None
        use = next(iter(out.uses()))
        conv = use.node
        if conv.op_type != "Conv" or conv.domain not in DEFAULT_DOMAINS or use.idx != 0:
            return None
        return _PadMatch(node, ctx, conv)

    def check(self, m: _PadMatch) -> Reason | None:
        node, conv = m.node, m.conv
        if attr_str(node, "mode", "constant") != "constant":
            return Reason("pad_mode", f"Pad mode is {attr_str(node, 'mode', 'constant')}, not constant")
        if m.ctx.opset < 11:
            pads = np.asarray(node.attributes["pads"].as_ints()) if "pads" in node.attributes else None
            value = float(node.attributes["value"].as_float()) if "value" in node.attributes else 0.0
        else:
            pads = const_array(node.inputs[1] if len(node.inputs) > 1 else None)
            fill = node.inputs[2] if len(node.inputs) > 2 else None
            fill_array = const_array(fill) if fill is not None else np.zeros(1)
            if fill_array is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
                return Reason("pad_form", "Pad value or axes is not a constant default")
            value = float(fill_array.reshape(-1)[0]) if fill_array.size else 0.0
        if pads is None:
            return Reason("pad_form", "Pad pads are not a constant")
        if value != 0.0:
            return Reason("pad_value", f"Pad value is {value:g}, not 0")
        if attr_str(conv, "auto_pad", "NOTSET") != "NOTSET":
            return Reason("conv_auto_pad", "the Conv uses auto_pad")
        rank = pads.size // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or np.any(pads < 0) or np.any(begin[:2] != 0) or np.any(end[:2] != 0):
            return Reason("pad_axes", "Pad pads batch or channel axes, or crops")
        existing = conv.attributes.get("pads")
        spatial = rank - 2
        conv_pads = (
            np.asarray(existing.as_ints(), dtype=np.int64)
            if existing is not None
            else np.zeros(2 * spatial, np.int64)
        )
        if conv_pads.size != 2 * spatial:
            return Reason("conv_pads", "the Conv's pads do not match the Pad's rank")
        m.pads = conv_pads + np.concatenate([begin[2:], end[2:]]).astype(np.int64)
        return None

    def rewrite(self, m: _PadMatch) -> str:
        assert m.pads is not None
        node, conv = m.node, m.conv
        source = node.inputs[0]
        assert source is not None
        conv.attributes["pads"] = ir.AttrInt64s("pads", [int(p) for p in m.pads])
        conv.replace_input_with(0, source)
        graph = node.graph
        assert graph is not None
        params = [v for v in node.inputs[1:] if v is not None]
        graph.remove(node, safe=True)
        for value in params:
            _drop_if_unused(value)
        return "Conv"


#: The pass's rule table.
RULES: tuple[rules.Rule, ...] = (_AffineRule(), _PadRule())  # type: ignore[type-arg]


class FoldAffinePass(ir.passes.InPlacePass):
    """Fold per-channel Mul/Add/Sub and zero Pad into the neighbouring Conv/Gemm (module docstring).

    After a call, ``folded`` counts the folds by the op type that absorbed them and ``declined`` lists
    the candidates left alone, with the reason.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folded: dict[str, int] = {}
        self.declined: list[Decline] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = _Context(model, NameScope(model.graph), default_opset(model))
        outcome = rules.apply_rules(model, RULES, ctx, stage="fold", opset=ctx.opset)
        self.folded = dict(outcome.rewritten)
        self.declined = outcome.declines
        return ir.passes.PassResult(model, modified=outcome.modified)
