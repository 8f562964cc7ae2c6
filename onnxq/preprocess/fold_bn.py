"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

Per output channel ``c`` a BatchNormalization computes ``y = s[c] * x + t[c]`` with
``s = scale / sqrt(var + epsilon)`` and ``t = B - mean * s``. When ``x`` comes from a linear producer,
the affine map is absorbed into the producer's weight and bias and the BatchNormalization disappears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Decline, Reason
from onnxq.graph import DEFAULT_DOMAINS, NameScope, default_opset, make_initializer, node_label

__all__ = ["RULES", "FoldBatchNormPass", "FoldBatchNormRule"]

logger = logging.getLogger(__name__)

_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})

Array = npt.NDArray[np.float64]


class _DeclineError(Exception):
    """Raised by a check helper; becomes the :class:`~onnxq.declines.Reason` the rule returns."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(code, message)


@dataclass(frozen=True)
class _Fold:
    """Everything a fold writes, computed before the graph is touched."""

    weight: np.ndarray
    bias: np.ndarray
    bias_index: int
    drop_attributes: tuple[str, ...] = ()


def _onnx_opset(model: ir.Model, node: ir.Node) -> int:
    if node.version is not None:
        return node.version
    return default_opset(model)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant data behind ``value``: an initializer that is not a graph input, or a Constant."""
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def _check_inference_mode(bn: ir.Node, opset: int) -> None:
    if opset < 7:
        raise _DeclineError("opset", f"BatchNormalization opset {opset} < 7 is not supported")
    spatial = bn.attributes.get("spatial")
    if spatial is not None and (spatial.is_ref() or spatial.as_int() != 1):
        raise _DeclineError("spatial", "spatial=0 (per-activation statistics) is not supported")
    training = bn.attributes.get("training_mode")
    if training is not None and (training.is_ref() or training.as_int() != 0):
        raise _DeclineError("training_mode", "training_mode is set")
    extra = [out for out in bn.outputs[1:] if out.name]
    if extra and opset < 14:
        # Before opset 14 the number of outputs selects training mode (batch statistics).
        raise _DeclineError(
            "training_mode", "training-mode outputs present (opset < 14 computes batch statistics)"
        )
    for out in extra:
        if out.uses() or out.is_graph_output():
            raise _DeclineError("training_mode", f"training-mode output '{out.name}' is used")


def _bn_affine(bn: ir.Node) -> tuple[Array, Array]:
    """``(s, t)`` with ``BN(x) = s * x + t`` per channel, in float64."""
    if len(bn.inputs) < 5:
        raise _DeclineError("structure", "BatchNormalization has fewer than 5 inputs")
    arrays = []
    for role, value in zip(("scale", "B", "mean", "var"), bn.inputs[1:5], strict=True):
        array = _const_array(value)
        if array is None:
            raise _DeclineError("not_constant", f"{role} is not a constant")
        arrays.append(array.astype(np.float64))
    scale, shift, mean, var = arrays
    channels = scale.size
    if any(a.shape != (channels,) for a in arrays):
        raise _DeclineError("shape", "scale/B/mean/var are not 1-D tensors of the same length")
    epsilon = bn.attributes.get_float("epsilon", 1e-5)
    s = scale / np.sqrt(var + epsilon)
    return s, shift - mean * s


def _weight_and_bias(producer: ir.Node, bias_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    weight_value = producer.inputs[1] if len(producer.inputs) > 1 else None
    if weight_value is None:
        raise _DeclineError("structure", f"{producer.op_type} has no weight input")
    weight = _const_array(weight_value)
    if weight is None:
        raise _DeclineError("not_constant", f"{producer.op_type} weight is not a constant")
    try:
        dtype = ir.DataType.from_numpy(weight.dtype)
    except TypeError:
        dtype = None
    if dtype not in _FLOAT_TYPES:
        raise _DeclineError("weight_type", f"{producer.op_type} weight has data type {weight.dtype}")
    bias_value = producer.inputs[bias_index] if len(producer.inputs) > bias_index else None
    bias = None
    if bias_value is not None:
        bias = _const_array(bias_value)
        if bias is None:
            raise _DeclineError("not_constant", f"{producer.op_type} bias is not a constant")
    return weight, bias


def _fold_conv(producer: ir.Node, s: Array, t: Array) -> _Fold:
    weight, bias = _weight_and_bias(producer, 2)
    channels = s.size
    if weight.ndim < 3 or weight.shape[0] != channels:
        raise _DeclineError(
            "shape", f"Conv weight shape {weight.shape} does not have {channels} output channels"
        )
    if bias is not None and bias.shape != (channels,):
        raise _DeclineError("shape", f"Conv bias shape {bias.shape} is not ({channels},)")
    w = weight.astype(np.float64) * s.reshape((channels,) + (1,) * (weight.ndim - 1))
    b = np.zeros(channels) if bias is None else bias.astype(np.float64)
    return _Fold(weight=w.astype(weight.dtype), bias=(b * s + t).astype(weight.dtype), bias_index=2)


def _fold_conv_transpose(producer: ir.Node, s: Array, t: Array) -> _Fold:
    weight, bias = _weight_and_bias(producer, 2)
    channels = s.size
    group = producer.attributes.get_int("group", 1)
    if weight.ndim < 3 or group < 1 or weight.shape[0] % group or weight.shape[1] * group != channels:
        raise _DeclineError(
            "shape",
            f"ConvTranspose weight shape {weight.shape} with group={group} "
            f"does not have {channels} output channels",
        )
    if bias is not None and bias.shape != (channels,):
        raise _DeclineError("shape", f"ConvTranspose bias shape {bias.shape} is not ({channels},)")
    # Weight (C, M/g, k...): input channel c in group g feeds output channel o = g * (M/g) + m.
    c_in, m_per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    grouped = weight.astype(np.float64).reshape((group, c_in // group, m_per_group, *kernel))
    factor = s.reshape((group, 1, m_per_group) + (1,) * len(kernel))
    w = (grouped * factor).reshape(weight.shape)
    b = np.zeros(channels) if bias is None else bias.astype(np.float64)
    return _Fold(weight=w.astype(weight.dtype), bias=(b * s + t).astype(weight.dtype), bias_index=2)


def _fold_gemm(producer: ir.Node, s: Array, t: Array) -> _Fold:
    weight, bias = _weight_and_bias(producer, 2)
    channels = s.size
    trans_b = producer.attributes.get_int("transB", 0)
    if weight.ndim != 2:
        raise _DeclineError("shape", f"Gemm weight has rank {weight.ndim}")
    n_out = weight.shape[0] if trans_b else weight.shape[1]
    if n_out != channels:
        raise _DeclineError(
            "shape", f"Gemm output has {n_out} columns, BatchNormalization has {channels} channels"
        )
    alpha = producer.attributes.get_float("alpha", 1.0)
    beta = producer.attributes.get_float("beta", 1.0)
    # Y = alpha * A' B' + beta * C; the BN scales column j of Y by s[j].
    column_scale = s.reshape((channels, 1)) if trans_b else s.reshape((1, channels))
    w = alpha * weight.astype(np.float64) * column_scale
    if bias is None:
        b = t
    else:
        if bias.ndim > 2:
            raise _DeclineError("shape", f"Gemm bias C has rank {bias.ndim}")
        try:
            np.broadcast_shapes(bias.shape, (channels,))
        except ValueError as e:
            raise _DeclineError(
                "shape", f"Gemm bias C shape {bias.shape} does not broadcast to the output"
            ) from e
        # Broadcasting keeps row-dependent C (shape (M, 1) or (M, N)) exact.
        b = beta * bias.astype(np.float64) * s + t
    return _Fold(
        weight=w.astype(weight.dtype),
        bias=b.astype(weight.dtype),
        bias_index=2,
        drop_attributes=("alpha", "beta"),
    )


_FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}


def _drop_if_unused(value: ir.Value | None) -> None:
    """Remove an initializer or Constant node that a fold left without uses."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    owner = value.graph
    if value.is_initializer() and owner is not None and value.name is not None:
        if owner.initializers.get(value.name) is value:
            owner.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


@dataclass
class _Match:
    """A BatchNormalization and, once ``check`` passed, the fold computed for its producer."""

    bn: ir.Node
    ctx: _FoldContext
    producer: ir.Node | None = None
    fold: _Fold | None = None


@dataclass
class _FoldContext:
    model: ir.Model
    names: NameScope
    folded: list[str]


class FoldBatchNormRule(rules.Rule[_Match, _FoldContext]):
    """``BN(P(x, W, b)) -> P(x, W', b')`` for P in Conv, ConvTranspose, Gemm (see the pass)."""

    op_types = ("BatchNormalization",)

    def match(self, node: ir.Node, ctx: _FoldContext) -> _Match | None:
        return _Match(node, ctx)

    def check(self, m: _Match) -> Reason | None:
        try:
            m.producer, m.fold = _check(m.ctx.model, m.bn)
        except _DeclineError as decline:
            return decline.reason
        return None

    def rewrite(self, m: _Match) -> str:
        assert m.producer is not None and m.fold is not None
        _rewrite(m.bn, m.producer, m.fold, m.ctx.names)
        m.ctx.folded.append(node_label(m.bn))
        logger.debug(
            "Folded BatchNorm %s into %s %s", node_label(m.bn), m.producer.op_type, node_label(m.producer)
        )
        return m.producer.op_type


def _check(model: ir.Model, bn: ir.Node) -> tuple[ir.Node, _Fold]:
    """The producer and the fold, or :class:`_DeclineError`; nothing here changes the graph."""
    graph = bn.graph
    _check_inference_mode(bn, _onnx_opset(model, bn))
    x = bn.inputs[0] if bn.inputs else None
    if x is None:
        raise _DeclineError("structure", "input X is missing")
    producer = x.producer()
    if producer is None:
        kind = "a graph input" if x.is_graph_input() else "an initializer or outer-scope value"
        raise _DeclineError("producer", f"input X is {kind}")
    if producer.domain not in DEFAULT_DOMAINS or producer.op_type not in _PRODUCERS:
        raise _DeclineError("producer", f"input X comes from {producer.op_type}, not Conv/ConvTranspose/Gemm")
    if producer.graph is not graph:
        raise _DeclineError("producer", f"{producer.op_type} is in another graph")
    what = producer.op_type.lower()
    if len(x.uses()) != 1:
        raise _DeclineError("shared_output", f"{what} output has {len(x.uses())} uses")
    if x.is_graph_output():
        raise _DeclineError("shared_output", f"{what} output is a graph output")
    s, t = _bn_affine(bn)
    return producer, _FOLDERS[producer.op_type](producer, s, t)


def _rewrite(bn: ir.Node, producer: ir.Node, fold: _Fold, names: NameScope) -> None:
    graph = bn.graph
    assert graph is not None
    x = bn.inputs[0]
    assert x is not None
    suffix = bn.name or "bn"
    old_weight = producer.inputs[1]
    assert old_weight is not None
    old_bias = producer.inputs[fold.bias_index] if len(producer.inputs) > fold.bias_index else None
    weight_base = old_weight.name or f"{producer.name or producer.op_type}_weight"
    bias_base = old_bias.name if old_bias is not None and old_bias.name else f"{weight_base}_bias"
    new_weight = make_initializer(graph, names, f"{weight_base}__fold_{suffix}", fold.weight)
    new_bias = make_initializer(graph, names, f"{bias_base}__fold_{suffix}", fold.bias)
    if len(producer.inputs) <= fold.bias_index:
        producer.resize_inputs(fold.bias_index + 1)
    producer.replace_input_with(1, new_weight)
    producer.replace_input_with(fold.bias_index, new_bias)
    for attribute in fold.drop_attributes:
        producer.attributes.pop(attribute, None)

    y = bn.outputs[0]
    y_name = y.name
    bn_params = list(bn.inputs[1:])
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    if x.type is None and y.type is not None:
        x.type = y.type
    if x.shape is None and y.shape is not None:
        x.shape = y.shape
    if y_name:
        y.name = None
        x.name = y_name
    for value in (old_weight, old_bias, *bn_params):
        _drop_if_unused(value)


#: The pass's rule table.
RULES: tuple[FoldBatchNormRule, ...] = (FoldBatchNormRule(),)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose or Gemm.

    Rewrite rule, applied in the main graph and in every subgraph (If/Loop/Scan bodies)::

        BN(P(x, W, b)) -> P(x, W', b')      P in {Conv, ConvTranspose, Gemm}

    with ``s = scale / sqrt(var + epsilon)`` and ``t = B - mean * s`` per channel:

    - Conv, weight ``(M, C/g, k...)``: ``W' = W * s`` on axis 0, ``b' = b * s + t``.
    - ConvTranspose, weight ``(C, M/g, k...)``: weight ``W[c, m]`` of group ``g`` feeds output
      channel ``g * (M/g) + m`` and is scaled by that channel's ``s``; ``b' = b * s + t``.
    - Gemm (``Y = alpha * A' B' + beta * C``, BN over the output columns): ``alpha`` is folded into
      the weight, whose output-channel axis is 0 with ``transB=1`` and 1 with ``transB=0``;
      ``C' = beta * C * s + t`` (any constant C that broadcasts to the output), then ``alpha`` and
      ``beta`` are dropped (default 1).

    A missing bias is created. Arithmetic is float64; results are stored in the weight's data type.
    New weights and biases are new initializers with unique names derived from the original weight
    and BatchNormalization names, so a weight shared with other nodes is never changed; originals
    left without uses are removed. The BatchNormalization output's uses and graph-output slots are
    rewired to the producer's output, which takes over the BatchNormalization output's name (a graph
    output keeps its name).

    Declines (the graph is left unchanged and a reason is appended to :attr:`declined`) when:
    BatchNormalization is in training mode (``training_mode=1``; opset < 14 with training
    outputs; training outputs in use), has ``spatial=0``, or opset < 7; its input is a graph input,
    an initializer, or comes from another graph or from an op other than Conv/ConvTranspose/Gemm;
    the producer's output has more than one use or is a graph output; the weight, bias, scale, B,
    mean or var is not a constant (an initializer that is not also a graph input, or a Constant
    node); the weight is not float/float16/double/bfloat16; or shapes do not match the channel count.
    Functions are not visited.
    """

    def __init__(self) -> None:
        super().__init__()
        self.declined: list[Decline] = []
        self.folded: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = _FoldContext(model, NameScope(model.graph), [])
        outcome = rules.apply_rules(model, RULES, ctx, stage="fold", opset=default_opset(model))
        self.declined = outcome.declines
        self.folded = ctx.folded
        if self.folded:
            logger.info("Folded %d BatchNormalization nodes", len(self.folded))
        return ir.passes.PassResult(model, modified=bool(self.folded))
