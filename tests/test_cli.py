"""The command line: user mistakes give exit status 2 and one line naming the problem; success writes
the model and the report, deterministically and atomically, and never touches the input.

Most cases run ``onnxq.cli.main`` in-process; a few run ``python -m onnxq`` as a subprocess to check
real exit codes and stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.cli import main

# Few timed runs: latency numbers are not under test here, only that the rows exist.
FAST = ("--runs", "2")

CliRunner = Callable[..., tuple[int, str, str]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden temporary files included."""
    return sorted(os.listdir(folder))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """``cli(*args)`` runs ``onnxq.cli.main`` in-process and returns (exit code, stdout, stderr)."""

    def run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _run_module(
    *args: object, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onnxq", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def _assert_user_error(code: int, out: str, err: str, *fragments: str) -> str:
    """Exit status 2, nothing on stdout, one stderr line without a traceback that has every fragment."""
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("onnxq: error: "), line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


# ---------------------------------------------------------------------------------------------------
# Bad model files


def test_missing_model(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    code, out, err = cli("optimize", missing, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "not found", "nope.onnx")
    assert _listing(out_dir) == []


def test_empty_model(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, out, err = cli("optimize", empty, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "empty", "empty.onnx")
    assert _listing(out_dir) == []


def test_model_is_a_directory(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    code, out, err = cli("optimize", folder, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "directory", "folder.onnx")


def test_corrupt_model(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(512))
    code, out, err = cli("optimize", corrupt, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "cannot read", "corrupt.onnx")
    assert _listing(out_dir) == []


def test_truncated_model(
    cli: CliRunner, calib_npz: Path, model_path: Path, out_dir: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:-40])
    code, out, err = cli("optimize", truncated, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "truncated.onnx")


def test_text_file_as_model(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file,\nnot an ONNX model\n")
    code, out, err = cli("optimize", text, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "cannot read", "notes.onnx")


def test_npz_as_model(cli: CliRunner, calib_npz: Path, out_dir: Path) -> None:
    code, out, err = cli("optimize", calib_npz, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "cannot read", "calib.npz")
    assert _listing(out_dir) == []


def test_nothing_to_quantize(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    model = builders.save(builders.no_quantizable_model(), tmp_path / "act.onnx")
    code, out, err = cli("optimize", model, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    line = _assert_user_error(code, out, err, "nothing to quantize")
    assert "Relu" in line and "Sigmoid" in line  # names what it found instead
    assert _listing(out_dir) == []


@pytest.mark.parametrize("reader", ["Conv", "MatMul"])  # fails in calibration; in smoothing (256 rows)
def test_a_model_that_fails_on_random_data_says_so(
    cli: CliRunner, out_dir: Path, tmp_path: Path, reader: str
) -> None:
    """Random feeds set symbolic dims to 16: a model that needs 64 samples fails in ONNX Runtime,
    and the error says that real inputs are needed (not that onnxq broke the model)."""
    if reader == "Conv":
        text = "needs64 (float[1, N] x) => (float[1, 4, 6, 6] y) { r = Reshape (x, shape)\n y = Conv (r, w) }"
        arrays = {"shape": np.array([1, 1, 8, 8], np.int64), **builders.normal_arrays(0, w=(4, 1, 3, 3))}
    else:
        text = "needs64 (float[1, N] x) => (float[256, 8] y) { r = Reshape (x, shape)\n y = MatMul (r, w) }"
        arrays = {"shape": np.array([256, 16], np.int64), **builders.normal_arrays(0, w=(16, 8))}
    model = builders.save(builders.parse(text, arrays), tmp_path / "needs64.onnx")
    code, out, err = cli("optimize", model, "-o", out_dir / "q.onnx", "--calib", "random")
    _assert_user_error(code, out, err, "Reshape", "fails on random data itself", "--calib DATA")
    assert _listing(out_dir) == []


def test_an_already_integer_model_is_named_so(
    cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path
) -> None:
    """onnxruntime's dynamic form (DynamicQuantizeLinear + ConvInteger) has no Q/DQ to normalize and
    nothing float left: the error says it is quantized already (rapid_table_det's obj_det_quantized)."""
    text = """
    dyn (float[1, 3, 8, 8] x) => (int32[1, 4, 6, 6] y) {
        q, s, z = DynamicQuantizeLinear (x)
        y = ConvInteger (q, w, z, wz)
    }
    """
    rng = np.random.default_rng(0)
    arrays = {"w": rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "wz": np.array(128, np.uint8)}
    model = builders.save(builders.parse(text, arrays), tmp_path / "dyn.onnx")
    for mode in ("static", "dynamic"):
        code, out, err = cli(
            "optimize", model, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--mode", mode
        )
        line = _assert_user_error(code, out, err, "nothing to quantize", "quantized already")
        assert "ConvInteger, DynamicQuantizeLinear" in line
    assert _listing(out_dir) == []


def test_an_lstm_only_model_is_quantized_in_static_mode_too(
    cli: CliRunner, out_dir: Path, tmp_path: Path
) -> None:
    """Its static plan is empty, but its LSTMs run as DynamicQuantizeLSTM (a tf2onnx / torch
    sequence encoder); with --no-dynamic-lstm nothing is left, and the error says what would help."""
    text = "lstm (float[4, 1, 8] x) => (float[4, 1, 1, 16] y) { y = LSTM <hidden_size = 16> (x, w, r) }"
    proto = builders.parse(text, builders.normal_arrays(0, w=(1, 64, 8), r=(1, 64, 16)))
    model = builders.save(proto, tmp_path / "lstm.onnx")
    calib = tmp_path / "lstm.npz"
    feeds = np.random.default_rng(0).standard_normal((4, 4, 1, 8)).astype(np.float32)
    np.savez(calib, x=feeds)
    # (the latency guard may find a 4-step LSTM faster in float: off, so the test sees the rewrite)
    code, _, err = cli(
        "optimize", model, "-o", out_dir / "q.onnx", "--calib", calib, "--quiet", "--no-latency-guard"
    )
    assert code == 0, err
    quantized = onnx.load(str(out_dir / "q.onnx"))
    assert builders.op_counts(quantized)["DynamicQuantizeLSTM"] == 1
    want = np.concatenate([builders.run_disabled(proto, {"x": f})[0] for f in feeds])
    got = np.concatenate([builders.run_disabled(quantized, {"x": f})[0] for f in feeds])
    assert 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2)) > 25.0  # measured 35.8 dB

    code, out, err = cli("optimize", model, "-o", out_dir / "r.onnx", "--calib", calib, "--no-dynamic-lstm")
    line = _assert_user_error(code, out, err, "nothing to quantize")
    assert line.endswith("--mode dynamic quantizes its LSTMs")
    assert not (out_dir / "r.onnx").exists()


@pytest.mark.parametrize("location", ["../outside.bin", "../../elsewhere/outside.bin"])
def test_external_data_outside_model_folder(
    cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path, location: str
) -> None:
    model_dir = tmp_path / "a" / "models"
    model_dir.mkdir(parents=True)
    proto = builders.conv_relu_model()
    data_file = builders.externalize(proto, "w", model_dir, location)
    assert data_file.is_file()  # the file exists: the refusal is about where it is, not that it is missing
    model = builders.save(proto, model_dir / "conv.onnx")
    code, out, err = cli("optimize", model, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "outside", "'w'")
    assert _listing(out_dir) == []


def test_external_data_missing_file(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    proto = builders.conv_relu_model()
    builders.externalize(proto, "w", tmp_path, "weights/w.bin").unlink()
    model = builders.save(proto, tmp_path / "conv.onnx")
    code, out, err = cli("optimize", model, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    _assert_user_error(code, out, err, "does not exist", "weights/w.bin")


def test_external_data_inside_model_folder_is_accepted(
    cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path
) -> None:
    proto = builders.conv_relu_model()
    builders.externalize(proto, "w", tmp_path, "weights/w.bin")
    model = builders.save(proto, tmp_path / "conv.onnx")
    code, _, err = cli(
        "optimize", model, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--no-validate", "--quiet"
    )
    assert code == 0, err
    assert (out_dir / "q.onnx").is_file()


# ---------------------------------------------------------------------------------------------------
# Bad calibration data


def test_calibration_file_missing(cli: CliRunner, model_path: Path, out_dir: Path, tmp_path: Path) -> None:
    code, out, err = cli("optimize", model_path, "-o", out_dir / "q.onnx", "--calib", tmp_path / "gone.npz")
    _assert_user_error(code, out, err, "calibration", "not found", "gone.npz")
    assert _listing(out_dir) == []


def test_calibration_wrong_input_name(
    cli: CliRunner, model_path: Path, out_dir: Path, write_npz: Callable[..., Path]
) -> None:
    data = write_npz("named.npz", image=builders.conv_calibration())
    code, out, err = cli("optimize", model_path, "-o", out_dir / "q.onnx", "--calib", data)
    _assert_user_error(code, out, err, "'image'", "'x'")
    assert _listing(out_dir) == []


def test_calibration_wrong_dtype(
    cli: CliRunner, model_path: Path, out_dir: Path, write_npz: Callable[..., Path]
) -> None:
    data = write_npz("ints.npz", x=np.ones((4, 1, 3, 8, 8), dtype=np.int64))
    code, out, err = cli("optimize", model_path, "-o", out_dir / "q.onnx", "--calib", data)
    _assert_user_error(code, out, err, "'x'", "float32", "int64")
    assert _listing(out_dir) == []


@pytest.mark.parametrize("shape", [(4, 3, 8), (4, 1, 1, 3, 8, 8)])
def test_calibration_wrong_rank(
    cli: CliRunner, model_path: Path, out_dir: Path, write_npz: Callable[..., Path], shape: tuple[int, ...]
) -> None:
    data = write_npz("rank.npz", x=np.zeros(shape, dtype=np.float32))
    code, out, err = cli("optimize", model_path, "-o", out_dir / "q.onnx", "--calib", data)
    _assert_user_error(code, out, err, "'x'", "rank")
    assert _listing(out_dir) == []


def test_calibration_not_an_npz(cli: CliRunner, model_path: Path, out_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "calib.npz"
    junk.write_text("not a zip archive\n")
    code, out, err = cli("optimize", model_path, "-o", out_dir / "q.onnx", "--calib", junk)
    _assert_user_error(code, out, err, "calib.npz")


def test_no_calib(cli: CliRunner, model_path: Path, out_dir: Path) -> None:
    code, out, err = cli("optimize", model_path, "-o", out_dir / "q.onnx")
    _assert_user_error(code, out, err, "--calib")
    assert _listing(out_dir) == []


# ---------------------------------------------------------------------------------------------------
# Bad outputs


def test_output_folder_missing(cli: CliRunner, model_path: Path, calib_npz: Path, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "q.onnx"
    code, out, err = cli("optimize", model_path, "-o", target, "--calib", calib_npz)
    _assert_user_error(code, out, err, "cannot write", "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("name", ["outdir", "looks_like_a_file.onnx"])
def test_output_is_a_directory(
    cli: CliRunner, model_path: Path, calib_npz: Path, tmp_path: Path, name: str
) -> None:
    target = tmp_path / name
    target.mkdir()
    code, out, err = cli("optimize", model_path, "-o", target, "--calib", calib_npz)
    _assert_user_error(code, out, err, "directory")
    assert _listing(target) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_output_is_the_input(cli: CliRunner, model_path: Path, calib_npz: Path, spelling: str) -> None:
    before = model_path.read_bytes()
    if spelling == "same":
        target = model_path
    elif spelling == "dotdot":
        target = model_path.parent / ".." / model_path.parent.name / model_path.name
    else:
        target = model_path.parent / "link.onnx"
        target.symlink_to(model_path)
    code, out, err = cli("optimize", model_path, "-o", target, "--calib", calib_npz)
    _assert_user_error(code, out, err, "input model")
    assert model_path.read_bytes() == before
    leftovers = {p.name for p in model_path.parent.iterdir()} - {"conv.onnx", "link.onnx"}
    assert leftovers == set()


def test_report_json_folder_missing(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path, tmp_path: Path
) -> None:
    code, out, err = cli(
        "optimize", model_path, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--no-validate",
        "--report-json", tmp_path / "missing" / "r.json",
    )  # fmt: skip
    _assert_user_error(code, out, err, "r.json", "does not exist")


def test_debug_shows_traceback(cli: CliRunner, calib_npz: Path, out_dir: Path, tmp_path: Path) -> None:
    code, _, err = cli(
        "optimize", tmp_path / "nope.onnx", "-o", out_dir / "q.onnx", "--calib", calib_npz, "--debug"
    )
    assert code == 2
    assert "Traceback" in err
    assert "OnnxqError" in err
    assert err.strip().splitlines()[-1].startswith("onnxq: error: model not found")


def test_bad_option_value_is_a_usage_error(cli: CliRunner, model_path: Path, calib_npz: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("optimize", model_path, "-o", "q.onnx", "--calib", calib_npz, "--runs", "0")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------
# Subprocess: real exit codes and stderr


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_subprocess_user_error_is_one_line(calib_npz: Path, out_dir: Path, tmp_path: Path, kind: str) -> None:
    model = tmp_path / f"{kind}.onnx"
    if kind == "corrupt":
        model.write_bytes(np.random.default_rng(1).bytes(300))
    proc = _run_module("optimize", model, "-o", out_dir / "q.onnx", "--calib", calib_npz)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnxq: error: ") and f"{kind}.onnx" in lines[0]
    assert _listing(out_dir) == []


def test_subprocess_output_equals_input(model_path: Path, calib_npz: Path) -> None:
    digest = _sha256(model_path)
    proc = _run_module("optimize", model_path, "-o", model_path, "--calib", calib_npz)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert _sha256(model_path) == digest


# ---------------------------------------------------------------------------------------------------
# Success


def test_optimize_writes_model_and_tables(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    digest = _sha256(model_path)
    target = out_dir / "q.onnx"
    code, out, err = cli("optimize", model_path, "-o", target, "--calib", calib_npz, *FAST)
    assert code == 0, err
    assert "Traceback" not in err
    for heading in ("nodes quantized", "Accuracy vs float", "SQNR dB", "Latency", "speed-up"):
        assert heading in out
    assert _sha256(model_path) == digest  # the input is never modified
    assert _listing(out_dir) == ["q.onnx"]  # nothing left behind by the atomic write

    quantized = onnx.load(target)
    ops = [n.op_type for n in quantized.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops
    feed = {"x": builders.conv_calibration()[0]}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    float_out = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]).run(
        None, feed
    )[0]
    q_out = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert q_out.shape == float_out.shape == (1, 4, 8, 8)
    # int8 quantization of one Conv: error far below the output range, but not zero either.
    assert np.max(np.abs(q_out - float_out)) < 0.05 * np.max(np.abs(float_out))


def test_report_json(cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path) -> None:
    report_path = out_dir / "report.json"
    code, _, err = cli(
        "optimize",
        model_path,
        "-o",
        out_dir / "q.onnx",
        "--calib",
        calib_npz,
        "--report-json",
        report_path,
        *FAST,
    )
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert {"accuracy", "latency", "quantized_op_types"} <= report.keys()
    assert report["quantized_op_types"] == {"Conv": 1}
    [row] = report["accuracy"]
    assert row["output"] == "y"
    assert row["samples"] == 8
    assert row["sqnr_db"] > 25.0  # a broken scale or zero point falls far below this
    [latency] = report["latency"]
    assert latency["threads"] == 1 and latency["runs"] == 2
    assert latency["float_ms"] > 0 and latency["quantized_ms"] > 0
    assert _listing(out_dir) == ["q.onnx", "report.json"]


def test_no_validate_skips_accuracy(cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path) -> None:
    report_path = out_dir / "report.json"
    code, out, err = cli(
        "optimize", model_path, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--no-validate",
        "--report-json", report_path,
    )  # fmt: skip
    assert code == 0, err
    assert "SQNR" not in out and "Latency" not in out
    assert "nodes quantized" in out
    report = json.loads(report_path.read_text())
    assert report["accuracy"] == [] and report["latency"] == []
    assert report["quantized_op_types"] == {"Conv": 1}


def test_options_the_mode_ignores_are_named(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    code, _, err = cli(
        "optimize", model_path, "-o", out_dir / "d.onnx", "--mode", "dynamic", "--dynamic-conv",
        "--no-validate", "--equalize", "--bias-correction", "--method", "entropy",
    )  # fmt: skip
    assert code == 0, err
    assert "note: --method, --equalize, --bias-correction have no effect with --mode dynamic" in err
    code, _, err = cli(
        "optimize", model_path, "-o", out_dir / "s.onnx", "--calib", calib_npz, "--dynamic-conv", *FAST
    )
    assert code == 0, err
    assert "note: --dynamic-conv has no effect with --mode static" in err
    code, _, err = cli(
        "optimize", model_path, "-o", out_dir / "p.onnx", "--mode", "dynamic", "--dynamic-conv",
        "--no-validate",
    )  # fmt: skip
    assert code == 0 and "no effect" not in err


def test_quiet_prints_nothing(cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path) -> None:
    code, out, err = cli(
        "optimize", model_path, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--quiet", *FAST
    )
    assert code == 0, err
    assert out == ""
    assert err == ""
    assert (out_dir / "q.onnx").is_file()


def test_same_inputs_give_identical_bytes(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    first, second = out_dir / "first.onnx", out_dir / "second.onnx"
    assert cli("optimize", model_path, "-o", first, "--calib", calib_npz, "--quiet", *FAST)[0] == 0
    assert cli("optimize", model_path, "-o", second, "--calib", calib_npz, "--quiet", "--no-validate")[0] == 0
    assert _sha256(first) == _sha256(second)
    # Overwriting an existing output gives the same bytes again.
    assert cli("optimize", model_path, "-o", first, "--calib", calib_npz, "--quiet", "--no-validate")[0] == 0
    assert _sha256(first) == _sha256(second)
    assert _listing(out_dir) == ["first.onnx", "second.onnx"]


def test_failure_keeps_existing_output(
    cli: CliRunner, model_path: Path, out_dir: Path, write_npz: Callable[..., Path]
) -> None:
    target = out_dir / "q.onnx"
    target.write_bytes(b"previous result")
    data = write_npz("ints.npz", x=np.ones((2, 1, 3, 8, 8), dtype=np.int32))
    code, out, err = cli("optimize", model_path, "-o", target, "--calib", data)
    _assert_user_error(code, out, err, "float32")
    assert target.read_bytes() == b"previous result"
    assert _listing(out_dir) == ["q.onnx"]


def test_if_subgraph_model(
    cli: CliRunner, out_dir: Path, tmp_path: Path, write_npz: Callable[..., Path]
) -> None:
    model = builders.save(builders.if_conv_model(), tmp_path / "if.onnx")
    samples = builders.conv_calibration(samples=6)
    cond = np.array([True, False] * 3)
    data = write_npz("if.npz", x=samples, cond=cond)
    report_path = out_dir / "report.json"
    code, _, err = cli(
        "optimize", model, "-o", out_dir / "q.onnx", "--calib", data, "--report-json", report_path, *FAST
    )
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["quantized_op_types"] == {"Conv": 2}  # the outer Conv and the then-branch one
    assert report["subgraph_nodes"] == 1  # the else-branch Relu
    assert sorted(report["bodies"].values()) == [[0, 1], [1, 1]]
    assert report["accuracy"][0]["sqnr_db"] > 20.0
    onnx.checker.check_model(onnx.load(out_dir / "q.onnx"), full_check=True)


def test_matmul_model_random_calibration(cli: CliRunner, out_dir: Path, tmp_path: Path) -> None:
    model = builders.save(builders.matmul_model(), tmp_path / "mm.onnx")
    report_path = out_dir / "report.json"
    code, _, err = cli(
        "optimize", model, "-o", out_dir / "q.onnx", "--calib", "random", "--random-samples", "4",
        "--no-validate", "--quiet", "--report-json", report_path,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["quantized_op_types"] == {"MatMul": 1}
    assert report["calibration"]["random"] is True
    assert report["calibration"]["samples"] == 4


# ---------------------------------------------------------------------------------------------------
# Help, version, example


@pytest.mark.parametrize("argv", [["--help"], ["optimize", "--help"], ["example", "--help"]])
def test_help_exits_zero(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["optimize", "--help"]])
def test_help_subprocess(argv: list[str]) -> None:
    proc = _run_module(*argv, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: onnxq")
    assert proc.stderr == ""


def test_version(cli: CliRunner) -> None:
    code, out, _ = cli("--version")
    assert code == 0
    assert out.startswith("onnxq ")


def test_no_command_prints_help(cli: CliRunner) -> None:
    code, out, _ = cli()
    assert code == 2
    assert "optimize" in out and "example" in out


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import onnxq.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    onnxq.cli.main(['optimize', '--help'])\n"
        "print(','.join(m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'numpy') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_example_subprocess(tmp_path: Path) -> None:
    out_dir = tmp_path / "example"
    proc = _run_module("example", "--out-dir", out_dir, "--runs", "2", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "SQNR" in proc.stdout
    for name in (
        "example_cnn.onnx",
        "example_cnn.int8.onnx",
        "calibration.npz",
        "evaluation.npz",
        "report.json",
    ):
        assert (out_dir / name).is_file(), name
    report = json.loads((out_dir / "report.json").read_text())
    assert report["accuracy"] and report["accuracy"][0]["sqnr_db"] > 15.0
    assert report["batchnorms_folded"] > 0
    assert not [name for name in os.listdir(out_dir) if name.startswith(".")]


def test_report_json_is_a_directory_is_refused_before_any_work(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    (out_dir / "report.json").mkdir()
    code, out, err = cli(
        "optimize", model_path, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--no-validate", "--quiet",
        "--report-json", out_dir / "report.json",
    )  # fmt: skip
    _assert_user_error(code, out, err, "cannot write", "report.json")
    assert _listing(out_dir) == ["report.json"]  # checked up front: no model, no temporary file


def test_written_files_respect_the_umask(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    code, _, err = cli(
        "optimize", model_path, "-o", out_dir / "q.onnx", "--calib", calib_npz, "--no-validate", "--quiet",
        "--report-json", out_dir / "report.json",
    )  # fmt: skip
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert (out_dir / "q.onnx").stat().st_mode & 0o777 == expected
    assert (out_dir / "report.json").stat().st_mode & 0o777 == expected


# ---------------------------------------------------------------------------------------------------
# Modes and formats


def test_qoperator_format_lowers_and_reports(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    target = out_dir / "qop.onnx"
    code, out, err = cli(
        "optimize", model_path, "-o", target, "--calib", calib_npz, "--format", "qoperator", *FAST
    )
    assert code == 0, err
    assert "QLinearConv" in out  # the "lowered" row of the summary
    ops = [n.op_type for n in onnx.load(str(target)).graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops


def test_dynamic_mode_runs_without_calibration_data(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    """Conv stays float in dynamic mode unless asked: --dynamic-conv quantizes it."""
    code, _, err = cli("optimize", model_path, "-o", out_dir / "d.onnx", "--mode", "dynamic", "--no-validate")
    _assert_user_error(code, "", err, "nothing to quantize")
    code, out, err = cli(
        "optimize",
        model_path,
        "-o",
        out_dir / "d.onnx",
        "--mode",
        "dynamic",
        "--dynamic-conv",
        "--eval",
        calib_npz,
        *FAST,
    )
    assert code == 0, err
    assert "ConvInteger" in [n.op_type for n in onnx.load(str(out_dir / "d.onnx")).graph.node]
    assert "SQNR" in out


def test_already_quantized_model_needs_no_calib(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    qdq = out_dir / "qdq.onnx"
    assert cli("optimize", model_path, "-o", qdq, "--calib", calib_npz, "--no-validate", "--quiet")[0] == 0
    code, out, err = cli(
        "optimize", qdq, "-o", out_dir / "again.onnx", "--format", "qoperator", "--eval", calib_npz, *FAST
    )
    assert code == 0, err
    assert "mode=requantize" in out


# ---------------------------------------------------------------------------------------------------
# Accuracy tooling


def test_compare_prints_one_table_and_json(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    quantized = out_dir / "q.onnx"
    assert (
        cli("optimize", model_path, "-o", quantized, "--calib", calib_npz, "--no-validate", "--quiet")[0] == 0
    )
    code, out, err = cli("compare", model_path, quantized, "--data", calib_npz, "--runs", "2")
    assert code == 0, err
    assert "reference" in out and "q.onnx" in out and "SQNR" in out
    code, out, err = cli("compare", model_path, quantized, "--data", calib_npz, "--runs", "2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [m["name"] for m in data["models"]][1].endswith("q.onnx")


def test_compare_rejects_models_with_other_inputs(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    other = out_dir / "other.onnx"
    builders.save(builders.matmul_model(), other)
    code, out, err = cli("compare", model_path, other, "--data", calib_npz, "--runs", "2")
    _assert_user_error(code, out, err, "input")


def test_inspect_and_layers_report_every_quantized_tensor(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    quantized = out_dir / "q.onnx"
    code, out, err = cli(
        "optimize",
        model_path,
        "-o",
        quantized,
        "--calib",
        calib_npz,
        "--layers",
        "--report-json",
        out_dir / "r.json",
        *FAST,
    )
    assert code == 0, err
    assert "Per-layer numeric suite" in out
    assert json.loads((out_dir / "r.json").read_text())["layers"]
    code, out, err = cli("inspect", quantized, "--float", model_path, "--data", calib_npz, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert {row["kind"] for row in rows} == {"activation", "weight"}


def test_target_keeps_layers_float_until_met(cli: CliRunner, tmp_path: Path, out_dir: Path) -> None:
    model = builders.save(builders.outlier_chain_model(), tmp_path / "chain.onnx")
    data = tmp_path / "chain.npz"
    np.savez(data, x=np.stack([f["x"] for f in builders.chain_feeds(8, seed=1)]))
    report_path = out_dir / "r.json"
    code, out, err = cli(
        "optimize", model, "-o", out_dir / "t.onnx", "--calib", data, "--target", "sqnr>=1",
        "--report-json", report_path, *FAST,
    )  # fmt: skip
    assert code == 0, err
    assert "accuracy budget" in out and "(met)" in out
    budget = json.loads(report_path.read_text())["budget"]
    assert budget["met"] and budget["kept_float"] == []


def test_unreachable_target_says_not_met_and_exits_3(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    """sqnr>=200 holds only for the float model itself, which is not an answer: not met, exit 3."""
    target, report_path = out_dir / "t.onnx", out_dir / "r.json"
    code, out, err = cli(
        "optimize", model_path, "-o", target, "--calib", calib_npz, "--target", "sqnr>=200",
        "--report-json", report_path, *FAST,
    )  # fmt: skip
    assert code == 3, err
    assert "NOT met" in out and "(met)" not in out
    assert "target sqnr>=200 NOT met" in err and "exit status 3" in err
    report = json.loads(report_path.read_text())
    assert report["budget"]["met"] is False
    assert report["nodes_quantized"] == 1 and report["quantized_op_types"] == {"Conv": 1}
    ops = [n.op_type for n in onnx.load(target).graph.node]
    assert "QuantizeLinear" in ops  # the best model found is written: still quantized, and it runs
    ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(
        None, {"x": builders.conv_calibration(samples=1)[0]}
    )
    code, out, err = cli(
        "optimize", model_path, "-o", out_dir / "t.onnx", "--calib", calib_npz, "--target", "fast"
    )
    _assert_user_error(code, out, err, "sqnr>=")


def test_output_records_its_provenance(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    target = out_dir / "q.onnx"
    code, _, err = cli("optimize", model_path, "-o", target, "--calib", calib_npz, "--quiet", *FAST)
    assert code == 0, err
    model = onnx.load(target)
    assert model.producer_name == "onnxq"
    props = {p.key: p.value for p in model.metadata_props}
    import onnxq

    assert props["onnxq.version"] == onnxq.__version__
    assert props["onnxq.validated_with"] == f"onnxruntime {ort.__version__} CPUExecutionProvider"
    settings = json.loads(props["onnxq.settings"])
    assert settings["mode"] == "static" and settings["weights"]["per_channel"] is True
    assert settings["calibration"]["method"] == "minmax"
    calibration = json.loads(props["onnxq.calibration"])
    assert calibration["samples"] == 8 and calibration["fingerprint"].startswith("sha256:")
    # The fingerprint is the data's: other data, another fingerprint; the same data, the same one.
    other = out_dir / "other.npz"
    np.savez(other, x=builders.conv_calibration(seed=8))
    code, _, err = cli("optimize", model_path, "-o", out_dir / "o.onnx", "--calib", other, "--quiet", *FAST)
    assert code == 0, err
    other_props = {p.key: p.value for p in onnx.load(out_dir / "o.onnx").metadata_props}
    assert json.loads(other_props["onnxq.calibration"])["fingerprint"] != calibration["fingerprint"]
    assert other_props["onnxq.settings"] == props["onnxq.settings"]


def test_batching_the_calibration_changes_no_byte(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    """Ranges, provenance and all: how the samples are grouped into runs must not show in the output."""
    one, four = out_dir / "b1.onnx", out_dir / "b4.onnx"
    for target, batch in ((one, "1"), (four, "4")):
        code, _, err = cli(
            "optimize", model_path, "-o", target, "--calib", calib_npz, "--calib-batch", batch, "--quiet",
            "--no-validate",
        )  # fmt: skip
        assert code == 0, err
    assert _sha256(one) == _sha256(four)


def test_already_quantized_input_is_evaluated_on_the_given_data(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    """--calib with an already-quantized model is its evaluation data: no random data, no warning."""
    first = out_dir / "q.onnx"
    assert cli("optimize", model_path, "-o", first, "--calib", calib_npz, "--quiet", *FAST)[0] == 0
    report = out_dir / "r.json"
    code, out, err = cli("optimize", first, "-o", out_dir / "qop.onnx", "--calib", calib_npz, "--format",
                         "qoperator", "--report-json", report, *FAST)  # fmt: skip
    assert code == 0, err
    assert "RANDOM" not in err and "random" not in err
    assert "Accuracy vs the input model (already quantized" in out and "Q/DQ nodes" in out
    assert json.loads(report.read_text())["accuracy"][0]["samples"] == 8  # the calibration file's samples


def test_large_loss_is_said_with_the_command_that_recovers_it(
    cli: CliRunner,
    tmp_path: Path,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The outlier chain loses ~14 dB with min-max ranges: exit 0 (a model is written), but stderr and
    the report say so, and the suggested ``--target`` command meets its target. (Without the range
    rescue, which would try ``--method auto`` itself: then that is suggested too.)"""
    model = builders.save(builders.outlier_chain_model(), tmp_path / "chain.onnx")
    data = tmp_path / "chain.npz"
    np.savez(data, x=np.stack([f["x"] for f in builders.chain_feeds(8, seed=1)]))
    # (calibrated product ranges: with run-time ranges, the default, the run-time line is not said)
    argv = [
        "optimize",
        str(model),
        "-o",
        str(out_dir / "t.onnx"),
        "--calib",
        str(data),
        "--no-run-time-ranges",
        "--no-range-rescue",
        *FAST,
    ]
    monkeypatch.setattr(sys, "argv", ["onnxq", *argv])
    code, out, err = cli(*argv, "--report-json", out_dir / "r.json")
    assert code == 0, err
    # (the warning is logged: on the terminal it is an "onnxq: WARNING:" line on stderr)
    assert "large accuracy loss on output 'y'" in caplog.text and "WARNING: large accuracy loss" in out
    (line,) = [line for line in err.splitlines() if "to recover it, run:" in line]
    suggested = shlex.split(line.split("run: ", 1)[1])
    assert suggested[:3] == ["python", "-m", "onnxq"] and suggested[-2:] == ["--target", "cosine>=0.99"]
    (auto,) = [line for line in err.splitlines() if "choose each tensor's range method:" in line]
    assert shlex.split(auto.split("method: ", 1)[1]) == [*suggested[:-2], "--method", "auto"]
    (run_time,) = [line for line in err.splitlines() if "quantize their input at run time" in line]
    run_time_argv = shlex.split(run_time.split("(transformers): ", 1)[1])
    assert run_time_argv == [*suggested[:-2], "--run-time-ranges"]
    assert json.loads((out_dir / "r.json").read_text())["large_loss_outputs"] == ["y"]
    code, out, err = cli(*suggested[3:])
    assert code == 0, err
    assert "(met)" in out and "to recover it" not in err
    # The run-time suggestion runs too; once given, it is not suggested again.
    code, out, err = cli(*run_time_argv[3:])
    assert code == 0, err
    assert "quantize their input at run time (transformers)" not in err


def test_a_small_loss_gives_no_warning(
    cli: CliRunner, model_path: Path, calib_npz: Path, out_dir: Path
) -> None:
    code, out, err = cli("optimize", model_path, "-o", out_dir / "t.onnx", "--calib", calib_npz, *FAST)
    assert code == 0, err
    assert "large accuracy loss" not in err + out
