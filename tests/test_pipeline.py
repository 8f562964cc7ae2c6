"""Tests for the pipeline's own decisions (beyond the passes it chains)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.passes import cleanup


def _int_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 17]>
        g (float[4,4] x) => (float[4,4] y, float[4,8] z) {
            a = Cast<to = 6>(x)
            b = MatMul(a, a)
            y = Cast<to = 1>(b)
            z = MatMul(x, w)
        }"""
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w")
    )
    return proto


def test_tensors_that_turn_out_not_float_are_left_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without shape inference the int32 MatMul looks quantizable; calibration finds out and re-plans."""
    monkeypatch.setattr(cleanup, "infer_shapes", lambda model: False)
    feeds = [{"x": np.random.default_rng(i).uniform(-3, 3, (4, 4)).astype(np.float32)} for i in range(4)]
    result = onnxq.quantize(_int_matmul_model(), feeds)
    assert result.report.quantized_op_types == {"MatMul": 1}
    assert any("not float32" in line for line in result.report.declined)
    result.validate(feeds)
    rows = {row.output: row for row in result.report.accuracy}
    assert rows["y"].sqnr_db == float("inf")  # the integer path is untouched
    assert rows["z"].sqnr_db > 30.0


def test_onnxq_output_is_already_canonical() -> None:
    """Equal zero points share one initializer, so normalizing onnxq's own output changes nothing."""
    from builders import conv_calibration

    from onnxq.passes.normalize_qdq import NormalizeQDQPass

    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
            a = Conv<pads = [1, 1, 1, 1]>(x, w1)
            b = Relu(a)
            c = Conv<pads = [1, 1, 1, 1]>(b, w2)
            d = Relu(c)
            y = Conv<pads = [1, 1, 1, 1]>(d, w3)
        }"""
    )
    rng = np.random.default_rng(3)
    for name, shape in (("w1", (4, 3, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (4, 4, 3, 3))):
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        )
    model = onnxq.quantize(proto, [{"x": sample} for sample in conv_calibration(8)]).model
    result = NormalizeQDQPass()(model)
    assert not result.modified
