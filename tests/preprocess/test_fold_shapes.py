"""Shape arithmetic folded from inferred shapes: known dimensions and Reshape's copied dimensions."""

from __future__ import annotations

import builders
import numpy as np
import onnx_ir as ir
import pytest

from onnxq.graph import const_array
from onnxq.preprocess import preprocess
from onnxq.preprocess.fold_shapes import FoldShapesPass

# torchvision's channel_shuffle as the TorchScript exporter writes it with a dynamic batch: every
# dimension of both views is read from the tensors at run time.
SHUFFLE = """
shuffle (float[N, 8, 4, 4] x) => (float[N, 8, 4, 4] y) {
    r = Relu (x)
    s = Shape (r)
    b = Gather <axis = 0> (s, i0)
    c = Gather <axis = 0> (s, i1)
    h = Gather <axis = 0> (s, i2)
    w = Gather <axis = 0> (s, i3)
    cg = Div (c, two)
    bu = Unsqueeze (b, zero)
    cu = Unsqueeze (cg, zero)
    hu = Unsqueeze (h, zero)
    wu = Unsqueeze (w, zero)
    target = Concat <axis = 0> (bu, groups, cu, hu, wu)
    v = Reshape (r, target)
    t = Transpose <perm = [0, 2, 1, 3, 4]> (v)
    back = Concat <axis = 0> (bu, minus_one, hu, wu)
    y = Reshape (t, back)
}
"""

# A transformer's head split: x.size()[:-1] + (heads, head_size), batch and sequence both dynamic.
HEADS = """
heads (float[B, S, 8] x) => (float[B, S, 2, 4] y) {
    s = Shape (x)
    lead = Slice (s, start, end)
    target = Concat <axis = 0> (lead, split)
    y = Reshape (x, target)
}
"""

# The batch read from another input, whose batch dimension has another name: not provably equal.
OTHER = """
other (float[N, 8] x, float[M, 8] z) => (float[N, 2, 4] y) {
    s = Shape (z)
    b = Gather <axis = 0> (s, i0)
    bu = Unsqueeze (b, zero)
    target = Concat <axis = 0> (bu, split)
    y = Reshape (x, target)
}
"""

SCALARS = {f"i{k}": np.asarray(k, np.int64) for k in range(4)}
ARRAYS = {
    **SCALARS,
    "two": np.asarray(2, np.int64),
    "zero": np.asarray([0], np.int64),
    "groups": np.asarray([2], np.int64),
    "minus_one": np.asarray([-1], np.int64),
    "start": np.asarray([0], np.int64),
    "end": np.asarray([-1], np.int64),
    "split": np.asarray([2, 4], np.int64),
}


def _model(text: str) -> ir.Model:
    return ir.from_proto(builders.parse(text, ARRAYS))  # (the unused constants are removed by preprocess)


def _reshape_targets(model: ir.Model) -> list[np.ndarray | None]:
    return [const_array(n.inputs[1]) for n in model.graph if n.op_type == "Reshape"]


def test_a_channel_shuffle_with_a_dynamic_batch_gets_constant_targets() -> None:
    model = _model(SHUFFLE)
    summary = preprocess(model)
    targets = _reshape_targets(model)
    assert [t.tolist() if t is not None else None for t in targets] == [[0, 2, 4, 4, 4], [0, -1, 4, 4]]
    assert not any(n.op_type in ("Shape", "Gather", "Div", "Concat", "Unsqueeze") for n in model.graph)
    assert any(note.startswith("shape arithmetic: 3 dimension(s)") for note in summary.notes)
    for batch in (1, 3):  # the same values, whatever the batch
        feed = {"x": np.random.default_rng(batch).standard_normal((batch, 8, 4, 4)).astype(np.float32)}
        np.testing.assert_array_equal(
            builders.run_disabled(model, feed)[0], builders.run_disabled(_model(SHUFFLE), feed)[0]
        )


def test_a_head_split_copies_batch_and_sequence() -> None:
    model = _model(HEADS)
    preprocess(model)
    (target,) = _reshape_targets(model)
    assert target is not None and target.tolist() == [0, 0, 2, 4]
    for shape in ((1, 5, 8), (3, 2, 8)):
        feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        np.testing.assert_array_equal(
            builders.run_disabled(model, feed)[0], builders.run_disabled(_model(HEADS), feed)[0]
        )


def test_a_dimension_of_another_name_is_not_copied() -> None:
    model = _model(OTHER)
    fold = FoldShapesPass()
    fold(model)
    assert fold.copied == 0 and _reshape_targets(model) == [None]


@pytest.mark.parametrize("dims", [("N", 8), ("N", "C")])
def test_a_known_dimension_becomes_a_constant_and_an_unknown_one_does_not(
    dims: tuple[object, object],
) -> None:
    text = f"""
    known (float[{dims[0]}, {dims[1]}] x) => (int64 c, int64 d) {{
        s = Shape (x)
        c = Gather <axis = 0> (s, i1)
        e = Gather <axis = 0> (s, i1)
        d = Add (e, i1)
    }}
    """
    model = ir.from_proto(builders.parse(text, {"i1": SCALARS["i1"]}))
    fold = FoldShapesPass()
    fold(model)
    assert fold.known == (1 if dims[1] == 8 else 0)  # e only: c is a graph output and keeps its node
    feed = {"x": np.zeros((3, 8), np.float32)}
    assert [int(v) for v in builders.run_disabled(model, feed)] == [8, 9]
