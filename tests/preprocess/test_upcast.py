"""Half-precision models computed in float32 (onnxq.preprocess.upcast), then quantized."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import onnxq
from onnxq.preprocess.upcast import UpcastHalfPass
from onnxq.validate.metrics import sqnr_db

HALF_CNN = """
half_cnn (float16[N, 3, 32, 32] x) => (float16[N, 10] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (r1, w2, b2)
    r2 = Relu (c2)
    g = GlobalAveragePool (r2)
    f = Flatten (g)
    y = Gemm <transB = 1> (f, wf, bf)
}
"""

AUTOCAST = """
autocast (float[N, 64] x) => (float[N, 64] y) {
    xh = Cast <to = 10> (x)
    h = MatMul (xh, w)
    y = Cast <to = 1> (h)
}
"""


def half_cnn() -> onnx.ModelProto:
    arrays = builders.normal_arrays(
        0, w1=(16, 3, 3, 3), b1=(16,), w2=(32, 16, 3, 3), b2=(32,), wf=(10, 32), bf=(10,)
    )
    return builders.parse(HALF_CNN, {k: (v * 0.3).astype(np.float16) for k, v in arrays.items()})


def half_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float16)} for _ in range(count)]


def test_a_float16_cnn_is_quantized_with_its_interface_unchanged(tmp_path: object) -> None:
    proto = half_cnn()
    result = onnxq.quantize(proto, half_feeds(16, seed=1))
    assert result.report.quantized_op_types.get("Conv") == 2
    saved = onnx.load_model_from_string(builders.serialize(result.model))
    onnx.checker.check_model(saved, full_check=True)
    assert saved.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert saved.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert [o.name for o in saved.graph.output] == ["y"]
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(saved.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in half_feeds(4, seed=2):
        want, got = reference.run(None, feed)[0], quantized.run(None, feed)[0]
        assert got.dtype == np.float16
        assert sqnr_db(want, got) > 25
    assert any("half-precision model computed in float32" in n for n in result.report.preprocess_notes)


def test_the_upcast_computes_what_the_half_model_does() -> None:
    proto = half_cnn()
    model = ir.from_proto(proto)
    rewrite = UpcastHalfPass()
    assert rewrite(model).modified and rewrite.casts == 2
    assert all(v.dtype == ir.DataType.FLOAT for v in model.graph.initializers.values())
    upcast = builders.serialize(model)
    for feed in half_feeds(2, seed=3):
        half = builders.run_disabled(proto, feed)[0].astype(np.float32)
        full = ort.InferenceSession(upcast, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        # float16 rounds at ~1e-3 relative: the float32 computation agrees to that
        np.testing.assert_allclose(full.astype(np.float32), half, rtol=2e-2, atol=2e-2)


def test_an_autocast_round_trip_disappears() -> None:
    arrays = {"w": (np.random.default_rng(0).normal(0, 0.1, (64, 64))).astype(np.float16)}
    model = ir.from_proto(builders.parse(AUTOCAST, arrays))
    UpcastHalfPass()(model)
    ops = [n.op_type for n in model.graph]
    # the Cast to float16 became a Cast to float32 of a float32 value and went; the output Cast stays
    # (it writes the graph output)
    assert ops == ["MatMul", "Cast"]
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT


def test_a_float32_model_is_left_alone() -> None:
    model = ir.from_proto(builders.conv_relu_model())
    assert not UpcastHalfPass()(model).modified
