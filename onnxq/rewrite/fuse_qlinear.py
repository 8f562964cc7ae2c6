"""Lowering a QDQ graph to QOperator form: ONNX Runtime's integer kernels in place of Q/DQ around float ops.

The input is a graph in QDQ form as onnxq writes it (and as other tools or a PyTorch QAT export write it
after normalization): activations quantized per tensor, constant weights stored as integers behind a
``DequantizeLinear``. Below, a *DQ input* is an input produced by a ``DequantizeLinear``; a node has an
*output Q* when its output has exactly one use, a ``QuantizeLinear``, and is not a graph output.

Rewrite rules (each a :class:`Rule` with ``match`` → ``check`` (a failure reason or ``None``) →
``rewrite``; the table :data:`RULES` drives the pass, in the main graph and every If/Loop/Scan body):

1. DQ(x), DQ(constant W, per tensor or per output channel on axis 0), optional bias → ``Conv`` → output Q
   ⇒ ``QLinearConv``. Without output Q ⇒ ``ConvInteger`` → ``Cast`` → ``Mul`` by x_scale·w_scale
   (→ ``Add`` of the float bias), only with ``conv_integer=True``; otherwise the Conv is declined.
2. DQ(A), DQ(B) → ``MatMul`` → output Q ⇒ ``QLinearMatMul`` (B per tensor, or per column of a 2-D B).
   Without output Q ⇒ ``com.microsoft.MatMulIntegerToFloat``, folding a following ``Add`` of a constant
   float 1-D bias of length N into it; with ``ms_domain=False`` ⇒ ``MatMulInteger`` → ``Cast`` → ``Mul``.
3. DQ(A), DQ(constant B, per tensor or per output channel), optional bias → ``Gemm`` (any alpha, beta 1
   or no C) ⇒ ``com.microsoft.QGemm``, with a quantized output when there is an output Q, else float.
4. DQ(A), DQ(B) of one integer type → ``Add``/``Mul`` → output Q ⇒ ``com.microsoft.QLinearAdd`` /
   ``QLinearMul``.
5. DQ inputs → ``Concat`` → output Q ⇒ ``com.microsoft.QLinearConcat``.
6. DQ → ``GlobalAveragePool``/``AveragePool``/``Sigmoid``/``LeakyRelu``/``Softmax`` → output Q ⇒ the
   ``com.microsoft`` ``QLinear*`` kernel of the same name (``QLinearSoftmax`` gets ``opset`` = the
   model's default-domain opset, which it requires, and decides its axis semantics by).
7. Pass-through: DQ → ``MaxPool``/``Reshape``/``Transpose``/``Flatten``/``Squeeze``/``Unsqueeze``/
   ``Slice``/``Split``/``Resize`` (nearest)/``Gather`` (data) → Q on every used output, all with the
   input's scale, zero point and type (compared by value) ⇒ the op runs on the integer tensor. A
   ``Resize`` that repeats pixels by whole factors becomes a channels-last ``Expand`` instead (7b,
   :mod:`onnxq.rewrite.nearest_upsample`), in QDQ output too.
8. A ``Relu``/``Clip`` between a node of rules 1–4 and its output Q is dropped when the output's quantized
   range already clamps the same way: Relu needs the zero point at the type's minimum, Clip(lo, hi) needs
   the representable range [(qmin−zp)·s, (qmax−zp)·s] inside [lo, hi] up to half a step. Otherwise the
   node is declined (symmetric int8, zero point 0, keeps its Relu).
9. Afterwards DQ → Q with identical parameters collapses to the integer tensor, and DQ → Q → DQ → Q to one
   DQ → Q with the last parameters (when the middle range does not clip more than the last). DQ → Q that
   requantizes stays. Dead nodes (DQs no longer read, replaced nodes) are removed.

Biases (rules 1 and 3): an int32 DQ bias must have zero point 0 and scale = input scale × weight scale
(relative tolerance 1e-6), else the node is declined; a float constant bias is quantized to int32 at that
scale (QGemm: at alpha × that scale, which is how its kernel reads C).

What ONNX Runtime 1.31 (CPU) accepts, checked by running each kernel: per-column ``b_scale`` in
``QLinearMatMul`` and ``MatMulIntegerToFloat`` only for a 2-D B; per-channel B and int32 C in ``QGemm``
(both transB); ``ConvInteger`` only with a per-tensor weight zero point; no kernel for int8 activations with
uint8 weights in QLinearConv, QLinearMatMul, QGemm and MatMulIntegerToFloat (ConvInteger and MatMulInteger
take them); no ``QLinearConvTranspose``.
``QLinearSoftmax`` rejects a node without its ``opset`` attribute.

After ``call``, ``lowered`` counts the new op types (``{"QLinearConv": 5, "Reshape": 1}``; a
pass-through op counts under its own type) and ``declined`` holds one line per node left in QDQ form,
``"Conv_12 not lowered: weight is not a constant"``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxq import rules
from onnxq.declines import Decline, Reason
from onnxq.graph import (
    DEFAULT_DOMAINS,
    NameScope,
    attr_float,
    attr_int,
    attr_str,
    clip_bounds,
    const_array,
    default_opset,
    make_initializer,
    remove_dead,
    sole_reader,
    take_over,
    trim_inputs,
)
from onnxq.rewrite.nearest_upsample import channels_last_repeat, repeat_factors
from onnxq.rules import Kernel

__all__ = [
    "MS_DOMAIN",
    "PASS_THROUGH_OPS",
    "QDQ_KEPT_PASS_THROUGH",
    "QDQ_PASS_THROUGH_RULES",
    "RULES",
    "FuseQLinearPass",
    "Kernel",
    "Match",
    "QTensor",
    "Rule",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_QRANGE: dict[ir.DataType, tuple[int, int]] = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}
_BIAS_RTOL = 1e-6
#: Ops that move or select values: on integers they compute exactly what DQ → op → Q computes.
PASS_THROUGH_OPS = (
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Resize",
    "Gather", "GatherElements", "Expand", "Tile", "ReduceMax", "ReduceMin", "Pad", "DepthToSpace",
    "SpaceToDepth",
)  # fmt: skip
_INT32_MAX = float(np.iinfo(np.int32).max)


def _is_op(node: ir.Node | None, *op_types: str) -> TypeGuard[ir.Node]:
    return node is not None and node.op_type in op_types and node.domain in DEFAULT_DOMAINS


def _type_name(dtype: ir.DataType | None) -> str:
    return "of unknown type" if dtype is None else dtype.name.lower()


# --------------------------------------------------------------------------------------------------
# Reading Q/DQ nodes


@dataclass(frozen=True)
class QTensor:
    """One ``QuantizeLinear`` or ``DequantizeLinear``: its integer tensor and its parameters.

    ``data`` is the integer side (a DQ's input, a Q's output). ``scales``/``zero_points`` are the
    parameters' data, ``None`` when not constant (an omitted zero point reads as zeros); ``axis`` is the
    attribute as written (default 1), ``block_size`` 0 unless the node is block-wise.
    """

    node: ir.Node
    data: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    scales: np.ndarray | None
    zero_points: np.ndarray | None
    dtype: ir.DataType | None
    axis: int
    block_size: int

    @property
    def per_tensor(self) -> bool:
        return (
            self.scales is not None
            and self.zero_points is not None
            and self.scales.size == 1
            and self.zero_points.size == 1
            and self.block_size == 0
        )

    def same_params(self, other: QTensor) -> bool:
        """Same type, scale and zero point by value (names do not matter)."""
        if self.dtype != other.dtype or self.block_size or other.block_size:
            return False
        if (
            self.scales is None
            or other.scales is None
            or self.zero_points is None
            or other.zero_points is None
        ):
            return False
        if self.per_tensor and other.per_tensor:
            return bool(
                self.scales.reshape(-1)[0] == other.scales.reshape(-1)[0]
                and self.zero_points.reshape(-1)[0] == other.zero_points.reshape(-1)[0]
            )
        return (
            self.axis == other.axis
            and np.array_equal(self.scales, other.scales)
            and np.array_equal(self.zero_points, other.zero_points)
        )

    def float_range(self) -> tuple[float, float]:
        """The float values a per-tensor QuantizeLinear can produce: [(qmin−zp)·s, (qmax−zp)·s]."""
        assert self.scales is not None and self.zero_points is not None and self.dtype in _QRANGE
        qmin, qmax = _QRANGE[self.dtype]
        scale = float(self.scales.reshape(-1)[0])
        zero_point = float(self.zero_points.reshape(-1)[0])
        return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def _integer_dtype(node: ir.Node) -> ir.DataType | None:
    """The integer type of a Q's output or a DQ's input."""
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None:
        if zero_point.dtype is not None:
            return zero_point.dtype
        data = const_array(zero_point)
        if data is not None:
            return ir.DataType.from_numpy(data.dtype)
    if node.op_type == "DequantizeLinear":
        source = node.inputs[0]
        if source is None:
            return None
        if source.dtype is not None:
            return source.dtype
        data = const_array(source)
        if data is not None:
            return ir.DataType.from_numpy(data.dtype)
        producer = source.producer()
        return _integer_dtype(producer) if _is_op(producer, "QuantizeLinear") else None
    if node.outputs[0].dtype is not None:
        return node.outputs[0].dtype
    output_dtype = attr_int(node, "output_dtype", 0)
    return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8


def _qtensor(node: ir.Node) -> QTensor | None:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    scale = node.inputs[1]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = _integer_dtype(node)
    scales = const_array(scale)
    if zero_point is not None:
        zero_points = const_array(zero_point)
    elif scales is not None and dtype is not None:
        zero_points = np.zeros(scales.shape, dtype.numpy())
    else:
        zero_points = None
    data = node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
    return QTensor(
        node=node,
        data=data,
        scale=scale,
        zero_point=zero_point,
        scales=scales,
        zero_points=zero_points,
        dtype=dtype,
        axis=attr_int(node, "axis", 1),
        block_size=attr_int(node, "block_size", 0),
    )


def _dequantized(value: ir.Value | None) -> QTensor | None:
    """The DequantizeLinear that produces ``value``, if one does."""
    producer = value.producer() if value is not None else None
    return _qtensor(producer) if _is_op(producer, "DequantizeLinear") else None


def _sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` as its first input, when that is its only use and not an output."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].idx != 0:
        return None
    return uses[0].node


def _output_q(value: ir.Value, *, absorb: bool) -> tuple[QTensor | None, ir.Node | None]:
    """The output Q of ``value`` and, with ``absorb``, a Relu/Clip between the two."""
    reader = _sole_reader(value)
    if _is_op(reader, "QuantizeLinear"):
        return _qtensor(reader), None
    if absorb and _is_op(reader, "Relu", "Clip"):
        q = _sole_reader(reader.outputs[0])
        if _is_op(q, "QuantizeLinear") and q.graph is reader.graph:
            return _qtensor(q), reader
    return None, None


def _rank(value: ir.Value) -> int | None:
    data = const_array(value)
    if data is not None:
        return data.ndim
    return None if value.shape is None else len(value.shape)


def _const_shape(value: ir.Value) -> tuple[int, ...]:
    """The shape of a constant (a weight the checks have already found constant)."""
    data = const_array(value)
    assert data is not None
    return tuple(int(d) for d in data.shape)


def _last_dim(value: ir.Value) -> int | None:
    data = const_array(value)
    if data is not None:
        return int(data.shape[-1]) if data.ndim else None
    if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[-1], int):
        return None
    return int(value.shape[-1])


def _scalar(array: np.ndarray | None) -> float:
    assert array is not None
    return float(array.reshape(-1)[0])


# --------------------------------------------------------------------------------------------------
# Matches and the problems a check can find


@dataclass
class Match:
    """A node a rule can lower, with the quantization around it.

    ``inputs``/``outputs`` hold, per node input/output, its DequantizeLinear / output QuantizeLinear (or
    ``None``); ``activation`` is a Relu/Clip between output 0 and its QuantizeLinear. ``check`` may leave
    what it computed for ``rewrite`` in ``bias`` (int32 data or an existing int32 tensor) and
    ``float_bias``.
    """

    rule: Rule
    node: ir.Node
    ctx: _Context
    inputs: list[QTensor | None]
    outputs: list[QTensor | None]
    activation: ir.Node | None = None
    bias: np.ndarray | ir.Value | None = None
    float_bias: np.ndarray | None = None

    @property
    def output(self) -> QTensor | None:
        return self.outputs[0] if self.outputs else None

    def input(self, index: int) -> QTensor | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def operand(self, index: int) -> ir.Value | None:
        return self.node.inputs[index] if index < len(self.node.inputs) else None


def _activation_problem(q: QTensor | None, what: str) -> Reason | None:
    """Why ``q`` is no per-tensor int8/uint8 activation with constant parameters (``None`` if it is)."""
    if q is None:
        return Reason("activation_form", f"{what} is not dequantized")
    if q.scales is None or q.zero_points is None:
        return Reason("activation_form", f"{what}'s scale or zero point is not a constant")
    if q.dtype not in _QRANGE:
        return Reason(
            "activation_form", f"{what} is {_type_name(q.dtype)}; the integer kernels take int8 or uint8"
        )
    if not q.per_tensor:
        return Reason(
            "activation_form",
            f"{what} is quantized per axis; the integer kernels need per-tensor activations",
        )
    if q.scales.dtype != np.float32:
        return Reason("activation_form", f"{what}'s scale is {q.scales.dtype}, not float32")
    return None


def _weight_problem(q: QTensor | None, what: str, axis: int, *, constant: bool = True) -> Reason | None:
    """Why ``q`` is no int8/uint8 weight quantized per tensor or per channel along ``axis``."""
    if q is None:
        return Reason("weight_form", f"{what} is not dequantized")
    if constant and const_array(q.data) is None:
        return Reason("weight_form", f"{what} is not a constant")
    if q.scales is None or q.zero_points is None:
        return Reason("weight_form", f"{what}'s scale or zero point is not a constant")
    if q.dtype not in _QRANGE:
        return Reason(
            "weight_form", f"{what} is {_type_name(q.dtype)}; the integer kernels take int8 or uint8"
        )
    if q.scales.dtype != np.float32:
        return Reason("weight_form", f"{what}'s scale is {q.scales.dtype}, not float32")
    if q.block_size:
        return Reason("weight_form", f"{what} is quantized block-wise (block_size {q.block_size})")
    if q.per_tensor:
        return None
    rank = _rank(q.data)
    if rank is None:
        return Reason("weight_form", f"{what} is quantized per axis and its rank is unknown")
    if q.axis % rank != axis % rank:
        return Reason(
            "weight_form",
            f"{what} is quantized along axis {q.axis}; the integer kernel needs axis {axis} "
            "(output channels)",
        )
    return None


def _kernel_types_problem(x: QTensor, w: QTensor) -> Reason | None:
    if x.dtype == ir.DataType.INT8 and w.dtype == ir.DataType.UINT8:
        return Reason("no_kernel", "int8 activations with uint8 weights have no kernel in ONNX Runtime")
    return None


def _output_problem(m: Match, x: QTensor) -> Reason | None:
    """Why the output Q cannot be the integer kernel's output (same type as its input, per tensor)."""
    y = m.output
    if y is None:
        return Reason("output_form", "its output is not quantized")
    problem = _activation_problem(y, "the output")
    if problem is not None:
        return Reason("output_form", problem.message)
    if y.dtype != x.dtype:
        return Reason(
            "output_form", f"the output is {_type_name(y.dtype)} but the input {_type_name(x.dtype)}"
        )
    return _absorb_problem(m)


def _clip_bounds(node: ir.Node, opset: int) -> tuple[float, float] | None:
    """(lo, hi) of a Relu or Clip (:func:`~onnxq.graph.clip_bounds`); ``None`` if a bound is no constant."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    return clip_bounds(node, opset)


def _absorb_problem(m: Match) -> Reason | None:
    """Rule 8: why the Relu/Clip before the output Q cannot be dropped."""
    act, y = m.activation, m.output
    if act is None or y is None:
        return None
    label = f"{act.op_type} {act.name}" if act.name else act.op_type
    bounds = _clip_bounds(act, m.ctx.opset)
    if bounds is None:
        return Reason(
            "activation_not_absorbed", f"{label} before the output has bounds that are not constants"
        )
    lo, hi = bounds
    qlo, qhi = y.float_range()
    half_step = _scalar(y.scales) / 2.0
    if qlo >= lo - half_step and qhi <= hi + half_step:
        return None
    if act.op_type == "Relu":
        return Reason(
            "activation_not_absorbed",
            f"{label} cannot be absorbed: the output's zero point {_scalar(y.zero_points):g} is not the "
            f"lowest {_type_name(y.dtype)} value, so its range [{qlo:.4g}, {qhi:.4g}] does not clamp at 0",
        )
    return Reason(
        "activation_not_absorbed",
        f"{label} cannot be absorbed: the output's range [{qlo:.4g}, {qhi:.4g}] is not inside "
        f"[{lo:.4g}, {hi:.4g}]",
    )


def _ms_problem(m: Match, op_type: str) -> Reason | None:
    if m.ctx.ms_domain:
        return None
    return Reason("ms_domain_off", f"{op_type} is a com.microsoft op and ms_domain=False")


def _accumulator_scale(x: QTensor, w: QTensor, channels: int) -> np.ndarray:
    """x_scale × w_scale per output channel, in float32 as the bias quantization computes it."""
    assert x.scales is not None and w.scales is not None
    product = np.float32(x.scales.reshape(-1)[0]) * w.scales.astype(np.float32).reshape(-1)
    return np.broadcast_to(product.astype(np.float32), (channels,))


def _integer_bias(m: Match, index: int, accumulator: np.ndarray, *, alpha: float = 1.0) -> Reason | None:
    """Sets ``m.bias`` to the int32 bias at scale ``alpha × accumulator``; returns why it cannot."""
    value = m.operand(index)
    if value is None:
        return None
    channels = accumulator.shape[0]
    dq = m.input(index)
    if dq is not None:
        data = const_array(dq.data)
        if dq.dtype != ir.DataType.INT32:
            return Reason("bias_form", f"bias is dequantized from {_type_name(dq.dtype)}, not int32")
        if data is None:
            return Reason("bias_form", "bias is not a constant")
        if dq.scales is None or dq.zero_points is None:
            return Reason("bias_form", "bias scale or zero point is not a constant")
        if np.any(dq.zero_points != 0):
            return Reason("bias_form", "bias has a non-zero zero point")
        if data.size != channels or dq.scales.size not in (1, channels):
            return Reason("bias_form", f"bias has {data.size} values for {channels} output channels")
        scales = np.broadcast_to(dq.scales.astype(np.float32).reshape(-1), (channels,))
        gap = np.abs(scales.astype(np.float64) - accumulator) > _BIAS_RTOL * np.abs(accumulator)
        if np.any(gap):
            i = int(np.argmax(gap))
            return Reason(
                "bias_form",
                f"bias scale {scales[i]:.6g} is not input scale × weight scale {accumulator[i]:.6g} "
                f"(channel {i})",
            )
        if alpha == 1.0:
            m.bias = dq.data if data.ndim == 1 else data.reshape(channels).astype(np.int32)
            return None
        real = data.reshape(channels).astype(np.float64) * scales
    else:
        data = const_array(value)
        if data is None:
            return Reason("bias_form", "bias is neither a constant nor dequantized from one")
        if data.dtype != np.float32:
            return Reason("bias_form", f"bias is {data.dtype}, not float32")
        if data.size != channels:
            return Reason("bias_form", f"bias has {data.size} values for {channels} output channels")
        real = data.reshape(channels).astype(np.float64)
    quantized = np.rint(real / (accumulator.astype(np.float64) * alpha))
    if np.any(np.abs(quantized) > _INT32_MAX):
        return Reason("bias_form", "bias does not fit int32 at scale input scale × weight scale")
    m.bias = quantized.astype(np.int32)
    return None


def _float_bias(m: Match, index: int, channels: int) -> Reason | None:
    """Sets ``m.float_bias`` to the bias as the QDQ graph computes it; returns why it cannot."""
    value = m.operand(index)
    if value is None:
        return None
    dq = m.input(index)
    if dq is not None:
        data = const_array(dq.data)
        if data is None or dq.scales is None or dq.zero_points is None:
            return Reason("bias_form", "bias is not dequantized from constants")
        if data.size != channels:
            return Reason("bias_form", f"bias has {data.size} values for {channels} output channels")
        real = (data.astype(np.int32) - dq.zero_points.astype(np.int32)).astype(
            np.float32
        ) * dq.scales.astype(np.float32)
    else:
        data = const_array(value)
        if data is None or data.dtype != np.float32 or data.size != channels:
            return Reason(
                "bias_form",
                "bias is neither a float constant of one value per channel nor dequantized from one",
            )
        real = data
    m.float_bias = np.asarray(real, np.float32).reshape(channels)
    return None


# --------------------------------------------------------------------------------------------------
# Rewriting


class _Context:
    """What every rule needs while the pass runs: options, names, and the graph edits they share."""

    def __init__(self, model: ir.Model, *, conv_integer: bool, ms_domain: bool) -> None:
        self.model = model
        self.names = NameScope(model.graph)
        self.opset = default_opset(model)
        self.conv_integer = conv_integer
        self.ms_domain = ms_domain
        self.used_ms_domain = False
        self._zeros: dict[tuple[ir.DataType, tuple[int, ...]], ir.Value] = {}

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer in the main graph (visible to every subgraph)."""
        return make_initializer(self.model.graph, self.names, base, array)

    def zero_point(self, q: QTensor) -> ir.Value:
        """``q``'s zero point input, or a shared zero of its type and shape when it has none."""
        if q.zero_point is not None:
            return q.zero_point
        assert q.dtype is not None and q.scales is not None
        key = (q.dtype, tuple(q.scales.shape))
        if key not in self._zeros:
            zeros = np.zeros(q.scales.shape, q.dtype.numpy())
            self._zeros[key] = self.initializer(f"zero_point_{q.dtype.name.lower()}", zeros)
        return self._zeros[key]

    def bias(self, m: Match) -> ir.Value:
        """The int32 bias ``check`` left in ``m.bias``: the existing tensor, or a new initializer."""
        assert m.bias is not None
        if isinstance(m.bias, ir.Value):
            return m.bias
        return self.initializer(f"{m.node.name or m.node.op_type}_bias_int32", m.bias)

    def params(self, q: QTensor) -> list[ir.Value]:
        """[scale, zero point] inputs of a QLinear kernel for ``q``."""
        return [q.scale, self.zero_point(q)]

    def triple(self, q: QTensor) -> list[ir.Value]:
        """[integer tensor, scale, zero point] inputs of a QLinear kernel for ``q``."""
        return [q.data, *self.params(q)]

    def emit(
        self,
        m: Match,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Sequence[ir.Attr] = (),
        *,
        dtype: ir.DataType,
        domain: str = "",
        primary: bool = False,
    ) -> ir.Value:
        """Insert a node before ``m.node`` and return its (single) output.

        The ``primary`` node takes over the name of the node it replaces; helper nodes get fresh names.
        """
        inputs = trim_inputs(inputs)
        base = m.node.name or m.node.op_type
        name = m.node.name if primary and m.node.name else self.names.fresh(f"{base}_{op_type}")
        node = ir.Node(domain, op_type, inputs, attributes, name=name)
        output = node.outputs[0]
        output.name = self.names.fresh(f"{base}_{op_type}_out")
        output.type = ir.TensorType(dtype)
        graph = m.node.graph
        assert graph is not None
        graph.insert_before(m.node, node)
        if domain == MS_DOMAIN:
            self.used_ms_domain = True
        return output

    def finish(self, m: Match, new: ir.Value, replaced: ir.Value, *, also: Sequence[ir.Node] = ()) -> None:
        """``new`` takes over the uses and name of ``replaced``; nodes that became dead go."""
        take_over(replaced, new)
        remove_dead([*(q.node for q in m.outputs if q), *also, m.activation, m.node, *_dq_nodes(m)])


def _dq_nodes(m: Match) -> list[ir.Node]:
    return [q.node for q in m.inputs if q is not None]


def _copy_attributes(node: ir.Node, keep: Sequence[str] | None = None) -> list[ir.Attr]:
    return [
        ir.Attr(attr.name, attr.type, attr.value)
        for attr in node.attributes.values()
        if keep is None or attr.name in keep
    ]


def _channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    """[1, C, 1, ...] for a rank-``rank`` NC... tensor."""
    return (1, channels, *([1] * (rank - 2)))


# --------------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True, kw_only=True)
class Rule(rules.Rule[Match, _Context]):
    """Lowers nodes of ``op_types``: ``match`` → ``check`` (a failure reason) → ``rewrite``.

    ``data_inputs`` are the inputs read through a DequantizeLinear (``None``: all); a node matches when
    one of them is. ``anchor`` rules match even without an output Q (they decline, or lower to a float
    output); the others need one. ``absorbs`` allows a Relu/Clip before the output Q (rule 8).
    """

    op_types: tuple[str, ...]
    data_inputs: tuple[int, ...] | None = (0,)
    anchor: bool = False
    absorbs: bool = False

    def match(self, node: ir.Node, ctx: _Context) -> Match | None:
        inputs = [_dequantized(value) for value in node.inputs]
        slots = range(len(inputs)) if self.data_inputs is None else self.data_inputs
        if not any(i < len(inputs) and inputs[i] is not None for i in slots):
            return None
        outputs: list[QTensor | None] = []
        activation = None
        for k, value in enumerate(node.outputs):
            q, act = _output_q(value, absorb=self.absorbs and k == 0)
            outputs.append(q)
            activation = activation or act
        if not self.anchor and all(q is None for q in outputs):
            return None
        return Match(self, node, ctx, inputs, outputs, activation)

    def check(self, m: Match) -> Reason | None:
        raise NotImplementedError

    def rewrite(self, m: Match) -> str:
        """Rewrite the graph; return the op type the node became (for ``lowered``)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class ConvRule(Rule):
    """Rule 1: Conv → QLinearConv, or ConvInteger + Cast + Mul (+ Add) for a float output."""

    op_types: tuple[str, ...] = ("Conv",)
    data_inputs: tuple[int, ...] | None = (0, 1)
    anchor: bool = True
    absorbs: bool = True

    def check(self, m: Match) -> Reason | None:
        x, w = m.input(0), m.input(1)
        problem = _activation_problem(x, "input X") or _weight_problem(w, "weight", 0)
        if problem:
            return problem
        assert x is not None and w is not None and w.zero_points is not None
        channels = _const_shape(w.data)[0]
        if m.output is not None:
            return (
                _kernel_types_problem(x, w)
                or _output_problem(m, x)
                or _integer_bias(m, 2, _accumulator_scale(x, w, channels))
            )
        if not m.ctx.conv_integer:
            return Reason(
                "conv_integer_form",
                "its output is not quantized (ConvInteger lowering is off: conv_integer=False)",
            )
        if np.unique(w.zero_points).size > 1:
            return Reason(
                "conv_integer_form", "ConvInteger takes one weight zero point, the weight has one per channel"
            )
        return _float_bias(m, 2, channels)

    def kernel(self, m: Match) -> Kernel | None:
        x, w, y = m.input(0), m.input(1), m.output
        assert x is not None and w is not None
        if y is None:
            return Kernel("ConvInteger", {0: x.dtype, 1: w.dtype})
        return Kernel("QLinearConv", {0: x.dtype, 3: w.dtype, 7: y.dtype})

    def rewrite(self, m: Match) -> str:
        x, w, y = m.input(0), m.input(1), m.output
        assert x is not None and w is not None
        if y is None:
            return self._conv_integer(m, x, w)
        ctx = m.ctx
        inputs = [*ctx.triple(x), *ctx.triple(w), *ctx.params(y)]
        if m.bias is not None:
            inputs.append(ctx.bias(m))
        assert y.dtype is not None
        out = ctx.emit(m, "QLinearConv", inputs, _copy_attributes(m.node), dtype=y.dtype, primary=True)
        ctx.finish(m, out, y.data)
        return "QLinearConv"

    def _conv_integer(self, m: Match, x: QTensor, w: QTensor) -> str:
        ctx = m.ctx
        weight = const_array(w.data)
        assert weight is not None and w.zero_points is not None and w.dtype is not None
        channels, rank = weight.shape[0], weight.ndim
        w_zero = _scalar(w.zero_points)
        w_zp = (
            None
            if w_zero == 0
            else ctx.initializer(f"{m.node.name}_w_zero_point", np.array(w_zero, w.dtype.numpy()))
        )
        acc = ctx.emit(
            m, "ConvInteger", [x.data, w.data, x.zero_point, w_zp], _copy_attributes(m.node),
            dtype=ir.DataType.INT32, primary=True,
        )  # fmt: skip
        real = ctx.emit(m, "Cast", [acc], [ir.AttrInt64("to", ir.DataType.FLOAT)], dtype=ir.DataType.FLOAT)
        scale = _accumulator_scale(x, w, channels)
        factor = scale[:1].reshape(()) if w.per_tensor else scale.reshape(_channel_shape(channels, rank))
        out = ctx.emit(
            m, "Mul", [real, ctx.initializer(f"{m.node.name}_scale", factor)], dtype=ir.DataType.FLOAT
        )
        if m.float_bias is not None:
            bias = ctx.initializer(
                f"{m.node.name}_bias", m.float_bias.reshape(_channel_shape(channels, rank))
            )
            out = ctx.emit(m, "Add", [out, bias], dtype=ir.DataType.FLOAT)
        ctx.finish(m, out, m.node.outputs[0])
        return "ConvInteger"


def _matmul_b_problem(b: QTensor | None) -> Reason | None:
    if b is None:
        return Reason("weight_form", "input B is not dequantized")
    problem = _weight_problem(b, "input B", -1, constant=False)
    if problem or b.per_tensor:
        return problem
    rank = _rank(b.data)
    if rank != 2:
        return Reason(
            "weight_form",
            f"input B is quantized per column but has rank {rank}; ONNX Runtime's integer MatMul kernels "
            "take per-column scales only for a 2-D B",
        )
    return None


def _bias_add(m: Match, columns: int | None) -> tuple[ir.Node, ir.Value] | None:
    """The Add of a constant float 1-D bias of length ``columns`` that alone reads the MatMul's output.

    Or a two-input ``Sum``: onnxq's QDQ form writes such a bias that way (:mod:`onnxq.rewrite.sum_form`).
    """
    add = sole_reader(m.node.outputs[0])
    if add is None or not _is_op(add, "Add", "Sum") or columns is None or add.graph is not m.node.graph:
        return None
    others = [v for v in add.inputs if v is not m.node.outputs[0]]
    if len(others) != 1 or others[0] is None:
        return None
    data = const_array(others[0])
    if data is None or data.dtype != np.float32 or data.shape != (columns,):
        return None
    return add, others[0]


@dataclass(frozen=True, kw_only=True)
class MatMulRule(Rule):
    """Rule 2: MatMul → QLinearMatMul, or MatMulIntegerToFloat / MatMulInteger for a float output."""

    op_types: tuple[str, ...] = ("MatMul",)
    data_inputs: tuple[int, ...] | None = (0, 1)
    anchor: bool = True
    absorbs: bool = True

    def check(self, m: Match) -> Reason | None:
        a, b = m.input(0), m.input(1)
        problem = _activation_problem(a, "input A") or _matmul_b_problem(b)
        if problem:
            return problem
        assert a is not None and b is not None
        if m.output is None and not m.ctx.ms_domain:
            return None  # MatMulInteger takes int8 × uint8 too
        problem = _kernel_types_problem(a, b)
        if problem or m.output is None:
            return problem
        return _output_problem(m, a)

    def kernel(self, m: Match) -> Kernel | None:
        a, b, y = m.input(0), m.input(1), m.output
        assert a is not None and b is not None
        if y is not None:
            return Kernel("QLinearMatMul", {0: a.dtype, 3: b.dtype, 7: y.dtype})
        if m.ctx.ms_domain:
            return Kernel("MatMulIntegerToFloat", {0: a.dtype, 1: b.dtype}, MS_DOMAIN)
        return Kernel("MatMulInteger", {0: a.dtype, 1: b.dtype})

    def rewrite(self, m: Match) -> str:
        a, b, y = m.input(0), m.input(1), m.output
        assert a is not None and b is not None
        ctx = m.ctx
        if y is not None:
            assert y.dtype is not None
            inputs = [*ctx.triple(a), *ctx.triple(b), *ctx.params(y)]
            out = ctx.emit(m, "QLinearMatMul", inputs, dtype=y.dtype, primary=True)
            ctx.finish(m, out, y.data)
            return "QLinearMatMul"
        if ctx.ms_domain:
            folded = _bias_add(m, _last_dim(b.data))
            bias = folded[1] if folded else None
            integer_inputs = [a.data, b.data, a.scale, b.scale, a.zero_point, b.zero_point, bias]
            out = ctx.emit(
                m,
                "MatMulIntegerToFloat",
                integer_inputs,
                dtype=ir.DataType.FLOAT,
                domain=MS_DOMAIN,
                primary=True,
            )
            if folded is None:
                ctx.finish(m, out, m.node.outputs[0])
            else:
                ctx.finish(m, out, folded[0].outputs[0], also=[folded[0]])
            return "MatMulIntegerToFloat"
        acc = ctx.emit(
            m,
            "MatMulInteger",
            [a.data, b.data, a.zero_point, b.zero_point],
            dtype=ir.DataType.INT32,
            primary=True,
        )
        real = ctx.emit(m, "Cast", [acc], [ir.AttrInt64("to", ir.DataType.FLOAT)], dtype=ir.DataType.FLOAT)
        assert a.scales is not None and b.scales is not None
        product = (np.float32(_scalar(a.scales)) * b.scales.astype(np.float32)).astype(np.float32)
        factor = product.reshape(()) if b.per_tensor else product.reshape(-1)
        out = ctx.emit(
            m, "Mul", [real, ctx.initializer(f"{m.node.name}_scale", factor)], dtype=ir.DataType.FLOAT
        )
        ctx.finish(m, out, m.node.outputs[0])
        return "MatMulInteger"


@dataclass(frozen=True, kw_only=True)
class GemmRule(Rule):
    """Rule 3: Gemm → com.microsoft.QGemm (quantized output with an output Q, float output without)."""

    op_types: tuple[str, ...] = ("Gemm",)
    data_inputs: tuple[int, ...] | None = (0, 1)
    anchor: bool = True
    absorbs: bool = True

    def check(self, m: Match) -> Reason | None:
        a, b = m.input(0), m.input(1)
        trans_b = attr_int(m.node, "transB", 0)
        problem = (
            _ms_problem(m, "QGemm")
            or _activation_problem(a, "input A")
            or _weight_problem(b, "input B", 0 if trans_b else 1)
        )
        if problem:
            return problem
        assert a is not None and b is not None
        problem = _kernel_types_problem(a, b)
        if problem:
            return problem
        if m.operand(2) is not None and attr_float(m.node, "beta", 1.0) != 1.0:
            return Reason("gemm_form", "beta is not 1")
        columns = _const_shape(b.data)[0 if trans_b else 1]
        alpha = attr_float(m.node, "alpha", 1.0)
        problem = _integer_bias(m, 2, _accumulator_scale(a, b, columns), alpha=alpha)
        if problem or m.output is None:
            return problem
        return _output_problem(m, a)

    def kernel(self, m: Match) -> Kernel | None:
        a, b, y = m.input(0), m.input(1), m.output
        assert a is not None and b is not None
        types = {0: a.dtype, 3: b.dtype}
        if y is not None:
            types[8] = y.dtype
        return Kernel("QGemm", types, MS_DOMAIN)

    def rewrite(self, m: Match) -> str:
        a, b, y = m.input(0), m.input(1), m.output
        assert a is not None and b is not None
        ctx = m.ctx
        inputs = [*ctx.triple(a), *ctx.triple(b), None if m.bias is None else ctx.bias(m)]
        if y is not None:
            inputs += ctx.params(y)
        attributes = _copy_attributes(m.node, ("transA", "transB", "alpha"))
        dtype = ir.DataType.FLOAT if y is None or y.dtype is None else y.dtype
        out = ctx.emit(m, "QGemm", inputs, attributes, dtype=dtype, domain=MS_DOMAIN, primary=True)
        ctx.finish(m, out, m.node.outputs[0] if y is None else y.data)
        return "QGemm"


@dataclass(frozen=True, kw_only=True)
class BinaryRule(Rule):
    """Rule 4: Add/Mul of two DQ inputs of one type, with output Q → QLinearAdd/QLinearMul."""

    qop: str
    data_inputs: tuple[int, ...] | None = (0, 1)
    absorbs: bool = True

    def check(self, m: Match) -> Reason | None:
        a, b = m.input(0), m.input(1)
        problem = (
            _ms_problem(m, self.qop) or _activation_problem(a, "input A") or _activation_problem(b, "input B")
        )
        if problem:
            return problem
        assert a is not None and b is not None
        if a.dtype != b.dtype:
            return Reason(
                "mixed_types",
                f"the inputs are {_type_name(a.dtype)} and {_type_name(b.dtype)}; {self.qop} takes one type",
            )
        return _output_problem(m, a)

    def kernel(self, m: Match) -> Kernel | None:
        a, b = m.input(0), m.input(1)
        assert a is not None and b is not None
        return Kernel(self.qop, {0: a.dtype, 3: b.dtype}, MS_DOMAIN)

    def rewrite(self, m: Match) -> str:
        a, b, y = m.input(0), m.input(1), m.output
        assert a is not None and b is not None and y is not None and y.dtype is not None
        ctx = m.ctx
        inputs = [*ctx.triple(a), *ctx.triple(b), *ctx.params(y)]
        out = ctx.emit(m, self.qop, inputs, dtype=y.dtype, domain=MS_DOMAIN, primary=True)
        ctx.finish(m, out, y.data)
        return self.qop


@dataclass(frozen=True, kw_only=True)
class ConcatRule(Rule):
    """Rule 5: Concat of DQ inputs with output Q → QLinearConcat."""

    op_types: tuple[str, ...] = ("Concat",)
    data_inputs: tuple[int, ...] | None = None

    def check(self, m: Match) -> Reason | None:
        problem = _ms_problem(m, "QLinearConcat")
        if problem:
            return problem
        for k, q in enumerate(m.inputs):
            problem = _activation_problem(q, f"input {k}")
            if problem:
                return problem
            assert q is not None and m.output is not None
            if q.dtype != m.output.dtype:
                return Reason(
                    "mixed_types",
                    f"input {k} is {_type_name(q.dtype)}, the output {_type_name(m.output.dtype)}",
                )
        assert m.inputs[0] is not None
        return _output_problem(m, m.inputs[0])

    def kernel(self, m: Match) -> Kernel | None:
        assert m.output is not None
        return Kernel("QLinearConcat", {1: m.output.dtype}, MS_DOMAIN)

    def rewrite(self, m: Match) -> str:
        y, ctx = m.output, m.ctx
        assert y is not None and y.dtype is not None
        inputs = ctx.params(y)
        for q in m.inputs:
            assert q is not None
            inputs += ctx.triple(q)
        attributes = [ir.AttrInt64("axis", attr_int(m.node, "axis", 0))]
        out = ctx.emit(m, "QLinearConcat", inputs, attributes, dtype=y.dtype, domain=MS_DOMAIN, primary=True)
        ctx.finish(m, out, y.data)
        return "QLinearConcat"


def _no_attributes(m: Match) -> list[ir.Attr]:
    return []


def _global_pool_attributes(m: Match) -> list[ir.Attr]:
    return [ir.AttrInt64("channels_last", 0)]


_AVERAGE_POOL_ATTRIBUTES = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")


def _average_pool_attributes(m: Match) -> list[ir.Attr]:
    return _copy_attributes(m.node, _AVERAGE_POOL_ATTRIBUTES)


def _average_pool_problem(m: Match) -> Reason | None:
    dilations = m.node.attributes.get("dilations")
    if dilations is not None and any(d != 1 for d in dilations.as_ints()):
        return Reason("attributes", "QLinearAveragePool has no dilations")
    return None


def _leaky_relu_attributes(m: Match) -> list[ir.Attr]:
    return [ir.AttrFloat32("alpha", attr_float(m.node, "alpha", 0.01))]


def _softmax_attributes(m: Match) -> list[ir.Attr]:
    opset = m.ctx.opset
    axis = attr_int(m.node, "axis", -1 if opset >= 13 else 1)
    return [ir.AttrInt64("axis", axis), ir.AttrInt64("opset", opset)]


def _no_problem(m: Match) -> Reason | None:
    return None


@dataclass(frozen=True, kw_only=True)
class UnaryRule(Rule):
    """Rule 6: DQ → op → Q → the com.microsoft ``qop(X, x_scale, x_zp, y_scale, y_zp)``."""

    qop: str
    attributes: Callable[[Match], list[ir.Attr]] = _no_attributes
    problem: Callable[[Match], Reason | None] = _no_problem

    def check(self, m: Match) -> Reason | None:
        x = m.input(0)
        problem = _ms_problem(m, self.qop) or _activation_problem(x, "the input")
        if problem:
            return problem
        assert x is not None
        return _output_problem(m, x) or self.problem(m)

    def kernel(self, m: Match) -> Kernel | None:
        x = m.input(0)
        assert x is not None
        return Kernel(self.qop, {0: x.dtype}, MS_DOMAIN)

    def rewrite(self, m: Match) -> str:
        x, y, ctx = m.input(0), m.output, m.ctx
        assert x is not None and y is not None and y.dtype is not None
        inputs = [*ctx.triple(x), *ctx.params(y)]
        out = ctx.emit(m, self.qop, inputs, self.attributes(m), dtype=y.dtype, domain=MS_DOMAIN, primary=True)
        ctx.finish(m, out, y.data)
        return self.qop


@dataclass(frozen=True, kw_only=True)
class PassThroughRule(Rule):
    """Rule 7: DQ → data-movement op → Q with the same parameters → the op on the integer tensor."""

    op_types: tuple[str, ...] = PASS_THROUGH_OPS

    def check(self, m: Match) -> Reason | None:
        x = m.input(0)
        problem = _activation_problem(x, "the input")
        if problem:
            return problem
        assert x is not None
        for k, value in enumerate(m.node.outputs):
            q = m.outputs[k]
            if q is None:
                if value.is_graph_output() or list(value.uses()):
                    return Reason("pass_through_form", f"output {value.name} is read as float")
                continue
            if not q.same_params(x):
                return Reason(
                    "pass_through_form",
                    f"output {value.name} is quantized with other parameters than the input "
                    f"(scale {_scalar(q.scales):.6g}, zero point {_scalar(q.zero_points):g} vs "
                    f"{_scalar(x.scales):.6g}, {_scalar(x.zero_points):g})",
                )
        if m.node.op_type == "MaxPool" and m.ctx.opset < 12:
            return Reason("pass_through_form", "MaxPool runs on int8/uint8 from opset 12 on")
        if m.node.op_type == "Resize" and attr_str(m.node, "mode", "nearest") != "nearest":
            mode = attr_str(m.node, "mode", "nearest")
            return Reason(
                "pass_through_form", f"Resize mode is {mode}; only nearest runs unchanged on integers"
            )
        if m.node.op_type == "Pad":
            return _pad_fill_problem(m.node, x, m.ctx.opset)
        return None

    def kernel(self, m: Match) -> Kernel | None:
        x = m.input(0)
        assert x is not None
        return Kernel(m.node.op_type, {0: x.dtype})

    def rewrite(self, m: Match) -> str:
        x = m.input(0)
        assert x is not None
        m.node.replace_input_with(0, x.data)
        if m.node.op_type == "Pad" and attr_str(m.node, "mode", "constant") == "constant":
            fill = _quantized_fill(m.node, x)
            if len(m.node.inputs) < 3:
                m.node.resize_inputs(3)
            base = m.node.name or "Pad"
            m.node.replace_input_with(2, m.ctx.initializer(f"{base}_fill", fill))
        for value, q in zip(m.node.outputs, m.outputs, strict=True):
            if q is not None:
                assert q.dtype is not None
                value.type = ir.TensorType(q.dtype)
                take_over(q.data, value)
        remove_dead([*(q.node for q in m.outputs if q), *_dq_nodes(m)])
        return m.node.op_type


@dataclass(frozen=True, kw_only=True)
class UpsampleRule(PassThroughRule):
    """Rule 7b: DQ → pixel-repeating ``Resize`` → Q (same parameters) ⇒ a channels-last ``Expand``.

    The repeat runs as a broadcast on the integer tensor (:mod:`onnxq.rewrite.nearest_upsample`: ONNX
    Runtime's NHWC uint8 Resize is slow). Other Resize nodes are left to :class:`PassThroughRule`.
    """

    op_types: tuple[str, ...] = ("Resize",)

    def match(self, node: ir.Node, ctx: _Context) -> Match | None:
        if repeat_factors(node, ctx.opset) is None:
            return None
        return super().match(node, ctx)

    def kernel(self, m: Match) -> Kernel | None:
        x = m.input(0)
        assert x is not None
        return Kernel("Expand", {0: x.dtype})

    def rewrite(self, m: Match) -> str:
        x, y = m.input(0), m.output
        factors = repeat_factors(m.node, m.ctx.opset)
        assert x is not None and y is not None and factors is not None and x.dtype is not None
        dtype = x.dtype

        def emit(
            op: str, inputs: list[ir.Value | None], attrs: list[ir.Attr], out: ir.DataType | None
        ) -> ir.Value:
            return m.ctx.emit(m, op, inputs, attrs, dtype=out or dtype)

        repeated = channels_last_repeat(x.data, factors, m.ctx.opset, emit, m.ctx.initializer)
        m.ctx.finish(m, repeated, y.data)
        return "Expand"


def _pad_fill(node: ir.Node) -> float | None:
    """The float fill value of a constant-mode Pad (0 when omitted); ``None`` when not a constant."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        return attr_float(node, "value", 0.0)
    data = const_array(value)
    return None if data is None or data.size != 1 else float(data.reshape(-1)[0])


def _quantized_fill(node: ir.Node, x: QTensor) -> np.ndarray:
    """The fill value on ``x``'s integer grid (exact: :func:`_pad_fill_problem` checked it)."""
    fill = _pad_fill(node)
    assert fill is not None and x.dtype is not None and x.scales is not None and x.zero_points is not None
    level = round(fill / _scalar(x.scales)) + int(_scalar(x.zero_points))
    return np.asarray(level, dtype=np.uint8 if x.dtype == ir.DataType.UINT8 else np.int8)


def _pad_fill_problem(node: ir.Node, x: QTensor, opset: int) -> Reason | None:
    """Why a Pad cannot run on ``x``'s integer tensor (its fill value must be a grid point)."""
    if attr_str(node, "mode", "constant") != "constant":
        return None  # reflect/edge copy existing values
    if opset < 11:
        return Reason("pass_through_form", "Pad below opset 11 takes its fill value as an attribute")
    fill = _pad_fill(node)
    if fill is None:
        return Reason("pass_through_form", "the Pad fill value is not a constant")
    if not np.isfinite(fill):
        return Reason("pass_through_form", f"the Pad fill value is {fill:g}: no integer grid holds it")
    if x.dtype not in _QRANGE or x.scales is None or x.zero_points is None or not x.per_tensor:
        return Reason("pass_through_form", "the Pad input is not per-tensor 8-bit")
    scale, zero = _scalar(x.scales), int(_scalar(x.zero_points))
    level = round(fill / scale) + zero
    low, high = _QRANGE[x.dtype]
    if not low <= level <= high or abs((level - zero) * scale - fill) > 1e-6 * max(1.0, abs(fill)):
        return Reason("pass_through_form", f"the Pad fill value {fill:g} is not on the input's integer grid")
    return None


@dataclass(frozen=True, kw_only=True)
class UnsupportedRule(Rule):
    """An anchor op with no integer kernel: always declined, with ``reason``."""

    reason: str
    anchor: bool = True

    def check(self, m: Match) -> Reason | None:
        return Reason("no_kernel", self.reason)

    def rewrite(self, m: Match) -> str:  # pragma: no cover - check always declines
        raise AssertionError("unreachable")


#: The rules the pass applies, in the order of the module docstring.
RULES: tuple[Rule, ...] = (
    ConvRule(),
    MatMulRule(),
    GemmRule(),
    BinaryRule(op_types=("Add",), qop="QLinearAdd"),
    BinaryRule(op_types=("Mul",), qop="QLinearMul"),
    ConcatRule(),
    UnaryRule(
        op_types=("GlobalAveragePool",), qop="QLinearGlobalAveragePool", attributes=_global_pool_attributes
    ),
    UnaryRule(
        op_types=("AveragePool",),
        qop="QLinearAveragePool",
        attributes=_average_pool_attributes,
        problem=_average_pool_problem,
    ),
    UnaryRule(op_types=("Sigmoid",), qop="QLinearSigmoid"),
    UnaryRule(op_types=("LeakyRelu",), qop="QLinearLeakyRelu", attributes=_leaky_relu_attributes),
    UnaryRule(op_types=("Softmax",), qop="QLinearSoftmax", attributes=_softmax_attributes),
    UpsampleRule(),
    PassThroughRule(),
    UnsupportedRule(
        op_types=("ConvTranspose",),
        data_inputs=(0, 1),
        reason="ONNX Runtime has no QLinearConvTranspose kernel (CPU)",
    ),
)

#: Pass-through ops that ONNX Runtime's QDQ fusions leave between their DequantizeLinear and
#: QuantizeLinear although it has integer kernels for them: onnxq's QDQ output runs them on the integer
#: tensor itself (the rest of the QDQ graph is left for ONNX Runtime to fuse).
QDQ_KEPT_PASS_THROUGH = ("Pad", "DepthToSpace", "SpaceToDepth")
QDQ_PASS_THROUGH_RULES: tuple[Rule, ...] = (UpsampleRule(), PassThroughRule(op_types=QDQ_KEPT_PASS_THROUGH))


# --------------------------------------------------------------------------------------------------
# Rule 9: Q/DQ pairs and chains


def _collapse_once(graph: ir.Graph) -> bool:
    """One sweep of rule 9 over ``graph``; whether anything changed."""
    changed = False
    for q_node in list(graph):
        if q_node.graph is not graph or not _is_op(q_node, "QuantizeLinear"):
            continue
        dq = _dequantized(q_node.inputs[0])
        q = _qtensor(q_node)
        if dq is None or q is None:
            continue
        if q.same_params(dq) and q.dtype in _QRANGE and not q.data.is_graph_output():
            q.data.replace_all_uses_with(dq.data)
            remove_dead([q_node, dq.node])
            changed = True
            continue
        # DQ1 → Q1 → DQ2 → Q2: Q2 reads DQ1's output when Q1 clips no more than Q2 (or DQ1's range).
        producer = dq.data.producer()
        middle = _qtensor(producer) if _is_op(producer, "QuantizeLinear") else None
        first = _dequantized(middle.node.inputs[0]) if middle is not None else None
        if middle is None or first is None or _sole_reader(middle.data) is not dq.node:
            continue
        if _sole_reader(dq.node.outputs[0]) is not q_node:
            continue
        if not all(t.per_tensor and t.dtype in _QRANGE for t in (first, middle, dq, q)):
            continue
        mid_lo, mid_hi = middle.float_range()
        covers = [t.float_range() for t in (q, first)]
        if not any(mid_lo <= lo and hi <= mid_hi for lo, hi in covers):
            continue
        q_node.replace_input_with(0, first.node.outputs[0])
        remove_dead([dq.node, middle.node])
        changed = True
    return changed


# --------------------------------------------------------------------------------------------------
# The pass


class FuseQLinearPass(ir.passes.InPlacePass):
    """Lower QDQ to QOperator form (see the module docstring for the rules and when they decline).

    ``conv_integer=True`` lowers a Conv without output Q to ConvInteger (off by default: ONNX Runtime's
    ConvInteger is slow); ``ms_domain=False`` emits only default-domain ops (QLinearConv, QLinearMatMul,
    MatMulInteger, ConvInteger and the pass-through ops) and declines the rest. ``table`` replaces the
    rule table (:data:`RULES`) with a subset, e.g. :data:`QDQ_PASS_THROUGH_RULES`.
    """

    def __init__(
        self, *, conv_integer: bool = False, ms_domain: bool = True, table: Sequence[Rule] | None = None
    ) -> None:
        super().__init__()
        self.conv_integer = conv_integer
        self.ms_domain = ms_domain
        self.table = RULES if table is None else tuple(table)
        self.lowered: collections.Counter[str] = collections.Counter()
        self.declined: list[Decline] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = _Context(model, conv_integer=self.conv_integer, ms_domain=self.ms_domain)
        outcome = rules.RuleOutcome()
        modified = False
        for graph in list(rules.graphs_of(model)):
            # Per graph, so that Q/DQ pairs collapse before the next graph's rules look at them.
            outcome.extend(
                rules.apply_rules(model, self.table, ctx, stage="lower", opset=ctx.opset, nodes=list(graph))
            )
            while _collapse_once(graph):
                modified = True
        self.lowered = outcome.rewritten
        self.declined = outcome.declines
        modified = modified or outcome.modified
        if ctx.used_ms_domain and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        if modified:
            common.RemoveUnusedNodesPass()(model)
        for decline in self.declined:
            logger.debug("%s", decline)
        return ir.passes.PassResult(model, modified=modified)
