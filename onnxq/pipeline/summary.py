"""Typed summaries of what each stage did, and the one place the report is built from them.

Each mode of :func:`onnxq.pipeline.quantize` returns a :class:`ModeSummary` (and lowering a
:class:`LoweringSummary`); :func:`build_report` turns them, with preprocessing's summary, into the
:class:`~onnxq.report.QuantReport`. No stage writes report fields by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from onnxq.declines import Decline
from onnxq.preprocess import PreprocessSummary
from onnxq.report import QuantReport

__all__ = ["CalibrationSummary", "LoweringSummary", "Mode", "ModeSummary", "build_report"]

Mode = Literal["static", "dynamic", "requantize"]


@dataclass(frozen=True)
class CalibrationSummary:
    """How the activation ranges were measured."""

    method: str
    samples: int
    runs: int
    seconds: float
    tensors: int
    random: bool
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "samples": self.samples,
            "runs": self.runs,
            "seconds": self.seconds,
            "tensors": self.tensors,
            "random": self.random,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class ModeSummary:
    """What one mode (static, dynamic, requantize) did to the model."""

    mode: Mode
    quantized_op_types: dict[str, int]
    float_op_types: dict[str, int] = field(default_factory=dict)
    declines: tuple[Decline, ...] = ()
    notes: tuple[str, ...] = ()
    activations_absorbed: int = 0
    subgraph_nodes: int = 0
    bodies: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Set when the mode changes the node count itself (normalization); else preprocessing's count.
    nodes_after: int | None = None
    calibration: CalibrationSummary | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: The tensors outlier smoothing rescaled (the per-layer numeric suite compares them after the rescale).
    smoothed: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoweringSummary:
    """What lowering to QOperator form did: new op types, and what stayed in QDQ form and why."""

    lowered_op_types: dict[str, int]
    declines: tuple[Decline, ...]
    seconds: float


def build_report(
    *,
    label: str,
    source_producer: str,
    version_notes: list[str],
    preprocessed: PreprocessSummary,
    mode: ModeSummary,
    lowering: LoweringSummary | None,
    scheme: dict[str, str],
    settings: dict[str, Any],
    size_float_bytes: int,
    size_quantized_bytes: int,
) -> QuantReport:
    """The report of one quantization, from the stages' summaries."""
    timings = {"preprocess": preprocessed.seconds, **mode.timings_s}
    declines = [*preprocessed.declines, *mode.declines]
    lowered: dict[str, int] = {}
    if lowering is not None:
        timings["lower"] = lowering.seconds
        declines += lowering.declines
        lowered = dict(sorted(lowering.lowered_op_types.items()))
    return QuantReport(
        model=label,
        mode=mode.mode,
        scheme=scheme,
        settings=settings,
        source_producer=source_producer,
        version_notes=list(version_notes),
        preprocess_notes=[*preprocessed.notes, *mode.notes],
        batchnorms_folded=preprocessed.batchnorms_folded,
        affine_folded=preprocessed.affine_folded,
        equalized_pairs=preprocessed.equalized,
        canonicalized=dict(preprocessed.canonicalized),
        nodes_before=preprocessed.nodes_before,
        nodes_after=preprocessed.nodes_after if mode.nodes_after is None else mode.nodes_after,
        quantized_op_types=dict(sorted(mode.quantized_op_types.items())),
        activations_absorbed=mode.activations_absorbed,
        float_op_types=dict(sorted(mode.float_op_types.items())),
        declines=declines,
        lowered_op_types=lowered,
        subgraph_nodes=mode.subgraph_nodes,
        bodies={name: list(counts) for name, counts in mode.bodies.items()},
        calibration=mode.calibration.as_dict() if mode.calibration is not None else {},
        size_float_bytes=size_float_bytes,
        size_quantized_bytes=size_quantized_bytes,
        timings_s=timings,
        smoothed_tensors=sorted(mode.smoothed),
    )
