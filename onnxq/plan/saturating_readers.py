"""How much of a tensor's range its readers can tell apart: saturating readers narrow it, exactly.

A calibrated range covers every value a tensor took, but a reader that saturates cannot tell some of
them apart: ``Relu`` maps every negative value to 0, ``Clip(lo, hi)`` everything below ``lo`` to
``lo``, hard-swish (``x · Clip(x + 3, 0, 6) / 6``, or the ``HardSwish`` op) everything below −3 to 0,
``HardSigmoid`` everything outside ``[−β/α, (1 − β)/α]`` to 0 or 1, ``Max(x, c)`` everything below ``c``
to ``c``; ``Sigmoid``, ``Tanh`` and SiLU (``x · Sigmoid(x)``) everything beyond ±16 (below −16 for SiLU)
to within 2e-6 of their limits, far below a step of an 8-bit grid. When *every* reader of a tensor
saturates below some ``L``, clipping the tensor at ``L`` changes no reader's output, so its quantized
range need not reach below ``L``: the steps it saves go to the values that matter. Measured on the
Paddle exports' hard-swish CNNs, whose BatchNorm outputs run far below −3 (the CDLA layout
detector's backbone: ``[−75, 79]`` feeding a hard-swish, half of the uint8 grid spent on values the
hard-swish turns into 0).

This is the same reasoning that absorbs a ``Relu`` into its producer's range, applied to a tensor
whose readers are several, or are not absorbable (the hard-swish's ``Add`` and ``Mul`` both read
``x``), and followed through the ops that only move values (a ``Reshape``, a ``MaxPool``: clipping
commutes with them) and through shifts and positive scalings by constants (``x + 3`` before its
``Clip``).

:func:`reader_bounds` gives the interval ``[L, U]`` outside which no reader of a value can tell values
apart (``(-inf, inf)`` when some reader can: a Conv, a graph output, an op not known here);
:func:`narrowed_range` applies it to a calibrated range, :func:`joint_range` to the members of an
activation group, with a margin of a step at a cut end, so that the quantized grid's end (the range's
end rounded to a step) still lies in the saturated part. Exact: every reader computes what it did
(within 2e-6 for the sigmoid-like ones, whose tails no reader of a relative error, a ``Log``, reads).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, clip_bounds, float_scalar

__all__ = ["MARGIN_STEPS", "ORDER_KEEPING_OPS", "joint_range", "narrowed_range", "reader_bounds"]

Bounds = tuple[float, float]

_ALL: Bounds = (-math.inf, math.inf)

#: Ops whose data output holds only (some of) the data input's values, or the largest of some: a clip
#: of the input is the same clip of the output, so the input's readers-bounds are the output's.
ORDER_KEEPING_OPS = frozenset(
    {
        "Concat",
        "DepthToSpace",
        "Flatten",
        "GlobalMaxPool",
        "Identity",
        "MaxPool",
        "ReduceMax",
        "ReduceMin",
        "Reshape",
        "Slice",
        "SpaceToDepth",
        "Split",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)

#: Reader chains followed at most this deep (a shift, a scaling, a move, then the saturating op).
_MAX_DEPTH = 6


def _scalar(value: ir.Value | None) -> float | None:
    """A finite constant single-element float of any rank, else ``None``."""
    number = float_scalar(value, any_rank=True)
    return number if number is not None and math.isfinite(number) else None


def _gate_of(mul: ir.Node, value: ir.Value) -> float | None:
    """``c`` when ``mul`` is ``value · Clip(value + c, 0, h)`` (hard-swish's product), else ``None``.

    The product is 0 wherever ``value ≤ −c``: the gate is 0 there, whatever ``value`` is.
    """
    if len(mul.inputs) != 2:
        return None
    other = mul.inputs[1] if mul.inputs[0] is value else mul.inputs[0]
    clip = other.producer() if other is not None else None
    if clip is None or clip.op_type != "Clip" or clip.domain not in DEFAULT_DOMAINS:
        return None
    bounds = clip_bounds(clip)
    add = clip.inputs[0].producer() if clip.inputs and clip.inputs[0] is not None else None
    if bounds is None or bounds[0] != 0.0 or add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    if add.inputs[0] is value:
        shift = _scalar(add.inputs[1])
    elif add.inputs[1] is value:
        shift = _scalar(add.inputs[0])
    else:
        return None
    return shift


#: Beyond ±16 a sigmoid is within 1.2e-7 of 0 or 1, a tanh within 3e-14 of ±1, and ``x·sigmoid(x)``
#: within 2e-6 of 0 below −16: far below a step of any 8-bit grid their outputs are read on, so they
#: count as saturated there (YOLOv8n's Convs before their SiLUs reach −166).
SIGMOID_FLAT = 16.0


#: Readers that tell tiny values apart by their ratio: a sigmoid's tail is not flat for them.
_RELATIVE_READERS = frozenset({"Log", "Div", "Reciprocal", "Pow"})


def _is_silu(mul: ir.Node, value: ir.Value) -> bool:
    """Whether ``mul`` is ``value · Sigmoid(value)`` (SiLU / Swish)."""
    if len(mul.inputs) != 2 or mul.inputs[0] is mul.inputs[1]:
        return False
    other = mul.inputs[1] if mul.inputs[0] is value else mul.inputs[0]
    sigmoid = other.producer() if other is not None else None
    return (
        sigmoid is not None
        and sigmoid.op_type == "Sigmoid"
        and sigmoid.domain in DEFAULT_DOMAINS
        and sigmoid.inputs[0] is value
    )


def _union(bounds: Iterable[Bounds]) -> Bounds:
    """The smallest interval outside which *every* one of the readers saturates."""
    low, high = math.inf, -math.inf
    for lo, hi in bounds:
        low, high = min(low, lo), max(high, hi)
    return (low, high) if low <= high else _ALL


def _through(node: ir.Node, index: int, depth: int) -> Bounds:
    """The interval outside which ``node`` cannot tell apart the values of its input ``index``."""
    if node.domain not in DEFAULT_DOMAINS:
        return _ALL
    op = node.op_type
    value = node.inputs[index]
    if op == "Relu" and index == 0:
        return (0.0, math.inf)
    if op == "Clip" and index == 0:
        bounds = clip_bounds(node)  # (a NaN bound compares false: no bounds)
        return bounds if bounds is not None and bounds[0] <= bounds[1] else _ALL
    if op == "HardSwish":
        return (-3.0, math.inf)
    if op in ("Sigmoid", "Tanh") and index == 0:
        # 1e-7 instead of 2e-9 is nothing on any grid, but a Log (log-sigmoid) would read -16 for -20.
        if any(use.node.op_type in _RELATIVE_READERS for use in node.outputs[0].uses()):
            return _ALL
        return (-SIGMOID_FLAT, SIGMOID_FLAT)
    if op == "Mul" and value is not None and _is_silu(node, value):
        return (-SIGMOID_FLAT, math.inf)
    if op == "HardSigmoid":
        alpha = node.attributes.get("alpha")
        beta = node.attributes.get("beta")
        a = alpha.as_float() if alpha is not None else 0.2
        b = beta.as_float() if beta is not None else 0.5
        return (-b / a, (1.0 - b) / a) if a > 0 else _ALL
    if op in ("Max", "Min") and len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1]:
        bound = _scalar(node.inputs[1 - index])  # Relu written as Max(x, 0), a clamp as Min(x, c)
        if bound is not None:
            return (bound, math.inf) if op == "Max" else (-math.inf, bound)
    if op == "Mul" and value is not None:
        shift = _gate_of(node, value)
        if shift is not None:
            return (-shift, math.inf)
    if depth >= _MAX_DEPTH or len(node.outputs) == 0:
        return _ALL
    if op in ORDER_KEEPING_OPS and index == 0:
        return _union(reader_bounds(output, depth + 1) for output in node.outputs)
    if op == "Concat":
        return reader_bounds(node.outputs[0], depth + 1)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        constant = _scalar(node.inputs[1 - index])
        if constant is None or node.inputs[0] is node.inputs[1]:
            return _ALL
        lo, hi = reader_bounds(node.outputs[0], depth + 1)
        if (lo, hi) == _ALL:
            return _ALL
        if op == "Add":
            return (lo - constant, hi - constant)
        if op == "Sub" and index == 0:
            return (lo + constant, hi + constant)
        if op == "Mul" and constant > 0:
            return (lo / constant, hi / constant)
        if op == "Div" and index == 0 and constant > 0:
            return (lo * constant, hi * constant)
    return _ALL


def reader_bounds(value: ir.Value, depth: int = 0) -> Bounds:
    """The interval outside which no reader of ``value`` can tell its values apart (module doc).

    ``(-inf, inf)`` when ``value`` is a graph output, is read by a subgraph, or has a reader not known
    to saturate.
    """
    graph = value.graph
    if value.is_graph_output():
        return _ALL
    uses = list(value.uses())
    if not uses:
        return _ALL
    found = []
    for use in uses:
        node, index = use.node, use.idx
        if node.graph is not graph:  # read inside a subgraph body: not followed
            return _ALL
        bounds = _through(node, index, depth)
        if bounds == _ALL:
            return _ALL
        found.append(bounds)
    return _union(found)


def narrowed_range(value: ir.Value, low: float, high: float) -> tuple[float, float]:
    """``[low, high]``, the range of ``value``'s values, clipped to what its readers can tell apart.

    A range wholly beyond one bound (every value saturated) becomes that bound: the readers see only
    it.
    """
    bound_low, bound_high = reader_bounds(value)
    if high < bound_low:
        return bound_low, bound_low
    if low > bound_high:
        return bound_high, bound_high
    return max(low, bound_low), min(high, bound_high)


#: Steps of the joint range a cut end is moved beyond its bound (see :func:`joint_range`).
MARGIN_STEPS = 1.0

#: Steps in the narrowest activation type's range (uint8/int8): the margin's unit.
_STEPS = 255.0


def joint_range(ranges: Iterable[tuple[ir.Value, float, float]]) -> tuple[float, float]:
    """One range for values that share a scale, each ``(value, low, high)`` narrowed by its readers.

    Each member is narrowed by its own readers (:func:`narrowed_range`) before the ranges are joined:
    the shared scale must serve each member's readers, not each member's every value. An end of the
    joint range that a cut set (not 0, which every grid holds exactly) moves one step beyond the
    bound: the quantized grid's end is the bound rounded to a step, and an end inside the bound (a
    hard-swish input clipped to −2.99 instead of −3) would turn every saturated value into one just
    short of saturation, a constant the next layer sums over whole channels. ``(inf, -inf)`` when
    there is nothing to join.
    """
    low, high = math.inf, -math.inf
    cut_low = cut_high = False
    for value, raw_low, raw_high in ranges:
        lo, hi = narrowed_range(value, raw_low, raw_high)
        if lo < low or (lo == low and lo > raw_low):
            low, cut_low = lo, lo > raw_low
        if hi > high or (hi == high and hi < raw_high):
            high, cut_high = hi, hi < raw_high
    if low > high:
        return low, high
    step = MARGIN_STEPS * (max(high, 0.0) - min(low, 0.0)) / (_STEPS - 2.0 * MARGIN_STEPS)
    if cut_low and low != 0.0:
        low -= step
    if cut_high and high != 0.0:
        high += step
    return low, high
