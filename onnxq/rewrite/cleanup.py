"""Cleanup after a rewrite: what quantization made dead goes, and the graph is sorted again."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxq.rewrite.captured_dequantize import move_dequantize_past_captured

__all__ = ["cleanup"]


def cleanup(model: ir.Model) -> None:
    """Make the rewritten model safe to load, drop what quantization made dead, sort it again.

    Safe to load: ONNX Runtime's QDQ propagation must not meet a value read in a subgraph
    (:mod:`onnxq.rewrite.captured_dequantize`).
    """
    move_dequantize_past_captured(model)
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
