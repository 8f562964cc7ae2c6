"""Export with both exporters, quantize_module end to end, and `import onnxq` without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch

import onnxq
from onnxq.errors import OnnxqError
from onnxq.runtime.session import make_session
from onnxq.torch import export, quantize_module
from tools import bench_qat

#: Held-out digits on which the int8 model must pick the same class as the float torch model.
TOP1_AGREEMENT = 0.98


def _small() -> torch.nn.Module:
    torch.manual_seed(0)
    return bench_qat.make_cnn(4).eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_export_loads_in_onnxruntime_and_matches_torch(tmp_path: Path, dynamo: bool) -> None:
    model = _small()
    x = torch.randn(3, 1, 8, 8)
    path = export(model, x[:1], tmp_path / "m.onnx", ({0: "batch"},), dynamo=dynamo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left
    out = make_session(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_export_failure_is_an_onnxq_error(tmp_path: Path) -> None:
    class Bad(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eig(x)[0].real  # no ONNX equivalent

    with pytest.raises(OnnxqError, match="exporter failed"):
        export(Bad(), torch.randn(2, 2), tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


def test_quantize_module_round_trip_on_digits(tmp_path: Path) -> None:
    x_train, y_train, x_test, _ = bench_qat.load_split()
    model = bench_qat.train(bench_qat.make_cnn(4), x_train, y_train, epochs=8, lr=3e-3)
    calibration = [x_train[i : i + 8] for i in range(0, 64, 8)]
    result = quantize_module(model, x_train[:1], calibration, path=tmp_path / "digits.int8.onnx")
    assert isinstance(result, onnxq.QuantizationResult)
    assert result.report.accuracy and result.report.validated_with
    assert result.report.quantized_op_types.get("Conv", 0) == 3
    out = make_session(str(tmp_path / "digits.int8.onnx")).run(None, {"input": x_test.numpy()})[0]
    with torch.no_grad():
        reference = model(x_test).argmax(1).numpy()
    assert float((out.argmax(1) == reference).mean()) >= TOP1_AGREEMENT


def test_calibration_samples_with_labels_are_rejected() -> None:
    model = _small()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(OnnxqError, match="no labels"):
        quantize_module(model, x, [(x, torch.tensor([1]))])


def test_import_onnxq_never_imports_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import onnxq, onnxq.pipeline\n"
        "assert onnxq.quantize is not None\n"
        "try:\n"
        "    import onnxq.torch\n"
        "except ImportError as exc:\n"
        "    assert \"'onnxq[torch]'\" in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('onnxq.torch imported without torch')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
