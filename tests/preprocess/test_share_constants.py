"""Identical constants of several bodies are stored once, in the closest graph that encloses them."""

from __future__ import annotations

import builders
import numpy as np
import onnx_ir as ir

from onnxq.preprocess import preprocess
from onnxq.preprocess.share_constants import MIN_BYTES, share_constants
from onnxq.rewrite.cleanup import cleanup

# Silero VAD v5's pattern: each branch unsqueezes the same weight (folded into a constant per branch).
BRANCHES = """
branches (float[1, 64] x, bool cond) => (float[1, 1, 32] y) {
    y = If (cond) <
        then_branch = then_graph () => (float[1, 1, 32] a) {
            wt = Unsqueeze (w, zero)
            a = MatMul (x, wt)
        },
        else_branch = else_graph () => (float[1, 1, 32] b) {
            we = Unsqueeze (w, zero)
            m = MatMul (x, we)
            b = Relu (m)
        }
    >
}
"""


def _model() -> ir.Model:
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(0, 1, (64, 32)).astype(np.float32), "zero": np.array([0], np.int64)}
    return ir.from_proto(builders.parse(BRANCHES, arrays))


def _copies(model: ir.Model) -> list[tuple[str, int]]:
    """(graph name, elements) of every initializer of 64 x 32 elements, in any graph."""
    return [
        (graph.name or "", value.const_value.size)
        for graph in (model.graph, *model.graph.subgraphs())
        for value in graph.initializers.values()
        if value.const_value is not None and value.const_value.size == 64 * 32
    ]


def test_the_branches_copies_become_one_in_the_enclosing_graph() -> None:
    model = _model()
    reference = ir.from_proto(ir.to_proto(model))
    notes = preprocess(model).notes
    assert _copies(model) == [(model.graph.name or "", 64 * 32)]  # one copy, in the main graph
    assert any("stored once" in note for note in notes)
    rng = np.random.default_rng(1)
    for cond in (True, False):
        feed = {"x": rng.normal(0, 1, (1, 64)).astype(np.float32), "cond": np.array(cond)}
        for got, want in zip(
            builders.run_disabled(model, feed), builders.run_disabled(reference, feed), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def test_small_constants_and_models_without_bodies_are_left_alone() -> None:
    model = ir.from_proto(builders.conv_relu_model())
    assert share_constants(model) == 0
    assert MIN_BYTES > 8  # a scale or a shape stays where it is


def test_cleanup_drops_body_initializers_nothing_reads() -> None:
    model = _model()
    preprocess(model)
    body = next(iter(model.graph.subgraphs()))
    body.register_initializer(
        ir.Value(name="orphan", const_value=ir.tensor(np.zeros(4, np.float32), name="orphan"))
    )
    cleanup(model)
    assert all("orphan" not in g.initializers for g in model.graph.subgraphs())
