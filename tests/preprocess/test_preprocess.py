"""Tests for the preprocess/cleanup composition and RemoveIdentityPass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.preprocess import preprocess
from onnxq.preprocess.identity import RemoveIdentityPass

_HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def _run(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_identity_between_two_graph_outputs_keeps_both_outputs() -> None:
    proto = onnx.parser.parse_model(
        _HEADER + "g (float[2] x) => (float[2] y, float[2] z) { y = Relu(x)\n z = Identity(y) }"
    )
    model = ir.from_proto(proto)
    result = RemoveIdentityPass()(model)
    assert not result.modified
    assert [v.name for v in model.graph.outputs] == ["y", "z"]


def test_identity_feeding_a_graph_output_is_removed_and_the_name_kept() -> None:
    proto = onnx.parser.parse_model(
        _HEADER + "g (float[2] x) => (float[2] z) { y = Relu(x)\n z = Identity(y) }"
    )
    model = ir.from_proto(proto)
    assert RemoveIdentityPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert model.graph.outputs[0].name == "z"
    assert model.graph.outputs[0].producer().op_type == "Relu"


def test_identity_inside_a_chain_and_a_subgraph() -> None:
    proto = onnx.parser.parse_model(
        _HEADER
        + """g (float[2] x, bool c) => (float[2] out) {
            a = Identity(x)
            b = Relu(a)
            out = If(c) <then_branch = t () => (float[2] r) { i = Identity(b)
 r = Neg(i) }, else_branch = e () => (float[2] r) { r = Identity(b) }>
        }"""
    )
    feed = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(True)}

    model = ir.from_proto(proto)
    assert RemoveIdentityPass()(model).modified
    ops = [n.op_type for n in model.graph.all_nodes()]
    # The else branch's Identity is its only node producing the branch output from an outer value: kept.
    assert ops.count("Identity") == 1
    for flag in (True, False):
        feed["c"] = np.array(flag)
        np.testing.assert_array_equal(_run(ir.to_proto(model), feed)[0], _run(proto, feed)[0])


def test_preprocess_keeps_graph_outputs_of_a_conv_identity_pair() -> None:
    w = np.ones((1, 1, 1, 1), np.float32)
    proto = onnx.parser.parse_model(
        _HEADER
        + "g (float[1,1,2,2] x) => (float[1,1,2,2] y, float[1,1,2,2] z) { y = Conv(x, w)\n z = Identity(y) }"
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model = ir.from_proto(proto)
    preprocess(model)
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    feed = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)}
    got = _run(ir.to_proto(model), feed)
    np.testing.assert_array_equal(got[0], got[1])
