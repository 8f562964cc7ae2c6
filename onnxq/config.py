"""Typed, frozen configuration for quantization.

Vocabulary follows torch.ao.quantization: a *scheme* says how a tensor is quantized (data type,
symmetric or affine, per-tensor or per-channel); the calibration config says how activation ranges are
observed. Overrides apply with the precedence global < op type < node name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from onnxq.errors import OnnxqError

__all__ = [
    "AUTO_METHODS",
    "CALIBRATION_METHODS",
    "LATENCY_GUARD_ENV",
    "TIMING_NOISE",
    "ActivationScheme",
    "CalibrationConfig",
    "DynamicConfig",
    "LatencyGuardConfig",
    "NodeOverride",
    "QuantConfig",
    "ValidationConfig",
    "WeightScheme",
]

QuantDType = Literal["uint8", "int8"]
CalibrationMethod = Literal["minmax", "moving_average", "percentile", "entropy", "mse", "auto"]
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "moving_average", "percentile", "entropy", "mse", "auto")
#: The range methods ``auto`` chooses from (one histogram gives all of them).
AUTO_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class ActivationScheme:
    """How activation tensors are quantized: always per-tensor.

    The default, uint8 with a zero point, is what ONNX Runtime's x86 kernels run fastest and lets
    ReLU/Clip be absorbed into the producer (a zero point at 0 clamps negatives away).
    """

    dtype: QuantDType = "uint8"
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "int8"):
            raise ValueError(f"activation dtype must be 'uint8' or 'int8', got {self.dtype!r}")
        if self.symmetric and self.dtype == "uint8":
            raise ValueError("symmetric activations need dtype 'int8' (uint8 is always affine)")


@dataclass(frozen=True)
class WeightScheme:
    """How constant weights are quantized. Symmetric per-channel int8 is the accurate default."""

    dtype: QuantDType = "int8"
    symmetric: bool = True
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "int8"):
            raise ValueError(f"weight dtype must be 'uint8' or 'int8', got {self.dtype!r}")
        if self.symmetric and self.dtype == "uint8":
            raise ValueError("symmetric weights need dtype 'int8'")


@dataclass(frozen=True)
class CalibrationConfig:
    """How activation ranges are observed on calibration data.

    ``percentile`` is used by the percentile method; ``num_bins`` sizes the fixed histograms of the
    histogram-based methods (percentile, entropy, mse), which bounds calibration memory per tensor;
    ``averaging_constant`` is the weight of each new sample in the moving-average min-max.
    ``batch_size`` stacks that many samples into one ONNX Runtime run (inputs with a dynamic axis 0).
    ``auto`` gives every tensor the ranges of each of :data:`AUTO_METHODS` from one histogram and keeps
    the method whose quantized model has the lowest output error on held-out calibration samples
    (:mod:`onnxq.pipeline.range_choice`). ``range_rescue`` lets min-max ranges whose model loses much on
    the held-out samples be replaced by ``auto``'s (:mod:`onnxq.pipeline.range_rescue`).
    ``narrow_to_readers`` leaves out of a tensor's range the values its readers cannot tell apart (a
    hard-swish's input below -3, a SiLU's below -16: :mod:`onnxq.plan.saturating_readers`); the range
    rescue's check turns it off where the held-out samples score the whole ranges better (on the zoo's
    Paddle hard-swish models, mostly), for one scored rewrite where something narrows. ``None`` (the
    default) narrows only where that check ran and kept it; ``True`` narrows where no check runs too
    (another method, no held-out data); ``False`` never.
    """

    method: CalibrationMethod = "minmax"
    percentile: float = 99.999
    num_bins: int = 4096
    averaging_constant: float = 0.01
    batch_size: int = 1
    range_rescue: bool = True
    narrow_to_readers: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.num_bins < 64 or self.num_bins & (self.num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 64, got {self.num_bins}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class NodeOverride:
    """Per-op-type or per-node settings; ``None`` fields inherit from the level below."""

    quantize: bool | None = None
    activations: ActivationScheme | None = None
    weights: WeightScheme | None = None


@dataclass(frozen=True)
class ValidationConfig:
    """How the result is checked in ONNX Runtime after quantization."""

    enabled: bool = True
    provider: Literal["cpu", "cuda"] = "cpu"
    threads: tuple[int, ...] = (1,)
    latency_runs: int = 30
    warmup_runs: int = 3


#: Environment variable that turns the latency guard off by default (``off``/``0``/``false``/``no``):
#: for byte-reproducible builds and CI, where the guard's timing-based choices are not wanted.
LATENCY_GUARD_ENV = "ONNXQ_LATENCY_GUARD"


def guard_enabled_by_default() -> bool:
    """Whether the latency guard runs when the configuration does not say (see :data:`LATENCY_GUARD_ENV`)."""
    return os.environ.get(LATENCY_GUARD_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


#: Two timings of one model differ by up to this fraction on a quiet machine: a latency gain below it is
#: noise, not worth a quantized model's rounding error (the latency guard's ``min_gain``, the accuracy
#: target's check against float, the report's "slower than the input").
TIMING_NOISE = 0.03


@dataclass(frozen=True)
class LatencyGuardConfig:
    """The latency guard of static quantization (:mod:`onnxq.tuning.latency_guard`).

    Kinds of layers whose int8 version measures slower than float on this machine are kept float, and
    a model that no quantized variant makes faster stays float. ``threads`` is the intra-op thread
    count timed; ``min_gain`` the fraction a change must save to count (below it, it is noise);
    ``budget_s`` bounds each candidate's share of a timing block (at least ``min_runs`` rounds, 2 for
    models that take over 0.1 s a round; a candidate stops running once its decision is clear). The guard's
    choices follow this machine's timings, so two runs may differ where candidates are within noise;
    turn it off (``enabled=False``, ``--no-latency-guard``, :data:`LATENCY_GUARD_ENV`) for byte-identical
    outputs.
    """

    enabled: bool = field(default_factory=lambda: guard_enabled_by_default())
    threads: int = 1
    min_gain: float = TIMING_NOISE
    budget_s: float = 0.6
    min_runs: int = 3
    max_runs: int = 100
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: Also time the chosen int8 model against the float model at ONNX Runtime's default intra-op
    #: thread count (what a session opened without options runs: one per physical core), where that
    #: differs from ``threads`` and int8 gains little at ``threads``; a model slower there stays float.
    check_default_threads: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"latency guard threads must be at least 1, got {self.threads}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"latency guard min_gain must be in [0, 1), got {self.min_gain}")


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic quantization: int8 weights, activations quantized at run time (no calibration data).

    ``conv`` also quantizes Conv dynamically (ConvInteger is slow in ONNX Runtime, so off by default);
    ``embeddings`` stores Gather tables (token and position embeddings of at least 8 columns and 4096
    values) as int8 with one scale per row, dequantizing only the gathered rows: on by default, as in
    ONNX Runtime's quantizers (all-MiniLM-L6: 59 → 23.5 MB, sentence-embedding cosine 0.9970 → 0.9969,
    latency unchanged);
    ``lstm`` turns LSTMs into ``com.microsoft.DynamicQuantizeLSTM`` (int8 weights, the input and the
    hidden state quantized at run time). ``embeddings`` and ``lstm`` apply to static quantization too,
    to what its plan leaves float: ONNX Runtime has no static int8 LSTM, and its dynamic one runs the
    recurrence 4× faster than float (ddddocr's CRNN: 3.3 → 0.75 ms, the model 0.56 → 0.35× float,
    character accuracy unchanged).
    """

    conv: bool = False
    embeddings: bool = True
    lstm: bool = True


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what the quantized model looks like.

    ``op_type_overrides`` and ``node_overrides`` map an op type / node name to a :class:`NodeOverride`;
    ``exclude_op_types`` / ``exclude_nodes`` are shorthands for ``NodeOverride(quantize=False)``.
    """

    activations: ActivationScheme = field(default_factory=ActivationScheme)
    weights: WeightScheme = field(default_factory=WeightScheme)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    exclude_op_types: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    op_type_overrides: Mapping[str, NodeOverride] = field(default_factory=dict)
    node_overrides: Mapping[str, NodeOverride] = field(default_factory=dict)
    #: ``static`` calibrates activation ranges; ``dynamic`` computes them at run time.
    mode: Literal["static", "dynamic"] = "static"
    #: ``qdq`` keeps QuantizeLinear/DequantizeLinear around float ops (ONNX Runtime fuses them);
    #: ``qoperator`` lowers them to integer operators (QLinearConv, QLinearMatMul, ...).
    format: Literal["qdq", "qoperator"] = "qdq"
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    latency_guard: LatencyGuardConfig = field(default_factory=LatencyGuardConfig)
    #: Static mode: cross-layer equalization of Conv → Relu → Conv chains before calibration
    #: (:mod:`onnxq.preprocess.equalize`; exact in float, evens out per-channel ranges).
    equalize: bool = False
    #: Static mode: migrate outlier channels from activations into the weights of the MatMul/Gemm
    #: that read them (:mod:`onnxq.preprocess.smooth`; exact in float, strength chosen per tensor,
    #: a tensor without outliers left alone). On by default: pretrained transformers need it
    #: (MiniLM's sentence-embedding cosine 0.988 → 0.997) and it costs one float pass where a
    #: tensor qualifies.
    smooth: bool = True
    #: Static mode: even out the channels of depthwise Conv inputs whose producer cannot take the
    #: factor (a hard-swish, a residual Add) with a float ``Mul`` in front (:mod:`onnxq.preprocess.smooth`;
    #: exact in float). Costs a float op per such input (the integer ops before it run in float too),
    #: so it is off by default; the ``--target`` search tries it (PP-OCRv5 det: IoU 0.80 → 0.87).
    equalize_depthwise_inputs: bool = False
    #: Static mode: add to each quantized layer's bias the mean error its weight rounding adds
    #: (:mod:`onnxq.calibrate.bias_correction`; measured on the calibration data).
    bias_correction: bool = False
    #: Static mode: subtract from each quantized Conv/Gemm's bias the mean error its input's rounding
    #: adds (:mod:`onnxq.calibrate.input_rounding`: ``W·E[Q(x) - x]`` with the input's calibrated
    #: range, measured with the float model on the calibration data; one float run over a few batches).
    #: On by default.
    input_bias_correction: bool = True
    #: Static mode: MatMul/Gemm with a constant weight quantize their input at run time
    #: (``DynamicQuantizeMatMul``: its own per-tensor range on each run) instead of with a calibrated
    #: range; every other op stays static. A calibrated range must hold every sample's largest
    #: token, a run-time one only this input's (all-mpnet-base-v2: sentence-embedding cosine 0.9930 →
    #: 0.9950 on held-out sentences at the same latency, where keeping the 32 most sensitive of its 96
    #: layers float reaches 0.9952 at 1.55× the latency), and ONNX Runtime's kernel takes the bias and
    #: gives float out, so it is as fast or faster (13 transformer architectures: 0.62 → 0.59× float on
    #: BERT). On by default, except for products fed by another weighted layer through ops that keep
    #: int8 (a CNN's fully connected head: there calibrated int8 runs kernel to kernel). Off: the
    #: ``--target`` search tries it.
    run_time_ranges: bool = True

    def __post_init__(self) -> None:
        # Frozen means frozen: a copy of the caller's mappings that nobody can change afterwards.
        for name in ("op_type_overrides", "node_overrides"):
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.format not in ("qdq", "qoperator"):
            raise ValueError(f"format must be 'qdq' or 'qoperator', got {self.format!r}")

    def replace(self, **changes: object) -> QuantConfig:
        """A copy with some fields changed (``dataclasses.replace`` spelled as a method)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def check_names(
        self,
        *,
        node_names: Collection[str],
        model_op_types: Collection[str],
        known_op_types: Collection[str],
    ) -> None:
        """Raise :class:`OnnxqError` for a node name not in the model or an op type that no op has.

        A misspelt exclusion (``conv`` for ``Conv``, a typo in a node name) would otherwise be ignored
        without a word and the node quantized. Op types that exist but not in this model are fine (one
        configuration serves many models). The message names the closest matches.
        """
        nodes = {*self.exclude_nodes, *self.node_overrides}
        for name in sorted(nodes):
            if name not in node_names:
                raise OnnxqError(
                    f"node {name!r} (excluded or overridden in the configuration) is not in the model"
                    + _closest(name, node_names)
                )
        op_types = {*self.exclude_op_types, *self.op_type_overrides}
        for op_type in sorted(op_types):
            if op_type not in model_op_types and op_type not in known_op_types:
                raise OnnxqError(
                    f"op type {op_type!r} (excluded or overridden in the configuration) is not an "
                    "ONNX op type" + _closest(op_type, [*model_op_types, *known_op_types])
                )

    def resolve(self, node_name: str, op_type: str) -> NodeOverride:
        """The effective settings for one node: global < op type < node name."""
        quantize = op_type not in self.exclude_op_types and node_name not in self.exclude_nodes
        activations, weights = self.activations, self.weights
        for override in (self.op_type_overrides.get(op_type), self.node_overrides.get(node_name)):
            if override is None:
                continue
            if override.quantize is not None:
                quantize = override.quantize
            activations = override.activations or activations
            weights = override.weights or weights
        if node_name in self.exclude_nodes:
            quantize = False
        return NodeOverride(quantize=quantize, activations=activations, weights=weights)


def _closest(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'Conv'?"`` for the closest candidates (case-insensitive), or ``""``."""
    pool = sorted(set(candidates))
    by_lower: dict[str, list[str]] = {}
    for candidate in pool:
        by_lower.setdefault(candidate.lower(), []).append(candidate)
    matches = [c for c in by_lower.get(name.lower(), []) if c != name]
    for lowered in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6):
        matches += [c for c in by_lower[lowered] if c not in matches and c != name]
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches[:3]) + "?"
