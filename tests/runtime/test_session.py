from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import parser

from onnxq.errors import OnnxqError
from onnxq.runtime import latency
from onnxq.runtime import session as runtime
from onnxq.runtime.latency import LatencyResult, measure_latency
from onnxq.runtime.session import make_session, resolve_providers, run

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def model_bytes(graph_text: str) -> bytes:
    """Serialize a model written in onnx.parser syntax at IR 10 / opset 17 (which this ORT accepts)."""
    model = parser.parse_model('<ir_version: 10, opset_import: ["" : 17]>\n' + graph_text)
    onnx.checker.check_model(model)
    return model.SerializeToString()


RELU = model_bytes("g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }")
TWO_OUTPUTS = model_bytes(
    "g (float[N, 4] x) => (float[N, 4] pos, float[N, 4] neg) { pos = Relu(x)\n neg = Neg(x) }"
)


def one_line(exc: pytest.ExceptionInfo[OnnxqError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- resolve_providers ---------------------------------------------------------------------------


def test_resolve_cpu() -> None:
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPU") == ["CPUExecutionProvider"]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_resolve_cuda_without_cuda_is_one_line_error() -> None:
    with pytest.raises(OnnxqError) as exc:
        resolve_providers("cuda")
    message = one_line(exc)
    assert "CUDA execution provider requested" in message
    assert "CPUExecutionProvider" in message
    assert "onnxruntime-gpu" in message


@pytest.mark.skipif(not HAS_CUDA, reason="this onnxruntime has no CUDA")
def test_resolve_cuda_with_cuda() -> None:
    assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("name", ["tpu", "", "CPUExecutionProvider"])
def test_resolve_unknown_provider(name: str) -> None:
    with pytest.raises(OnnxqError, match="unknown execution provider"):
        resolve_providers(name)


# --- make_session --------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_level", ["disable", "basic", "extended", "all"])
def test_make_session_from_bytes_every_level(opt_level: runtime.OptLevel) -> None:
    session = make_session(RELU, opt_level=opt_level, threads=1)
    x = np.array([[-1.0, 0.0, 2.0, -3.0]], dtype=np.float32)
    (y,) = run(session, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_make_session_from_path(tmp_path) -> None:
    path = tmp_path / "relu.onnx"
    path.write_bytes(RELU)
    for source in (path, str(path)):
        session = make_session(source)
        assert [i.name for i in session.get_inputs()] == ["x"]


def test_make_session_corrupt_bytes() -> None:
    with pytest.raises(OnnxqError) as exc:
        make_session(b"\x08\x01this is not a protobuf \xff\xff\xff")
    message = one_line(exc)
    assert message.startswith("onnxruntime cannot load the in-memory model")
    assert "[ONNXRuntimeError]" not in message


def test_make_session_corrupt_file(tmp_path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(OnnxqError) as exc:
        make_session(path)
    assert one_line(exc).startswith(f"onnxruntime cannot load {path}:")


def test_make_session_missing_file(tmp_path) -> None:
    with pytest.raises(OnnxqError, match="file does not exist"):
        make_session(tmp_path / "nope.onnx")


def test_make_session_invalid_graph_names_the_problem() -> None:
    bad = parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 17]>\ng (float[N] x) => (float[N] y) { y = NoSuchOp(x) }'
    )
    with pytest.raises(OnnxqError) as exc:
        make_session(bad.SerializeToString())
    assert "NoSuchOp" in one_line(exc)


def test_make_session_rejects_bad_arguments() -> None:
    with pytest.raises(OnnxqError, match="optimisation level"):
        make_session(RELU, opt_level="max")  # type: ignore[arg-type]
    with pytest.raises(OnnxqError, match="thread count"):
        make_session(RELU, threads=0)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_make_session_unavailable_provider() -> None:
    with pytest.raises(OnnxqError) as exc:
        make_session(RELU, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "CUDAExecutionProvider is not available" in one_line(exc)


def test_make_session_options() -> None:
    session = make_session(RELU, opt_level="disable", threads=2)
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.log_severity_level == 4  # fatal only: run-time failures reach the user as one line


# --- run -----------------------------------------------------------------------------------------


def test_run_selects_outputs_in_requested_order() -> None:
    session = make_session(TWO_OUTPUTS)
    x = np.array([[1.0, -2.0, 3.0, -4.0]], dtype=np.float32)
    neg, pos = run(session, {"x": x}, ["neg", "pos"])
    np.testing.assert_array_equal(neg, -x)
    np.testing.assert_array_equal(pos, np.maximum(x, 0))
    assert len(run(session, {"x": x})) == 2


@pytest.mark.parametrize(
    ("feed", "fragment"),
    [
        ({"x": np.zeros((2, 3), np.float32)}, "dimensions"),
        ({"x": np.zeros((2, 4), np.float64)}, "double"),
        ({"x": np.zeros((4,), np.float32)}, "rank"),
        ({"z": np.zeros((2, 4), np.float32)}, "missing"),
    ],
)
def test_run_bad_feed_is_one_line_error(feed: dict[str, np.ndarray], fragment: str) -> None:
    session = make_session(RELU)
    with pytest.raises(OnnxqError) as exc:
        run(session, feed)
    message = one_line(exc)
    assert fragment in message.lower()
    assert "model inputs: x: tensor(float)[N,4]" in message
    assert "[ONNXRuntimeError]" not in message


def test_run_unknown_output_name() -> None:
    session = make_session(RELU)
    with pytest.raises(OnnxqError, match="output name"):
        run(session, {"x": np.zeros((1, 4), np.float32)}, ["q"])


# --- measure_latency -----------------------------------------------------------------------------


def test_measure_latency_reports_every_model(tmp_path) -> None:
    path = tmp_path / "relu.onnx"
    path.write_bytes(RELU)
    feed = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    results = measure_latency({"bytes": RELU, "file": path}, feed, threads=1, runs=7, warmup=1)
    assert list(results) == ["bytes", "file"]
    for name, result in results.items():
        assert isinstance(result, LatencyResult)
        assert result.name == name
        assert result.threads == 1
        assert result.runs == 7
        assert 0.0 < result.median_ms <= result.p90_ms


def test_measure_latency_interleaves_in_rotating_order(monkeypatch: pytest.MonkeyPatch) -> None:
    models = {
        "a": model_bytes("g (float[N, 4] x) => (float[N, 4] a) { a = Relu(x) }"),
        "b": model_bytes("g (float[N, 4] x) => (float[N, 4] b) { b = Neg(x) }"),
        "c": model_bytes("g (float[N, 4] x) => (float[N, 4] c) { c = Abs(x) }"),
    }
    calls: list[str] = []
    real_run = runtime.run

    def recording_run(session, feed, output_names=None):
        calls.append(session.get_outputs()[0].name)
        return real_run(session, feed, output_names)

    monkeypatch.setattr(latency, "run", recording_run)
    results = measure_latency(models, {"x": np.ones((2, 4), np.float32)}, threads=1, runs=4, warmup=2)
    assert all(r.runs == 4 for r in results.values())
    warmup, timed = calls[:6], calls[6:]
    assert warmup == ["a", "a", "b", "b", "c", "c"]
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_measure_latency_rejects_bad_counts() -> None:
    feed = {"x": np.ones((1, 4), np.float32)}
    with pytest.raises(OnnxqError, match="runs"):
        measure_latency({"m": RELU}, feed, threads=1, runs=0)
    with pytest.raises(OnnxqError, match="warmup"):
        measure_latency({"m": RELU}, feed, threads=1, warmup=-1)


def test_measure_latency_bad_feed_is_onnxq_error() -> None:
    with pytest.raises(OnnxqError, match="model inputs"):
        measure_latency({"m": RELU}, {"x": np.ones((1, 5), np.float32)}, threads=1, runs=2)


def test_measure_latency_no_models() -> None:
    assert measure_latency({}, {}, threads=1) == {}


def test_open_model_with_a_large_unused_initializer() -> None:
    """ONNX Runtime drops an unused initializer when it loads the graph; handing its array over as an
    in-memory initializer then failed ("Failed to find existing initializer"). A fold that leaves its
    constant behind must not break the sessions of the later stages."""
    import onnx_ir as ir

    proto = parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[2, 512] x) => (float[2, 512] y) { y = Mul (x, w) }"
    )
    rng = np.random.default_rng(0)
    w, unused = (rng.standard_normal(512).astype(np.float32) for _ in range(2))
    proto.graph.initializer.extend(
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(unused, "unused")]
    )
    session = runtime.open_model(ir.from_proto(proto))
    x = rng.standard_normal((2, 512)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x * w)
