"""Accuracy targets: the ``metric>=minimum`` grammar, custom targets, and TargetEvaluator's scores.

Scores are checked against figures computed here with numpy from ONNX Runtime outputs at
``ORT_DISABLE_ALL`` (global SQNR, mean cosine, top-1 agreement), on the float model itself and on
deliberately perturbed copies of it; the evaluator's reference cache is checked by counting the runs it
makes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import pytest

import onnxq
from onnxq.data import Feeds, input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.tuning import targets
from onnxq.tuning.targets import (
    METRICS,
    REFERENCE_CACHE_BYTES,
    AccuracyTarget,
    CustomTarget,
    TargetEvaluator,
    as_target,
    evaluation_feeds,
)

# ---------------------------------------------------------------------------------------------------
# Helpers


def perturbed(proto: onnx.ModelProto, name: str, std: float, seed: int = 99) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializer ``name`` has Gaussian noise of ``std`` added."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for i, tensor in enumerate(copy.graph.initializer):
        if tensor.name == name:
            array = onnx.numpy_helper.to_array(tensor)
            noise = np.random.default_rng(seed).normal(0.0, std, array.shape).astype(array.dtype)
            copy.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array + noise, name))
            return copy
    raise AssertionError(f"no initializer {name}")


def matmul_feeds(count: int = 3, rows: int = 2, seed: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 16)).astype(np.float32)} for _ in range(count)]


def feeds_for(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> Feeds:
    return load_feeds(samples, input_specs(model), what="evaluation")


def outputs_of(proto: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    return [builders.run_disabled(proto, feed) for feed in samples]


def numpy_sqnr(ref: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    noise = sum(float(np.sum((r.astype(np.float64) - c) ** 2)) for r, c in zip(ref, cand, strict=True))
    return 10.0 * math.log10(signal / noise)


def numpy_cosine(ref: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> float:
    values = [
        float(np.dot(r.ravel(), c.ravel()) / (np.linalg.norm(r) * np.linalg.norm(c)))
        for r, c in zip(ref, cand, strict=True)
    ]
    return sum(values) / len(values)


def evaluator(
    reference: onnx.ModelProto,
    samples: list[dict[str, np.ndarray]],
    target: AccuracyTarget | CustomTarget | str,
    **kwargs: object,
) -> TargetEvaluator:
    model = ir.from_proto(reference)
    return TargetEvaluator(model, feeds_for(model, samples), as_target(target), **kwargs)  # type: ignore[arg-type]


class RunCounter:
    """Counts ONNX Runtime runs made through onnxq.tuning.targets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = targets.run

        def counting(session: object, feed: object, names: object = None) -> list[np.ndarray]:
            self.calls += 1
            return real(session, feed, names)  # type: ignore[arg-type]

        monkeypatch.setattr(targets, "run", counting)


# ---------------------------------------------------------------------------------------------------
# AccuracyTarget.parse: the grammar


@pytest.mark.parametrize(
    ("text", "metric", "minimum"),
    [
        ("sqnr>=30", "sqnr", 30.0),
        ("cosine>=0.995", "cosine", 0.995),
        ("top1>=0.99", "top1", 0.99),
        ("  sqnr >= 30  ", "sqnr", 30.0),
        ("SQNR>=30", "sqnr", 30.0),
        ("Cosine>=0.9", "cosine", 0.9),
        ("TOP1 >=1", "top1", 1.0),
        ("sqnr>=30.", "sqnr", 30.0),
        ("top1>=.5", "top1", 0.5),
        ("sqnr>=3e1", "sqnr", 30.0),
        ("sqnr>=2.5E+1", "sqnr", 25.0),
        ("sqnr>=-5", "sqnr", -5.0),
        ("sqnr>=+12.5", "sqnr", 12.5),
        ("cosine>=1", "cosine", 1.0),
        ("cosine>=-0.5", "cosine", -0.5),
        ("top1>=0", "top1", 0.0),
        ("sqnr>=\t40\n", "sqnr", 40.0),
    ],
)
def test_parse_accepts(text: str, metric: str, minimum: float) -> None:
    target = AccuracyTarget.parse(text)
    assert (target.metric, target.minimum) == (metric, minimum)
    assert target.name == metric
    assert AccuracyTarget.parse(str(target)) == target  # the string form parses back


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sqnr",
        "sqnr>30",
        "sqnr=30",
        "sqnr==30",
        "sqnr=>30",
        "sqnr<=30",
        "sqnr>=",
        ">=30",
        "sqnr>=30dB",
        "sqnr>=thirty",
        "sqnr>=nan",
        "sqnr>=inf",
        "sqnr>=1e",
        "sqnr>=30 40",
        "sqnr >= 30 and cosine >= 0.9",
        "accuracy>=0.9",
        "top5>=0.9",
        "snr>=30",
        "sqnr>=0x10",
        "sqnr>=1,5",
        "sqnr>=30\nextra",
    ],
)
def test_parse_rejects_malformed_text(text: str) -> None:
    with pytest.raises(OnnxqError) as info:
        AccuracyTarget.parse(text)
    message = str(info.value)
    assert f"accuracy target {text!r} not understood" in message
    for form in ("'sqnr>=DB'", "'cosine>=VALUE'", "'top1>=FRACTION'"):
        assert form in message


@pytest.mark.parametrize("value", [30, 0.9, None, b"sqnr>=30", ["sqnr>=30"]])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(OnnxqError, match="not understood"):
        AccuracyTarget.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("cosine>=1.5", "a cosine similarity is at most 1, so cosine>=1.5 cannot be met"),
        ("top1>=99", "top1>=99 cannot be met (write 0.99, not 99)"),
        ("top1>=1.01", "top-1 agreement is a fraction in [0, 1]"),
        ("sqnr>=1e400", "must be a finite number, got inf"),
    ],
)
def test_parse_rejects_targets_that_cannot_be_met(text: str, fragment: str) -> None:
    with pytest.raises(OnnxqError) as info:
        AccuracyTarget.parse(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("metric", "minimum", "fragment"),
    [
        ("psnr", 30.0, "unknown accuracy metric 'psnr'; expected one of sqnr, cosine, top1"),
        ("sqnr", math.nan, "must be a finite number, got nan"),
        ("sqnr", math.inf, "must be a finite number, got inf"),
        ("cosine", 2.0, "cannot be met"),
    ],
)
def test_constructor_checks(metric: str, minimum: float, fragment: str) -> None:
    with pytest.raises(OnnxqError) as info:
        AccuracyTarget(metric, minimum)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_minus_infinity_is_a_valid_minimum() -> None:
    target = AccuracyTarget("sqnr", -math.inf)
    assert target.met(-1e300) and target.met(-math.inf)
    assert not target.met(math.nan)


@pytest.mark.parametrize(
    ("target", "text"),
    [
        (AccuracyTarget("sqnr", 30.0), "sqnr>=30"),
        (AccuracyTarget("cosine", 0.995), "cosine>=0.995"),
        (AccuracyTarget("top1", 0.5), "top1>=0.5"),
        (AccuracyTarget("sqnr", 12.25), "sqnr>=12.25"),
    ],
)
def test_str(target: AccuracyTarget, text: str) -> None:
    assert str(target) == text


@pytest.mark.parametrize(
    ("score", "met"),
    [
        (30.0, True),
        (30.0001, True),
        (math.inf, True),
        (29.9999, False),
        (-math.inf, False),
        (math.nan, False),
    ],
)
def test_met(score: float, met: bool) -> None:
    assert AccuracyTarget.parse("sqnr>=30").met(score) is met


# ---------------------------------------------------------------------------------------------------
# as_target


@pytest.mark.parametrize("name", [*METRICS, " SQNR ", "Cosine"])
def test_as_target_bare_metric_has_no_minimum(name: str) -> None:
    target = as_target(name)
    assert isinstance(target, AccuracyTarget)
    assert target.metric == name.strip().lower()
    assert target.minimum == -math.inf
    assert target.met(-1e9)


def test_as_target_parses_and_passes_targets_through() -> None:
    assert as_target("cosine>=0.9") == AccuracyTarget("cosine", 0.9)
    accuracy = AccuracyTarget("top1", 0.5)
    custom = CustomTarget(lambda m: 1.0, 0.5)
    assert as_target(accuracy) is accuracy
    assert as_target(custom) is custom
    with pytest.raises(OnnxqError, match="not understood"):
        as_target("psnr>=3")


@pytest.mark.parametrize("value", [30, 0.5, None, ("sqnr", 30)])
def test_as_target_rejects_other_types(value: object) -> None:
    with pytest.raises(OnnxqError) as info:
        as_target(value)  # type: ignore[arg-type]
    assert str(info.value) == f"expected an accuracy target such as 'sqnr>=30', got {type(value).__name__}"


# ---------------------------------------------------------------------------------------------------
# AccuracyTarget.score on given outputs


def test_score_is_the_worst_output() -> None:
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((2, 5)).astype(np.float32) for _ in range(2)] for _ in range(3)]
    small = [[r[0] + 0.001, r[1] + 0.1] for r in ref]  # output 1 is much noisier
    sqnr = AccuracyTarget("sqnr", 0.0).score(ref, small)
    expected = numpy_sqnr([r[1] for r in ref], [c[1] for c in small])
    assert sqnr == pytest.approx(expected, rel=1e-9)
    assert sqnr < numpy_sqnr([r[0] for r in ref], [c[0] for c in small])
    cosine = AccuracyTarget("cosine", 0.0).score(ref, small)
    assert cosine == pytest.approx(numpy_cosine([r[1] for r in ref], [c[1] for c in small]), rel=1e-6)


def test_score_consumes_generators() -> None:
    rng = np.random.default_rng(1)
    data = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    ref = ([d] for d in data)
    cand = ([d * 1.01] for d in data)
    assert AccuracyTarget("sqnr", 0.0).score(ref, cand) == pytest.approx(40.0, abs=1e-4)


def test_score_leaves_padded_positions_out() -> None:
    """The target scores per-token outputs on real tokens, as the report compares them."""
    rng = np.random.default_rng(2)
    data = [rng.standard_normal((1, 6, 8)).astype(np.float32) for _ in range(3)]
    noisy = [d.copy() for d in data]
    for n in noisy:
        n[:, 3:] += 1.0  # error only at the padded positions
    keep = np.array([[True] * 3 + [False] * 3])
    target = AccuracyTarget("sqnr", 0.0)
    assert target.score(([d] for d in data), ([n] for n in noisy), masks=[keep] * 3) == math.inf
    assert target.score(([d] for d in data), ([n] for n in noisy)) < 10.0


def test_the_evaluator_scores_real_tokens_only() -> None:
    """A model fed an attention mask: the evaluator's score leaves the padded positions out."""
    text = """
    masked (float[1, S, 4] x, int64[1, S] attention_mask) => (float[1, S, 4] y) {
        m = Cast <to = 1> (attention_mask)
        pad = Sub (one, m)
        padu = Unsqueeze (pad, axes)
        y = Add (x, padu)
    }
    """
    arrays = {"one": np.ones(1, np.float32), "axes": np.asarray([2], np.int64)}
    reference = builders.parse("""
    plain (float[1, S, 4] x, int64[1, S] attention_mask) => (float[1, S, 4] y) { y = Identity (x) }
    """)
    mask = np.array([[1, 1, 1, 0, 0]], np.int64)
    samples = [{"x": np.ones((1, 5, 4), np.float32) * k, "attention_mask": mask} for k in (1, 2)]
    candidate = ir.from_proto(builders.parse(text, arrays))  # off by 1.0 at the padded positions only
    scored = evaluator(reference, samples, "sqnr>=30")
    assert scored.score(candidate) == math.inf
    unmasked = [{"x": s["x"], "attention_mask": np.ones_like(mask)} for s in samples]
    assert evaluator(reference, unmasked, "sqnr>=30").score(candidate) == math.inf  # no padding: no error


def test_score_nan_anywhere_gives_nan() -> None:
    good = np.ones((2, 3), np.float32)
    bad = good.copy()
    bad[0, 0] = np.nan
    for metric in ("sqnr", "cosine"):
        target = AccuracyTarget(metric, 0.0)  # type: ignore[arg-type]
        # NaN in the second output, whatever the first output's score
        assert math.isnan(target.score([[good, good]], [[good, bad]]))
        assert math.isnan(target.score([[good, good]], [[bad, good]]))
        assert not target.met(target.score([[good, good]], [[bad, good]]))


def test_score_top1_over_class_score_outputs_only() -> None:
    ref_scores = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    cand_scores = ref_scores.copy()
    cand_scores[1] = [0.0, 0.0, 2.0]  # one row of four disagrees
    feature_map = np.ones((1, 2, 3, 3), np.float32)
    score = AccuracyTarget("top1", 0.0).score([[ref_scores, feature_map]], [[cand_scores, -feature_map]])
    assert score == 0.75  # the rank-4 output's disagreement does not count


def test_score_errors() -> None:
    target = AccuracyTarget("sqnr", 0.0)
    a = np.ones((2, 2), np.float32)
    with pytest.raises(OnnxqError, match="no evaluation data to score the model on"):
        target.score([], [])
    with pytest.raises(OnnxqError, match=r"expected 2 outputs per feed, got 2 \(reference\) and 1"):
        target.score([[a, a]], [[a]])
    with pytest.raises(OnnxqError, match="'logits'"):
        target.score([[a]], [[np.ones((4,), np.float32)]], names=["logits"])  # another rank
    with pytest.raises(OnnxqError, match=r"class scores.*outputs 'output 0' do not"):
        cube = np.ones((1, 2, 3), np.float32)
        AccuracyTarget("top1", 0.5).score([[cube]], [[cube]])


# ---------------------------------------------------------------------------------------------------
# CustomTarget


def accuracy_of(model: ir.Model) -> float:
    return float(len(list(model.graph)))


class Scorer:
    def __call__(self, model: ir.Model) -> float:
        return 0.25


def test_custom_target_calls_the_function_with_the_model() -> None:
    seen: list[ir.Model] = []

    def fn(model: ir.Model) -> np.float32:
        seen.append(model)
        return np.float32(0.75)

    target = CustomTarget(fn, minimum=0.5, name="task accuracy")
    model = ir.from_proto(builders.matmul_model())
    score = target.evaluate(model)
    assert score == 0.75 and type(score) is float
    assert len(seen) == 1 and seen[0] is model
    assert target.met(score) and not target.met(0.49) and not target.met(math.nan)
    assert str(target) == "task accuracy>=0.5"


@pytest.mark.parametrize("value", [None, "abc", [1.0], object()])
def test_custom_target_rejects_non_numbers(value: object) -> None:
    target = CustomTarget(lambda m: value, minimum=0.0, name="acc")  # type: ignore[arg-type,return-value]
    with pytest.raises(OnnxqError) as info:
        target.evaluate(ir.from_proto(builders.matmul_model()))
    assert str(info.value) == f"custom target 'acc' returned {type(value).__name__}, expected a number"


def test_custom_target_nan_score_is_returned_and_never_met() -> None:
    target = CustomTarget(lambda m: math.nan, minimum=-math.inf)
    score = target.evaluate(ir.from_proto(builders.matmul_model()))
    assert math.isnan(score) and not target.met(score)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"fn": 3.0, "minimum": 0.5}, "a custom target needs a callable, got float"),
        ({"fn": accuracy_of, "minimum": math.nan}, "custom target minimum must be a finite number, got nan"),
        ({"fn": accuracy_of, "minimum": math.inf}, "custom target minimum must be a finite number, got inf"),
    ],
)
def test_custom_target_checks(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(OnnxqError) as info:
        CustomTarget(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_custom_target_cache_key() -> None:
    assert CustomTarget(accuracy_of, 0.5).cache_key == f"custom:custom:{__name__}.accuracy_of"
    assert CustomTarget(accuracy_of, 0.5, name="acc").cache_key == f"custom:acc:{__name__}.accuracy_of"
    assert CustomTarget(Scorer(), 0.5).cache_key == f"custom:custom:{__name__}.Scorer"

    def local(model: ir.Model) -> float:
        return 1.0

    key = CustomTarget(local, 0.5).cache_key
    assert key.endswith("test_custom_target_cache_key.<locals>.local")
    # the minimum is not part of the key (a cached sensitivity holds scores, not verdicts) ...
    assert CustomTarget(accuracy_of, 0.1).cache_key == CustomTarget(accuracy_of, 0.9).cache_key
    # ... but the function and the name are
    assert len({key, CustomTarget(accuracy_of, 0.5).cache_key, CustomTarget(Scorer(), 0.5).cache_key}) == 3


# ---------------------------------------------------------------------------------------------------
# TargetEvaluator on real models


@pytest.mark.parametrize("opt_level", ["disable", "all"])
def test_the_float_model_scores_perfectly(opt_level: str) -> None:
    proto = builders.matmul_model()
    samples = matmul_feeds()
    for metric, best in (("sqnr", math.inf), ("cosine", 1.0), ("top1", 1.0)):
        ev = evaluator(proto, samples, metric, opt_level=opt_level)
        assert ev.score(ir.from_proto(proto)) == best, metric


def test_a_perturbed_model_scores_what_numpy_says() -> None:
    proto = builders.matmul_model()
    samples = matmul_feeds(count=4, rows=3)
    noisy = perturbed(proto, "w", 0.02)
    ref = [out[0] for out in outputs_of(proto, samples)]
    cand = [out[0] for out in outputs_of(noisy, samples)]

    sqnr = evaluator(proto, samples, "sqnr", opt_level="disable").score(ir.from_proto(noisy))
    assert sqnr == pytest.approx(numpy_sqnr(ref, cand), abs=1e-3)
    assert 10.0 < sqnr < 60.0

    cosine = evaluator(proto, samples, "cosine", opt_level="disable").score(ir.from_proto(noisy))
    assert cosine == pytest.approx(numpy_cosine(ref, cand), abs=1e-6)
    assert 0.9 < cosine < 1.0


def test_more_noise_scores_lower() -> None:
    proto = builders.matmul_model()
    samples = matmul_feeds()
    for metric in ("sqnr", "cosine"):
        ev = evaluator(proto, samples, metric, opt_level="disable")
        scores = [ev.score(ir.from_proto(perturbed(proto, "w", std))) for std in (0.001, 0.01, 0.1)]
        assert scores[0] > scores[1] > scores[2], metric


def test_top1_counts_agreeing_rows() -> None:
    proto = builders.matmul_model()
    samples = matmul_feeds(count=5, rows=4)
    noisy = perturbed(proto, "w", 0.3)
    ref = np.concatenate([out[0] for out in outputs_of(proto, samples)])
    cand = np.concatenate([out[0] for out in outputs_of(noisy, samples)])
    expected = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))
    assert 0.0 < expected < 1.0  # the premise: some rows change their argmax, some do not
    score = evaluator(proto, samples, "top1", opt_level="disable").score(ir.from_proto(noisy))
    assert score == expected


def test_top1_needs_class_score_outputs() -> None:
    proto = builders.conv_relu_model()
    samples = [{"x": s} for s in builders.conv_calibration(2)]
    ev = evaluator(proto, samples, "top1>=0.9")
    with pytest.raises(OnnxqError) as info:
        ev.score(ir.from_proto(proto))
    message = str(info.value)
    assert "top-1 agreement needs an output that looks like class scores" in message
    assert "'y'" in message and "use sqnr>=DB or cosine>=VALUE instead" in message
    # the other metrics work on the same model
    assert evaluator(proto, samples, "sqnr").score(ir.from_proto(proto)) == math.inf


TWO_OUTPUTS = """
two (float[N,16] x) => (float[N,8] a, float[N,8] b) {
    a = MatMul (x, wa)
    b = MatMul (x, wb)
}
"""


def test_multi_output_score_is_the_minimum_over_outputs() -> None:
    rng = np.random.default_rng(3)
    arrays = {n: rng.normal(0.0, 0.25, (16, 8)).astype(np.float32) for n in ("wa", "wb")}
    proto = builders.parse(TWO_OUTPUTS, arrays)
    samples = matmul_feeds()
    only_b = perturbed(proto, "wb", 0.05)
    outs_ref, outs_cand = outputs_of(proto, samples), outputs_of(only_b, samples)
    expected_b = numpy_sqnr([o[1] for o in outs_ref], [o[1] for o in outs_cand])
    ev = evaluator(proto, samples, "sqnr", opt_level="disable")
    assert ev.score(ir.from_proto(only_b)) == pytest.approx(expected_b, abs=1e-3)
    assert ev.output_names == ["a", "b"]
    # and when the other output is the noisier one, that one decides
    both = perturbed(perturbed(proto, "wb", 0.05), "wa", 0.2, seed=7)
    outs_both = outputs_of(both, samples)
    expected_a = numpy_sqnr([o[0] for o in outs_ref], [o[0] for o in outs_both])
    assert expected_a < expected_b
    assert ev.score(ir.from_proto(both)) == pytest.approx(expected_a, abs=1e-3)


def test_a_candidate_without_the_reference_outputs_is_refused() -> None:
    proto = builders.matmul_model()
    renamed = builders.parse(
        """
        renamed (float[N,16] x) => (float[N,8] z) {
            m = MatMul (x, w)
            z = Add (m, b)
        }
        """,
        {"w": np.zeros((16, 8), np.float32), "b": np.zeros(8, np.float32)},
    )
    ev = evaluator(proto, matmul_feeds(), "sqnr")
    with pytest.raises(OnnxqError, match="candidate model lacks output"):
        ev.score(ir.from_proto(renamed))
    with pytest.raises(OnnxqError, match=r"output\(s\) y of the float model"):
        ev.score(ir.from_proto(renamed))
    assert ev.evaluations == 0  # failed evaluations are not counted


# ---------------------------------------------------------------------------------------------------
# Counting and caching


def test_evaluations_are_counted() -> None:
    proto = builders.matmul_model()
    ev = evaluator(proto, matmul_feeds(), "cosine>=0.99")
    assert (ev.evaluations, ev.seconds) == (0, 0.0)
    ev.prepare()
    assert ev.evaluations == 0  # running the reference is not an evaluation
    for i in range(1, 4):
        ev.score(ir.from_proto(perturbed(proto, "w", 0.01 * i)))
        assert ev.evaluations == i
    assert ev.seconds > 0.0
    assert ev.met(0.995) and not ev.met(0.98)


def test_reference_outputs_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = RunCounter(monkeypatch)
    proto = builders.matmul_model()
    ev = evaluator(proto, matmul_feeds(count=3), "sqnr")
    candidate = ir.from_proto(perturbed(proto, "w", 0.01))
    first = ev.score(candidate)
    assert counter.calls == 6  # reference and candidate on 3 feeds
    second = ev.score(candidate)
    assert counter.calls == 9  # the candidate only
    assert first == second


def test_prepare_runs_the_reference_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = RunCounter(monkeypatch)
    proto = builders.matmul_model()
    ev = evaluator(proto, matmul_feeds(count=3), "sqnr")
    ev.prepare()
    assert counter.calls == 3
    ev.prepare()
    assert counter.calls == 3
    ev.score(ir.from_proto(proto))
    assert counter.calls == 6


@pytest.mark.parametrize(("cache_bytes", "runs_for_two_scores"), [(192, 9), (191, 12), (0, 12)])
def test_reference_cache_limit(
    monkeypatch: pytest.MonkeyPatch, cache_bytes: int, runs_for_two_scores: int
) -> None:
    """Three feeds of [2, 8] float32 outputs hold 3 × 64 = 192 bytes of reference outputs."""
    counter = RunCounter(monkeypatch)
    proto = builders.matmul_model()
    samples = matmul_feeds(count=3, rows=2)
    ev = evaluator(proto, samples, "sqnr", cache_bytes=cache_bytes)
    candidates = [ir.from_proto(perturbed(proto, "w", std)) for std in (0.01, 0.05)]
    scores = [ev.score(c) for c in candidates]
    assert counter.calls == runs_for_two_scores
    # whether cached or re-run, the scores are the same
    unlimited = evaluator(proto, samples, "sqnr", cache_bytes=REFERENCE_CACHE_BYTES)
    assert scores == [unlimited.score(c) for c in candidates]
    assert scores[0] > scores[1]


def test_over_the_limit_prepare_does_not_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = RunCounter(monkeypatch)
    proto = builders.matmul_model()
    ev = evaluator(proto, matmul_feeds(count=2), "sqnr", cache_bytes=0)
    ev.prepare()
    assert counter.calls == 2
    ev.prepare()  # nothing can be cached: preparing again would only cost
    assert counter.calls == 2
    ev.score(ir.from_proto(proto))
    assert counter.calls == 6  # reference and candidate


# ---------------------------------------------------------------------------------------------------
# Optimisation level


def test_sessions_use_the_evaluators_opt_level(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real = targets.open_model

    def spy(model: ir.Model, **kwargs: object) -> object:
        seen.append(kwargs.get("opt_level"))
        return real(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(targets, "open_model", spy)
    proto = builders.matmul_model()
    for level in ("disable", "all"):
        seen.clear()
        evaluator(proto, matmul_feeds(), "sqnr", opt_level=level).score(ir.from_proto(proto))
        assert seen == [level, level]  # the candidate's session, then the reference's
    seen.clear()
    default = evaluator(proto, matmul_feeds(), "sqnr")
    default.score(ir.from_proto(proto))
    assert seen == ["all", "all"]  # what a deployment sees, unless asked otherwise
    assert default.cache_bytes == REFERENCE_CACHE_BYTES == 256 << 20


@pytest.fixture(scope="module")
def quantized_conv() -> ir.Model:
    calibration = [{"x": s} for s in builders.conv_calibration(8)]
    return onnxq.quantize(builders.conv_relu_model(), calibration).model


def test_opt_level_changes_what_a_quantized_candidate_scores(quantized_conv: ir.Model) -> None:
    """At ORT_ENABLE_ALL ONNX Runtime fuses the Q/DQ Conv into an integer kernel; the graph's own
    semantics (ORT_DISABLE_ALL) give other numbers, both close to the float model."""
    proto = builders.conv_relu_model()
    samples = [{"x": s} for s in builders.conv_calibration(4, seed=12)]
    disabled = evaluator(proto, samples, "sqnr", opt_level="disable").score(quantized_conv)
    enabled = evaluator(proto, samples, "sqnr", opt_level="all").score(quantized_conv)
    assert 20.0 < disabled < math.inf and 20.0 < enabled < math.inf
    assert disabled != enabled
    assert disabled == evaluator(proto, samples, "sqnr", opt_level="disable").score(quantized_conv)


# ---------------------------------------------------------------------------------------------------
# Custom targets in the evaluator


def test_evaluator_with_a_custom_target_runs_no_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_runs(*args: object, **kwargs: object) -> None:
        raise AssertionError("a custom target runs no feeds")

    monkeypatch.setattr(targets, "run", no_runs)
    monkeypatch.setattr(targets, "open_model", no_runs)
    calls: list[ir.Model] = []

    def fn(model: ir.Model) -> float:
        calls.append(model)
        return 0.5 + 0.1 * len(calls)

    proto = builders.matmul_model()
    ev = evaluator(proto, matmul_feeds(), CustomTarget(fn, minimum=0.65, name="acc"))
    ev.prepare()
    assert calls == []
    candidate = ir.from_proto(proto)
    assert ev.score(candidate) == pytest.approx(0.6)
    assert ev.score(candidate) == pytest.approx(0.7)
    assert calls == [candidate, candidate]
    assert ev.evaluations == 2
    assert not ev.met(0.6) and ev.met(0.7)


# ---------------------------------------------------------------------------------------------------
# evaluation_feeds


def test_evaluation_feeds_passes_feeds_through() -> None:
    model = ir.from_proto(builders.matmul_model())
    feeds = feeds_for(model, matmul_feeds())
    assert evaluation_feeds(feeds, model) is feeds


def test_evaluation_feeds_checks_and_converts_a_list() -> None:
    model = ir.from_proto(builders.matmul_model())
    raw = [{"x": np.ones((2, 16), np.float64)}, {"x": np.zeros((3, 16), np.float64)}]
    feeds = evaluation_feeds(raw, model)
    assert isinstance(feeds, Feeds)
    assert feeds.num_samples == 2 and not feeds.is_random
    got = list(feeds)
    assert [f["x"].dtype for f in got] == [np.float32, np.float32]
    assert [f["x"].shape for f in got] == [(2, 16), (3, 16)]


def test_evaluation_feeds_names_the_data_in_errors() -> None:
    model = ir.from_proto(builders.matmul_model())
    with pytest.raises(OnnxqError, match=r"^evaluation data item 0: unknown input 'y'"):
        list(evaluation_feeds([{"y": np.ones((1, 16), np.float32)}], model))
    with pytest.raises(OnnxqError, match=r"^held-out data item 0: input 'x' axis 1 must be 16"):
        list(evaluation_feeds([{"x": np.ones((1, 15), np.float32)}], model, what="held-out data"))


def test_evaluation_feeds_random(caplog: pytest.LogCaptureFixture) -> None:
    model = ir.from_proto(builders.matmul_model())
    feeds = evaluation_feeds("random", model)
    assert feeds.is_random
    first = list(feeds)
    assert first and all(f["x"].shape == (1, 16) for f in first)
    assert "RANDOM evaluation data" in caplog.text


def test_score_with_fewer_candidate_feeds_is_a_user_error() -> None:
    a = np.ones((2, 2), np.float32)
    with pytest.raises(OnnxqError):
        AccuracyTarget("sqnr", 0.0).score([[a], [a]], [[a]])
