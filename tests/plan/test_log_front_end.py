"""Anchors in front of a Log: which ones are found, and that keeping them float is what recovers such a model.

The model is :func:`builders.log_spectrum_cnn` (STFT Convs → power → floor → Log → CNN), fed harmonic
frames whose power spans about ten decades. The latency guard's choice among variants is tested with
made-up timings in ``tests/tuning/test_latency_guard.py``; here the variants' accuracy is real.
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
from onnxq.plan.log_front_end import LOG_SEARCH_DEPTH, log_downstream
from onnxq.report import guard_line
from onnxq.runtime.latency import LatencyResult
from onnxq.tuning import latency_guard
from onnxq.tuning.latency_guard import LOG_FRONT_END, anchor_kinds


def _by_output(model: ir.Model) -> dict[str, ir.Node]:
    return {node.outputs[0].name or "": node for node in model.graph}


def test_the_stft_convs_reach_the_log_and_the_cnn_does_not() -> None:
    proto, _, _ = builders.log_spectrum_cnn()
    nodes = _by_output(ir.from_proto(proto))
    for stft in ("re", "im"):
        found = log_downstream(nodes[stft])
        assert found is not None and found.outputs[0].name == "spectrum"
    assert log_downstream(nodes["c1"]) is None and log_downstream(nodes["c2"]) is None


def test_a_log_behind_a_nonlinearity_is_not_reached() -> None:
    """Softplus written out (``Log(1 + Exp(-|x|))``) is no spectrum: Exp is not a magnitude op."""
    text = """
    softplus (float[1, 4] x) => (float[1, 4] soft) {
        c = MatMul (x, w)
        a = Abs (c)
        n = Neg (a)
        e = Exp (n)
        one_plus = Add (e, one)
        soft = Log (one_plus)
    }
    """
    proto = builders.parse(text, {"w": np.eye(4, dtype=np.float32), "one": np.array(1.0, np.float32)})
    assert log_downstream(_by_output(ir.from_proto(proto))["c"]) is None


@pytest.mark.parametrize(("between", "reached"), [(LOG_SEARCH_DEPTH - 1, True), (LOG_SEARCH_DEPTH, False)])
def test_the_search_stops_after_so_many_arithmetic_ops(between: int, reached: bool) -> None:
    """Each Abs counts; the Transposes and Concats between them (moves) do not."""
    chain = "\n".join(
        f"a{i} = Abs (t{i})\nc{i} = Concat <axis = 0> (a{i})\nt{i + 1} = Transpose <perm = [0, 1]> (c{i})"
        for i in range(between)
    )
    text = f"""
    far (float[1, 4] x) => (float[1, 4] y) {{
        t0 = MatMul (x, w)
        {chain}
        y = Log (t{between})
    }}
    """
    proto = builders.parse(text, {"w": np.eye(4, dtype=np.float32)})
    assert (log_downstream(_by_output(ir.from_proto(proto))["t0"]) is not None) is reached


@pytest.fixture(scope="module")
def data() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    return builders.log_spectrum_cnn()


def _sqnr(
    reference: onnx.ModelProto, model: ir.Model | onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> float:
    def outputs(m: ir.Model | onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(builders.serialize(m), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float64)

    expected, got = outputs(reference), outputs(model)
    return float(10 * np.log10(np.sum(expected**2) / np.sum((expected - got) ** 2)))


def test_keeping_the_front_end_float_recovers_the_model(
    data: tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]],
) -> None:
    """Int8 STFT outputs round the quiet bins to the Log's floor: 8 dB on held-out frames; the same model
    with only the front end float reads above 40 dB."""
    proto, calib, held_out = data
    result = onnxq.quantize(proto, calib, QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)))
    state = result.static
    assert state is not None
    kinds = anchor_kinds(state.float_model, state.quantized_nodes)
    front_end = kinds[LOG_FRONT_END]
    assert len(front_end) == 2 and sum(len(nodes) for nodes in kinds.values()) == 4
    assert _sqnr(proto, result.model, held_out) < 12.0
    assert _sqnr(proto, state.requantize(front_end), held_out) > 40.0


def test_the_guard_keeps_the_front_end_float_when_it_costs_no_time(
    data: tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timings made up (every int8 variant as fast as the others, float twice as slow); the outputs the
    guard compares for accuracy are real."""

    def time_sessions(sessions: dict[str, object], feed: object, **_: object) -> dict[str, LatencyResult]:
        ms = {name: 2.0 if name in ("input", "float") else 1.0 for name in sessions}
        return {name: LatencyResult(name, 1, ms[name], ms[name], 1, (ms[name],)) for name in sessions}

    monkeypatch.setattr(latency_guard, "time_sessions", time_sessions)
    proto, calib, held_out = data
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=True, budget_s=0.05, min_runs=2))
    result: QuantizationResult = onnxq.quantize(proto, calib, config)
    guard = result.report.latency_guard
    assert guard is not None
    assert guard["chosen"] == f"keep {LOG_FRONT_END} float" and guard["for_accuracy"]
    assert sorted(guard["reverted"]) == [LOG_FRONT_END]
    assert _sqnr(proto, result.model, held_out) > 40.0


def test_a_model_that_is_only_a_front_end_stays_float_when_int8_loses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A log-spectrum extractor on its own (every anchor in front of the Log): int8 is faster (made-up
    timings) but its spectrum is lost (real outputs), and the only other form is float: the input is
    written, and the report says why."""

    def time_sessions(sessions: dict[str, object], feed: object, **_: object) -> dict[str, LatencyResult]:
        ms = {name: 2.0 if name in ("input", "float") else 1.0 for name in sessions}
        return {name: LatencyResult(name, 1, ms[name], ms[name], 1, (ms[name],)) for name in sessions}

    monkeypatch.setattr(latency_guard, "time_sessions", time_sessions)
    proto, calib, held_out = builders.log_spectrum_cnn(front_end_only=True)
    guarded = QuantConfig(latency_guard=LatencyGuardConfig(enabled=True, budget_s=0.05, min_runs=2))
    result = onnxq.quantize(proto, calib, guarded)
    guard = result.report.latency_guard
    assert guard is not None and guard["all_float"] and guard["lossy_front_end"]
    assert guard["sqnr_db"]["quantized"] < 20.0
    assert "a log-spectrum front end whose quiet bins int8 rounds to the log's floor" in guard_line(guard)
    assert not any(n.op_type == "DequantizeLinear" for n in result.model.graph)
    unguarded = onnxq.quantize(proto, calib, QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)))
    assert _sqnr(proto, unguarded.model, held_out) < 20.0  # what the guard kept from being written
