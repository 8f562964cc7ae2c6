"""LSTMs whose DynamicQuantizeLSTM would lose their input stay float in static mode, measured per LSTM.

:func:`builders.lstm_on_spread_input`: an LSTM over log-normal input. Spread 2.5 (1e-3 to 1e3, a linear
mel spectrogram's range) makes one uint8 range round most of the input away; spread 1.0 does not.
Accuracy is checked in ONNX Runtime against the float model on held-out feeds.
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.config import LatencyGuardConfig, QuantConfig
from onnxq.pipeline import QuantizationResult
from onnxq.tuning.lossy_lstms import NOISE_LIMIT_DB


def _quantize(spread: float) -> tuple[onnx.ModelProto, QuantizationResult, list[dict[str, np.ndarray]]]:
    proto, calib, held_out = builders.lstm_on_spread_input(spread)
    result = onnxq.quantize(proto, calib, QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)))
    return proto, result, held_out


def _sqnr(proto: onnx.ModelProto, result: QuantizationResult, feeds: list[dict[str, np.ndarray]]) -> float:
    def outputs(model: onnx.ModelProto | ir.Model) -> np.ndarray:
        session = ort.InferenceSession(builders.serialize(model), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float64)

    expected, got = outputs(proto), outputs(result.model)
    return float(10 * np.log10(np.sum(expected**2) / np.sum((expected - got) ** 2)))


def test_an_lstm_over_a_widely_spread_input_stays_float() -> None:
    """DynamicQuantizeLSTM would read 12 dB here (``lstm_on_spread_input``'s docstring); float it is
    exact, and the MatMul after it is still quantized."""
    proto, result, held_out = _quantize(2.5)
    counts = builders.op_counts(result.model)
    assert counts.get("DynamicQuantizeLSTM", 0) == 0 and counts["LSTM"] == 1
    assert result.report.quantized_op_types.get("MatMul") == 1
    (decline,) = [d for d in result.report.declines if d.node == "LSTM"]
    assert decline.code == "lossy_input_range" and f"limit {NOISE_LIMIT_DB:g} dB" in decline.message
    assert _sqnr(proto, result, held_out) > 40.0


@pytest.mark.parametrize("spread", [0.5, 1.0])
def test_an_lstm_over_an_ordinary_input_runs_on_int8_weights(spread: float) -> None:
    proto, result, held_out = _quantize(spread)
    assert builders.op_counts(result.model)["DynamicQuantizeLSTM"] == 1
    assert not [d for d in result.report.declines if d.code == "lossy_input_range"]
    assert _sqnr(proto, result, held_out) > 30.0
