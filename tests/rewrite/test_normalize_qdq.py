"""Tests for NormalizeQDQPass: models that already hold Q/DQ, from PyTorch QAT, ORT and onnxq.

Every rewrite is checked in ORT at ``ORT_DISABLE_ALL`` against the model before normalization: the
rules only move work from run time to save time (a fake-quantized weight) or drop exact round trips
(``DQ → Q`` with the same parameters), so outputs must stay bit-identical.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

import onnxq
from onnxq.rewrite.normalize_qdq import NormalizeQDQPass, is_quantized

_QDQ = ("QuantizeLinear", "DequantizeLinear")


# -- helpers ---------------------------------------------------------------------------------------
def _proto(text: str, arrays: Mapping[str, Any] | None = None) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for name, array in (arrays or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto)
    return proto


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(node for node in model.graph.all_nodes() if node.name == name)


def _constant_quantize_nodes(model: ir.Model) -> list[ir.Node]:
    """QuantizeLinear nodes whose input is an initializer or a Constant node (a foldable weight)."""
    found = []
    for node in model.graph.all_nodes():
        if node.op_type != "QuantizeLinear" or node.inputs[0] is None:
            continue
        source = node.inputs[0]
        producer = source.producer()
        if source.const_value is not None or (producer is not None and producer.op_type == "Constant"):
            found.append(node)
    return found


def _param_duplicates(model: ir.Model) -> list[tuple[str, str]]:
    """Pairs of distinct Q/DQ scale/zero-point initializers with equal type, shape and bytes."""
    seen: dict[tuple[object, ...], str] = {}
    pairs = []
    for node in model.graph.all_nodes():
        if node.op_type not in _QDQ:
            continue
        for value in node.inputs[1:3]:
            if value is None or value.const_value is None or value.name is None:
                continue
            tensor = value.const_value
            key = (tensor.dtype, tuple(tensor.shape.numpy()), tensor.tobytes())
            first = seen.setdefault(key, value.name)
            if first != value.name:
                pairs.append((first, value.name))
    return pairs


def _normalize(model: ir.Model) -> tuple[ir.passes.PassResult, NormalizeQDQPass]:
    normalize = NormalizeQDQPass()
    result = normalize(model)
    assert result.model is model
    onnx.checker.check_model(ir.to_proto(model))
    return result, normalize


def _assert_idempotent(model: ir.Model) -> None:
    """A second run changes nothing: not ``modified``, no change notes, identical bytes."""
    before = builders.serialize(model)
    result, normalize = _normalize(model)
    assert not result.modified
    assert normalize.notes == []
    assert builders.serialize(model) == before


def _assert_same_outputs(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape
        np.testing.assert_array_equal(a, e)


# -- PyTorch QAT export ----------------------------------------------------------------------------
def _torch_qat_model(folder: Path) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Conv → ReLU → Linear with QAT-style fake-quant, exported by the TorchScript exporter (opset 13).

    Returns the exported model, an input, torch's output for it, and the integer weights torch
    itself computes for the two fake-quantized weights.
    """
    pytest.importorskip("torch")
    import torch

    torch.manual_seed(0)

    class QATNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 4 * 4, 5)
            # What a QAT observer holds after training: per-channel weight scales, zero points 0.
            self.conv_scale = torch.tensor([0.004, 0.006, 0.005, 0.007])
            self.fc_scale = torch.full((5,), 0.0008)
            self.conv_zp = torch.zeros(4, dtype=torch.int32)
            self.fc_zp = torch.zeros(5, dtype=torch.int32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.fake_quantize_per_tensor_affine(x, 0.02, 128, 0, 255)
            w = torch.fake_quantize_per_channel_affine(
                self.conv.weight, self.conv_scale, self.conv_zp, 0, -128, 127
            )
            y = torch.relu(torch.nn.functional.conv2d(x, w, self.conv.bias, padding=1))
            y = torch.fake_quantize_per_tensor_affine(y, 0.01, 0, 0, 255)
            y = torch.nn.functional.max_pool2d(y, 2).flatten(1)
            w2 = torch.fake_quantize_per_channel_affine(
                self.fc.weight, self.fc_scale, self.fc_zp, 0, -128, 127
            )
            y = torch.nn.functional.linear(y, w2, self.fc.bias)
            return torch.fake_quantize_per_tensor_affine(y, 0.005, 128, 0, 255)

    net = QATNet().eval()
    x = torch.randn(2, 3, 8, 8)
    path = folder / "qat.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x,),
            path,
            dynamo=False,
            opset_version=13,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
        with torch.no_grad():
            expected = net(x).numpy()
            integers = {
                "conv.weight": torch.quantize_per_channel(
                    net.conv.weight, net.conv_scale.double(), net.conv_zp.long(), 0, torch.qint8
                )
                .int_repr()
                .numpy(),
                "fc.weight": torch.quantize_per_channel(
                    net.fc.weight, net.fc_scale.double(), net.fc_zp.long(), 0, torch.qint8
                )
                .int_repr()
                .numpy(),
            }
    return onnx.load(path), x.numpy(), expected, integers


def test_torch_qat_export_folds_weight_fake_quant(tmp_path: Path) -> None:
    proto, x, expected_torch, torch_integers = _torch_qat_model(tmp_path)
    model = ir.from_proto(proto)
    # The export: Q → DQ on the input, the ReLU output, the output, and on both float weights.
    assert is_quantized(model)
    counts = builders.op_counts(model)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == 5
    weight_qs = _constant_quantize_nodes(model)
    assert sorted(str(node.inputs[0].name) for node in weight_qs) == ["conv.weight", "fc.weight"]  # type: ignore[union-attr]
    feeds = {"x": x}
    before = builders.run_disabled(proto, feeds)

    result, normalize = _normalize(model)

    assert result.modified
    assert _constant_quantize_nodes(model) == []
    counts = builders.op_counts(model)
    assert counts["QuantizeLinear"] == 3
    assert counts["DequantizeLinear"] == 5
    assert counts["Constant"] == 0  # scales/zero points became initializers
    assert "conv.weight" not in model.graph.initializers
    assert "fc.weight" not in model.graph.initializers
    assert any("2 weight Q→DQ pairs folded into int8" in note for note in normalize.notes)
    assert normalize.missing_ranges == []  # the Gemm reads MaxPool → Flatten of a DQ output
    for op, weight_name in (("Conv", "conv.weight"), ("Gemm", "fc.weight")):
        anchor = next(node for node in model.graph if node.op_type == op)
        dq = anchor.inputs[1].producer()  # type: ignore[union-attr]
        assert dq is not None and dq.op_type == "DequantizeLinear"
        stored = dq.inputs[0]
        assert stored is not None and stored.const_value is not None
        assert stored.const_value.dtype == ir.DataType.INT8
        assert dq.attributes["axis"].as_int() == 0
        # torch's own integer weights: equal up to ties rounded differently (one step at most).
        diff = np.abs(stored.const_value.numpy().astype(np.int32) - torch_integers[weight_name])
        assert int(diff.max()) <= 1
    after = builders.run_disabled(model, feeds)
    _assert_same_outputs(before, after)
    # And the ONNX model still computes what torch computed (output step is 0.005).
    assert float(np.max(np.abs(after[0] - expected_torch))) <= 0.005 + 1e-6
    _assert_idempotent(model)


# -- onnxruntime.quantization ----------------------------------------------------------------------
_TWO_CONV_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
two_conv (float[N,3,8,8] x) => (float[N,4] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <kernel_shape = [1, 1]> (r1, w2, b2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    y = MatMul (f, w3)
}
"""


def _two_conv_float() -> onnx.ModelProto:
    """Two Convs with 4 output channels each: their per-channel weight zero points are equal."""
    rng = np.random.default_rng(3)
    arrays = {
        "w1": rng.normal(0.0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0.0, 0.1, 4).astype(np.float32),
        "w2": rng.normal(0.0, 0.3, (4, 4, 1, 1)).astype(np.float32),
        "b2": rng.normal(0.0, 0.1, 4).astype(np.float32),
        "w3": rng.normal(0.0, 0.3, (4, 4)).astype(np.float32),
    }
    return _proto(_TWO_CONV_TEXT, arrays)


def _ort_quantized(tmp_path: Path) -> onnx.ModelProto:
    pytest.importorskip("onnxruntime.quantization")
    from onnxruntime import quantization

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(5)
            self.feeds = iter([{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    source, target = tmp_path / "float.onnx", tmp_path / "ort_qdq.onnx"
    onnx.save(_two_conv_float(), source)
    quantization.quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    return onnx.load(target)


def test_ort_quantize_static_output_is_deduplicated_and_unchanged(tmp_path: Path) -> None:
    proto = _ort_quantized(tmp_path)
    model = ir.from_proto(proto)
    assert is_quantized(model)
    duplicates = _param_duplicates(model)
    assert duplicates, "the fixture should hold equal zero points under different names"
    counts_before = builders.op_counts(model)
    feeds = {"x": np.random.default_rng(9).normal(size=(3, 3, 8, 8)).astype(np.float32)}
    before = builders.run_disabled(proto, feeds)

    result, normalize = _normalize(model)

    assert result.modified
    assert normalize.notes
    assert any("duplicate scale/zero-point initializer" in note for note in normalize.notes)
    assert _param_duplicates(model) == []
    for kept, merged in duplicates:
        assert merged not in model.graph.initializers
        assert kept in model.graph.initializers
    assert builders.op_counts(model) == counts_before  # ORT's weights are already integers
    assert _constant_quantize_nodes(model) == []
    assert normalize.missing_ranges == []
    _assert_same_outputs(before, builders.run_disabled(model, feeds))
    _assert_idempotent(model)


# -- onnxq's own output ----------------------------------------------------------------------------
def test_onnxq_output_is_already_canonical() -> None:
    calibration = builders.conv_calibration()
    feeds = [{"x": calibration[i]} for i in range(len(calibration))]
    model = onnxq.quantize(builders.conv_relu_model(), feeds).model
    assert is_quantized(model)
    before = builders.serialize(model)

    result, normalize = _normalize(model)

    assert not result.modified
    assert normalize.notes == []
    assert normalize.missing_ranges == []
    assert builders.serialize(model) == before


# -- hand-written graph: every rule at once --------------------------------------------------------
_HAND_TEXT = """
<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
hand (float[2,8] x, float[2,8] z) => (float[2,4] y, float[2,4] y2) {
    [q_x] xq = QuantizeLinear (x, s1, zp1)
    [dq_x] xd = DequantizeLinear (xq, s1, zp1)
    [q_x_again] xq2 = QuantizeLinear (xd, s1b, zp1b)
    [dq_x_again] xd2 = DequantizeLinear (xq2, s1b, zp1b)
    [dq_w] wd = com.microsoft.DequantizeLinear <axis = 1> (wq, ws, wzp)
    [mm] m = MatMul (xd2, wd)
    [dq_b] bd = DequantizeLinear (bq, sb, zb)
    [q_b] bq2 = QuantizeLinear (bd, sb, zb)
    [dq_b_again] bd2 = DequantizeLinear (bq2, sb, zb)
    [add] y = Add (m, bd2)
    [mm_float] y2 = MatMul (z, wf)
}
"""


def _hand_model() -> ir.Model:
    rng = np.random.default_rng(11)
    arrays = {
        "s1": np.array([0.05], np.float32),  # [1]-shaped per-tensor scale
        "zp1": np.array([120], np.uint8),
        "s1b": np.array(0.05, np.float32),  # the same parameters again, as scalars
        "zp1b": np.array(120, np.uint8),
        "wq": rng.integers(-127, 128, (8, 4)).astype(np.int8),
        "ws": np.array([0.01, 0.02, 0.015, 0.03], np.float32),
        "wzp": np.zeros(4, np.int8),
        "bq": rng.integers(-100, 100, 4).astype(np.int8),
        "sb": np.array(0.002, np.float32),
        "zb": np.array(3, np.int8),
        "wf": rng.normal(0.0, 0.3, (8, 4)).astype(np.float32),
    }
    return ir.from_proto(_proto(_HAND_TEXT, arrays))


def _hand_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    return {
        "x": rng.normal(0.0, 2.0, (2, 8)).astype(np.float32),
        "z": rng.normal(0.0, 1.0, (2, 8)).astype(np.float32),
    }


def test_hand_written_graph_every_rule() -> None:
    model = _hand_model()
    feeds = _hand_feeds()
    before = builders.run_disabled(model, feeds)

    result, normalize = _normalize(model)

    assert result.modified
    # com.microsoft DequantizeLinear → default domain, axis kept.
    dq_w = _node(model, "dq_w")
    assert dq_w.domain == ""
    assert dq_w.attributes["axis"].as_int() == 1
    # [1]-shaped per-tensor scale and zero point → scalars; the scalar duplicates merged into them.
    s1 = model.graph.initializers["s1"]
    assert s1.const_value is not None and tuple(s1.const_value.shape) == ()
    zp1 = model.graph.initializers["zp1"]
    assert zp1.const_value is not None and tuple(zp1.const_value.shape) == ()
    assert "s1b" not in model.graph.initializers and "zp1b" not in model.graph.initializers
    # Double fake-quant on x → one Q → DQ pair.
    x = model.graph.inputs[0]
    assert [use.node.name for use in x.uses()] == ["q_x"]
    mm = _node(model, "mm")
    dq = mm.inputs[0].producer()  # type: ignore[union-attr]
    assert dq is not None and dq.op_type == "DequantizeLinear"
    assert dq.inputs[0] is _node(model, "q_x").outputs[0]
    assert dq.inputs[1] is s1 and dq.inputs[2] is zp1
    # DQ → Q with identical parameters → the integer bias is read directly.
    dq_b_again = _node(model, "dq_b_again")
    assert dq_b_again.inputs[0] is model.graph.initializers["bq"]
    names = {node.name for node in model.graph}
    assert names.isdisjoint({"q_x_again", "dq_x", "q_b", "dq_b"})
    assert builders.op_counts(model)["QuantizeLinear"] == 1
    # The float MatMul has no range; nothing changed for it.
    assert normalize.missing_ranges == [
        "mm_float: input 'z' has no QuantizeLinear/DequantizeLinear (no range)"
    ]
    mm_float = _node(model, "mm_float")
    assert [v.name for v in mm_float.inputs] == ["z", "wf"]  # type: ignore[union-attr]
    notes = "\n".join(normalize.notes)
    for expected in ("com.microsoft", "[1]-shaped", "duplicate scale/zero-point", "2 DQ→Q pairs"):
        assert expected in notes
    _assert_same_outputs(before, builders.run_disabled(model, feeds))
    _assert_idempotent(model)


def test_normalization_is_deterministic() -> None:
    digests = set()
    for _ in range(2):
        model = _hand_model()
        NormalizeQDQPass()(model)
        digests.add(hashlib.sha256(builders.serialize(model)).hexdigest())
    assert len(digests) == 1


# -- single rules and their declines ---------------------------------------------------------------
def test_weight_through_cast_and_identity_is_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    cast_weight (float[2,8] x) => (float[2,4] y) {
        xq = QuantizeLinear (x, sx, zx)
        xd = DequantizeLinear (xq, sx, zx)
        w32 = Cast <to = 1> (w16)
        wid = Identity (w32)
        wq = QuantizeLinear <axis = 1> (wid, sw, zw)
        wd = DequantizeLinear <axis = 1> (wq, sw, zw)
        y = MatMul (xd, wd)
    }
    """
    rng = np.random.default_rng(2)
    arrays = {
        "sx": np.array(0.03, np.float32),
        "zx": np.array(128, np.uint8),
        "w16": rng.normal(0.0, 0.3, (8, 4)).astype(np.float16),
        "sw": np.array([0.004, 0.003, 0.005, 0.002], np.float32),
        "zw": np.zeros(4, np.int8),
    }
    model = ir.from_proto(_proto(text, arrays))
    feeds = {"x": rng.normal(size=(2, 8)).astype(np.float32)}
    before = builders.run_disabled(model, feeds)

    result, normalize = _normalize(model)

    assert result.modified
    assert "1 weight Q→DQ pair folded into int8 initializer" in normalize.notes
    assert _constant_quantize_nodes(model) == []
    counts = builders.op_counts(model)
    assert counts["Cast"] == counts["Identity"] == 0
    assert counts["QuantizeLinear"] == 1
    assert "w16" not in model.graph.initializers
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    stored = matmul.inputs[1].producer().inputs[0]  # type: ignore[union-attr]
    assert stored is not None and stored.name == "w16_quantized"
    assert stored.const_value is not None and stored.const_value.dtype == ir.DataType.INT8
    _assert_same_outputs(before, builders.run_disabled(model, feeds))
    _assert_idempotent(model)


def test_weight_in_a_constant_node_is_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    constant_weight (float[2,2] x) => (float[2,2] y) {
        w = Constant <value = float[2,2] {0.5, -0.25, 1.0, 0.126}> ()
        wq = QuantizeLinear (w, s, z)
        wd = DequantizeLinear (wq, s, z)
        y = MatMul (x, wd)
    }
    """
    arrays = {"s": np.array(0.01, np.float32), "z": np.array(0, np.int8)}
    model = ir.from_proto(_proto(text, arrays))
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 2)).astype(np.float32)}
    before = builders.run_disabled(model, feeds)

    result, _ = _normalize(model)

    assert result.modified
    assert builders.op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1}
    dq = next(node for node in model.graph if node.op_type == "DequantizeLinear")
    stored = dq.inputs[0]
    assert stored is not None and stored.const_value is not None
    np.testing.assert_array_equal(stored.const_value.numpy(), np.array([[50, -25], [100, 13]], np.int8))
    _assert_same_outputs(before, builders.run_disabled(model, feeds))
    _assert_idempotent(model)


def test_parallel_identical_fake_quants_merge() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    twice (float[2,8] x) => (float[2,4] y1, float[2,4] y2) {
        qa = QuantizeLinear (x, s, z)
        da = DequantizeLinear (qa, s, z)
        y1 = MatMul (da, w1)
        qb = QuantizeLinear (x, s2, z2)
        db = DequantizeLinear (qb, s2, z2)
        y2 = MatMul (db, w2)
    }
    """
    rng = np.random.default_rng(4)
    arrays = {
        "s": np.array(0.02, np.float32),
        "z": np.array(7, np.uint8),
        "s2": np.array(0.02, np.float32),
        "z2": np.array(7, np.uint8),
        "w1": rng.normal(size=(8, 4)).astype(np.float32),
        "w2": rng.normal(size=(8, 4)).astype(np.float32),
    }
    model = ir.from_proto(_proto(text, arrays))
    feeds = {"x": rng.normal(size=(2, 8)).astype(np.float32)}
    before = builders.run_disabled(model, feeds)

    result, normalize = _normalize(model)

    assert result.modified
    counts = builders.op_counts(model)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == 1
    matmuls = [node for node in model.graph if node.op_type == "MatMul"]
    assert matmuls[0].inputs[0] is matmuls[1].inputs[0]
    assert any("2 duplicate QuantizeLinear/DequantizeLinear nodes merged" in note for note in normalize.notes)
    _assert_same_outputs(before, builders.run_disabled(model, feeds))
    _assert_idempotent(model)


def test_shared_one_element_scale_gets_a_scalar_copy() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    shared (float[2,8] x) => (float[2,8] y, float[2,8] s_times_x) {
        q = QuantizeLinear (x, s, z)
        y = DequantizeLinear (q, s, z)
        s_times_x = Mul (x, s)
    }
    """
    arrays = {"s": np.array([0.1], np.float32), "z": np.array([0], np.uint8)}
    model = ir.from_proto(_proto(text, arrays))
    feeds = {"x": np.random.default_rng(6).normal(size=(2, 8)).astype(np.float32)}
    before = builders.run_disabled(model, feeds)

    result, _ = _normalize(model)

    assert result.modified
    mul = next(node for node in model.graph if node.op_type == "Mul")
    assert mul.inputs[1] is model.graph.initializers["s"]
    assert tuple(model.graph.initializers["s"].shape) == (1,)  # type: ignore[arg-type]
    for node in model.graph:
        if node.op_type in _QDQ:
            scale, zero_point = node.inputs[1], node.inputs[2]
            assert scale is not None and scale.const_value is not None
            assert zero_point is not None and zero_point.const_value is not None
            assert tuple(scale.const_value.shape) == () == tuple(zero_point.const_value.shape)
    _assert_same_outputs(before, builders.run_disabled(model, feeds))
    _assert_idempotent(model)


def test_block_wise_and_unsupported_types_are_declined_with_notes() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>
    declines (float[2,4] x) => (float[4,4] wd, float[2,4] xd) {
        wq = QuantizeLinear <axis = 1, block_size = 2> (w, sw, zw)
        wd = DequantizeLinear <axis = 1, block_size = 2> (wq, sw, zw)
        xq = QuantizeLinear (x, sx, zx)
        xd = com.microsoft.DequantizeLinear <axis = 1, unknown = 1> (xq, sx, zx)
    }
    """
    rng = np.random.default_rng(8)
    arrays: dict[str, np.ndarray] = {
        "w": rng.normal(size=(4, 4)).astype(np.float32),
        "sw": np.full((4, 2), 0.01, np.float32),
        "zw": np.zeros((4, 2), np.int8),
        "sx": np.array(0.01, np.float32),
        "zx": np.array(0, np.int8),
    }
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in arrays.items())
    model = ir.from_proto(proto)
    before = builders.serialize(model)

    normalize = NormalizeQDQPass()
    result = normalize(model)

    assert not result.modified
    assert builders.serialize(model) == before
    declines = "\n".join(builders.lines(normalize.declined))
    assert "block-wise quantization (block_size=2)" in declines
    assert "kept in com.microsoft: attribute unknown" in declines


def test_ms_int16_below_opset_21_is_kept() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    int16 (float[2,4] x) => (float[2,4] y) {
        q = com.microsoft.QuantizeLinear (x, s, z)
        y = com.microsoft.DequantizeLinear (q, s, z)
    }
    """
    arrays = {"s": np.array(0.001, np.float32), "z": np.array(0, np.int16)}
    model = ir.from_proto(_proto(text, arrays))
    feeds = {"x": np.random.default_rng(10).normal(size=(2, 4)).astype(np.float32)}
    before = builders.run_disabled(model, feeds)

    result, normalize = _normalize(model)

    assert not result.modified
    assert all(node.domain == "com.microsoft" for node in model.graph)
    declines = builders.lines(normalize.declined)
    assert sum("int16 needs a newer default-domain opset" in line for line in declines) == 2
    _assert_same_outputs(before, builders.run_disabled(model, feeds))


def test_range_through_pass_through_ops_is_not_missing() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    passthrough (float[2,2,4] x, float[4,3] w) => (float[2,3] y, float[2,3] y2) {
        q = QuantizeLinear (x, s, z)
        d = DequantizeLinear (q, s, z)
        r = Reshape (d, shape)
        y = MatMul (r, w)
        e = Exp (d)
        re = Reshape (e, shape)
        [mm_exp] y2 = MatMul (re, w)
    }
    """
    arrays = {"s": np.array(0.1, np.float32), "z": np.array(0, np.int8), "shape": np.array([2, 4], np.int64)}
    model = ir.from_proto(_proto(text, arrays))
    _, normalize = _normalize(model)
    # input 1 of both MatMuls is a float graph input: no range either.
    assert normalize.missing_ranges == [
        "<MatMul -> y>: input 'w' has no QuantizeLinear/DequantizeLinear (no range)",
        "mm_exp: input 're' has no QuantizeLinear/DequantizeLinear (no range)",
        "mm_exp: input 'w' has no QuantizeLinear/DequantizeLinear (no range)",
    ]


# -- no match and subgraphs ------------------------------------------------------------------------
def test_float_model_is_not_touched() -> None:
    model = ir.from_proto(builders.matmul_model())
    before = builders.serialize(model)
    assert not is_quantized(model)

    normalize = NormalizeQDQPass()
    result = normalize(model)

    assert not result.modified
    assert normalize.notes == [] and normalize.missing_ranges == []
    assert builders.serialize(model) == before


_IF_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
if_weight (float[N,3,8,8] x, bool cond) => (float[N,4,8,8] y) {
    h = Relu (x)
    y = If (cond) <
        then_branch = then_graph () => (float[N,4,8,8] t) {
            hq = QuantizeLinear (h, sh, zh)
            hd = DequantizeLinear (hq, sh, zh)
            wq = QuantizeLinear <axis = 0> (w, sw, zw)
            wd = DequantizeLinear <axis = 0> (wq, sw, zw)
            t = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (hd, wd)
        },
        else_branch = else_graph () => (float[N,4,8,8] e) {
            e = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (h, w)
        }
    >
}
"""


def test_weight_fake_quant_inside_if_branch_is_folded() -> None:
    rng = np.random.default_rng(13)
    arrays = {
        "w": rng.normal(0.0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "sw": np.array([0.003, 0.004, 0.005, 0.006], np.float32),
        "zw": np.zeros(4, np.int8),
        "sh": np.array(0.01, np.float32),
        "zh": np.array(0, np.uint8),
    }
    model = ir.from_proto(_proto(_IF_TEXT, arrays))
    assert not any(node.op_type in _QDQ for node in model.graph)
    assert is_quantized(model)  # only the subgraph holds Q/DQ
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    before = [builders.run_disabled(model, {"x": x, "cond": np.array(flag)}) for flag in (True, False)]

    result, normalize = _normalize(model)

    assert result.modified
    assert _constant_quantize_nodes(model) == []
    then_branch = next(iter(model.graph.subgraphs()))
    conv = next(node for node in then_branch if node.op_type == "Conv")
    dq = conv.inputs[1].producer()  # type: ignore[union-attr]
    assert dq is not None and dq.op_type == "DequantizeLinear" and dq.graph is then_branch
    stored = dq.inputs[0]
    assert stored is not None and stored.const_value is not None
    assert stored.const_value.dtype == ir.DataType.INT8
    # The float weight is still read by the else branch: it stays.
    assert "w" in model.graph.initializers
    assert normalize.missing_ranges == [
        "<Conv -> e>: input 'h' has no QuantizeLinear/DequantizeLinear (no range)"
    ]
    after = [builders.run_disabled(model, {"x": x, "cond": np.array(flag)}) for flag in (True, False)]
    for expected, actual in zip(before, after, strict=True):
        _assert_same_outputs(expected, actual)
    _assert_idempotent(model)
