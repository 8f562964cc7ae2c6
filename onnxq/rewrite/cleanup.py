"""Cleanup after a rewrite: what quantization made dead goes, and the graph is sorted again."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

__all__ = ["cleanup"]


def cleanup(model: ir.Model) -> None:
    """Drop what quantization made dead and restore topological order."""
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
