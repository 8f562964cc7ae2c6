"""Bias Adds after a quantized MatMul written as ``Sum``, so that ONNX Runtime keeps the MatMul integer.

Why: ONNX Runtime's ``MatMulAddFusion`` (a basic-level optimization) turns ``MatMul → Add(bias)`` into
a float ``Gemm`` when the MatMul's first input is 2-D or has a static shape, and it runs before the
QDQ fusions. Around a quantized MatMul that leaves ``DequantizeLinear(x) → Gemm(·, DequantizeLinear(W))``:
the int8 weight is dequantized on every run and the product is computed in float. Every classifier
head exported as ``MatMul`` + ``Add`` (Paddle2ONNX writes each ``nn.Linear`` that way; so does
tf2onnx) pays it: 1.57 of 3.7 ms per inference on a Paddle MobileNetV2, whose int8 model then ran at
0.87× float where ORT's own quantizer reaches 0.53×. ``Sum`` of two inputs computes what ``Add``
does, with the same broadcasting, and the fusion does not match it: the MatMul becomes
``MatMulIntegerToFloat`` and the bias a separate float ``Sum``.

What: in QDQ form, a default-domain ``Add`` that is the only reader of a ``MatMul`` whose two inputs
are both dequantized, whose other input is a constant and whose output stays float, becomes ``Sum``
(in every graph). A bias Add whose output is quantized is left: ``DequantizeLinear → Gemm →
QuantizeLinear`` fuses into an integer ``QGemm``. The QOperator lowering folds such biases itself.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, const_array

__all__ = ["quantized_bias_adds", "write_bias_adds_as_sum"]


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


def write_bias_adds_as_sum(model: ir.Model) -> int:
    """Rewrite :func:`quantized_bias_adds` of ``model`` in place as ``Sum``; returns how many."""
    adds = quantized_bias_adds(model)
    for add in adds:  # same inputs, outputs and names: only the op changes
        add.op_type = "Sum"
    return len(adds)
