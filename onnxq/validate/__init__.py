"""Validation of quantized models in ONNX Runtime: accuracy against the float model, and latency.

- :mod:`onnxq.validate.smoke`: the check every output passes before it is written (it loads and runs
  at ``ORT_ENABLE_ALL``).
- :mod:`onnxq.validate.compare` and :mod:`onnxq.validate.layers`: the ``compare`` and ``inspect``
  tables (sessions and latency come from :mod:`onnxq.runtime`).
- :mod:`onnxq.validate.metrics` compares the outputs of a reference (float) model and a candidate
  (quantized) model: SQNR, cosine similarity, maximum absolute error and top-1 agreement, accumulated
  over a stream of feeds in memory bounded by the number of outputs.

The ONNX Runtime optimisation level matters: from ``ORT_ENABLE_EXTENDED`` on, ONNX Runtime fuses
QuantizeLinear/DequantizeLinear pairs into QLinear kernels and rewrites int4 weight-only MatMuls into
``MatMulNBits``, which changes the numbers. Check the semantics of a graph at ``"disable"``; measure
deployed accuracy and latency at ``"all"``; and report which level was used.
"""
