"""FoldAffinePass: per-channel Mul/Add/Sub and zero Pads folded into the Conv/Gemm next to them.

Every fold is checked for structure (which ops are gone, what the producer reads) and run in ONNX
Runtime at ORT_DISABLE_ALL against the original on random inputs: the folds are exact in float up to
rounding (relative 1e-5).
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.graph import const_array
from onnxq.preprocess import preprocess
from onnxq.preprocess.fold_affine import FoldAffinePass

RNG_SEED = 3


def _fold(proto: onnx.ModelProto) -> tuple[ir.Model, FoldAffinePass]:
    fold = FoldAffinePass()
    return builders.apply_pass(proto, fold), fold


def _assert_same(proto: onnx.ModelProto, model: ir.Model, shape: tuple[int, ...], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(3):
        feed = {"x": rng.standard_normal(shape).astype(np.float32)}
        [expected] = builders.run_disabled(proto, feed)
        [actual] = builders.run_disabled(model, feed)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _arrays(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return {name: rng.uniform(0.5, 1.5, shape).astype(np.float32) for name, shape in shapes.items()}


CONV_AFFINE = """
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    m = Mul (s, c)
    y = Add (m, t)
}
"""


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((), ()), ((1, 4, 1, 1), (1, 4, 1, 1)), ((4, 1, 1), (4, 1, 1)), ((1,), (4, 1, 1))],
    ids=["scalars", "nchw", "chw", "mixed"],
)
def test_conv_mul_add_fold_into_the_conv(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    proto = builders.parse(CONV_AFFINE, _arrays(w=(4, 3, 3, 3), b=(4,), s=s_shape, t=t_shape))
    model, fold = _fold(proto)
    assert builders.op_counts(model) == {"Conv": 1}
    assert fold.folded == {"Conv": 2} and fold.declined == []
    conv = next(iter(model.graph))
    assert model.graph.outputs[0] is conv.outputs[0] and conv.outputs[0].name == "y"
    assert "w" not in model.graph.initializers  # the original weight is gone once unused
    _assert_same(proto, model, (1, 3, 8, 8))


def test_add_without_bias_creates_one_and_sub_negates() -> None:
    text = """
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv (x, w)
        y = Sub (c, t)
    }
    """
    proto = builders.parse(text, _arrays(w=(4, 3, 1, 1), t=(1, 4, 1, 1)))
    model, fold = _fold(proto)
    conv = next(iter(model.graph))
    assert fold.folded == {"Conv": 1}
    assert builders.op_counts(model) == {"Conv": 1} and len(conv.inputs) == 3
    _assert_same(proto, model, (1, 3, 8, 8))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_mul_add_fold(trans_b: int) -> None:
    text = f"""
    g (float[2, 6] x) => (float[2, 5] y) {{
        c = Gemm <transB = {trans_b}, alpha = 0.5> (x, w, b)
        m = Mul (c, s)
        y = Add (t, m)
    }}
    """
    w_shape = (5, 6) if trans_b else (6, 5)
    proto = builders.parse(text, _arrays(w=w_shape, b=(5,), s=(5,), t=(1, 5)))
    model, _ = _fold(proto)
    assert builders.op_counts(model) == {"Gemm": 1}
    _assert_same(proto, model, (2, 6))


def test_conv_transpose_fold() -> None:
    text = """
    g (float[1, 3, 4, 4] x) => (float[1, 2, 9, 9] y) {
        c = ConvTranspose <strides = [2, 2]> (x, w, b)
        y = Mul (c, s)
    }
    """
    proto = builders.parse(text, _arrays(w=(3, 2, 3, 3), b=(2,), s=(1, 2, 1, 1)))
    model, _ = _fold(proto)
    assert builders.op_counts(model) == {"ConvTranspose": 1}
    _assert_same(proto, model, (1, 3, 4, 4))


@pytest.mark.parametrize(
    ("text", "arrays", "reason"),
    [
        pytest.param(
            "c = Conv (x, w)\ny = Mul (c, s)",
            {"w": (4, 3, 1, 1), "s": (1, 1, 8, 1)},
            "a constant of shape [1, 1, 8, 1] is not per output channel",
            id="spatial-constant",
        ),
        pytest.param(
            "c = Conv (x, w)\ny = Add (c, t)",
            {"w": (4, 3, 1, 1), "t": (4,)},
            "a constant of shape [4] is not per output channel",
            id="broadcasts-on-width",
        ),
    ],
)
def test_declines_constants_that_are_not_per_channel(
    text: str, arrays: dict[str, tuple[int, ...]], reason: str
) -> None:
    proto = builders.parse(
        f"g (float[1, 3, 8, 4] x) => (float[1, 4, 8, 4] y) {{ {text} }}", _arrays(**arrays)
    )
    model, fold = _fold(proto)
    assert not fold.folded
    assert builders.lines(fold.declined) == [f"<{text.split()[-3]} -> y> not folded: {reason}"]
    _assert_same(proto, model, (1, 3, 8, 4))


def test_producer_read_elsewhere_is_left_alone() -> None:
    text = """
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] z) {
        c = Conv (x, w)
        y = Mul (c, s)
        z = Relu (c)
    }
    """
    model, fold = _fold(builders.parse(text, _arrays(w=(4, 3, 1, 1), s=())))
    assert fold.folded == {} and fold.declined == []  # no match: nothing to say either
    assert builders.op_counts(model) == {"Conv": 1, "Mul": 1, "Relu": 1}


# Rules 1-2 into a BatchNormalization no Conv could take (Caffe2's BatchNorm → Scale after a Concat).
CONCAT_BN_SCALE = """
g (float[1, 2, 6, 6] x) => (float[1, 3, 6, 6] y) {
    a = Relu (x)
    cat = Concat <axis = 1> (x, a)
    bn = BatchNormalization <epsilon = 0.001> (cat, gamma, beta, mean, var)
    m = Mul (bn, s)
    t = Add (m, shift)
    r = Relu (t)
    y = Conv (r, w)
}
"""


def _batch_norm_arrays(s: tuple[int, ...], shift: tuple[int, ...]) -> dict[str, np.ndarray]:
    arrays = _arrays(gamma=(4,), var=(4,), s=s, shift=shift, w=(3, 4, 1, 1))
    rng = np.random.default_rng(RNG_SEED + 1)
    arrays["beta"] = rng.standard_normal(4).astype(np.float32)
    arrays["mean"] = rng.standard_normal(4).astype(np.float32)
    return arrays


@pytest.mark.parametrize(("s", "shift"), [((4, 1, 1), (1, 4, 1, 1)), ((), (4, 1, 1))], ids=["chw", "scalar"])
def test_preprocess_folds_mul_add_into_a_batch_norm_after_a_concat(
    s: tuple[int, ...], shift: tuple[int, ...]
) -> None:
    """Concat → BatchNorm → Mul → Add → Relu: one BatchNorm whose scale and bias took the Mul and Add."""
    arrays = _batch_norm_arrays(s, shift)
    proto = builders.parse(CONCAT_BN_SCALE, arrays)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert builders.op_counts(model) == {"Relu": 2, "Concat": 1, "BatchNormalization": 1, "Conv": 1}
    assert summary.affine_folded == 2
    bn = _only(model, "BatchNormalization")
    scale = np.broadcast_to(arrays["s"].reshape(-1), (4,)).astype(np.float64)
    np.testing.assert_allclose(_const(bn.inputs[1]), arrays["gamma"] * scale, rtol=1e-6)
    np.testing.assert_allclose(
        _const(bn.inputs[2]), arrays["beta"] * scale + arrays["shift"].reshape(-1), rtol=1e-6, atol=1e-6
    )
    _assert_same(proto, model, (1, 2, 6, 6))


def test_batch_norm_keeps_a_mul_that_is_not_per_channel() -> None:
    """A Mul by one value per column does not scale whole channels: declined, with the reason."""
    arrays = _batch_norm_arrays((1, 1, 6), (4, 1, 1))
    model = ir.from_proto(builders.parse(CONCAT_BN_SCALE, arrays))
    summary = preprocess(model)
    assert builders.op_counts(model)["Mul"] == 1
    assert "Mul not folded: a constant of shape [1, 1, 6] is not per output channel" in builders.lines(
        summary.declines
    )


def test_training_batch_norm_is_not_a_producer() -> None:
    """A BatchNorm in training mode (its running statistics read) takes nothing."""
    text = """
    g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y, float[4] rm) {
        bn, rm, rv = BatchNormalization <training_mode = 1> (x, gamma, beta, mean, var)
        y = Mul (bn, s)
    }
    """
    proto = builders.parse(text, _batch_norm_arrays((4, 1, 1), ()), opset=15)
    model = ir.from_proto(proto)
    preprocess(model)
    assert builders.op_counts(model)["Mul"] == 1


PAD_CONV = """
g (float[1, 3, 8, 8] x) => (float[1, 4, {h}, {w}] y) {{
    pads = Constant <value = int64[8] {{{pads}}}> ()
    p = Pad <mode = "{mode}"> (x, pads{value})
    y = Conv <pads = [1, 1, 1, 1], group = 1> (p, wt)
}}
"""


def test_zero_pad_folds_into_the_conv_pads() -> None:
    text = PAD_CONV.format(h=9, w=10, pads="0, 0, 0, 1, 0, 0, 1, 1", mode="constant", value="")
    proto = builders.parse(text, _arrays(wt=(4, 3, 3, 3)))
    model, fold = _fold(proto)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert builders.op_counts(model)["Pad"] == 0 and fold.folded == {"Conv": 1}
    assert list(conv.attributes["pads"].as_ints()) == [1, 2, 2, 2]
    assert conv.inputs[0] is model.graph.inputs[0]
    _assert_same(proto, model, (1, 3, 8, 8))


@pytest.mark.parametrize(
    ("pads", "out_hw", "in_channels", "mode", "value", "reason"),
    [
        ("0, 0, 1, 1, 0, 0, 1, 1", 10, 3, "reflect", "", "Pad mode is reflect, not constant"),
        ("0, 1, 0, 0, 0, 0, 0, 0", 8, 4, "constant", "", "Pad pads batch or channel axes, or crops"),
        ("0, 0, 1, 1, 0, 0, 1, 1", 10, 3, "constant", ", fill", "Pad value is 0.5, not 0"),
    ],
    ids=["reflect", "channel-axis", "nonzero-value"],
)
def test_pads_that_are_not_zero_spatial_padding_stay(
    pads: str, out_hw: int, in_channels: int, mode: str, value: str, reason: str
) -> None:
    text = PAD_CONV.format(h=out_hw, w=out_hw, pads=pads, mode=mode, value=value)
    arrays = _arrays(wt=(4, in_channels, 3, 3))
    if value:
        arrays["fill"] = np.array(0.5, np.float32)
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {}
    assert builders.lines(fold.declined) == [f"<Pad -> p> not folded: {reason}"]
    assert builders.op_counts(model)["Pad"] == 1
    _assert_same(proto, model, (1, 3, 8, 8))


def test_folds_inside_if_branches_too() -> None:
    text = """
    g (float[1, 3, 8, 8] x, bool cond) => (float[1, 4, 8, 8] y) {
        y = If (cond) <
            then_branch = t () => (float[1, 4, 8, 8] a) {
                ca = Conv (x, w)
                a = Mul (ca, s)
            },
            else_branch = e () => (float[1, 4, 8, 8] b) {
                b = Conv (x, w)
            }
        >
    }
    """
    proto = builders.parse(text, _arrays(w=(4, 3, 1, 1), s=(1, 4, 1, 1)))
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1}
    assert builders.op_counts(model)["Mul"] == 0
    rng = np.random.default_rng(1)
    for cond in (True, False):
        feed = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(cond)}
        [expected] = builders.run_disabled(proto, feed)
        [actual] = builders.run_disabled(model, feed)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_preprocess_folds_paddle_style_affine_blocks() -> None:
    """Conv → Mul(scale) → Add(bias) → hard-swish: the Mul/Add vanish into the Conv in preprocessing."""
    text = """
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m = Mul (s, c)
        y = Add (m, t)
    }
    """
    proto = builders.parse(text, _arrays(w=(4, 3, 3, 3), b=(4,), s=(), t=()))
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert summary.affine_folded == 2
    assert builders.op_counts(model) == {"Conv": 1}
    _assert_same(proto, model, (1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------
# Rule 4: an affine chain y = a·x + b folded into the Conv/Gemm/MatMul that read y (the input side)
#
# Each fold is checked for structure (the chain is gone, or replaced by one Add(x, b/a); the readers
# read x or that Add; their weights and biases are what a·W and bias + W·b give, computed here
# independently) and numerically against the original in ONNX Runtime (ORT_DISABLE_ALL).
# ---------------------------------------------------------------------------------------------------

#: Per-input-channel scale and offset used by the rule-4 tests (3 channels; signs and sizes vary).
S3 = np.array([0.5, -2.0, 1.5], np.float32)
T3 = np.array([0.25, -1.0, 2.0], np.float32)


def _assert_equivalent(proto: onnx.ModelProto, model: ir.Model, seed: int = 0) -> None:
    """Every output of ``model`` matches ``proto``'s on random feeds, to 1e-4 of the output's magnitude."""
    for feed in builders.random_feeds(proto, 3, seed):
        expected = builders.run_disabled(proto, feed)
        actual = builders.run_disabled(model, feed)
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected, strict=True):
            assert got.shape == want.shape
            scale = max(float(np.abs(want).max()), 1e-3)
            np.testing.assert_allclose(got, want, rtol=0.0, atol=1e-4 * scale)


def _nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == op_type]


def _only(model: ir.Model, op_type: str) -> ir.Node:
    [node] = _nodes(model, op_type)
    return node


def _const(value: ir.Value | None) -> np.ndarray:
    array = const_array(value)
    assert array is not None, f"{value} is not a constant"
    return array


def _conv_fold(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, offset: np.ndarray | None, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """What folding ``y = scale·x + offset`` (per input channel) into a Conv must give, by loops.

    Returns the weight and the bias (zeros for a missing bias that ``offset`` does not create).
    """
    out_channels, per_group = weight.shape[:2]
    new_weight = weight.astype(np.float64).copy()
    shift = np.zeros(out_channels)
    for o in range(out_channels):
        for i in range(per_group):
            channel = (o // (out_channels // group)) * per_group + i
            new_weight[o, i] *= scale[channel]
            if offset is not None:
                shift[o] += weight[o, i].astype(np.float64).sum() * offset[channel]
    return new_weight, shift + (0.0 if bias is None else bias.astype(np.float64))


def _assert_reads(node: ir.Node, value: ir.Value) -> None:
    assert node.inputs[0] is value, f"{node.op_type} reads {node.inputs[0]}, not {value}"


UNPADDED_1X1 = """
g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {{
    m = Mul (x, s)
    a = Add (m, t)
    y = Conv ({conv_inputs})
}}
"""


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_input_scalar_mul_add_fold_fully_into_an_unpadded_conv(with_bias: bool) -> None:
    conv_inputs = "a, w, b" if with_bias else "a, w"
    arrays = builders.normal_arrays(11, w=(4, 3, 1, 1), b=(4,))
    if not with_bias:
        del arrays["b"]
    arrays |= {"s": np.array(1.7, np.float32), "t": np.array(-0.6, np.float32)}
    proto = builders.parse(UNPADDED_1X1.format(conv_inputs=conv_inputs), arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1} and fold.declined == []
    assert builders.op_counts(model) == {"Conv": 1}
    conv = _only(model, "Conv")
    _assert_reads(conv, model.graph.inputs[0])
    assert conv.outputs[0] is model.graph.outputs[0] and conv.outputs[0].name == "y"
    assert len(conv.inputs) == 3  # a bias is created when there was none
    weight, bias = _conv_fold(arrays["w"], arrays.get("b"), np.full(3, 1.7), np.full(3, -0.6))
    np.testing.assert_allclose(_const(conv.inputs[1]), weight, rtol=1e-6)
    np.testing.assert_allclose(_const(conv.inputs[2]), bias, rtol=1e-5, atol=1e-6)
    assert not {"s", "t", "w", "b"} & set(model.graph.initializers)  # the originals, now unused
    _assert_equivalent(proto, model)


PER_CHANNEL_CHAIN = """
g (float[1, 3, 6, 6] x) => (float[1, 4, 4, 4] y) {{
    {chain}
    y = Conv (a, w, b)
}}
"""


@pytest.mark.parametrize(
    ("chain", "constants", "scale", "offset"),
    [
        pytest.param(
            "m = Mul (x, s)\n a = Add (m, t)",
            {"s": S3.reshape(3, 1, 1), "t": T3.reshape(3, 1, 1)},
            S3,
            T3,
            id="chw",
        ),
        pytest.param(
            "m = Mul (s, x)\n a = Add (t, m)",
            {"s": S3.reshape(1, 3, 1, 1), "t": T3.reshape(1, 3, 1, 1)},
            S3,
            T3,
            id="nchw-constant-first",
        ),
        pytest.param("a = Div (x, s)", {"s": S3.reshape(1, 3, 1, 1)}, 1 / S3, None, id="div"),
        pytest.param("a = Sub (x, t)", {"t": T3.reshape(3, 1, 1)}, np.ones(3), -T3, id="sub"),
        pytest.param("a = Sub (t, x)", {"t": T3.reshape(1, 3, 1, 1)}, -np.ones(3), T3, id="sub-negates"),
    ],
)
def test_input_per_channel_chains_fold_into_an_unpadded_conv(
    chain: str, constants: dict[str, np.ndarray], scale: np.ndarray, offset: np.ndarray | None
) -> None:
    arrays = builders.normal_arrays(12, w=(4, 3, 3, 3), b=(4,)) | constants
    proto = builders.parse(PER_CHANNEL_CHAIN.format(chain=chain), arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1} and fold.declined == []
    assert builders.op_counts(model) == {"Conv": 1}
    conv = _only(model, "Conv")
    _assert_reads(conv, model.graph.inputs[0])
    weight, bias = _conv_fold(arrays["w"], arrays["b"], scale, offset)
    np.testing.assert_allclose(_const(conv.inputs[1]), weight, rtol=1e-6)
    np.testing.assert_allclose(_const(conv.inputs[2]), bias, rtol=1e-5, atol=1e-6)
    _assert_equivalent(proto, model)


@pytest.mark.parametrize(
    "conv_attrs", ["pads = [1, 1, 1, 1]", 'auto_pad = "SAME_UPPER"'], ids=["pads", "same-upper"]
)
def test_input_offset_before_a_padded_conv_becomes_one_add(conv_attrs: str) -> None:
    """A padded border sees 0 where the original saw ``b``: the offset stays as ``Add(x, b/a)``."""
    text = f"""
    g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {{
        m = Mul (x, s)
        a = Add (m, t)
        y = Conv <{conv_attrs}> (a, w, b)
    }}
    """
    arrays = builders.normal_arrays(13, w=(4, 3, 3, 3), b=(4,))
    arrays |= {"s": S3.reshape(1, 3, 1, 1), "t": T3.reshape(1, 3, 1, 1)}
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1} and fold.declined == []
    assert builders.op_counts(model) == {"Add": 1, "Conv": 1}
    add, conv = _only(model, "Add"), _only(model, "Conv")
    _assert_reads(add, model.graph.inputs[0])
    np.testing.assert_allclose(_const(add.inputs[1]), (T3 / S3).reshape(3, 1, 1), rtol=1e-6)
    _assert_reads(conv, add.outputs[0])
    weight, _ = _conv_fold(arrays["w"], arrays["b"], S3, None)
    np.testing.assert_allclose(_const(conv.inputs[1]), weight, rtol=1e-6)
    np.testing.assert_array_equal(_const(conv.inputs[2]), arrays["b"])  # the bias is left alone
    _assert_equivalent(proto, model)  # the whole output: the padded borders too


@pytest.mark.parametrize(
    ("group", "weight_shape"),
    [(3, (3, 1, 3, 3)), (3, (6, 1, 3, 3)), (2, (6, 2, 3, 3))],
    ids=["depthwise", "depthwise-x2", "group-2"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_input_per_channel_fold_into_grouped_convs(
    group: int, weight_shape: tuple[int, ...], padded: bool
) -> None:
    channels = group * weight_shape[1]
    size = 6 if padded else 4
    pads = "pads = [1, 1, 1, 1], " if padded else ""
    text = f"""
    g (float[1, {channels}, 6, 6] x) => (float[1, {weight_shape[0]}, {size}, {size}] y) {{
        m = Mul (x, s)
        a = Add (m, t)
        y = Conv <{pads}group = {group}> (a, w, b)
    }}
    """
    rng = np.random.default_rng(14)
    scale = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    offset = rng.normal(0.0, 1.0, channels)
    arrays = builders.normal_arrays(14, w=weight_shape, b=(weight_shape[0],))
    arrays |= {
        "s": scale.astype(np.float32).reshape(1, channels, 1, 1),
        "t": offset.astype(np.float32).reshape(channels, 1, 1),
    }
    scale, offset = arrays["s"].reshape(-1).astype(np.float64), arrays["t"].reshape(-1).astype(np.float64)
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1} and fold.declined == []
    conv = _only(model, "Conv")
    weight, bias = _conv_fold(arrays["w"], arrays["b"], scale, None if padded else offset, group)
    np.testing.assert_allclose(_const(conv.inputs[1]), weight, rtol=1e-6)
    np.testing.assert_allclose(_const(conv.inputs[2]), bias, rtol=1e-5, atol=1e-6)
    if padded:
        assert builders.op_counts(model) == {"Add": 1, "Conv": 1}
        add = _only(model, "Add")
        _assert_reads(add, model.graph.inputs[0])
        _assert_reads(conv, add.outputs[0])
        np.testing.assert_allclose(_const(add.inputs[1]).reshape(-1), offset / scale, rtol=1e-6)
    else:
        assert builders.op_counts(model) == {"Conv": 1}
        _assert_reads(conv, model.graph.inputs[0])
    _assert_equivalent(proto, model)


def test_input_two_conv_readers_one_padded_share_one_add() -> None:
    text = """
    g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, 2, 6, 6] z) {
        m = Mul (x, s)
        a = Add (m, t)
        y = Conv <pads = [1, 1, 1, 1]> (a, w1, b1)
        z = Conv (a, w2, b2)
    }
    """
    arrays = builders.normal_arrays(15, w1=(4, 3, 3, 3), b1=(4,), w2=(2, 3, 1, 1), b2=(2,))
    arrays |= {"s": S3.reshape(3, 1, 1), "t": T3.reshape(3, 1, 1)}
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1} and fold.declined == []
    assert builders.op_counts(model) == {"Add": 1, "Conv": 2}
    add = _only(model, "Add")
    _assert_reads(add, model.graph.inputs[0])
    np.testing.assert_allclose(_const(add.inputs[1]), (T3 / S3).reshape(3, 1, 1), rtol=1e-6)
    for conv, name in zip(_nodes(model, "Conv"), ("w1", "w2"), strict=True):
        _assert_reads(conv, add.outputs[0])
        weight, _ = _conv_fold(arrays[name], None, S3, None)
        np.testing.assert_allclose(_const(conv.inputs[1]), weight, rtol=1e-6)
    _assert_equivalent(proto, model)


@pytest.mark.parametrize(
    ("text", "shapes"),
    [
        pytest.param(
            """g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, 3, 6, 6] z) {
                m = Mul (x, s)
                a = Add (m, t)
                y = Conv (a, w, b)
                z = Relu (a)
            }""",
            {"w": (4, 3, 1, 1), "b": (4,), "s": (3, 1, 1), "t": (3, 1, 1)},
            id="conv-and-relu",
        ),
        pytest.param(  # PRelu's slope is a 2-D float constant, like a MatMul weight
            """g (float[6, 6] x) => (float[6, 5] y, float[6, 6] z) {
                m = Mul (x, s)
                a = Add (m, t)
                y = MatMul (a, w)
                z = PRelu (a, slope)
            }""",
            {"w": (6, 5), "s": (6,), "t": (6,), "slope": (6, 1)},
            id="matmul-and-prelu",
        ),
    ],
)
def test_input_chain_with_a_reader_that_is_not_linear_is_left_alone(
    text: str, shapes: dict[str, tuple[int, ...]]
) -> None:
    proto = builders.parse(text, builders.normal_arrays(16, **shapes))
    before = builders.serialize(ir.from_proto(proto))
    model, fold = _fold(proto)
    assert fold.folded == {} and fold.declined == []  # no match: nothing to say either
    assert builders.serialize(model) == before
    _assert_equivalent(proto, model)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False], ids=["c", "no-c"])
def test_input_per_feature_chain_folds_fully_into_a_gemm(trans_b: int, with_c: bool) -> None:
    c_input = ", c" if with_c else ""
    text = f"""
    g (float[2, 6] x) => (float[2, 5] y) {{
        m = Mul (x, s)
        a = Sub (m, t)
        y = Gemm <transB = {trans_b}, alpha = 0.5> (a, w{c_input})
    }}
    """
    rng = np.random.default_rng(17)
    arrays = builders.normal_arrays(17, w=(5, 6) if trans_b else (6, 5), c=(5,))
    if not with_c:
        del arrays["c"]
    arrays |= {
        "s": rng.uniform(0.5, 2.0, 6).astype(np.float32),
        "t": rng.normal(0.0, 1.0, 6).astype(np.float32),
    }
    scale, offset = arrays["s"].astype(np.float64), -arrays["t"].astype(np.float64)
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Gemm": 1} and fold.declined == []
    assert builders.op_counts(model) == {"Gemm": 1}
    gemm = _only(model, "Gemm")
    _assert_reads(gemm, model.graph.inputs[0])
    w = arrays["w"].astype(np.float64)
    k_by_n = w.T if trans_b else w  # the weight as [K, N]
    weight = (k_by_n * scale[:, None]).T if trans_b else k_by_n * scale[:, None]
    bias = 0.5 * (offset @ k_by_n) + (arrays["c"] if with_c else 0.0)
    np.testing.assert_allclose(_const(gemm.inputs[1]), weight, rtol=1e-6)
    np.testing.assert_allclose(_const(gemm.inputs[2]), bias, rtol=1e-5, atol=1e-6)
    _assert_equivalent(proto, model)


@pytest.mark.parametrize(
    ("reader", "w_shape"),
    [
        ("Gemm <beta = 0.5> (a, w, c)", (6, 5)),
        ("MatMul (a, w)", (6, 5)),
    ],
    ids=["gemm-beta", "matmul"],
)
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "scale-only"])
def test_input_offset_before_a_gemm_with_beta_or_a_matmul_becomes_one_add(
    reader: str, w_shape: tuple[int, ...], with_offset: bool
) -> None:
    chain = "m = Mul (x, s)\n a = Add (m, t)" if with_offset else "a = Mul (x, s)"
    text = f"""
    g (float[2, 6] x) => (float[2, 5] y) {{
        {chain}
        y = {reader}
    }}
    """
    rng = np.random.default_rng(18)
    arrays = builders.normal_arrays(18, w=w_shape, c=(5,))
    if "MatMul" in reader:
        del arrays["c"]
    arrays |= {
        "s": (rng.uniform(0.5, 2.0, 6) * rng.choice([-1.0, 1.0], 6)).astype(np.float32),
        "t": rng.normal(0.0, 1.0, 6).astype(np.float32),
    }
    if not with_offset:
        del arrays["t"]
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    op = reader.split()[0]
    assert fold.folded == {op: 1} and fold.declined == []
    node = _only(model, op)
    if with_offset:
        assert builders.op_counts(model) == {"Add": 1, op: 1}
        add = _only(model, "Add")
        _assert_reads(add, model.graph.inputs[0])
        _assert_reads(node, add.outputs[0])
        np.testing.assert_allclose(_const(add.inputs[1]), arrays["t"] / arrays["s"], rtol=1e-6)
    else:
        assert builders.op_counts(model) == {op: 1}
        _assert_reads(node, model.graph.inputs[0])
    weight = arrays["w"].astype(np.float64) * arrays["s"][:, None]
    np.testing.assert_allclose(_const(node.inputs[1]), weight, rtol=1e-6)
    if op == "Gemm":
        np.testing.assert_array_equal(_const(node.inputs[2]), arrays["c"])
    _assert_equivalent(proto, model)


def test_input_chain_before_a_batched_matmul_folds_along_the_last_axis() -> None:
    text = """
    g (float[2, 3, 6] x) => (float[2, 3, 5] y) {
        a = Mul (x, s)
        y = MatMul (a, w)
    }
    """
    arrays = builders.normal_arrays(19, w=(6, 5)) | {"s": np.linspace(-2, 2, 6, dtype=np.float32)}
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"MatMul": 1} and builders.op_counts(model) == {"MatMul": 1}
    matmul = _only(model, "MatMul")
    _assert_reads(matmul, model.graph.inputs[0])
    np.testing.assert_allclose(_const(matmul.inputs[1]), arrays["w"] * arrays["s"][:, None], rtol=1e-6)
    _assert_equivalent(proto, model)


@pytest.mark.parametrize(
    ("text", "arrays", "reason"),
    [
        pytest.param(
            """g (float[2, 6] x) => (float[1, 2, 5] y) {
                a = Mul (x, s)
                y = MatMul (a, w)
            }""",
            {"w": (6, 5), "s": (1, 1, 6)},
            "<Mul -> a> not folded: a constant of rank 3 may widen data of rank 2",
            id="constant-widens-the-data",
        ),
        pytest.param(
            """g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
                a = Mul (x, s)
                y = Conv (a, w)
            }""",
            {"w": (4, 3, 1, 1), "s": (1, 1, 6, 6)},
            "<Mul -> a> not folded: a constant of shape [1, 1, 6, 6] is not per input channel",
            id="spatial-constant",
        ),
        pytest.param(
            """g (float[1, 3, 6, 3] x) => (float[1, 4, 6, 3] y) {
                a = Mul (x, s)
                y = Conv (a, w)
            }""",
            {"w": (4, 3, 1, 1), "s": (3,)},
            "<Mul -> a> not folded: a constant of shape [3] is not per input channel",
            id="constant-on-the-last-axis",
        ),
        pytest.param(
            """g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
                a = Add (x, t)
                y = Conv <pads = [1, 1, 1, 1]> (a, w, b)
            }""",
            {"w": (4, 3, 3, 3), "b": (4,), "t": (3, 1, 1)},
            "<Add -> a> not folded: an offset before a padded Conv or a MatMul cannot be folded exactly",
            id="offset-only-before-padded-conv",
        ),
        pytest.param(
            """g (float[2, 6] x) => (float[2, 5] y) {
                a = Sub (x, t)
                y = MatMul (a, w)
            }""",
            {"w": (6, 5), "t": (6,)},
            "<Sub -> a> not folded: an offset before a padded Conv or a MatMul cannot be folded exactly",
            id="offset-only-before-matmul",
        ),
        pytest.param(
            """g (float[1, 3, 3, 3] x) => (float[1, 4, 3, 3] y, float[1, 3, 3, 5] z) {
                a = Mul (x, s)
                y = Conv (a, w)
                z = MatMul (a, v)
            }""",
            {"w": (4, 3, 1, 1), "v": (3, 5), "s": ()},
            "<Mul -> a> not folded: the readers mix Conv with Gemm/MatMul",
            id="conv-and-matmul-readers",
        ),
    ],
)
def test_input_chains_that_do_not_fold_are_declined(
    text: str, arrays: dict[str, tuple[int, ...]], reason: str
) -> None:
    proto = builders.parse(text, _arrays(**arrays))
    before = builders.serialize(ir.from_proto(proto))
    model, fold = _fold(proto)
    assert fold.folded == {}
    assert builders.lines(fold.declined) == [reason]
    assert builders.serialize(model) == before
    _assert_equivalent(proto, model)


@pytest.mark.parametrize(
    ("text", "arrays"),
    [
        pytest.param(
            """g (float[1, 3, 6, 6] x) => (float[1, 3, 6, 6] a, float[1, 4, 6, 6] y) {
                m = Mul (x, s)
                a = Add (m, t)
                y = Conv (a, w)
            }""",
            {"w": (4, 3, 1, 1), "s": (3, 1, 1), "t": (3, 1, 1)},
            id="chain-output-is-a-graph-output",
        ),
        pytest.param(
            """g (float[1, 3, 6, 6] x, float[4, 3, 1, 1] k) => (float[1, 4, 6, 6] y) {
                a = Mul (k, s)
                y = Conv (x, a)
            }""",
            {"s": ()},
            id="read-as-the-conv-weight",
        ),
        pytest.param(
            """g (float[1, 3, 6, 6] x, float[4] c) => (float[1, 4, 6, 6] y) {
                a = Mul (c, s)
                y = Conv (x, w, a)
            }""",
            {"w": (4, 3, 1, 1), "s": ()},
            id="read-as-the-conv-bias",
        ),
        pytest.param(
            """g (float[6, 2] x) => (float[2, 5] y) {
                a = Mul (x, s)
                y = Gemm <transA = 1> (a, w)
            }""",
            {"w": (6, 5), "s": ()},
            id="gemm-trans-a",
        ),
        pytest.param(
            """g (float[1, 3, 6, 6] x, float[4, 3, 1, 1] k) => (float[1, 4, 6, 6] y) {
                a = Mul (x, s)
                y = Conv (a, k)
            }""",
            {"s": ()},
            id="weight-not-constant",
        ),
    ],
)
def test_input_chains_the_rule_is_not_about_are_left_alone(
    text: str, arrays: dict[str, tuple[int, ...]]
) -> None:
    proto = builders.parse(text, _arrays(**arrays))
    before = builders.serialize(ir.from_proto(proto))
    model, fold = _fold(proto)
    assert fold.folded == {} and fold.declined == []
    assert builders.serialize(model) == before
    _assert_equivalent(proto, model)


def test_input_division_by_a_zero_constant_is_declined() -> None:
    text = """
    g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {
        a = Div (x, d)
        y = Conv (a, w)
    }
    """
    divisor = np.array([1.0, 0.0, 2.0], np.float32).reshape(3, 1, 1)
    model, fold = _fold(builders.parse(text, builders.normal_arrays(20, w=(4, 3, 1, 1)) | {"d": divisor}))
    assert fold.folded == {}
    assert builders.lines(fold.declined) == ["<Div -> a> not folded: division by zero"]
    assert builders.op_counts(model) == {"Div": 1, "Conv": 1}


@pytest.mark.parametrize(
    ("chain", "scale", "offset"),
    [
        pytest.param(
            "m1 = Mul (x, s)\n m2 = Add (m1, t)\n a = Mul (m2, u)",
            S3 * T3[::-1],
            T3 * T3[::-1],
            id="mul-add-mul",
        ),
        pytest.param(
            "m1 = Sub (t, x)\n m2 = Div (m1, s)\n a = Add (m2, u)",
            -1 / S3,
            T3 / S3 + T3[::-1],
            id="rsub-div-add",
        ),
    ],
)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_input_chain_of_three_composes_in_order(
    chain: str, scale: np.ndarray, offset: np.ndarray, padded: bool
) -> None:
    """The constants apply in graph order: (x·s + t)·u is x·(s·u) + t·u, not x·(s·u) + t."""
    pads = "<pads = [1, 1, 1, 1]> " if padded else ""
    size = 6 if padded else 4
    text = f"""
    g (float[1, 3, 6, 6] x) => (float[1, 4, {size}, {size}] y) {{
        {chain}
        y = Conv {pads}(a, w, b)
    }}
    """
    arrays = builders.normal_arrays(21, w=(4, 3, 3, 3), b=(4,))
    arrays |= {n: v.reshape(1, 3, 1, 1) for n, v in (("s", S3), ("t", T3), ("u", T3[::-1].copy()))}
    proto = builders.parse(text, arrays)
    model, fold = _fold(proto)
    assert fold.folded == {"Conv": 1} and fold.declined == []
    conv = _only(model, "Conv")
    weight, bias = _conv_fold(arrays["w"], arrays["b"], scale, None if padded else offset)
    np.testing.assert_allclose(_const(conv.inputs[1]), weight, rtol=1e-5)
    np.testing.assert_allclose(_const(conv.inputs[2]), bias, rtol=1e-5, atol=1e-5)
    if padded:
        assert builders.op_counts(model) == {"Add": 1, "Conv": 1}
        add = _only(model, "Add")
        _assert_reads(add, model.graph.inputs[0])
        np.testing.assert_allclose(_const(add.inputs[1]).reshape(-1), offset / scale, rtol=1e-5)
    else:
        assert builders.op_counts(model) == {"Conv": 1}
        _assert_reads(conv, model.graph.inputs[0])
    _assert_equivalent(proto, model)


HARD_SWISH = """
g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] {output}) {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    p = Add (c, three)
    r = Clip (p, zero, six)
    m = Mul (c, r)
    h = Div (m, six)
    {tail}
}}
"""


def _hard_swish_arrays() -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = builders.normal_arrays(
        22, w1=(4, 3, 3, 3), b1=(4,), w2=(4, 4, 1, 1), b2=(4,)
    )
    arrays["w1"] *= 2.0  # Conv outputs of a few units: both kinks of hard-swish (-3 and 3) are crossed
    return arrays | {name: np.array(v, np.float32) for name, v in (("three", 3), ("zero", 0), ("six", 6))}


def test_preprocess_folds_the_hard_swish_division_into_the_next_conv() -> None:
    """The ``/ 6`` of hard-swish goes into the 1x1 Conv that reads it; no HardSwish is made then."""
    text = HARD_SWISH.format(output="y", tail="y = Conv (h, w2, b2)")
    arrays = _hard_swish_arrays()
    proto = builders.parse(text, arrays)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert "HardSwish" not in summary.canonicalized
    assert summary.affine_folded == 1
    assert builders.op_counts(model) == {"Conv": 2, "Add": 1, "Clip": 1, "Mul": 1}
    mul = _only(model, "Mul")
    second = next(n for n in _nodes(model, "Conv") if n.outputs[0].name == "y")
    _assert_reads(second, mul.outputs[0])
    np.testing.assert_allclose(_const(second.inputs[1]), arrays["w2"] / 6, rtol=1e-6)
    np.testing.assert_array_equal(_const(second.inputs[2]), arrays["b2"])
    _assert_equivalent(proto, model)


def test_preprocess_makes_hard_swish_where_the_division_has_no_conv_to_go_to() -> None:
    text = HARD_SWISH.format(output="h", tail="")
    proto = builders.parse(text, _hard_swish_arrays())
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert summary.canonicalized == {"HardSwish": 1} and summary.affine_folded == 0
    assert builders.op_counts(model) == {"Conv": 1, "HardSwish": 1}
    _assert_equivalent(proto, model)


# Fixed problems of rule 4 (found by these tests)


@pytest.mark.parametrize(
    ("text", "shapes"),
    [
        pytest.param(
            """g (float[1, 3, 6, 6] x, float[4] bias) => (float[1, 4, 6, 6] y) {
                a = Add (x, t)
                y = Conv (a, w, bias)
            }""",
            {"w": (4, 3, 1, 1), "t": (3, 1, 1)},
            id="conv-bias-input",
        ),
        pytest.param(
            """g (float[2, 5] x, float[3] bias) => (float[2, 3] y) {
                a = Add (x, t)
                y = Gemm (a, w, bias)
            }""",
            {"w": (5, 3), "t": (5,)},
            id="gemm-c-input",
        ),
    ],
)
def test_input_offset_keeps_a_bias_that_is_not_a_constant(
    text: str, shapes: dict[str, tuple[int, ...]]
) -> None:
    proto = builders.parse(text, builders.normal_arrays(23, **shapes))
    model, _ = _fold(proto)
    bias = next(v for v in model.graph.inputs if v.name == "bias")
    assert bias.uses(), "the bias graph input is no longer read"
    _assert_equivalent(proto, model)


def test_input_row_constant_folds_into_a_gemm_when_the_shape_is_unknown() -> None:
    text = """
    g (float[2, 5] x) => (float[2, 3] y) {
        r = Relu (x)
        a = Mul (r, s)
        y = Gemm (a, w)
    }
    """
    proto = builders.parse(text, builders.normal_arrays(24, s=(1, 5), w=(5, 3)))
    model, fold = _fold(proto)
    assert fold.declined == [] and fold.folded == {"Gemm": 1}
    assert builders.op_counts(model) == {"Relu": 1, "Gemm": 1}
    _assert_equivalent(proto, model)
