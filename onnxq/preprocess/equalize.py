"""Cross-layer equalization (CLE) of Conv → activation → Conv chains before calibration.

After Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction".
Why: depthwise-separable CNNs (MobileNet, EfficientNet, PP-LCNet) often come out of training with
output channels of one Conv whose ranges differ by orders of magnitude, the next Conv compensating
with inversely sized input-channel weights. The *activation* between the two is quantized per tensor,
so its small channels fall into a few int8 steps; the next Conv's weights are quantized per output
channel, so its small input-channel columns fall into a few steps too. Both losses go away when the
channels are brought to the same range, and this can be done without changing the float function.

The rescaling: for a pair ``y = Conv2(f(Conv1(x)))`` with ``f`` positively homogeneous per channel
(``f(s·z) = s·f(z)`` for every ``s > 0``), output channel ``i`` of Conv1 (weight row ``W1[i]`` and bias
``b1[i]``) is divided by ``s_i`` and the weights of Conv2 that read input channel ``i`` are multiplied
by ``s_i``; ``y`` is unchanged. With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``,
``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i · r2_i)`` (the paper's optimum of the product
of relative per-channel precisions). Chains of more than two Convs (Conv → depthwise → pointwise) share
their middle Conv between two pairs, so the pairs are equalized in turn, round after round, until the
scales stop moving (the paper's iterative procedure).

Positively homogeneous ``f``, which the pass accepts: none (Conv directly into Conv), ``Relu``,
``LeakyRelu`` and ``PRelu`` (both sides of zero scale alike, whatever the slope), and ``Clip`` whose
lower bound is 0 or absent and whose upper bound is absent (a Relu, or nothing). ``Clip(0, 6)``
(ReLU6) is *not*: scaling channel ``i`` by ``1/s_i`` moves its clipping point from 6 to ``6·s_i`` in
the original units, so the pair is declined rather than changed. Conv2 may be grouped in any way the
weights describe (``group`` 1, depthwise, or general groups: input channel ``i`` lives in group
``i // (C/g)`` at column ``i % (C/g)``); Conv1 may be any Conv, since only its output rows are scaled.

Skipped: channels where either range is 0 (``s = 1``); scales are clamped so that the cumulative
factor of a channel stays in ``[1e-4, 1e4]`` (a near-zero range must not push weights to overflow).
Declined (left as they are, with a :class:`~onnxq.declines.Decline` on :attr:`EqualizePass.declined`):
an op between the Convs that is not positively homogeneous; a Conv1 or activation output read by
another node too or that is a graph output; a weight or bias that is not a float constant, or with
non-finite values; weight shapes that do not match the channel count. Gemm/MatMul chains and
ConvTranspose are not handled.

Exact in float up to rounding; ranges, and so quantization, change. New weights are new initializers
(a weight shared with another node is never changed); originals left unused are removed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx_ir as ir

from onnxq import rules
from onnxq.declines import Decline, Reason
from onnxq.graph import DEFAULT_DOMAINS, NameScope, const_array, default_opset, make_initializer, node_label

__all__ = ["EqualizePass"]

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]

#: Ops between the two Convs that commute with a positive per-channel scale (Clip only as a Relu).
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip"})
_FLOAT_TYPES = (np.float16, np.float32, np.float64)
#: Bounds of a channel's cumulative scale: keeps near-zero ranges from overflowing the other side.
MIN_SCALE, MAX_SCALE = 1e-4, 1e4
#: The iteration stops when no scale of a round moves by more than this (relative) or after MAX_ROUNDS.
TOLERANCE = 1e-6
MAX_ROUNDS = 100


class _DeclineError(Exception):
    """Raised by a check; becomes the :class:`~onnxq.declines.Reason` recorded for the pair."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(code, message)


@dataclass
class _ConvWeights:
    """Working float64 copies of one Conv's weight and bias, shared by the pairs the Conv is part of."""

    node: ir.Node
    weight: Array
    bias: Array | None
    dtype: np.dtype[np.floating]
    changed: bool = False


@dataclass
class _Pair:
    """Conv1 (whose output channels are scaled down) and Conv2 (whose input channels are scaled up)."""

    first: _ConvWeights
    second: _ConvWeights
    #: The cumulative scale of each channel so far (clamped to [MIN_SCALE, MAX_SCALE]).
    scale: Array = field(default_factory=lambda: np.ones(0))

    def _second_grouped(self) -> Array:
        """Conv2's weight as ``(g, O/g, C/g, k)``: input channel ``i`` is ``[i // (C/g), :, i % (C/g)]``."""
        weight = self.second.weight
        group = _group(self.second.node)
        return weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)

    def ranges(self) -> tuple[Array, Array]:
        """``(r1, r2)``: per channel, max |weight| of Conv1's output row and of Conv2's input column."""
        first = np.abs(self.first.weight).reshape(self.first.weight.shape[0], -1).max(axis=1)
        second = np.abs(self._second_grouped()).max(axis=(1, 3)).reshape(-1)
        return first, second

    def step(self) -> float:
        """Equalize once; returns the largest relative change of a scale (0 when balanced)."""
        r1, r2 = self.ranges()
        s = np.ones_like(r1)
        usable = (r1 > 0) & (r2 > 0)
        s[usable] = np.sqrt(r1[usable] / r2[usable])
        target = np.clip(self.scale * s, MIN_SCALE, MAX_SCALE)
        s = target / self.scale
        self.scale = target
        if np.all(s == 1.0):
            return 0.0
        shape1 = (s.size,) + (1,) * (self.first.weight.ndim - 1)
        self.first.weight = self.first.weight / s.reshape(shape1)
        if self.first.bias is not None:
            self.first.bias = self.first.bias / s
        grouped = self._second_grouped()
        factor = s.reshape(grouped.shape[0], 1, grouped.shape[2], 1)
        self.second.weight = (grouped * factor).reshape(self.second.weight.shape)
        self.first.changed = self.second.changed = True
        return float(np.max(np.abs(s - 1.0)))


def _group(conv: ir.Node) -> int:
    attr = conv.attributes.get("group")
    return 1 if attr is None else int(attr.as_int())


def _is_conv(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Conv" and node.domain in DEFAULT_DOMAINS


def _sole_reader(value: ir.Value, reader: ir.Node, what: str) -> None:
    """Decline unless ``reader`` (at input 0) is the only reader of ``value``, which is no graph output."""
    if value.is_graph_output():
        raise _DeclineError("shared_output", f"{what} output '{value.name}' is a graph output")
    uses = value.uses()
    if len(uses) != 1 or any(use.node is not reader or use.idx != 0 for use in uses):
        raise _DeclineError("shared_output", f"{what} output '{value.name}' has {len(uses)} readers")


def _check_between(node: ir.Node, opset: int) -> None:
    """Decline unless ``node`` commutes with a positive per-channel scale (see the module docstring)."""
    if node.op_type not in _HOMOGENEOUS or node.domain not in DEFAULT_DOMAINS:
        raise _DeclineError(
            "not_homogeneous", f"{node.op_type} between the Convs does not commute with per-channel scaling"
        )
    if node.op_type != "Clip":
        return
    if opset < 11:
        low = node.attributes.get("min")
        high = node.attributes.get("max")
        low_value = None if low is None else float(low.as_float())
        high_value = None if high is None else float(high.as_float())
    else:
        bounds: list[float | None] = []
        for index in (1, 2):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                bounds.append(None)
                continue
            array = const_array(value)
            if array is None or array.size != 1:
                raise _DeclineError("not_constant", "Clip bound is not a constant scalar")
            bounds.append(float(array.reshape(-1)[0]))
        low_value, high_value = bounds
    if low_value not in (None, 0.0, -math.inf) or high_value not in (None, math.inf):
        raise _DeclineError(
            "not_homogeneous",
            f"Clip({low_value}, {high_value}) is not scale-invariant (e.g. ReLU6): equalizing would move "
            "its clipping point per channel",
        )


def _weights(conv: ir.Node, role: str) -> _ConvWeights:
    """Float64 copies of ``conv``'s weight and bias, or decline."""
    weight = const_array(conv.inputs[1] if len(conv.inputs) > 1 else None)
    if weight is None:
        raise _DeclineError("not_constant", f"{role} weight is not a constant")
    if weight.dtype not in _FLOAT_TYPES or weight.ndim < 3:
        raise _DeclineError("weight_type", f"{role} weight is {weight.dtype} of rank {weight.ndim}")
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = None
    if bias_value is not None:
        bias = const_array(bias_value)
        if bias is None:
            raise _DeclineError("not_constant", f"{role} bias is not a constant")
        if bias.shape != (weight.shape[0],):
            raise _DeclineError("shape", f"{role} bias shape {bias.shape} is not ({weight.shape[0]},)")
    arrays = [weight] if bias is None else [weight, bias]
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise _DeclineError("not_finite", f"{role} weight or bias holds non-finite values")
    return _ConvWeights(
        conv,
        weight.astype(np.float64),
        None if bias is None else bias.astype(np.float64),
        np.dtype(weight.dtype),
    )


def _match(conv2: ir.Node) -> tuple[ir.Node, ir.Node | None] | None:
    """``(conv1, op between or None)`` when Conv2's data input comes from a Conv, maybe via one node.

    ``None`` when the pattern is not there at all (nothing to record).
    """
    x = conv2.inputs[0] if conv2.inputs else None
    producer = x.producer() if x is not None else None
    if producer is None or producer.graph is not conv2.graph:
        return None
    if _is_conv(producer):
        return producer, None
    source = producer.inputs[0] if producer.inputs else None
    conv1 = source.producer() if source is not None else None
    if conv1 is None or not _is_conv(conv1) or conv1.graph is not conv2.graph:
        return None
    return conv1, producer


def _check(
    conv1: ir.Node, between: ir.Node | None, conv2: ir.Node, opset: int, weights: dict[int, _ConvWeights]
) -> _Pair:
    """The pair, with both Convs' working weights (shared through ``weights``), or decline."""
    if between is None:
        _sole_reader(conv1.outputs[0], conv2, "Conv1")
    else:
        _check_between(between, opset)
        _sole_reader(conv1.outputs[0], between, "Conv1")
        if len(between.outputs) != 1:
            raise _DeclineError("structure", f"{between.op_type} has {len(between.outputs)} outputs")
        _sole_reader(between.outputs[0], conv2, between.op_type)
    found = []
    for conv, role in ((conv1, "Conv1"), (conv2, "Conv2")):
        known = weights.get(id(conv))
        found.append(known if known is not None else _weights(conv, role))
    first, second = found
    channels = first.weight.shape[0]
    group = _group(conv2)
    w2 = second.weight.shape
    if group < 1 or w2[0] % group or w2[1] * group != channels:
        raise _DeclineError(
            "shape", f"Conv2 weight {w2} with group={group} does not read the {channels} channels of Conv1"
        )
    for conv_weights in found:
        weights[id(conv_weights.node)] = conv_weights
    return _Pair(first, second, np.ones(channels))


def _drop_if_unused(value: ir.Value | None) -> None:
    """Remove an initializer the rewrite left without readers."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    owner = value.graph
    if (
        value.is_initializer()
        and owner is not None
        and value.name is not None
        and owner.initializers.get(value.name) is value
    ):
        owner.initializers.pop(value.name)


def _write(conv: _ConvWeights, names: NameScope) -> None:
    """Store the equalized weight (and bias) as new initializers of the Conv's graph."""
    node, graph = conv.node, conv.node.graph
    assert graph is not None
    base = node.name or "Conv"
    for index, array in ((1, conv.weight), (2, conv.bias)):
        if array is None:
            continue
        old = node.inputs[index]
        stem = old.name if old is not None and old.name else f"{base}_{'weight' if index == 1 else 'bias'}"
        node.replace_input_with(
            index, make_initializer(graph, names, f"{stem}_equalized", array.astype(conv.dtype))
        )
        _drop_if_unused(old)


class EqualizePass(ir.passes.InPlacePass):
    """Cross-layer equalization of Conv → (Relu | LeakyRelu | PRelu | none) → Conv pairs (module docstring).

    After a call, :attr:`equalized` names the pairs rescaled (``"conv1 -> conv2"``), :attr:`rounds`
    says how many rounds the iteration ran, and :attr:`declined` lists the Conv → op → Conv chains left
    alone, with the reason (stage ``fold``; they are not forwarded to the report, where most would be
    residual blocks whose Conv output is read twice).
    """

    def __init__(self) -> None:
        super().__init__()
        self.equalized: list[str] = []
        self.declined: list[Decline] = []
        self.rounds = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = default_opset(model)
        weights: dict[int, _ConvWeights] = {}
        pairs: list[_Pair] = []
        self.equalized, self.declined, self.rounds = [], [], 0
        for graph in rules.graphs_of(model):
            for conv2 in graph:
                if not _is_conv(conv2):
                    continue
                found = _match(conv2)
                if found is None:
                    continue
                conv1, between = found
                try:
                    pairs.append(_check(conv1, between, conv2, opset, weights))
                except _DeclineError as decline:
                    self.declined.append(Decline.of("fold", node_label(conv2), decline.reason))
                    logger.debug("Not equalized: %s: %s", node_label(conv2), decline.reason.message)
        while pairs and self.rounds < MAX_ROUNDS:
            self.rounds += 1
            if max(pair.step() for pair in pairs) < TOLERANCE:
                break
        names = NameScope(model.graph)
        for conv in weights.values():
            if conv.changed:
                _write(conv, names)
        self.equalized = [
            f"{node_label(p.first.node)} -> {node_label(p.second.node)}"
            for p in pairs
            if np.any(p.scale != 1.0)
        ]
        if self.equalized:
            logger.info("Equalized %d Conv pairs in %d rounds", len(self.equalized), self.rounds)
        return ir.passes.PassResult(model, modified=bool(self.equalized))
