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

__all__ = ["PreprocessSummary", "RemoveIdentityPass", "cleanup", "infer_shapes", "preprocess"]

logger = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    """What preprocessing changed, for the report."""

    nodes_before: int = 0
    nodes_after: int = 0
    batchnorms_folded: int = 0
    notes: list[str] = field(default_factory=list)


class _OpTypeNames(common.naming.SimpleNameGenerator):
    """Unnamed nodes are named after their op type (``Conv``, ``Conv_1``, …) so reports can name them."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type


class RemoveIdentityPass(ir.passes.InPlacePass):
    """Remove Identity nodes in every graph by reading their input directly.

    Declines an Identity whose output is a graph output while its input is a graph input or output
    (the model's interface would change). Written here rather than using onnx-ir's
    ``IdentityEliminationPass`` because that pass (1.1) merges two graph outputs joined by an Identity
    into one name.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in (model.graph, *model.graph.subgraphs()):
            for node in list(graph):
                if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or not node.inputs:
                    continue
                source, target = node.inputs[0], node.outputs[0]
                if source is None:
                    continue
                if target.is_graph_output():
                    if source.is_graph_output() or source.is_graph_input() or source.is_initializer():
                        continue
                    if source.producer() is None or source.producer().graph is not graph:  # type: ignore[union-attr]
                        continue
                    # The producer now writes the graph output directly, under the output's name.
                    name = target.name
                    target.replace_all_uses_with(source, replace_graph_outputs=True)
                    graph.remove(node, safe=True)
                    target.name = None
                    source.name = name
                else:
                    target.replace_all_uses_with(source)
                    graph.remove(node, safe=True)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


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
    common.NameFixPass(_OpTypeNames())(model)
    common.TopologicalSortPass()(model)
    FoldConstantsPass()(model)
    fold_bn = FoldBatchNormPass()
    fold_bn(model)
    summary.batchnorms_folded = len(fold_bn.folded)
    summary.notes.extend(fold_bn.declined)
    RemoveIdentityPass()(model)
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
