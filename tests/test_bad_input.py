"""Bad input, one table: every case ends in exit status 2 and one line naming the problem.

Each case builds its inputs in the test (a model, data, paths) and runs ``onnxq.cli.main`` in-process
with the file descriptors captured, so ONNX Runtime's own C++ log would be seen too. For every case:
the exit status, exactly one ``onnxq: error:`` line on stderr containing the expected fragments, nothing
else on stdout/stderr, the inputs byte-identical afterwards, and no output or temporary file left.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.helper
import pytest

from onnxq.cli import main

#: Few timed runs: latency is not under test.
FAST = ("--runs", "2")


@dataclass(frozen=True)
class Case:
    """``build(inputs, outputs)`` writes the case's files and returns the command line."""

    name: str
    build: Callable[[Path, Path], list[str]]
    fragments: tuple[str, ...]


def _model(inputs: Path, proto: onnx.ModelProto | None = None, name: str = "m.onnx") -> str:
    return str(builders.save(proto or builders.conv_relu_model(), inputs / name))


def _calib(inputs: Path, name: str = "calib.npz", data: np.ndarray | None = None) -> str:
    path = inputs / name
    np.savez(path, x=builders.conv_calibration(samples=4) if data is None else data)
    return str(path)


def _optimize(inputs: Path, outputs: Path, *extra: str) -> list[str]:
    return ["optimize", _model(inputs), "-o", str(outputs / "q.onnx"), "--calib", _calib(inputs), *extra]


def _through_dotdot(inputs: Path, outputs: Path) -> list[str]:
    model = _model(inputs)
    # The calibration file does not exist: the output check must come first.
    return ["optimize", model, "-o", str(inputs / ".." / inputs.name / "m.onnx"), "--calib", "missing.npz"]


def _through_symlink(inputs: Path, outputs: Path) -> list[str]:
    model = _model(inputs)
    link = inputs / "link.onnx"
    link.symlink_to(model)
    return ["optimize", model, "-o", str(link), "--calib", _calib(inputs)]


def _output_is_calibration_data(inputs: Path, outputs: Path) -> list[str]:
    calib = _calib(inputs)
    return ["optimize", _model(inputs), "-o", calib, "--calib", calib]


def _report_is_the_input(inputs: Path, outputs: Path) -> list[str]:
    return [*_optimize(inputs, outputs, "--no-validate"), "--report-json", str(inputs / "m.onnx")]


def _report_is_the_output(inputs: Path, outputs: Path) -> list[str]:
    return [*_optimize(inputs, outputs, "--no-validate"), "--report-json", str(outputs / "q.onnx")]


def _report_folder_missing(inputs: Path, outputs: Path) -> list[str]:
    return [*_optimize(inputs, outputs, "--no-validate"), "--report-json", str(outputs / "no" / "r.json")]


def _op_type_wrong_case(inputs: Path, outputs: Path) -> list[str]:
    return _optimize(inputs, outputs, "--no-validate", "--exclude-op-types", "conv")


def _node_typo(inputs: Path, outputs: Path) -> list[str]:
    return _optimize(inputs, outputs, "--no-validate", "--exclude-nodes", "cnov")


_RESHAPE_MODEL = """
g (float[N,6] x) => (float[2,4] y) {
    shape = Constant <value = int64[2] {2, 3}> ()
    r = Reshape <allowzero = 0> (x, shape)
    y = MatMul (r, w)
}
"""


def _reshape_model() -> onnx.ModelProto:
    proto = builders.parse(_RESHAPE_MODEL, {"w": np.ones((3, 4), np.float32)})
    proto.graph.node[1].name = "the_reshape"
    return proto


def _fails_at_run_time(inputs: Path, outputs: Path) -> list[str]:
    """The float model cannot run on the calibration data (12 values cannot become [2, 3])."""
    calib = inputs / "calib.npz"
    np.savez(calib, x=np.ones((3, 2, 6), np.float32))
    return [
        "optimize",
        _model(inputs, _reshape_model()),
        "-o",
        str(outputs / "q.onnx"),
        "--calib",
        str(calib),
    ]


def _validation_fails(inputs: Path, outputs: Path) -> list[str]:
    """Calibration runs (batch 1), the evaluation data does not (batch 2): no model is written."""
    calib, evaluation = inputs / "calib.npz", inputs / "eval.npz"
    np.savez(calib, x=np.ones((3, 1, 6), np.float32))
    np.savez(evaluation, x=np.ones((3, 2, 6), np.float32))
    model = _model(inputs, _reshape_model())
    return [
        "optimize",
        model,
        "-o",
        str(outputs / "q.onnx"),
        "--calib",
        str(calib),
        "--eval",
        str(evaluation),
    ]


def _more_elements_than_data(inputs: Path, outputs: Path) -> list[str]:
    proto = builders.conv_relu_model()
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    weight.ClearField("float_data")
    weight.raw_data = b"\0" * 64
    del weight.dims[:]
    weight.dims.extend([1_000_000, 1_000_000, 1, 1])
    return ["optimize", _model(inputs, proto), "-o", str(outputs / "q.onnx"), "--calib", _calib(inputs)]


def _training_domain(inputs: Path, outputs: Path) -> list[str]:
    node = onnx.helper.make_node(
        "Adagrad",
        ["r", "t", "x", "g", "h"],
        ["x_new", "h_new"],
        domain="ai.onnx.preview.training",
        name="optimizer_step",
    )
    tensors = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "rtxgh"]
    outs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("x_new", "h_new")]
    graph = onnx.helper.make_graph([node], "training", tensors, outs)
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("ai.onnx.preview.training", 1)]
    )
    return ["optimize", _model(inputs, proto), "-o", str(outputs / "q.onnx"), "--mode", "dynamic"]


def _no_default_opset(inputs: Path, outputs: Path) -> list[str]:
    proto = builders.conv_relu_model()
    del proto.opset_import[:]
    proto.opset_import.extend([onnx.helper.make_opsetid("com.example", 1)])
    return ["optimize", _model(inputs, proto), "-o", str(outputs / "q.onnx"), "--calib", _calib(inputs)]


def _nan_calibration(inputs: Path, outputs: Path) -> list[str]:
    data = np.full_like(builders.conv_calibration(samples=4), np.nan)
    return ["optimize", _model(inputs), "-o", str(outputs / "q.onnx"), "--calib", _calib(inputs, data=data)]


def _partly_inf_calibration(inputs: Path, outputs: Path) -> list[str]:
    data = builders.conv_calibration(samples=4)
    data[2, 0, 1, 2, 3] = np.inf
    return ["optimize", _model(inputs), "-o", str(outputs / "q.onnx"), "--calib", _calib(inputs, data=data)]


def _nan_evaluation(inputs: Path, outputs: Path) -> list[str]:
    data = builders.conv_calibration(samples=2)
    data[1, 0, 0, 0, 0] = np.nan
    evaluation = _calib(inputs, "eval.npz", data)
    return [*_optimize(inputs, outputs, *FAST), "--eval", evaluation]


CASES = [
    Case("output is the input, through ..", _through_dotdot, ("-o", "is the input model")),
    Case("output is the input, through a symlink", _through_symlink, ("-o", "is the input model")),
    Case("output is the calibration data", _output_is_calibration_data, ("-o", "is --calib")),
    Case("--report-json is the input model", _report_is_the_input, ("--report-json", "is the input model")),
    Case("--report-json is the -o file", _report_is_the_output, ("--report-json", "also the path of -o")),
    Case("--report-json folder missing", _report_folder_missing, ("--report-json", "does not exist")),
    Case("--exclude-op-types in the wrong case", _op_type_wrong_case, ("'conv'", "did you mean 'Conv'")),
    Case("--exclude-nodes typo", _node_typo, ("'cnov'", "not in the model")),
    Case("the float model fails on the data", _fails_at_run_time, ("'the_reshape' (Reshape) failed",)),
    Case("validation fails on the evaluation data", _validation_fails, ("'the_reshape' (Reshape) failed",)),
    Case(
        "tensor declares more elements than it holds",
        _more_elements_than_data,
        ("declares shape", "holds 64"),
    ),
    Case("training-domain op", _training_domain, ("Adagrad", "ai.onnx.preview.training", "optimizer_step")),
    Case("ONNX ops without a default opset import", _no_default_opset, ("no opset import",)),
    Case("all-NaN calibration data", _nan_calibration, ("input 'x' holds NaN", "sample 0")),
    Case(
        "one inf in the calibration data", _partly_inf_calibration, ("input 'x' holds inf (1 of", "sample 2")
    ),
    Case("NaN in the evaluation data", _nan_evaluation, ("evaluation data", "input 'x' holds NaN")),
]


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders (hidden ones included) by path, with a hash of its bytes."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in [*files, *dirs]:
                path = Path(root) / name
                if path.is_file():
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    found[str(path)] = "dir" if not path.is_symlink() else f"link:{os.readlink(path)}"
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_touches_nothing(
    case: Case, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    args = case.build(inputs, outputs)
    before = _snapshot(inputs, outputs)

    code = main(args)

    out, err = capfd.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # ONNX Runtime's own log ([E:onnxruntime:...]) would be a second line
    assert lines[0].startswith("onnxq: error: "), lines[0]
    for fragment in case.fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert _snapshot(inputs, outputs) == before  # inputs byte-identical, no output or temporary file


def test_a_model_saved_in_onnxruntimes_nchwc_layout_is_named_as_such(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A model saved after ORT_ENABLE_ALL holds com.microsoft.nchwc ops (this CPU's blocked layout,
    which no quantizer reads): the error says where it came from and what to quantize instead."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    body = """
    wide (float[1,16,8,8] x) => (float[1,16,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }
    """
    weights = {"w": rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32), "b": np.zeros(16, np.float32)}
    exported = builders.save(builders.parse(body, weights), tmp_path / "m.onnx")
    saved = tmp_path / "m.all.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(saved)
    options.log_severity_level = 3  # its warning that the saved model is hardware specific
    ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    capfd.readouterr()
    if not any(n.domain == "com.microsoft.nchwc" for n in onnx.load(str(saved)).graph.node):
        pytest.skip("this CPU has no NCHWc kernels: onnxruntime saved no nchwc op")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.normal(0, 1, (2, 1, 16, 8, 8)).astype(np.float32))
    code = main(["optimize", str(saved), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib)])
    _, err = capfd.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "NCHWc layout ops (com.microsoft.nchwc: 1 Conv" in err and "ORT_ENABLE_EXTENDED" in err
    assert not (tmp_path / "q.onnx").exists()
