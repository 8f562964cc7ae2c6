"""Cleanup after a rewrite: what quantization made dead goes, and the graph is sorted again."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxq.rewrite.captured_dequantize import move_dequantize_past_captured

__all__ = ["cleanup", "drop_unused_initializers"]


def cleanup(model: ir.Model) -> None:
    """Make the rewritten model safe to load, drop what quantization made dead, sort it again.

    Safe to load: ONNX Runtime's QDQ propagation must not meet a value read in a subgraph
    (:mod:`onnxq.rewrite.captured_dequantize`).
    """
    move_dequantize_past_captured(model)
    common.RemoveUnusedNodesPass()(model)
    drop_unused_initializers(model)
    common.TopologicalSortPass()(model)


def drop_unused_initializers(model: ir.Model) -> None:
    """Drop the initializers, in the main graph and in every If/Loop/Scan body, that nothing reads.

    onnx-ir's unused-node pass prunes the main graph's initializers only; a body's float weight whose
    reader now reads its quantized copy stayed in the file (Silero VAD: every quantized Conv's float
    weight, 0.2 MB of its 2.4). The rewrites after the cleanup (float forms, SiLU islands, sums) can
    orphan main-graph ones too: a SiLU's Sigmoid output scale, which ONNX Runtime then warns about
    on every load.
    """
    for graph in (model.graph, *model.graph.subgraphs()):
        unused = [
            name
            for name, value in graph.initializers.items()
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input()
        ]
        for name in unused:
            graph.initializers.pop(name)
