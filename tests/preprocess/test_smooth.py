"""Outlier smoothing: exact in float, a clear SQNR gain where activations have outlier channels, and
tensors it must not touch left alone."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.config import LatencyGuardConfig, QuantConfig
from onnxq.data import input_specs, load_feeds
from onnxq.graph import const_array
from onnxq.preprocess.smooth import SmoothSummary, find_candidates, smooth_outliers

NO_GUARD = LatencyGuardConfig(enabled=False)

# LayerNorm → two projections (pre-LN attention's Q/K), and a Gemm (transB) with bias → Relu → Gemm.
LN_AND_GEMM = """
block (float[2, 6, 16] x, float[8, 16] z) => (float[2, 6, 8] q, float[2, 6, 8] k, float[8, 8] g) {
    n = LayerNormalization <axis = -1> (x, gamma, beta)
    q = MatMul (n, Wq)
    k = MatMul (n, Wk)
    h = Gemm <transB = 1> (z, G1, c1)
    r = Relu (h)
    g = Gemm (r, G2)
}
"""


def _ln_gemm_model() -> onnx.ModelProto:
    arrays = builders.normal_arrays(3, Wq=(16, 8), Wk=(16, 8), G1=(16, 16), c1=(16,), G2=(16, 8))
    gamma = np.ones(16, np.float32)
    gamma[[2, 9]] = 40.0  # outlier channels, as LayerNorm's γ makes them in pretrained transformers
    beta = np.linspace(-0.5, 0.5, 16).astype(np.float32)
    arrays["G1"][[4, 11]] *= 30.0
    return builders.parse(LN_AND_GEMM, {**arrays, "gamma": gamma, "beta": beta})


def _feeds(proto: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    return builders.random_feeds(proto, count, seed=seed)


def _smoothed(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[ir.Model, SmoothSummary]:
    model = ir.from_proto(proto)
    summary = smooth_outliers(model, load_feeds(feeds, input_specs(model)), ("CPUExecutionProvider",))
    return model, summary


def _sqnr(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(expected**2) / max(float(np.sum((expected - actual) ** 2)), 1e-30)))


@pytest.mark.parametrize(
    "make", [lambda: builders.outlier_chain_model((1, 2, 3, 4, 5)), _ln_gemm_model], ids=["chain", "ln-gemm"]
)
def test_smoothing_is_exact_in_float(make: object) -> None:
    proto = make()  # type: ignore[operator]
    # (8 and 12 rows per sample, 32 samples read: at least MIN_ROWS)
    calib = builders.chain_feeds(64, seed=1) if "chain" in proto.graph.name else _feeds(proto, 64, seed=1)
    model, summary = _smoothed(proto, calib)
    assert summary.smoothed
    held_out = builders.chain_feeds(4, seed=9) if "chain" in proto.graph.name else _feeds(proto, 4, seed=9)
    for feed in held_out:
        for want, got in zip(
            builders.run_disabled(proto, feed), builders.run_disabled(model, feed), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_the_ln_and_gemm_producers_are_found() -> None:
    model = ir.from_proto(_ln_gemm_model())
    found = {c.value.name: c.producer.op_type for c in find_candidates(model)}
    assert found == {"n": "LayerNormalization", "r": "Gemm"}


def _sqnr_without_and_with(
    proto: onnx.ModelProto, calib: list[dict[str, np.ndarray]], held_out: list[dict[str, np.ndarray]]
) -> dict[bool, float]:
    """Held-out output SQNR of the model quantized without and with smoothing."""
    expected = np.concatenate([builders.run_disabled(proto, f)[0] for f in held_out])
    scores = {}
    for smooth in (False, True):
        result = onnxq.quantize(proto, calib, QuantConfig(smooth=smooth, latency_guard=NO_GUARD))
        actual = np.concatenate([builders.run_disabled(result.model, f)[0] for f in held_out])
        scores[smooth] = _sqnr(expected, actual)
    return scores


def test_smoothing_recovers_the_outlier_chain() -> None:
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    scores = _sqnr_without_and_with(proto, builders.chain_feeds(64, seed=1), builders.chain_feeds(8, seed=2))
    # Measured: 10.1 dB without, ~35 dB with; a pass that smooths nothing or the wrong way misses it.
    assert scores[True] >= scores[False] + 15.0


def test_dynamic_mode_smooths_when_data_is_given() -> None:
    """Run-time ranges have the outliers too: with data, dynamic mode smooths first; without, it cannot."""
    proto = builders.outlier_chain_model((1, 2, 3, 4, 5))
    calib, held_out = builders.chain_feeds(64, seed=1), builders.chain_feeds(8, seed=2)
    expected = np.concatenate([builders.run_disabled(proto, f)[0] for f in held_out])
    scores, notes = {}, {}
    for data in (None, calib):
        result = onnxq.quantize(proto, data, QuantConfig(mode="dynamic"))
        actual = np.concatenate([builders.run_disabled(result.model, f)[0] for f in held_out])
        scores[data is not None] = _sqnr(expected, actual)
        notes[data is not None] = [n for n in result.report.preprocess_notes if "smoothing" in n]
    assert notes[False] == [] and notes[True][0].startswith("outlier smoothing: 5 of 5")
    # Measured: 11.3 dB without, 36.5 dB with.
    assert scores[True] >= scores[False] + 12.0
    off = onnxq.quantize(proto, calib, QuantConfig(mode="dynamic", smooth=False))
    assert not [n for n in off.report.preprocess_notes if "smoothing" in n]


RESIDUAL = """
res (float[N, 16] x) => (float[N, 16] y) {
    n = LayerNormalization <axis = -1> (x, gamma, beta)
    m = MatMul (n, W)
    y = Add (m, n)
}
"""


def _residual_model() -> onnx.ModelProto:
    gamma = np.ones(16, np.float32)
    gamma[[3, 12]] = 40.0
    arrays = builders.normal_arrays(0, W=(16, 16), beta=(16,))
    return builders.parse(RESIDUAL, {**arrays, "gamma": gamma})


def test_a_tensor_with_another_reader_is_divided_in_front() -> None:
    """n also feeds a residual Add (post-LN BERT): LayerNorm cannot take 1/s without changing y, so a
    Mul by 1/s goes in front of the MatMul only; the Add still reads n, and y is unchanged."""
    model = ir.from_proto(_residual_model())
    (candidate,) = find_candidates(model)
    assert candidate.value.name == "n" and candidate.producer is None
    calib = [{"x": np.random.default_rng(i).standard_normal((16, 16)).astype(np.float32)} for i in range(32)]
    smoothed, summary = _smoothed(_residual_model(), calib)
    assert summary.smoothed and summary.divided_in_front == 1
    assert "through a Mul by 1/s" in summary.describe()
    (mul,) = [n for n in smoothed.graph if n.op_type == "Mul"]
    add = next(n for n in smoothed.graph if n.op_type == "Add")
    matmul = next(n for n in smoothed.graph if n.op_type == "MatMul")
    assert matmul.inputs[0] is mul.outputs[0] and add.inputs[1] is mul.inputs[0]
    feed = {"x": np.random.default_rng(99).standard_normal((5, 16)).astype(np.float32)}
    (want,) = builders.run_disabled(_residual_model(), feed)
    (got,) = builders.run_disabled(smoothed, feed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_dividing_in_front_recovers_the_residual_model() -> None:
    calib = [{"x": np.random.default_rng(i).standard_normal((16, 16)).astype(np.float32)} for i in range(32)]
    held_out = [
        {"x": np.random.default_rng(100 + i).standard_normal((16, 16)).astype(np.float32)} for i in range(8)
    ]
    scores = _sqnr_without_and_with(_residual_model(), calib, held_out)
    assert scores[True] >= scores[False] + 6.0, scores


def test_a_shared_weight_is_left_alone() -> None:
    text = """
    shared (float[N, 16] x, float[N, 16] z) => (float[N, 16] y, float[N, 16] w) {
        h = MatMul (x, W0)
        r = Relu (h)
        y = MatMul (r, W1)
        w = MatMul (z, W1)
    }
    """
    arrays = builders.normal_arrays(0, W0=(16, 16), W1=(16, 16))
    assert find_candidates(ir.from_proto(builders.parse(text, arrays))) == []


def test_without_outliers_it_does_no_harm() -> None:
    """Only a clear drop of the simulated error moves a tensor; the model is no worse for it."""
    proto = builders.outlier_chain_model(())
    calib, held_out = builders.chain_feeds(64, seed=1), builders.chain_feeds(8, seed=2)
    model, _ = _smoothed(proto, calib)
    expected = np.concatenate([builders.run_disabled(proto, f)[0] for f in held_out])
    scores = []
    for source in (proto, ir.to_proto(model)):
        result = onnxq.quantize(source, calib, QuantConfig(latency_guard=NO_GUARD, run_time_ranges=False))
        scores.append(
            _sqnr(expected, np.concatenate([builders.run_disabled(result.model, f)[0] for f in held_out]))
        )
    assert scores[1] >= scores[0] - 0.5


def test_too_little_calibration_data_skips_it() -> None:
    """8 samples x 8 rows: a min-max range of equalized channels would clip unseen data (measured
    30 -> 22 dB on held-out data), so nothing is smoothed and the note says why."""
    _, summary = _smoothed(builders.outlier_chain_model((3,)), builders.chain_feeds(8, seed=1))
    assert summary.smoothed == {}
    assert summary.too_few_rows == summary.candidates > 0
    assert "skipped" in summary.describe() and "256 rows" in summary.describe()


def test_the_cli_flag_turns_it_on(tmp_path: Path) -> None:
    from onnxq.cli import main

    model = builders.save(builders.outlier_chain_model((3,)), tmp_path / "chain.onnx")
    data = tmp_path / "chain.npz"
    np.savez(data, x=np.stack([f["x"] for f in builders.chain_feeds(64, seed=1)]))
    report = tmp_path / "r.json"
    argv = ["optimize", model, "-o", tmp_path / "o.onnx", "--calib", data, "--smooth", "--runs", "2"]
    assert main([str(a) for a in [*argv, "--report-json", report]]) == 0
    notes = json.loads(report.read_text())["preprocess_notes"]
    assert any(note.startswith("outlier smoothing: 5 of 5") for note in notes)
    assert json.loads(report.read_text())["settings"]["smooth"] is True


def test_it_is_on_by_default_and_no_smooth_turns_it_off(tmp_path: Path) -> None:
    from onnxq.cli import main

    model = builders.save(_residual_model(), tmp_path / "res.onnx")
    data = tmp_path / "res.npz"
    rows = [np.random.default_rng(i).standard_normal((16, 16)).astype(np.float32) for i in range(32)]
    np.savez(data, x=np.stack(rows))
    settings = {}
    for flag in ((), ("--no-smooth",)):
        report = tmp_path / f"r{len(flag)}.json"
        argv = [
            "optimize",
            model,
            "-o",
            tmp_path / f"o{len(flag)}.onnx",
            "--calib",
            data,
            "--runs",
            "2",
            *flag,
        ]
        assert main([str(a) for a in [*argv, "--report-json", report, "--calib-batch", "1"]]) == 0
        saved = json.loads(report.read_text())
        settings[flag] = (
            saved["settings"]["smooth"],
            any("through a Mul" in n for n in saved["preprocess_notes"]),
        )
    assert settings == {(): (True, True), ("--no-smooth",): (False, False)}


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_the_divided_tensor_runs_in_both_formats(fmt: str) -> None:
    calib = [{"x": np.random.default_rng(i).standard_normal((16, 16)).astype(np.float32)} for i in range(32)]
    held_out = [
        {"x": np.random.default_rng(200 + i).standard_normal((16, 16)).astype(np.float32)} for i in range(4)
    ]
    proto = _residual_model()
    result = onnxq.quantize(proto, calib, QuantConfig(format=fmt, latency_guard=NO_GUARD))  # type: ignore[arg-type]
    assert any(n.op_type == "Mul" for n in result.model.graph)
    expected = np.concatenate([builders.run_disabled(proto, f)[0] for f in held_out])
    actual = np.concatenate([builders.run_disabled(result.model, f)[0] for f in held_out])
    assert _sqnr(expected, actual) >= 25.0


def test_a_classifier_head_is_no_candidate_and_leaves_no_note() -> None:
    """One row per sample (a CNN's pooled features → Gemm) is not a tensor to smooth: no statistics run,
    no note on every CNN now that smoothing is on by default."""
    text = """
    cls (float[1, 4, 8, 8] x) => (float[1, 10] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W)
        r = Relu (c)
        p = GlobalAveragePool (r)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, G, b)
    }
    """
    proto = builders.parse(text, builders.normal_arrays(0, W=(16, 4, 3, 3), G=(10, 16), b=(10,)))
    feeds = builders.random_feeds(proto, 16, seed=1)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))  # (the pipeline infers shapes first)
    summary = smooth_outliers(model, load_feeds(feeds, input_specs(model)), ("CPUExecutionProvider",))
    assert summary.candidates == 0 and summary.smoothed == {}
    result = onnxq.quantize(proto, feeds, QuantConfig(latency_guard=NO_GUARD))
    assert not [n for n in result.report.preprocess_notes if "smoothing" in n]


def test_a_tensor_read_inside_a_branch_is_left_alone() -> None:
    """A product inside an If body reads the LayerNorm output: no Mul can go in front of it from the
    main graph, so the tensor is no candidate (and nothing fails)."""
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["n", "W"], ["b"])],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, None)],
    )
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["n"], ["e"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)],
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
            onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 16]),
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
            onnx.numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
            onnx.numpy_helper.from_array(np.eye(16, dtype=np.float32), "W"),
        ],
    )
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    assert find_candidates(model) == []


# --- Feature maps: Conv readers (channels on axis 1) ------------------------------------------------

SEPARABLE = """
sep (float[1, 3, 16, 16] x) => (float[1, 4, 16, 16] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1, b1)
    r = Relu (c)
    d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (r, W2, b2)
    y = Conv <kernel_shape = [1, 1]> (d, W3, b3)
}
"""


def _separable_model(spread: bool = True) -> onnx.ModelProto:
    """Conv → Relu → depthwise Conv → 1×1 Conv, channels of ``r`` and ``d`` 100× apart when ``spread``.

    Each spread channel's weights are divided as much where it is read, so the float function
    weights every channel alike; per-tensor quantization of ``r`` and ``d`` does not.
    """
    arrays = builders.normal_arrays(
        4, W1=(8, 3, 3, 3), b1=(8,), W2=(8, 1, 3, 3), b2=(8,), W3=(4, 8, 1, 1), b3=(4,)
    )
    if spread:
        arrays["W1"][[0, 5]] *= 100.0
        arrays["b1"][[0, 5]] *= 100.0
        arrays["W2"][[0, 5]] /= 100.0
        arrays["W2"][[2, 6]] *= 100.0  # d's channels 2 and 6 are 100× the rest ...
        arrays["b2"][[2, 6]] *= 100.0
        arrays["W3"][:, [2, 6]] /= 100.0  # ... and read back down
    return builders.parse(SEPARABLE, arrays)


def _conv_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def test_conv_maps_fold_into_the_producing_conv() -> None:
    """``r`` (through the Relu) and ``d`` take ``1/s`` in the Conv that makes them: nothing is added."""
    proto = _separable_model()
    model = ir.from_proto(proto)
    found = {
        c.value.name: (c.producer.op_type if c.producer else None, c.axis) for c in find_candidates(model)
    }
    assert found == {"r": ("Conv", 1), "d": ("Conv", 1)}
    smoothed, summary = _smoothed(proto, _conv_feeds(8, seed=1))
    assert set(summary.smoothed) == {"r", "d"} and summary.divided_in_front == 0
    assert [n.op_type for n in smoothed.graph] == ["Conv", "Relu", "Conv", "Conv"]
    for feed in _conv_feeds(3, seed=9):
        (want,) = builders.run_disabled(proto, feed)
        (got,) = builders.run_disabled(smoothed, feed)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_smoothing_conv_maps_recovers_the_spread_block() -> None:
    """Measured: 3.5 dB without smoothing, 29.8 dB with it (the unspread block: 36.4 dB)."""
    scores = _sqnr_without_and_with(_separable_model(), _conv_feeds(8, seed=1), _conv_feeds(4, seed=2))
    assert scores[True] >= scores[False] + 15.0 and scores[True] >= 25.0, scores


def test_feature_maps_can_be_left_alone() -> None:
    """Dynamic mode without --dynamic-conv keeps Convs float: their inputs are no candidates then."""
    counts = {}
    for maps in (False, True):
        model = ir.from_proto(_separable_model())
        feeds = load_feeds(_conv_feeds(8, seed=1), input_specs(model))
        counts[maps] = smooth_outliers(model, feeds, ("CPUExecutionProvider",), feature_maps=maps).candidates
    assert counts[False] == 0 < counts[True]


HARD_SWISH_DEPTHWISE = """
hsw (float[1, 8, 16, 16] x) => (float[1, 4, 16, 16] y) {
    h = HardSwish (x)
    d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (h, W2, b2)
    y = Conv <kernel_shape = [1, 1]> (d, W3, b3)
}
"""

#: Input channel scales of the hard-swish model: two channels 30× the rest.
_HSW_SCALES = np.array([30.0, 1.0, 1.0, 1.0, 30.0, 1.0, 1.0, 1.0], np.float32)


def _hard_swish_model() -> onnx.ModelProto:
    """A depthwise Conv reads a hard-swish of channels 30× apart, its weights dividing them back."""
    arrays = builders.normal_arrays(5, W2=(8, 1, 3, 3), b2=(8,), W3=(4, 8, 1, 1), b3=(4,))
    arrays["W2"] /= _HSW_SCALES.reshape(-1, 1, 1, 1)
    return builders.parse(HARD_SWISH_DEPTHWISE, arrays)


def _hsw_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scales = _HSW_SCALES.reshape(1, -1, 1, 1)
    return [
        {"x": (rng.standard_normal((1, 8, 16, 16)) * 2 * scales).astype(np.float32)} for _ in range(count)
    ]


def test_a_depthwise_input_from_a_hard_swish_is_divided_in_front_only_on_request() -> None:
    model = ir.from_proto(_hard_swish_model())
    assert [c.value.name for c in find_candidates(model)] == ["d"]  # h's producer takes no 1/s
    candidate, _ = find_candidates(model, depthwise_inputs=True)
    assert candidate.value.name == "h" and candidate.producer is None and candidate.depthwise_only
    model = ir.from_proto(_hard_swish_model())
    summary = smooth_outliers(
        model,
        load_feeds(_hsw_feeds(8, seed=1), input_specs(model)),
        ("CPUExecutionProvider",),
        products=False,
        depthwise_inputs=True,
    )
    assert list(summary.smoothed) == ["h"] and summary.divided_in_front == 1
    (mul,) = [n for n in model.graph if n.op_type == "Mul"]
    assert const_array(mul.inputs[1]).shape == (8, 1, 1)
    for feed in _hsw_feeds(3, seed=9):
        (want,) = builders.run_disabled(_hard_swish_model(), feed)
        (got,) = builders.run_disabled(model, feed)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_equalizing_depthwise_inputs_recovers_the_hard_swish_model() -> None:
    """Measured: 17.2 dB without, 32.4 dB with the divisor Mul in front of the depthwise Conv (the
    hard-swish's small channels kept their own steps)."""
    proto = _hard_swish_model()
    calib, held_out = _hsw_feeds(8, seed=1), _hsw_feeds(4, seed=2)
    expected = np.concatenate([builders.run_disabled(proto, f)[0] for f in held_out])
    scores = {}
    for flag in (False, True):
        config = QuantConfig(equalize_depthwise_inputs=flag, latency_guard=NO_GUARD)
        result = onnxq.quantize(proto, calib, config)
        actual = np.concatenate([builders.run_disabled(result.model, f)[0] for f in held_out])
        scores[flag] = _sqnr(expected, actual)
        muls = [n for n in result.model.graph if n.op_type == "Mul" and "smooth" in (n.name or "")]
        assert len(muls) == int(flag)
    assert scores[True] >= scores[False] + 8.0, scores


def test_the_depthwise_input_flag_and_the_target_fix() -> None:
    """``--equalize-depthwise-inputs`` sets the option; the ``--target`` search's fix of the same name
    adds the divisor to a default quantization, and the fix is among the costly ones (tried last)."""
    from onnxq.cli import _config_from_args, build_parser
    from onnxq.tuning.interfaces import COSTLY_FIXES, FIXES

    for flags, expected in (((), False), (("--equalize-depthwise-inputs",), True)):
        args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--calib", "random", *flags])
        assert _config_from_args(args).equalize_depthwise_inputs is expected
    assert FIXES[-1] == "equalize_depthwise_inputs" and "equalize_depthwise_inputs" in COSTLY_FIXES
    proto = _hard_swish_model()
    result = onnxq.quantize(proto, _hsw_feeds(8, seed=1), QuantConfig(latency_guard=NO_GUARD))
    assert result.static is not None
    fixed = result.static.with_fix("equalize_depthwise_inputs")
    assert fixed.config.equalize_depthwise_inputs
    held_out = _hsw_feeds(4, seed=2)
    expected = np.concatenate([builders.run_disabled(proto, f)[0] for f in held_out])
    scores = [
        _sqnr(expected, np.concatenate([builders.run_disabled(model, f)[0] for f in held_out]))
        for model in (result.model, fixed.requantize())
    ]
    assert scores[1] >= scores[0] + 8.0, scores


@pytest.mark.parametrize("free_fix_meets", [True, False])
def test_the_target_search_adds_the_divisor_only_while_no_free_fix_met_the_target(
    free_fix_meets: bool,
) -> None:
    from onnxq.tuning.budget import meet_target
    from onnxq.tuning.targets import CustomTarget

    seen: list[bytes] = []  # the first model scored is the quantization the search starts from

    def score(model: ir.Model) -> float:
        divided = any("smooth" in (n.name or "") for n in model.graph)
        data = builders.serialize(model)
        seen.append(data)
        return float(divided or (free_fix_meets and data != seen[0]))

    proto = _hard_swish_model()
    feeds = _hsw_feeds(8, seed=1)
    result = onnxq.quantize(proto, feeds, QuantConfig(latency_guard=NO_GUARD))
    outcome = meet_target(
        result, CustomTarget(score, 0.5), feeds, fixes=("bias_correction", "equalize_depthwise_inputs")
    )
    assert outcome.met and not outcome.kept_float
    if free_fix_meets:
        assert outcome.fix == "bias_correction" and "equalize_depthwise_inputs" not in outcome.fixes
    else:
        assert outcome.fix == "equalize_depthwise_inputs"


def test_statistics_in_several_passes_give_the_same_smoothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidate tensors beyond the output budget are observed in further passes: same result."""
    from onnxq.preprocess import smooth

    feeds = _conv_feeds(8, seed=1)
    model_once, once = _smoothed(_separable_model(), feeds)
    monkeypatch.setattr(smooth, "OUTPUT_BYTES", 1)  # every candidate in a pass of its own
    assert (
        len(smooth._output_groups([(c, 256) for c in find_candidates(ir.from_proto(_separable_model()))]))
        == 2
    )
    model_split, split = _smoothed(_separable_model(), feeds)
    assert once.smoothed == split.smoothed and len(once.smoothed) == 2
    assert builders.serialize(model_once) == builders.serialize(model_split)


@pytest.mark.parametrize(
    ("spatial", "kernel"), [((32,), [3]), ((6, 6, 6), [3, 3, 3])], ids=["conv1d", "conv3d"]
)
def test_conv_maps_of_other_ranks_are_smoothed_exactly(spatial: tuple[int, ...], kernel: list[int]) -> None:
    """1-D and 3-D convolutions (audio, video) read their channels on axis 1 too.

    Measured: 10.4 → 34.4 dB (1-D), 9.0 → 33.4 dB (3-D), through a LeakyRelu.
    """
    dims = ", ".join(str(d) for d in spatial)
    pads = ", ".join(["1"] * (2 * len(spatial)))
    ks = ", ".join(str(k) for k in kernel)
    text = f"""
    n (float[1, 3, {dims}] x) => (float[1, 4, {dims}] y) {{
        c = Conv <kernel_shape = [{ks}], pads = [{pads}]> (x, W1, b1)
        r = LeakyRelu <alpha = 0.1> (c)
        d = Conv <kernel_shape = [{ks}], pads = [{pads}], group = 6> (r, W2)
        y = Conv <kernel_shape = [{", ".join(["1"] * len(spatial))}]> (d, W3)
    }}
    """
    arrays = builders.normal_arrays(
        6, W1=(6, 3, *kernel), b1=(6,), W2=(6, 1, *kernel), W3=(4, 6, *[1] * len(spatial))
    )
    arrays["W1"][[1, 4]] *= 50.0
    arrays["b1"][[1, 4]] *= 50.0
    arrays["W2"][[1, 4]] /= 50.0
    proto = builders.parse(text, arrays)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 3, *spatial)).astype(np.float32)} for _ in range(8)]
    model, summary = _smoothed(proto, feeds)
    assert "r" in summary.smoothed
    for feed in feeds[:2]:
        (want,) = builders.run_disabled(proto, feed)
        (got,) = builders.run_disabled(model, feed)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    scores = _sqnr_without_and_with(proto, feeds, feeds[:2])
    assert scores[True] >= scores[False] + 15.0, scores


def test_the_sizes_of_symbolic_maps_are_measured_by_a_shapes_only_run() -> None:
    """With dynamic height and width (and an unnamed dim after the Conv, as exporters leave them), the
    statistics pass learns each map's rows from one run that returns only shapes."""
    from onnxq.preprocess import smooth

    proto = _separable_model()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    for value in list(proto.graph.output):
        value.type.tensor_type.shape.dim[2].dim_param = "H"
        value.type.tensor_type.shape.dim[3].dim_param = "W"
    model = ir.from_proto(proto)
    candidates = find_candidates(model)
    assert [smooth._rows_per_feed(c, {}) for c in candidates] == [None, None]
    feed = {"x": np.zeros((1, 3, 12, 20), np.float32)}
    rows = smooth._probed_rows(model, candidates, feed, ("CPUExecutionProvider",))
    assert rows == {"r": 12 * 20, "d": 12 * 20}
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Conv", "Conv"]  # the model is untouched


def test_an_overridable_weight_is_no_reader() -> None:
    """An initializer also listed as a graph input can be replaced at run time: not a constant, so
    the depthwise Conv whose weight it is neither takes ``s`` (``r`` is no candidate) nor ``1/s``
    (``d``, the map it makes, is none either)."""
    proto = _separable_model()
    w2 = next(t for t in proto.graph.initializer if t.name == "W2")
    proto.graph.input.append(onnx.helper.make_tensor_value_info("W2", onnx.TensorProto.FLOAT, list(w2.dims)))
    assert find_candidates(ir.from_proto(proto)) == []


WIDE_READERS = """
wide (float[2, 6, 16] x, float[5, 16] z) => (float[2, 6, 300] y, float[5, 300] g) {
    n = LayerNormalization <axis = -1> (x, gamma, beta)
    y = MatMul (n, W)
    h = Gemm <transB = 1> (z, G1, c1)
    r = Relu (h)
    g = Gemm <transB = 1> (r, G2)
}
"""


def test_strengths_are_scored_on_the_strongest_output_channels() -> None:
    """A reader with more than SCORED_OUTPUTS output channels is scored on its strongest ones: each
    rounds as in the whole weight (per-channel scales), and their products are the full ones' columns."""
    from onnxq.preprocess import smooth

    arrays = builders.normal_arrays(5, W=(16, 300), G1=(16, 16), c1=(16,), G2=(300, 16))
    arrays["W"][:, [7, 250]] *= 20.0  # two massive output channels
    arrays["G2"][[3, 299]] *= 20.0
    gamma, beta = np.ones(16, np.float32), np.zeros(16, np.float32)
    model = ir.from_proto(builders.parse(WIDE_READERS, {**arrays, "gamma": gamma, "beta": beta}))
    readers = [r for c in find_candidates(model) for r in c.readers]
    assert sorted(r.kind for r in readers) == ["columns", "rows"]
    rng = np.random.default_rng(0)
    s = rng.uniform(0.5, 2.0, 16)
    for reader, massive in zip(sorted(readers, key=lambda r: r.kind), ({3, 299}, {7, 250}), strict=True):
        rows = rng.standard_normal((40, 16)).astype(np.float32)
        full = reader.products(rows, reader.weight())
        energy = np.square(full.astype(np.float64)).sum(axis=0)  # one product column per output channel
        kept = np.sort(np.argsort(-energy)[:32])
        assert massive <= set(kept.tolist())
        probe, exact = reader.probe(full, 32)
        axis = reader.output_axis
        np.testing.assert_array_equal(probe.weight(), np.take(reader.weight(), kept, axis=axis))
        np.testing.assert_array_equal(exact, full[:, kept])
        np.testing.assert_array_equal(probe.rounded(s), np.take(reader.rounded(s), kept, axis=axis))
        assert reader.probe(full, smooth.SCORED_OUTPUTS + 300)[0] is reader  # narrow enough: whole
