"""Comparing several models on the same data: accuracy against the first, size, interleaved latency."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import onnxq
from onnxq.errors import OnnxqError
from onnxq.load.files import save_model
from onnxq.runtime.session import make_session, run
from onnxq.validate.compare import (
    ModelComparison,
    compare_models_table,
    comparison_to_dict,
    format_comparison,
)
from onnxq.validate.metrics import sqnr_db

RUNS = 3


def table(
    paths: list[Path], data: Iterable[dict[str, np.ndarray]], threads: tuple[int, ...] = (1,)
) -> list[ModelComparison]:
    """compare_models_table with few latency runs, so that the tests stay fast."""
    return compare_models_table(paths, data, threads=threads, runs=RUNS, warmup=1)


def feeds() -> list[dict[str, np.ndarray]]:
    return [{"x": a} for a in builders.conv_calibration(6)]


def damaged(model: onnx.ModelProto, factor: float = 1.01) -> onnx.ModelProto:
    """``model`` with its output ``y`` multiplied by ``factor`` (a Mul appended, output name kept)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    last = copy.graph.node[-1]
    last.output[0] = "y_undamaged"
    copy.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(factor, np.float32), "factor"))
    copy.graph.node.append(onnx.helper.make_node("Mul", ["y_undamaged", "factor"], ["y"], name="damage"))
    onnx.checker.check_model(copy)
    return copy


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    float_model = builders.conv_relu_model()
    quantized = onnxq.quantize(float_model, feeds()).model
    return {
        "float": builders.save(float_model, folder / "float.onnx"),
        "int8": save_model(quantized, folder / "int8.onnx"),
        "damaged": builders.save(damaged(float_model), folder / "damaged.onnx"),
    }


@pytest.fixture(scope="module")
def rows(models: dict[str, Path]) -> list[ModelComparison]:
    paths = [models["float"], models["int8"], models["damaged"]]
    return table(paths, feeds(), threads=(1, 2))


def outputs_of(path: Path, data: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = make_session(path, opt_level="all")
    return np.concatenate([run(session, feed, ["y"])[0] for feed in data])


# --- accuracy --------------------------------------------------------------------------------------


def test_damaged_model_sqnr_equals_numpy(rows: list[ModelComparison], models: dict[str, Path]) -> None:
    expected = sqnr_db(outputs_of(models["float"], feeds()), outputs_of(models["damaged"], feeds()))
    got = rows[2].outputs[0]
    assert got["name"] == "y"
    assert got["sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert got["sqnr_db"] == pytest.approx(-20 * math.log10(0.01), abs=0.01)  # x * 1.01: 40 dB
    assert got["cosine"] == pytest.approx(1.0)
    assert got["top1"] is None  # a [N, 4, 8, 8] output is not class scores


def test_quantized_model_is_close(rows: list[ModelComparison]) -> None:
    out = rows[1].outputs[0]
    assert 25 < out["sqnr_db"] < math.inf
    assert out["max_abs_error"] > 0


def test_reference_row_has_no_metrics(rows: list[ModelComparison]) -> None:
    reference = rows[0]
    assert reference.is_reference and not rows[1].is_reference
    assert reference.outputs == [
        {"name": "y", "sqnr_db": None, "cosine": None, "max_abs_error": None, "top1": None}
    ]
    assert [r.name for r in rows] == ["float.onnx", "int8.onnx", "damaged.onnx"]
    assert all(r.samples == 6 for r in rows)


def test_identical_models_give_infinite_sqnr(models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(models["float"].read_bytes())
    result = table([models["float"], copy], feeds())
    assert result[1].outputs[0]["sqnr_db"] == math.inf
    assert result[1].outputs[0]["max_abs_error"] == 0.0
    data = comparison_to_dict(result)
    assert data["models"][1]["outputs"][0]["sqnr_db"] == "inf"
    assert json.loads(json.dumps(data)) == data


def test_fp16_and_ort_quantized_models(models: dict[str, Path], tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds())

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    ort_path = tmp_path / "ort.onnx"
    quantize_static(str(models["float"]), str(ort_path), Reader(), quant_format=QuantFormat.QDQ)

    body = """
    half (float[N,3,8,8] x) => (float16[N,4,8,8] y) {
        h = Cast <to = 10> (x)
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (h, w, b)
        y = Relu (c)
    }
    """
    reference = builders.conv_relu_model()
    w = onnx.numpy_helper.to_array(reference.graph.initializer[0])
    b = onnx.numpy_helper.to_array(reference.graph.initializer[1])
    half = builders.parse(body, {"w": w.astype(np.float16), "b": b.astype(np.float16)})
    half_path = builders.save(half, tmp_path / "half.onnx")

    result = table([models["float"], ort_path, half_path], feeds())
    assert 25 < result[1].outputs[0]["sqnr_db"] < math.inf
    assert 50 < result[2].outputs[0]["sqnr_db"] < math.inf  # float16 rounding only
    expected = sqnr_db(outputs_of(models["float"], feeds()), outputs_of(half_path, feeds()))
    assert result[2].outputs[0]["sqnr_db"] == pytest.approx(expected, rel=1e-9)


def test_generator_feeds_are_read_once(models: dict[str, Path]) -> None:
    consumed = []

    def stream() -> Iterator[dict[str, np.ndarray]]:
        for feed in feeds():
            consumed.append(1)
            yield feed

    result = table([models["float"], models["damaged"]], stream())
    assert len(consumed) == 6 and result[1].samples == 6


# --- latency and size ------------------------------------------------------------------------------


def test_latency_for_every_thread_count(rows: list[ModelComparison]) -> None:
    for r in rows:
        assert set(r.latency_ms) == {1, 2} and set(r.speedup) == {1, 2}
        assert all(ms > 0 for ms in r.latency_ms.values())
        assert r.latency_runs == RUNS
        for t in (1, 2):
            assert r.speedup[t] == pytest.approx(rows[0].latency_ms[t] / r.latency_ms[t])
    assert rows[0].speedup == {1: 1.0, 2: 1.0}


def test_size_is_the_file_size(rows: list[ModelComparison], models: dict[str, Path]) -> None:
    for r, key in zip(rows, ("float", "int8", "damaged"), strict=True):
        assert r.size_bytes == models[key].stat().st_size
        assert r.path == str(models[key])


def test_size_counts_external_data(tmp_path: Path) -> None:
    model = builders.conv_relu_model()
    data = builders.externalize(model, "w", tmp_path, "weights.bin")
    path = builders.save(model, tmp_path / "external.onnx")
    result = table([path, path], feeds())
    assert result[0].size_bytes == path.stat().st_size + data.stat().st_size


# --- mismatches ------------------------------------------------------------------------------------


def test_mismatched_inputs_raise(models: dict[str, Path], tmp_path: Path) -> None:
    body = """
    other (float[N,3,8,8] z) => (float[N,3,8,8] y) {
        y = Relu (z)
    }
    """
    other = builders.save(builders.parse(body), tmp_path / "other_inputs.onnx")
    with pytest.raises(OnnxqError, match=r"other_inputs\.onnx.*'x'.*'z'") as info:
        table([models["float"], other], feeds())
    assert "\n" not in str(info.value)


def test_missing_output_raises(models: dict[str, Path], tmp_path: Path) -> None:
    model = builders.conv_relu_model()
    model.graph.node[-1].output[0] = "out"
    model.graph.output[0].name = "out"
    other = builders.save(model, tmp_path / "renamed_output.onnx")
    with pytest.raises(OnnxqError, match=r"renamed_output\.onnx lacks output\(s\) 'y'"):
        table([models["float"], other], feeds())


def test_empty_data_raises(models: dict[str, Path]) -> None:
    with pytest.raises(OnnxqError, match="no input data"):
        table([models["float"], models["int8"]], [])


def test_missing_file_raises(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match="not found"):
        table([models["float"], tmp_path / "nope.onnx"], feeds())


# --- presentation ----------------------------------------------------------------------------------


def test_format_three_models(rows: list[ModelComparison]) -> None:
    text = format_comparison(rows)
    for name in ("float.onnx", "int8.onnx", "damaged.onnx"):
        assert name in text
    assert "1 thread ms" in text and "2 threads ms" in text
    assert "reference" in text
    damaged_line = next(line for line in text.splitlines() if "damaged.onnx" in line)
    assert f"{rows[2].outputs[0]['sqnr_db']:.1f}" in damaged_line
    assert f"({rows[2].speedup[1]:.2f}x)" in damaged_line


def test_format_several_outputs(tmp_path: Path) -> None:
    body = """
    two (float[N,3,8,8] x) => (float[N,3,8,8] a, float[N,3,8,8] b) {
        a = Relu (x)
        b = Sigmoid (x)
    }
    """
    first = builders.save(builders.parse(body), tmp_path / "first.onnx")
    second = builders.save(builders.parse(body.replace("Sigmoid", "Tanh")), tmp_path / "second.onnx")
    result = table([first, second], feeds())
    assert [o["name"] for o in result[1].outputs] == ["a", "b"]
    assert result[1].outputs[0]["sqnr_db"] == math.inf and result[1].outputs[1]["sqnr_db"] < 20
    text = format_comparison(result)
    second_lines = [line for line in text.splitlines() if "│ a " in line or "│ b " in line]
    assert len(second_lines) == 4  # one line per (model, output)
    assert "output" in text.splitlines()[2]


def test_json_round_trip(rows: list[ModelComparison]) -> None:
    data = comparison_to_dict(rows)
    assert json.loads(json.dumps(data)) == data
    assert data["reference"] == "float.onnx"
    assert data["models"][1]["latency_ms"].keys() == {"1", "2"}
    assert data["models"][2]["outputs"][0]["sqnr_db"] == pytest.approx(rows[2].outputs[0]["sqnr_db"])
