"""Range method ``auto``: every method's range from one histogram, exact merging of the two halves, a
choice by held-out output error that beats the methods it chooses from where they differ, and a
per-tensor refinement that beats every uniform method where two tensors want different ones."""

from __future__ import annotations

from typing import Any

import builders
import numpy as np
import pytest

import onnxq
from onnxq.calibrate.observers import AutoObserver, make_observer
from onnxq.config import AUTO_METHODS, CalibrationConfig, LatencyGuardConfig, QuantConfig
from onnxq.pipeline.range_choice import PER_TENSOR, _channel_sqnr_db, _score

NO_GUARD = LatencyGuardConfig(enabled=False)


def _batches(seed: int, count: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((4, 256)).astype(np.float32) * (1 + i) for i in range(count)]
    batches[2][0, :3] = [40.0, -35.0, 0.0]  # a rare outlier, and an exact zero
    return batches


@pytest.mark.parametrize(("dtype", "symmetric"), [("uint8", False), ("int8", True)])
def test_each_candidate_equals_its_own_method(dtype: str, symmetric: bool) -> None:
    auto = AutoObserver(dtype, symmetric=symmetric)
    singles = {
        m: make_observer(CalibrationConfig(method=m), dtype=dtype, symmetric=symmetric)  # type: ignore[arg-type]
        for m in AUTO_METHODS
    }
    for batch in _batches(0):
        auto.update(batch)
        for observer in singles.values():
            observer.update(batch)
    candidates = auto.candidate_ranges()
    assert set(candidates) == set(AUTO_METHODS)
    for method, observer in singles.items():
        assert candidates[method] == observer.compute_range(), method
    # The methods really differ on this data (a test on identical ranges could not fail).
    assert len(set(candidates.values())) >= 3


@pytest.mark.parametrize(
    "first",
    [
        [np.zeros((2, 8), np.float32)],  # only zeros before the other half's values
        [np.full((2, 8), 1e-3, np.float32)],  # a much narrower histogram than the other half
        [np.full((2, 8), 1e3, np.float32), np.zeros((1, 4), np.float32)],  # a much wider one
    ],
    ids=["zeros", "narrow", "wide"],
)
def test_merging_the_halves_is_exact(first: list[np.ndarray]) -> None:
    second = _batches(1, count=3)
    one = AutoObserver()
    for batch in [*first, *second]:
        one.update(batch)
    a, b = AutoObserver(), AutoObserver()
    for batch in first:
        a.update(batch)
    for batch in second:
        b.update(batch)
    a.merge(b)
    counts_one, edges_one = one.histogram()
    counts_two, edges_two = a.histogram()
    np.testing.assert_array_equal(counts_one, counts_two)
    np.testing.assert_array_equal(edges_one, edges_two)
    assert a.candidate_ranges() == one.candidate_ranges()


def _tail_model_and_data() -> tuple[object, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """x → MatMul → y, x heavy-tailed, with a one-off spike of 400 in two calibration batches (both in
    the half the ranges are fitted on; the held-out half and the evaluation data have none): min-max,
    percentile 99.999 and MSE keep the spike in range and leave the bulk a few levels, entropy clips it."""
    text = """
    tail (float[N, 32] x) => (float[N, 16] y) {
        y = MatMul (x, W)
    }
    """
    proto = builders.parse(text, builders.normal_arrays(0, W=(32, 16)))

    def feeds(seed: int, count: int, spikes: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [{"x": builders.spiky_heavy_tailed(rng, spike=index in spikes)} for index in range(count)]

    return proto, feeds(1, 16, spikes=(0, 4)), feeds(2, 8)


def _worst_sqnr(proto: object, model: object, feeds: list[dict[str, np.ndarray]]) -> float:
    """The lowest SQNR (dB) over the model's outputs, every feed pooled per output."""
    want = [builders.run_disabled(proto, f) for f in feeds]  # type: ignore[arg-type]
    got = [builders.run_disabled(model, f) for f in feeds]  # type: ignore[arg-type]
    worst = np.inf
    for output in range(len(want[0])):
        w = np.concatenate([outputs[output] for outputs in want])
        g = np.concatenate([outputs[output] for outputs in got])
        worst = min(worst, float(10 * np.log10(np.sum(w**2) / np.sum((w - g) ** 2))))
    return worst


def _uniform_and_auto(
    proto: object, calib: list[dict[str, np.ndarray]], held_out: list[dict[str, np.ndarray]]
) -> tuple[dict[str, float], Any, str]:
    """Each uniform method's held-out worst-output SQNR, the ``auto`` result and its report note."""
    scores = {}
    for method in AUTO_METHODS:
        config = QuantConfig(
            calibration=CalibrationConfig(method=method, range_rescue=False),  # type: ignore[arg-type]
            latency_guard=NO_GUARD,
            run_time_ranges=False,
        )  # type: ignore[arg-type]
        scores[method] = _worst_sqnr(proto, onnxq.quantize(proto, calib, config).model, held_out)
    config = QuantConfig(
        calibration=CalibrationConfig(method="auto"), latency_guard=NO_GUARD, run_time_ranges=False
    )
    result = onnxq.quantize(proto, calib, config)
    (note,) = [n for n in result.report.preprocess_notes if n.startswith("range method auto")]
    return scores, result, note


def test_auto_keeps_the_method_that_does_best_on_held_out_data() -> None:
    proto, calib, held_out = _tail_model_and_data()
    scores, result, note = _uniform_and_auto(proto, calib, held_out)
    chosen = note.split(": ", 1)[1].split(" ", 1)[0]
    assert chosen in AUTO_METHODS and "8 held-out" in note
    auto = _worst_sqnr(proto, result.model, held_out)
    # Measured: min-max, percentile and MSE ~9.5 dB, entropy 24 dB; auto picks entropy (a chooser
    # that kept min-max, or any one fixed method but entropy, would fail).
    assert auto >= max(scores.values()) - 1.0 and auto >= scores["minmax"] + 10.0, (scores, auto)
    assert result.static is not None and result.static.config.calibration.method == chosen


def test_auto_mixes_methods_where_tensors_want_different_ones() -> None:
    proto, calib, held_out = builders.two_branch_model_and_data()
    uniform, result, note = _uniform_and_auto(proto, calib, held_out)
    assert note.startswith(f"range method auto: {PER_TENSOR}") and "1 entropy" in note, note
    # Measured: the best uniform method (entropy) 20.1 dB on its worse output, the mix 23.0 dB (entropy
    # on a, MSE or min-max on b). A chooser limited to one method per model cannot pass this bound.
    auto = _worst_sqnr(proto, result.model, held_out)
    assert auto >= max(uniform.values()) + 2.0, (uniform, auto)
    # No single method made the ranges: the configuration stays "auto".
    assert result.static is not None and result.static.config.calibration.method == "auto"


def test_channel_sqnr_is_the_typical_channels() -> None:
    rng = np.random.default_rng(0)
    want = rng.standard_normal((2, 5, 64)).astype(np.float32)
    want[:, 0] *= 1000.0  # large boxes beside small scores, as in a YOLO head
    got = want.copy()
    got[:, 1:] += 0.3 * rng.standard_normal((2, 4, 64)).astype(np.float32)  # the small channels are noisy
    error = (want - got).astype(np.float64)
    plain = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum(error**2))
    per_channel = _channel_sqnr_db([want[:1], want[1:]], [got[:1], got[1:]])
    # The box channel alone would give ~70 dB; the typical (small) channel is ~10 dB.
    assert plain > 60.0 and 5.0 < per_channel < 15.0, (plain, per_channel)
    assert _channel_sqnr_db([want], [want.copy()]) == np.inf  # an exact copy
    # Batches whose axis 1 differs (a recognizer's time steps): the whole output's SQNR.
    short, short_got = want[:, :, :32], got[:, :, :32]
    mixed = _channel_sqnr_db([want[:1], short[:1, :3]], [got[:1], short_got[:1, :3]])
    assert np.isfinite(mixed)


def test_the_cli_accepts_auto(tmp_path: object) -> None:
    from pathlib import Path

    from onnxq.cli import main

    proto, calib, _ = _tail_model_and_data()
    folder = Path(str(tmp_path))
    model = builders.save(proto, folder / "tail.onnx")  # type: ignore[arg-type]
    np.savez(folder / "c.npz", x=np.concatenate([f["x"] for f in calib]))
    argv = ["optimize", str(model), "-o", str(folder / "o.onnx"), "--calib", str(folder / "c.npz")]
    assert main([*argv, "--method", "auto", "--runs", "2", "--calib-batch", "64"]) == 0


def test_padded_positions_do_not_choose_the_ranges() -> None:
    """A transformer's [1, seq, hidden] output is scored on its real tokens: axis 1 is positions, and the
    median position of a short, padded sentence is padding (MPNet-base: auto read cosine 0.937, min-max
    0.993; with the mask auto reads 0.993)."""
    rng = np.random.default_rng(0)
    want = rng.standard_normal((1, 10, 8)).astype(np.float32)
    tokens_good = want.copy()
    tokens_good[:, 3:] += 1.0  # exact on the 3 real tokens, off on the padding
    padding_good = want + 0.3 * rng.standard_normal(want.shape).astype(np.float32)
    padding_good[:, 3:] = want[:, 3:]  # exact on the padding, off on the real tokens
    keep = np.zeros((1, 10), bool)
    keep[:, :3] = True
    plain = {
        name: _score([[o]], [[want]]) for name, o in (("tokens", tokens_good), ("padding", padding_good))
    }
    masked = {
        name: _score([[o]], [[want]], [keep])
        for name, o in (("tokens", tokens_good), ("padding", padding_good))
    }
    assert plain["padding"] > plain["tokens"]  # unmasked, the padding decides
    assert masked["tokens"] > masked["padding"] and masked["tokens"][1] == np.inf
