"""The pipeline: :func:`quantize` orders the stages and returns a :class:`QuantizationResult`.

- :mod:`~onnxq.pipeline.entry`: :func:`quantize` (load → versions → preprocess → one mode → lower →
  cleanup) and the report built from the stages' summaries (:mod:`~onnxq.pipeline.summary`);
- the modes: :mod:`~onnxq.pipeline.static` (plan → calibrate → insert Q/DQ),
  :mod:`~onnxq.pipeline.dynamic`, :mod:`~onnxq.pipeline.requantize` (input already quantized), and
  :mod:`~onnxq.pipeline.lower` (QOperator form);
- :mod:`~onnxq.pipeline.state`: :class:`StaticState`, what static quantization keeps so that variants
  (layers kept float) cost a rewrite, not a calibration;
- :mod:`~onnxq.pipeline.result`: :class:`QuantizationResult` (save, validate, accuracy budget).
"""

from __future__ import annotations

from onnxq.pipeline.entry import quantize
from onnxq.pipeline.result import QuantizationResult
from onnxq.pipeline.state import StaticState

__all__ = ["QuantizationResult", "StaticState", "quantize"]
