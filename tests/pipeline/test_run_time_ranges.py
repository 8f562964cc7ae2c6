"""Run-time ranges in static mode (``QuantConfig.run_time_ranges``, on by default; ``--no-run-time-ranges``).

The MatMul/Gemm with a constant weight quantize their input from its own range on each run
(``DynamicQuantizeMatMul``); everything else keeps its calibrated Q/DQ. The test model's samples differ
in scale by a factor of 400 (as sentences of different lengths and contents give a transformer
different activation ranges): one calibrated range must hold the largest sample, so the small ones
are rounded on a grid far too coarse for them, while a run-time range fits each sample.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import normal_arrays, parse

import onnxq
from onnxq.cli import _config_from_args, build_parser, inapplicable_flags
from onnxq.config import LatencyGuardConfig
from onnxq.tuning import CustomTarget
from onnxq.tuning.sensitivity import estimate_sensitivity

NO_GUARD = LatencyGuardConfig(enabled=False)
PRODUCTS = ("node_MatMul_0", "node_Gemm_2")


def _model() -> object:
    """``x[N,64]`` → MatMul → Tanh → Gemm (bias) → ``y``; ``z`` = the product of ``r`` with itself
    (two activations, no weight: it keeps calibrated Q/DQ). Tanh is a float op between the products
    (a Relu would keep the first product's integer output integer: the Gemm would stay calibrated)."""
    text = """
    mlp (float[N, 64] x) => (float[N, 32] y, float[N, N] z) {
        h = MatMul (x, W0)
        r = Tanh (h)
        y = Gemm <transB = 1> (r, W1, B1)
        rt = Transpose <perm = [1, 0]> (r)
        z = MatMul (r, rt)
    }
    """
    arrays = normal_arrays(0, W0=(64, 64), W1=(32, 64), B1=(32,))
    arrays = {k: (v / 8.0).astype(np.float32) for k, v in arrays.items()}
    proto = parse(text, arrays)
    for node, name in zip(proto.graph.node, (PRODUCTS[0], "tanh_1", PRODUCTS[1], "t_3", "z_mm"), strict=True):
        node.name = name
    return proto


def _feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(20.0), count))
    return [{"x": (s * rng.standard_normal((4, 64))).astype(np.float32)} for s in scales]


def _per_sample_sqnr(float_model: object, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[float]:
    """SQNR of each feed's output ``y`` against the float model's (dB)."""
    reference = ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    quantized = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    out = []
    for feed in feeds:
        want = reference.run(["y"], feed)[0]
        got = quantized.run(["y"], feed)[0]
        out.append(float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2))))
    return out


def _op_counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def test_products_quantize_their_input_at_run_time_and_small_samples_recover() -> None:
    proto = _model()
    calib, held_out = _feeds(1, 16), _feeds(2, 12)
    calibrated = onnxq.QuantConfig(latency_guard=NO_GUARD, run_time_ranges=False)
    static = onnxq.quantize(proto, calib, calibrated, show_progress=False)
    run_time = onnxq.quantize(proto, calib, onnxq.QuantConfig(latency_guard=NO_GUARD), show_progress=False)

    ops = _op_counts(run_time.model)
    # Both weighted products run as int8 with run-time input ranges; no static Q on their inputs.
    assert ops["DynamicQuantizeMatMul"] == 2, ops
    assert not any(n.op_type == "MatMul" and n.name in PRODUCTS for n in run_time.model.graph)
    readers = {n.name: n for n in run_time.model.graph}
    for node in run_time.model.graph:
        if node.op_type == "DynamicQuantizeMatMul":
            assert node.inputs[1] is not None and node.inputs[1].const_value is not None
            assert node.inputs[1].const_value.dtype == ir.DataType.INT8
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            assert producer is None or producer.op_type != "DequantizeLinear"
    # The product of two activations (no weight) keeps its calibrated Q/DQ.
    assert readers["z_mm"].op_type == "MatMul" and ops["QuantizeLinear"] > 0
    assert run_time.static is not None
    assert set(PRODUCTS) <= set(run_time.static.quantized_nodes)
    report = run_time.report
    assert report.quantized_op_types.get("Gemm") == 1 and report.quantized_op_types.get("MatMul") == 2
    assert not any("excluded by configuration" in str(d) for d in report.declines)
    assert any("run-time ranges: 2 MatMul/Gemm" in note for note in report.preprocess_notes)

    before = _per_sample_sqnr(proto, static.model, held_out)
    after = _per_sample_sqnr(proto, run_time.model, held_out)
    # A calibrated range leaves the smallest samples a few grid steps (measured: worst ~8 dB); a
    # run-time range fits each one (measured: worst ~31 dB). A rewrite that did not happen, or that
    # kept the calibrated scale, stays near the static figure.
    assert min(after) >= min(before) + 12.0, (min(before), min(after))
    assert min(after) >= 25.0


def test_kept_float_products_stay_float_and_qoperator_form_runs() -> None:
    proto = _model()
    calib = _feeds(1, 8)
    config = onnxq.QuantConfig(run_time_ranges=True, latency_guard=NO_GUARD)
    result = onnxq.quantize(proto, calib, config, show_progress=False)
    assert result.static is not None
    kept = result.static.requantize(keep_float=["node_Gemm_2"])
    ops = _op_counts(kept)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["Gemm"] == 1
    counts = result.static.counts(keep_float=["node_Gemm_2"])
    quantized, floating = counts.quantized, counts.floating
    assert quantized.get("Gemm") is None and floating.get("Gemm") == 1 and quantized.get("MatMul") == 2
    assert counts.run_time == 1

    qoperator = onnxq.quantize(proto, calib, config.replace(format="qoperator"), show_progress=False)
    assert _op_counts(qoperator.model)["DynamicQuantizeMatMul"] == 2
    assert min(_per_sample_sqnr(proto, qoperator.model, _feeds(3, 6))) >= 25.0


def test_a_model_of_weighted_products_only_is_quantized() -> None:
    """Every anchor quantized at run time leaves the static plan empty: still something to quantize."""
    proto = parse(
        "one (float[N, 64] x) => (float[N, 64] y) { y = MatMul (x, W) }", normal_arrays(0, W=(64, 64))
    )
    config = onnxq.QuantConfig(run_time_ranges=True, latency_guard=NO_GUARD)
    result = onnxq.quantize(proto, _feeds(1, 4), config, show_progress=False)
    assert _op_counts(result.model) == {"DynamicQuantizeMatMul": 1}
    assert min(_per_sample_sqnr(proto, result.model, _feeds(2, 4))) >= 25.0


def test_the_target_search_tries_run_time_ranges_when_no_free_fix_meets_it() -> None:
    proto = _model()
    config = onnxq.QuantConfig(latency_guard=NO_GUARD, run_time_ranges=False)
    result = onnxq.quantize(proto, _feeds(1, 16), config, show_progress=False)
    held_out = _feeds(2, 12)
    # The built-in metrics pool the samples (the large ones dominate); the small samples' loss shows in
    # the worst sample's SQNR, the user's own metric here.
    worst = CustomTarget(lambda model: min(_per_sample_sqnr(proto, model, held_out)), 25.0, "worst_sqnr")
    outcome = result.meet_target(worst, held_out)
    assert outcome.met and outcome.kept_float == [], outcome.summary()
    assert "run_time_ranges" in outcome.fix.split("+"), outcome.fixes
    assert result.static is not None and result.static.config.run_time_ranges
    assert _op_counts(result.model)["DynamicQuantizeMatMul"] == 2
    # The report says so: the first plan had no run-time line, the chosen fix has two products.
    from onnxq.pipeline.static import run_time_note

    assert run_time_note(2) in result.report.preprocess_notes


@pytest.mark.parametrize(
    ("argv", "expected"), [([], True), (["--run-time-ranges"], True), (["--no-run-time-ranges"], False)]
)
def test_the_cli_flag(argv: list[str], expected: bool) -> None:
    assert onnxq.QuantConfig().run_time_ranges  # the default
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", *argv])
    assert _config_from_args(args).run_time_ranges is expected
    dynamic = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--mode", "dynamic", *argv])
    # Turning it off in dynamic mode changes nothing there: said on stderr.
    assert ("--no-run-time-ranges" in inapplicable_flags(dynamic)) is not expected


def test_the_sensitivity_estimate_sees_run_time_products() -> None:
    """The layer search ranks run-time products too: their float twin reads the same input, with the
    bias the rewrite folded in (MatMul → Add becomes one DynamicQuantizeMatMul under the Add's name)."""
    text = """
    mlp (float[N, 64] x) => (float[N, 32] y) {
        h = MatMul (x, W0)
        hb = Add (h, B0)
        r = Relu (hb)
        y = Gemm <transB = 1> (r, W1, B1)
    }
    """
    arrays = {
        k: (v / 8.0).astype(np.float32)
        for k, v in normal_arrays(0, W0=(64, 64), B0=(64,), W1=(32, 64), B1=(32,)).items()
    }
    arrays["B0"] = (arrays["B0"] * 40.0).astype(np.float32)  # a bias that a twin without it would miss
    proto = parse(text, arrays)
    config = onnxq.QuantConfig(run_time_ranges=True, latency_guard=NO_GUARD)
    result = onnxq.quantize(proto, _feeds(1, 8), config, show_progress=False)
    assert result.static is not None and _op_counts(result.model)["DynamicQuantizeMatMul"] == 2
    estimates = estimate_sensitivity(result.static, result.model, _feeds(2, 6))
    anchors = result.static.quantized_nodes
    assert len(anchors) == 2 and set(estimates) == set(anchors)
    # int8 adds noise ~35-45 dB below each output; a twin missing the bias, or reading another
    # tensor, would put it near 0 dB.
    assert all(-60.0 < estimates[name] < -25.0 for name in anchors), estimates


MASKED = """
masked (float[1, 8, 16] x, bool[1, 8, 1] keep) => (float[1, 8, 16] y) {
    filled = Where (keep, x, fill)
    y = MatMul (filled, W)
}
"""


def test_a_product_reading_a_sentinel_stays_float() -> None:
    """A run-time range over a tensor filled with -1e9 would round every real value to zero: the
    calibration sees the sentinel in the product's input (observed for the calibrated alternative)
    and keeps the product float, as it does a calibrated one."""
    arrays = {**normal_arrays(0, W=(16, 16)), "fill": np.array(-1e9, np.float32)}
    proto = parse(MASKED, arrays)
    rng = np.random.default_rng(0)
    keep = np.ones((1, 8, 1), bool)
    keep[:, 6:] = False
    feeds = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32), "keep": keep} for _ in range(8)]
    with pytest.raises(onnxq.OnnxqError, match="nothing to quantize"):
        onnxq.quantize(proto, feeds, onnxq.QuantConfig(latency_guard=NO_GUARD), show_progress=False)


INTEGER_CHAIN = """
head (float[1, 3, 16, 16] x, float[1, 8, 32] t) => (float[1, 10] y, float[1, 8, 16] u) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, K)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    g = Gemm <transB = 1> (f, W1, B1)
    gr = Relu (g)
    y = Gemm <transB = 1> (gr, W2, B2)
    n = LayerNormalization <axis = -1> (t, S, O)
    u = MatMul (n, W3)
}
"""


def test_products_fed_by_an_integer_chain_keep_calibrated_ranges() -> None:
    """A CNN's fully connected layers (Conv → Relu → pool → Flatten → Gemm → Relu → Gemm) run kernel
    to kernel in int8 on calibrated ranges; the product after a LayerNormalization (a float op) takes
    its range at run time."""
    from onnxq.rewrite.dynamic_quant import run_time_products

    arrays = normal_arrays(0, K=(8, 3, 3, 3), W1=(16, 8), B1=(16,), W2=(10, 16), B2=(10,), W3=(32, 16))
    arrays |= {"S": np.ones(32, np.float32), "O": np.zeros(32, np.float32)}
    proto = parse(INTEGER_CHAIN, arrays)
    model = ir.from_proto(proto)
    names = {n.outputs[0].name: n.name for n in model.graph}
    assert run_time_products(model, onnxq.QuantConfig()) == (names["u"],)
    assert run_time_products(model, onnxq.QuantConfig(run_time_ranges=False)) == ()
    rng = np.random.default_rng(0)
    feeds = [
        {
            "x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32),
            "t": rng.standard_normal((1, 8, 32)).astype(np.float32),
        }
        for _ in range(8)
    ]
    result = onnxq.quantize(proto, feeds, onnxq.QuantConfig(latency_guard=NO_GUARD), show_progress=False)
    ops = _op_counts(result.model)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["Gemm"] == 2  # the Gemms read DequantizeLinear
    assert (
        result.report.quantized_op_types.get("Gemm") == 2
        and result.report.quantized_op_types.get("MatMul") == 1
    )


def test_another_provider_keeps_calibrated_products() -> None:
    """DynamicQuantizeMatMul has CPU kernels only: quantizing for CUDA keeps the Q/DQ form."""
    from onnxq.pipeline.entry import for_providers

    config = onnxq.QuantConfig()
    assert for_providers(config, ("CPUExecutionProvider",)).run_time_ranges
    assert not for_providers(config, ("CUDAExecutionProvider", "CPUExecutionProvider")).run_time_ranges
    off = onnxq.QuantConfig(run_time_ranges=False)
    assert for_providers(off, ("CPUExecutionProvider",)) is off


def test_the_report_line_counts_what_the_latency_guard_left_at_run_time() -> None:
    """A guard that keeps products float (or the whole model) leaves fewer run-time products: the
    report's line follows, and goes when none is left."""
    from onnxq.pipeline.static import run_time_note, with_run_time_note

    result = onnxq.quantize(
        _model(), _feeds(1, 8), onnxq.QuantConfig(latency_guard=NO_GUARD), show_progress=False
    )
    state = result.static
    assert state is not None
    notes = ["smoothing: …", run_time_note(2)]
    assert run_time_note(2) in result.report.preprocess_notes
    assert with_run_time_note(notes, state.counts().run_time) == notes
    state.config = state.config.replace(exclude_nodes=(PRODUCTS[1],))
    assert with_run_time_note(notes, state.counts().run_time) == ["smoothing: …", run_time_note(1)]
    state.config = state.config.replace(exclude_nodes=PRODUCTS)
    assert with_run_time_note(notes, state.counts().run_time) == ["smoothing: …"]
