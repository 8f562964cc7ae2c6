"""Per-layer numeric suite: every quantized tensor of a QDQ model against its float model.

A *quantized tensor* is

- an **activation**: the float input ``X`` of a ``QuantizeLinear`` (not a constant). Its float values
  come from running the float model; its quantized values are the output of the ``DequantizeLinear``
  that reads ``Q(X)`` in the quantized model (or, when no ``DequantizeLinear`` reads it, as in QOperator
  form, ``Q(X)`` dequantized here with the ``QuantizeLinear``'s parameters);
- a **weight**: the constant integer input of a ``DequantizeLinear`` (weights, int32 biases, constant
  tables). Its float values are the float model's weight; its quantized values are the integers
  dequantized here.

Both models run in ONNX Runtime at ``ORT_DISABLE_ALL`` (graph semantics, no QDQ fusion) on the same
feeds, with the needed tensors as extra graph outputs of in-memory copies. Statistics are sums updated
feed by feed, so memory is bounded by one feed's tensors, never by the number of samples.

Matching the two models:

- an activation ``X`` is looked up in the float model by name. A quantized graph output is renamed on
  the producer side (onnxq: ``X_float``; onnxruntime: ``X_QuantizeLinear_Input``) while the
  ``DequantizeLinear`` output takes the output's name, so the graph output's name is tried next, then
  the name without those suffixes. Tensors found under none of them are skipped with a note.
- a weight read by node ``N`` at input ``i`` is the float model's input ``i`` of the node named ``N``.
  Failing that, the initializer named like the integer weight without its ``_quantized`` suffix (or
  like the ``DequantizeLinear`` output). The lookup is done in the float model as given and in a copy
  preprocessed as onnxq does before quantizing (nodes named, BatchNormalization folded, constants
  folded); when the two give different weights, the one closer to the dequantized weight is taken (a
  folded weight matches onnxq's output, an unfolded one the output of a tool that does not fold).
  Without a match the weight's SQNR is ``None``.

Outlier smoothing (on by default in onnxq) moves scale between a tensor and the weights around it:
the quantized model's activation is the float one divided per channel by ``s``, its readers' weights
are multiplied per input channel by ``s`` and its producer's divided per output channel. Compared as
they are, such tensors would read 15 dB where their rounding costs 40. So in a model whose
``onnxq.smoothed`` metadata names smoothed tensors, those tensors, and the weights (all positive
factors: a channel rounded to zero is no rescale), are also compared after the per-channel factor that
best maps the float values onto the quantized ones (least squares, along the channel axis of a feature
map or the last axis of a product's input; a weight's first two axes in turn; a Conv's bias by its
weight's output factors), and that comparison is reported, flagged ``rescaled``, when it reads at
least :data:`RESCALE_GAIN_DB` better: rounding has no per-channel gain for the fit to absorb, so the
figure left is the rounding's.

Definitions: the representable range of a tensor is ``[(qmin - zp) * s, (qmax - zp) * s]`` over the
full range of its integer type (what ``QuantizeLinear`` saturates to). A float value is *clipped* when it
lies more than half a step (``s / 2``) outside that range, i.e. when saturation, not rounding, sets
its error. SQNR is ``10·log10(Σ x² / Σ (x − x̂)²)`` over all elements of all feeds (see
:mod:`onnxq.validate.metrics`). A float value beyond what every reader of its tensor in the float model
can tell apart (a hard-swish's input below −3, a Relu's below 0: :mod:`onnxq.plan.saturating_readers`)
is compared as that bound, in both models: onnxq's ranges leave such values out, and no reader sees the
difference. The observed min/max stay the raw ones.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from tabulate import tabulate

from onnxq.data import Feeds
from onnxq.errors import OnnxqError
from onnxq.graph import DEFAULT_DOMAINS, const_array
from onnxq.load.files import load_model
from onnxq.load.versions import normalize_versions
from onnxq.plan.saturating_readers import reader_bounds
from onnxq.runtime.session import open_model, run
from onnxq.validate.metrics import OutputStats, sqnr_db

__all__ = ["LayerReport", "LayerStats", "format_layers", "inspect_layers", "layers_to_dict"]

logger = logging.getLogger(__name__)


#: Integer types Q/DQ use, with their full ranges (what QuantizeLinear saturates to).
_INT_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT2: (0, 3),
    ir.DataType.INT2: (-2, 1),
}

_OUTPUT_SUFFIXES = re.compile(r"(_float(_\d+)?|_QuantizeLinear_Input)$")
_WEIGHT_SUFFIXES = re.compile(r"(_quantized(_\d+)?|_DequantizeLinear_Output)$")


@dataclass
class LayerStats:
    """One quantized tensor: its quantization parameters and how far it is from the float model.

    ``scale`` is the tensor's scale; for per-channel (or block-wise) parameters it is the largest one
    (the coarsest grid) and ``scale_min`` the smallest, with ``axis`` set. ``zero_point`` is ``None``
    when channels have different zero points. ``range`` is the representable float range (per channel:
    the widest channel's). Activation rows have ``observed_min/max``, ``clipped`` (share of float
    values saturated), ``activation_sqnr_db``, ``cosine`` (mean per feed) and ``max_abs_error``; weight
    rows have ``weight_sqnr_db`` (``None`` when the float weight was not found) and ``max_abs_error``.
    """

    tensor: str
    kind: str
    node: str
    dtype: str
    scale: float
    scale_min: float
    zero_point: int | None
    axis: int | None
    range: tuple[float, float]
    observed_min: float | None = None
    observed_max: float | None = None
    clipped: float | None = None
    weight_sqnr_db: float | None = None
    activation_sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    #: The tensor's name in the quantized model (``X_float``, ``w_quantized``, ...).
    quantized_tensor: str = ""
    #: Feeds the activation statistics were accumulated over (0 for weights).
    samples: int = 0
    #: Compared after the best per-channel factor (outlier smoothing rescaled it; module docstring).
    rescaled: bool = False

    @property
    def sqnr_db(self) -> float | None:
        """The row's own metric: activation SQNR for activations, weight SQNR for weights."""
        return self.activation_sqnr_db if self.kind == "activation" else self.weight_sqnr_db


class LayerReport(list[LayerStats]):
    """The rows of :func:`inspect_layers`, worst first, with ``notes`` on the tensors not inspected."""

    def __init__(self, rows: Iterable[LayerStats] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(rows)
        self.notes: list[str] = list(notes)


# ---------------------------------------------------------------------------------------------------
# Quantization parameters


@dataclass(frozen=True)
class _Params:
    scale: np.ndarray  # float32: scalar, 1-D per axis, or N-D per block
    zero_point: np.ndarray  # int64, same shape as scale
    dtype: ir.DataType
    axis: int | None  # normalized against the data rank; None per tensor
    block_size: int

    @property
    def qmin(self) -> int:
        return _INT_RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return _INT_RANGES[self.dtype][1]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Representable float range per scale entry, in float64."""
        scale = self.scale.astype(np.float64)
        zp = self.zero_point.astype(np.float64)
        return (self.qmin - zp) * scale, (self.qmax - zp) * scale

    def expand(self, array: np.ndarray, rank: int, length: int | None) -> np.ndarray:
        """``array`` (shaped like the scale) broadcastable against data of ``rank`` dimensions."""
        if self.axis is None or array.ndim == 0:
            return array
        if self.block_size > 0:
            expanded = np.repeat(array, self.block_size, axis=self.axis)
            return expanded if length is None else np.take(expanded, np.arange(length), axis=self.axis)
        shape = [1] * rank
        shape[self.axis] = array.shape[0]
        return array.reshape(shape)


def _params(node: ir.Node, data_rank: int | None, data_dtype: ir.DataType | None) -> _Params | str:
    """The node's scale/zero point/type, or the reason they cannot be read."""
    scale = const_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if scale is None:
        return "its scale is not a constant"
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero_point = const_array(zp_value)
    if zp_value is not None and zero_point is None:
        return "its zero point is not a constant"
    if node.op_type == "DequantizeLinear":
        dtype = data_dtype
    elif zp_value is not None and zp_value.dtype is not None:
        dtype = zp_value.dtype
    else:
        attr = node.attributes.get("output_dtype")
        dtype = ir.DataType(attr.as_int()) if attr is not None and attr.as_int() else ir.DataType.UINT8
    if dtype not in _INT_RANGES:
        return f"its quantized type {dtype.name if dtype is not None else 'unknown'} is not an integer type"
    scale = np.asarray(scale, np.float32)
    zp = np.zeros(scale.shape, np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    if zp.shape != scale.shape:
        zp = np.broadcast_to(zp, scale.shape).copy()
    axis: int | None = None
    block_attr = node.attributes.get("block_size")
    block_size = int(block_attr.as_int()) if block_attr is not None else 0
    if scale.ndim >= 1 and scale.size >= 1 and not (scale.ndim == 1 and scale.size == 1 and block_size == 0):
        axis_attr = node.attributes.get("axis")
        axis = int(axis_attr.as_int()) if axis_attr is not None else 1
        if data_rank is not None and data_rank > 0:
            axis %= data_rank
    elif scale.ndim == 1:  # a one-element 1-D scale acts per tensor
        scale, zp = scale.reshape(()), zp.reshape(())
    return _Params(scale=scale, zero_point=zp, dtype=dtype, axis=axis, block_size=block_size)


def _dequantize(q: np.ndarray, params: _Params) -> np.ndarray:
    """``DequantizeLinear`` in numpy, computed in float32 as ONNX Runtime does."""
    length = q.shape[params.axis] if params.axis is not None and q.ndim else None
    scale = params.expand(params.scale, q.ndim, length)
    zp = params.expand(params.zero_point, q.ndim, length)
    real: np.ndarray = ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)
    return real


def _describe_params(params: _Params) -> dict[str, Any]:
    lo, hi = params.bounds()
    if params.scale.ndim == 0:
        zero_point: int | None = int(params.zero_point)
        widest = (float(lo), float(hi))
        scale_max = scale_min = float(params.scale)
    else:
        flat_zp = params.zero_point.reshape(-1)
        zero_point = int(flat_zp[0]) if flat_zp.size and bool(np.all(flat_zp == flat_zp[0])) else None
        index = int(np.argmax((hi - lo).reshape(-1))) if lo.size else 0
        widest = (float(lo.reshape(-1)[index]), float(hi.reshape(-1)[index])) if lo.size else (0.0, 0.0)
        scale_max = float(params.scale.max()) if params.scale.size else math.nan
        scale_min = float(params.scale.min()) if params.scale.size else math.nan
    return {
        "dtype": params.dtype.name.lower(),
        "scale": scale_max,
        "scale_min": scale_min,
        "zero_point": zero_point,
        "axis": params.axis,
        "range": widest,
    }


# ---------------------------------------------------------------------------------------------------
# Finding the quantized tensors


def _label(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def _readers(values: Iterable[ir.Value]) -> str:
    names: dict[str, None] = {}
    for value in values:
        for use in value.uses():
            names[_label(use.node)] = None
        if value.is_graph_output():
            names["(graph output)"] = None
    return ", ".join(names)


def _is_qdq(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in (*DEFAULT_DOMAINS, "com.microsoft")


#: A comparison after a per-channel rescale is reported when it reads at least this much better than
#: the plain one (a rescale outlier smoothing applied, not the noise a fit always absorbs).
RESCALE_GAIN_DB = 6.0


class _ChannelFit:
    """Per-channel sums along one axis for the SQNR after the best per-channel factor ``q ≈ s·r``."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.rr: np.ndarray | None = None
        self.qq: np.ndarray | None = None
        self.rq: np.ndarray | None = None

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        r = np.moveaxis(reference.astype(np.float64), self.axis, 0).reshape(reference.shape[self.axis], -1)
        q = np.moveaxis(quantized.astype(np.float64), self.axis, 0).reshape(r.shape)
        sums = (np.einsum("ij,ij->i", r, r), np.einsum("ij,ij->i", q, q), np.einsum("ij,ij->i", r, q))
        if self.rr is None or self.rr.shape != sums[0].shape:
            self.rr, self.qq, self.rq = sums
        else:
            assert self.qq is not None and self.rq is not None
            self.rr, self.qq, self.rq = self.rr + sums[0], self.qq + sums[1], self.rq + sums[2]

    def sqnr_db(self) -> float:
        """``10·log10(Σ (s·r)² / Σ (q − s·r)²)`` with each channel's least-squares ``s``."""
        if self.rr is None or self.qq is None or self.rq is None:
            return math.nan
        used = self.rr > 0
        fitted = np.where(used, self.rq**2 / np.where(used, self.rr, 1.0), 0.0)
        noise = float(np.sum(np.maximum(self.qq - fitted, 0.0)))
        signal = float(np.sum(fitted))
        if signal <= 0:
            return math.nan
        return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def _smoothed_tensors(model: ir.Model) -> set[str]:
    """The tensors onnxq's outlier smoothing rescaled, from the model's ``onnxq.smoothed`` metadata."""
    text = model.metadata_props.get("onnxq.smoothed", "")
    try:
        names = json.loads(text) if text else []
    except ValueError:
        return set()
    return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()


def _channel_axes(rank: int) -> tuple[int, ...]:
    """The axes outlier smoothing scales: a feature map's channels (1) and a product input's last."""
    return tuple(dict.fromkeys(a for a in (1, rank - 1) if 0 < a < rank)) if rank >= 2 else ()


def _rescaled_weight(candidate: np.ndarray, dequantized: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``candidate`` rescaled per channel by least squares onto ``dequantized``, and its axis-0 factors.

    Axes 0 and 1 in turn, a few rounds (a weight may be both a smoothed tensor's producer and another's
    reader); for a Conv, axis 0's factors are its output channels', what its bias was scaled by.
    """
    if candidate.ndim < 2:
        return None
    fitted = candidate.astype(np.float64)
    target = dequantized.astype(np.float64)
    outputs = np.ones(fitted.shape[0])
    for axis in (0, 1) * 4:
        other = tuple(a for a in range(fitted.ndim) if a != axis)
        rr = np.sum(fitted * fitted, axis=other, keepdims=True)
        rq = np.sum(fitted * target, axis=other, keepdims=True)
        factor = np.where(rr > 0, rq / np.where(rr > 0, rr, 1.0), 1.0)
        if not np.all((factor > 0) & np.isfinite(factor)):
            return None  # a channel rounded to zero, or flipped: rounding, not a rescale
        fitted = fitted * factor
        if axis == 0:
            outputs = outputs * factor.reshape(-1)
    return fitted, outputs


def _bias_factors(dq: ir.Node, indexes: Sequence[_FloatIndex]) -> np.ndarray | None:
    """The output-channel factors of the weight of the Conv whose bias ``dq`` dequantizes, if any."""
    for use in dq.outputs[0].uses():
        layer = use.node
        weight = layer.inputs[1] if layer.op_type == "Conv" and use.idx == 2 else None
        producer = weight.producer() if weight is not None else None
        if producer is None or not _is_qdq(producer, "DequantizeLinear") or producer.inputs[0] is None:
            continue
        data = const_array(producer.inputs[0])
        params = _params(producer, data.ndim, producer.inputs[0].dtype) if data is not None else "no data"
        if data is None or isinstance(params, str) or not data.size:
            continue
        dequantized = _dequantize(np.asarray(data), params)
        for candidate in _float_weight_candidates(producer, indexes, tuple(dequantized.shape)):
            fit = _rescaled_weight(candidate, dequantized)
            if fit is not None:
                return fit[1]
    return None


@dataclass
class _Activation:
    row: LayerStats
    params: _Params
    float_name: str
    quant_value: ir.Value  # DequantizeLinear output, or QuantizeLinear output when dequantize_here
    dequantize_here: bool
    stats: OutputStats
    low: float = math.inf
    high: float = -math.inf
    clipped: int = 0
    count: int = 0
    failed: str | None = None
    #: What the float model's readers of the tensor can tell apart
    #: (:func:`~onnxq.plan.saturating_readers.reader_bounds`): values beyond are compared clipped to it.
    bounds: tuple[float, float] = (-math.inf, math.inf)
    #: Per-channel fits along the axes outlier smoothing may have scaled (see the module docstring);
    #: ``None`` until the first batch gives the rank, empty for a tensor smoothing did not rescale.
    fits: list[_ChannelFit] | None = None


class _FloatIndex:
    """Values of a float model by name, and nodes by name."""

    def __init__(self, model: ir.Model) -> None:
        graph = model.graph
        self.values: dict[str, ir.Value] = {}
        for value in graph.inputs:
            if value.name:
                self.values[value.name] = value
        for name, value in graph.initializers.items():
            self.values.setdefault(name, value)
        self.nodes: dict[str, ir.Node] = {}
        for node in graph:
            if node.name:
                self.nodes.setdefault(node.name, node)
            for out in node.outputs:
                if out.name:
                    self.values.setdefault(out.name, out)
        self.outputs = {v.name for v in graph.outputs if v.name}

    def activation(self, name: str) -> ir.Value | None:
        value = self.values.get(name)
        if value is None or (value.const_value is not None and not value.is_graph_input()):
            return None
        return value


def _activation_name(q: ir.Node, dqs: Sequence[ir.Node], index: _FloatIndex) -> str | None:
    x = q.inputs[0]
    assert x is not None
    candidates: list[str] = []
    if x.name:
        candidates.append(x.name)
    # A quantized graph output: the DequantizeLinear output took the graph output's name.
    candidates += [dq.outputs[0].name for dq in dqs if dq.outputs[0].is_graph_output() and dq.outputs[0].name]
    if x.name:
        stripped = _OUTPUT_SUFFIXES.sub("", x.name)
        if stripped != x.name:
            candidates.append(stripped)
    for name in candidates:
        if index.activation(name) is not None:
            return name
    return None


def _float_weight_candidates(
    dq: ir.Node, indexes: Sequence[_FloatIndex], shape: tuple[int, ...]
) -> list[np.ndarray]:
    """Float weights that the integer input of ``dq`` may stand for (see module docstring)."""
    found: list[np.ndarray] = []

    def add(value: ir.Value | None) -> None:
        array = const_array(value)
        if array is None or array.shape != shape:
            return
        if not np.issubdtype(array.dtype, np.floating):
            return
        if not any(a is array or (a.dtype == array.dtype and np.array_equal(a, array)) for a in found):
            found.append(array)

    uses = list(dq.outputs[0].uses())
    for index in indexes:
        for use in uses:
            node = index.nodes.get(use.node.name) if use.node.name else None
            if node is None or node.op_type != use.node.op_type or len(node.inputs) <= use.idx:
                continue
            add(node.inputs[use.idx])
    names: list[str] = []
    source = dq.inputs[0]
    if source is not None and source.name:
        names.append(_WEIGHT_SUFFIXES.sub("", source.name))
    out_name = dq.outputs[0].name
    if out_name:
        names.append(_WEIGHT_SUFFIXES.sub("", out_name))
    for index in indexes:
        for name in dict.fromkeys(names):
            add(index.values.get(name))
    return found


# ---------------------------------------------------------------------------------------------------
# Running


def _session(model: ir.Model, values: Sequence[ir.Value], providers: Sequence[str]) -> Any:
    return open_model(model, outputs=values, providers=providers, opt_level="disable", prepack=False)


def _progress(feeds: Iterable[Mapping[str, np.ndarray]], show: bool | None) -> Iterable[Any]:
    from onnxq.progress import progress

    total = feeds.num_batches if isinstance(feeds, Feeds) else None
    return progress(feeds, total=total, desc="inspect", enabled=show)


def _update(act: _Activation, reference: np.ndarray, quantized: np.ndarray) -> None:
    if act.failed is not None:
        return
    ref = np.asarray(reference)
    if not np.issubdtype(ref.dtype, np.floating):
        act.failed = f"float tensor {act.float_name!r} holds {ref.dtype}, not floating point values"
        return
    if act.dequantize_here:
        quantized = _dequantize(quantized, act.params)
    if ref.shape != quantized.shape:
        act.failed = (
            f"{act.float_name!r} has shape {ref.shape} in the float model but {quantized.shape} "
            "in the quantized model"
        )
        return
    ref64 = ref.astype(np.float64)
    if ref.size:
        act.low = min(act.low, float(ref64.min()))
        act.high = max(act.high, float(ref64.max()))
    if act.bounds != (-math.inf, math.inf):  # as the readers see them: what they cannot tell apart is equal
        ref = np.clip(ref, *act.bounds).astype(ref.dtype, copy=False)
        quantized = np.clip(quantized, *act.bounds).astype(quantized.dtype, copy=False)
        ref64 = ref.astype(np.float64)
    act.stats.update(ref, quantized)
    if not ref.size:
        return
    if act.fits is None:
        act.fits = [_ChannelFit(axis) for axis in _channel_axes(ref.ndim)]
    for fit in act.fits:
        fit.update(ref, quantized)
    params = act.params
    if params.block_size == 0:
        length = ref.shape[params.axis] if params.axis is not None else None
        lo, hi = params.bounds()
        half = params.scale.astype(np.float64) / 2.0
        lo = params.expand(lo - half, ref.ndim, length)
        hi = params.expand(hi + half, ref.ndim, length)
        act.clipped += int(np.count_nonzero((ref64 < lo) | (ref64 > hi)))
    act.count += ref.size


def inspect_layers(
    quantized: Any,
    float_model: Any,
    feeds: Feeds | Iterable[Mapping[str, np.ndarray]],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    show_progress: bool | None = None,
    smoothed: Iterable[str] | None = None,
) -> LayerReport:
    """Statistics for every quantized tensor of ``quantized`` against ``float_model``, worst first.

    Both models are paths, ``onnx.ModelProto`` or ``onnx_ir.Model`` (not modified); ``feeds`` is
    consumed once. Rows are sorted by their own SQNR (activation SQNR for activations, weight SQNR for
    weights), lowest first; rows without one come last. ``smoothed`` names the tensors outlier
    smoothing rescaled (default: the quantized model's ``onnxq.smoothed`` metadata, which a saved model
    carries). Tensors that cannot be inspected (no float counterpart, parameters that are not
    constants) are left out and described in the result's ``notes``. Raises :class:`OnnxqError` when
    the data is empty or does not fit the models.
    """
    qmodel = load_model(quantized, what="quantized model")
    fmodel = load_model(float_model, what="float model")
    smoothed = set(smoothed) if smoothed is not None else _smoothed_tensors(qmodel)
    normalize_versions(fmodel)
    raw_index = _FloatIndex(fmodel)
    notes: list[str] = []
    rows: list[LayerStats] = []
    activations: list[_Activation] = []
    weight_dqs: list[ir.Node] = []

    graph = qmodel.graph
    for node in graph:
        if _is_qdq(node, "QuantizeLinear") and node.inputs and node.inputs[0] is not None:
            x = node.inputs[0]
            if const_array(x) is not None:
                note = _constant_q_row(node, x, rows)
                if note:
                    notes.append(note)
                continue
            act = _activation_task(node, raw_index)
            if isinstance(act, str):
                notes.append(act)
            else:
                if act.row.tensor not in smoothed:
                    act.fits = []  # no per-channel fit to accumulate: it is compared as it is
                activations.append(act)
        elif _is_qdq(node, "DequantizeLinear") and node.inputs and const_array(node.inputs[0]) is not None:
            weight_dqs.append(node)

    if weight_dqs:
        indexes = [raw_index]
        preprocessed = _preprocessed(fmodel)
        if preprocessed is not None:
            indexes.append(_FloatIndex(preprocessed))
        for dq in weight_dqs:
            note = _weight_row(dq, indexes, rows, smoothed=bool(smoothed))
            if note:
                notes.append(note)

    if activations:
        _run_activations(qmodel, fmodel, raw_index, activations, feeds, providers, show_progress)
        for act in activations:
            if act.failed is not None:
                notes.append(f"activation {act.row.tensor!r} not inspected: {act.failed}")
                continue
            row = act.row
            row.samples = act.stats.samples
            row.activation_sqnr_db = act.stats.sqnr_db
            fitted = max((fit.sqnr_db() for fit in act.fits or ()), default=math.nan)
            plain = row.activation_sqnr_db if row.activation_sqnr_db is not None else math.nan
            if not math.isnan(fitted) and (math.isnan(plain) or fitted >= plain + RESCALE_GAIN_DB):
                row.activation_sqnr_db, row.rescaled = fitted, True
            row.cosine = act.stats.cosine
            row.max_abs_error = act.stats.max_abs_error
            if act.count:
                row.observed_min, row.observed_max = act.low, act.high
                row.clipped = act.clipped / act.count if act.params.block_size == 0 else None
            rows.append(row)

    for note in notes:
        logger.info("inspect: %s", note)
    if notes:
        logger.warning("%d quantized tensors were not inspected (see the notes)", len(notes))
    return LayerReport(sorted(rows, key=_sort_key), notes)


def _sort_key(row: LayerStats) -> tuple[int, float]:
    value = row.sqnr_db
    if value is None or math.isnan(value):
        return (1, 0.0)
    return (0, value)


def _preprocessed(fmodel: ir.Model) -> ir.Model | None:
    from onnxq.preprocess import preprocess

    model = fmodel.clone()
    try:
        preprocess(model)
    except Exception as exc:  # the model as given still serves; only folded weights are not found
        logger.info("inspect: preprocessing the float model failed (%s)", str(exc).splitlines()[0])
        return None
    return model


def _activation_task(q: ir.Node, index: _FloatIndex) -> _Activation | str:
    x = q.inputs[0]
    assert x is not None
    dqs = [use.node for use in q.outputs[0].uses() if _is_qdq(use.node, "DequantizeLinear")]
    name = _activation_name(q, dqs, index)
    if name is None:
        return f"activation {x.name!r} not inspected: no tensor of that name in the float model"
    rank = len(x.shape) if x.shape is not None else None
    params = _params(q, rank, None)
    if isinstance(params, str):
        return f"activation {name!r} not inspected: {params}"
    readers = [dq.outputs[0] for dq in dqs] if dqs else [q.outputs[0]]
    info = _describe_params(params)
    row = LayerStats(
        tensor=name, kind="activation", node=_readers(readers), quantized_tensor=x.name or "", **info
    )
    quant_value = dqs[0].outputs[0] if dqs else q.outputs[0]
    float_value = index.values.get(name)
    return _Activation(
        row=row,
        params=params,
        float_name=name,
        quant_value=quant_value,
        dequantize_here=not dqs,
        stats=OutputStats(name),
        bounds=reader_bounds(float_value) if float_value is not None else (-math.inf, math.inf),
    )


def _weight_row(
    dq: ir.Node, indexes: Sequence[_FloatIndex], rows: list[LayerStats], *, smoothed: bool
) -> str | None:
    source = dq.inputs[0]
    assert source is not None
    data = const_array(source)
    assert data is not None
    params = _params(dq, data.ndim, source.dtype)
    if isinstance(params, str):
        return f"weight {source.name!r} not inspected: {params}"
    dequantized = _dequantize(np.asarray(data), params)
    best: float | None = None
    error: float | None = None
    rescaled = False
    bias_factors = _bias_factors(dq, indexes) if smoothed and data.ndim == 1 else None
    for candidate in _float_weight_candidates(dq, indexes, tuple(dequantized.shape)):
        value = sqnr_db(candidate.astype(np.float32), dequantized)
        fit = _rescaled_weight(candidate, dequantized) if smoothed and data.size else None
        fitted = fit[0] if fit is not None else None
        if bias_factors is not None and bias_factors.shape == candidate.shape:
            fitted = candidate.astype(np.float64) * bias_factors  # the layer's output channels' factors
        fitted_value = sqnr_db(fitted, dequantized.astype(np.float64)) if fitted is not None else math.nan
        was_rescaled = fitted is not None and fitted_value >= value + RESCALE_GAIN_DB
        if was_rescaled:
            assert fitted is not None
            value, candidate = fitted_value, fitted
        if best is None or value > best or (math.isnan(best) and not math.isnan(value)):
            best, rescaled = value, was_rescaled
            error = float(np.max(np.abs(candidate.astype(np.float64) - dequantized))) if data.size else 0.0
    name = _WEIGHT_SUFFIXES.sub("", source.name or "") or (source.name or "")
    rows.append(
        LayerStats(
            tensor=name,
            kind="weight",
            node=_readers(dq.outputs),
            quantized_tensor=source.name or "",
            weight_sqnr_db=best,
            max_abs_error=error,
            rescaled=rescaled,
            **_describe_params(params),
        )
    )
    return None if best is not None else f"weight {source.name!r}: no float weight found, SQNR not computed"


def _constant_q_row(q: ir.Node, x: ir.Value, rows: list[LayerStats]) -> str | None:
    """A QuantizeLinear of a float constant: a weight quantized at run time; compared in numpy."""
    data = const_array(x)
    assert data is not None
    params = _params(q, data.ndim, None)
    if isinstance(params, str):
        return f"weight {x.name!r} not inspected: {params}"
    length = data.shape[params.axis] if params.axis is not None and data.ndim else None
    scale = params.expand(params.scale, data.ndim, length)
    zp = params.expand(params.zero_point, data.ndim, length)
    q_data = np.clip(np.rint(data.astype(np.float32) / scale) + zp, params.qmin, params.qmax)
    dequantized = _dequantize(q_data.astype(np.int64), params)
    dqs = [use.node.outputs[0] for use in q.outputs[0].uses() if _is_qdq(use.node, "DequantizeLinear")]
    rows.append(
        LayerStats(
            tensor=x.name or "",
            kind="weight",
            node=_readers(dqs or q.outputs),
            quantized_tensor=x.name or "",
            weight_sqnr_db=sqnr_db(data, dequantized),
            max_abs_error=float(np.max(np.abs(data - dequantized))) if data.size else 0.0,
            **_describe_params(params),
        )
    )
    return None


def _run_activations(
    qmodel: ir.Model,
    fmodel: ir.Model,
    index: _FloatIndex,
    activations: list[_Activation],
    feeds: Feeds | Iterable[Mapping[str, np.ndarray]],
    providers: Sequence[str],
    show_progress: bool | None,
) -> None:
    from_feed = {v.name for v in fmodel.graph.inputs if v.name}
    fetch_float = [n for n in dict.fromkeys(a.float_name for a in activations) if n not in from_feed]
    fetch_quant = list(dict.fromkeys(a.quant_value for a in activations))
    float_session = _session(fmodel, [index.values[n] for n in fetch_float], providers)
    quant_session = _session(qmodel, fetch_quant, providers)
    quant_names = [v.name or "" for v in fetch_quant]

    feeds_seen = 0
    for feed in _progress(feeds, show_progress):
        feeds_seen += 1
        try:
            float_out = run(float_session, feed, fetch_float) if fetch_float else []
        except OnnxqError as exc:
            raise OnnxqError(f"float model: {exc}") from exc
        try:
            quant_out = run(quant_session, feed, quant_names)
        except OnnxqError as exc:
            raise OnnxqError(f"quantized model: {exc}") from exc
        ref = dict(zip(fetch_float, float_out, strict=True))
        got = dict(zip(quant_names, quant_out, strict=True))
        for act in activations:
            reference = feed[act.float_name] if act.float_name in from_feed else ref[act.float_name]
            _update(act, reference, got[act.quant_value.name or ""])
    if feeds_seen == 0:
        raise OnnxqError("no input data to inspect the layers on")


# ---------------------------------------------------------------------------------------------------
# Presentation


def _num(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _scale_text(row: LayerStats) -> str:
    if row.axis is None:
        return _num(row.scale, ".4g")
    return f"{_num(row.scale_min, '.3g')}..{_num(row.scale, '.3g')} (axis {row.axis})"


def _range_text(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "-"
    return f"[{_num(low, '.4g')}, {_num(high, '.4g')}]"


def format_layers(stats: Sequence[LayerStats], limit: int | None = 30) -> str:
    """The rows as one table, worst first (in the given order), at most ``limit`` of them."""
    if not stats:
        text = "no quantized tensors to inspect"
    else:
        shown = list(stats) if limit is None else list(stats)[:limit]
        rows = [
            [
                _shorten(row.tensor),
                row.kind,
                _shorten(row.node),
                row.dtype,
                _scale_text(row),
                "-" if row.zero_point is None else str(row.zero_point),
                _range_text(*row.range),
                _range_text(row.observed_min, row.observed_max),
                "-" if row.clipped is None else f"{100 * row.clipped:.2f}%",
                _num(row.sqnr_db, ".1f"),
            ]
            for row in shown
        ]
        text = tabulate(
            rows,
            headers=[
                "tensor",
                "kind",
                "read by",
                "type",
                "scale",
                "zero pt",
                "range",
                "observed",
                "clipped",
                "SQNR dB",
            ],
            tablefmt="simple_outline",
            disable_numparse=True,
            colalign=("left", "left", "left", "left", "right", "right", "right", "right", "right", "right"),
        )
        activations = sum(1 for row in stats if row.kind == "activation")
        samples = max((row.samples for row in stats), default=0)
        text += (
            f"\n{activations} activations (float model vs quantized model on {samples} feeds, "
            f"ORT_DISABLE_ALL), {len(stats) - activations} weights"
        )
        if len(shown) < len(stats):
            text += f"; {len(stats) - len(shown)} more rows not shown"
    rescaled = sum(1 for row in stats if row.rescaled)
    if rescaled:
        text += (
            f"\n{rescaled} tensor(s) compared after a per-channel rescale: outlier smoothing moved scale"
            " between them and the weights around them (the SQNR shown is their rounding's)"
        )
    notes = getattr(stats, "notes", None)
    if notes:
        text += "\nNot inspected:\n" + "\n".join(f"  - {note}" for note in notes)
    return text


def _finite(data: Any) -> Any:
    """JSON has no inf/nan: they are written as strings (as in :mod:`onnxq.report`)."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def layers_to_dict(stats: Sequence[LayerStats]) -> list[dict[str, Any]]:
    """The rows as JSON-friendly dicts (``range`` as a two-element list; inf/nan as strings)."""
    return [_finite(asdict(row)) for row in stats]
