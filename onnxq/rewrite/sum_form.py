"""Adds written as ``Sum``: the same numbers, without an ONNX Runtime fusion that costs here.

``Sum`` of two inputs computes what ``Add`` does, with the same broadcasting, and ONNX Runtime's
fusions that start from an ``Add`` do not match it. Two of those fusions cost onnxq's output speed:

- **Residual Adds before LayerNormalization** (:func:`residual_adds`). ONNX Runtime fuses ``Add →
  LayerNormalization`` (a transformer's residual connection and the norm after it) into
  ``com.microsoft.SkipLayerNormalization``. Whether that is faster depends on the release and the
  CPU: on onnxruntime 1.19 the fused kernel takes 30 µs where Add + LayerNormalization take 51 µs
  ([1, 128, 256], one thread), on 1.32 it takes 139 µs where they take 21 µs, and a quantized BERT
  spends a third of its time in it (RoBERTa, dynamo export: 0.63× float with the fusion, 0.46×
  without). The latency guard (:mod:`onnxq.tuning.latency_guard`) times both forms and keeps the
  faster. Matched: a default-domain ``Add`` of two inputs whose output is read by
  ``LayerNormalization`` nodes only (not a graph output), in the main graph.
- **Bias Adds after a quantized MatMul** (:func:`quantized_bias_adds`). ONNX Runtime's
  ``MatMulAddFusion`` (a basic-level optimization, run before the QDQ fusions) turns ``MatMul →
  Add(bias)`` into a float ``Gemm`` when the MatMul's first input is 2-D or has a static shape. Around
  a quantized MatMul that leaves ``DequantizeLinear(x) → Gemm(·, DequantizeLinear(W))``: the int8
  weight is dequantized on every run and the product computed in float. Every classifier head
  exported as ``MatMul`` + ``Add`` (Paddle2ONNX writes each ``nn.Linear`` that way) pays it: 1.57 of
  3.7 ms per inference on a Paddle MobileNetV2, whose int8 model then ran at 0.87× float where ORT's
  own quantizer reaches 0.53×. As a ``Sum`` the MatMul becomes ``MatMulIntegerToFloat``. Matched, in
  QDQ form and every graph: a default-domain ``Add`` that is the only reader of a ``MatMul`` whose two
  inputs are both dequantized, whose other input is a constant and whose output stays float. A bias
  Add whose output is quantized is left (``DequantizeLinear → Gemm → QuantizeLinear`` fuses into an
  integer ``QGemm``); the QOperator lowering folds such biases itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, const_array

__all__ = [
    "quantized_bias_adds",
    "residual_adds",
    "write_as_sum",
    "write_bias_adds_as_sum",
    "write_residual_adds_as_sum",
]


def residual_adds(model: ir.Model) -> list[ir.Node]:
    """The Adds of the main graph that feed LayerNormalization only (ONNX Runtime fuses those)."""
    outputs = set(model.graph.outputs)
    found = []
    for node in model.graph:
        if node.op_type != "Add" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
            continue
        out = node.outputs[0]
        readers = [use.node for use in out.uses()]
        if out in outputs or not readers:
            continue
        if all(r.op_type == "LayerNormalization" and r.domain in DEFAULT_DOMAINS for r in readers):
            found.append(node)
    return found


def _dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return (
        producer is not None and producer.op_type == "DequantizeLinear" and producer.domain in DEFAULT_DOMAINS
    )


def quantized_bias_adds(model: ir.Model) -> list[ir.Node]:
    """The constant-bias Adds that ONNX Runtime would fuse with a quantized MatMul into a float Gemm."""
    found = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if node.op_type != "MatMul" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
                continue
            if not (_dequantized(node.inputs[0]) and _dequantized(node.inputs[1])):
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            if out.is_graph_output() or len(uses) != 1:
                continue
            add = uses[0].node
            if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.inputs) != 2:
                continue
            if const_array(add.inputs[1 - uses[0].idx]) is None:
                continue
            # A quantized sum (read by QuantizeLinear) fuses into an integer QGemm: leave that one.
            if not any(use.node.op_type == "QuantizeLinear" for use in add.outputs[0].uses()):
                found.append(add)
    return found


def write_as_sum(adds: Sequence[ir.Node]) -> int:
    """Rewrite ``adds`` in place as ``Sum`` (same inputs, outputs and names: only the op changes)."""
    for add in adds:
        add.op_type = "Sum"
    return len(adds)


def write_residual_adds_as_sum(model: ir.Model) -> int:
    """Rewrite :func:`residual_adds` of ``model`` in place as ``Sum``; returns how many."""
    return write_as_sum(residual_adds(model))


def write_bias_adds_as_sum(model: ir.Model) -> int:
    """Rewrite :func:`quantized_bias_adds` of ``model`` in place as ``Sum``; returns how many."""
    return write_as_sum(quantized_bias_adds(model))
