"""collect_ranges: the float model run on calibration data, every requested tensor streamed into observers.

The ranges are checked against the tensors themselves (ONNX Runtime at ``ORT_DISABLE_ALL`` with the
tensors made graph outputs of a separate copy, and numpy), the input model is checked to be left as it
was, and the result is checked not to depend on how the samples are batched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import builders
import numpy as np
import onnx
import onnx.helper
import onnx_ir as ir
import pytest

from onnxq.calibrate import collect as collect_module
from onnxq.calibrate import extremes
from onnxq.calibrate.collect import CalibrationResult, collect_ranges
from onnxq.config import CALIBRATION_METHODS, ActivationScheme, CalibrationConfig
from onnxq.data import FeedFingerprint, Feeds, input_specs, load_feeds
from onnxq.errors import OnnxqError

UINT8 = ActivationScheme()
INT8_SYMMETRIC = ActivationScheme(dtype="int8", symmetric=True)

# x → MatMul → Add → Relu (the graph output y), plus side branches the graph outputs do not use:
# Tanh (float), Shape (int64), Cast to float16, Log(x - x) (always -inf), an empty Slice, and
# Log(x) (NaN wherever x < 0, finite elsewhere), Log(Relu(x)) (-inf wherever x <= 0).
SIDE_BRANCHES = """
collect (float[N,4] x) => (float[N,3] y) {
    h = MatMul (x, w)
    a = Add (h, b)
    y = Relu (a)
    t = Tanh (x)
    shp = Shape (x)
    half = Cast <to = 10> (a)
    zero = Sub (x, x)
    never = Log (zero)
    empty = Slice (x, starts, ends, axes)
    partly = Log (x)
    pos = Relu (x)
    clamped = Log (pos)
}
"""


def side_branch_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    arrays = {
        "w": rng.normal(0.0, 0.5, (4, 3)).astype(np.float32),
        "b": rng.normal(0.0, 0.1, (3,)).astype(np.float32),
        "starts": np.array([0], np.int64),
        "ends": np.array([0], np.int64),
        "axes": np.array([1], np.int64),
    }
    return builders.parse(SIDE_BRANCHES, arrays)


def row_feeds(count: int, seed: int, *, width: int = 4) -> list[dict[str, np.ndarray]]:
    """``count`` samples of batch 1 for an ``x: float[N,width]`` input."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, width)).astype(np.float32)} for _ in range(count)]


def values_named(model: ir.Model, *names: str) -> list[ir.Value]:
    found: dict[str, ir.Value] = {}
    for value in model.graph.inputs:
        found[value.name or ""] = value
    for node in model.graph:
        for out in node.outputs:
            found[out.name or ""] = out
    return [found[name] for name in names]


def calibrate(
    model: ir.Model,
    values: Sequence[ir.Value],
    samples: list[dict[str, np.ndarray]] | Feeds,
    *,
    method: str = "minmax",
    batch_size: int = 1,
    scheme: ActivationScheme = UINT8,
) -> CalibrationResult:
    feeds = (
        samples
        if isinstance(samples, Feeds)
        else load_feeds(samples, input_specs(model), batch_size=batch_size)
    )
    config = CalibrationConfig(method=method, batch_size=batch_size)  # type: ignore[arg-type]
    return collect_ranges(model, values, dict.fromkeys(values, scheme), feeds, config, show_progress=False)


def by_name(result: CalibrationResult) -> dict[str, tuple[float, float]]:
    return {value.name or "": rng for value, rng in result.ranges.items()}


def reference_tensors(
    proto: onnx.ModelProto, names: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The named tensors over all samples (concatenated along axis 0), from ORT at ORT_DISABLE_ALL."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    per_sample = [builders.run_disabled(copy, feed) for feed in samples]
    return {name: np.concatenate([outs[i] for outs in per_sample]) for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------------
# Ranges are the tensors' own


def test_minmax_ranges_are_the_min_and_max_of_each_tensor() -> None:
    proto = side_branch_model()
    model = ir.from_proto(proto)
    names = ("x", "h", "a", "y", "t")
    samples = row_feeds(12, seed=3)
    result = calibrate(model, values_named(model, *names), samples)

    tensors = reference_tensors(proto, names, samples)
    ranges = by_name(result)
    assert set(ranges) == set(names)
    for name in ("x", "t"):  # elementwise: the same bits whatever the session options
        assert ranges[name] == (float(tensors[name].min()), float(tensors[name].max())), name
    for name in ("h", "a", "y"):  # MatMul kernels differ in the last bits with and without prepacking
        np.testing.assert_allclose(ranges[name], (tensors[name].min(), tensors[name].max()), rtol=1e-6)
    # and the same figures from numpy alone (within float32 rounding of the MatMul)
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    b = onnx.numpy_helper.to_array(proto.graph.initializer[1])
    x = np.concatenate([s["x"] for s in samples])
    expected = {"x": x, "h": x @ w, "a": x @ w + b, "y": np.maximum(x @ w + b, 0), "t": np.tanh(x)}
    for name, array in expected.items():
        np.testing.assert_allclose(ranges[name], (array.min(), array.max()), rtol=1e-5, atol=1e-6)
    # Relu output: the minimum is exactly 0 (some sample is negative before it), the maximum positive
    assert ranges["y"][0] == 0.0 < ranges["y"][1]
    assert result.method == "minmax"
    assert result.unobserved == () and result.non_float == ()


def test_ranges_are_keyed_by_the_values_passed_in() -> None:
    model = ir.from_proto(side_branch_model())
    values = values_named(model, "h", "y")
    result = calibrate(model, values, row_feeds(3, seed=0))
    assert list(result.ranges) == values
    assert all(any(key is v for v in values) for key in result.ranges)


def test_duplicate_values_are_observed_once() -> None:
    model = ir.from_proto(side_branch_model())
    (h,) = values_named(model, "h")
    once = calibrate(model, [h], row_feeds(4, seed=1))
    twice = calibrate(model, [h, h, h], row_feeds(4, seed=1))
    assert list(twice.ranges) == [h]
    assert twice.ranges[h] == once.ranges[h]


def test_conv_relu_ranges_match_onnxruntime() -> None:
    proto = builders.conv_relu_model()
    model = ir.from_proto(proto)
    conv, relu = (node.outputs[0] for node in model.graph)
    samples = [{"x": sample} for sample in builders.conv_calibration(6)]
    result = calibrate(model, [conv, relu], samples)
    tensors = reference_tensors(proto, [conv.name or "", "y"], samples)
    # Calibration runs at ORT_ENABLE_ALL (faster convolution kernels): equal up to float rounding.
    expected = (float(tensors["c"].min()), float(tensors["c"].max()))
    assert result.ranges[conv] == pytest.approx(expected, rel=1e-5)
    assert result.ranges[relu] == pytest.approx((0.0, float(tensors["y"].max())), rel=1e-5)
    assert result.ranges[conv][0] < 0.0  # the Relu really clipped something: the two ranges differ


# ---------------------------------------------------------------------------------------------------
# The model passed in is left as it was


def test_the_model_is_not_modified() -> None:
    model = ir.from_proto(side_branch_model())
    before = builders.serialize(model)
    outputs_before = list(model.graph.outputs)
    values = values_named(model, "x", "h", "a", "y", "t", "shp", "never")
    calibrate(model, values, row_feeds(4, seed=2))
    assert list(model.graph.outputs) == outputs_before
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert builders.serialize(model) == before
    # every observed value is still used as before: none became a graph output
    assert [v.name for v in values if v.is_graph_output()] == ["y"]


def test_a_second_collection_gives_the_same_result() -> None:
    model = ir.from_proto(side_branch_model())
    values = values_named(model, "h", "a", "y")
    first = calibrate(model, values, row_feeds(5, seed=4), method="percentile")
    second = calibrate(model, values, row_feeds(5, seed=4), method="percentile")
    assert first.ranges == second.ranges
    assert first.fingerprint == second.fingerprint


def test_a_tensor_that_is_already_a_graph_output() -> None:
    proto = side_branch_model()
    model = ir.from_proto(proto)
    (y,) = values_named(model, "y")
    assert y.is_graph_output()
    samples = row_feeds(6, seed=5)
    result = calibrate(model, [y], samples)
    expected = np.concatenate([builders.run_disabled(proto, s)[0] for s in samples])
    assert result.ranges[y] == (float(expected.min()), float(expected.max()))
    assert [v.name for v in model.graph.outputs] == ["y"]  # not added a second time, nor dropped


def test_a_graph_input_can_be_observed() -> None:
    model = ir.from_proto(side_branch_model())
    (x,) = values_named(model, "x")
    samples = row_feeds(7, seed=6)
    stacked = np.concatenate([s["x"] for s in samples])
    result = calibrate(model, [x], samples)
    assert result.ranges[x] == (float(stacked.min()), float(stacked.max()))
    assert not x.is_graph_output()


# ---------------------------------------------------------------------------------------------------
# Batch invariance, fingerprint, counts


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
@pytest.mark.parametrize("batch_size", [4, 3])
def test_ranges_do_not_depend_on_batching(method: str, batch_size: int) -> None:
    model = ir.from_proto(builders.conv_relu_model())
    values = [model.graph.inputs[0], *(node.outputs[0] for node in model.graph)]
    samples = [{"x": sample} for sample in builders.conv_calibration(12, seed=11)]
    single = calibrate(model, values, samples, method=method)
    batched = calibrate(model, values, samples, method=method, batch_size=batch_size)
    assert batched.runs == -(-12 // batch_size) < single.runs == 12
    assert single.samples == batched.samples == 12
    assert by_name(batched) == by_name(single)
    assert batched.fingerprint == single.fingerprint
    lo, hi = single.ranges[values[1]]
    assert lo < 0.0 < hi


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "mse"])
def test_matmul_chain_ranges_barely_depend_on_batching(method: str) -> None:
    """The observers are batch invariant, but ONNX Runtime's MatMul may round a 1-row product and a
    4-row product differently in the last bits: the ranges agree to float32 rounding, not always bit
    for bit (the README says so)."""
    model = ir.from_proto(builders.outlier_chain_model())
    values = [node.outputs[0] for node in model.graph]
    rng = np.random.default_rng(21)
    samples = [{"x": rng.standard_normal((1, builders.CHAIN_WIDTH)).astype(np.float32)} for _ in range(8)]
    single = calibrate(model, values, samples, method=method)
    batched = calibrate(model, values, samples, method=method, batch_size=4)
    assert batched.runs == 2 and single.runs == 8
    one, four = by_name(single), by_name(batched)
    assert one.keys() == four.keys()
    for name, (lo, hi) in one.items():
        np.testing.assert_allclose(four[name], (lo, hi), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(("count", "batch_size", "runs"), [(10, 1, 10), (10, 4, 3), (10, 5, 2), (10, 16, 1)])
def test_samples_and_runs_are_counted(count: int, batch_size: int, runs: int) -> None:
    model = ir.from_proto(side_branch_model())
    result = calibrate(model, values_named(model, "a"), row_feeds(count, seed=8), batch_size=batch_size)
    assert (result.samples, result.runs) == (count, runs)
    assert result.seconds > 0.0


def test_a_feed_holding_several_rows_counts_as_one_sample() -> None:
    """With batch size 1 a sample is one item of the data, whatever its own axis 0."""
    model = ir.from_proto(side_branch_model())
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((5, 4)).astype(np.float32)} for _ in range(3)]
    result = calibrate(model, values_named(model, "a"), samples)
    assert (result.samples, result.runs) == (3, 3)


def test_fingerprint_is_that_of_the_data_fed() -> None:
    model = ir.from_proto(side_branch_model())
    samples = row_feeds(6, seed=9)
    expected = FeedFingerprint()
    for sample in samples:
        expected.update(sample)
    result = calibrate(model, values_named(model, "y"), samples, batch_size=2)
    assert result.fingerprint == expected.hexdigest()
    assert result.fingerprint.startswith("sha256:") and len(result.fingerprint) == len("sha256:") + 64


def test_fingerprint_changes_with_the_data() -> None:
    model = ir.from_proto(side_branch_model())
    values = values_named(model, "y")
    base = calibrate(model, values, row_feeds(6, seed=9)).fingerprint
    assert calibrate(model, values, row_feeds(6, seed=10)).fingerprint != base
    assert calibrate(model, values, row_feeds(5, seed=9)).fingerprint != base  # one sample fewer
    changed = row_feeds(6, seed=9)
    changed[3]["x"] = changed[3]["x"].copy()
    changed[3]["x"][0, 2] += 1e-3  # a single value
    assert calibrate(model, values, changed).fingerprint != base
    swapped = row_feeds(6, seed=9)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # the order of the samples matters too
    assert calibrate(model, values, swapped).fingerprint != base


# ---------------------------------------------------------------------------------------------------
# What cannot be observed


def test_non_float_tensors_are_reported_not_observed() -> None:
    model = ir.from_proto(side_branch_model())
    values = values_named(model, "a", "shp", "half")
    result = calibrate(model, values, row_feeds(4, seed=12))
    assert set(result.non_float) == {"shp", "half"}
    assert set(by_name(result)) == {"a"}
    assert by_name(result)["a"][0] < by_name(result)["a"][1]


def test_non_float_is_listed_once_whatever_the_number_of_runs() -> None:
    model = ir.from_proto(side_branch_model())
    result = calibrate(model, values_named(model, "shp", "a"), row_feeds(9, seed=1), batch_size=2)
    assert result.non_float == ("shp",)


def test_tensors_without_any_finite_value_are_unobserved(caplog: pytest.LogCaptureFixture) -> None:
    model = ir.from_proto(side_branch_model())
    values = values_named(model, "never", "empty", "y")
    with caplog.at_level(logging.INFO, logger="onnxq.calibrate.collect"):
        result = calibrate(model, values, row_feeds(5, seed=13))
    assert result.unobserved == ("empty",)
    # Log(0) holds -inf only: no finite value, and an infinity that no range may clamp.
    assert result.non_finite == ("never",)
    assert set(by_name(result)) == {"y"}
    assert result.non_float == ()
    assert any("1 tensors never held a finite value" in r.getMessage() for r in caplog.records)


def test_no_warning_when_every_tensor_was_observed(caplog: pytest.LogCaptureFixture) -> None:
    model = ir.from_proto(side_branch_model())
    with caplog.at_level(logging.WARNING, logger="onnxq.calibrate.collect"):
        result = calibrate(model, values_named(model, "y", "t"), row_feeds(3, seed=13))
    assert result.unobserved == ()
    assert not [r for r in caplog.records if r.name == "onnxq.calibrate.collect"]


def test_non_finite_values_are_ignored_finite_ones_kept() -> None:
    proto = side_branch_model()
    model = ir.from_proto(proto)
    (partly,) = values_named(model, "partly")
    samples = row_feeds(10, seed=14)
    x = np.concatenate([s["x"] for s in samples])
    assert (x <= 0).any() and (x > 0).any()
    result = calibrate(model, [partly], samples)
    finite = reference_tensors(proto, ["partly"], samples)["partly"]
    finite = finite[np.isfinite(finite)]
    assert result.ranges[partly] == (float(finite.min()), float(finite.max()))
    assert np.isfinite(result.ranges[partly]).all()
    np.testing.assert_allclose(result.ranges[partly][1], np.log(x.max()), rtol=1e-6)
    assert result.non_finite == ()  # NaN is skipped; an infinity is not (next test)


def test_a_tensor_holding_an_infinity_gets_no_range() -> None:
    model = ir.from_proto(side_branch_model())
    (clamped,) = values_named(model, "clamped")
    result = calibrate(model, [clamped], row_feeds(10, seed=14))
    assert result.non_finite == ("clamped",) and clamped not in result.ranges


def test_schemes_are_applied_per_value() -> None:
    """The percentile method clips |x| for a symmetric scheme, each side separately otherwise."""
    model = ir.from_proto(side_branch_model())
    (x,) = values_named(model, "x")
    rng = np.random.default_rng(15)
    samples = [{"x": rng.uniform(-0.5, 3.0, (1, 4)).astype(np.float32)} for _ in range(64)]
    feeds = load_feeds(samples, input_specs(model))
    config = CalibrationConfig(method="percentile", percentile=99.0)
    asym = collect_ranges(model, [x], {x: UINT8}, feeds, config, show_progress=False).ranges[x]
    sym = collect_ranges(model, [x], {x: INT8_SYMMETRIC}, feeds, config, show_progress=False).ranges[x]
    assert sym[0] == -sym[1] and sym[1] > 2.5
    assert -0.5 <= asym[0] < -0.4 and 2.5 < asym[1] <= 3.0


def test_every_value_needs_a_scheme() -> None:
    model = ir.from_proto(side_branch_model())
    h, y = values_named(model, "h", "y")
    feeds = load_feeds(row_feeds(2, seed=0), input_specs(model))
    with pytest.raises(KeyError):
        collect_ranges(model, [h, y], {h: UINT8}, feeds, CalibrationConfig(), show_progress=False)


# ---------------------------------------------------------------------------------------------------
# Empty data, nothing to observe, failures


class _NoFeeds:
    """A feed stream that yields nothing (what collect_ranges sees if a source runs dry at once)."""

    num_samples: int | None = None
    num_batches: int | None = None
    samples_per_batch = 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(())


def test_an_empty_feed_stream_raises() -> None:
    model = ir.from_proto(side_branch_model())
    with pytest.raises(OnnxqError, match="calibration data holds no samples"):
        collect_ranges(
            model,
            values_named(model, "y"),
            dict.fromkeys(values_named(model, "y"), UINT8),
            _NoFeeds(),  # type: ignore[arg-type]
            CalibrationConfig(),
            show_progress=False,
        )


def test_an_empty_generator_raises() -> None:
    model = ir.from_proto(side_branch_model())
    feeds = load_feeds(iter([]), input_specs(model))
    with pytest.raises(OnnxqError, match="empty"):
        calibrate(model, values_named(model, "y"), feeds)


def test_nothing_to_observe_opens_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("no session is needed when no tensor needs a range")

    monkeypatch.setattr(extremes, "open_model", fail)
    model = ir.from_proto(side_branch_model())
    feeds = load_feeds(row_feeds(5, seed=0), input_specs(model))
    result = collect_ranges(model, [], {}, feeds, CalibrationConfig(method="mse"), show_progress=False)
    assert result.ranges == {}
    assert (result.samples, result.runs) == (5, 0)
    assert result.method == "mse"
    assert result.fingerprint == ""
    assert result.unobserved == () and result.non_float == ()


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_calibration_runs_with_every_optimisation_and_no_prepacking(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    seen: list[dict[str, object]] = []
    real = extremes.open_model

    def spy(model: ir.Model, **kwargs: object) -> object:
        seen.append(kwargs)
        return real(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(extremes, "open_model", spy)
    model = ir.from_proto(side_branch_model())
    values = values_named(model, "h", "y")
    nodes_before = len(model.graph)
    calibrate(model, values, row_feeds(3, seed=0), method=method)
    if method == "mse":  # its dimension N is symbolic: one run sizes the tensors first
        probe = seen.pop(0)
        assert {o.producer().op_type for o in probe["outputs"]} == {"Size"}  # type: ignore[attr-defined]
    assert len(seen) == 1  # one session for all the data
    assert seen[0]["opt_level"] == "all"
    assert seen[0]["prepack"] is False
    outputs = list(seen[0]["outputs"])  # type: ignore[call-overload]
    if method == "minmax":  # per-row extremes computed in the run, not the tensors themselves
        assert not set(outputs) & set(values) and len(outputs) == 3 * len(values)
        assert {o.producer().op_type for o in outputs} == {"ReduceMin", "ReduceMax", "ReduceSum"}
    else:  # a histogram needs the values
        assert outputs == values
    assert len(model.graph) == nodes_before  # the reductions were taken out again


def test_a_model_that_fails_on_the_data_raises_a_one_line_error() -> None:
    proto = builders.parse(
        """
        fails (float[N] x) => (float[2,3] y) {
            r = Relu (x)
            y = Reshape (r, shape)
        }
        """,
        {"shape": np.array([2, 3], np.int64)},
    )
    model = ir.from_proto(proto)
    (r,) = values_named(model, "r")
    good = [{"x": np.arange(6, dtype=np.float32)}]
    assert calibrate(model, [r], good).ranges[r] == (0.0, 5.0)
    with pytest.raises(OnnxqError, match="Reshape") as info:
        calibrate(model, [r], [{"x": np.arange(5, dtype=np.float32)}])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["auto", "entropy"])
def test_tensors_beyond_the_run_budget_are_observed_in_groups_with_the_same_ranges(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Histogram methods fetch tensors whole; past ``HISTOGRAM_RUN_BYTES`` a batch's tensors are fetched
    in groups, one pass over the data each: the observers see the same batches in the same order, so
    every range, every candidate range of ``auto`` (both halves) and the counts come out the same."""
    samples = row_feeds(7, seed=4, width=4)
    names = ("x", "h", "y", "pos")

    def collect(budget: int) -> tuple[CalibrationResult, list[list[str]]]:
        monkeypatch.setattr(collect_module, "HISTOGRAM_RUN_BYTES", budget)
        sessions: list[list[str]] = []
        real = extremes.open_model

        def spy(model: ir.Model, **kwargs: object) -> object:
            sessions.append([v.name or "" for v in kwargs["outputs"]])  # type: ignore[attr-defined]
            return real(model, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(extremes, "open_model", spy)
        model = ir.from_proto(side_branch_model())
        result = calibrate(model, values_named(model, *names), samples, method=method)
        monkeypatch.setattr(extremes, "open_model", real)
        return result, sessions

    whole, whole_sessions = collect(1 << 30)
    grouped, grouped_sessions = collect(4 * 4 + 4 * 3)  # x and h's [1, 4] fit; y and pos one group more
    assert len(whole_sessions) == 2  # the size probe (N is symbolic), then one pass
    assert grouped_sessions[1:] == [["x", "h"], ["y", "pos"]]
    assert by_name(grouped) == by_name(whole) and len(by_name(whole)) == len(names)
    assert (grouped.samples, grouped.runs, grouped.fingerprint) == (
        whole.samples,
        whole.runs,
        whole.fingerprint,
    )
    for kind, ranges in whole.candidates.items():
        assert {v.name: r for v, r in grouped.candidates[kind].items()} == {
            v.name: r for v, r in ranges.items()
        }
    for kind, ranges in whole.fit_candidates.items():
        assert {v.name: r for v, r in grouped.fit_candidates[kind].items()} == {
            v.name: r for v, r in ranges.items()
        }
