"""Min-max calibration from extremes computed inside the run (onnxq.calibrate.extremes).

The reductions must change nothing but memory: every range, every report (non-finite, sentinel, empty,
non-float) must be what observing the whole tensors gives.
"""

from __future__ import annotations

import builders
import numpy as np
import onnx_ir as ir
import pytest

from onnxq.calibrate import collect, extremes
from onnxq.calibrate.collect import CalibrationResult, collect_ranges
from onnxq.config import ActivationScheme, CalibrationConfig
from onnxq.data import input_specs, load_feeds
from onnxq.runtime.session import SessionError

# The values a calibration may meet: plain activations (h, a, y, the graph input x), one of unknown
# rank (u: no shape given), a -1e9 attention-style mask (masked), an infinity (never), NaN where x < 0
# (partly), an empty tensor (empty) and a non-float one (shp).
MODEL = """
extremes (float[N,4] x) => (float[N,3] y) {
    h = MatMul (x, w)
    a = Add (h, b)
    y = Relu (a)
    u = Tanh (a)
    masked = Add (x, mask)
    zero = Sub (x, x)
    never = Log (zero)
    partly = Log (x)
    empty = Slice (x, starts, ends, axes)
    shp = Shape (x)
}
"""

NAMES = ("x", "h", "a", "y", "u", "masked", "never", "partly", "empty", "shp")


def model() -> ir.Model:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(0.0, 0.5, (4, 3)).astype(np.float32),
        "b": rng.normal(0.0, 0.1, (3,)).astype(np.float32),
        "mask": np.array([-1e9, 0.0, 0.0, 0.0], np.float32),  # one position masked out, as attention does
        "starts": np.array([0], np.int64),
        "ends": np.array([0], np.int64),
        "axes": np.array([1], np.int64),
    }
    loaded = ir.from_proto(builders.parse(MODEL, arrays))
    for node in loaded.graph:
        for out in node.outputs:
            if out.name == "u":
                out.shape = None  # rank unknown: reduced over the whole tensor
            elif out.name in ("h", "a", "masked"):
                out.type = ir.TensorType(ir.DataType.FLOAT)
                out.shape = ir.Shape(["N", 4 if out.name == "masked" else 3])
    return loaded


def values(loaded: ir.Model) -> list[ir.Value]:
    found = {v.name: v for v in loaded.graph.inputs}
    found.update({out.name: out for node in loaded.graph for out in node.outputs})
    return [found[name] for name in NAMES]


def feeds(count: int, rows: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": (3 * rng.standard_normal((rows, 4))).astype(np.float32)} for _ in range(count)]


def run(method: str, batch: int, *, whole: bool, monkeypatch: pytest.MonkeyPatch) -> CalibrationResult:
    loaded = model()
    observed = values(loaded)
    monkeypatch.setattr(collect, "EXTREMES_METHODS", () if whole else ("minmax", "moving_average"))
    data = load_feeds(feeds(7), input_specs(loaded), batch_size=batch)
    config = CalibrationConfig(method=method, batch_size=batch)  # type: ignore[arg-type]
    schemes = dict.fromkeys(observed, ActivationScheme())
    return collect_ranges(loaded, observed, schemes, data, config, show_progress=False)


def summary(result: CalibrationResult) -> tuple[object, ...]:
    ranges = {value.name: found for value, found in result.ranges.items()}
    return ranges, result.unobserved, result.non_float, result.non_finite, result.samples, result.runs


@pytest.mark.parametrize(
    ("method", "batch"), [("minmax", 1), ("minmax", 3), ("moving_average", 1), ("moving_average", 3)]
)
def test_extremes_give_exactly_what_the_whole_tensors_give(
    method: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reduced = summary(run(method, batch, whole=False, monkeypatch=monkeypatch))
    whole = summary(run(method, batch, whole=True, monkeypatch=monkeypatch))
    assert reduced == whole
    ranges, unobserved, non_float, non_finite, *_ = reduced
    assert set(ranges) == {"x", "h", "a", "y", "u", "partly"}  # NaN ignored, finite values kept
    assert "never" in non_finite and "masked" in non_finite  # an infinity; a -1e9 sentinel
    assert "empty" in unobserved and "shp" in non_float


def test_only_small_arrays_come_back_for_plain_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[list[np.ndarray]] = []
    real = extremes.run

    def spy(session: object, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        out = real(session, feed, names)  # type: ignore[arg-type]
        fetched.append(out)
        return out

    monkeypatch.setattr(extremes, "run", spy)
    loaded = model()
    observed = [v for v in values(loaded) if v.name in ("h", "a", "y")]
    rows = 64
    data = load_feeds(feeds(2, rows=rows), input_specs(loaded), batch_size=rows)
    config = CalibrationConfig(method="minmax", batch_size=rows)
    collect_ranges(
        loaded, observed, dict.fromkeys(observed, ActivationScheme()), data, config, show_progress=False
    )
    assert len(fetched) == data.num_batches  # no widening, no second run
    for outputs in fetched:  # per tensor, one minimum, maximum and sum per row; never the tensor itself
        assert len(outputs) == 9 and all(o.ndim == 1 and o.size % rows == 0 for o in outputs)


def test_reductions_follow_their_producers_and_leave_the_model_as_it_was() -> None:
    loaded = model()
    observed = [v for v in values(loaded) if v.name in ("x", "h", "u")]
    before = [node.name for node in loaded.graph]
    added, pairs = extremes.add_extremes(loaded, observed, per_row=False)
    order = [node.op_type for node in loaded.graph]
    names = [node.name for node in loaded.graph]
    matmul = names.index(next(n.name for n in loaded.graph if n.op_type == "MatMul"))
    reductions = ["ReduceMin", "ReduceMax", "ReduceSum"]
    assert order[matmul + 1 : matmul + 5] == ["Flatten", *reductions]  # h's, right after it
    assert order[:6] == ["Constant", "Flatten", *reductions, "MatMul"]  # the axes, then x (an input)
    tanh = order.index("Tanh")
    assert order[tanh + 1 : tanh + 4] == reductions  # u: rank unknown, no Flatten
    assert set(pairs) == {"x", "h", "u"}
    extremes.remove_nodes(loaded, added)
    assert [node.name for node in loaded.graph] == before


def test_a_session_that_fails_with_the_reductions_falls_back_to_whole_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = summary(run("minmax", 1, whole=True, monkeypatch=monkeypatch))
    real = extremes.run
    calls: list[int] = []

    def flaky(session: object, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        calls.append(len(names))
        if any(name.endswith("_row_min") for name in names):
            raise SessionError("onnxruntime: node failed", "node failed")
        return real(session, feed, names)  # type: ignore[arg-type]

    monkeypatch.setattr(extremes, "run", flaky)
    assert summary(run("minmax", 1, whole=False, monkeypatch=monkeypatch)) == expected
    assert len(calls) == 7 + 1  # one failed try, then every feed once with whole tensors


def test_plain_extremes() -> None:
    one = np.array([1.0])
    assert extremes.plain(np.array([-3.0, 0.0]), np.array([2.0, 1e7]), np.array([5.0, 3.0]))
    assert not extremes.plain(np.array([-np.inf]), one, one)
    assert not extremes.plain(np.array([-1.0]), one, np.array([np.nan]))  # a NaN the extremes skipped
    assert not extremes.plain(np.array([-1e9]), one, one)  # a mask: the values are needed
    assert not extremes.plain(np.array([np.inf]), np.array([-np.inf]), np.array([0.0]))  # an empty row
    assert extremes.plain(np.zeros(0), np.zeros(0), np.zeros(0))  # no row at all: nothing to observe


def test_reductions_onnxruntime_refuses_fall_back_to_whole_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = summary(run("minmax", 1, whole=True, monkeypatch=monkeypatch))
    real = extremes.add_extremes

    def broken(model: ir.Model, values: object, *, per_row: bool = True) -> object:
        added, fetch = real(model, values, per_row=per_row)  # type: ignore[arg-type]
        added[-1].attributes["axes"] = ir.AttrInt64s("axes", [7])  # an axis the tensor does not have
        return added, fetch

    monkeypatch.setattr(extremes, "add_extremes", broken)
    loaded = model()
    nodes = len(loaded.graph)
    observed = values(loaded)
    data = load_feeds(feeds(7), input_specs(loaded))
    schemes = dict.fromkeys(observed, ActivationScheme())
    result = collect_ranges(loaded, observed, schemes, data, CalibrationConfig(), show_progress=False)
    assert summary(result) == expected
    assert len(loaded.graph) == nodes


def test_main_graph_tensors_of_a_model_with_bodies_come_back_as_extremes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tensor inside an If branch is lifted out whole; the main graph's are reduced in the same run."""
    sessions: list[list[str]] = []
    real = extremes.open_model

    def spy(model: ir.Model, **kwargs: object) -> object:
        sessions.append([v.producer().op_type if v.producer() else "input" for v in kwargs["outputs"]])  # type: ignore[attr-defined]
        return real(model, **kwargs)  # type: ignore[arg-type]

    def calibrate(whole: bool) -> tuple[object, ...]:
        loaded = ir.from_proto(builders.if_conv_model())
        found = {out.name: out for node in loaded.graph.all_nodes() for out in node.outputs}
        observed = [loaded.graph.inputs[0], found["h"], found["t"]]  # x, h: main graph; t: then-branch
        monkeypatch.setattr(collect, "EXTREMES_METHODS", () if whole else ("minmax",))
        rng = np.random.default_rng(5)
        samples = [
            {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(bool(i % 2))}
            for i in range(4)
        ]
        data = load_feeds(samples, input_specs(loaded))
        schemes = dict.fromkeys(observed, ActivationScheme())
        return summary(
            collect_ranges(loaded, observed, schemes, data, CalibrationConfig(), show_progress=False)
        )

    monkeypatch.setattr(extremes, "open_model", spy)
    reduced = calibrate(whole=False)
    assert sessions[-1].count("ReduceMin") == 2 and "If" in sessions[-1]  # x and h reduced, t lifted whole
    assert reduced == calibrate(whole=True)
    assert set(reduced[0]) == {"x", "h", "t"}  # type: ignore[call-overload]


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_reductions_load_and_agree_at_every_opset(opset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """ReduceSum takes its axes as an input from opset 13, ReduceMin/ReduceMax from 18."""
    text = """
    chain (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        h = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w)
        y = Relu (h)
    }
    """
    rng = np.random.default_rng(opset)
    proto = builders.parse(text, {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)}, opset=opset)
    samples = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]

    def ranges(whole: bool) -> dict[str | None, tuple[float, float]]:
        loaded = ir.from_proto(proto)
        found = {out.name: out for node in loaded.graph for out in node.outputs}
        observed = [loaded.graph.inputs[0], found["h"], found["y"]]
        for value in observed:
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = ir.Shape(["N", 3 if value.name == "x" else 4, 8, 8])
        monkeypatch.setattr(collect, "EXTREMES_METHODS", () if whole else ("minmax",))
        data = load_feeds(samples, input_specs(loaded))
        schemes = dict.fromkeys(observed, ActivationScheme())
        result = collect_ranges(loaded, observed, schemes, data, CalibrationConfig(), show_progress=False)
        return {value.name: found for value, found in result.ranges.items()}

    opened: list[set[str]] = []
    real = extremes.open_model

    def spy(model: ir.Model, **kwargs: object) -> object:
        opened.append({v.producer().op_type for v in kwargs["outputs"] if v.producer()})  # type: ignore[attr-defined]
        return real(model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(extremes, "open_model", spy)
    reduced = ranges(whole=False)
    assert opened == [
        {"ReduceMin", "ReduceMax", "ReduceSum"}
    ]  # one session, ONNX Runtime took the reductions
    assert reduced == ranges(whole=True) and set(reduced) == {"x", "h", "y"}
