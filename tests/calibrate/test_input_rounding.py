"""Input bias correction: the mean error an input's rounding adds to a layer's output is removed.

The test model's first Conv makes one wide channel (it sets the per-tensor step of the map) and seven
narrow ones around offsets that sit between grid points: their values always round to the same grid
point, a constant error per channel that the depthwise Conv after them multiplies by its kernel's sum.
"""

from __future__ import annotations

from collections.abc import Callable

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.calibrate.input_rounding import MAX_BATCHES, MIN_ROWS, InputRounding
from onnxq.cli import _config_from_args, build_parser
from onnxq.config import LatencyGuardConfig, QuantConfig
from onnxq.data import input_specs, load_feeds
from onnxq.plan.planner import BiasTask
from onnxq.qmath import compute_qparams, dequantize, quantize
from onnxq.runtime.session import open_model
from onnxq.tuning import CustomTarget

NO_GUARD = LatencyGuardConfig(enabled=False)

NARROW = """
narrow (float[1, 8, 16, 16] x) => (float[1, 8, 16, 16] y) {
    [mix] h = Conv <kernel_shape = [1, 1]> (x, W1, B1)
    [dw] y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (h, Wd, Bd)
}
"""

#: The same narrow features as rows of a Gemm (tokens): its input holds 64 rows per sample.
TOKENS = """
tokens (float[64, 8] x) => (float[64, 6] g) {
    [lin] h = Gemm <transB = 1> (x, W1, B1)
    [fc] g = Gemm <transB = 1> (h, W2, B2)
}
"""

GAINS = np.array([10.0] + [0.001] * 7, np.float32)  # narrow: (nearly) constant channels
# offsets a third of a step or so off the grid (the step is ~ 80 / 255)
OFFSETS = np.array([0.0, 0.41, 0.73, 1.05, 1.37, -0.41, -0.73, 2.2], np.float32)


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return builders.parse(
        NARROW,
        {
            "W1": (np.eye(8, dtype=np.float32) * GAINS[:, None])[:, :, None, None],
            "B1": OFFSETS,
            "Wd": (1.0 + rng.normal(0, 0.1, (8, 1, 3, 3))).astype(np.float32),
            "Bd": np.zeros(8, np.float32),
        },
    )


def _tokens_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return builders.parse(
        TOKENS,
        {
            "W1": np.eye(8, dtype=np.float32) * GAINS[:, None],
            "B1": OFFSETS,
            "W2": (1.0 + rng.normal(0, 0.3, (6, 8))).astype(np.float32),
            "B2": np.zeros(6, np.float32),
        },
    )


def _feeds(proto: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    return builders.random_feeds(proto, count, seed)


def _quantize(proto: onnx.ModelProto, correct: bool) -> onnxq.QuantizationResult:
    # Calibrated ranges for the Gemm's input too (by default a product quantizes its input at run time).
    config = QuantConfig(
        latency_guard=NO_GUARD, smooth=False, input_bias_correction=correct, run_time_ranges=False
    )
    return onnxq.quantize(proto, _feeds(proto, 16, seed=1), config, show_progress=False)


def _layer_output(model: ir.Model | onnx.ModelProto, layer: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The float output of node ``layer``, before the QuantizeLinear that follows it in a QDQ model
    (the output's own rounding is the next layer's input rounding)."""
    model = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model.clone()
    node = next(n for n in model.graph if n.name == layer)
    session = open_model(model, outputs=[node.outputs[0]], opt_level="disable")
    return np.asarray(session.run([node.outputs[0].name or ""], feed)[0])


def _channel_shift(proto: onnx.ModelProto, model: ir.Model, layer: str) -> float:
    """Mean over channels of |mean error per channel| of ``layer``'s output on held-out feeds (the
    shift, not the noise)."""
    errors = []
    for feed in _feeds(proto, 8, seed=2):
        error = _layer_output(model, layer, feed) - _layer_output(proto, layer, feed)
        errors.append(np.moveaxis(error, 1, 0).reshape(error.shape[1], -1))
    return float(np.abs(np.concatenate(errors, axis=1).mean(axis=1)).mean())


def _sqnr(proto: onnx.ModelProto, model: ir.Model) -> float:
    """The model output's SQNR (dB) against float over the held-out feeds, pooled."""
    feeds = _feeds(proto, 8, seed=2)
    want = np.concatenate([builders.run_disabled(proto, f)[0].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([builders.run_disabled(model, f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(10 * np.log10((want**2).sum() / ((got - want) ** 2).sum()))


@pytest.mark.parametrize(("make", "layer", "bound"), [(_model, "dw", 0.05), (_tokens_model, "fc", 0.35)])
def test_the_mean_shift_of_narrow_channels_is_removed(
    make: Callable[[], onnx.ModelProto], layer: str, bound: float
) -> None:
    proto = make()
    before, after = _quantize(proto, False), _quantize(proto, True)
    shift_before = _channel_shift(proto, before.model, layer)
    shift_after = _channel_shift(proto, after.model, layer)
    # Measured: depthwise 0.47 -> 0.004, Gemm 0.031 -> 0.008 (what is left there is the wide channel's
    # rounding noise on the held-out rows). A sign error doubles the shift, the kernel's sum in place of
    # the taps that read inside the map leaves the borders' share (~0.09 of it), a skipped layer all.
    assert shift_after <= bound * shift_before, (shift_before, shift_after)
    notes = [n for n in after.report.preprocess_notes if n.startswith("input bias correction")]
    assert notes == [
        "input bias correction: 2 quantized layers' biases absorb their input's mean rounding error"
    ]
    assert not any(n.startswith("input bias correction") for n in before.report.preprocess_notes)
    assert _sqnr(proto, after.model) >= _sqnr(proto, before.model)


def test_only_biases_change_and_the_output_is_deterministic() -> None:
    proto = _model()
    plain, corrected = _quantize(proto, False).model, _quantize(proto, True).model
    assert [n.op_type for n in plain.graph] == [n.op_type for n in corrected.graph]
    changed = {
        name
        for name, value in corrected.graph.initializers.items()
        if not np.array_equal(value.const_value.numpy(), plain.graph.initializers[name].const_value.numpy())  # type: ignore[union-attr]
    }
    assert changed and all(name.startswith(("B1", "Bd")) for name in changed), changed
    assert builders.serialize(corrected) == builders.serialize(_quantize(proto, True).model)


def test_a_layer_kept_float_keeps_its_bias_and_variants_reuse_the_shifts() -> None:
    """The correction is the quantized model's: a layer the guard or a target keeps float computes the
    input's function; variants with the same ranges run nothing new."""
    proto = _model()
    result = _quantize(proto, True)
    state = result.static
    assert state is not None and state.rounding is not None
    runs = state.rounding.runs
    assert runs > 0
    variant = state.requantize(keep_float=["mix"])
    assert state.rounding.runs == runs
    mix = next(n for n in variant.graph if n.name == "mix")
    np.testing.assert_array_equal(mix.inputs[2].const_value.numpy(), OFFSETS)  # type: ignore[union-attr]
    # dw still reads the rounded map: still corrected.
    assert _channel_shift(proto, variant, "dw") <= 0.05 * _channel_shift(
        proto, _quantize(proto, False).model, "dw"
    )
    # A fix that changes the float model measures anew.
    assert state.with_fix("equalize").rounding is not state.rounding


@pytest.mark.parametrize(
    ("attributes", "shape", "group"),
    [
        ("kernel_shape = [3, 3], pads = [1, 1, 1, 1]", (2, 4, 9, 7), 1),
        ("kernel_shape = [3, 3], pads = [1, 1, 1, 1]", (1, 4, 8, 8), 4),
        ("kernel_shape = [5, 5], pads = [2, 2, 2, 2], strides = [2, 2]", (1, 4, 15, 14), 4),
        ("kernel_shape = [3, 3], pads = [0, 1, 2, 0], dilations = [2, 1]", (1, 4, 9, 9), 1),
        ('kernel_shape = [3, 3], strides = [2, 2], auto_pad = "SAME_UPPER"', (1, 4, 12, 13), 1),
        ('kernel_shape = [4, 4], strides = [2, 2], auto_pad = "SAME_LOWER"', (1, 4, 13, 12), 2),
        ("kernel_shape = [1, 1], strides = [2, 2]", (1, 4, 13, 13), 1),
        ("kernel_shape = [3], pads = [1, 1]", (2, 4, 20), 1),
    ],
)
def test_the_shift_is_the_mean_output_of_the_layer_on_the_rounding_error(
    attributes: str, shape: tuple[int, ...], group: int
) -> None:
    """Each row's shift is the layer's output (no bias) on ``DQ(Q(x)) - x`` averaged over its
    positions, border positions included (their taps that read padding add nothing), for a rounding
    error alike at every position of a channel (a narrow channel's: what the correction is for)."""
    kernel = [int(k) for k in attributes.split("]")[0].split("[")[1].split(",")]
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 1, (8, shape[1] // group, *kernel)).astype(np.float32)
    dims = ", ".join(str(d) for d in shape)
    out = "N, C, H, W"[: 3 * (len(shape) - 1) + 1].rstrip(", ")
    conv = f"Conv <{attributes}, group = {group}>"
    text = f"c (float[{dims}] x) => (float[{out}] y) {{ [conv] y = {conv} (x, W, B) }}"
    proto = builders.parse(text, {"W": weight, "B": np.zeros(8, np.float32)})
    # one value per sample and channel, off the grid by a different amount each
    feeds = [
        {
            "x": np.broadcast_to(rng.uniform(-1, 2, shape[:2] + (1,) * (len(shape) - 2)), shape).astype(
                np.float32
            )
        }
        for _ in range(MAX_BATCHES + 2)
    ]
    params = compute_qparams(-1.5, 2.5, "uint8", symmetric=False)
    unbiased = builders.parse(text.replace(", B)", ")"), {"W": weight})
    want = np.concatenate(
        [
            builders.run_disabled(unbiased, {"x": dequantize(quantize(f["x"], params), params) - f["x"]})[0]
            .reshape(shape[0], 8, -1)
            .mean(axis=2)
            for f in feeds[:MAX_BATCHES]
        ]
    )
    model = ir.from_proto(proto)
    node = next(iter(model.graph))
    rounding = InputRounding(load_feeds(feeds, input_specs(model)), ("CPUExecutionProvider",))
    task = BiasTask(node, 2, node.inputs[0], 1)  # type: ignore[arg-type]
    rows = rounding.row_shifts(model, [task], [params])[0]
    assert rows is not None and rows.shape == (MAX_BATCHES * shape[0], 8)
    np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-5)
    assert rounding.runs == MAX_BATCHES and len(list(model.graph)) == 1  # the probes are gone again


def test_only_shifts_that_stand_out_of_their_sampling_noise_are_kept() -> None:
    """Per channel: a shift the same on every sample is kept; one that is sampling noise (a wide
    channel's rounding on a 1x1 map: one position per sample) is not; too few rows give none."""
    proto = builders.parse(
        "p (float[1, 2, 1, 1] x) => (float[1, 2, 1, 1] y) {"
        " [conv] y = Conv <kernel_shape = [1, 1]> (x, W, B) }",
        {"W": np.eye(2, dtype=np.float32)[:, :, None, None], "B": np.zeros(2, np.float32)},
    )
    model = ir.from_proto(proto)
    node = next(iter(model.graph))
    rng = np.random.default_rng(5)
    params = compute_qparams(-3.0, 3.0, "uint8", symmetric=False)  # step 6/255
    # channel 0 wide (noise), channel 1 constant at a third of a step off the grid
    samples = [
        np.array([rng.normal(0, 1), 0.5 + 2.0 / 255], np.float32).reshape(1, 2, 1, 1) for _ in range(8)
    ]
    task = BiasTask(node, 2, node.inputs[0], 1)  # type: ignore[arg-type]
    for count, expected in ((8, True), (MIN_ROWS - 1, False)):
        feeds = load_feeds([{"x": x} for x in samples[:count]], input_specs(model))
        shift = InputRounding(feeds, ("CPUExecutionProvider",))._measure(model, [task], [params])[0]
        if not expected:
            assert shift is None
            continue
        assert shift is not None
        value = samples[0][0, 1:2, 0, 0]
        want = float((dequantize(quantize(value, params), params) - value)[0])
        assert shift[0] == 0.0 and shift[1] == pytest.approx(want, rel=1e-4) and abs(want) > 0.005


def test_the_target_search_tries_it_when_it_was_turned_off() -> None:
    proto = _model()
    result = _quantize(proto, False)
    shift = _channel_shift(proto, result.model, "dw")
    target = CustomTarget(lambda model: -_channel_shift(proto, model, "dw"), -0.05 * shift, "minus_dw_shift")
    outcome = result.meet_target(target, _feeds(proto, 8, seed=2))
    assert outcome.met and outcome.kept_float == [], outcome.summary()
    # Scored alone, every layer int8, it meets the target (smoothing does too here: it widens the
    # narrow channels for their depthwise reader).
    assert outcome.fixes["input_bias_correction"] >= -0.05 * shift, outcome.fixes


def test_a_failing_measuring_run_leaves_the_biases_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The correction refines a quantization: a run ONNX Runtime refuses costs it, not the model."""
    import onnxq.calibrate.input_rounding as input_rounding
    from onnxq.runtime.session import SessionError

    def refuse(*args: object, **kwargs: object) -> None:
        raise SessionError("onnxruntime: refused", "refused")

    monkeypatch.setattr(input_rounding, "open_model", refuse)
    proto = _model()
    result = _quantize(proto, True)
    assert not any(n.startswith("input bias correction") for n in result.report.preprocess_notes)
    assert builders.serialize(result.model) == builders.serialize(_quantize(proto, False).model)


@pytest.mark.parametrize(("argv", "expected"), [([], True), (["--no-input-bias-correction"], False)])
def test_the_cli_flag(argv: list[str], expected: bool) -> None:
    assert QuantConfig().input_bias_correction  # the default
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", *argv])
    assert _config_from_args(args).input_bias_correction is expected
