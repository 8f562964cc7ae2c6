"""The declarative table of how each op type takes part in static Q/DQ quantization.

Every op type the quantizer knows has one :class:`OpRule`. The kinds:

- ``ANCHOR`` — ops worth quantizing on their own: integer kernels with a large speed-up
  (Conv → QLinearConv, MatMul → QLinearMatMul / MatMulIntegerToFloat, Gemm → QGemm). Their constant
  weight is quantized per channel and their bias to int32.
- ``INTEGER`` — ops that ONNX Runtime runs on quantized data (QLinearAdd, QLinearConcat,
  QLinearAveragePool, QLinearWhere, ArgMax on the integer tensor, …) but that only pay when the data
  around them is already quantized: they are quantized when all their inputs come quantized and some
  consumer wants their output quantized (ArgMax, with no float output: when its input comes quantized).
- ``PASSTHROUGH`` — ops that move or select values without arithmetic (Reshape, Transpose, MaxPool,
  nearest/linear Resize, Slice, Gather, GatherElements, Expand, Tile, ReduceMax/Min, Pad, …): the
  output reuses the input's scale and zero point, so ONNX Runtime drops the DQ→op→Q around them and
  runs them on int8 data (where it does not — Pad, DepthToSpace, SpaceToDepth — onnxq does).
- ``ABSORBABLE`` activations (Relu, Clip) directly after a quantized producer get no Q/DQ between the
  two: the activation's output range is the producer's quantized range (a zero point at the bottom of
  the range clamps exactly like the activation, so ONNX Runtime fuses the activation away).

Ops in :data:`FLOAT_REASONS` stay float on purpose; the reason goes into the report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ABSORBABLE_ACTIVATIONS",
    "ANCHOR_OPS",
    "FLOAT_REASONS",
    "OP_RULES",
    "PASSTHROUGH_OPS",
    "OpKind",
    "OpRule",
]


class OpKind(enum.Enum):
    """How an op takes part in quantization (see the module docstring)."""

    ANCHOR = "anchor"
    INTEGER = "integer"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    ``inputs`` are the indices of float data inputs that get Q/DQ (``None``: every input).
    ``weight``/``bias`` index a constant weight and bias (anchors only). ``output`` says when the output
    is quantized: ``"always"`` (the integer kernel needs an output scale) or ``"if_wanted"`` (only when a
    consumer reads it quantized; otherwise ONNX Runtime's float-output kernel is faster and exact).
    ``"none"`` marks an op without a float output (ArgMax): it is quantized when its input comes
    quantized, reading the integer tensor directly. ``shared_scale`` makes all inputs and the output use
    one scale (Concat).
    """

    kind: OpKind
    inputs: tuple[int, ...] | None = (0,)
    weight: int | None = None
    bias: int | None = None
    output: Literal["always", "if_wanted", "none"] = "always"
    shared_scale: bool = False


_ANCHOR = OpKind.ANCHOR
_INTEGER = OpKind.INTEGER
_PASS = OpKind.PASSTHROUGH

OP_RULES: dict[str, OpRule] = {
    # Anchors: the integer kernels that make quantized models fast.
    "Conv": OpRule(_ANCHOR, inputs=(0,), weight=1, bias=2),
    # ONNX Runtime (CPU) has no integer ConvTranspose: its output is quantized only for a reader.
    "ConvTranspose": OpRule(_ANCHOR, inputs=(0,), weight=1, bias=2, output="if_wanted"),
    "Gemm": OpRule(_ANCHOR, inputs=(0, 1), weight=1, bias=2, output="if_wanted"),
    "MatMul": OpRule(_ANCHOR, inputs=(0, 1), weight=1, output="if_wanted"),
    # Integer ops: com.microsoft QLinear kernels (or exact requantization for Relu/Clip).
    "Add": OpRule(_INTEGER, inputs=(0, 1)),
    "Mul": OpRule(_INTEGER, inputs=(0, 1)),
    "Concat": OpRule(_INTEGER, inputs=None, shared_scale=True),
    "AveragePool": OpRule(_INTEGER),
    "GlobalAveragePool": OpRule(_INTEGER),
    "LeakyRelu": OpRule(_INTEGER),
    "Sigmoid": OpRule(_INTEGER),
    "Relu": OpRule(_INTEGER),
    "Clip": OpRule(_INTEGER),
    "Where": OpRule(_INTEGER, inputs=(1, 2)),  # com.microsoft.QLinearWhere
    "ArgMax": OpRule(_INTEGER, output="none"),  # reads the integer tensor (ONNX Runtime drops the DQ)
    # Scale-preserving data movement.
    "MaxPool": OpRule(_PASS),
    "Reshape": OpRule(_PASS),
    "Transpose": OpRule(_PASS),
    "Flatten": OpRule(_PASS),
    "Squeeze": OpRule(_PASS),
    "Unsqueeze": OpRule(_PASS),
    "Resize": OpRule(_PASS),
    "Slice": OpRule(_PASS),
    "Split": OpRule(_PASS),
    "Gather": OpRule(_PASS),
    "GatherElements": OpRule(_PASS),
    "Expand": OpRule(_PASS),
    "Tile": OpRule(_PASS),
    "ReduceMax": OpRule(_PASS),
    "ReduceMin": OpRule(_PASS),
    # ONNX Runtime keeps the Q/DQ around these three (no fusion); onnxq's QDQ rewrite runs them on the
    # integer tensor itself (onnxq.rewrite.integer_passthrough), Pad with its fill value quantized.
    "Pad": OpRule(_PASS),
    "DepthToSpace": OpRule(_PASS),
    "SpaceToDepth": OpRule(_PASS),
}

#: Op types whose quantization decides the speed and the accuracy (what sensitivity analysis ranks).
ANCHOR_OPS: tuple[str, ...] = tuple(op for op, rule in OP_RULES.items() if rule.kind is OpKind.ANCHOR)

#: Op types that move or select values without arithmetic (they reuse their input's scale).
PASSTHROUGH_OPS: tuple[str, ...] = tuple(
    op for op, rule in OP_RULES.items() if rule.kind is OpKind.PASSTHROUGH
)

#: Activations fused into the range of a quantized producer instead of getting their own Q/DQ.
ABSORBABLE_ACTIVATIONS = ("Relu", "Clip")

#: Op types deliberately left float, with the reason shown in the report.
_FLOAT_ISLAND = (
    "no integer kernel in ONNX Runtime CPU: runs in float between one DequantizeLinear and one QuantizeLinear"
)

FLOAT_REASONS: dict[str, str] = {
    "HardSigmoid": _FLOAT_ISLAND,
    "HardSwish": _FLOAT_ISLAND,
    "Gelu": _FLOAT_ISLAND,
    "FastGelu": _FLOAT_ISLAND,
    "Softmax": "kept float for accuracy; its output is quantized where a MatMul consumes it",
    "LayerNormalization": "normalisation needs float range; quantizing it costs accuracy for no speed",
    "BatchNormalization": "not folded into a Conv/Gemm (see preprocess notes); runs in float",
    "GRU": "no int8 GRU kernel in ONNX Runtime (its DynamicQuantizeLSTM is for LSTM only): runs in float",
    "RNN": "no int8 RNN kernel in ONNX Runtime: runs in float",
}
