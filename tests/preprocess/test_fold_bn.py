"""Tests for FoldBatchNormPass: graphs written in onnx.parser text, numerics checked in ORT."""

from __future__ import annotations

import hashlib

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

from onnxq.preprocess.fold_bn import FoldBatchNormPass

RNG_SEED = 1234


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    """Non-trivial running statistics, so a fold that ignores any of them is caught."""
    return {
        f"{prefix}_scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_b": rng.normal(0.0, 1.0, channels).astype(np.float32),
        f"{prefix}_mean": rng.normal(0.0, 1.0, channels).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.3, 2.0, channels).astype(np.float32),
    }


def _build(text: str, initializers: dict[str, np.ndarray]) -> ir.Model:
    return ir.from_proto(builders.parse_model_text(text, initializers))


def _assert_close(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape
        scale = max(1.0, float(np.max(np.abs(e))))
        assert float(np.max(np.abs(e - a))) < 1e-4 * scale


def _fold_and_compare(
    model: ir.Model, feeds: dict[str, np.ndarray]
) -> tuple[ir.passes.PassResult, FoldBatchNormPass]:
    """Fold, check the result folded something and computes what the original computed."""
    expected = builders.run_disabled(model, feeds)
    fold = FoldBatchNormPass()
    result = fold(model)
    assert result.modified
    assert result.model is model
    onnx.checker.check_model(ir.to_proto(model))
    _assert_close(expected, builders.run_disabled(model, feeds))
    return result, fold


def _assert_unchanged(model: ir.Model, reason: str) -> FoldBatchNormPass:
    before = builders.serialize(model)
    fold = FoldBatchNormPass()
    result = fold(model)
    assert not result.modified
    assert builders.serialize(model) == before
    assert len(builders.lines(fold.declined)) == 1
    assert reason in builders.lines(fold.declined)[0]
    assert builders.lines(fold.declined)[0].startswith("bn not folded: ")
    return fold


# ---------------------------------------------------------------------------------------------------
# Conv


def _conv_bn_model(
    *, bias: bool, group: int, opset: int = 13, epsilon: float = 1e-5
) -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = _rng()
    c_in, c_out = 4, 6
    inits = {"W": rng.normal(0, 1, (c_out, c_in // group, 3, 3)).astype(np.float32)}
    conv_inputs = "x, W"
    if bias:
        inits["Wb"] = rng.normal(0, 1, c_out).astype(np.float32)
        conv_inputs += ", Wb"
    inits.update(_bn_params(rng, c_out))
    text = f"""
    <ir_version: 10, opset_import: ["" : {opset}]>
    g (float[2, {c_in}, 8, 8] x) => (float[2, {c_out}, 6, 6] z) {{
        h = Conv <group = {group}> ({conv_inputs})
        y = BatchNormalization <epsilon = {epsilon}> (h, bn_scale, bn_b, bn_mean, bn_var)
        z = Relu(y)
    }}"""
    return _build(text, inits), {"x": rng.normal(0, 1, (2, c_in, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_bn_folded(bias: bool, group: int) -> None:
    model, feeds = _conv_bn_model(bias=bias, group=group, epsilon=1e-3)
    assert builders.op_counts(model) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    _, fold = _fold_and_compare(model, feeds)

    assert builders.op_counts(model) == {"Conv": 1, "Relu": 1}
    assert builders.lines(fold.declined) == []
    assert len(fold.folded) == 1
    relu = model.graph.node(-1)
    rewired = relu.inputs[0]
    assert rewired is not None
    conv = rewired.producer()
    assert conv is not None and conv.op_type == "Conv"
    assert rewired.name == "y"  # the BN output name survives on the Conv output
    assert conv.attributes.get_int("group") == group
    # Weight and bias are new initializers; BN parameters and the old weight are gone.
    assert len(conv.inputs) == 3
    assert all(v is not None and v.is_initializer() for v in conv.inputs[1:])
    assert not {"W", "Wb", "bn_scale", "bn_b", "bn_mean", "bn_var"} & set(model.graph.initializers)
    assert len(model.graph.initializers) == 2


@pytest.mark.parametrize("opset", [9, 13, 15, 17])
def test_conv_bn_folded_across_opsets(opset: int) -> None:
    model, feeds = _conv_bn_model(bias=True, group=1, opset=opset)
    _fold_and_compare(model, feeds)
    assert builders.op_counts(model) == {"Conv": 1, "Relu": 1}


def test_training_mode_zero_is_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 1, 1)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 15]>
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
        h = Conv(x, W)
        y = BatchNormalization <training_mode = 0> (h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (1, 2, 4, 4)).astype(np.float32)})
    assert builders.op_counts(model) == {"Conv": 1}


def test_fold_is_deterministic() -> None:
    digests = []
    for _ in range(2):
        model, _ = _conv_bn_model(bias=False, group=2)
        FoldBatchNormPass()(model)
        digests.append(hashlib.sha256(builders.serialize(model)).hexdigest())
    assert digests[0] == digests[1]


def test_constant_node_parameters_are_folded() -> None:
    """BN parameters given by Constant nodes count as constants."""
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (2, 2, 1, 1)).astype(np.float32)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 3, 3] x) => (float[1, 2, 3, 3] y) {
        s = Constant <value_floats = [0.5, 2.0]> ()
        b = Constant <value_floats = [1.0, -1.0]> ()
        m = Constant <value_floats = [0.25, -0.5]> ()
        v = Constant <value_floats = [1.5, 0.75]> ()
        h = Conv(x, W)
        y = BatchNormalization(h, s, b, m, v)
    }"""
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (1, 2, 3, 3)).astype(np.float32)})
    assert builders.op_counts(model) == {"Conv": 1}  # the Constant nodes became unused and were removed


# ---------------------------------------------------------------------------------------------------
# ConvTranspose


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn_folded(group: int, bias: bool) -> None:
    rng = _rng()
    c_in, c_out = 4, 6
    # ConvTranspose weight is (C_in, C_out / group, k, k); output channel o = g * (C_out/g) + m.
    inits = {"W": rng.normal(0, 1, (c_in, c_out // group, 3, 3)).astype(np.float32)}
    conv_inputs = "x, W"
    if bias:
        inits["Wb"] = rng.normal(0, 1, c_out).astype(np.float32)
        conv_inputs += ", Wb"
    inits.update(_bn_params(rng, c_out))
    text = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, {c_in}, 5, 5] x) => (float[2, {c_out}, 11, 11] y) {{
        h = ConvTranspose <group = {group}, strides = [2, 2]> ({conv_inputs})
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }}"""
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (2, c_in, 5, 5)).astype(np.float32)})

    assert builders.op_counts(model) == {"ConvTranspose": 1}
    out = model.graph.outputs[0]
    assert out.name == "y"
    producer = out.producer()
    assert producer is not None and producer.op_type == "ConvTranspose"
    assert len(producer.inputs) == 3
    weight = producer.inputs[1]
    assert weight is not None and weight.const_value is not None
    assert weight.const_value.shape == (c_in, c_out // group, 3, 3)


# ---------------------------------------------------------------------------------------------------
# Gemm


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5), (3, 1)])
def test_gemm_bn_folded(trans_b: int, bias_shape: tuple[int, ...] | None) -> None:
    rng = _rng()
    k, n_out = 4, 5
    w_shape = (n_out, k) if trans_b else (k, n_out)
    inits = {"W": rng.normal(0, 1, w_shape).astype(np.float32), **_bn_params(rng, n_out)}
    gemm_inputs = "x, W"
    if bias_shape is not None:
        inits["C"] = rng.normal(0, 1, bias_shape).astype(np.float32)
        gemm_inputs += ", C"
    text = f"""
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[3, {k}] x) => (float[3, {n_out}] y) {{
        h = Gemm <transB = {trans_b}, alpha = 0.75, beta = 1.5> ({gemm_inputs})
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }}"""
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (3, k)).astype(np.float32)})

    assert builders.op_counts(model) == {"Gemm": 1}
    gemm = model.graph.outputs[0].producer()
    assert gemm is not None and gemm.op_type == "Gemm"
    assert gemm.attributes.get_int("transB", 0) == trans_b
    assert gemm.attributes.get_float("alpha", 1.0) == 1.0
    assert gemm.attributes.get_float("beta", 1.0) == 1.0
    weight = gemm.inputs[1]
    assert weight is not None and weight.const_value is not None
    assert weight.const_value.shape == w_shape


# ---------------------------------------------------------------------------------------------------
# Rewiring and names


def test_bn_output_graph_output_keeps_name() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] out, float[1, 3, 4, 4] r) {
        h = Conv(x, W)
        out = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
        r = Relu(out)
    }"""
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (1, 2, 6, 6)).astype(np.float32)})

    assert [v.name for v in model.graph.outputs] == ["out", "r"]
    out = model.graph.outputs[0]
    conv = out.producer()
    assert conv is not None and conv.op_type == "Conv"
    relu = model.graph.outputs[1].producer()
    assert relu is not None and relu.inputs[0] is out  # the Relu reads the Conv output now
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]


def test_shared_weight_gets_separate_folded_weights() -> None:
    rng = _rng()
    inits = {
        "W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32),
        **_bn_params(rng, 3, "bn1"),
        **_bn_params(rng, 3, "bn2"),
    }
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x, float[1, 2, 6, 6] x2) => (float[1, 3, 4, 4] y1, float[1, 3, 4, 4] y2) {
        h1 = Conv(x, W)
        h2 = Conv(x2, W)
        y1 = BatchNormalization(h1, bn1_scale, bn1_b, bn1_mean, bn1_var)
        y2 = BatchNormalization(h2, bn2_scale, bn2_b, bn2_mean, bn2_var)
    }"""
    model = _build(text, inits)
    feeds = {
        "x": rng.normal(0, 1, (1, 2, 6, 6)).astype(np.float32),
        "x2": rng.normal(0, 1, (1, 2, 6, 6)).astype(np.float32),
    }
    _, fold = _fold_and_compare(model, feeds)

    assert len(fold.folded) == 2
    assert builders.op_counts(model) == {"Conv": 2}
    convs = [out.producer() for out in model.graph.outputs]
    assert all(c is not None and c.op_type == "Conv" for c in convs)
    weights = [c.inputs[1] for c in convs if c is not None]
    assert weights[0] is not weights[1]
    assert weights[0] is not None and weights[1] is not None
    assert weights[0].name != weights[1].name
    # The shared original is unused after both folds and was dropped.
    assert "W" not in model.graph.initializers
    assert len(model.graph.initializers) == 4


def test_shared_weight_still_used_is_not_mutated() -> None:
    """One Conv folds, the other (no BN) keeps reading the original, unchanged weight."""
    rng = _rng()
    w = rng.normal(0, 1, (3, 2, 1, 1)).astype(np.float32)
    inits = {"W": w, **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] z) {
        h = Conv(x, W)
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
        z = Conv(x, W)
    }"""
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (1, 2, 4, 4)).astype(np.float32)})
    z_conv = model.graph.outputs[1].producer()
    assert z_conv is not None
    assert z_conv.inputs[1] is model.graph.initializers["W"]
    const = model.graph.initializers["W"].const_value
    assert const is not None
    np.testing.assert_array_equal(const.numpy(), w)


# ---------------------------------------------------------------------------------------------------
# No match: the graph must stay byte-identical and a reason must be recorded


def test_conv_with_two_uses_not_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] r) {
        h = Conv(x, W)
        y = BatchNormalization <epsilon = 0.001> (h, bn_scale, bn_b, bn_mean, bn_var)
        r = Relu(h)
    }"""
    model = _build(text, inits)
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "conv output has 2 uses")


def test_conv_output_that_is_graph_output_not_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] h) {
        h = Conv(x, W)
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, inits)
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "graph output")


def test_bn_after_relu_not_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] y) {
        h = Conv(x, W)
        r = Relu(h)
        y = BatchNormalization(r, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, inits)
    model.graph.node(2).name = "bn"
    _assert_unchanged(model, "comes from Relu")


def test_bn_on_graph_input_not_folded() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 3, 4, 4] x) => (float[1, 3, 4, 4] y) {
        y = BatchNormalization(x, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, _bn_params(rng, 3))
    model.graph.node(0).name = "bn"
    _assert_unchanged(model, "graph input")


def test_non_constant_weight_not_folded() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x, float[3, 2, 3, 3] W) => (float[1, 3, 4, 4] y) {
        h = Conv(x, W)
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, _bn_params(rng, 3))
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "Conv weight is not a constant")


def test_initializer_that_is_graph_input_is_not_constant() -> None:
    """An initializer listed among the graph inputs may be overridden at run time."""
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x, float[3] bn_mean) => (float[1, 3, 4, 4] y) {
        h = Conv(x, W)
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)})
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "mean is not a constant")


def test_training_mode_not_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 15]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] y) {
        h = Conv(x, W)
        y, rm, rv = BatchNormalization <training_mode = 1> (h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, inits)
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "training_mode")


def test_opset13_training_outputs_not_folded() -> None:
    """Before opset 14, extra outputs mean training mode (Y uses batch statistics)."""
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] y) {
        h = Conv(x, W)
        y, rm, rv, sm, sv = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    model = _build(text, inits)
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "training-mode outputs")


def test_channel_mismatch_not_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (4, 5)).astype(np.float32), **_bn_params(rng, 4)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[3, 5] x) => (float[3, 4] y) {
        h = Gemm(x, W)
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
    }"""
    # transB=0 makes W (K=4, N=5): the output has 5 columns, but the graph declares 4 channels.
    model = _build(text, inits)
    model.graph.node(1).name = "bn"
    _assert_unchanged(model, "Gemm output has 5 columns")


def test_declines_are_listed_per_node_and_reset_per_call() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] r) {
        h = Conv(x, W)
        y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
        r = Relu(h)
    }"""
    model = _build(text, inits)
    model.graph.node(1).name = "bn3"
    fold = FoldBatchNormPass()
    fold(model)
    fold(model)
    assert builders.lines(fold.declined) == ["bn3 not folded: conv output has 2 uses"]


# ---------------------------------------------------------------------------------------------------
# Subgraphs


def test_bn_inside_if_branch_folded() -> None:
    """Conv and BN inside a branch; weight from the outer scope, BN parameters branch-local."""
    rng = _rng()
    params = _bn_params(rng, 3)
    branch_inits = ", ".join(
        f"float[3] {name} = {{{', '.join(repr(float(v)) for v in array)}}}" for name, array in params.items()
    )
    text = f"""
    <ir_version: 10, opset_import: ["" : 13]>
    g (bool cond, float[1, 2, 6, 6] x, float[1, 3, 4, 4] alt) => (float[1, 3, 4, 4] out) {{
        out = If (cond) <
            then_branch = then_g () => (float[1, 3, 4, 4] y) <{branch_inits}> {{
                h = Conv(x, W)
                y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
            }},
            else_branch = else_g () => (float[1, 3, 4, 4] e) {{
                e = Identity(alt)
            }}
        >
    }}"""
    model = _build(text, {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)})
    then_branch = model.graph.node(0).attributes.get_graph("then_branch")
    then_branch.node(1).name = "bn"
    x = rng.normal(0, 1, (1, 2, 6, 6)).astype(np.float32)
    alt = rng.normal(0, 1, (1, 3, 4, 4)).astype(np.float32)
    feeds_true = {"cond": np.array(True), "x": x, "alt": alt}
    feeds_false = {"cond": np.array(False), "x": x, "alt": alt}
    expected_false = builders.run_disabled(model, feeds_false)

    _, fold = _fold_and_compare(model, feeds_true)
    _assert_close(expected_false, builders.run_disabled(model, feeds_false))

    assert fold.folded == ["bn"]
    assert builders.op_counts(model) == {"If": 1, "Conv": 1, "Identity": 1}
    assert [n.op_type for n in then_branch] == ["Conv"]
    branch_out = then_branch.outputs[0]
    assert branch_out.name == "y"
    producer = branch_out.producer()
    assert producer is not None and producer.op_type == "Conv"
    # Folded weight and bias live in the branch; the unused outer weight is gone.
    assert all(v is not None and v.graph is then_branch for v in producer.inputs[1:])
    assert "W" not in model.graph.initializers


def test_bn_in_branch_with_producer_in_outer_graph_not_folded() -> None:
    rng = _rng()
    inits = {"W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (bool cond, float[1, 2, 6, 6] x) => (float[1, 3, 4, 4] out) {
        h = Conv(x, W)
        out = If (cond) <
            then_branch = then_g () => (float[1, 3, 4, 4] y) {
                y = BatchNormalization(h, bn_scale, bn_b, bn_mean, bn_var)
            },
            else_branch = else_g () => (float[1, 3, 4, 4] e) {
                e = Identity(h)
            }
        >
    }"""
    model = _build(text, inits)
    then_branch = model.graph.node(1).attributes.get_graph("then_branch")
    then_branch.node(0).name = "bn"
    _assert_unchanged(model, "Conv is in another graph")


# ---------------------------------------------------------------------------------------------------
# torch-built model


def test_torch_conv_bn_folded() -> None:
    torch = pytest.importorskip("torch")
    import io
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, groups=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    ).eval()
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 10, 10)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net,
                (x,),
                buffer,
                dynamo=False,
                opset_version=13,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=["x"],
            )
        except Exception as e:  # pragma: no cover - exporter availability differs between builds
            pytest.skip(f"torch.onnx.export (TorchScript) unavailable: {e}")
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, 10)
    model = ir.from_proto(proto)
    if builders.op_counts(model)["BatchNormalization"] != 1:
        pytest.skip("the exporter already folded BatchNormalization")
    with torch.no_grad():
        reference = net(x).numpy()
    _fold_and_compare(model, {"x": x.numpy()})
    assert builders.op_counts(model)["BatchNormalization"] == 0
    _assert_close([reference], builders.run_disabled(model, {"x": x.numpy()}))
