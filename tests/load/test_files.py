"""Loading, version normalization and saving of models (``onnxq.load``)."""

from __future__ import annotations

import os
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.defs
import onnx.helper
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
import onnxq.load.files as model_io
import onnxq.load.versions as versions
from onnxq.errors import OnnxqError
from onnxq.graph import default_opset
from onnxq.load.files import load_model, model_size_bytes, save_model, serialize_model
from onnxq.load.versions import EMITTED_OPS, normalize_versions
from onnxq.runtime.kernels import kernel_table, ort_max_versions


def _session(source: bytes | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(source: bytes | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a) for a in _session(source).run(None, feed)]


def _proto_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _ir_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def _op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    return [
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    ]


# ---------------------------------------------------------------------------------------------------
# load_model


def test_load_from_path(model_path: Path) -> None:
    model = load_model(model_path)
    assert isinstance(model, ir.Model)
    assert _op_types(model) == ["Conv", "Relu"]
    assert set(model.graph.initializers) == {"w", "b"}
    assert load_model(str(model_path)).graph.inputs[0].name == "x"


def test_load_from_model_proto() -> None:
    proto = builders.conv_relu_model()
    before = _proto_bytes(proto)
    model = load_model(proto)
    assert _op_types(model) == ["Conv", "Relu"]
    model.graph.remove(next(iter(model.graph)), safe=False)  # the caller owns the result
    assert _proto_bytes(proto) == before


def test_load_from_ir_model_returns_a_copy() -> None:
    original = ir.from_proto(builders.conv_relu_model())
    before = _ir_bytes(original)
    loaded = load_model(original)
    assert loaded is not original
    assert loaded.graph is not original.graph
    relu = list(loaded.graph)[1]
    conv_out = relu.inputs[0]
    assert conv_out is not None
    loaded.graph.outputs[0] = conv_out  # rewire the copy ...
    loaded.graph.remove(relu, safe=True)
    assert _op_types(loaded) == ["Conv"]
    assert _ir_bytes(original) == before  # ... the original is untouched
    assert _op_types(original) == ["Conv", "Relu"]


@pytest.mark.parametrize("value", [42, b"\x08\x07", None, np.zeros(3)])
def test_load_rejects_other_types(value: object) -> None:
    with pytest.raises(OnnxqError, match=r"must be a path, an onnx\.ModelProto or an onnx_ir\.Model"):
        load_model(value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(OnnxqError, match="directory"):
        load_model(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.touch()
    with pytest.raises(OnnxqError, match="empty"):
        load_model(empty)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(OnnxqError, match=r"junk\.onnx"):
        load_model(junk)


def test_load_refuses_external_data_outside_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    proto = builders.conv_relu_model()
    builders.externalize(proto, "w", folder, "../outside.bin")
    path = builders.save(proto, folder / "m.onnx")
    with pytest.raises(OnnxqError, match="outside the model's folder"):
        load_model(path)


def test_load_refuses_absolute_external_location(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    proto = builders.conv_relu_model()
    builders.externalize(proto, "b", folder, str(tmp_path / "abs.bin"))
    path = builders.save(proto, folder / "m.onnx")
    with pytest.raises(OnnxqError, match="outside"):
        load_model(path)


def test_load_keeps_external_data_lazy(tmp_path: Path) -> None:
    proto = builders.conv_relu_model()
    builders.externalize(proto, "w", tmp_path, "weights/w.bin")
    model = load_model(builders.save(proto, tmp_path / "m.onnx"))
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)


@pytest.mark.parametrize("as_ir", [False, True], ids=["ModelProto", "ir.Model"])
def test_quantize_does_not_mutate_in_memory_input(as_ir: bool) -> None:
    proto = builders.conv_relu_model()
    proto_before = _proto_bytes(proto)
    given: onnx.ModelProto | ir.Model = ir.from_proto(proto) if as_ir else proto
    ir_before = _ir_bytes(given) if isinstance(given, ir.Model) else b""
    feeds = [{"x": sample} for sample in builders.conv_calibration(samples=4)]

    result = onnxq.quantize(given, feeds)

    assert "QuantizeLinear" in _op_types(result.model)
    if isinstance(given, ir.Model):
        assert _ir_bytes(given) == ir_before
        assert _op_types(given) == ["Conv", "Relu"]
        assert result.model is not given
    else:
        assert _proto_bytes(given) == proto_before


# ---------------------------------------------------------------------------------------------------
# Versions

_OPSET11_BODY = """
old (float[N,16] x) => (float[N,8] y) {
    m = MatMul (x, w)
    u = Unsqueeze <axes = [1]> (m)
    s = ReduceSum <axes = [1], keepdims = 0> (u)
    y = Softmax <axis = 1> (s)
}
"""


def _opset11_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    return builders.parse(
        _OPSET11_BODY, {"w": rng.normal(0, 0.3, (16, 8)).astype(np.float32)}, opset=11, ir_version=6
    )


def test_opset_11_is_upgraded_to_17_and_computes_the_same() -> None:
    proto = _opset11_model()
    feed = {"x": np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)}
    expected = _run(proto.SerializeToString(), feed)

    model = ir.from_proto(proto)
    notes = normalize_versions(model)

    assert default_opset(model) == 17
    assert any("opset 11 converted to 17" in note for note in notes)
    assert model.ir_version >= 7  # opset 13 needs IR 7
    unsqueeze = next(n for n in model.graph if n.op_type == "Unsqueeze")
    assert len(unsqueeze.inputs) == 2  # axes moved from attribute to input, as opset 13 wants
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    actual = _run(serialize_model(model), feed)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6, atol=1e-7)


def test_opset_11_model_keeps_per_channel_weights_after_quantize() -> None:
    proto = builders.conv_relu_model(opset=11)
    result = onnxq.quantize(proto, [{"x": s} for s in builders.conv_calibration(samples=4)])
    assert any("opset 11 converted to 17" in note for note in result.report.version_notes)
    assert default_opset(result.model) == 17
    weight_dq = [
        n
        for n in result.model.graph
        if n.op_type == "DequantizeLinear" and n.inputs[0] is not None and n.inputs[0].const_value is not None
    ]
    assert weight_dq, "the Conv weight should be stored quantized"
    scale_shapes = []
    for node in weight_dq:
        scale = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        assert scale is not None
        scale_shapes.append(scale.shape.numpy())
    assert (4,) in scale_shapes  # one scale per output channel


def test_onnx_default_versions_are_brought_into_ort_range() -> None:
    graph = builders.matmul_model().graph
    proto = onnx.helper.make_model(graph)  # what onnx writes by default (IR 14 / opset 28 for onnx 1.23)
    model = ir.from_proto(proto)
    normalize_versions(model)

    max_ir, max_opset = ort_max_versions()
    assert model.ir_version <= max_ir
    opset = default_opset(model)
    assert opset <= max_opset
    # Not only the model's ops: every op quantization adds must have a kernel at the chosen opset.
    table = kernel_table()
    for op in (*EMITTED_OPS, *(n.op_type for n in model.graph)):
        assert table.runs("", op, opset), table.problem("", op, opset)
    x = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    [y] = _run(serialize_model(model), {"x": x})
    np.testing.assert_allclose(y, x @ weights["w"] + weights["b"], rtol=1e-5, atol=1e-5)


def test_already_quantized_model_at_an_opset_without_qdq_kernels_is_converted() -> None:
    """A Q/DQ model at onnx's newest opset lands on an opset where its Q/DQ nodes have kernels."""
    proto = builders.parse(
        """
        g (float[2,4] x) => (float[2,4] y) {
            s = Constant <value = float {0.1}> ()
            z = Constant <value = uint8 {128}> ()
            q = QuantizeLinear (x, s, z)
            y = DequantizeLinear (q, s, z)
        }
        """,
        opset=onnx.defs.onnx_opset_version(),
        ir_version=10,
    )
    model = ir.from_proto(proto)
    normalize_versions(model)
    assert kernel_table().runs("", "QuantizeLinear", default_opset(model))
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    [y] = _run(serialize_model(model), {"x": x})
    np.testing.assert_allclose(
        y, np.clip(np.round(x / 0.1) + 128, 0, 255).astype(np.float32) * 0.1 - 12.8, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["static", "qoperator", "dynamic"])
def test_quantize_accepts_onnx_default_versions(tmp_path: Path, mode: str) -> None:
    proto = onnx.helper.make_model(builders.conv_relu_model().graph)
    path = builders.save(proto, tmp_path / "new.onnx")
    config = onnxq.QuantConfig(
        mode="dynamic" if mode == "dynamic" else "static",
        format="qoperator" if mode == "qoperator" else "qdq",
        dynamic=onnxq.DynamicConfig(conv=True),
    )
    calibration = [{"x": s} for s in builders.conv_calibration(samples=4)]
    result = onnxq.quantize(path, calibration if mode != "dynamic" else None, config)
    saved = result.save(tmp_path / "q.onnx")
    max_ir, max_opset = ort_max_versions()
    written = onnx.load(saved)
    assert written.ir_version <= max_ir
    assert all(o.version <= max_opset for o in written.opset_import if o.domain in ("", "ai.onnx"))
    report = result.validate(calibration)  # onnxruntime loads and runs both, at ORT_ENABLE_ALL
    assert report.accuracy[0].sqnr_db > 25.0


def test_ort_max_versions() -> None:
    max_ir, max_opset = ort_max_versions()
    assert isinstance(max_ir, int) and isinstance(max_opset, int)
    assert max_ir >= 8 and max_opset >= 17
    assert ort_max_versions() == (max_ir, max_opset)  # cached
    # The limits are real: a model at exactly those versions loads.
    proto = builders.parse(
        "g (float[2] x) => (float[2] y) { y = Relu (x) }", opset=max_opset, ir_version=max_ir
    )
    _session(proto.SerializeToString())


def test_normalize_leaves_supported_versions_alone() -> None:
    model = ir.from_proto(builders.conv_relu_model())
    before = _ir_bytes(model)
    assert normalize_versions(model) == []
    assert _ir_bytes(model) == before


# ---------------------------------------------------------------------------------------------------
# save_model


def test_save_writes_a_loadable_model_and_nothing_else(out_dir: Path) -> None:
    model = ir.from_proto(builders.conv_relu_model())
    target = save_model(model, out_dir / "m.onnx")
    assert target == out_dir / "m.onnx"
    assert sorted(os.listdir(out_dir)) == ["m.onnx"]
    x = builders.conv_calibration()[0]
    [expected] = _run(builders.conv_relu_model().SerializeToString(), {"x": x})
    [actual] = _run(target, {"x": x})
    np.testing.assert_array_equal(actual, expected)


def test_save_is_deterministic(out_dir: Path, model_path: Path) -> None:
    save_model(load_model(model_path), out_dir / "a.onnx")
    save_model(load_model(model_path), out_dir / "b.onnx")
    assert (out_dir / "a.onnx").read_bytes() == (out_dir / "b.onnx").read_bytes()
    assert serialize_model(load_model(model_path)) == (out_dir / "a.onnx").read_bytes()


def test_save_refuses_the_input_path(model_path: Path) -> None:
    before = model_path.read_bytes()
    model = load_model(model_path)
    with pytest.raises(OnnxqError, match="input model"):
        save_model(model, model_path, input_path=model_path)
    with pytest.raises(OnnxqError, match="input model"):
        save_model(model, model_path.parent / "." / model_path.name, input_path=model_path)
    assert model_path.read_bytes() == before
    assert sorted(os.listdir(model_path.parent)) == [model_path.name]


def test_save_refuses_missing_folder_and_directory(out_dir: Path) -> None:
    model = ir.from_proto(builders.conv_relu_model())
    with pytest.raises(OnnxqError, match="does not exist"):
        save_model(model, out_dir / "missing" / "m.onnx")
    (out_dir / "d.onnx").mkdir()
    with pytest.raises(OnnxqError, match="directory"):
        save_model(model, out_dir / "d.onnx")
    assert sorted(os.listdir(out_dir)) == ["d.onnx"]


def test_failed_write_is_atomic(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = out_dir / "m.onnx"
    target.write_bytes(b"old contents")

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", refuse)
    with pytest.raises(OnnxqError, match=r"cannot write .*No space left on device"):
        save_model(ir.from_proto(builders.conv_relu_model()), target)
    assert target.read_bytes() == b"old contents"  # never half-written
    assert sorted(os.listdir(out_dir)) == ["m.onnx"]  # no temporary files left


def test_large_model_uses_external_data(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 64)
    proto = builders.conv_relu_model()
    model = ir.from_proto(proto)
    assert model_size_bytes(model) == (4 * 3 * 3 * 3 + 4) * 4

    target = save_model(model, out_dir / "big.onnx")

    assert sorted(os.listdir(out_dir)) == ["big.onnx", "big.onnx.data"]
    assert (out_dir / "big.onnx").stat().st_size < model_size_bytes(model)
    assert (out_dir / "big.onnx.data").stat().st_size >= 4 * 3 * 3 * 3 * 4
    assert "big.onnx.data" in _external_locations(onnx.load(target, load_external_data=False))
    reloaded = load_model(target)
    assert isinstance(reloaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    x = builders.conv_calibration()[0]
    [expected] = _run(proto.SerializeToString(), {"x": x})
    [actual] = _run(target, {"x": x})
    np.testing.assert_array_equal(actual, expected)


def test_external_data_model_quantizes_from_another_folder(
    tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model with external data, quantized while the working directory is elsewhere: the float-only
    bias must reach the output (inline), not a dangling reference relative to the output folder."""
    folder = tmp_path / "src"
    proto = builders.matmul_model()
    builders.externalize(proto, "w", folder, "weights.bin")
    builders.externalize(proto, "b", folder, "bias.bin")  # stays float (Add is not quantized)
    path = builders.save(proto, folder / "mm.onnx")
    monkeypatch.chdir(out_dir)
    feeds = [{"x": r} for r in np.random.default_rng(6).standard_normal((4, 1, 16)).astype(np.float32)]

    result = onnxq.quantize(path, feeds)
    saved = result.save(out_dir / "q.onnx")

    assert sorted(os.listdir(out_dir)) == ["q.onnx"]
    assert _external_locations(onnx.load(saved, load_external_data=False)) == []
    assert result.validate().accuracy[0].sqnr_db > 25.0
    # The in-memory result still refers to the user's files lazily.
    assert isinstance(result.model.graph.initializers["b"].const_value, ir.ExternalTensor)


def test_external_input_to_external_output(
    tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "src"
    proto = builders.conv_relu_model()
    builders.externalize(proto, "w", folder, "w.bin")
    path = builders.save(proto, folder / "conv.onnx")
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 16)
    target = save_model(load_model(path), out_dir / "copy.onnx")
    assert sorted(os.listdir(out_dir)) == ["copy.onnx", "copy.onnx.data"]
    x = builders.conv_calibration()[0]
    np.testing.assert_array_equal(_run(target, {"x": x})[0], _run(path, {"x": x})[0])


def test_failed_conversion_keeps_the_opset_with_a_short_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model the converter cannot move keeps its opset; what needs Q/DQ there fails later, clearly."""
    assertion = (
        "/project/onnx/version_converter/convert.h:1054: operator(): Assertion `std::find(a, b, t) == b` "
        "failed: Mod with floating-point inputs and fmod=0 cannot be down-converted"
    )

    def refuse(proto: object, target: int) -> object:
        raise RuntimeError(assertion)

    monkeypatch.setattr("onnx.version_converter.convert_version", refuse)
    monkeypatch.setattr(versions, "ort_max_versions", lambda: (10, 16))
    model = ir.from_proto(builders.conv_relu_model(opset=17))
    notes = normalize_versions(model)
    assert default_opset(model) == 17
    assert notes[0] == (
        "cannot convert the model from opset 17 to 16: Mod with floating-point inputs and fmod=0 cannot "
        "be down-converted; kept opset 17 (not converted)"
    )
