"""Calibrating tensors that live inside If/Loop/Scan bodies: expose_values + collect_ranges.

Every range is checked against the tensor itself, computed with numpy by simulating the model (branch
by branch, iteration by iteration) or by an equivalent flat model: an If-branch tensor gets the range of
the samples that took its branch, in the calibration method; a Loop/Scan body tensor gets the min-max
over every iteration of every sample, whatever the method; a tensor no sample ever computed is
``unobserved``. The model handed in is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.calibrate.collect import CalibrationResult, collect_ranges
from onnxq.calibrate.observers import make_observer
from onnxq.calibrate.subgraphs import Exposed, expose_values, merge_exposed
from onnxq.config import ActivationScheme, CalibrationConfig
from onnxq.data import input_specs, load_feeds
from onnxq.preprocess import unique_names

UINT8 = ActivationScheme()
Samples = list[dict[str, np.ndarray]]
Ranges = dict[str, tuple[float, float]]


def all_values(model: ir.Model) -> dict[str, ir.Value]:
    """Every graph input and node output of every graph, by name (the main graph's first)."""
    found: dict[str, ir.Value] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.inputs:
            found.setdefault(value.name or "", value)
        for node in graph:
            for out in node.outputs:
                found.setdefault(out.name or "", out)
    return found


def values_named(model: ir.Model, *names: str) -> list[ir.Value]:
    found = all_values(model)
    return [found[name] for name in names]


def calibrate(
    model: ir.Model,
    values: Sequence[ir.Value],
    samples: Samples,
    config: CalibrationConfig | None = None,
) -> CalibrationResult:
    feeds = load_feeds(samples, input_specs(model))
    config = config or CalibrationConfig()
    return collect_ranges(model, values, dict.fromkeys(values, UINT8), feeds, config, show_progress=False)


def by_name(result: CalibrationResult) -> Ranges:
    return {value.name or "": rng for value, rng in result.ranges.items()}


def calibrate_names(
    proto: onnx.ModelProto, names: Sequence[str], samples: Samples, config: CalibrationConfig | None = None
) -> CalibrationResult:
    model = ir.from_proto(proto)
    return calibrate(model, values_named(model, *names), samples, config)


def min_max(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    flat = np.concatenate([np.ravel(a) for a in arrays])
    return float(flat.min()), float(flat.max())


def assert_ranges(actual: Ranges, expected: Mapping[str, Sequence[np.ndarray]]) -> None:
    """``actual`` holds exactly the min/max of each expected tensor's arrays (up to float rounding)."""
    assert set(actual) == set(expected)
    for name, arrays in expected.items():
        np.testing.assert_allclose(actual[name], min_max(arrays), rtol=1e-5, atol=1e-6, err_msg=name)


def strictly_inside(inner: tuple[float, float], outer: tuple[float, float]) -> bool:
    return outer[0] < inner[0] and inner[1] < outer[1]


# ---------------------------------------------------------------------------------------------------
# If: a tensor in either branch, one that is already a branch output, main-graph tensors beside them

IF_MODEL = """
if_calib (float[2,4] x, bool cond) => (float[2,3] y) {
    h = MatMul (x, w0)
    y = If (cond) <
        then_branch = then_g () => (float[2,3] t) {
            ta = MatMul (h, wt)
            t = Relu (ta)
        },
        else_branch = else_g () => (float[2,3] e) {
            ea = Mul (h, two)
            e = Tanh (ea)
        }
    >
}
"""


def if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {
        "w0": rng.normal(0.0, 0.5, (4, 3)).astype(np.float32),
        "wt": rng.normal(0.0, 0.5, (3, 3)).astype(np.float32),
        "two": np.array(2.0, np.float32),
    }
    proto: onnx.ModelProto = builders.parse(IF_MODEL, arrays)
    return proto


def if_reference(proto: onnx.ModelProto, samples: Samples) -> dict[str, list[np.ndarray]]:
    """The If model's tensors per name, from numpy: only the samples that took a branch hold its own."""
    w = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    tensors: dict[str, list[np.ndarray]] = {name: [] for name in ("x", "h", "ta", "t", "ea", "e", "y")}
    for feed in samples:
        h = feed["x"] @ w["w0"]
        tensors["x"].append(feed["x"])
        tensors["h"].append(h)
        if bool(feed["cond"]):
            ta = h @ w["wt"]
            y = np.maximum(ta, 0.0)
            tensors["ta"].append(ta)
            tensors["t"].append(y)
        else:
            ea = h * w["two"]
            y = np.tanh(ea)
            tensors["ea"].append(ea)
            tensors["e"].append(y)
        tensors["y"].append(y)
    return tensors


def if_samples(count: int, seed: int, conds: Sequence[bool] = (True, False)) -> Samples:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((2, 4)).astype(np.float32), "cond": np.array(conds[i % len(conds)])}
        for i in range(count)
    ]


def test_if_reference_is_what_the_model_computes() -> None:
    """The numpy simulation the tests compare with is the model's own computation."""
    proto = if_model()
    samples = if_samples(4, seed=1)
    reference = if_reference(proto, samples)
    for feed, expected in zip(samples, reference["y"], strict=True):
        np.testing.assert_allclose(builders.run_disabled(proto, feed)[0], expected, rtol=1e-5, atol=1e-6)


def test_if_branch_tensors_get_the_range_of_the_samples_that_took_their_branch() -> None:
    proto = if_model()
    samples = if_samples(10, seed=2)
    names = ("ta", "t", "ea", "e", "h", "y")
    result = calibrate_names(proto, names, samples)
    reference = if_reference(proto, samples)
    assert_ranges(by_name(result), {name: reference[name] for name in names})
    assert result.unobserved == () and result.non_float == ()
    assert (result.samples, result.runs) == (10, 10)
    ranges = by_name(result)
    # t (already the then-branch output) is the Relu of ta: lifted as itself, not as ta or as garbage
    assert ranges["t"][0] == 0.0 and ranges["ta"][0] < 0.0
    assert ranges["t"][1] == pytest.approx(ranges["ta"][1])
    # each branch saw only its own samples: neither range is that of the If output over all samples
    assert ranges["y"][0] == pytest.approx(min(ranges["t"][0], ranges["e"][0]))
    assert ranges["e"] != ranges["y"] and ranges["t"] != ranges["y"]


@pytest.mark.parametrize(
    ("cond", "seen", "never"), [(True, ("ta", "t"), ("ea", "e")), (False, ("ea", "e"), ("ta", "t"))]
)
def test_a_branch_the_data_never_takes_is_unobserved(
    cond: bool, seen: tuple[str, ...], never: tuple[str, ...]
) -> None:
    proto = if_model()
    samples = if_samples(6, seed=3, conds=(cond,))
    names = ("ta", "t", "ea", "e", "h")
    result = calibrate_names(proto, names, samples)
    assert result.unobserved == never  # in the order they were asked for
    assert result.non_float == ()
    reference = if_reference(proto, samples)
    assert_ranges(by_name(result), {name: reference[name] for name in (*seen, "h")})


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "moving_average"])
def test_if_branch_tensors_use_the_calibration_method(method: str) -> None:
    """An If-branch tensor reaches the observer as itself (not reduced): its range is the one the method
    gives on an equivalent flat model fed only the samples that took the branch."""
    proto = if_model()
    samples = if_samples(12, seed=4)
    config = CalibrationConfig(method=method, percentile=99.0)  # type: ignore[arg-type]
    result = by_name(calibrate_names(proto, ["ta", "e"], samples, config))
    flat = builders.parse(
        """
        flat (float[2,4] x) => (float[2,3] e) {
            h = MatMul (x, w0)
            ta = MatMul (h, wt)
            ea = Mul (h, two)
            e = Tanh (ea)
        }
        """,
        {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer},
    )
    then_samples = [{"x": s["x"]} for s in samples if bool(s["cond"])]
    else_samples = [{"x": s["x"]} for s in samples if not bool(s["cond"])]
    expected_ta = by_name(calibrate_names(flat, ["ta"], then_samples, config))["ta"]
    expected_e = by_name(calibrate_names(flat, ["e"], else_samples, config))["e"]
    np.testing.assert_allclose(result["ta"], expected_ta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["e"], expected_e, rtol=1e-5, atol=1e-6)
    if method in ("mse", "entropy"):  # on so few values both keep the whole range (entropy: 99 % kept)
        return
    # the method made a difference: not the min-max range
    reference = if_reference(proto, samples)
    assert result["ta"] != pytest.approx(min_max(reference["ta"]), rel=1e-6, abs=1e-7)


def test_exposed_if_copy_returns_branch_values_or_empty_and_keeps_the_original_outputs() -> None:
    proto = if_model()
    model = ir.from_proto(proto)
    copy, exposed = expose_values(model, ["ta", "t", "ea", "h"])
    assert exposed["h"] == Exposed(("h",), reduced=False)
    assert all(not exposed[n].reduced and len(exposed[n].outputs) == 1 for n in ("ta", "t", "ea"))
    out_names = [v.name for v in copy.graph.outputs]
    assert out_names[0] == "y"
    assert {name for n in ("ta", "t", "ea", "h") for name in exposed[n].outputs} <= set(out_names)
    if_node = next(n for n in copy.graph if n.op_type == "If")
    then_g = if_node.attributes["then_branch"].as_graph()
    else_g = if_node.attributes["else_branch"].as_graph()
    assert len(then_g.outputs) == len(else_g.outputs) == len(if_node.outputs) == 4
    reference_rows = if_samples(2, seed=5)
    for feed in reference_rows:
        outs = dict(zip(out_names, builders.run_disabled(copy, feed), strict=True))
        np.testing.assert_array_equal(outs["y"], builders.run_disabled(proto, feed)[0])
        expected = if_reference(proto, [feed])
        for name in ("ta", "t", "ea"):
            got = merge_exposed([outs[o] for o in exposed[name].outputs], reduced=False)
            if expected[name]:
                np.testing.assert_allclose(got, expected[name][0], rtol=1e-5, atol=1e-6)
            else:  # the branch not taken: an empty float tensor, which the observer skips
                assert got.size == 0 and got.dtype == np.float32


# ---------------------------------------------------------------------------------------------------
# Loop: a MatMul of the loop-carried value with a constant weight, 3–5 iterations per sample

LOOP_MODEL = """
loop_calib (float[1,4] x, int64 M) => (float[1,4] y, float[K,1,4] ms) {
    y, ms = Loop (M, keep, x) <
        body = loop_body (int64 i, bool c, float[1,4] s) => (bool c_out, float[1,4] s_out, float[1,4] m) {
            c_out = Identity (c)
            m = MatMul (s, w)
            s_out = Tanh (m)
        }
    >
}
"""


def loop_model() -> onnx.ModelProto:
    # a gain of about 2: the carried value grows over the iterations, so the first iteration alone does
    # not give the range
    w = np.random.default_rng(0).normal(0.0, 1.0, (4, 4)).astype(np.float32)
    proto: onnx.ModelProto = builders.parse(LOOP_MODEL, {"w": w, "keep": np.array(True)})
    return proto


def loop_samples(count: int, seed: int, trips: Sequence[int] = (3, 4, 5)) -> Samples:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.uniform(-0.25, 0.25, (1, 4)).astype(np.float32),
            "M": np.array(trips[i % len(trips)], np.int64),
        }
        for i in range(count)
    ]


def loop_reference(proto: onnx.ModelProto, samples: Samples) -> dict[str, list[list[np.ndarray]]]:
    """Per name, per sample, the tensor at every iteration (numpy simulation of the Loop)."""
    w = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "w")
    tensors: dict[str, list[list[np.ndarray]]] = {"s": [], "m": [], "s_out": []}
    for feed in samples:
        per: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
        s = feed["x"]
        for _ in range(int(feed["M"])):
            m = s @ w
            per["s"].append(s)
            per["m"].append(m)
            s = np.tanh(m)
            per["s_out"].append(s)
        for name in tensors:
            tensors[name].append(per[name])
    return tensors


def every_iteration(per_sample: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [a for iterations in per_sample for a in iterations]


def test_loop_reference_is_what_the_model_computes() -> None:
    proto = loop_model()
    samples = loop_samples(3, seed=1)
    reference = loop_reference(proto, samples)
    for i, feed in enumerate(samples):
        y, ms = builders.run_disabled(proto, feed)
        np.testing.assert_allclose(y, reference["s_out"][i][-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ms, np.stack(reference["m"][i]), rtol=1e-5, atol=1e-6)


def test_loop_body_tensors_get_the_min_max_over_every_iteration() -> None:
    proto = loop_model()
    samples = loop_samples(9, seed=2)
    # m is already a (scan) output of the body; s is the body's iteration input; s_out its carried output
    names = ("m", "s", "s_out")
    result = calibrate_names(proto, names, samples)
    reference = loop_reference(proto, samples)
    assert_ranges(by_name(result), {name: every_iteration(reference[name]) for name in names})
    assert result.unobserved == () and result.non_float == ()
    # the range really spans the iterations: the first iteration alone does not give it
    for name in names:
        first = min_max([iterations[0] for iterations in reference[name]])
        whole = min_max(every_iteration(reference[name]))
        assert whole[0] < first[0] or first[1] < whole[1], name


def test_loop_trip_counts_of_zero() -> None:
    """A sample whose Loop runs no iteration contributes nothing; if none runs, the body is unobserved."""
    proto = loop_model()
    samples = loop_samples(6, seed=3, trips=(0, 3))
    result = calibrate_names(proto, ["m", "s", "x"], samples)
    reference = loop_reference(proto, samples)
    expected = {name: every_iteration(reference[name]) for name in ("m", "s")}
    assert_ranges(by_name(result), {**expected, "x": [s["x"] for s in samples]})
    never = calibrate_names(proto, ["m", "s", "x"], loop_samples(3, seed=3, trips=(0,)))
    assert never.unobserved == ("m", "s")
    assert set(by_name(never)) == {"x"}


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_loop_body_tensors_get_min_max_whatever_the_method(method: str) -> None:
    """Documented: Loop/Scan body tensors reach the observer as per-iteration minima and maxima, so they
    get a min-max range; main-graph tensors of the same calibration use the method."""
    proto = loop_model()
    samples = loop_samples(12, seed=4)
    config = CalibrationConfig(method=method, percentile=99.0)  # type: ignore[arg-type]
    result = by_name(calibrate_names(proto, ["m", "s", "x", "y"], samples, config))
    reference = loop_reference(proto, samples)
    for name in ("m", "s"):
        np.testing.assert_allclose(
            result[name], min_max(every_iteration(reference[name])), rtol=1e-5, atol=1e-6, err_msg=name
        )
    # the main-graph input x: exactly what the method's own observer gives on the samples' x
    observer = make_observer(config, dtype=UINT8.dtype, symmetric=UINT8.symmetric)
    for feed in samples:
        observer.update(feed["x"], num_samples=1)
    assert result["x"] == pytest.approx(observer.compute_range(), rel=1e-6, abs=1e-7)
    if method != "entropy":  # on so few values entropy keeps the whole range (99 % kept)
        assert result["x"] != pytest.approx(min_max([s["x"] for s in samples]), rel=1e-6, abs=1e-7)


def test_exposed_loop_copy_stacks_per_iteration_minima_and_maxima() -> None:
    proto = loop_model()
    copy, exposed = expose_values(ir.from_proto(proto), ["m", "s"])
    assert all(e.reduced and len(e.outputs) == 2 for e in exposed.values())
    out_names = [v.name for v in copy.graph.outputs]
    assert out_names[:2] == ["y", "ms"]
    feed = loop_samples(1, seed=5, trips=(4,))[0]
    outs = dict(zip(out_names, builders.run_disabled(copy, feed), strict=True))
    for name, value in zip(("y", "ms"), builders.run_disabled(proto, feed), strict=True):
        np.testing.assert_array_equal(outs[name], value)  # the original outputs are unchanged
    reference = loop_reference(proto, [feed])
    for name in ("m", "s"):
        lows, highs = (outs[o] for o in exposed[name].outputs)
        assert lows.shape == highs.shape == (4,)  # one scalar per iteration
        np.testing.assert_allclose(lows, [a.min() for a in reference[name][0]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(highs, [a.max() for a in reference[name][0]], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Scan: with and without scan_output_axes / scan_output_directions (the lifter must extend them)

SCAN_MODEL = """
scan_calib (float[3] init, float[5,3] xs) => (float[3] final, float[{ys_shape}] ys) {{
    final, ys = Scan (init, xs) <
        num_scan_inputs = 1, {attributes}
        body = scan_body (float[3] s, float[3] xt) => (float[3] s_out, float[3] yt) {{
            m = MatMul (xt, w)
            s_out = Add (s, m)
            yt = Tanh (s_out)
        }}
    >
}}
"""

SCAN_ATTRIBUTES = {
    "plain": ("", "5,3"),
    "output_axes": ("scan_output_axes = [1],", "3,5"),
    "output_axes_and_directions": ("scan_output_axes = [1], scan_output_directions = [1],", "3,5"),
    "output_directions": ("scan_output_directions = [1],", "5,3"),
}


def scan_model(variant: str) -> onnx.ModelProto:
    attributes, ys_shape = SCAN_ATTRIBUTES[variant]
    w = np.random.default_rng(0).normal(0.0, 0.8, (3, 3)).astype(np.float32)
    proto: onnx.ModelProto = builders.parse(
        SCAN_MODEL.format(attributes=attributes, ys_shape=ys_shape), {"w": w}
    )
    return proto


def scan_samples(count: int, seed: int) -> Samples:
    rng = np.random.default_rng(seed)
    return [
        {
            "init": rng.standard_normal(3).astype(np.float32),
            "xs": rng.standard_normal((5, 3)).astype(np.float32),
        }
        for _ in range(count)
    ]


def scan_reference(proto: onnx.ModelProto, samples: Samples) -> dict[str, list[np.ndarray]]:
    w = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "w")
    tensors: dict[str, list[np.ndarray]] = {"s": [], "xt": [], "m": [], "s_out": [], "yt": []}
    for feed in samples:
        s = feed["init"]
        for xt in feed["xs"]:
            m = xt @ w
            tensors["s"].append(s)
            tensors["xt"].append(xt)
            tensors["m"].append(m)
            s = s + m
            tensors["s_out"].append(s)
            tensors["yt"].append(np.tanh(s))
    return tensors


@pytest.mark.parametrize("variant", list(SCAN_ATTRIBUTES))
def test_scan_body_tensors_get_the_min_max_over_every_step(variant: str) -> None:
    proto = scan_model(variant)
    samples = scan_samples(5, seed=1)
    names = ("m", "s", "xt", "s_out", "yt")  # yt is already a scan output, s and xt body inputs
    result = calibrate_names(proto, names, samples, CalibrationConfig(method="entropy"))
    reference = scan_reference(proto, samples)
    assert_ranges(by_name(result), {name: reference[name] for name in names})
    assert result.unobserved == () and result.non_float == ()
    first = min_max(reference["s_out"][::5])
    assert strictly_inside(first, min_max(reference["s_out"]))  # the later steps widen the range


@pytest.mark.parametrize("variant", list(SCAN_ATTRIBUTES))
def test_exposed_scan_extends_its_output_attributes_and_keeps_its_outputs(variant: str) -> None:
    proto = scan_model(variant)
    model = ir.from_proto(proto)
    copy, exposed = expose_values(model, ["m"])
    scan = next(n for n in copy.graph if n.op_type == "Scan")
    body = scan.attributes["body"].as_graph()
    scan_outputs = len(body.outputs) - 1  # one state variable
    assert scan_outputs == 3 and len(scan.outputs) == 4
    original = next(n for n in model.graph if n.op_type == "Scan")
    for key in ("scan_output_axes", "scan_output_directions"):
        attr = scan.attributes.get(key)
        before = original.attributes.get(key)
        if before is None:
            assert attr is None
        else:  # the original entries first, then one per lifted output
            assert attr is not None and list(attr.as_ints()) == [*before.as_ints(), 0, 0]
    feed = scan_samples(1, seed=2)[0]
    out_names = [v.name for v in copy.graph.outputs]
    outs = dict(zip(out_names, builders.run_disabled(copy, feed), strict=True))
    for name, value in zip(("final", "ys"), builders.run_disabled(proto, feed), strict=True):
        np.testing.assert_array_equal(outs[name], value)
    lows, highs = (outs[o] for o in exposed["m"].outputs)
    reference = scan_reference(proto, [feed])["m"]
    np.testing.assert_allclose(lows, [a.min() for a in reference], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(highs, [a.max() for a in reference], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Nested bodies: a Loop inside an If branch, an If inside a Loop body, a Loop inside a Loop body

IF_LOOP_MODEL = """
if_loop (float[1,3] x, bool cond, int64 M) => (float[1,3] y) {
    y = If (cond) <
        then_branch = then_g () => (float[1,3] t) {
            t = Loop (M, keep, x) <
                body = inner (int64 i, bool c, float[1,3] s) => (bool c_out, float[1,3] s_out) {
                    c_out = Identity (c)
                    m = MatMul (s, w)
                    s_out = Tanh (m)
                }
            >
        },
        else_branch = else_g () => (float[1,3] e) {
            e = Neg (x)
        }
    >
}
"""

LOOP_IF_MODEL = """
loop_if (float[1,3] x, int64 M) => (float[1,3] y) {
    y = Loop (M, keep, x) <
        body = outer (int64 i, bool c, float[1,3] s) => (bool c_out, float[1,3] s_out) {
            c_out = Identity (c)
            r = Mod (i, two)
            odd = Equal (r, one)
            s_out = If (odd) <
                then_branch = odd_g () => (float[1,3] a) {
                    m = MatMul (s, w)
                    a = Tanh (m)
                },
                else_branch = even_g () => (float[1,3] b) {
                    b = Mul (s, scale)
                }
            >
        }
    >
}
"""

LOOP_LOOP_MODEL = """
loop_loop (float[1,3] x, int64 M, int64 N) => (float[1,3] y) {
    y = Loop (M, keep, x) <
        body = outer (int64 i, bool c, float[1,3] s) => (bool c_out, float[1,3] s_out) {
            c_out = Identity (c)
            u = Mul (s, scale)
            s_out = Loop (N, keep, u) <
                body = inner (int64 j, bool d, float[1,3] v) => (bool d_out, float[1,3] v_out) {
                    d_out = Identity (d)
                    m = MatMul (v, w)
                    v_out = Tanh (m)
                }
            >
        }
    >
}
"""


def nested_arrays() -> dict[str, np.ndarray]:
    return {
        "w": np.random.default_rng(0).normal(0.0, 0.8, (3, 3)).astype(np.float32),
        "keep": np.array(True),
        "two": np.array(2, np.int64),
        "one": np.array(1, np.int64),
        "scale": np.array(-1.5, np.float32),
    }


def nested_model(text: str, opset: int) -> onnx.ModelProto:
    # (an unused initializer is valid)
    proto: onnx.ModelProto = builders.parse(text, nested_arrays(), opset=opset)
    return proto


def simulate_if_loop(samples: Samples) -> dict[str, list[np.ndarray]]:
    w = nested_arrays()["w"]
    tensors: dict[str, list[np.ndarray]] = {"m": [], "s": [], "e": []}
    for feed in samples:
        if bool(feed["cond"]):
            s = feed["x"]
            for _ in range(int(feed["M"])):
                tensors["s"].append(s)
                m = s @ w
                tensors["m"].append(m)
                s = np.tanh(m)
        else:
            tensors["e"].append(-feed["x"])
    return tensors


def simulate_loop_if(samples: Samples) -> dict[str, list[np.ndarray]]:
    arrays = nested_arrays()
    tensors: dict[str, list[np.ndarray]] = {"m": [], "a": [], "b": [], "s": []}
    for feed in samples:
        s = feed["x"]
        for i in range(int(feed["M"])):
            tensors["s"].append(s)
            if i % 2 == 1:
                m = s @ arrays["w"]
                s = np.tanh(m)
                tensors["m"].append(m)
                tensors["a"].append(s)
            else:
                s = s * arrays["scale"]
                tensors["b"].append(s)
    return tensors


def simulate_loop_loop(samples: Samples) -> dict[str, list[np.ndarray]]:
    arrays = nested_arrays()
    tensors: dict[str, list[np.ndarray]] = {"m": [], "v": [], "u": []}
    for feed in samples:
        s = feed["x"]
        for _ in range(int(feed["M"])):
            v = s * arrays["scale"]
            tensors["u"].append(v)
            for _ in range(int(feed["N"])):
                tensors["v"].append(v)
                m = v @ arrays["w"]
                tensors["m"].append(m)
                v = np.tanh(m)
            s = v
    return tensors


def nested_samples(count: int, seed: int, **fixed: object) -> Samples:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        sample = {
            "x": (2.0 * rng.standard_normal((1, 3))).astype(np.float32),
            "cond": np.array(i % 2 == 0),
            "M": np.array(2 + i % 3, np.int64),
            "N": np.array(3 - i % 2, np.int64),
        }
        for key, value in fixed.items():
            sample[key] = np.asarray(value, dtype=sample[key].dtype)
        samples.append(sample)
    return samples


NESTED: dict[str, tuple[str, tuple[str, ...], Callable[[Samples], dict[str, list[np.ndarray]]]]] = {
    "loop_in_if": (IF_LOOP_MODEL, ("x", "cond", "M"), simulate_if_loop),
    "if_in_loop": (LOOP_IF_MODEL, ("x", "M"), simulate_loop_if),
    "loop_in_loop": (LOOP_LOOP_MODEL, ("x", "M", "N"), simulate_loop_loop),
}


def nested_case(
    case: str, opset: int
) -> tuple[onnx.ModelProto, Callable[[Samples], dict[str, list[np.ndarray]]]]:
    text, _, simulate = NESTED[case]
    return nested_model(text, opset), simulate


def inputs_of(case: str, samples: Samples) -> Samples:
    keys = NESTED[case][1]
    return [{k: s[k] for k in keys} for s in samples]


@pytest.mark.parametrize("opset", [17, 21])  # ReduceMin/Max take axes as an attribute, then as an input
@pytest.mark.parametrize("case", list(NESTED))
def test_nested_body_ranges_match_the_simulation(case: str, opset: int) -> None:
    proto, simulate = nested_case(case, opset)
    samples = inputs_of(case, nested_samples(6, seed=1))
    reference = simulate(samples)
    result = calibrate_names(proto, list(reference), samples)
    assert result.unobserved == () and result.non_float == ()
    assert_ranges(by_name(result), reference)


def test_nested_simulations_are_what_the_models_compute() -> None:
    for case, (text, _, _) in NESTED.items():
        proto = nested_model(text, 17)
        samples = inputs_of(case, nested_samples(3, seed=2))
        for feed in samples:
            final = _simulate_output(case, feed)
            np.testing.assert_allclose(builders.run_disabled(proto, feed)[0], final, rtol=1e-5, atol=1e-6)


def _simulate_output(case: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    arrays = nested_arrays()
    s = feed["x"]
    if case == "loop_in_if":
        if not bool(feed["cond"]):
            return -s
        for _ in range(int(feed["M"])):
            s = np.tanh(s @ arrays["w"])
        return s
    if case == "if_in_loop":
        for i in range(int(feed["M"])):
            s = np.tanh(s @ arrays["w"]) if i % 2 == 1 else s * arrays["scale"]
        return s
    for _ in range(int(feed["M"])):
        v = s * arrays["scale"]
        for _ in range(int(feed["N"])):
            v = np.tanh(v @ arrays["w"])
        s = v
    return s


@pytest.mark.parametrize(
    ("cond", "never"), [(True, ("e",)), (False, ("m", "s"))], ids=["then_only", "else_only"]
)
def test_loop_in_an_untaken_branch_is_unobserved(cond: bool, never: tuple[str, ...]) -> None:
    proto, simulate = nested_case("loop_in_if", 17)
    samples = inputs_of("loop_in_if", nested_samples(4, seed=3, cond=cond))
    result = calibrate_names(proto, ["m", "s", "e"], samples)
    assert result.unobserved == never
    reference = simulate(samples)
    assert_ranges(by_name(result), {name: reference[name] for name in ("m", "s", "e") if name not in never})


def test_if_in_loop_whose_branch_no_iteration_takes_is_unobserved() -> None:
    """One iteration per sample: only the even branch runs; the odd branch's empty placeholder reduced
    to ±inf (or any sentinel) must not leak into the range of anything."""
    proto, simulate = nested_case("if_in_loop", 17)
    samples = inputs_of("if_in_loop", nested_samples(4, seed=4, M=1))
    result = calibrate_names(proto, ["m", "a", "b"], samples)
    assert result.unobserved == ("m", "a")
    assert_ranges(by_name(result), {"b": simulate(samples)["b"]})


# ---------------------------------------------------------------------------------------------------
# The model passed in is left as it was

MODELS: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[str, ...], Callable[[], Samples]]] = {
    "if": (if_model, ("ta", "t", "ea", "e", "h"), lambda: if_samples(4, seed=0)),
    "loop": (loop_model, ("m", "s", "s_out"), lambda: loop_samples(3, seed=0)),
    "scan": (lambda: scan_model("output_axes"), ("m", "s", "yt"), lambda: scan_samples(2, seed=0)),
    "loop_in_if": (
        lambda: nested_case("loop_in_if", 17)[0],
        ("m", "s", "e"),
        lambda: inputs_of("loop_in_if", nested_samples(2, seed=0)),
    ),
    "if_in_loop": (
        lambda: nested_case("if_in_loop", 17)[0],
        ("m", "a", "b"),
        lambda: inputs_of("if_in_loop", nested_samples(2, seed=0)),
    ),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_the_model_is_not_modified(case: str) -> None:
    build, names, samples = MODELS[case]
    proto = build()
    model = ir.from_proto(proto)
    before = builders.serialize(model)
    values = values_named(model, *names)
    copy, exposed = expose_values(model, names)
    assert builders.serialize(model) == before
    assert builders.serialize(copy) != before  # the copy holds the lifted outputs
    assert set(exposed) == set(names)
    calibrate(model, values, samples())
    assert builders.serialize(model) == before
    assert builders.serialize(proto) == builders.serialize(build())
    assert values_named(model, *names) == values  # the very same value objects, still in place


def test_main_graph_values_are_exposed_as_themselves() -> None:
    model = ir.from_proto(if_model())
    copy, exposed = expose_values(model, ["x", "h", "y"])
    assert exposed == {name: Exposed((name,), reduced=False) for name in ("x", "h", "y")}
    assert [v.name for v in copy.graph.outputs] == ["y", "x", "h"]  # y is not listed twice


# ---------------------------------------------------------------------------------------------------
# Found while writing these tests (see the report that came with them)

SAME_NAME_MODEL = """
same_name (float[2,4] x, bool cond) => (float[2,3] y) {
    y = If (cond) <
        then_branch = then_g () => (float[2,3] t) {
            a = MatMul (x, wt)
            t = Relu (a)
        },
        else_branch = else_g () => (float[2,3] e) {
            a = MatMul (x, we)
            e = Neg (a)
        }
    >
}
"""


def test_same_name_in_both_branches_gets_each_its_own_range() -> None:
    """Sibling branches may reuse a name (valid ONNX); calibration keys ranges by name, so the
    pipeline first gives every value its own name (:func:`onnxq.preprocess.unique_names`)."""
    rng = np.random.default_rng(0)
    wt = rng.normal(0.0, 0.5, (4, 3)).astype(np.float32)
    we = rng.normal(0.0, 5.0, (4, 3)).astype(np.float32)
    proto = builders.parse(SAME_NAME_MODEL, {"wt": wt, "we": we})
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    if_node = next(iter(model.graph))
    then_a = next(iter(if_node.attributes["then_branch"].as_graph())).outputs[0]
    else_a = next(iter(if_node.attributes["else_branch"].as_graph())).outputs[0]
    assert then_a.name == else_a.name == "a" and then_a is not else_a
    assert unique_names(model) == 1
    assert then_a.name != else_a.name
    samples = if_samples(8, seed=1)
    result = calibrate(model, [then_a, else_a], samples)
    then_x = [s["x"] for s in samples if bool(s["cond"])]
    else_x = [s["x"] for s in samples if not bool(s["cond"])]
    np.testing.assert_allclose(result.ranges[else_a], min_max([x @ we for x in else_x]), rtol=1e-5)
    np.testing.assert_allclose(result.ranges[then_a], min_max([x @ wt for x in then_x]), rtol=1e-5)


@pytest.mark.parametrize("where", ["if_branch", "loop_body"])
def test_a_body_tensor_that_is_not_float_is_reported(where: str) -> None:
    text = {
        "if_branch": """
            g (float[2,4] x, bool cond, int64 M) => (float[2,4] y) {
                y = If (cond) <
                    then_branch = then_g () => (float[2,4] t) {
                        d = Cast <to = 11> (x)
                        t = Relu (x)
                    },
                    else_branch = else_g () => (float[2,4] e) { e = Neg (x) }
                >
            }""",
        "loop_body": """
            g (float[2,4] x, bool cond, int64 M) => (float[2,4] y) {
                y = Loop (M, cond, x) <
                    body = b (int64 i, bool c, float[2,4] s) => (bool c_out, float[2,4] s_out) {
                        c_out = Identity (c)
                        d = Cast <to = 11> (s)
                        s_out = Neg (s)
                    }
                >
            }""",
    }[where]
    model = ir.from_proto(builders.parse(text))
    (d,) = values_named(model, "d")
    d.type = None  # as shape inference may leave a tensor it could not type
    d.shape = None
    samples = [{"x": np.ones((2, 4), np.float32), "cond": np.array(True), "M": np.array(2, np.int64)}]
    result = calibrate(model, [d], samples)
    if where == "loop_body":  # lifted as it is: found to be double at run time
        assert result.non_float == ("d",)
    else:  # an If branch needs the type for the other branch's placeholder: not lifted, never observed
        assert result.non_float == () and result.unobserved == ("d",)
    assert "d" not in {v.name for v in result.ranges}
