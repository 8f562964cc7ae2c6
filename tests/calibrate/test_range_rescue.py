"""Range rescue: min-max ranges whose model loses much on the held-out calibration batches are replaced
by ``auto``'s; a model min-max serves well keeps them, byte for byte."""

from __future__ import annotations

from pathlib import Path

import builders
import numpy as np
import onnx
import pytest

import onnxq
from onnxq.config import CalibrationConfig, LatencyGuardConfig, QuantConfig
from onnxq.pipeline.range_rescue import (
    RESCUE_MIN_DB,
    RESCUE_MIN_TOP1_GAIN,
    RESCUE_TIES_DB,
    RESCUE_TOP1,
    clear_gain,
    large_loss,
)
from onnxq.report import LARGE_LOSS_SQNR_DB

NO_GUARD = LatencyGuardConfig(enabled=False)


def _config(rescue: bool = True) -> QuantConfig:
    # Calibrated ranges only: a MatMul's run-time ranges would make the calibrated ones moot.
    return QuantConfig(
        calibration=CalibrationConfig(range_rescue=rescue), latency_guard=NO_GUARD, run_time_ranges=False
    )


def _tail_model_and_data() -> tuple[
    onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]
]:
    """x → MatMul → y, x heavy-tailed with a one-off spike of 400 in two calibration batches: min-max
    keeps the spike in range and leaves the bulk a few levels (~9.5 dB held out), entropy clips it
    (~24 dB)."""
    proto = builders.parse(
        """
        tail (float[N, 32] x) => (float[N, 16] y) {
            y = MatMul (x, W)
        }
        """,
        builders.normal_arrays(0, W=(32, 16)),
    )

    def feeds(seed: int, count: int, spikes: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [{"x": builders.spiky_heavy_tailed(rng, spike=index in spikes)} for index in range(count)]

    return proto, feeds(1, 16, spikes=(0, 4)), feeds(2, 8)


def _sqnr(proto: onnx.ModelProto, model: object, feeds: list[dict[str, np.ndarray]]) -> float:
    want = np.concatenate([builders.run_disabled(proto, f)[0] for f in feeds])
    got = np.concatenate([builders.run_disabled(model, f)[0] for f in feeds])  # type: ignore[arg-type]
    return float(
        10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got).astype(np.float64) ** 2))
    )


def _rescue_notes(result: onnxq.QuantizationResult) -> list[str]:
    return [n for n in result.report.preprocess_notes if n.startswith("range rescue")]


def _checked(
    proto: onnx.ModelProto, calib: list[dict[str, np.ndarray]], held_out: list[dict[str, np.ndarray]]
) -> tuple[float, float, str, onnxq.QuantizationResult]:
    """Held-out SQNR without and with the check, the check's one note, and the checked result."""
    plain = onnxq.quantize(proto, calib, _config(rescue=False))
    rescued = onnxq.quantize(proto, calib, _config())
    assert not _rescue_notes(plain)
    (note,) = _rescue_notes(rescued)
    return _sqnr(proto, plain.model, held_out), _sqnr(proto, rescued.model, held_out), note, rescued


def test_a_large_loss_takes_autos_ranges() -> None:
    before, after, note, rescued = _checked(*_tail_model_and_data())
    # Measured: 9.5 dB with min-max, 24 dB with the entropy ranges auto picks. A check that never
    # fires, or an auto that kept min-max, stays near 9.5.
    assert before < LARGE_LOSS_SQNR_DB and after >= before + 10.0, (before, after)
    assert "auto's ranges taken" in note and "range method auto: entropy" in note, note
    # The written model says which ranges it has.
    assert rescued.static is not None and rescued.static.config.calibration.method == "entropy"
    assert rescued.report.scheme["calibration"] == "entropy (range rescue)"


def test_a_model_min_max_serves_well_is_left_alone(tmp_path: Path) -> None:
    """One Conv on Gaussian data (~40 dB): the check passes, the model is the min-max one byte for byte."""
    rng = np.random.default_rng(0)
    proto = builders.parse(
        """
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
        }
        """,
        {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)},
    )
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    checked = onnxq.quantize(proto, calib, _config())
    plain = onnxq.quantize(proto, calib, _config(rescue=False))
    assert not _rescue_notes(checked)
    # (the saved settings differ: range_rescue is recorded)
    graphs = [onnx.load(r.save(tmp_path / f"{i}.onnx")).graph for i, r in enumerate((checked, plain))]
    assert graphs[0].SerializeToString() == graphs[1].SerializeToString()


def test_one_calibration_batch_has_nothing_held_out() -> None:
    proto, calib, _ = _tail_model_and_data()
    result = onnxq.quantize(proto, calib[:1], _config())
    assert not _rescue_notes(result)
    assert result.static is not None and result.static.config.calibration.method == "minmax"


def test_other_methods_are_not_rescued() -> None:
    proto, calib, _ = _tail_model_and_data()
    config = _config().replace(calibration=CalibrationConfig(method="percentile"))
    result = onnxq.quantize(proto, calib, config)
    assert not _rescue_notes(result)
    assert result.static is not None and result.static.config.calibration.method == "percentile"


@pytest.mark.parametrize(
    ("score", "classes", "fires"),
    [
        ((1.0, LARGE_LOSS_SQNR_DB - 0.5), False, True),
        ((1.0, LARGE_LOSS_SQNR_DB + 0.5), False, False),
        ((1.0, float("nan")), False, False),
        ((1.0, float("inf")), False, False),
        ((RESCUE_TOP1 - 0.01, 40.0), True, True),
        ((RESCUE_TOP1, 40.0), True, False),
        # class outputs are judged by their decisions: a softmax's probabilities at 11 dB with 0.97 of
        # the decisions right (PP-OCRv4 rec, which min-max serves best) is not a large loss
        ((0.97, 11.0), True, False),
        # decisions that moved under an error of 0.3 %: ties in the float model (a random-weight
        # classifier's near-uniform softmax), which no range mends
        ((0.0, RESCUE_TIES_DB + 23.0), True, False),
        ((0.5, RESCUE_TIES_DB - 1.0), True, True),
        ((0.5, float("nan")), True, True),
    ],
)
def test_the_bounds(score: tuple[float, float], classes: bool, fires: bool) -> None:
    assert large_loss(score, classes) is fires


def test_only_a_clear_gain_replaces_min_max() -> None:
    minmax = (0.9, 10.0)
    assert clear_gain((0.9, 10.0 + RESCUE_MIN_DB), minmax, classes=False)
    assert not clear_gain((0.9, 10.0 + RESCUE_MIN_DB - 0.1), minmax, classes=False)
    assert clear_gain((0.9 + RESCUE_MIN_TOP1_GAIN, 0.0), minmax, classes=True)
    assert not clear_gain((0.9 + RESCUE_MIN_TOP1_GAIN / 2, 40.0), minmax, classes=True)


def test_the_cli_turns_it_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxq.cli import main

    proto, calib, _ = _tail_model_and_data()
    model = builders.save(proto, tmp_path / "tail.onnx")
    np.savez(tmp_path / "c.npz", x=np.concatenate([f["x"] for f in calib]))
    reports = {}
    for flag in ("--range-rescue", "--no-range-rescue"):
        out, report = tmp_path / f"{flag}.onnx", tmp_path / f"{flag}.json"
        argv = [
            "optimize",
            str(model),
            "-o",
            str(out),
            "--calib",
            str(tmp_path / "c.npz"),
            "--calib-batch",
            "64",
        ]
        argv += [
            "--no-run-time-ranges",
            "--no-latency-guard",
            "--runs",
            "2",
            "--report-json",
            str(report),
            flag,
        ]
        assert main([*argv, "--quiet"]) == 0
        reports[flag] = report.read_text()
        stderr = capsys.readouterr().err
        # Still a large loss either way (16 dB on the whole data); --method auto is suggested only
        # when the rescue has not run it already.
        assert "to recover it" in stderr
        assert ("--method auto" in stderr) is (flag == "--no-range-rescue"), stderr
    assert "range rescue" in reports["--range-rescue"]
    assert "range rescue" not in reports["--no-range-rescue"]


def test_a_failing_rescue_keeps_min_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rescue is an improvement on top of a working quantization: its failure costs the model nothing."""
    import onnxq.pipeline.static as static

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("session could not be created\nsecond line")

    monkeypatch.setattr(static, "rescue_ranges", broken)
    proto, calib, held_out = _tail_model_and_data()
    result = onnxq.quantize(proto, calib, _config())
    plain = onnxq.quantize(proto, calib, _config(rescue=False))
    assert (
        "range rescue skipped: RuntimeError: session could not be created" in result.report.preprocess_notes
    )
    assert _sqnr(proto, result.model, held_out) == _sqnr(proto, plain.model, held_out)


def test_the_held_out_batches_are_read_no_further_than_kept() -> None:
    """Every default quantization builds one: it must not load the whole calibration data into memory."""
    import onnx_ir as ir

    from onnxq.pipeline.range_choice import MAX_HELD_OUT, HeldOut

    proto, calib, _ = _tail_model_and_data()
    read: list[int] = []

    class Source:
        def __iter__(self):  # type: ignore[no-untyped-def]
            for index in range(100):
                read.append(index)
                yield calib[index % len(calib)]

    held = HeldOut(ir.from_proto(proto), Source(), ["CPUExecutionProvider"])  # type: ignore[arg-type]
    assert held.count == MAX_HELD_OUT and len(read) == 2 * MAX_HELD_OUT
    assert not held.classes  # a MatMul's outputs are no probability distribution


def test_the_histogram_pass_reads_only_the_batches_the_held_out_ones_alternate_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its cost is bounded however much calibration data there is."""
    import onnxq.pipeline.range_rescue as range_rescue
    from onnxq.pipeline.range_choice import MAX_HELD_OUT

    proto, calib, held_out = _tail_model_and_data()
    calib = calib + calib[1:4] * 8  # 40 batches, the spikes in the first 16
    passes: list[tuple[str, int | None]] = []
    original = range_rescue.collect_ranges

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append((args[4].method, args[3].num_samples))
        return original(*args, **kwargs)

    monkeypatch.setattr(range_rescue, "collect_ranges", counted)
    result = onnxq.quantize(proto, calib, _config())
    assert passes == [("auto", 2 * MAX_HELD_OUT)]
    (note,) = _rescue_notes(result)
    assert "auto's ranges taken" in note, note
    assert _sqnr(proto, result.model, held_out) > LARGE_LOSS_SQNR_DB


@pytest.mark.parametrize("narrowed_is_better", [True, False])
def test_the_check_keeps_narrowing_only_where_it_scores_at_least_as_well(narrowed_is_better: bool) -> None:
    """Given a rewrite without the saturating readers' narrowing, the check scores both on the held-out
    batches and keeps the better: here one is the float model itself, the other a model whose output is
    off by a tenth. The kept one's score is what the check judges (no rescue: 0.1 off is ~20 dB)."""
    import onnx_ir as ir

    from onnxq.calibrate.collect import CalibrationResult
    from onnxq.pipeline.range_rescue import rescue_ranges

    proto = builders.parse(
        "m (float[N, 4] x) => (float[N, 4] y) { y = MatMul (x, W) }", builders.normal_arrays(0, W=(4, 4))
    )
    model = ir.from_proto(proto)
    exact = ir.from_proto(proto)
    off = builders.parse(
        "m (float[N, 4] x) => (float[N, 4] y) { p = MatMul (x, W)\n y = Mul (p, k) }",
        {**builders.normal_arrays(0, W=(4, 4)), "k": np.array(1.1, np.float32)},
    )
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(4)]
    calibration = CalibrationResult(ranges={}, method="minmax", samples=4, runs=4, seconds=0.0, unobserved=())
    good, bad = (lambda ranges: exact), (lambda ranges: ir.from_proto(off))
    outcome = rescue_ranges(
        model,
        calibration,
        [],
        {},
        feeds,  # type: ignore[arg-type]  (iterated only)
        _config(),
        good if narrowed_is_better else bad,
        ["CPUExecutionProvider"],
        whole=bad if narrowed_is_better else good,
    )
    assert outcome is not None and outcome.narrowing is not None
    assert outcome.narrowed is narrowed_is_better
    assert outcome.minmax_score[1] > 100.0  # the kept model's (the float one's) score
    note = outcome.narrowing_note(3)
    assert note is not None and ("narrowed to" in note) and (("left whole" in note) is not narrowed_is_better)


def _mean_shift_model_and_data() -> tuple[
    onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]
]:
    """A 1×1 Conv on inputs of mean 3 and spread 0.1 whose weight rows sum to 0 and hold a ±1 pair: the
    pair sets each row's int8 scale, the small weights round by up to half of it, and those errors times
    the mean 3 shift the output by about a fifth of its spread (~14 dB). No range method moves a
    weight's rounding; the bias correction's ``ΔW·E[x]`` removes the shift."""
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.05, (8, 16)).astype(np.float32)
    w -= w.mean(axis=1, keepdims=True)
    w[:, 0] += 1.0
    w[:, 1] -= 1.0
    proto = builders.parse(
        """
        shift (float[N, 16, 8, 8] x) => (float[N, 8, 8, 8] y) {
            y = Conv (x, w, b)
        }
        """,
        {"w": w.reshape(8, 16, 1, 1), "b": np.zeros(8, np.float32)},
    )

    def feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
        gen = np.random.default_rng(seed)
        return [
            {"x": (3.0 + 0.1 * gen.standard_normal((1, 16, 8, 8))).astype(np.float32)} for _ in range(count)
        ]

    return proto, feeds(1, 16), feeds(2, 8)


def test_a_loss_no_range_mends_takes_the_bias_correction() -> None:
    before, after, note, rescued = _checked(*_mean_shift_model_and_data())
    # Measured: 13.7 → 28.1 dB. A candidate never tried, or scored on other ranges than kept, leaves
    # the shift (~14 dB).
    assert before < LARGE_LOSS_SQNR_DB and after >= before + 10.0, (before, after)
    assert "min-max kept" in note and "bias correction on top scored" in note and ", taken" in note, note
    assert rescued.static is not None and rescued.static.config.bias_correction


def test_the_bias_correction_is_not_tried_where_the_ranges_mend_the_loss() -> None:
    """The tail model: auto's ranges take it above the bound, so no float run is paid for the candidate."""
    proto, calib, _ = _tail_model_and_data()
    (note,) = _rescue_notes(onnxq.quantize(proto, calib, _config()))
    assert "auto's ranges taken" in note and "bias correction" not in note, note
