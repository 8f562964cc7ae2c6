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

from onnxq.preprocess import preprocess
from onnxq.preprocess.fold_affine import FoldAffinePass

RNG_SEED = 3


def _fold(proto: onnx.ModelProto) -> tuple[ir.Model, FoldAffinePass]:
    model = ir.from_proto(proto)
    fold = FoldAffinePass()
    fold(model)
    onnx.checker.check_model(ir.to_proto(model))
    return model, fold


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
