"""Input bias correction: shift each quantized layer's bias by the mean error its input's rounding adds.

Quantizing a layer's input rounds every value to the grid of its per-tensor range. Where a channel's
values spread over many steps the rounding errors average out; where they sit within a step or two
(a channel far narrower than the tensor's widest, a hard-swish output near its offset, a sparse map
after a depthwise Conv) they do not: ``E[Q(x) - x]`` is a fraction of a step with the same sign on
every pixel, and the layer turns it into a constant shift of its output, ``W·E[Q(x) - x]`` per output
channel, that every later layer inherits (the "quantization bias" of Finkelstein et al. 2019, "Fighting
Quantization Bias With Bias"). Subtracting that shift from the layer's bias removes it.

The shift is measured with the float model on the calibration data. Probe nodes after each quantized
input compute ``DequantizeLinear(QuantizeLinear(x)) - x`` with the scale and zero point the QDQ model
will have, averaged inside ONNX Runtime over the positions of each row (a sample; a Gemm's row) and
channel: only those ``[rows × channels]`` means come back, so the run takes the memory of plain
inference, and readers of the same input share them. Each row's output shift is then the layer's
weights applied to its mean error per channel, each kernel tap weighted by the share of output
positions at which it reads inside the map (the taps that read zero padding add nothing): exact for a
channel that errs alike everywhere, the narrow channel this is for. One run over at most
:data:`MAX_BATCHES` batches. A channel's shift is kept where its mean over the rows stands
:data:`SIGNIFICANCE` standard errors clear of zero: a wide channel's rounding errors average to noise
that would only be moved into the bias, while a narrow channel's shift is the same on every sample.

Each layer's shift depends only on its float input and its own weights, so every layer is corrected at
once without compounding, as in :mod:`onnxq.calibrate.bias_correction`; measured on the quantized
model instead, each layer's input would already hold the shifts the layers before it are about to
lose (PP-OCRv4 rec's logits: 12.7 → 10.4 dB SQNR that way, 12.7 → 18.3 dB from the float model).

The correction belongs to the quantized model only: :func:`~onnxq.pipeline.state.write_qdq` applies it
to the copy it rewrites, for the layers whose input that plan quantizes, so a layer kept float keeps
its bias. The shifts are cached per layer and input quantization parameters: the latency guard's and
the accuracy search's variants reuse the ranges, and cost no run.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.calibrate.extremes import AXES_AS_INPUT, remove_nodes
from onnxq.data import Feeds
from onnxq.graph import (
    NameScope,
    attr_int,
    attr_ints,
    attr_str,
    const_array,
    default_opset,
    insert_after_producer,
)
from onnxq.plan.planner import BiasTask, QuantPlan
from onnxq.qmath import QuantParams
from onnxq.runtime.session import SessionError, open_model, run

__all__ = ["MAX_BATCHES", "MIN_ROWS", "SIGNIFICANCE", "InputRounding"]

logger = logging.getLogger(__name__)

#: Calibration batches the measuring run takes at most (a feature map gives each channel's mean from
#: every pixel: a few images suffice).
MAX_BATCHES = 8

#: A channel's shift is applied only where its mean over the rows (samples, or a Gemm's rows) lies this
#: many standard errors from zero: a wide channel's rounding errors average to noise, and subtracting
#: noise would add it; a narrow channel's shift is the same on every sample. With 8 calibration
#: samples, 3 let noise through (YOLO11s-seg's gap-mask IoU on 16 held-out images 0.985 → 0.969; 5:
#: 0.985), and 8 held back real shifts (PP-OCRv4 rec's char accuracy vs float 0.993 at 5, 0.983 at 8).
SIGNIFICANCE = 5.0

#: Fewer rows than this give no standard error worth the name: no correction.
MIN_ROWS = 4

#: ``(node name, input name, scale, zero point, dtype)``: what a layer's shift depends on.
_Key = tuple[str, str, float, int, str]


def _significant(rows: np.ndarray) -> np.ndarray | None:
    """The mean of ``rows`` (``[rows, channels]``: one mean shift per sample or row), per channel.

    Kept where it stands :data:`SIGNIFICANCE` standard errors clear of zero, else 0; ``None`` when
    there are fewer than :data:`MIN_ROWS` rows or a value is not finite.
    """
    if rows.shape[0] < MIN_ROWS or not np.all(np.isfinite(rows)):
        return None
    mean = rows.mean(axis=0)
    error = rows.std(axis=0, ddof=1) / math.sqrt(rows.shape[0])
    return np.where(np.abs(mean) >= SIGNIFICANCE * error, mean, 0.0)


def _key(task: BiasTask, params: QuantParams) -> _Key:
    return (
        task.node.name or "",
        task.activation.name or "",
        float(np.asarray(params.scale).reshape(-1)[0]),
        int(np.asarray(params.zero_point).reshape(-1)[0]),
        params.dtype,
    )


class _Probes:
    """Nodes that measure each quantized input's mean rounding error per row and channel."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.names = NameScope(model.graph)
        self.opset = default_opset(model)
        self.added: list[ir.Node] = []
        self.pending: list[ir.Node] = []
        #: Per input name: (mean error per row and channel, ``[N * C]``; the input's shape) to fetch.
        self.fetch: dict[str, tuple[ir.Value, ir.Value]] = {}

    def _node(self, op_type: str, inputs: Sequence[ir.Value], attributes: Sequence[ir.Attr] = ()) -> ir.Value:
        node = ir.Node(
            "", op_type, list(inputs), list(attributes), name=self.names.fresh(f"rounding_{op_type}")
        )
        node.outputs[0].name = self.names.fresh(f"rounding_{op_type.lower()}")
        self.pending.append(node)
        return node.outputs[0]

    def _constant(self, array: np.ndarray) -> ir.Value:
        return self._node("Constant", [], [ir.AttrTensor("value", ir.tensor(array))])

    def add(self, value: ir.Value, params: QuantParams) -> None:
        """Probe ``DequantizeLinear(QuantizeLinear(x)) - x``, averaged per row and channel.

        The nodes go right after ``x``'s producer, so ``x`` is freed as in plain inference.
        """
        if (value.name or "") in self.fetch:
            return
        self.pending = []
        scale = self._constant(np.asarray(params.scale, np.float32).reshape(()))
        zero_point = self._constant(np.asarray(params.zero_point).reshape(()))
        quantized = self._node("QuantizeLinear", [value, scale, zero_point])
        error = self._node("Sub", [self._node("DequantizeLinear", [quantized, scale, zero_point]), value])
        # [N, C, *spatial] -> [N * C, positions] (a Gemm's [N, C] -> [N * C, 1]), then the mean.
        flat = self._node("Flatten", [error], [ir.AttrInt64("axis", 2)])
        if self.opset >= AXES_AS_INPUT["ReduceMean"]:
            axes = self._constant(np.array([1], np.int64))
            mean = self._node("ReduceMean", [flat, axes], [ir.AttrInt64("keepdims", 0)])
        else:
            mean = self._node("ReduceMean", [flat], [ir.AttrInt64s("axes", [1]), ir.AttrInt64("keepdims", 0)])
        self.fetch[value.name or ""] = (mean, self._node("Shape", [value]))
        insert_after_producer(self.graph, value, self.pending)
        self.added.extend(self.pending)


def _coverage(node: ir.Node, spatial: Sequence[int], kernel: Sequence[int]) -> np.ndarray | None:
    """Per kernel tap, the share of a Conv's output positions at which it reads inside the input.

    For an input of ``spatial`` size (the other taps read zero padding); ``None``: geometry not
    understood.
    """
    rank = len(spatial)
    pads = _conv_pads(node, spatial, kernel)
    if pads is None or len(kernel) != rank:
        return None
    strides = attr_ints(node, "strides", [1] * rank)
    dilations = attr_ints(node, "dilations", [1] * rank)
    coverage = np.ones((), np.float64)
    for axis in range(rank):
        size, k, stride, dilation = spatial[axis], kernel[axis], strides[axis], dilations[axis]
        count = (size + pads[axis][0] + pads[axis][1] - dilation * (k - 1) - 1) // stride + 1
        if count < 1:
            return None
        read = np.arange(k)[:, None] * dilation - pads[axis][0] + stride * np.arange(count)[None, :]
        inside = ((read >= 0) & (read < size)).mean(axis=1)  # [k]
        coverage = np.multiply.outer(coverage, inside)
    return coverage


def _conv_pads(node: ir.Node, spatial: Sequence[int], kernel: Sequence[int]) -> list[tuple[int, int]] | None:
    """Per spatial axis, the zeros a Conv pads before and after (``auto_pad`` resolved); ``None``: unknown."""
    rank = len(spatial)
    strides = attr_ints(node, "strides", [1] * rank)
    dilations = attr_ints(node, "dilations", [1] * rank)
    mode = attr_str(node, "auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        pads = attr_ints(node, "pads", [0] * (2 * rank))
        return [(pads[i], pads[i + rank]) for i in range(rank)]
    if mode == "VALID":
        return [(0, 0)] * rank
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        result = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            result.append((small, large) if mode == "SAME_UPPER" else (large, small))
        return result
    return None


def _layer_matrix(node: ir.Node, weight: np.ndarray, spatial: Sequence[int]) -> np.ndarray | None:
    """What maps a row's mean input error per channel to its mean output shift.

    For an input of ``spatial`` size: a Gemm's ``[K, M]`` weight, a Conv's ``[O, C/g]`` weights summed
    over the kernel, each tap counting for the share of output positions at which it reads the map.
    ``None``: no fit.
    """
    if node.op_type == "Gemm":
        matrix = weight.T if attr_int(node, "transB", 0) else weight
        return matrix if matrix.ndim == 2 else None
    coverage = _coverage(node, spatial, weight.shape[2:])
    if coverage is None or weight.shape[0] % attr_int(node, "group", 1):
        return None
    return np.asarray((weight * coverage).reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2))


def _row_shifts(node: ir.Node, matrix: np.ndarray, errors: np.ndarray) -> np.ndarray | None:
    """``[rows, out channels]``: each row's mean output shift.

    From its mean input error per channel (``errors``, ``[rows, in channels]``) through
    :func:`_layer_matrix`, every position of a channel taken to err alike. ``None`` when the channels
    do not fit.
    """
    if node.op_type == "Gemm":
        if errors.shape[1] != matrix.shape[0]:
            return None
        return np.asarray(errors.astype(matrix.dtype) @ matrix, np.float64)
    groups = attr_int(node, "group", 1)
    out_channels, per_group = matrix.shape
    if errors.shape[1] != per_group * groups:
        return None
    group_of = np.arange(out_channels) // (out_channels // groups)
    per_output = errors.reshape(-1, groups, per_group)[:, group_of, :]  # [rows, O, C/g]
    return np.asarray(np.einsum("oc,roc->ro", matrix, per_output))


@dataclass
class InputRounding:
    """Input bias correction for the QDQ models of one float model (module docstring).

    ``feeds`` and ``providers`` run the float model; the shift of each (layer, input quantization) is
    kept, so a rewrite of the same float model with the same ranges runs nothing. A float model with
    other activations (smoothing, equalization) needs its own instance.
    """

    feeds: Feeds
    providers: tuple[str, ...]
    _shifts: dict[_Key, np.ndarray | None] = field(default_factory=dict)
    #: Float runs made so far.
    runs: int = 0

    @staticmethod
    def targets(model: ir.Model, plan: QuantPlan) -> list[BiasTask]:
        """The bias tasks this correction serves.

        Main-graph Conv, and Gemm without ``transA``, with a constant weight, a bias of their own and a
        quantized input.
        """
        found = []
        for task in plan.biases:
            node = task.node
            if node.graph is not model.graph or not node.name or node.op_type not in ("Conv", "Gemm"):
                continue
            if node.op_type == "Gemm" and attr_int(node, "transA", 0):
                continue
            bias = node.inputs[task.input_index]
            if bias is None or len(bias.uses()) != 1 or task.activation not in plan.group_of:
                continue
            if const_array(node.inputs[task.weight_index]) is None:
                continue
            found.append(task)
        return found

    def correct(self, model: ir.Model, plan: QuantPlan, params: dict[int, QuantParams]) -> int:
        """Subtract each target layer's mean input-rounding shift from its bias in ``model``, in place.

        ``plan`` is ``model``'s plan and ``params`` its groups' quantization parameters. Returns the
        number of biases shifted.
        """
        tasks = self.targets(model, plan)
        task_params = [params[plan.group_of[task.activation].index] for task in tasks]
        keys = [_key(task, p) for task, p in zip(tasks, task_params, strict=True)]
        missing = [i for i, key in enumerate(keys) if key not in self._shifts]
        if missing:
            shifts = self._measure(model, [tasks[i] for i in missing], [task_params[i] for i in missing])
            for i, shift in zip(missing, shifts, strict=True):
                self._shifts[keys[i]] = shift
        shifted = 0
        for task, key in zip(tasks, keys, strict=True):
            shift = self._shifts.get(key)
            value = task.node.inputs[task.input_index]
            bias = const_array(value)
            if shift is None or bias is None or value is None or shift.shape != bias.shape:
                continue
            value.const_value = ir.tensor(
                (bias.astype(np.float64) - shift).astype(bias.dtype), name=value.name
            )
            shifted += 1
        return shifted

    def _measure(
        self, model: ir.Model, tasks: Sequence[BiasTask], params: Sequence[QuantParams]
    ) -> list[np.ndarray | None]:
        """Each task's mean output shift, kept where significant (:func:`_significant`)."""
        return [
            None if rows is None else _significant(rows) for rows in self.row_shifts(model, tasks, params)
        ]

    def row_shifts(
        self, model: ir.Model, tasks: Sequence[BiasTask], params: Sequence[QuantParams]
    ) -> list[np.ndarray | None]:
        """Per task, each row's mean output shift: ``[rows, channels]`` (``None``: no fit).

        One run over at most :data:`MAX_BATCHES` batches (rows: every sample of them; a Gemm's rows).
        """
        probes = _Probes(model)
        try:
            for task, task_params in zip(tasks, params, strict=True):
                probes.add(task.activation, task_params)
            fetched = [value for pair in probes.fetch.values() for value in pair]
            session = open_model(
                model, outputs=fetched, providers=self.providers, prepack=False, priority_order=True
            )
        except SessionError as error:  # a correction is a refinement: never a reason to fail
            logger.info("input bias correction skipped: %s", error)
            return [None] * len(tasks)
        finally:
            remove_nodes(model, probes.added)
        names = [value.name or "" for value in fetched]
        # The weights as stored (float32, no copy: a VGG's classifier holds 120 M of them).
        weights = [np.asarray(const_array(t.node.inputs[t.weight_index])) for t in tasks]
        rows: list[list[np.ndarray] | None] = [[] for _ in tasks]
        matrices: dict[tuple[int, tuple[int, ...]], np.ndarray | None] = {}
        for feed in itertools.islice(self.feeds, MAX_BATCHES):
            try:
                outputs = dict(zip(names, run(session, feed, names), strict=True))
            except SessionError as error:
                logger.info("input bias correction skipped: %s", error)
                return [None] * len(tasks)
            for index, task in enumerate(tasks):
                found = rows[index]
                if found is None:
                    continue
                means, shape = probes.fetch[task.activation.name or ""]
                dims = [int(d) for d in outputs[shape.name or ""]]
                errors = np.asarray(outputs[means.name or ""], np.float64)
                shift = None
                if len(dims) >= 2 and errors.size == dims[0] * dims[1]:
                    key = (index, tuple(dims[2:]))  # one matrix per layer and input size, not per batch
                    if key not in matrices:
                        matrices[key] = _layer_matrix(task.node, weights[index], dims[2:])
                    matrix = matrices[key]
                    if matrix is not None:
                        shift = _row_shifts(task.node, matrix, errors.reshape(dims[0], dims[1]))
                if shift is None:
                    rows[index] = None
                else:
                    found.append(shift)
            self.runs += 1
        return [np.concatenate(found) if found else None for found in rows]
