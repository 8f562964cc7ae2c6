"""A model that already holds Q/DQ (PyTorch QAT export, another tool): canonical form, no recalibration."""

from __future__ import annotations

import collections
import time

import onnx_ir as ir

from onnxq.pipeline.summary import ModeSummary
from onnxq.rewrite.normalize_qdq import NormalizeQDQPass

__all__ = ["normalize_existing"]


def normalize_existing(model: ir.Model) -> ModeSummary:
    """Rewrite ``model`` with :class:`~onnxq.rewrite.normalize_qdq.NormalizeQDQPass`; count its Q/DQ."""
    start = time.perf_counter()
    normalize = NormalizeQDQPass()
    normalize(model)
    counts = collections.Counter(
        n.op_type for n in model.graph.all_nodes() if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    )
    return ModeSummary(
        mode="requantize",
        quantized_op_types=dict(counts),
        declines=tuple(normalize.declined),
        notes=(*normalize.notes, *normalize.missing_ranges),
        nodes_after=sum(1 for _ in model.graph.all_nodes()),
        timings_s={"normalize": time.perf_counter() - start},
    )
