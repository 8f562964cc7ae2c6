"""Bias Adds after a quantized MatMul written as Sum (onnxq.rewrite.sum_form).

ONNX Runtime's MatMulAddFusion would otherwise turn the quantized MatMul and its bias into a float Gemm
that dequantizes the int8 weight on every run; the check reads the graph ONNX Runtime actually runs.
"""

from __future__ import annotations

import collections
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import onnxq
from onnxq.rewrite.sum_form import quantized_bias_adds, write_bias_adds_as_sum
from onnxq.validate.metrics import sqnr_db

HEAD = """
head (float[1, 3, 16, 16] x) => (float[1, 100] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    g = GlobalAveragePool (r)
    f = Flatten (g)
    m = MatMul (f, fc)
    y = Add (m, fc_bias)
}
"""

MLP = """
mlp (float[1, 64] x) => (float[1, 10] y) {
    m1 = MatMul (x, w1)
    a1 = Add (m1, b1)
    r1 = Relu (a1)
    m2 = MatMul (r1, w2)
    y = Add (m2, b2)
}
"""


def head_model() -> onnx.ModelProto:
    arrays = builders.normal_arrays(0, w=(64, 3, 3, 3), b=(64,), fc=(64, 100), fc_bias=(100,))
    return builders.parse(HEAD, arrays)


def run_optimized(model: bytes, tmp_path: Path) -> onnx.GraphProto:
    """The graph ONNX Runtime runs at ORT_ENABLE_ALL."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "optimized.onnx").graph


def op_counts(graph: onnx.GraphProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in graph.node)


#: Products on calibrated ranges: the bias Sum is for the QDQ form of a calibrated MatMul (with
#: run-time ranges, the default, the bias goes into DynamicQuantizeMatMul instead).
CALIBRATED = onnxq.QuantConfig(run_time_ranges=False)


def test_a_quantized_classifier_head_runs_as_an_integer_matmul(tmp_path: Path) -> None:
    proto = head_model()
    feeds = builders.random_feeds(proto, 8, seed=1)
    result = onnxq.quantize(proto, feeds, CALIBRATED)
    ops = [n.op_type for n in result.model.graph]
    assert "Sum" in ops and ops.count("Add") == 0
    graph = run_optimized(builders.serialize(result.model), tmp_path)
    ran = op_counts(graph)
    assert ran["MatMulIntegerToFloat"] == 1 and ran["Gemm"] == 0
    # the head's int8 weight is no longer dequantized at run time
    weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert not [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    # written as Add, ONNX Runtime would fuse a float Gemm that dequantizes the weight every run
    unfused = result.model.clone()
    for node in unfused.graph:
        if node.op_type == "Sum":
            node.op_type = "Add"
    graph = run_optimized(builders.serialize(unfused), tmp_path)
    ran = op_counts(graph)
    assert ran["Gemm"] == 1 and ran["MatMulIntegerToFloat"] == 0
    weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    reference = builders.run_disabled(proto, feeds[0])[0]
    assert sqnr_db(reference, builders.run_disabled(result.model, feeds[0])[0]) > 30


def test_a_bias_add_whose_sum_is_quantized_is_left_for_qgemm() -> None:
    """In an MLP the first bias Add feeds a quantized Relu (absorbed: a QuantizeLinear reads it), so
    DequantizeLinear → Gemm → QuantizeLinear becomes an integer QGemm; only the last one changes."""
    proto = builders.parse(MLP, builders.normal_arrays(0, w1=(64, 64), b1=(64,), w2=(64, 10), b2=(10,)))
    result = onnxq.quantize(proto, builders.random_feeds(proto, 8, seed=1), CALIBRATED)
    ops = collections.Counter(n.op_type for n in result.model.graph)
    assert ops["Sum"] == 1 and ops["Add"] == 1
    (last,) = [n for n in result.model.graph if n.op_type == "Sum"]
    assert last.outputs[0].is_graph_output()


def test_float_matmuls_and_qoperator_output_are_left_alone() -> None:
    model = ir.from_proto(head_model())
    assert quantized_bias_adds(model) == [] and write_bias_adds_as_sum(model) == 0
    proto = head_model()
    result = onnxq.quantize(
        proto,
        builders.random_feeds(proto, 8, seed=1),
        onnxq.QuantConfig(format="qoperator", run_time_ranges=False),
    )
    assert "Sum" not in {n.op_type for n in result.model.graph}
    assert np.isfinite(
        builders.run_disabled(result.model, builders.random_feeds(proto, 1, seed=2)[0])[0]
    ).all()
