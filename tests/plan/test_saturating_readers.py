"""Saturating readers: which intervals the readers of a tensor can tell apart, and that narrowing a
quantized range to them is exact and buys precision where a hard-swish reads a wide negative tail."""

from __future__ import annotations

import math

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.config import CalibrationConfig, LatencyGuardConfig, QuantConfig
from onnxq.plan.saturating_readers import joint_range, narrowed_range, reader_bounds
from onnxq.qmath import compute_qparams
from onnxq.validate.layers import inspect_layers

ALL = (-math.inf, math.inf)


def _bounds(body: str, tensor: str = "x", **arrays: np.ndarray) -> tuple[float, float]:
    proto = builders.parse(body, arrays)
    model = ir.from_proto(proto)
    value = next(v for v in model.graph.inputs if v.name == tensor)
    return reader_bounds(value)


def _scalar(number: float) -> np.ndarray:
    return np.array(number, np.float32)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("r (float[4] x) => (float[4] y) { y = Relu (x) }", (0.0, math.inf)),
        ("h (float[4] x) => (float[4] y) { y = HardSwish (x) }", (-3.0, math.inf)),
        # HardSigmoid's defaults α = 0.2, β = 0.5: 0 below −2.5, 1 above 2.5.
        ("h (float[4] x) => (float[4] y) { y = HardSigmoid (x) }", (-2.5, 2.5)),
        ("c (float[4] x) => (float[4] y) { y = Clip (x, lo, hi) }", (-1.0, 2.0)),
        ("c (float[4] x) => (float[4] y) { y = Max (x, lo) }", (-1.0, math.inf)),
        ("c (float[4] x) => (float[4] y) { y = Min (hi, x) }", (-math.inf, 2.0)),
        # Two saturating readers: the union of what each tells apart.
        (
            "t (float[4] x) => (float[4] y, float[4] z) { y = Relu (x)\n z = Clip (x, lo, hi) }",
            (-1.0, math.inf),
        ),
        # Through a move and a shift: Relu(Reshape(x) + 1) cannot tell apart values below −1.
        (
            "m (float[4] x) => (float[2, 2] y) { r = Reshape (x, shape)\n a = Add (r, one)\n y = Relu (a) }",
            (-1.0, math.inf),
        ),
        # Hard-swish as Paddle writes it: x · Clip(x + 3, 0, 6) / 6.
        (
            (
                "p (float[4] x) => (float[4] y) { a = Add (x, three)\n k = Clip (a, zero, six)\n"
                " m = Mul (x, k)\n y = Div (m, six) }"
            ),
            (-3.0, math.inf),
        ),
        # Within 1.2e-7 of 0 or 1 beyond ±16: far below any 8-bit grid's step of their outputs.
        ("s (float[4] x) => (float[4] y) { y = Sigmoid (x) }", (-16.0, 16.0)),
        ("t (float[4] x) => (float[4] y) { y = Tanh (x) }", (-16.0, 16.0)),
        # SiLU / Swish: x · Sigmoid(x) is within 2e-6 of 0 below −16, and both its readers agree.
        ("w (float[4] x) => (float[4] y) { s = Sigmoid (x)\n y = Mul (x, s) }", (-16.0, math.inf)),
        ("w (float[4] x) => (float[4] y) { s = Sigmoid (x)\n y = Mul (s, x) }", (-16.0, math.inf)),
    ],
)
def test_saturating_readers_bound_the_values_they_tell_apart(
    body: str, expected: tuple[float, float]
) -> None:
    arrays = {
        "lo": _scalar(-1.0),
        "hi": _scalar(2.0),
        "one": _scalar(1.0),
        "three": _scalar(3.0),
        "zero": _scalar(0.0),
        "six": _scalar(6.0),
        "shape": np.array([2, 2], np.int64),
    }
    used = {k: v for k, v in arrays.items() if k in body}
    assert _bounds(body, **used) == pytest.approx(expected)


@pytest.mark.parametrize(
    "body",
    [
        # A reader that sees every value: nothing can be narrowed, however many readers saturate.
        "r (float[4] x) => (float[4] y, float[4] z) { y = Relu (x)\n z = Neg (x) }",
        # A graph output is read by the user.
        "r (float[4] x) => (float[4] x2, float[4] y) { x2 = Identity (x)\n y = Relu (x2) }",
        # A product with a tensor that is not the hard-swish gate of the same value.
        (
            "m (float[4] x, float[4] g) => (float[4] y) { a = Add (g, three)\n k = Clip (a, zero, six)\n"
            " y = Mul (x, k) }"
        ),
        # A product with the sigmoid of another tensor (a gate): x's large negative values still count.
        "g (float[4] x, float[4] g) => (float[4] y) { s = Sigmoid (g)\n y = Mul (x, s) }",
        # A log-sigmoid tells -20 from -16 (1e-7 against 2e-9): the sigmoid's tail is not flat for it.
        "l (float[4] x) => (float[4] y) { s = Sigmoid (x)\n y = Log (s) }",
        # A negative scaling flips the bounds' meaning: not followed.
        "n (float[4] x) => (float[4] y) { s = Mul (x, minus)\n y = Relu (s) }",
    ],
)
def test_a_reader_that_sees_every_value_keeps_the_whole_range(body: str) -> None:
    arrays = {"three": _scalar(3.0), "zero": _scalar(0.0), "six": _scalar(6.0), "minus": _scalar(-2.0)}
    assert _bounds(body, **{k: v for k, v in arrays.items() if k in body}) == ALL


def test_a_range_is_clipped_to_the_bounds_and_one_beyond_them_becomes_the_bound() -> None:
    proto = builders.parse(
        "r (float[4] x) => (float[4] y) { y = Clip (x, lo, hi) }", {"lo": _scalar(-1.0), "hi": _scalar(2.0)}
    )
    x = ir.from_proto(proto).graph.inputs[0]
    assert narrowed_range(x, -5.0, 7.0) == (-1.0, 2.0)
    assert narrowed_range(x, 0.5, 1.0) == (0.5, 1.0)
    assert narrowed_range(x, -5.0, -3.0) == (-1.0, -1.0)  # every value saturated: the reader sees -1
    assert narrowed_range(x, 3.0, 5.0) == (2.0, 2.0)


def test_each_value_is_narrowed_by_its_own_readers() -> None:
    """Two inputs of one model: the hard-swish-read one loses its negative tail; the other, read by a
    Neg and by a Concat that is a graph output, keeps every value (as a group member too: the group's
    range joins the members' narrowed ranges)."""
    proto = builders.parse(
        "g (float[4] a, float[4] b) => (float[8] y, float[4] n) { h = HardSwish (a)\n"
        " n = Neg (b)\n y = Concat <axis = 0> (h, b) }"
    )
    graph = ir.from_proto(proto).graph
    a, b = graph.inputs
    assert narrowed_range(a, -50.0, 4.0) == (-3.0, 4.0)
    assert narrowed_range(b, -2.0, 1.0) == (-2.0, 1.0)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_a_cut_end_lies_a_step_beyond_the_bound_so_the_grid_end_still_saturates(dtype: str) -> None:
    """The grid's end is the range's end rounded to a step: cut exactly at −3 it could land at −2.99,
    where hard-swish is not 0 (a constant over every saturated pixel). Narrowed to 0 (a Relu), no
    margin: 0 is on every grid."""
    proto = builders.parse(
        "g (float[4] a, float[4] b) => (float[4] y, float[4] z) { y = HardSwish (a)\n z = Relu (b) }"
    )
    a, b = ir.from_proto(proto).graph.inputs
    for high in (1.0, 7.3, 13.22, 40.41, 113.49):
        low, top = joint_range([(a, -50.0, high)])
        assert low < -3.0 and top == high
        params = compute_qparams(low, top, dtype, False)
        grid_low = (float(np.iinfo(dtype).min) - float(params.zero_point)) * float(params.scale)
        assert -3.0 - 2 * float(params.scale) <= grid_low <= -3.0, (high, grid_low)
    assert joint_range([(b, -5.0, 7.0)]) == (0.0, 7.0)
    # Members joined: the Relu-read member's negative values are left out, the other's kept.
    assert joint_range([(b, -5.0, 7.0), (a, -1.0, 2.0)]) == (-1.0, 7.0)


def _tail_cnn(activation: str) -> onnx.ModelProto:
    """Conv → ``activation`` (text turning ``c`` into ``h``) → Conv, the first Conv's output reaching −60
    on four channels (biases of −40, as a BatchNorm fold leaves them) while the rest stay within about
    ±4 (YOLOv8n's second Conv spans [−166, 165] before its SiLU)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.25).astype(np.float32)
    b1 = np.zeros(16, np.float32)
    b1[:4] = -40.0
    w2 = (rng.standard_normal((8, 16, 1, 1)) * 0.3).astype(np.float32)
    constants = {"three": _scalar(3.0), "zero": _scalar(0.0), "six": _scalar(6.0)}
    return builders.parse(
        f"""
        tail (float[1, 8, 16, 16] x) => (float[1, 8, 16, 16] y) {{
            c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            {activation}
            y = Conv (h, w2)
        }}
        """,
        {"w1": w1, "b1": b1, "w2": w2, **{k: v for k, v in constants.items() if k in activation}},
    )


#: Paddle's hard-swish, ``x · Clip(x + 3, 0, 6) / 6``, and SiLU as torch writes it.
HARD_SWISH = "a = Add (c, three)\n k = Clip (a, zero, six)\n m = Mul (c, k)\n h = Div (m, six)"
SILU = "s = Sigmoid (c)\n h = Mul (c, s)"


def _feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(count)]


def _sqnr(proto: onnx.ModelProto, model: object, feeds: list[dict[str, np.ndarray]]) -> float:
    want = np.concatenate([builders.run_disabled(proto, f)[0] for f in feeds]).astype(np.float64)
    got = np.concatenate([builders.run_disabled(model, f)[0] for f in feeds]).astype(np.float64)  # type: ignore[arg-type]
    return float(10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)))


CONFIG = QuantConfig(
    calibration=CalibrationConfig(range_rescue=False, narrow_to_readers=True),
    latency_guard=LatencyGuardConfig(enabled=False),
    input_bias_correction=False,
)


def _narrowed_and_whole(proto: onnx.ModelProto) -> tuple[ir.Model, ir.Model, float]:
    """The model quantized with narrowing and without, and how many dB narrowing gains held out."""
    calib, held_out = _feeds(1, 8), _feeds(2, 4)
    narrowed = onnxq.quantize(proto, calib, CONFIG).model
    whole_config = CONFIG.replace(calibration=CalibrationConfig(range_rescue=False, narrow_to_readers=False))
    whole = onnxq.quantize(proto, calib, whole_config).model
    return narrowed, whole, _sqnr(proto, narrowed, held_out) - _sqnr(proto, whole, held_out)


def test_a_hard_swish_input_is_quantized_over_what_the_hard_swish_tells_apart() -> None:
    proto = _tail_cnn(HARD_SWISH)
    narrowed, whole, gain = _narrowed_and_whole(proto)
    # The hard-swish input's uint8 range shrinks from about −48..8 to −3..8. Measured: output SQNR
    # 27.8 → 32.4 dB. A narrowing that did not happen, or that clipped values the gate still passes
    # (above −3), would not gain.
    assert gain > 3.0, gain

    # The written scale is the narrowed range's: its lower end a step or so below −3, never above.
    assert -3.1 < _grid_low(narrowed, "c") <= -3.0  # (a step is 0.043)

    # inspect compares the tensor as its readers see it (both models clipped at −3): no clipping in the
    # narrowed model, and its rounding error against the whole range's (measured 39.0 vs 31.5 dB).
    held_out = _feeds(2, 4)

    def row(model: object) -> object:
        (found,) = [
            r for r in inspect_layers(model, proto, held_out) if r.tensor == "c" and r.kind == "activation"
        ]
        return found

    mine, theirs = row(narrowed), row(whole)
    assert mine.clipped < 1e-3 and mine.observed_min < -30.0, mine  # type: ignore[attr-defined]
    assert mine.activation_sqnr_db > theirs.activation_sqnr_db + 5.0, (mine, theirs)  # type: ignore[attr-defined]


def test_a_silu_input_is_quantized_over_what_the_silu_tells_apart() -> None:
    narrowed, _, gain = _narrowed_and_whole(_tail_cnn(SILU))
    # The SiLU input's range shrinks from about −50..8 to −16..8, a grid 2× finer. A narrowing that did
    # not happen would not gain; one that clipped where SiLU still varies (above −16) would lose.
    assert gain > 3.0, gain
    assert -16.2 < _grid_low(narrowed, "c") <= -16.0  # a step (0.094) or so below the bound, never above


def _grid_low(model: ir.Model, tensor: str) -> float:
    """The lowest value on the grid the QuantizeLinear of ``tensor`` writes."""
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == tensor)
    return -int(q.inputs[2].const_value.numpy()) * float(q.inputs[1].const_value.numpy())


@pytest.mark.parametrize(
    ("narrow", "rescue", "narrowed"),
    [
        (None, True, True),  # the default: the held-out check ran and scored the narrowing better
        (None, False, False),  # no check: the whole ranges
        (True, False, True),  # asked for: narrowed unchecked
        (False, True, False),
    ],
)
def test_narrowing_by_default_is_what_the_held_out_check_keeps(
    narrow: bool | None, rescue: bool, narrowed: bool
) -> None:
    proto = _tail_cnn(SILU)
    config = QuantConfig(
        calibration=CalibrationConfig(range_rescue=rescue, narrow_to_readers=narrow),
        latency_guard=LatencyGuardConfig(enabled=False),
    )
    result = onnxq.quantize(proto, _feeds(1, 16), config)
    low = _grid_low(result.model, "c")
    assert (-17.0 < low < -16.0) if narrowed else (low < -30.0), low
    notes = [n for n in result.report.preprocess_notes if "readers tell apart" in n]
    assert len(notes) == (1 if rescue and narrow is not False else 0), notes


@pytest.mark.parametrize(
    ("argv", "expected"),
    [((), None), (("--narrow-to-readers",), True), (("--no-narrow-to-readers",), False)],
)
def test_the_command_line_turns_narrowing_off(argv: tuple[str, ...], expected: bool | None) -> None:
    from onnxq.cli import _config_from_args, build_parser, inapplicable_flags

    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", *argv])
    assert _config_from_args(args).calibration.narrow_to_readers is expected
    dynamic = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--mode", "dynamic", *argv])
    assert ("--[no-]narrow-to-readers" in inapplicable_flags(dynamic)) is (expected is not None)
