"""Residual Adds before LayerNormalization written as Sum: same values, no SkipLayerNormalization fusion."""

from __future__ import annotations

import tempfile
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.rewrite.sum_form import residual_adds, write_residual_adds_as_sum

BLOCK = """
block (float[1, 16, 32] x) => (float[1, 16, 32] y, float[1, 16, 32] s) {
    h = MatMul (x, w)
    hb = Add (h, bias)
    r = Add (hb, x)
    n = LayerNormalization <axis = -1> (r, gamma, beta)
    e = Add (n, pos)
    y = LayerNormalization <axis = -1> (e, gamma, beta)
    s = Add (n, x)
}
"""


def _model() -> onnx.ModelProto:
    arrays = builders.normal_arrays(0, w=(32, 32), bias=(32,), gamma=(32,), beta=(32,), pos=(16, 32))
    return builders.parse(BLOCK, arrays)


def test_only_adds_read_by_layernorm_alone_are_rewritten() -> None:
    model = ir.from_proto(_model())
    found = {node.outputs[0].name for node in residual_adds(model)}
    # the residual and the position Add feed a LayerNormalization; the bias Add feeds an Add, and the
    # last Add is a graph output
    assert found == {"r", "e"}
    assert write_residual_adds_as_sum(model) == 2
    ops = builders.op_counts(model)
    assert ops["Sum"] == 2 and ops["Add"] == 2
    assert {n.outputs[0].name for n in model.graph if n.op_type == "Sum"} == {"r", "e"}


def test_the_values_do_not_change() -> None:
    proto = _model()
    model = ir.from_proto(proto)
    write_residual_adds_as_sum(model)
    feed = builders.random_feeds(proto, 1, seed=3)[0]
    for got, want in zip(builders.run_disabled(model, feed), builders.run_disabled(proto, feed), strict=True):
        np.testing.assert_array_equal(got, want)


def test_onnxruntime_no_longer_fuses_them_into_skip_layernorm() -> None:
    """What the rewrite is for: the Add form is fused into SkipLayerNormalization, the Sum form is not."""
    proto = _model()
    model = ir.from_proto(proto)
    write_residual_adds_as_sum(model)
    assert "SkipLayerNormalization" in _optimized_ops(proto)
    assert "SkipLayerNormalization" not in _optimized_ops(ir.to_proto(model))


def _optimized_ops(proto: onnx.ModelProto) -> list[str]:
    """Op types of the graph ONNX Runtime runs (its fusions applied)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [node.op_type for node in onnx.load(str(path)).graph.node]
