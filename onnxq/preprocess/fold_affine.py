"""Fold per-channel affine ops and zero padding into the Conv/ConvTranspose/Gemm/BatchNorm next to them.

Exporters leave float work around the convolutions that a quantized model would have to run in float
between quantized neighbours: Paddle2ONNX writes PP-LCNet's learnable affine blocks as ``Mul`` and
``Add`` by constants right after a Conv, and torch exports EfficientNet-style "same" padding as an
explicit ``Pad`` before each Conv. Folding them into the Conv is exact in float and leaves the integer
kernel with nothing in between.

Rewrite rules (:data:`RULES`, run by :func:`onnxq.rules.apply_rules` in every graph):

1. ``Mul(P(x), s)`` with ``P`` a Conv, ConvTranspose (``group`` 1) or Gemm whose output has no other
   reader, and ``s`` a constant that scales whole output channels (a scalar, or one value per output
   channel broadcast over the spatial axes) ⇒ ``P`` with ``W' = W·s`` along the output-channel axis and
   ``b' = b·s``. ``P`` may also be a BatchNormalization that no Conv before it could take (after a
   Concat, a MaxPool, a graph input): its scale and bias take ``s`` (:class:`BatchNormAffinePass`, run
   once shapes are inferred: the constant's alignment needs the BatchNorm's rank). Caffe/Caffe2
   conversions write every BatchNorm as BatchNormalization → Mul → Add (the Scale layer): DenseNet-121's
   58 pre-activation BatchNorms ran three float ops on each concatenated feature map.
2. ``Add(P(x), t)`` (either input order, ``Sub(P(x), t)`` too) with ``t`` such a per-channel constant ⇒
   ``P`` with ``b' = b + t`` (a missing bias is created).
3. ``Pad(x, pads, 0)`` in ``constant`` mode whose only reader is a Conv with explicit pads (``auto_pad``
   ``NOTSET``), padding spatial axes only, by non-negative amounts ⇒ the Conv with those pads added to
   its own.
4. The input side: a chain ``y = a·x + b`` of Mul/Div/Add/Sub by constants that are scalars or one value
   per *input* channel (PP-LCNetV3's learnable affine after each activation, torch's ``x * scale``),
   every reader of ``y`` a Conv (data input), a Gemm (``A``, not transposed) or a MatMul with a 2-D
   constant weight ⇒ the readers read ``x`` with ``W' = a·W`` along their input channels and, for ``b``,
   ``bias' = bias + W·b``. An offset folds only into readers without padding (a padded border would see
   ``b`` where the original saw 0) and with a bias input (not MatMul); otherwise the chain becomes one
   ``Add(x, b/a)`` and only ``a`` is folded (when no element of ``a`` is 0).

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
from onnxq.declines import Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    attr_float,
    attr_int,
    attr_str,
    const_array,
    make_initializer,
)

__all__ = ["RULES", "BatchNormAffinePass", "FoldAffinePass"]

logger = logging.getLogger(__name__)

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
_BATCH_NORM = ("BatchNormalization",)


_Context = rules.RewriteContext


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
    if producer.op_type == "BatchNormalization":
        return _batch_norm_layout(producer)
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


def _batch_norm_layout(node: ir.Node) -> tuple[int, int, int] | None:
    """(channels, rank, 1) of an inference-mode BatchNormalization of known rank, or ``None``.

    Not for the training form (extra outputs read, ``training_mode``) or opset < 9's ``spatial = 0``
    (one scale per element, not per channel).
    """
    scale = const_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if scale is None or scale.ndim != 1:
        return None
    if attr_int(node, "training_mode", 0) or not attr_int(node, "spatial", 1):
        return None
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return None
    shape = node.outputs[0].shape or node.inputs[0].shape  # type: ignore[union-attr]
    if shape is None or len(shape) < 2:
        return None
    return int(scale.shape[0]), len(shape), 1


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


def _sole_producer(value: ir.Value | None, producers: tuple[str, ...]) -> ir.Node | None:
    """The node of one of ``producers``' types that writes ``value`` for this one reader only."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None or producer.op_type not in producers or producer.domain not in DEFAULT_DOMAINS:
        return None
    return producer


class _AffineRule(rules.Rule[_Match, _Context]):
    """Rules 1 and 2: a constant Mul/Add/Sub right after a linear producer (or a BatchNorm)."""

    op_types = ("Mul", "Add", "Sub")

    def __init__(self, producers: tuple[str, ...] = _PRODUCERS) -> None:
        self.producers = producers

    def match(self, node: ir.Node, ctx: _Context) -> _Match | None:
        if len(node.inputs) != 2:
            return None
        for index in (0, 1):
            if node.op_type == "Sub" and index == 1:
                break  # Sub(t, P(x)) negates P: not an affine fold of this kind
            producer = _sole_producer(node.inputs[index], self.producers)
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
            what = "the scale" if m.producer.op_type == "BatchNormalization" else "the weight"
            return Reason("weight", f"{what} is not a float32 constant")
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
        constants = [value for value in m.node.inputs if value is not None and value is not kept]
        out.replace_all_uses_with(kept, replace_graph_outputs=True)
        graph.remove(m.node, safe=True)
        if name:
            out.name = None
            producer.outputs[0].name = name
        for value in [*old, *constants]:
            _drop_if_unused(value)
        return producer.op_type


def attr_float_beta(node: ir.Node) -> float:
    attr = node.attributes.get("beta")
    return 1.0 if attr is None else float(attr.as_float())


def _scale_output_channels(producer: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if producer.op_type in ("Conv", "BatchNormalization"):
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


@dataclass
class _InputMatch:
    node: ir.Node
    ctx: _Context
    #: The chain's input and its nodes, earliest first.
    source: ir.Value
    chain: list[ir.Node]
    readers: list[ir.Node]
    channels: int
    #: ``y = scale · x + offset`` per input channel (float64), set by ``check``.
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    fold_offset: bool = True


_LINEAR_READERS = ("Conv", "Gemm", "MatMul")


def _input_channels(reader: ir.Node) -> tuple[int, int] | None:
    """(input channels, data rank or 0 when unknown) of a foldable reader, or ``None``."""
    weight = const_array(reader.inputs[1] if len(reader.inputs) > 1 else None)
    if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
        return None
    if reader.op_type == "Conv":
        return int(weight.shape[1]) * attr_int(reader, "group", 1), weight.ndim
    if reader.op_type == "Gemm":
        if attr_int(reader, "transA", 0):
            return None
        return int(weight.shape[1] if attr_int(reader, "transB", 0) else weight.shape[0]), 2
    if weight.ndim != 2:
        return None
    return int(weight.shape[0]), 0


def _channel_vector(constant: np.ndarray, channels: int, rank: int, axis_from_end: int) -> np.ndarray | None:
    """``constant`` as one value per input channel (channel axis ``axis_from_end`` from the right)."""
    if constant.size == 1:
        return np.full(channels, float(constant.reshape(-1)[0]))
    if rank and constant.ndim > rank:
        return None
    for index, size in enumerate(reversed(constant.shape)):
        wanted = channels if index == axis_from_end else 1
        if size != wanted:
            return None
    if constant.ndim <= axis_from_end:
        return None
    return constant.reshape(channels).astype(np.float64)


def _unpadded(conv: ir.Node) -> bool:
    if attr_str(conv, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    pads = conv.attributes.get("pads")
    return pads is None or not any(pads.as_ints())


def _per_reader_channels(reader: ir.Node, weight: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``vector`` (one value per input channel) laid out to multiply ``reader``'s weight."""
    if reader.op_type == "Conv":
        out_channels, per_group = weight.shape[0], weight.shape[1]
        group = attr_int(reader, "group", 1)
        first = (np.arange(out_channels) // (out_channels // group)) * per_group
        index = first[:, None] + np.arange(per_group)[None, :]
        laid_out: np.ndarray = vector[index].reshape((out_channels, per_group) + (1,) * (weight.ndim - 2))
        return laid_out
    if reader.op_type == "Gemm" and attr_int(reader, "transB", 0):
        return vector.reshape(1, -1)
    return vector.reshape(-1, 1)


class _InputAffineRule(rules.Rule[_InputMatch, _Context]):
    """Rule 4: a constant affine chain whose readers are all Conv/Gemm/MatMul data inputs."""

    op_types = ("Mul", "Div", "Add", "Sub")

    @staticmethod
    def _step(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
        """(the non-constant input, the constant) of an affine-by-constant node."""
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
            return None
        a, b = node.inputs
        ca, cb = const_array(a), const_array(b)
        if cb is not None and ca is None and a is not None:
            return a, cb
        if ca is not None and cb is None and b is not None and node.op_type in ("Mul", "Add", "Sub"):
            return b, ca
        return None

    def match(self, node: ir.Node, ctx: _Context) -> _InputMatch | None:
        out = node.outputs[0]
        if out.is_graph_output() or not out.uses() or self._step(node) is None:
            return None
        readers = []
        for use in out.uses():
            reader = use.node
            if (
                reader.op_type not in _LINEAR_READERS
                or reader.domain not in DEFAULT_DOMAINS
                or use.idx != 0
                or reader.graph is not node.graph
            ):
                return None
            readers.append(reader)
        layouts = [_input_channels(r) for r in readers]
        if any(layout is None for layout in layouts):
            return None
        channels = {layout[0] for layout in layouts if layout is not None}
        if len(channels) != 1:
            return None
        chain = [node]
        source = self._step(node)
        assert source is not None
        while True:
            producer = source[0].producer()
            if (
                producer is None
                or producer.op_type not in self.op_types
                or source[0].is_graph_output()
                or len(source[0].uses()) != 1
                or producer.graph is not node.graph
            ):
                break
            step = self._step(producer)
            if step is None:
                break
            chain.insert(0, producer)
            source = step
        return _InputMatch(node, ctx, source[0], chain, list(dict.fromkeys(readers)), channels.pop())

    def check(self, m: _InputMatch) -> Reason | None:
        readers = m.readers
        rank = max((_input_channels(r) or (0, 0))[1] for r in readers)
        axis_from_end = 0 if all(r.op_type != "Conv" for r in readers) else None
        if axis_from_end is None:
            if any(r.op_type != "Conv" for r in readers) or rank < 3:
                return Reason("readers", "the readers mix Conv with Gemm/MatMul")
            axis_from_end = rank - 2
        # A constant of higher rank than the data would broadcast the data itself: not an affine map.
        shape = m.source.shape
        if shape is not None:
            data_rank = len(shape)
        elif axis_from_end or all(r.op_type == "Gemm" for r in readers):
            data_rank = rank  # a Conv's data has the weight's rank, a Gemm's A is 2-D
        else:
            data_rank = 1  # a MatMul's data of unknown rank: only scalars and [K] constants are safe
        scale, offset = np.ones(m.channels), np.zeros(m.channels)
        for node in m.chain:
            step = self._step(node)
            assert step is not None
            constant = step[1]
            if constant.ndim > data_rank:
                of = f"rank {data_rank}" if shape is not None else "unknown rank"
                return Reason("broadcast", f"a constant of rank {constant.ndim} may widen data of {of}")
            if not np.issubdtype(constant.dtype, np.floating):
                return Reason("type", f"the constant of {node.name} is {constant.dtype}, not float")
            values = _channel_vector(constant, m.channels, rank, axis_from_end)
            if values is None:
                return Reason(
                    "broadcast", f"a constant of shape {list(constant.shape)} is not per input channel"
                )
            first = node.inputs[0] is step[0]
            if node.op_type == "Mul":
                scale, offset = scale * values, offset * values
            elif node.op_type == "Div":
                if np.any(values == 0):
                    return Reason("division", "division by zero")
                scale, offset = scale / values, offset / values
            elif node.op_type == "Add":
                offset = offset + values
            elif first:
                offset = offset - values
            else:
                scale, offset = -scale, values - offset
        m.scale, m.offset = scale, offset
        if not np.any(offset):
            return None
        m.fold_offset = all(
            ((r.op_type == "Conv" and _unpadded(r)) or (r.op_type == "Gemm" and attr_float_beta(r) == 1.0))
            and (len(r.inputs) < 3 or r.inputs[2] is None or const_array(r.inputs[2]) is not None)
            for r in readers
        )
        if m.fold_offset:
            return None
        if np.all(scale == 1.0):
            return Reason("offset", "an offset before a padded Conv or a MatMul cannot be folded exactly")
        if np.any(scale == 0.0):
            return Reason("offset", "a zero scale with an offset before a padded Conv or a MatMul")
        return None

    def rewrite(self, m: _InputMatch) -> str:
        assert m.scale is not None and m.offset is not None
        ctx, graph = m.ctx, m.node.graph
        assert graph is not None
        source = m.source
        if np.any(m.offset) and not m.fold_offset:
            shift = (m.offset / m.scale).astype(np.float32)
            first = m.readers[0]
            spatial = (_input_channels(first) or (0, 2))[1] - 2 if first.op_type == "Conv" else 0
            shape = (m.channels,) + (1,) * spatial
            add = ir.Node(
                "",
                "Add",
                [source, make_initializer(graph, ctx.names, f"{m.node.name}_shift", shift.reshape(shape))],
                name=ctx.names.fresh(f"{m.node.name or 'affine'}_shift"),
            )
            add.outputs[0].name = ctx.names.fresh(f"{source.name or 'x'}_shifted")
            add.outputs[0].type, add.outputs[0].shape = m.node.outputs[0].type, m.node.outputs[0].shape
            graph.insert_before(m.node, add)
            source = add.outputs[0]
        for reader in m.readers:
            weight = const_array(reader.inputs[1])
            assert weight is not None
            base = reader.name or reader.op_type
            factor = _per_reader_channels(reader, weight, m.scale)
            old = [reader.inputs[1], reader.inputs[2] if len(reader.inputs) > 2 else None]
            new_weight = (weight.astype(np.float64) * factor).astype(np.float32)
            reader.replace_input_with(
                1, make_initializer(graph, ctx.names, f"{base}_weight_scaled", new_weight)
            )
            if m.fold_offset and np.any(m.offset):
                self._fold_offset(m, reader, weight, base)
            reader.replace_input_with(0, source)
            for value in old:
                _drop_if_unused(value)
        for node in reversed(m.chain):
            params = [v for v in node.inputs if v is not None and const_array(v) is not None]
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
                for value in params:
                    _drop_if_unused(value)
        return m.readers[0].op_type

    @staticmethod
    def _fold_offset(m: _InputMatch, reader: ir.Node, weight: np.ndarray, base: str) -> None:
        """``bias' = bias + W·b`` for the original weight ``W`` and the chain's offset ``b``."""
        assert m.offset is not None
        graph = reader.graph
        assert graph is not None
        per = _per_reader_channels(reader, weight, m.offset)
        if reader.op_type == "Conv":
            shift = (weight.astype(np.float64) * per).reshape(weight.shape[0], -1).sum(axis=1)
        elif attr_int(reader, "transB", 0):
            shift = (weight.astype(np.float64) * per).sum(axis=1) * attr_float(reader, "alpha", 1.0)
        else:
            shift = (weight.astype(np.float64) * per).sum(axis=0) * attr_float(reader, "alpha", 1.0)
        bias_value = reader.inputs[2] if len(reader.inputs) > 2 else None
        bias = const_array(bias_value) if bias_value is not None else None
        if bias is not None:
            shift = np.broadcast_to(shift, np.broadcast_shapes(shift.shape, bias.shape)) + bias
        if len(reader.inputs) < 3:
            reader.resize_inputs(3)
        reader.replace_input_with(
            2, make_initializer(graph, m.ctx.names, f"{base}_bias_shifted", shift.astype(np.float32))
        )
        _drop_if_unused(bias_value)


#: The pass's rule table (for a Mul/Add/Sub, the output-side fold is asked first).
RULES: tuple[rules.Rule, ...] = (_AffineRule(), _InputAffineRule(), _PadRule())  # type: ignore[type-arg]


class BatchNormAffinePass(rules.RuleTablePass):
    """Rules 1 and 2 into the BatchNormalizations left after the folds (module docstring, rule 1).

    Run after shape inference. ``rewritten`` counts the Mul/Add/Sub folded.
    """

    stage = "fold"

    def __init__(self) -> None:
        super().__init__((_AffineRule(_BATCH_NORM),))


class FoldAffinePass(rules.RuleTablePass):
    """Fold per-channel Mul/Add/Sub and zero Pad into the neighbouring Conv/Gemm (module docstring).

    After a call, ``folded`` counts the folds by the op type that absorbed them and ``declined`` lists
    the candidates left alone, with the reason.
    """

    stage = "fold"

    def __init__(self) -> None:
        super().__init__(RULES)

    @property
    def folded(self) -> dict[str, int]:
        """The folds by the op type that absorbed them."""
        return self.rewritten
