"""check_runs: the smoke test every output passes before it is written (ORT_ENABLE_ALL, one run).

The failing model is one ONNX Runtime loads at every level and runs at ``ORT_DISABLE_ALL`` but not at
``ORT_ENABLE_ALL``: a QDQ MatMul whose constant weight is 3-D and quantized per column along its last
axis (``DequantizeLinear`` axis 2), which ONNX Runtime fuses into an integer MatMul that takes no such
zero point. The premise is checked first and the test skipped where the installed onnxruntime runs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.errors import OnnxqError
from onnxq.runtime.kernels import onnxruntime_version
from onnxq.validate import smoke
from onnxq.validate.smoke import check_runs

WHERE = f"onnxruntime {onnxruntime_version()} at ORT_ENABLE_ALL"


def as_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def batched_matmul_qdq() -> onnx.ModelProto:
    """``x: float[2,3,4]`` through Q/DQ, MatMul with a Q/DQ weight ``[2,4,5]`` scaled per column (axis 2)."""
    rng = np.random.default_rng(0)
    arrays = {
        "wq": rng.integers(-127, 128, (2, 4, 5)).astype(np.int8),
        "ws": (rng.random(5) + 0.5).astype(np.float32) * 0.01,
        "wz": np.zeros(5, np.int8),
    }
    body = """
    batched (float[2,3,4] x) => (float[2,3,5] y) {
        s = Constant <value = float {0.05}> ()
        z = Constant <value = uint8 {128}> ()
        q = QuantizeLinear (x, s, z)
        dx = DequantizeLinear (q, s, z)
        w = DequantizeLinear <axis = 2> (wq, ws, wz)
        y = MatMul (dx, w)
    }
    """
    model = builders.parse(body, arrays)
    model.graph.node[-1].name = "batched_matmul"
    return model


def batched_matmul_float() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    body = """
    batched (float[2,3,4] x) => (float[2,3,5] y) {
        y = MatMul (x, w)
    }
    """
    return builders.parse(body, {"w": rng.normal(0.0, 0.3, (2, 4, 5)).astype(np.float32)})


def reshape_model() -> onnx.ModelProto:
    """Runs on 6 values, fails on any other count (in every model that contains it)."""
    body = """
    reshape (float[N] x) => (float[2,3] y) {
        r = Relu (x)
        y = Reshape (r, shape)
    }
    """
    model = builders.parse(body, {"shape": np.array([2, 3], np.int64)})
    model.graph.node[-1].name = "the_reshape"
    return model


def relu_model() -> onnx.ModelProto:
    return builders.parse("relu (float[N] x) => (float[N] y) { y = Relu (x) }")


def runs_at(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, feed: dict[str, np.ndarray]) -> bool:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
    except Exception:
        return False
    return True


def x3d(seed: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, 4)).astype(np.float32)}


@pytest.fixture(scope="module")
def fails_only_at_enable_all() -> onnx.ModelProto:
    model = batched_matmul_qdq()
    assert runs_at(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x3d())
    if runs_at(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, x3d()):
        pytest.skip(f"onnxruntime {ort.__version__} runs a per-column batched QDQ MatMul at ORT_ENABLE_ALL")
    return model


# ---------------------------------------------------------------------------------------------------
# Models that run


def test_a_good_model_passes() -> None:
    model = as_bytes(builders.conv_relu_model())
    feed = {"x": builders.conv_calibration(1)[0]}
    assert check_runs(model, model, feed, random_feed=False) is None


def test_a_quantized_model_made_by_onnxq_passes() -> None:
    import onnxq

    calibration = [{"x": s} for s in builders.conv_calibration(4)]
    result = onnxq.quantize(builders.conv_relu_model(), calibration)
    quantized = builders.serialize(result.model)
    check_runs(quantized, as_bytes(builders.conv_relu_model()), calibration[0], random_feed=False)


def test_the_check_runs_at_enable_all(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real = smoke.make_session

    def spy(model: object, **kwargs: object) -> object:
        seen.append(kwargs.get("opt_level"))
        return real(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(smoke, "make_session", spy)
    model = as_bytes(relu_model())
    check_runs(model, model, {"x": np.ones(3, np.float32)}, random_feed=False)
    assert seen == ["all"]  # the reference is only opened when the quantized model fails


# ---------------------------------------------------------------------------------------------------
# A model that fails only at ORT_ENABLE_ALL


def test_a_model_failing_only_at_enable_all_is_refused_with_the_node_named(
    fails_only_at_enable_all: onnx.ModelProto,
) -> None:
    reference = as_bytes(batched_matmul_float())
    assert runs_at(batched_matmul_float(), ort.GraphOptimizationLevel.ORT_ENABLE_ALL, x3d())
    with pytest.raises(OnnxqError) as info:
        check_runs(as_bytes(fails_only_at_enable_all), reference, x3d(), random_feed=False)
    message = str(info.value)
    assert message.startswith(f"the quantized model fails in {WHERE}: ")
    assert "'batched_matmul'" in message
    assert "\n" not in message
    assert "[ONNXRuntimeError]" not in message  # onnxq's line, not ONNX Runtime's framing


def test_random_data_does_not_excuse_a_quantized_failure(fails_only_at_enable_all: onnx.ModelProto) -> None:
    """The reference runs on the feed, so the failure is the quantized model's, random data or not."""
    with pytest.raises(OnnxqError, match="the quantized model fails in"):
        check_runs(
            as_bytes(fails_only_at_enable_all), as_bytes(batched_matmul_float()), x3d(), random_feed=True
        )


def test_loading_alone_passes_without_a_feed(fails_only_at_enable_all: onnx.ModelProto) -> None:
    check_runs(as_bytes(fails_only_at_enable_all), as_bytes(batched_matmul_float()), None, random_feed=False)


def test_paths_for_the_failing_model(fails_only_at_enable_all: onnx.ModelProto, tmp_path: Path) -> None:
    quantized = builders.save(fails_only_at_enable_all, tmp_path / "q.onnx")
    reference = builders.save(batched_matmul_float(), tmp_path / "f.onnx")
    with pytest.raises(OnnxqError, match="batched_matmul"):
        check_runs(quantized, reference, x3d(), random_feed=False)


# ---------------------------------------------------------------------------------------------------
# Failures of the data, not of the quantized model


def test_a_feed_the_reference_also_fails_on_is_skipped_when_random(caplog: pytest.LogCaptureFixture) -> None:
    model = as_bytes(reshape_model())
    bad = {"x": np.ones(5, np.float32)}
    with caplog.at_level(logging.INFO, logger="onnxq.validate.smoke"):
        assert check_runs(model, model, bad, random_feed=True) is None
    assert "smoke test skipped" in caplog.text


def test_a_feed_the_reference_also_fails_on_is_the_datas_fault_when_not_random() -> None:
    model = as_bytes(reshape_model())
    with pytest.raises(OnnxqError) as info:
        check_runs(model, model, {"x": np.ones(5, np.float32)}, random_feed=False)
    message = str(info.value)
    assert message.startswith("the input model fails on this data: ")
    assert "'the_reshape'" in message and "Reshape" in message
    assert "\n" not in message
    # on data it fits, the same model passes
    check_runs(model, model, {"x": np.ones(6, np.float32)}, random_feed=False)


def test_a_quantized_failure_the_reference_does_not_share() -> None:
    """Same feed: the reference (a Relu) runs, the "quantized" model (a Reshape) does not."""
    with pytest.raises(OnnxqError) as info:
        check_runs(
            as_bytes(reshape_model()), as_bytes(relu_model()), {"x": np.ones(5, np.float32)}, random_feed=True
        )
    message = str(info.value)
    assert message.startswith(f"the quantized model fails in {WHERE}: ")
    assert "'the_reshape'" in message


def test_the_reference_is_not_run_when_the_quantized_model_runs(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-reference.onnx"
    check_runs(as_bytes(relu_model()), missing, {"x": np.ones(3, np.float32)}, random_feed=False)


def test_a_reference_that_does_not_load_counts_as_failing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-reference.onnx"
    bad = {"x": np.ones(5, np.float32)}
    check_runs(as_bytes(reshape_model()), missing, bad, random_feed=True)  # skipped: proves nothing
    with pytest.raises(OnnxqError, match=r"the input model fails on this data: .*does not exist"):
        check_runs(as_bytes(reshape_model()), missing, bad, random_feed=False)


# ---------------------------------------------------------------------------------------------------
# Models that do not load


def test_a_model_that_does_not_load() -> None:
    with pytest.raises(OnnxqError) as info:
        check_runs(b"not a model", as_bytes(relu_model()), None, random_feed=True)
    message = str(info.value)
    assert message.startswith(f"the quantized model does not load in {WHERE}: ")
    assert "onnxruntime cannot load" not in message  # onnxq's framing is not repeated
    assert "\n" not in message


def test_a_missing_file_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match=f"does not load in {WHERE}: .*does not exist"):
        check_runs(tmp_path / "missing.onnx", as_bytes(relu_model()), None, random_feed=False)


def test_an_unknown_op_does_not_load() -> None:
    model = builders.parse_model_text(
        """
        <ir_version: 10, opset_import: ["" : 17, "my.domain" : 1]>
        custom (float[N] x) => (float[N] y) {
            y = my.domain.Mystery (x)
        }
        """
    )
    with pytest.raises(OnnxqError, match=r"the quantized model does not load in .*Mystery"):
        check_runs(as_bytes(model), as_bytes(relu_model()), {"x": np.ones(2, np.float32)}, random_feed=True)


def test_an_unavailable_provider_is_refused() -> None:
    model = as_bytes(relu_model())
    with pytest.raises(OnnxqError, match=r"does not load in .*NoSuchExecutionProvider is not available"):
        check_runs(model, model, None, random_feed=False, providers=("NoSuchExecutionProvider",))
