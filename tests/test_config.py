"""Tests for onnxq.config: typed, frozen configuration with global < op type < node precedence.

Every validation in ``__post_init__`` (with the message naming the bad value), the precedence of
:meth:`QuantConfig.resolve` field by field, the ``exclude_*`` shorthands against overrides, ``replace``,
and :meth:`QuantConfig.check_names` both on its own and through :func:`onnxq.quantize`, where node names
of the input model and of the preprocessed one (unnamed nodes named after their op type) are accepted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import builders
import numpy as np
import onnx
import pytest

import onnxq
from onnxq.config import (
    CALIBRATION_METHODS,
    ActivationScheme,
    CalibrationConfig,
    DynamicConfig,
    NodeOverride,
    QuantConfig,
    ValidationConfig,
    WeightScheme,
)
from onnxq.errors import OnnxqError
from onnxq.runtime.kernels import kernel_table

INT8_SYMMETRIC = ActivationScheme(dtype="int8", symmetric=True)
INT8_AFFINE = ActivationScheme(dtype="int8")
PER_TENSOR = WeightScheme(per_channel=False)
UINT8_WEIGHTS = WeightScheme(dtype="uint8", symmetric=False)

# ---------------------------------------------------------------------------------------------------
# Defaults and validation


def test_defaults() -> None:
    config = QuantConfig()
    assert config.activations == ActivationScheme(dtype="uint8", symmetric=False)
    assert config.weights == WeightScheme(dtype="int8", symmetric=True, per_channel=True)
    assert config.calibration == CalibrationConfig(
        method="minmax", percentile=99.999, num_bins=4096, averaging_constant=0.01, batch_size=1
    )
    assert (config.mode, config.format) == ("static", "qdq")
    assert config.dynamic == DynamicConfig(conv=False, embeddings=True)
    assert config.exclude_op_types == () and config.exclude_nodes == ()
    assert dict(config.op_type_overrides) == {} and dict(config.node_overrides) == {}


def test_default_mappings_are_not_shared_between_instances() -> None:
    assert QuantConfig().op_type_overrides is not QuantConfig().op_type_overrides
    assert QuantConfig().node_overrides is not QuantConfig().node_overrides


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ActivationScheme(dtype="int4"), "activation dtype must be 'uint8' or 'int8', got 'int4'"),  # type: ignore[arg-type]
        (lambda: ActivationScheme(dtype="float32"), "got 'float32'"),  # type: ignore[arg-type]
        (
            lambda: ActivationScheme(dtype="uint8", symmetric=True),
            "symmetric activations need dtype 'int8' (uint8 is always affine)",
        ),
        (lambda: WeightScheme(dtype="int16"), "weight dtype must be 'uint8' or 'int8', got 'int16'"),  # type: ignore[arg-type]
        (lambda: WeightScheme(dtype="uint8"), "symmetric weights need dtype 'int8'"),
        (
            lambda: CalibrationConfig(method="kl"),  # type: ignore[arg-type]
            "calibration method must be one of minmax, moving_average, percentile, entropy, mse",
        ),
        (lambda: CalibrationConfig(percentile=50.0), "percentile must be in (50, 100], got 50.0"),
        (lambda: CalibrationConfig(percentile=100.5), "percentile must be in (50, 100], got 100.5"),
        (lambda: CalibrationConfig(percentile=-1.0), "got -1.0"),
        (lambda: CalibrationConfig(percentile=float("nan")), "got nan"),
        (lambda: CalibrationConfig(num_bins=32), "num_bins must be a power of two >= 64, got 32"),
        (lambda: CalibrationConfig(num_bins=100), "num_bins must be a power of two >= 64, got 100"),
        (lambda: CalibrationConfig(num_bins=0), "got 0"),
        (lambda: CalibrationConfig(num_bins=-64), "got -64"),
        (lambda: CalibrationConfig(averaging_constant=0.0), "averaging_constant must be in (0, 1], got 0.0"),
        (lambda: CalibrationConfig(averaging_constant=1.5), "got 1.5"),
        (lambda: CalibrationConfig(batch_size=0), "batch_size must be >= 1, got 0"),
        (lambda: CalibrationConfig(batch_size=-2), "got -2"),
        (lambda: QuantConfig(mode="hybrid"), "mode must be 'static' or 'dynamic', got 'hybrid'"),  # type: ignore[arg-type]
        (lambda: QuantConfig(format="QDQ"), "format must be 'qdq' or 'qoperator', got 'QDQ'"),  # type: ignore[arg-type]
    ],
)
def test_invalid_settings_are_rejected_with_the_value(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ActivationScheme(dtype="int8", symmetric=True),
        lambda: ActivationScheme(dtype="int8", symmetric=False),
        lambda: WeightScheme(dtype="uint8", symmetric=False, per_channel=False),
        lambda: WeightScheme(dtype="int8", symmetric=False),
        lambda: CalibrationConfig(percentile=100.0),
        lambda: CalibrationConfig(percentile=50.001),
        lambda: CalibrationConfig(num_bins=64),
        lambda: CalibrationConfig(num_bins=2**16),
        lambda: CalibrationConfig(averaging_constant=1.0),
        lambda: CalibrationConfig(averaging_constant=1e-6),
        lambda: CalibrationConfig(batch_size=1),
        lambda: QuantConfig(mode="dynamic", format="qoperator"),
    ],
)
def test_boundary_settings_are_accepted(make: Any) -> None:
    make()


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_every_listed_method_is_accepted(method: str) -> None:
    assert CalibrationConfig(method=method).method == method  # type: ignore[arg-type]


def test_validation_happens_in_replace_too() -> None:
    with pytest.raises(ValueError, match="format must be"):
        QuantConfig().replace(format="integer")
    with pytest.raises(ValueError, match="num_bins"):
        dataclasses.replace(CalibrationConfig(), num_bins=65)


# ---------------------------------------------------------------------------------------------------
# Frozen


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (ActivationScheme(), "dtype"),
        (WeightScheme(), "per_channel"),
        (CalibrationConfig(), "method"),
        (NodeOverride(), "quantize"),
        (ValidationConfig(), "threads"),
        (DynamicConfig(), "conv"),
        (QuantConfig(), "mode"),
        (QuantConfig(), "exclude_nodes"),
    ],
)
def test_configs_are_frozen(obj: object, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, getattr(obj, field))


def test_schemes_are_hashable_and_compare_by_value() -> None:
    assert ActivationScheme("int8", True) == INT8_SYMMETRIC
    assert hash(ActivationScheme("int8", True)) == hash(INT8_SYMMETRIC)
    assert len({WeightScheme(), WeightScheme(), PER_TENSOR}) == 2
    assert NodeOverride(quantize=False) == NodeOverride(quantize=False)
    assert NodeOverride(quantize=False) != NodeOverride(quantize=True)


def test_overrides_given_as_a_dict_cannot_change_after_construction() -> None:
    overrides = {"Conv": NodeOverride(quantize=True)}
    config = QuantConfig(op_type_overrides=overrides)
    overrides["Conv"] = NodeOverride(quantize=False)
    assert config.resolve("conv1", "Conv").quantize is True


# ---------------------------------------------------------------------------------------------------
# replace


def test_replace_changes_only_the_named_fields() -> None:
    base = QuantConfig(exclude_nodes=("a",), calibration=CalibrationConfig(method="entropy"))
    changed = base.replace(exclude_nodes=("a", "b"), format="qoperator")
    assert changed.exclude_nodes == ("a", "b")
    assert changed.format == "qoperator"
    assert changed.calibration == base.calibration
    assert changed.activations == base.activations and changed.weights == base.weights
    # the original is untouched
    assert base.exclude_nodes == ("a",) and base.format == "qdq"
    assert isinstance(changed, QuantConfig) and changed is not base


def test_replace_with_nothing_gives_an_equal_copy() -> None:
    base = QuantConfig(mode="dynamic", dynamic=DynamicConfig(conv=True))
    assert base.replace() == base


def test_replace_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError):
        QuantConfig().replace(no_such_field=1)


# ---------------------------------------------------------------------------------------------------
# resolve: global < op type < node


def test_resolve_without_overrides_is_the_global_setting() -> None:
    config = QuantConfig(activations=INT8_AFFINE, weights=PER_TENSOR)
    assert config.resolve("conv1", "Conv") == NodeOverride(
        quantize=True, activations=INT8_AFFINE, weights=PER_TENSOR
    )


def test_resolve_op_type_beats_global() -> None:
    config = QuantConfig(
        op_type_overrides={"Conv": NodeOverride(activations=INT8_SYMMETRIC, weights=PER_TENSOR)}
    )
    conv = config.resolve("conv1", "Conv")
    gemm = config.resolve("gemm1", "Gemm")
    assert (conv.activations, conv.weights, conv.quantize) == (INT8_SYMMETRIC, PER_TENSOR, True)
    assert (gemm.activations, gemm.weights, gemm.quantize) == (ActivationScheme(), WeightScheme(), True)


def test_resolve_node_beats_op_type_field_by_field() -> None:
    config = QuantConfig(
        op_type_overrides={
            "Conv": NodeOverride(quantize=False, activations=INT8_SYMMETRIC, weights=PER_TENSOR)
        },
        node_overrides={"conv2": NodeOverride(quantize=True, weights=UINT8_WEIGHTS)},
    )
    conv1 = config.resolve("conv1", "Conv")
    conv2 = config.resolve("conv2", "Conv")
    assert conv1 == NodeOverride(quantize=False, activations=INT8_SYMMETRIC, weights=PER_TENSOR)
    # conv2: quantize and weights from the node, activations inherited from the op type
    assert conv2 == NodeOverride(quantize=True, activations=INT8_SYMMETRIC, weights=UINT8_WEIGHTS)


def test_resolve_none_fields_inherit_from_below() -> None:
    config = QuantConfig(
        activations=INT8_AFFINE,
        op_type_overrides={"MatMul": NodeOverride(quantize=False)},
        node_overrides={"mm": NodeOverride(activations=INT8_SYMMETRIC)},
    )
    resolved = config.resolve("mm", "MatMul")
    assert resolved.quantize is False  # the node override says nothing about quantize
    assert resolved.activations == INT8_SYMMETRIC
    assert resolved.weights == WeightScheme()


def test_resolve_node_override_applies_to_that_name_only() -> None:
    config = QuantConfig(node_overrides={"head": NodeOverride(quantize=False)})
    assert config.resolve("head", "Gemm").quantize is False
    assert config.resolve("head", "MatMul").quantize is False  # whatever its op type
    assert config.resolve("head_1", "Gemm").quantize is True
    assert config.resolve("Head", "Gemm").quantize is True  # names are case-sensitive


def test_resolve_always_gives_concrete_settings() -> None:
    config = QuantConfig(
        op_type_overrides={"Conv": NodeOverride()}, node_overrides={"c": NodeOverride(quantize=None)}
    )
    resolved = config.resolve("c", "Conv")
    assert resolved.quantize is True
    assert resolved.activations == ActivationScheme() and resolved.weights == WeightScheme()


def test_exclude_op_types_keeps_every_node_of_the_type_float() -> None:
    config = QuantConfig(exclude_op_types=("Conv", "Gemm"))
    assert config.resolve("conv1", "Conv").quantize is False
    assert config.resolve("gemm", "Gemm").quantize is False
    assert config.resolve("mm", "MatMul").quantize is True


def test_exclude_op_types_is_an_op_type_level_setting_a_node_override_beats() -> None:
    """``exclude_op_types`` is shorthand for an op-type ``quantize=False``: a node override re-enables."""
    config = QuantConfig(exclude_op_types=("Conv",), node_overrides={"conv2": NodeOverride(quantize=True)})
    assert config.resolve("conv1", "Conv").quantize is False
    assert config.resolve("conv2", "Conv").quantize is True


def test_exclude_nodes_beats_a_node_override() -> None:
    """The tuning search keeps nodes float through ``exclude_nodes``: nothing may re-enable them."""
    config = QuantConfig(
        exclude_nodes=("conv2",),
        op_type_overrides={"Conv": NodeOverride(quantize=True)},
        node_overrides={"conv2": NodeOverride(quantize=True, activations=INT8_SYMMETRIC)},
    )
    resolved = config.resolve("conv2", "Conv")
    assert resolved.quantize is False
    assert resolved.activations == INT8_SYMMETRIC  # schemes still resolve (the node may be re-enabled)
    assert config.resolve("conv1", "Conv").quantize is True


def test_exclude_nodes_appended_by_replace_take_effect() -> None:
    config = QuantConfig(node_overrides={"a": NodeOverride(quantize=True)})
    kept_float = config.replace(exclude_nodes=(*config.exclude_nodes, "a"))
    assert config.resolve("a", "Conv").quantize is True
    assert kept_float.resolve("a", "Conv").quantize is False


# ---------------------------------------------------------------------------------------------------
# check_names

KNOWN = kernel_table().op_types()
NODES = {"conv1", "conv2", "Conv_3", "/head/Gemm"}
MODEL_OPS = {"Conv", "Relu", "Gemm"}


def _check(config: QuantConfig, nodes: set[str] = NODES, ops: set[str] = MODEL_OPS) -> None:
    config.check_names(node_names=nodes, model_op_types=ops, known_op_types=KNOWN)


def test_names_that_exist_pass() -> None:
    _check(
        QuantConfig(
            exclude_nodes=("conv1",),
            node_overrides={"/head/Gemm": NodeOverride(quantize=False)},
            exclude_op_types=("Relu",),
            op_type_overrides={"Gemm": NodeOverride(weights=PER_TENSOR)},
        )
    )


def test_unknown_excluded_node_names_the_closest_matches() -> None:
    with pytest.raises(OnnxqError) as info:
        _check(QuantConfig(exclude_nodes=("conv_2",)))
    message = str(info.value)
    assert message.startswith(
        "node 'conv_2' (excluded or overridden in the configuration) is not in the model; did you mean "
    )
    assert "'conv2'" in message
    assert "'/head/Gemm'" not in message
    assert "\n" not in message


def test_unknown_overridden_node_is_reported_too() -> None:
    with pytest.raises(OnnxqError, match=r"node '/head/gemm' .* did you mean '/head/Gemm'\?"):
        _check(QuantConfig(node_overrides={"/head/gemm": NodeOverride(quantize=False)}))


def test_node_name_matches_are_case_insensitive_and_at_most_three() -> None:
    nodes = {"Block", "block_a", "block_b", "block_c", "block_d"}
    with pytest.raises(OnnxqError) as info:
        _check(QuantConfig(exclude_nodes=("BLOCK",)), nodes=nodes)
    message = str(info.value)
    suggestions = re.findall(r"'([^']*)'", message.split("did you mean", 1)[1])
    assert suggestions[0] == "Block"  # the same name in another case comes first
    assert 1 <= len(suggestions) <= 3
    assert set(suggestions) <= nodes


def test_unknown_node_without_anything_close_has_no_suggestion() -> None:
    with pytest.raises(OnnxqError) as info:
        _check(QuantConfig(exclude_nodes=("zzzzzz",)))
    assert str(info.value) == (
        "node 'zzzzzz' (excluded or overridden in the configuration) is not in the model"
    )


def test_the_first_unknown_node_in_sorted_order_is_reported() -> None:
    with pytest.raises(OnnxqError, match="node 'b_missing'"):
        _check(
            QuantConfig(exclude_nodes=("conv1", "c_missing"), node_overrides={"b_missing": NodeOverride()})
        )


def test_wrong_case_op_type_suggests_the_real_one() -> None:
    with pytest.raises(OnnxqError) as info:
        _check(QuantConfig(exclude_op_types=("conv",)))
    message = str(info.value)
    assert message.startswith(
        "op type 'conv' (excluded or overridden in the configuration) is not an ONNX op type; "
        "did you mean 'Conv'"
    )


def test_misspelt_op_type_override_is_rejected() -> None:
    with pytest.raises(OnnxqError, match=r"op type 'MatMull' .*did you mean 'MatMul'"):
        _check(QuantConfig(op_type_overrides={"MatMull": NodeOverride(quantize=False)}))


@pytest.mark.parametrize("op_type", ["LSTM", "MatMul", "Softmax", "ConvTranspose", "QLinearConv"])
def test_real_op_type_absent_from_the_model_is_accepted(op_type: str) -> None:
    assert op_type not in MODEL_OPS and op_type in KNOWN
    _check(QuantConfig(exclude_op_types=(op_type,)))
    _check(QuantConfig(op_type_overrides={op_type: NodeOverride(quantize=False)}))


def test_op_type_known_only_from_the_model_is_accepted() -> None:
    """A custom op the model uses (not in any schema table) can still be excluded."""
    assert "MyCustomOp" not in KNOWN
    _check(QuantConfig(exclude_op_types=("MyCustomOp",)), ops={*MODEL_OPS, "MyCustomOp"})
    with pytest.raises(OnnxqError, match="op type 'MyCustomOp'"):
        _check(QuantConfig(exclude_op_types=("MyCustomOp",)))


def test_node_name_is_not_accepted_as_an_op_type() -> None:
    with pytest.raises(OnnxqError, match="op type 'conv1'"):
        _check(QuantConfig(exclude_op_types=("conv1",)))


def test_op_type_is_not_accepted_as_a_node_name() -> None:
    with pytest.raises(OnnxqError, match=r"node 'Relu' .*is not in the model"):
        _check(QuantConfig(exclude_nodes=("Relu",)))


# ---------------------------------------------------------------------------------------------------
# check_names through onnxq.quantize: names from before and after preprocessing

TWO_CONVS = """
two_convs (float[N,3,8,8] x) => (float[N,4,8,8] y) {
    [input_identity] xi = Identity (x)
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xi, w1, b1)
    r = Relu (c)
    [head] y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


def _two_convs() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    arrays = {
        "w1": rng.normal(0.0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0.0, 0.1, (4,)).astype(np.float32),
        "w2": rng.normal(0.0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        "b2": rng.normal(0.0, 0.1, (4,)).astype(np.float32),
    }
    return builders.parse(TWO_CONVS, arrays)


def _feeds() -> list[dict[str, np.ndarray]]:
    return [{"x": sample} for sample in builders.conv_calibration(samples=4)]


def _quantized_convs(result: onnxq.QuantizationResult) -> set[str]:
    """Names of the Conv nodes whose weight arrives through a DequantizeLinear."""
    found = set()
    for node in result.model.graph:
        weight = node.inputs[1] if node.op_type == "Conv" else None
        producer = weight.producer() if weight is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            found.add(node.name or "")
    return found


def test_quantize_accepts_a_node_name_only_the_input_model_has() -> None:
    """``input_identity`` is removed by preprocessing; naming it is not a typo."""
    result = onnxq.quantize(_two_convs(), _feeds(), QuantConfig(exclude_nodes=("input_identity",)))
    assert _quantized_convs(result) == {"Conv", "head"}


def test_quantize_accepts_the_name_preprocessing_gives_an_unnamed_node() -> None:
    result = onnxq.quantize(_two_convs(), _feeds(), QuantConfig(exclude_nodes=("Conv",)))
    assert _quantized_convs(result) == {"head"}
    assert "Conv not quantized: excluded by configuration" in builders.lines(result.report.declines)


def test_quantize_rejects_a_misspelt_node_before_calibrating() -> None:
    def no_data() -> Any:
        raise AssertionError("calibration data read before the configuration was checked")
        yield  # pragma: no cover

    with pytest.raises(OnnxqError, match=r"node 'haed' .*did you mean 'head'\?"):
        onnxq.quantize(_two_convs(), no_data(), QuantConfig(exclude_nodes=("haed",)))


def test_quantize_rejects_a_wrong_case_op_type() -> None:
    with pytest.raises(OnnxqError, match=r"op type 'relu' .*did you mean 'Relu'"):
        onnxq.quantize(_two_convs(), _feeds(), QuantConfig(exclude_op_types=("relu",)))


def test_quantize_accepts_an_op_type_the_model_does_not_have() -> None:
    result = onnxq.quantize(_two_convs(), _feeds(), QuantConfig(exclude_op_types=("LSTM",)))
    assert _quantized_convs(result) == {"Conv", "head"}


def test_quantize_dynamic_checks_names_too() -> None:
    with pytest.raises(OnnxqError, match=r"node 'matmull' .*is not in the model"):
        onnxq.quantize(
            builders.matmul_model(), config=QuantConfig(mode="dynamic", exclude_nodes=("matmull",))
        )
