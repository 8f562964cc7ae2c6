"""Preprocessing and final cleanup, composed from onnx-ir's common passes and onnxq's folding passes.

Preprocess (before planning): initializers stop being overridable graph inputs, Constant nodes become
initializers (so weights written as Constant nodes are seen as weights), constant subgraphs are folded,
BatchNorm is folded into Conv/ConvTranspose/Gemm, Identity and dead nodes are removed, shapes are
inferred and nodes sorted topologically.

Cleanup (after Q/DQ insertion): dead nodes and the float weights they replaced are dropped, and the
graph is sorted again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxq.passes.fold_bn import FoldBatchNormPass
from onnxq.passes.fold_constants import FoldConstantsPass

__all__ = ["PreprocessSummary", "cleanup", "infer_shapes", "preprocess"]

logger = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    """What preprocessing changed, for the report."""

    nodes_before: int = 0
    nodes_after: int = 0
    batchnorms_folded: int = 0
    notes: list[str] = field(default_factory=list)


def infer_shapes(model: ir.Model) -> bool:
    """Run ONNX shape inference leniently; a model it cannot handle keeps the shapes it has."""
    try:
        common.ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:
        logger.warning("shape inference failed, continuing without it: %s", str(exc).splitlines()[0])
        return False
    return True


def preprocess(model: ir.Model) -> PreprocessSummary:
    """Normalize a float model in place before planning (see module docstring)."""
    summary = PreprocessSummary(nodes_before=sum(1 for _ in model.graph.all_nodes()))
    common.RemoveInitializersFromInputsPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.TopologicalSortPass()(model)
    FoldConstantsPass()(model)
    fold_bn = FoldBatchNormPass()
    fold_bn(model)
    summary.batchnorms_folded = len(fold_bn.folded)
    summary.notes.extend(fold_bn.declined)
    common.IdentityEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)
    if not infer_shapes(model):
        summary.notes.append("shape inference failed; tensors of unknown type are treated as float")
    common.TopologicalSortPass()(model)
    summary.nodes_after = sum(1 for _ in model.graph.all_nodes())
    return summary


def cleanup(model: ir.Model) -> None:
    """Drop what quantization made dead and restore topological order."""
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
