"""Identical constants that several If/Loop/Scan bodies hold are stored once, where all can read them.

Exporters inline a module into every branch that uses it (Silero VAD v5: its decoder once per sample
rate, and inside each, once per state branch), and constant folding then turns each branch's
``Unsqueeze(weight)`` into a constant of its own: the zoo's Silero VAD came out of onnxq with four
copies of each LSTM weight, 1.5x the size of its input. A body may read any value of the graphs that
enclose it, so one initializer in the closest graph that encloses every copy serves them all.

Only constants of :data:`MIN_BYTES` or more are shared (a scale or a shape is not worth a new outer
reference), and only in models with bodies: without them, the main graph's copies are the exporter's
choice and their readers' business.
"""

from __future__ import annotations

import collections
import hashlib

import onnx_ir as ir

from onnxq.graph import body_owners

__all__ = ["MIN_BYTES", "share_constants"]

#: Constants smaller than this stay where they are.
MIN_BYTES = 1024


def _enclosing(model: ir.Model) -> dict[int, ir.Graph]:
    """For each body of ``model`` (by ``id``), the graph whose node holds it."""
    return {body: node.graph for body, (node, _) in body_owners(model).items() if node.graph is not None}


def _ancestry(graph: ir.Graph, parents: dict[int, ir.Graph]) -> list[ir.Graph]:
    """``graph`` and the graphs that enclose it, innermost first."""
    chain = [graph]
    while id(chain[-1]) in parents:
        chain.append(parents[id(chain[-1])])
    return chain


def _closest_common(graphs: list[ir.Graph], parents: dict[int, ir.Graph]) -> ir.Graph:
    shared = {id(g) for g in _ancestry(graphs[0], parents)}
    for graph in graphs[1:]:
        shared &= {id(g) for g in _ancestry(graph, parents)}
    return next(g for g in _ancestry(graphs[0], parents) if id(g) in shared)


def share_constants(model: ir.Model) -> int:
    """Store each set of identical body constants once (module docstring); returns the bytes saved."""
    graphs = [model.graph, *model.graph.subgraphs()]
    if len(graphs) == 1:
        return 0
    by_kind: dict[tuple[object, ...], list[tuple[ir.Graph, ir.Value]]] = collections.defaultdict(list)
    for graph in graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            if (
                tensor is None
                or tensor.nbytes < MIN_BYTES
                or value.is_graph_input()
                or value.is_graph_output()
            ):
                continue
            by_kind[(tensor.dtype, tuple(tensor.shape))].append((graph, value))
    parents = _enclosing(model)
    saved = 0
    for candidates in by_kind.values():
        if len(candidates) < 2 or all(graph is model.graph for graph, _ in candidates):
            continue
        copies: dict[str, list[tuple[ir.Graph, ir.Value]]] = collections.defaultdict(list)
        for graph, value in candidates:
            digest = hashlib.sha256(value.const_value.tobytes()).hexdigest()  # type: ignore[union-attr]
            copies[digest].append((graph, value))
        for members in copies.values():
            if len(members) < 2:
                continue
            home = _closest_common([graph for graph, _ in members], parents)
            kept_graph, kept = members[0]
            if kept_graph is not home:
                kept_graph.initializers.pop(kept.name or "")
                home.register_initializer(kept)
            for graph, value in members[1:]:
                value.replace_all_uses_with(kept)
                graph.initializers.pop(value.name or "")
                saved += value.const_value.nbytes  # type: ignore[union-attr]
    return saved
