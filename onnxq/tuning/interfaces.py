"""What the tuning search needs of a quantization, declared here so tuning never imports the pipeline.

:class:`onnxq.pipeline.StaticState` and :class:`onnxq.pipeline.QuantizationResult` satisfy these
protocols structurally; the pipeline calls into tuning, never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Protocol

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.data import Feeds

__all__ = ["COSTLY_FIXES", "FIXES", "RequantizableState", "StaticResult"]

#: The cheaper fixes an accuracy target tries before keeping layers float, each keeping every layer
#: quantized (so no speed is lost): re-calibration with another range method (``auto``: chosen per
#: tensor on held-out calibration data; percentile and MSE: judged by the target's own metric, which
#: ``auto``'s held-out output SQNR only approximates), run-time ranges for the MatMul/Gemm with a
#: constant weight (``DynamicQuantizeMatMul``: still int8, at about the same speed on transformers),
#: outlier smoothing, cross-layer equalization,
#: empirical bias correction, the input bias correction when ``--no-input-bias-correction`` turned it
#: off (``RequantizableState.with_fix``); last, the per-channel evening-out of
#: depthwise Conv inputs through a float ``Mul`` (run-time ranges and that: :data:`COSTLY_FIXES`).
FIXES = (
    "method=auto",
    # Applies only where --no-input-bias-correction turned it off: early, it costs one float run.
    "input_bias_correction",
    "run_time_ranges",
    "method=percentile",
    "method=mse",
    "smooth",
    "equalize",
    "bias_correction",
    "equalize_depthwise_inputs",
)

#: Fixes that may cost some speed (a float op per depthwise input they even out; a run-time range
#: pass over each product input, ``DynamicQuantizeLinear``, where a calibrated range cost nothing):
#: tried only while no free fix has met the target.
COSTLY_FIXES = ("run_time_ranges", "equalize_depthwise_inputs")


class RequantizableState(Protocol):
    """A static quantization that can re-quantize with some anchors kept float, by rewriting only."""

    @property
    def float_model(self) -> ir.Model: ...

    @property
    def reference_model(self) -> ir.Model: ...

    @property
    def config(self) -> QuantConfig: ...

    @property
    def feeds(self) -> Feeds: ...

    @property
    def ranges(self) -> Mapping[str, tuple[float, float]]: ...

    @property
    def providers(self) -> tuple[str, ...]: ...

    @property
    def quantized_nodes(self) -> tuple[str, ...]: ...

    @property
    def dynamic_ops(self) -> dict[str, int]: ...

    def requantize(
        self, keep_float: Iterable[str] = (), *, output_format: Literal["qdq", "qoperator"] | None = None
    ) -> ir.Model: ...

    def with_fix(self, fix: str) -> RequantizableState: ...

    def float_form(self) -> ir.Model: ...


class StaticResult(Protocol):
    """A quantization result: its model and, for static quantization of a float model, its state."""

    @property
    def model(self) -> ir.Model: ...

    @property
    def static(self) -> RequantizableState | None: ...
