"""Dynamic quantization of a float model: int8 weights, activations quantized at run time."""

from __future__ import annotations

import collections
import time

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.pipeline.static import nothing_to_quantize
from onnxq.pipeline.summary import ModeSummary
from onnxq.rewrite.dynamic_quant import QUANTIZED_OP_TYPES, DynamicQuantizePass

__all__ = ["quantize_dynamic"]


def quantize_dynamic(model: ir.Model, config: QuantConfig, *, label: str) -> ModeSummary:
    """Rewrite ``model`` with :class:`~onnxq.rewrite.dynamic_quant.DynamicQuantizePass` (no calibration)."""
    start = time.perf_counter()
    rewrite = DynamicQuantizePass(config)
    rewrite(model)
    if not rewrite.quantized:
        raise nothing_to_quantize(model, label, rewrite.declined)
    float_ops = collections.Counter(n.op_type for n in model.graph if n.op_type not in QUANTIZED_OP_TYPES)
    return ModeSummary(
        mode="dynamic",
        quantized_op_types=dict(rewrite.quantized),
        float_op_types=dict(float_ops),
        declines=tuple(rewrite.declined),
        subgraph_nodes=sum(len(g) for g in model.graph.subgraphs()),
        timings_s={"rewrite": time.perf_counter() - start},
    )
