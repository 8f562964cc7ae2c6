"""onnxq: an ONNX graph-rewriting quantization optimizer.

Typical use, right after ``torch.onnx.export``::

    import onnxq
    result = onnxq.quantize("model.onnx", calibration_feeds)
    result.save("model.int8.onnx")
    print(result.report.format_table())

Heavy modules (onnx-ir, onnxruntime) are imported on first use so that ``python -m onnxq --help`` is
instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxq.config import (
    ActivationScheme,
    CalibrationConfig,
    DynamicConfig,
    NodeOverride,
    QuantConfig,
    ValidationConfig,
    WeightScheme,
)
from onnxq.errors import OnnxqError
from onnxq.version import __version__

if TYPE_CHECKING:
    from onnxq.pipeline import QuantizationResult, quantize

__all__ = [
    "ActivationScheme",
    "CalibrationConfig",
    "DynamicConfig",
    "NodeOverride",
    "OnnxqError",
    "QuantConfig",
    "QuantizationResult",
    "ValidationConfig",
    "WeightScheme",
    "__version__",
    "quantize",
]


def __getattr__(name: str) -> Any:
    if name in ("quantize", "QuantizationResult"):
        from onnxq import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
