"""Tests for the preprocess/cleanup composition and RemoveIdentityPass."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq.preprocess import preprocess
from onnxq.preprocess.fold_bn import FoldBatchNormPass
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


PADDLE_CONV_BN = """
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w)
    a = Add (c, bias)
    i = Identity (a)
    b = BatchNormalization <epsilon = 0.00001> (i, scale, shift, mean, var)
    y = Relu (b)
}
"""


def test_a_batchnorm_after_a_biased_conv_and_an_identity_is_folded() -> None:
    """Paddle2ONNX writes a biased Conv + BatchNorm as Conv → Add(bias) → Identity → BatchNormalization:
    once the bias went into the Conv and the Identity is gone, the BatchNorm folds too, and the first
    fold's decline is dropped."""
    arrays = builders.normal_arrays(3, w=(4, 3, 3, 3), scale=(4,), shift=(4,), mean=(4,))
    arrays["bias"] = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4, 1, 1)
    arrays["var"] = np.linspace(0.5, 2.0, 4, dtype=np.float32)
    proto = builders.parse(PADDLE_CONV_BN, arrays)
    first = FoldBatchNormPass()
    first(ir.from_proto(proto))
    assert not first.folded and first.declined  # the BatchNorm does not read the Conv yet
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    assert summary.batchnorms_folded == 1 and not summary.declines
    feed = builders.random_feeds(proto, 1, seed=4)[0]
    np.testing.assert_allclose(
        _run(proto, feed)[0], builders.run_disabled(model, feed)[0], rtol=1e-5, atol=1e-5
    )


# PP-LCNetV3 as Paddle exports it (PP-OCRv5's detector): a Conv, an Identity, then the learnable affine
# block (a scalar scale and shift) before the activation.
PADDLE_AFFINE = """
paddle_affine (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
    i = Identity (c)
    m = Mul (scale, i)
    a = Add (m, shift)
    y = Relu (a)
}
"""


def test_an_affine_block_behind_an_identity_folds_into_the_conv() -> None:
    """The Identity hid the Conv from the folds (they ran before Identity removal): 81 folds missed
    on PP-OCRv5's detector, whose int8 model ran at 0.76x float instead of 0.55x."""
    arrays = builders.normal_arrays(5, w=(4, 3, 3, 3), b=(4,))
    arrays["scale"] = np.array([1.21], np.float32)
    arrays["shift"] = np.array([0.47], np.float32)
    proto = builders.parse(PADDLE_AFFINE, arrays)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    assert summary.affine_folded == 2
    feed = builders.random_feeds(proto, 1, seed=4)[0]
    np.testing.assert_allclose(
        _run(proto, feed)[0], builders.run_disabled(model, feed)[0], rtol=1e-5, atol=1e-5
    )
