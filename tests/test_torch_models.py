"""End to end on torch-built models: export, quantize with onnxq, run in ONNX Runtime, compare with float.

Numerics are checked at ORT_DISABLE_ALL (what the QDQ graph means) on evaluation data that calibration
never saw. The SQNR bounds sit well above what a wrong weight axis, a wrong scale or a missing bias
produces on these models (the test ``test_bounds_catch_broken_quantization`` shows it on the CNN).
"""

from __future__ import annotations

from pathlib import Path

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

import onnxq
from onnxq.config import LatencyGuardConfig
from onnxq.runtime.session import make_session
from onnxq.validate.metrics import cosine_similarity, sqnr_db, top1_agreement
from tools import model_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def _outputs(model: bytes | Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = make_session(model if isinstance(model, bytes) else str(model), opt_level="disable")
    return np.concatenate([session.run(None, feed)[0].reshape(1, -1) for feed in feeds])


def _quantize(
    path: Path, name: str, config: onnxq.QuantConfig | None = None
) -> tuple[onnxq.QuantizationResult, bytes]:
    result = onnxq.quantize(path, model_zoo.sample_feeds(name, 16, split="calib"), config)
    return result, _serialized(result)


def _serialized(result: onnxq.QuantizationResult) -> bytes:
    from onnxq.load.files import serialize_model

    return serialize_model(result.model)


def test_cnn_with_batchnorm_residual_pooling_and_head(zoo: Path) -> None:
    path = model_zoo.build("small_cnn", zoo)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    result, quantized = _quantize(path, "small_cnn")
    report = result.report
    assert report.batchnorms_folded >= 3
    assert report.quantized_op_types["Conv"] >= 4
    assert report.quantized_op_types.get("Add", 0) >= 1  # the residual Add runs on integers
    ops = builders.op_counts(quantized, subgraphs=False)
    assert ops["BatchNormalization"] == 0
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] > ops["QuantizeLinear"]

    feeds = model_zoo.sample_feeds("small_cnn", 24, split="eval")
    ref, out = _outputs(path, feeds), _outputs(quantized, feeds)
    assert sqnr_db(ref, out) > 14.0
    assert cosine_similarity(ref, out) > 0.98
    assert top1_agreement(ref, out) >= 0.9


def test_bounds_catch_broken_quantization(zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CNN bound above fails when the weight scale is wrong or the bias is dropped."""
    from onnxq.rewrite import insert_qdq

    path = model_zoo.build("small_cnn", zoo)
    feeds = model_zoo.sample_feeds("small_cnn", 24, split="eval")
    ref = _outputs(path, feeds)

    real = insert_qdq.quantize_bias
    monkeypatch.setattr(insert_qdq, "quantize_bias", lambda b, s_in, s_w: real(b * 0.0, s_in, s_w))
    _, no_bias = _quantize(path, "small_cnn")
    assert sqnr_db(ref, _outputs(no_bias, feeds)) < 14.0
    monkeypatch.undo()

    real_weight = insert_qdq.quantize_weight

    def wrong_scale(w: np.ndarray, dtype: str, symmetric: bool, axis: int | None, min_scale=None):  # type: ignore[no-untyped-def]
        q, params = real_weight(w, dtype, symmetric, axis, min_scale)
        params.scale = (params.scale * 1.5).astype(np.float32)
        return q, params

    monkeypatch.setattr(insert_qdq, "quantize_weight", wrong_scale)
    _, scaled = _quantize(path, "small_cnn")
    assert sqnr_db(ref, _outputs(scaled, feeds)) < 14.0


def test_mlp(zoo: Path) -> None:
    path = model_zoo.build("mlp", zoo)
    result, quantized = _quantize(path, "mlp")
    assert (
        result.report.quantized_op_types.get("Gemm", 0) + result.report.quantized_op_types.get("MatMul", 0)
        >= 3
    )
    feeds = model_zoo.sample_feeds("mlp", 32, split="eval")
    ref, out = _outputs(path, feeds), _outputs(quantized, feeds)
    assert sqnr_db(ref, out) > 25.0
    assert top1_agreement(ref, out) >= 0.9


def test_transformer_encoder_layer(zoo: Path) -> None:
    path = model_zoo.build("transformer_encoder", zoo)
    result, quantized = _quantize(path, "transformer_encoder")
    assert (
        result.report.quantized_op_types.get("MatMul", 0) + result.report.quantized_op_types.get("Gemm", 0)
        >= 4
    )
    assert "LayerNormalization" not in result.report.quantized_op_types
    feeds = model_zoo.sample_feeds("transformer_encoder", 16, split="eval")
    ref, out = _outputs(path, feeds), _outputs(quantized, feeds)
    assert sqnr_db(ref, out) > 32.0
    assert cosine_similarity(ref, out) > 0.995


def test_torch_export_pipeline_in_a_few_lines(tmp_path: Path) -> None:
    """The library call an export pipeline makes right after torch.onnx.export."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    example = torch.randn(1, 32)
    model_zoo.export(net, (example,), tmp_path / "net.onnx", input_names=["x"], output_names=["y"])
    calib = [{"x": np.random.default_rng(i).standard_normal((1, 32), dtype=np.float32)} for i in range(16)]

    result = onnxq.quantize(tmp_path / "net.onnx", calib)
    result.save(tmp_path / "net.int8.onnx")

    with torch.no_grad():
        expected = net(torch.from_numpy(calib[0]["x"])).numpy()
    got = make_session(str(tmp_path / "net.int8.onnx"), opt_level="all").run(None, calib[0])[0]
    assert sqnr_db(expected, got) > 25.0


def _crnn(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """A CRNN text recognizer's shape: Conv → Relu → columns as a sequence → LSTM → per-step classes."""
    import io
    import warnings

    import torch

    class CRNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Sequential(
                torch.nn.Conv2d(1, 16, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            )
            self.lstm = torch.nn.LSTM(32 * 8, 48, bidirectional=True)
            self.head = torch.nn.Linear(96, 20)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = torch.relu(self.conv(x))  # [N, 32, 8, W/2]
            seq = f.flatten(1, 2).permute(2, 0, 1)  # [T, N, 256]
            y, _ = self.lstm(seq)
            return self.head(y)

    torch.manual_seed(0)
    model = CRNN().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 1, 16, 40),), buffer, dynamo=False, opset_version=17, input_names=["x"]
        )
    path = tmp_path / "crnn.onnx"
    path.write_bytes(buffer.getvalue())
    rng = np.random.default_rng(0)

    def feeds(count: int) -> list[dict[str, np.ndarray]]:
        return [{"x": rng.random((1, 1, 16, 40), dtype=np.float32)} for _ in range(count)]

    return path, feeds(16), feeds(8)


def test_static_quantization_runs_lstms_dynamically(tmp_path: Path) -> None:
    """ONNX Runtime has no static int8 LSTM: static mode makes it a DynamicQuantizeLSTM (int8 weights,
    run-time activation ranges) unless ``DynamicConfig.lstm`` is off; both stay close to float."""
    path, calib, evaluation = _crnn(tmp_path)
    ref = _outputs(path, evaluation)

    result = onnxq.quantize(path, calib)
    quantized = _serialized(result)
    ops = builders.op_counts(quantized, subgraphs=False)
    assert ops["DynamicQuantizeLSTM"] == 1 and ops["LSTM"] == 0 and ops["QuantizeLinear"] >= 2
    assert result.report.quantized_op_types["LSTM"] == 1
    assert "LSTM" not in result.report.float_op_types
    assert sqnr_db(ref, _outputs(quantized, evaluation)) > 25.0

    kept = onnxq.quantize(path, calib, onnxq.QuantConfig(dynamic=onnxq.DynamicConfig(lstm=False)))
    kept_ops = builders.op_counts(_serialized(kept), subgraphs=False)
    assert kept_ops["LSTM"] == 1 and kept_ops["DynamicQuantizeLSTM"] == 0
    assert kept.report.float_op_types["LSTM"] == 1
    assert sqnr_db(ref, _outputs(_serialized(kept), evaluation)) > 25.0


@pytest.mark.parametrize(("lstm_ms", "kept_float"), [(0.5, True), (-0.5, False)], ids=["slower", "faster"])
def test_the_latency_guard_decides_whether_lstms_run_dynamically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lstm_ms: float, kept_float: bool
) -> None:
    """DynamicQuantizeLSTM wins over long sequences and loses over one-step calls (silero VAD): the guard
    times the LSTMs as a kind of their own. Made-up timings: int8 Convs 1 ms, a dynamic LSTM ±0.5 ms,
    the float model 3 ms."""
    from onnxq.tuning import latency_guard

    class LstmTimer:
        def __init__(self, quantized: object, feed: object, config: object) -> None:
            self.quantized, self.runs, self.timed = quantized, 0, {}

        def open(self, model: object) -> object:
            return model

        def warm_up(self, name: str, session: object) -> float:
            return 0.001

        def _ms(self, model: object) -> float:
            ops = {n.op_type for n in model.graph} if isinstance(model, ir.Model) else set()
            if "DequantizeLinear" not in ops:
                return 3.0
            return 1.0 + (lstm_ms if "DynamicQuantizeLSTM" in ops else 0.0)

        def block(self, sessions: dict[str, object]) -> dict[str, float]:
            self.runs += 3
            return {"quantized": self._ms(self.quantized), **{k: self._ms(m) for k, m in sessions.items()}}

        def ratio(self, model: object) -> tuple[float, float]:
            return self._ms(model) / self._ms(self.quantized), 30.0

        def sqnr(self, name: str) -> float:
            return 30.0

    monkeypatch.setattr(latency_guard, "_Timer", LstmTimer)
    path, calib, _ = _crnn(tmp_path)
    config = onnxq.QuantConfig(latency_guard=LatencyGuardConfig(enabled=True))
    result = onnxq.quantize(path, calib, config)
    guard = result.report.latency_guard
    assert guard["kinds"][latency_guard.DYNAMIC_LSTM] == 1
    ops = builders.op_counts(_serialized(result), subgraphs=False)
    assert (latency_guard.DYNAMIC_LSTM in guard["reverted"]) is kept_float
    assert ops["LSTM"] == int(kept_float) and ops["DynamicQuantizeLSTM"] == int(not kept_float)
    assert ("LSTM" in result.report.float_op_types) is kept_float
    assert ("LSTM" in result.report.quantized_op_types) is not kept_float
