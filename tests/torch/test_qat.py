"""QAT: placement as onnxq's planner, export as QDQ, onnxq's already-quantized path, accuracy on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch
from torch import nn

import onnxq
from onnxq.errors import OnnxqError
from onnxq.runtime.session import make_session
from onnxq.torch import QATConfig, calibrate_qat, export_qat, prepare_qat
from onnxq.torch.fake_quant import ActivationFakeQuant
from tools import bench_qat

#: ORT at ORT_ENABLE_ALL runs the integer kernels (QLinearConv, QGemm), which requantize with their own
#: float rounding, so an activation may land one step away from torch's: bound on the logits' error,
#: relative to their largest magnitude. At ORT_DISABLE_ALL (the QDQ graph as written) it is ~1e-7.
ENABLE_ALL_BOUND = 0.02
DISABLE_ALL_BOUND = 1e-5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        z = self.c(y) + self.c(y)
        return self.fc(torch.flatten(self.pool(z), 1))


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return bench_qat.load_split()


def test_placement_follows_the_planner() -> None:
    gm = prepare_qat(_net())
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    kinds = [type(gm.get_submodule(c)).__name__ for c in calls]
    # input fq, conv+bn+relu fused, fq after the ReLU, maxpool, grid re-applied for the next conv ...
    assert kinds == [
        "ActivationFakeQuant", "QATConv2d", "ActivationFakeQuant", "MaxPool2d", "GridReuse", "QATConv2d",
        "ActivationFakeQuant", "Flatten", "GridReuse", "QATLinear", "ActivationFakeQuant", "QATLinear",
    ]  # fmt: skip


def test_concat_inputs_share_one_scale_and_add_gets_an_output_scale() -> None:
    gm = prepare_qat(_Branchy())
    nodes = {n.name: n for n in gm.graph.nodes}
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    producers = {str(a.target) for a in cat.args[0]}
    assert len(producers) == 1  # both Conv+ReLU outputs use one fake-quant instance
    add = next(n for n in nodes.values() if "add" in n.name)
    (user,) = add.users
    assert isinstance(gm.get_submodule(str(user.target)), ActivationFakeQuant)


def test_unsupported_modules_are_a_clear_error() -> None:
    with pytest.raises(OnnxqError, match="does not support module"):
        prepare_qat(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid()))
    with pytest.raises(OnnxqError, match="BatchNorm2d only right after a Conv2d"):
        prepare_qat(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)))


def test_bn_statistics_freeze_after_the_configured_step() -> None:
    gm = prepare_qat(_net(), QATConfig(freeze_bn_after=2), [torch.randn(8, 1, 8, 8)])
    bn = next(m for m in gm.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is not None
    gm.train()
    seen = []
    for _ in range(4):
        gm(torch.randn(8, 1, 8, 8) + 1.0)
        seen.append(bn.running_mean.clone())
    assert not torch.equal(seen[0], seen[1]) or not torch.equal(seen[0], torch.zeros(8))
    assert torch.equal(seen[2], seen[3])  # frozen from step 2 on


@pytest.mark.parametrize("bits,learnable", [(8, False), (4, True)])
def test_export_matches_torch_in_ort_and_onnxq_accepts_it(tmp_path: Path, bits: int, learnable: bool) -> None:
    x_train, y_train, x_test, _ = _digits()
    config = QATConfig(weight_bits=bits, learnable_scales=learnable)
    gm = prepare_qat(_net(), config, [x_train[:64]])
    bench_qat.train(gm, x_train[:256], y_train[:256], epochs=1, lr=1e-3)
    x = x_test[:128]
    with torch.no_grad():
        expected = gm.eval()(x).numpy()
    path = export_qat(gm, x[:1], tmp_path / "qat.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 6 and "BatchNormalization" not in ops
    feed = {"input": x.numpy()}
    scale = float(np.abs(expected).max())
    exact = make_session(str(path), opt_level="disable").run(None, feed)[0]
    assert float(np.abs(exact - expected).max()) <= DISABLE_ALL_BOUND * scale
    for fmt in ("qdq", "qoperator"):
        result = onnxq.quantize(path, [feed], onnxq.QuantConfig(format=fmt))
        saved = result.save(tmp_path / f"qat.{fmt}.onnx")
        got = make_session(str(saved)).run(None, feed)[0]
        assert float(np.abs(got - expected).max()) <= ENABLE_ALL_BOUND * scale
        if fmt == "qoperator":
            lowered = [n.op_type for n in onnx.load(str(saved)).graph.node]
            assert lowered.count("QLinearConv") == 2 and lowered.count("QGemm") == 2
            assert "DequantizeLinear" not in lowered


def test_export_needs_calibration(tmp_path: Path) -> None:
    gm = prepare_qat(_net())
    with pytest.raises(OnnxqError, match="calibrate_qat"):
        export_qat(gm, torch.randn(1, 1, 8, 8), tmp_path / "x.onnx")
    calibrate_qat(gm, [torch.randn(4, 1, 8, 8)])
    assert export_qat(gm, torch.randn(1, 1, 8, 8), tmp_path / "x.onnx").is_file()


def test_qat_beats_ptq_at_4_bit_weights_on_digits() -> None:
    x_train, y_train, x_test, y_test = _digits()
    float_model = bench_qat.train(bench_qat.make_cnn(4), x_train, y_train, epochs=12, lr=3e-3)
    ptq = bench_qat.fold_and_round_weights(float_model, 4)
    qat = bench_qat.qat(float_model, x_train, y_train, bits=4, epochs=3, lr=5e-4, learnable=True)
    ptq_acc = bench_qat.torch_accuracy(ptq, x_test, y_test)
    qat_acc = bench_qat.torch_accuracy(qat, x_test, y_test)
    assert qat_acc >= ptq_acc
