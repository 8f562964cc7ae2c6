"""normalize_versions and check_runtime_ops: the opset and IR version the installed ONNX Runtime runs.

Expectations come from the installed onnxruntime itself (its kernel table and the limits it loads), so
the tests hold for the newest onnxruntime and for the oldest one pyproject.toml admits.
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx.defs
import onnx.helper
import onnx.parser
import onnx.version_converter
import onnx_ir as ir
import pytest

from onnxq.errors import OnnxqError
from onnxq.graph import default_opset
from onnxq.load import versions
from onnxq.load.versions import (
    EMITTED_OPS,
    MIN_QDQ_OPSET,
    MIN_QDQ_PER_AXIS_OPSET,
    PREFERRED_OPSET,
    check_runtime_ops,
    normalize_versions,
)
from onnxq.runtime.kernels import kernel_table, onnxruntime_version, ort_max_versions

MAX_IR, MAX_OPSET = ort_max_versions()


def conv_ir(opset: int, ir_version: int = builders.IR_VERSION) -> ir.Model:
    """:func:`builders.conv_relu_model` at ``opset`` as an onnx-ir model with ``ir_version``."""
    model = ir.from_proto(builders.conv_relu_model(opset=opset))
    model.ir_version = ir_version
    return model


def runs_qdq(model: ir.Model) -> bool:
    """The table's answer: a Q/DQ pair has kernels at the model's default-domain opset."""
    table = kernel_table()
    opset = default_opset(model)
    return table.runs("", "QuantizeLinear", opset) and table.runs("", "DequantizeLinear", opset)


def outputs(model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return builders.run_disabled(model, feed)


CONV_FEED = {"x": builders.conv_calibration(1)[0]}


# ---------------------------------------------------------------------------------------------------
# Opset


def test_onnx_newest_opset_ends_where_quantize_linear_has_a_kernel() -> None:
    newest = onnx.defs.onnx_opset_version()
    model = conv_ir(newest, onnx.IR_VERSION)
    notes = normalize_versions(model)
    opset = default_opset(model)
    assert MIN_QDQ_PER_AXIS_OPSET <= opset <= min(newest, MAX_OPSET)
    assert runs_qdq(model)
    assert all(kernel_table().runs("", op, opset) for op in EMITTED_OPS)
    # the highest such opset: one above would lack a kernel for some op the model has or gets
    if opset < min(newest, MAX_OPSET):
        above = opset + 1
        assert not all(kernel_table().runs("", op, above) for op in {*EMITTED_OPS, "Conv", "Relu"})
    if opset != newest:
        assert f"opset {newest} converted to {opset}" in notes
    assert model.ir_version <= MAX_IR
    # the converted model computes what the model computes at opset 17
    reference = outputs(builders.conv_relu_model(), CONV_FEED)[0]
    np.testing.assert_allclose(outputs(model, CONV_FEED)[0], reference, rtol=1e-6, atol=1e-6)


def test_qdq_added_at_the_normalized_opset_loads_in_onnxruntime() -> None:
    """What the normalization is for: Q/DQ that quantization adds run at the resulting opset."""
    model = conv_ir(onnx.defs.onnx_opset_version(), onnx.IR_VERSION)
    normalize_versions(model)
    opset, ir_version = default_opset(model), model.ir_version
    pair = builders.parse(
        """
        pair (float[N,3,8,8] x) => (float[N,3,8,8] y) {
            s = Constant <value = float {0.05}> ()
            z = Constant <value = uint8 {128}> ()
            q = QuantizeLinear (x, s, z)
            y = DequantizeLinear (q, s, z)
        }
        """,
        opset=opset,
        ir_version=ir_version,
    )
    (y,) = outputs(pair, CONV_FEED)
    assert np.abs(y - np.clip(CONV_FEED["x"], -6.4, 6.35)).max() <= 0.025 + 1e-6


@pytest.mark.parametrize("opset", [7, 9, 10, 11, 12, 13, 16])
def test_old_opsets_are_upgraded_to_the_preferred_opset(opset: int) -> None:
    """Per-channel Q/DQ need 13; the single ops canonicalization writes need up to 17."""
    model = conv_ir(opset)
    notes = normalize_versions(model)
    assert default_opset(model) == PREFERRED_OPSET
    assert notes == [f"opset {opset} converted to {PREFERRED_OPSET}"]
    np.testing.assert_allclose(
        outputs(model, CONV_FEED)[0], outputs(builders.conv_relu_model(), CONV_FEED)[0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("fails_without_data", [False, True], ids=["held-back", "retried-with-data"])
def test_large_weights_stay_out_of_the_version_converter(
    monkeypatch: pytest.MonkeyPatch, fails_without_data: bool
) -> None:
    """The converter copies the whole model; the large weights go in as placeholders and come back by
    name (the same tensor objects). Should the conversion fail without them, it is redone with them."""
    monkeypatch.setattr(versions, "_CONVERTER_HOLDS_BACK", 256)  # the test model's weight is 432 bytes
    model = conv_ir(9)
    weights = {n: v.const_value for n, v in model.graph.initializers.items() if v.const_value.nbytes >= 256}
    assert list(weights) == ["w"]
    seen: list[bool] = []
    real = onnx.version_converter.convert_version

    def convert(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
        held = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        seen.append(held)
        if held and fails_without_data:
            raise RuntimeError("an adapter read a weight")
        return real(proto, target)

    monkeypatch.setattr(onnx.version_converter, "convert_version", convert)
    normalize_versions(model)
    assert seen == ([True, False] if fails_without_data else [True])
    assert default_opset(model) == PREFERRED_OPSET
    if not fails_without_data:
        assert all(model.graph.initializers[n].const_value is t for n, t in weights.items())
    np.testing.assert_allclose(
        outputs(model, CONV_FEED)[0], outputs(builders.conv_relu_model(), CONV_FEED)[0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("opset", [17, 18])
def test_a_supported_opset_is_kept(opset: int) -> None:
    model = conv_ir(opset)
    before = builders.serialize(model)
    assert normalize_versions(model) == []
    assert default_opset(model) == opset
    assert builders.serialize(model) == before  # nothing at all changed


def test_the_ai_onnx_spelling_of_the_default_domain() -> None:
    proto = builders.conv_relu_model(opset=17)
    proto.opset_import[0].domain = "ai.onnx"
    model = ir.from_proto(proto)
    assert normalize_versions(model) == []
    assert "" not in model.opset_imports and model.opset_imports["ai.onnx"] == 17


# ---------------------------------------------------------------------------------------------------
# IR version


def test_ir_version_is_clamped_to_what_onnxruntime_loads() -> None:
    model = conv_ir(17, MAX_IR + 1)
    notes = normalize_versions(model)
    assert model.ir_version == MAX_IR
    assert notes == [f"IR version {MAX_IR + 1} set to {MAX_IR}"]
    outputs(model, CONV_FEED)  # loads


def test_ir_version_is_raised_to_what_the_opset_needs() -> None:
    model = conv_ir(21, 8)
    notes = normalize_versions(model)
    if default_opset(model) != 21:
        pytest.skip(f"onnxruntime {onnxruntime_version()} runs no Q/DQ at opset 21")
    assert model.ir_version == min(10, MAX_IR)
    assert notes == [f"IR version 8 set to {min(10, MAX_IR)}"]


def test_raising_ir_3_keeps_initializers_constants() -> None:
    """IR 3 lists initializers as graph inputs too; raised to IR >= 4 they would become overridable
    inputs (neither folded nor prepacked by ONNX Runtime), so they leave the input list."""
    proto = builders.conv_relu_model(opset=9)
    proto.ir_version = 3
    proto.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in proto.graph.initializer
    )
    model = ir.from_proto(proto)
    assert [v.name for v in model.graph.inputs] == ["x", "w", "b"]
    normalize_versions(model)
    assert model.ir_version >= 4
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert set(model.graph.initializers) >= {"w", "b"}
    np.testing.assert_allclose(
        outputs(model, CONV_FEED)[0], outputs(builders.conv_relu_model(), CONV_FEED)[0], rtol=1e-6, atol=1e-6
    )


def test_ir_3_with_an_initializer_missing_from_the_inputs_converts() -> None:
    """ONNX Runtime runs an IR 3 model whose initializer is not listed as an input (its own
    datasets/mul_1.onnx); onnx's version converter read it as an undefined input."""
    proto = builders.conv_relu_model(opset=9)
    proto.ir_version = 3  # and the initializers stay out of the inputs
    model = ir.from_proto(proto)
    notes = normalize_versions(model)
    assert default_opset(model) > 9 and model.ir_version >= 4
    assert any(note.startswith("opset 9 converted to") for note in notes)
    assert any(note.startswith("IR version 3 set to") for note in notes)
    np.testing.assert_allclose(
        outputs(model, CONV_FEED)[0], outputs(builders.conv_relu_model(), CONV_FEED)[0], rtol=1e-6, atol=1e-6
    )


def test_a_higher_ir_version_is_not_lowered() -> None:
    model = conv_ir(13, 10)
    normalize_versions(model)
    assert model.ir_version == 10  # opset 13 needs only 7, but 10 is kept


def _first_ir_for_opset(opset: int) -> int:
    return min(ir_version for _, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset)


@pytest.mark.parametrize("opset", [24, 25])
def test_ir_version_follows_onnx_release_table_for_recent_opsets(opset: int) -> None:
    table = kernel_table()
    if opset > min(MAX_OPSET, onnx.defs.onnx_opset_version()):
        pytest.skip(f"onnx or onnxruntime {onnxruntime_version()} stops below opset {opset}")
    if not all(table.runs("", op, opset) for op in {*EMITTED_OPS, "Conv", "Relu"}):
        pytest.skip(f"onnxruntime {onnxruntime_version()} runs no Q/DQ at opset {opset}")
    model = conv_ir(opset, 10)
    normalize_versions(model)
    assert default_opset(model) == opset
    assert model.ir_version == min(_first_ir_for_opset(opset), MAX_IR)


@pytest.mark.parametrize("opset", [13, 17, 19, 21, 23])
def test_ir_version_follows_onnx_release_table(opset: int) -> None:
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"onnx {onnx.__version__} has no opset {opset}")
    model = conv_ir(opset, 3)
    normalize_versions(model)
    final = default_opset(model)  # below the preferred opset the model is also upgraded
    if final < opset:
        pytest.skip(f"onnxruntime {onnxruntime_version()} does not run Q/DQ at opset {opset}")
    assert model.ir_version == min(_first_ir_for_opset(final), MAX_IR)


# ---------------------------------------------------------------------------------------------------
# Models without a default-domain import


def test_onnx_ops_without_a_default_domain_import_are_refused() -> None:
    model = ir.from_proto(builders.conv_relu_model())
    del model.opset_imports[""]
    with pytest.raises(OnnxqError) as info:
        normalize_versions(model)
    assert str(info.value) == "the model has ONNX operators but no opset import for the default domain"


def test_onnx_ops_in_a_subgraph_need_the_import_too() -> None:
    model = ir.from_proto(builders.if_conv_model())
    del model.opset_imports[""]
    with pytest.raises(OnnxqError, match="no opset import for the default domain"):
        normalize_versions(model)


LOCAL_FUNCTION = """
<ir_version: 10, opset_import: ["custom" : 1]>
g (float[2,3] x) => (float[2,3] y) {
    y = custom.Twice (x)
}
<domain: "custom", opset_import: ["" : 17]>
Twice (a) => (b) {
    b = Add (a, a)
}
"""


def test_a_model_with_only_a_local_function_call_is_accepted() -> None:
    proto = onnx.parser.parse_model(LOCAL_FUNCTION)
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    check_runtime_ops(model, "fn.onnx")
    notes = normalize_versions(model)
    assert notes == [f"default-domain opset {PREFERRED_OPSET} imported"]
    assert model.opset_imports == {"custom": 1, "": PREFERRED_OPSET}
    assert len(model.functions) == 1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = outputs(model, {"x": x})
    np.testing.assert_array_equal(y, 2 * x)


# ---------------------------------------------------------------------------------------------------
# check_runtime_ops


def training_model() -> ir.Model:
    body = """
    step (float r, int64 t, float[4] x, float[4] g, float[4] h) => (float[4] x2, float[4] h2) {
        x2, h2 = ai.onnx.preview.training.Adagrad <decay_factor = 0.1> (r, t, x, g, h)
    }
    """
    text = f'<ir_version: 10, opset_import: ["" : 17, "ai.onnx.preview.training" : 1]>\n{body}'
    proto = onnx.parser.parse_model(text)
    proto.graph.node[0].name = "optimizer_step"
    return ir.from_proto(proto)


def test_training_ops_are_refused_with_the_node_named() -> None:
    with pytest.raises(OnnxqError) as info:
        check_runtime_ops(training_model(), "train.onnx")
    assert str(info.value) == (
        "train.onnx: node optimizer_step uses Adagrad of domain 'ai.onnx.preview.training', which "
        f"onnxruntime {onnxruntime_version()} cannot run (training and custom ops are not supported)"
    )


def test_an_op_that_is_not_onnx_is_called_what_it_is() -> None:
    """tf2onnx leaves TensorFlow ops it cannot convert (Erfc, PartitionedCall) in the default domain."""
    proto = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 17]>\nm (float[4] x) => (float[4] y) { y = Erfc (x) }'
    )
    proto.graph.node[0].name = "model/dense/Gelu/Erfc"
    with pytest.raises(OnnxqError) as info:
        check_runtime_ops(ir.from_proto(proto), "tf.onnx")
    assert str(info.value).startswith(
        "tf.onnx: node model/dense/Gelu/Erfc uses Erfc, which is not an ONNX operator (an op the exporter "
        "could not convert and left in"
    )


def test_an_unnamed_node_is_labelled_by_op_and_output() -> None:
    model = training_model()
    next(iter(model.graph)).name = ""
    with pytest.raises(OnnxqError, match=r"node <Adagrad -> x2> uses Adagrad"):
        check_runtime_ops(model, "m")


def test_custom_ops_are_refused() -> None:
    proto = builders.parse_model_text(
        """
        <ir_version: 10, opset_import: ["" : 17, "my.ops" : 1]>
        g (float[N] x) => (float[N] y) {
            r = Relu (x)
            y = my.ops.Swish (r)
        }
        """
    )
    with pytest.raises(OnnxqError, match=r"^m: node <Swish -> y> uses Swish of domain 'my.ops'"):
        check_runtime_ops(ir.from_proto(proto), "m")


def test_unknown_ops_inside_subgraphs_are_found() -> None:
    proto = builders.parse_model_text(
        """
        <ir_version: 10, opset_import: ["" : 17, "my.ops" : 1]>
        g (float[N] x, bool c) => (float[N] y) {
            y = If (c) <
                then_branch = t () => (float[N] a) { a = my.ops.Deep (x) },
                else_branch = e () => (float[N] b) { b = Relu (x) }
            >
        }
        """
    )
    with pytest.raises(OnnxqError, match=r"Deep of domain 'my\.ops'"):
        check_runtime_ops(ir.from_proto(proto), "m")


def test_known_ops_pass() -> None:
    check_runtime_ops(ir.from_proto(builders.conv_relu_model()), "m")
    check_runtime_ops(ir.from_proto(builders.if_conv_model()), "m")
    contrib = builders.parse_model_text(
        """
        <ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[N,4] x) => (float[N,4] y) {
            y = com.microsoft.FastGelu (x)
        }
        """
    )
    check_runtime_ops(ir.from_proto(contrib), "m")  # onnxruntime's own contrib ops are known


def test_a_local_function_shadows_an_unknown_op_only_in_its_own_domain() -> None:
    proto = onnx.parser.parse_model(LOCAL_FUNCTION)
    model = ir.from_proto(proto)
    check_runtime_ops(model, "m")
    next(iter(model.graph)).domain = "other"  # now it calls other.Twice, which nobody defines
    with pytest.raises(OnnxqError, match="Twice of domain 'other'"):
        check_runtime_ops(model, "m")


# ---------------------------------------------------------------------------------------------------
# When the version converter fails


def _failing_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError(
            "/project/onnx/version_converter/adapters/no_previous_version.h:22: adapt: "
            "Assertion `false` failed: No Previous Version of Foo exists\nsecond line"
        )

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)


def test_a_model_above_13_that_cannot_be_converted_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_converter(monkeypatch)
    newest = onnx.defs.onnx_opset_version()
    model = conv_ir(newest, min(onnx.IR_VERSION, MAX_IR))
    target = kernel_table().highest_opset({*EMITTED_OPS, "Conv", "Relu"}, min(newest, MAX_OPSET), 13)
    if target == newest:
        pytest.skip(f"onnxruntime {onnxruntime_version()} runs everything at opset {newest}")
    notes = normalize_versions(model)
    assert default_opset(model) == newest
    assert notes[0] == (
        f"cannot convert the model from opset {newest} to {target}: No Previous Version of Foo exists; "
        f"kept opset {newest} (not converted)"
    )


def test_a_model_below_13_that_cannot_be_upgraded_keeps_per_tensor_qdq(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _failing_converter(monkeypatch)
    model = conv_ir(11)
    notes = normalize_versions(model)
    assert default_opset(model) == 11
    assert notes == [
        (
            "cannot convert the model from opset 11 to 13: No Previous Version of Foo exists; "
            "kept opset 11 (weights per-tensor)"
        )
    ]


@pytest.mark.parametrize("opset", [7, 9])
def test_a_model_without_qdq_that_cannot_be_upgraded_is_refused(
    monkeypatch: pytest.MonkeyPatch, opset: int
) -> None:
    assert opset < MIN_QDQ_OPSET
    _failing_converter(monkeypatch)
    with pytest.raises(OnnxqError) as info:
        normalize_versions(conv_ir(opset))
    assert str(info.value) == (
        f"cannot convert the model from opset {opset} to 13: No Previous Version of Foo exists"
    )
