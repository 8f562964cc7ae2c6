"""Bias correction: shift each quantized layer's bias by the mean error its weight rounding adds.

Rounding a layer's weights biases its output: with ``ΔW = W - dequantize(quantize(W))`` the layer
computes ``(W - ΔW)·x + b``, whose error ``ΔW·x`` has a non-zero mean per output channel ``ΔW·E[x]``
(Nagel et al. 2019, "Data-Free Quantization", §4.2). The next layers see a shifted input and the
shift compounds — most in depthwise-separable CNNs, whose depthwise layers have few weights per
channel to average the rounding out. Adding ``ΔW·E[x]`` to the bias removes it.

``E[x]``, the mean input per input channel of each quantized Conv/Gemm (constant bias) and MatMul
followed by a constant-bias Add, is measured on calibration data with the float model (one run over
at most :data:`MAX_BATCHES` batches, the anchors' inputs exposed: the empirical variant of the paper,
which otherwise derives it from BatchNorm statistics); ``ΔW`` is the rounding of the same weight scheme
the quantizer uses. Each layer's correction depends only on its own weights and its float input, so
there is no compounding to undo and one pass suffices (correcting the *measured* output error of
every layer at once over-corrects: each layer's error already holds the shift of the layers before
it). The float model this returns is not the input's function any more: it is the function whose
quantization best matches the input's, and only the quantized model is meant to use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.config import WeightScheme
from onnxq.data import Feeds
from onnxq.graph import attr_int, const_array
from onnxq.qmath import dequantize, quantize_weight
from onnxq.runtime.session import open_model, run

__all__ = ["BiasTarget", "bias_targets", "correct_biases", "restore_biases"]

#: Calibration batches the pass runs at most.
MAX_BATCHES = 16


@dataclass(frozen=True)
class BiasTarget:
    """An anchor whose bias can absorb a correction: the bias lives at ``holder.inputs[index]``."""

    anchor: str
    holder: str
    index: int


def _by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {node.name: node for node in model.graph if node.name}


def bias_targets(model: ir.Model, anchors: Sequence[str]) -> list[BiasTarget]:
    """The named anchors of ``model``'s main graph whose bias is a constant of one value per channel."""
    nodes = _by_name(model)
    found = []
    for name in anchors:
        node = nodes.get(name)
        if node is None:
            continue
        if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2:
            bias = const_array(node.inputs[2])
            if bias is not None and bias.ndim == 1 and len(node.inputs[2].uses()) == 1:  # type: ignore[union-attr]
                found.append(BiasTarget(name, name, 2))
        elif node.op_type == "MatMul":
            uses = list(node.outputs[0].uses())
            add = uses[0].node if len(uses) == 1 else None
            if add is None or add.op_type != "Add" or not add.name:
                continue
            index = 1 - uses[0].idx
            bias = const_array(add.inputs[index])
            if bias is not None and bias.ndim == 1 and len(add.inputs[index].uses()) == 1:  # type: ignore[union-attr]
                found.append(BiasTarget(name, add.name, index))
    return found


def _rounding_error(weight: np.ndarray, node: ir.Node, scheme: WeightScheme) -> np.ndarray:
    """``ΔW`` under the quantizer's weight scheme (per channel on the anchor's output-channel axis)."""
    if node.op_type == "Conv":
        axis = 0
    elif node.op_type == "Gemm":
        axis = 0 if attr_int(node, "transB", 0) else 1
    else:
        axis = weight.ndim - 1
    q, params = quantize_weight(weight, scheme.dtype, scheme.symmetric, axis if scheme.per_channel else None)
    return weight.astype(np.float64) - dequantize(q, params).astype(np.float64)


def _output_shift(node: ir.Node, delta: np.ndarray, mean_input: np.ndarray) -> np.ndarray | None:
    """``ΔW·E[x]`` per output channel; ``None`` when the shapes do not fit."""
    if node.op_type == "Conv":
        groups = attr_int(node, "group", 1)
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if mean_input.shape[0] != per_group * groups or out_channels % groups:
            return None
        summed = delta.reshape(out_channels, per_group, -1).sum(axis=2)  # over the kernel window
        group_of = np.arange(out_channels) // (out_channels // groups)
        inputs = mean_input.reshape(groups, per_group)[group_of]
        return np.asarray((summed * inputs).sum(axis=1))
    if delta.ndim != 2:
        return None
    if node.op_type == "Gemm" and attr_int(node, "transB", 0):
        delta = delta.T
    return np.asarray(mean_input @ delta) if mean_input.shape[0] == delta.shape[0] else None


def _mean_inputs(
    model: ir.Model, nodes: Sequence[ir.Node], feeds: Feeds, providers: Sequence[str]
) -> list[np.ndarray | None]:
    """Per node, the mean of its data input per channel (Conv: axis 1; others: the last axis)."""
    values = [node.inputs[0] for node in nodes]
    session = open_model(
        model, outputs=[v for v in values if v is not None], providers=providers, prepack=False
    )
    names = [v.name or "" for v in values if v is not None]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    axes = {v.name or "": (1 if n.op_type == "Conv" else -1) for n, v in zip(nodes, values, strict=True) if v}
    for index, feed in enumerate(feeds):
        if index >= MAX_BATCHES:
            break
        for name, array in zip(names, run(session, feed, names), strict=True):
            moved = np.moveaxis(np.asarray(array, np.float64), axes[name], 0)
            flat = moved.reshape(moved.shape[0], -1)
            sums[name] = flat.sum(axis=1) + sums.get(name, 0.0)
            counts[name] = counts.get(name, 0) + flat.shape[1]
    return [
        sums[v.name or ""] / counts[v.name or ""] if v is not None and counts.get(v.name or "") else None
        for v in values
    ]


def correct_biases(
    model: ir.Model,
    anchors: Sequence[str],
    scheme: WeightScheme,
    feeds: Feeds,
    providers: Sequence[str],
) -> int:
    """Make ``model``'s anchor biases absorb their weight rounding's mean error, in place.

    Returns the number of biases corrected.
    """
    targets = bias_targets(model, anchors)
    if not targets:
        return 0
    nodes = _by_name(model)
    anchor_nodes = [nodes[t.anchor] for t in targets]
    corrected = 0
    for target, node, mean_input in zip(
        targets, anchor_nodes, _mean_inputs(model, anchor_nodes, feeds, providers), strict=True
    ):
        weight = const_array(node.inputs[1])
        value = nodes[target.holder].inputs[target.index]
        bias = const_array(value)
        if mean_input is None or weight is None or bias is None or value is None:
            continue
        shift = _output_shift(node, _rounding_error(weight, node, scheme), mean_input)
        if shift is None or shift.shape != bias.shape or not np.all(np.isfinite(shift)):
            continue
        value.const_value = ir.tensor((bias.astype(np.float64) + shift).astype(bias.dtype), name=value.name)
        corrected += 1
    return corrected


def restore_biases(model: ir.Model, reference: ir.Model, anchors: Sequence[str]) -> int:
    """Give the named anchors of ``model`` back the biases they have in ``reference``, in place.

    A corrected bias is only right for a layer that is quantized: it cancels that layer's own weight
    rounding. A layer kept float after all (an accuracy target, the latency guard) must compute the
    input's function again, and since each correction depends only on its own layer's weights and
    float input, undoing one leaves the others exact. ``reference`` is the model before
    :func:`correct_biases` (same graph, same names). Returns the number of biases restored.
    """
    nodes = _by_name(model)
    originals = _by_name(reference)
    restored = 0
    for target in bias_targets(reference, anchors):
        holder = nodes.get(target.holder)
        original = originals[target.holder].inputs[target.index]
        if holder is None or original is None or len(holder.inputs) <= target.index:
            continue
        value = holder.inputs[target.index]
        if value is None or value.const_value is None or original.const_value is None:
            continue
        value.const_value = original.const_value
        restored += 1
    return restored
