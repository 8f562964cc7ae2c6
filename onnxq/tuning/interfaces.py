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

__all__ = ["RequantizableState", "StaticResult"]


class RequantizableState(Protocol):
    """A static quantization that can re-quantize with some anchors kept float, by rewriting only."""

    @property
    def float_model(self) -> ir.Model: ...

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

    def requantize(
        self, keep_float: Iterable[str] = (), *, output_format: Literal["qdq", "qoperator"] | None = None
    ) -> ir.Model: ...


class StaticResult(Protocol):
    """A quantization result: its model and, for static quantization of a float model, its state."""

    @property
    def model(self) -> ir.Model: ...

    @property
    def static(self) -> RequantizableState | None: ...
