"""Tests for the pipeline's own decisions (beyond the passes it chains)."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest

import onnxq
from onnxq import preprocess as cleanup
from onnxq.config import DynamicConfig, QuantConfig


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
    assert any("not float32" in line for line in builders.lines(result.report.declines))
    result.validate(feeds)
    rows = {row.output: row for row in result.report.accuracy}
    assert rows["y"].sqnr_db == float("inf")  # the integer path is untouched
    assert rows["z"].sqnr_db > 30.0


def test_onnxq_output_is_already_canonical() -> None:
    """Equal zero points share one initializer, so normalizing onnxq's own output changes nothing."""
    from builders import conv_calibration

    from onnxq.rewrite.normalize_qdq import NormalizeQDQPass

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


def _mlp_model() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 17]>
        g (float[N,32] x) => (float[N,8] y) {
            h = MatMul(x, w1)
            hb = Add(h, b1)
            r = Relu(hb)
            y = Gemm<transB = 1>(r, w2, b2)
        }"""
    )
    for name, shape in (("w1", (32, 64)), ("b1", (64,)), ("w2", (8, 64)), ("b2", (8,))):
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
        )
    return proto


def _feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(n)]


def _ops(model: object) -> list[str]:
    import onnx_ir as ir

    assert isinstance(model, ir.Model)
    return [n.op_type for n in model.graph]


def test_dynamic_mode_needs_no_data_and_matches_float() -> None:
    result = onnxq.quantize(_mlp_model(), None, onnxq.QuantConfig(mode="dynamic"))
    assert result.report.mode == "dynamic"
    assert result.report.quantized_op_types == {"Gemm": 1, "MatMul": 1}
    assert "QuantizeLinear" not in _ops(result.model)
    result.validate(_feeds(16, 5))
    assert result.report.accuracy[0].sqnr_db > 30.0


def test_static_qoperator_equals_qdq_to_integer_rounding() -> None:
    from onnxq.load.files import serialize_model
    from onnxq.runtime.session import make_session

    feeds, held_out = _feeds(16), _feeds(8, 9)
    # (calibrated products: their QOperator lowering is what is compared)
    qdq = onnxq.quantize(_mlp_model(), feeds, onnxq.QuantConfig(run_time_ranges=False))
    qop = onnxq.quantize(_mlp_model(), feeds, onnxq.QuantConfig(format="qoperator", run_time_ranges=False))
    assert (
        qop.report.lowered_op_types.get("MatMulIntegerToFloat", 0)
        + qop.report.lowered_op_types.get("QLinearMatMul", 0)
        == 1
    )
    assert "DequantizeLinear" not in _ops(qop.model)
    a = make_session(serialize_model(qdq.model), opt_level="disable")
    b = make_session(serialize_model(qop.model), opt_level="disable")
    for feed in held_out:
        np.testing.assert_allclose(a.run(None, feed)[0], b.run(None, feed)[0], rtol=1e-3, atol=1e-3)


def test_already_quantized_model_is_lowered_without_calibration(tmp_path: object) -> None:
    """A QDQ model made by onnxruntime.quantization goes through --format qoperator with no data."""
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    assert isinstance(tmp_path, Path)
    float_path, qdq_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_mlp_model(), float_path)
    feeds = _feeds(16)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(float_path),
        str(qdq_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    result = onnxq.quantize(qdq_path, None, onnxq.QuantConfig(format="qoperator"))
    assert result.report.mode == "requantize"
    assert result.report.lowered_op_types
    result.validate(_feeds(8, 3))
    assert result.report.accuracy[0].sqnr_db > 30.0  # against the QDQ input: same integer arithmetic


def test_torch_qat_export_is_lowered_to_qoperator(tmp_path: object) -> None:
    """The issue's command on a PyTorch QAT-style export: `optimize qat.onnx --format qoperator`."""
    from pathlib import Path

    import pytest

    torch = pytest.importorskip("torch")
    from onnxq.cli import main
    from onnxq.runtime.session import make_session
    from onnxq.validate.metrics import sqnr_db

    assert isinstance(tmp_path, Path)

    class QATNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x: object) -> object:
            fq_t, fq_c = torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine
            x = fq_t(x, 0.03, 128, 0, 255)
            w = fq_c(
                self.conv.weight,
                self.conv.weight.detach().abs().amax((1, 2, 3)) / 127,
                torch.zeros(8, dtype=torch.int32),
                0,
                -128,
                127,
            )
            y = torch.relu(torch.nn.functional.conv2d(x, w, self.conv.bias, padding=1))
            y = fq_t(y, 0.02, 0, 0, 255).flatten(1)
            w2 = fq_c(
                self.fc.weight,
                self.fc.weight.detach().abs().amax(1) / 127,
                torch.zeros(10, dtype=torch.int32),
                0,
                -128,
                127,
            )
            return torch.nn.functional.linear(y, w2, self.fc.bias)

    torch.manual_seed(0)
    path = tmp_path / "qat.onnx"
    torch.onnx.export(
        QATNet().eval(),
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["x"],
        output_names=["y"],
    )
    out = tmp_path / "qat.qop.onnx"
    assert (
        main(["optimize", str(path), "-o", str(out), "--format", "qoperator", "--no-validate", "--quiet"])
        == 0
    )
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QLinearConv" in ops
    assert "Conv" not in ops
    feeds = [
        {"x": np.random.default_rng(i).uniform(-2, 2, (1, 3, 8, 8)).astype(np.float32)} for i in range(8)
    ]
    ref, got = make_session(str(path), opt_level="disable"), make_session(str(out), opt_level="disable")
    expected = np.concatenate([ref.run(None, f)[0] for f in feeds])
    actual = np.concatenate([got.run(None, f)[0] for f in feeds])
    assert sqnr_db(expected, actual) > 35.0  # same integer arithmetic, up to rounding


@pytest.mark.parametrize("output_format", ["qdq", "qoperator"])
def test_batched_matmul_weight_runs_at_enable_all(output_format: str) -> None:
    """A [2, 16, 8] weight: per-column scales would load but fail at the first run at ORT_ENABLE_ALL."""
    rng = np.random.default_rng(0)
    proto = builders.parse(
        "g (float[2,4,16] x) => (float[2,4,8] y) { y = MatMul (x, w) }",
        {"w": rng.standard_normal((2, 16, 8)).astype(np.float32)},
    )
    feeds = [{"x": rng.standard_normal((2, 4, 16)).astype(np.float32)} for _ in range(8)]
    result = onnxq.quantize(proto, feeds, onnxq.QuantConfig(format=output_format))  # type: ignore[arg-type]
    report = result.validate(feeds)  # ORT_ENABLE_ALL: fails on an unsupported form
    assert report.accuracy[0].sqnr_db > 30.0
    assert result.report.quantized_op_types == {"MatMul": 1}


# ---------------------------------------------------------------------------------------------------
# --quantize-embeddings in static mode


def test_static_mode_quantizes_embedding_tables_by_default() -> None:
    """A table read by a float op (LayerNorm) is stored int8 with one scale per row in static mode too,
    only the gathered rows dequantized; ``embeddings=False`` keeps it float."""
    proto, feeds = builders.embedding_then_matmul()
    plain = onnxq.quantize(proto, feeds, QuantConfig(dynamic=DynamicConfig(embeddings=False)))
    assert "Gather" not in plain.report.quantized_op_types
    assert any(
        v.const_value is not None
        and v.const_value.numpy().shape == (600, 8)
        and v.const_value.numpy().dtype == np.float32
        for v in plain.model.graph.initializers.values()
    )

    result = onnxq.quantize(proto, feeds, QuantConfig())
    assert result.report.quantized_op_types["Gather"] == 1
    stored = {
        v.name: v.const_value.numpy()
        for v in result.model.graph.initializers.values()
        if v.const_value is not None
    }
    assert not any(a.shape == (600, 8) and a.dtype == np.float32 for a in stored.values())
    assert any(a.shape == (600, 8) and a.dtype == np.int8 for a in stored.values())
    assert result.report.size_quantized_bytes < plain.report.size_quantized_bytes - 500
    rng = np.random.default_rng(5)
    held_out = [{"ids": rng.integers(0, 600, (2, 6)).astype(np.int64)} for _ in range(4)]
    for feed in held_out:
        (expected,) = builders.run_disabled(proto, feed)
        (actual,) = builders.run_disabled(result.model, feed)
        noise = float(np.sum((expected - actual) ** 2))
        assert 10 * np.log10(float(np.sum(expected**2)) / noise) > 25.0


# ---------------------------------------------------------------------------------------------------
# A residual squeeze-and-excitation block (PP-OCR det's RSE layers): the gate is quantized so that the
# Mul and the Add on the full map run as integer ops, and the output stays close to float.

RESIDUAL_SE = """
g (float[1, 8, 12, 12] x) => (float[1, 8, 12, 12] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, wa)
    p = GlobalAveragePool (a)
    q = Conv (p, wg)
    g = HardSigmoid (q)
    m = Mul (a, g)
    s = Add (a, m)
    y = Conv <pads = [1, 1, 1, 1]> (s, wc)
}
"""


def test_residual_se_block_runs_its_mul_and_add_on_integers() -> None:
    rng = np.random.default_rng(4)
    arrays = {
        "wa": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32),
        "wg": (rng.standard_normal((8, 8, 1, 1)) * 2.0).astype(np.float32),
        "wc": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32),
    }
    proto = builders.parse(RESIDUAL_SE, arrays)
    feeds = [{"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(24)]
    result = onnxq.quantize(proto, feeds[:16])
    assert result.report.quantized_op_types == {"Conv": 3, "Mul": 1, "Add": 1, "GlobalAveragePool": 1}
    producers = {out.name: node.op_type for node in result.model.graph for out in node.outputs}
    mul = next(node for node in result.model.graph if node.op_type == "Mul")
    assert all(producers[value.name] == "DequantizeLinear" for value in mul.inputs)  # the gate too
    report = result.validate(feeds[16:])
    assert report.accuracy[0].sqnr_db > 25.0
