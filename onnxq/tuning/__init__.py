"""Accuracy tuning after static quantization: sensitivity analysis and accuracy-budgeted mixed precision.

Everything here starts from a :class:`~onnxq.pipeline.QuantizationResult` of static quantization of a
float model, whose ``static`` state re-quantizes with some anchor nodes (Conv, ConvTranspose, Gemm,
MatMul) left float by rewriting, reusing the calibrated ranges::

    import onnxq
    from onnxq.tuning import AccuracyTarget, meet_target

    result = onnxq.quantize("model.onnx", calibration_feeds)
    outcome = meet_target(result, AccuracyTarget.parse("sqnr>=30"), evaluation_feeds)
    print(outcome.summary())          # which nodes stayed float, and why; what the search cost
    onnxq.load.files.save_model(outcome.model, "model.int8.onnx")

- :mod:`~onnxq.tuning.targets`: :class:`AccuracyTarget` (``"sqnr>=30"``, ``"cosine>=0.995"``,
  ``"top1>=0.99"`` against the float model) and :class:`CustomTarget` (the user's evaluation function
  returning a score, with a minimum); :class:`TargetEvaluator` scores models and counts evaluations.
- :mod:`~onnxq.tuning.sensitivity`: :func:`estimate_sensitivity`, a one-pass estimate of the noise each
  anchor adds, and :func:`measure_sensitivity`, the exact one-at-a-time analysis (only this node
  quantized / all but this node quantized), cached on disk.
- :mod:`~onnxq.tuning.budget`: :func:`meet_target`, the smallest set of anchors to keep float found by
  ranking with the estimate and searching over the top-k (exponential growth, then bisection, then a
  short greedy prune), a handful of evaluations instead of one per layer.

Mixed precision here means int8 versus float; 16-bit activations are out of scope.
"""

from __future__ import annotations

from onnxq.tuning.budget import BudgetOutcome, meet_target
from onnxq.tuning.sensitivity import NodeSensitivity, estimate_sensitivity, measure_sensitivity
from onnxq.tuning.targets import AccuracyTarget, CustomTarget, Target, TargetEvaluator

__all__ = [
    "AccuracyTarget",
    "BudgetOutcome",
    "CustomTarget",
    "NodeSensitivity",
    "Target",
    "TargetEvaluator",
    "estimate_sensitivity",
    "measure_sensitivity",
    "meet_target",
]
