"""Identity removal, written here because onnx-ir's pass merges graph outputs joined by an Identity."""

from __future__ import annotations

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS

__all__ = ["RemoveIdentityPass"]


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
                if node.op_type != "Identity" or node.domain not in DEFAULT_DOMAINS or not node.inputs:
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
