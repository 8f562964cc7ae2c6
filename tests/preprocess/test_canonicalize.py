"""CanonicalizePass: decomposed hard-swish, GELU and LayerNorm rewritten into single ops.

Every rewrite is checked for structure (the pattern's ops are gone, the one op that replaces it is there,
in the right domain, with the right attributes) and run in ONNX Runtime at ORT_DISABLE_ALL against the
original on random inputs that include the kinks of hard-swish (-3, 0, 3). Patterns that differ from the
real ones in a constant, in which tensor they read, or in who else reads an intermediate value must
leave the graph exactly as it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.preprocess import preprocess
from onnxq.preprocess.canonicalize import SHAPED_RULES, CanonicalizePass, write_float_forms

MS = "com.microsoft"
SHAPE = (3, 16)
IO = "(float[3, 16] x) => (float[3, 16] y)"

#: Scalar float32 constants the patterns below read, by name.
SCALARS = {
    "zero": 0.0,
    "one": 1.0,
    "two": 2.0,
    "three": 3.0,
    "five": 5.0,
    "six": 6.0,
    "sixth": 1.0 / 6.0,
    "half": 0.5,
    "point4": 0.4,
    "sqrt2": math.sqrt(2.0),
    "inv_sqrt2": 1.0 / math.sqrt(2.0),
    "sqrt_2_pi": math.sqrt(2.0 / math.pi),
    "k": 0.044715,
    "k_wrong": 0.05,
    "eps": 1e-5,
}


def _parse(graph: str, opset: int, **extra: np.ndarray) -> onnx.ModelProto:
    """A checked model of ``graph`` (parser text) with the used :data:`SCALARS` as initializers."""
    words = set(re.findall(r"\w+", graph))
    arrays: dict[str, np.ndarray] = {
        name: np.array(value, np.float32) for name, value in SCALARS.items() if name in words
    }
    arrays.update({name: array for name, array in extra.items() if name in words})
    proto: onnx.ModelProto = builders.parse(graph, arrays, opset=opset)
    return proto


def _graph(body: str, io: str = IO) -> str:
    return f"g {io} {{\n{body}\n}}"


def _canonicalize(proto: onnx.ModelProto) -> tuple[ir.Model, CanonicalizePass]:
    model = ir.from_proto(proto)
    canonical = CanonicalizePass()
    canonical(model)
    return model, canonical


def _feed(shape: tuple[int, ...] = SHAPE, seed: int = 0, scale: float = 4.0) -> np.ndarray:
    """Random values in ``[-scale, scale]`` whose first entries sit on and around the kinks."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(-scale, scale, shape).astype(np.float32)
    kinks = np.array([-3, 3, 0, -3 - 1e-3, -3 + 1e-3, 3 - 1e-3, 3 + 1e-3, -6, 6, 1e-4, -1e-4], np.float32)
    data.reshape(-1)[: kinks.size] = kinks
    return data


def _assert_same(
    proto: onnx.ModelProto,
    model: ir.Model,
    feeds: list[Mapping[str, np.ndarray]],
    atol: float,
) -> None:
    for feed in feeds:
        expected = builders.run_disabled(proto, feed)
        actual = builders.run_disabled(model, feed)
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def _x_feeds(shape: tuple[int, ...] = SHAPE, scale: float = 4.0) -> list[Mapping[str, np.ndarray]]:
    return [{"x": _feed(shape, seed, scale)} for seed in range(2)]


def _only(model: ir.Model, op_type: str) -> ir.Node:
    [node] = [n for n in model.graph.all_nodes() if n.op_type == op_type]
    return node


def _unchanged(proto: onnx.ModelProto) -> None:
    """The pass finds nothing in ``proto``: no rewrite, no decline, the same bytes."""
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {} and canonical.declined == []
    assert builders.serialize(model) == builders.serialize(ir.from_proto(proto))


# ---------------------------------------------------------------------------------------------------
# Hard-swish

CLIP = "a = Add (x, three)\nc = Clip (a, zero, six)"

HARD_SWISH_FORMS = {
    "div-by-six": f"{CLIP}\nm = Mul (x, c)\ny = Div (m, six)",
    "mul-by-sixth": f"{CLIP}\nm = Mul (c, x)\ny = Mul (m, sixth)",
    "sixth-times-x-first": f"{CLIP}\np = Mul (x, sixth)\ny = Mul (p, c)",
    "sixth-on-the-left": f"{CLIP}\np = Mul (sixth, x)\ny = Mul (c, p)",
    "clip-over-six-first": f"{CLIP}\nd = Div (c, six)\ny = Mul (x, d)",
    "three-plus-x": "a = Add (three, x)\nc = Clip (a, zero, six)\nm = Mul (x, c)\ny = Div (m, six)",
    "hard-sigmoid": "h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)\ny = Mul (x, h)",
    "hard-sigmoid-x-second": "h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)\ny = Mul (h, x)",
}


@pytest.mark.parametrize("opset", [14, 17, 20])
@pytest.mark.parametrize("form", list(HARD_SWISH_FORMS))
def test_hard_swish_forms_become_one_hard_swish(form: str, opset: int) -> None:
    proto = _parse(_graph(HARD_SWISH_FORMS[form]), opset)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"HardSwish": 1} and canonical.declined == []
    assert builders.op_counts(model) == {"HardSwish": 1}
    node = _only(model, "HardSwish")
    assert node.domain == "" and node.inputs[0] is model.graph.inputs[0]
    assert model.graph.outputs[0] is node.outputs[0] and node.outputs[0].name == "y"
    assert MS not in model.opset_imports
    onnx.checker.check_model(ir.to_proto(model))
    _assert_same(proto, model, _x_feeds(scale=7.0), atol=1e-5)


def test_hard_swish_result_matches_the_formula_around_the_kinks() -> None:
    proto = _parse(_graph(HARD_SWISH_FORMS["div-by-six"]), 14)
    model, _ = _canonicalize(proto)
    x = _feed(scale=7.0)
    [y] = builders.run_disabled(model, {"x": x})
    expected = x * np.clip(x + 3, 0, 6) / 6
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    assert y.reshape(-1)[0] == 0.0 and y.reshape(-1)[1] == pytest.approx(3.0) and y.reshape(-1)[2] == 0.0


@pytest.mark.parametrize(
    ("opset", "body"),
    [
        pytest.param(13, HARD_SWISH_FORMS["div-by-six"], id="clip-inputs-opset13"),
        pytest.param(11, HARD_SWISH_FORMS["mul-by-sixth"], id="clip-inputs-opset11"),
        pytest.param(13, HARD_SWISH_FORMS["hard-sigmoid"], id="hard-sigmoid-opset13"),
        pytest.param(
            10,
            "a = Add (x, three)\nc = Clip <min = 0.0, max = 6.0> (a)\nm = Mul (x, c)\ny = Div (m, six)",
            id="clip-attributes-opset10",
        ),
    ],
)
def test_hard_swish_below_opset_14_is_declined_and_kept(opset: int, body: str) -> None:
    proto = _parse(_graph(body), opset)
    before = builders.op_counts(proto)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {}
    assert builders.op_counts(model) == before and "HardSwish" not in before
    [decline] = canonical.declined
    last = body.splitlines()[-1].split("=")[1].split()[0]  # the op type of the pattern's last node
    assert decline.stage == "canonicalize" and decline.code == "no_target"
    assert decline.node == f"<{last} -> y>"
    assert "HardSwish" in decline.message and f"opset {opset}" in decline.message
    assert builders.lines(canonical.declined) == [f"<{last} -> y> not canonicalized: {decline.message}"]
    assert builders.serialize(model) == builders.serialize(ir.from_proto(proto))


def test_clip_attributes_are_read_at_opset_10() -> None:
    """At opset 10 the bounds are attributes: a max of 5 is no hard-swish (no match, so no decline)."""
    body = "a = Add (x, three)\nc = Clip <min = 0.0, max = 5.0> (a)\nm = Mul (x, c)\ny = Div (m, six)"
    _unchanged(_parse(_graph(body), 10))


TWO_IN = "(float[3, 16] x, float[3, 16] z) => (float[3, 16] y)"


TWO_OUT = "(float[3, 16] x) => (float[3, 16] y, float[3, 16] {})"
HSIG = "h = HardSigmoid <alpha = 0.16666667, beta = {beta}> ({x})"


def _hs(add: str = "Add (x, three)", clip: str = "Clip (a, zero, six)", tail: str = "") -> str:
    return "\n".join((f"a = {add}", f"c = {clip}", tail or "m = Mul (x, c)\ny = Div (m, six)"))


HARD_SWISH_LOOKALIKES = {
    "clip-output-is-a-graph-output": (_hs(), TWO_OUT.format("c")),
    "add-output-read-elsewhere": (f"{_hs()}\nz = Neg (a)", TWO_OUT.format("z")),
    "product-read-elsewhere": (f"{_hs()}\nz = Neg (m)", TWO_OUT.format("z")),
    "clip-max-5": (_hs(clip="Clip (a, zero, five)"), IO),
    "clip-min-1": (_hs(clip="Clip (a, one, six)"), IO),
    "clip-without-max": (_hs(clip="Clip (a, zero)"), IO),
    "divided-by-5": (_hs(tail="m = Mul (x, c)\ny = Div (m, five)"), IO),
    "no-division": (_hs(tail="y = Mul (x, c)"), IO),
    "x-plus-2": (_hs(add="Add (x, two)"), IO),
    "clip-of-another-tensor": (_hs(add="Add (z, three)"), TWO_IN),
    "clip-times-another-tensor": (_hs(tail="m = Mul (z, c)\ny = Div (m, six)"), TWO_IN),
    "third-factor": (_hs(tail="m = Mul (x, c)\nn = Mul (m, z)\ny = Div (n, six)"), TWO_IN),
    "hard-sigmoid-default-alpha": ("h = HardSigmoid (x)\ny = Mul (x, h)", IO),
    "hard-sigmoid-of-another-tensor": (HSIG.format(beta=0.5, x="z") + "\ny = Mul (x, h)", TWO_IN),
    "hard-sigmoid-beta-0.6": (HSIG.format(beta=0.6, x="x") + "\ny = Mul (x, h)", IO),
}


@pytest.mark.parametrize(("body", "io"), HARD_SWISH_LOOKALIKES.values(), ids=HARD_SWISH_LOOKALIKES.keys())
def test_hard_swish_lookalikes_stay_unchanged(body: str, io: str) -> None:
    _unchanged(_parse(_graph(body, io), 17))


def test_hard_swish_inside_an_if_branch_is_rewritten() -> None:
    text = """
    g (float[3, 16] x, bool cond) => (float[3, 16] y) {
        y = If (cond) <
            then_branch = t () => (float[3, 16] r) {
                a = Add (x, three)
                c = Clip (a, zero, six)
                m = Mul (x, c)
                r = Div (m, six)
            },
            else_branch = e () => (float[3, 16] s) {
                s = Relu (x)
            }
        >
    }
    """
    proto = _parse(text, 14)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"HardSwish": 1}
    [if_node] = list(model.graph)
    then_branch = if_node.attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_branch] == ["HardSwish"]
    producer = then_branch.outputs[0].producer()
    assert then_branch.outputs[0].name == "r" and producer is not None and producer.op_type == "HardSwish"
    assert [n.op_type for n in if_node.attributes["else_branch"].as_graph()] == ["Relu"]
    onnx.checker.check_model(ir.to_proto(model))
    feeds: list[Mapping[str, np.ndarray]] = [
        {"x": _feed(seed=seed, scale=7.0), "cond": np.array(cond)} for seed, cond in ((0, True), (1, False))
    ]
    _assert_same(proto, model, feeds, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GELU

ERF_TAIL = "e = Erf (d)\np = Add (e, one)\nm = Mul (x, p)\ny = Mul (m, half)"
TANH_TAIL = "\n".join(
    (
        "s = Add (x, q)",
        "t = Mul (s, sqrt_2_pi)",
        "h = Tanh (t)",
        "p = Add (h, one)",
        "m = Mul (x, p)",
        "y = Mul (m, half)",
    )
)

GELU_ERF_FORMS = {
    "div-by-sqrt2": f"d = Div (x, sqrt2)\n{ERF_TAIL}",
    "mul-by-inv-sqrt2": f"d = Mul (x, inv_sqrt2)\n{ERF_TAIL}",
    "half-x-first": "d = Mul (inv_sqrt2, x)\ne = Erf (d)\np = Add (one, e)\nh = Mul (half, x)\n"
    "y = Mul (h, p)",
    "divided-by-two": "d = Div (x, sqrt2)\ne = Erf (d)\np = Add (e, one)\nm = Mul (p, x)\ny = Div (m, two)",
}

GELU_TANH_FORMS = {
    "pow3": f"c = Pow (x, three)\nq = Mul (c, k)\n{TANH_TAIL}",
    "x-x-x": f"xx = Mul (x, x)\nc = Mul (xx, x)\nq = Mul (k, c)\n{TANH_TAIL}",
}


def _gelu(x: np.ndarray) -> np.ndarray:
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2.0))) for v in x.reshape(-1).tolist()])
    return exact.reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize(
    ("opset", "domain"), [(17, MS), (20, "")], ids=["opset17-com.microsoft", "opset20-default"]
)
@pytest.mark.parametrize("form", list(GELU_ERF_FORMS))
def test_gelu_erf_forms_become_gelu(form: str, opset: int, domain: str) -> None:
    proto = _parse(_graph(GELU_ERF_FORMS[form]), opset)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"Gelu": 1} and canonical.declined == []
    assert builders.op_counts(model) == {"Gelu": 1}
    node = _only(model, "Gelu")
    assert node.domain == domain and node.inputs[0] is model.graph.inputs[0]
    assert "approximate" not in node.attributes
    assert model.graph.outputs[0] is node.outputs[0] and node.outputs[0].name == "y"
    if domain == MS:
        assert model.opset_imports[MS] == 1 and model.opset_imports[""] == opset
    else:
        assert MS not in model.opset_imports
        onnx.checker.check_model(ir.to_proto(model))
    _assert_same(proto, model, _x_feeds(), atol=1e-4)
    x = _feed()
    [y] = builders.run_disabled(model, {"x": x})
    np.testing.assert_allclose(y, _gelu(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("opset", "domain", "op_type"),
    [(17, MS, "FastGelu"), (20, "", "Gelu")],
    ids=["opset17-FastGelu", "opset20-Gelu-tanh"],
)
@pytest.mark.parametrize("form", list(GELU_TANH_FORMS))
def test_gelu_tanh_forms_become_tanh_gelu(form: str, opset: int, domain: str, op_type: str) -> None:
    proto = _parse(_graph(GELU_TANH_FORMS[form]), opset)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {op_type: 1} and canonical.declined == []
    assert builders.op_counts(model) == {op_type: 1}
    node = _only(model, op_type)
    assert node.domain == domain and node.inputs[0] is model.graph.inputs[0]
    if domain == "":
        assert node.attributes["approximate"].as_string() == "tanh"
        assert MS not in model.opset_imports
    else:
        assert "approximate" not in node.attributes and model.opset_imports[MS] == 1
    # The tanh form is compared with its own original (not with exact GELU, which differs by ~1e-3).
    _assert_same(proto, model, _x_feeds(), atol=1e-4)


def test_gelu_opset_decides_the_domain_and_adds_the_import() -> None:
    body = GELU_ERF_FORMS["div-by-sqrt2"]
    low, _ = _canonicalize(_parse(_graph(body), 17))
    assert [(n.domain, n.op_type) for n in low.graph] == [(MS, "Gelu")]
    assert dict(low.opset_imports) == {"": 17, MS: 1}
    high, _ = _canonicalize(_parse(_graph(body), 20))
    assert [(n.domain, n.op_type) for n in high.graph] == [("", "Gelu")]
    assert dict(high.opset_imports) == {"": 20}


def _erf(d: str = "Div (x, sqrt2)", plus: str = "Add (e, one)", half: str = "half") -> str:
    return f"d = {d}\ne = Erf (d)\np = {plus}\nm = Mul (x, p)\ny = Mul (m, {half})"


GELU_LOOKALIKES = {
    "coefficient-0.4": (_erf(half="point4"), IO),
    "erf-of-x-over-2": (_erf(d="Div (x, two)"), IO),
    "erf-of-another-tensor": (_erf(d="Div (z, sqrt2)"), TWO_IN),
    "two-plus-erf": (_erf(plus="Add (e, two)"), IO),
    "one-plus-erf-is-a-graph-output": (_erf(), TWO_OUT.format("p")),
    "erf-read-elsewhere": (f"{_erf()}\nz = Neg (e)", TWO_OUT.format("z")),
    "tanh-cubic-0.05": (GELU_TANH_FORMS["pow3"].replace("(c, k)", "(c, k_wrong)"), IO),
    "tanh-square": (GELU_TANH_FORMS["pow3"].replace("(x, three)", "(x, two)"), IO),
    "tanh-x-x-z": (GELU_TANH_FORMS["x-x-x"].replace("c = Mul (xx, x)", "c = Mul (xx, z)"), TWO_IN),
    "tanh-scale-0.5": (GELU_TANH_FORMS["pow3"].replace("(s, sqrt_2_pi)", "(s, half)"), IO),
}


@pytest.mark.parametrize(("body", "io"), GELU_LOOKALIKES.values(), ids=GELU_LOOKALIKES.keys())
def test_gelu_lookalikes_stay_unchanged(body: str, io: str) -> None:
    _unchanged(_parse(_graph(body, io), 20))


# ---------------------------------------------------------------------------------------------------
# LayerNorm

LN_SHAPE = (3, 8)


def _layer_norm(
    opset: int, square: str, affine: str, *, io: str = "", axis: int = -1, keepdims: int = 1
) -> str:
    if opset >= 18:
        reduce = f"ReduceMean <keepdims = {keepdims}> ({{}}, axes)"
    else:
        reduce = f"ReduceMean <axes = [{axis}], keepdims = {keepdims}> ({{}})"
    squared = "Pow (c, two)" if square == "pow" else "Mul (c, c)"
    tail = {
        "none": "y = Div (c, sd)",
        "gamma": "n = Div (c, sd)\ny = Mul (n, gamma)",
        "gamma-beta": "n = Div (c, sd)\nsc = Mul (gamma, n)\ny = Add (sc, beta)",
        "beta": "n = Div (c, sd)\ny = Add (n, beta)",
    }[affine]
    body = f"""
    mean = {reduce.format("x")}
    c = Sub (x, mean)
    sq = {squared}
    var = {reduce.format("sq")}
    ve = Add (var, eps)
    sd = Sqrt (ve)
    {tail}
    """
    return _graph(body, io or "(float[3, 8] x) => (float[3, 8] y)")


def _ln_arrays(opset: int, axis: int = -1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    arrays = {
        "gamma": rng.uniform(0.5, 1.5, LN_SHAPE[-1]).astype(np.float32),
        "beta": rng.normal(0.0, 0.5, LN_SHAPE[-1]).astype(np.float32),
    }
    if opset >= 18:
        arrays["axes"] = np.array([axis], np.int64)
    return arrays


def _parse_ln(text: str, opset: int, axis: int = -1) -> onnx.ModelProto:
    return _parse(text, opset, **_ln_arrays(opset, axis))


def _ln_feeds(shape: tuple[int, ...] = LN_SHAPE) -> list[Mapping[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"x": (rng.normal(1.0, 2.0, shape)).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("affine", ["none", "gamma", "gamma-beta"])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("opset", [17, 18], ids=["axes-attribute", "axes-input"])
def test_layer_norm_becomes_layer_normalization(opset: int, square: str, affine: str) -> None:
    proto = _parse_ln(_layer_norm(opset, square, affine), opset)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"LayerNormalization": 1} and canonical.declined == []
    assert builders.op_counts(model) == {"LayerNormalization": 1}
    node = _only(model, "LayerNormalization")
    assert node.domain == "" and node.inputs[0] is model.graph.inputs[0]
    assert node.attributes["axis"].as_int() == -1
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-5, rel=1e-6)
    assert model.graph.outputs[0] is node.outputs[0] and node.outputs[0].name == "y"
    gamma = node.inputs[1]
    assert gamma is not None and gamma.const_value is not None
    if affine == "none":
        assert len(node.inputs) == 2
        np.testing.assert_array_equal(gamma.const_value.numpy(), np.ones(LN_SHAPE[-1], np.float32))
    else:
        assert gamma.name == "gamma"
        assert len(node.inputs) == (3 if affine == "gamma-beta" else 2)
        if affine == "gamma-beta":
            assert node.inputs[2] is not None and node.inputs[2].name == "beta"
    onnx.checker.check_model(ir.to_proto(model))
    _assert_same(proto, model, _ln_feeds(), atol=1e-4)


def test_layer_norm_with_beta_only_keeps_the_add_and_gets_a_unit_gamma() -> None:
    proto = _parse_ln(_layer_norm(17, "pow", "beta"), 17)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"LayerNormalization": 1}
    assert builders.op_counts(model) == {"LayerNormalization": 1, "Add": 1}
    assert len(_only(model, "LayerNormalization").inputs) == 2
    _assert_same(proto, model, _ln_feeds(), atol=1e-4)


def test_layer_norm_epsilon_is_taken_from_the_graph() -> None:
    text = _layer_norm(17, "pow", "gamma").replace("(var, eps)", "(big_eps, var)")
    proto = _parse(text, 17, big_eps=np.array(0.25, np.float32), **_ln_arrays(17))
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"LayerNormalization": 1}
    assert _only(model, "LayerNormalization").attributes["epsilon"].as_float() == pytest.approx(0.25)
    _assert_same(proto, model, _ln_feeds(), atol=1e-4)


def test_layer_norm_below_opset_17_is_declined() -> None:
    proto = _parse_ln(_layer_norm(16, "pow", "gamma"), 16)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {}
    [decline] = canonical.declined
    assert decline.stage == "canonicalize" and decline.node == "<Div -> n>"
    assert "LayerNormalization" in decline.message and "opset 16" in decline.message
    assert builders.serialize(model) == builders.serialize(ir.from_proto(proto))


def test_layer_norm_without_gamma_on_an_unknown_width_is_declined() -> None:
    proto = _parse_ln(_layer_norm(17, "pow", "none", io="(float[3, W] x) => (float[3, W] y)"), 17)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {}
    [decline] = canonical.declined
    assert decline.code == "shape" and decline.node == "<Div -> y>"
    assert builders.serialize(model) == builders.serialize(ir.from_proto(proto))


@pytest.mark.parametrize(
    ("text", "opset"),
    [
        pytest.param(
            _layer_norm(17, "pow", "gamma", io="(float[3, 8, 8] x) => (float[3, 8, 8] y)", axis=1),
            17,
            id="middle-axis",
        ),
        pytest.param(
            _layer_norm(17, "pow", "gamma", io="(float[3, 8, 8] x) => (float[3, 8, 8] y)", axis=-2),
            17,
            id="middle-axis-negative",
        ),
        pytest.param(
            _layer_norm(17, "pow", "gamma", io="(float[8, 8] x) => (float[8, 8] y)", keepdims=0),
            17,
            id="keepdims-0",
        ),
        pytest.param(
            _layer_norm(17, "pow", "gamma").replace("(float[3, 8] y)", "(float[3, 8] y, float[3, 8] c)"),
            17,
            id="centered-is-a-graph-output",
        ),
        pytest.param(
            _layer_norm(17, "pow", "gamma").replace("(float[3, 8] y)", "(float[3, 8] y, float[3, 1] var)"),
            17,
            id="variance-is-a-graph-output",
        ),
        pytest.param(
            _layer_norm(17, "pow", "gamma").replace("Pow (c, two)", "Pow (x, two)"), 17, id="x-squared"
        ),
        pytest.param(_layer_norm(17, "mul", "gamma").replace("Mul (c, c)", "Mul (c, x)"), 17, id="c-times-x"),
        pytest.param(
            _layer_norm(17, "pow", "gamma").replace("Pow (c, two)", "Pow (c, three)"), 17, id="cubed"
        ),
    ],
)
def test_layer_norm_lookalikes_stay_unchanged(text: str, opset: int) -> None:
    _unchanged(_parse_ln(text, opset))


def test_layer_norm_over_a_positive_last_axis_with_known_shapes() -> None:
    proto = onnx.shape_inference.infer_shapes(_parse_ln(_layer_norm(17, "pow", "gamma", axis=1), 17))
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"LayerNormalization": 1}
    assert builders.op_counts(model) == {"LayerNormalization": 1}
    _assert_same(proto, model, _ln_feeds(), atol=1e-4)


def test_preprocess_canonicalizes_layer_norm_over_a_positive_last_axis() -> None:
    proto = _parse_ln(_layer_norm(17, "pow", "gamma", axis=1), 17)
    model = ir.from_proto(proto)
    assert preprocess(model).canonicalized == {"LayerNormalization": 1}


@pytest.mark.parametrize("axis", [1, -2])
def test_layer_norm_over_a_middle_axis_given_as_input_stays(axis: int) -> None:
    text = _layer_norm(18, "pow", "gamma", io="(float[3, 8, 8] x) => (float[3, 8, 8] y)")
    _unchanged(_parse_ln(text, 18, axis=axis))


# ---------------------------------------------------------------------------------------------------
# Mixed graphs, subgraphs and preprocess()


def test_layer_norm_and_hard_swish_in_both_if_branches() -> None:
    text = """
    g (float[3, 8] x, bool cond) => (float[3, 8] y) {
        y = If (cond) <
            then_branch = t () => (float[3, 8] r) {
                a = Add (x, three)
                c = Clip (a, zero, six)
                p = Mul (x, sixth)
                r = Mul (p, c)
            },
            else_branch = e () => (float[3, 8] s) {
                mean = ReduceMean <axes = [-1]> (x)
                cc = Sub (x, mean)
                sq = Pow (cc, two)
                var = ReduceMean <axes = [-1]> (sq)
                ve = Add (var, eps)
                sd = Sqrt (ve)
                s = Div (cc, sd)
            }
        >
    }
    """
    proto = _parse(text, 17)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"HardSwish": 1, "LayerNormalization": 1}
    [if_node] = list(model.graph)
    assert [n.op_type for n in if_node.attributes["then_branch"].as_graph()] == ["HardSwish"]
    assert [n.op_type for n in if_node.attributes["else_branch"].as_graph()] == ["LayerNormalization"]
    onnx.checker.check_model(ir.to_proto(model))
    rng = np.random.default_rng(2)
    feeds: list[Mapping[str, np.ndarray]] = [
        {"x": rng.uniform(-5, 5, (3, 8)).astype(np.float32), "cond": np.array(cond)} for cond in (True, False)
    ]
    _assert_same(proto, model, feeds, atol=1e-4)


def test_preprocess_counts_what_it_canonicalized() -> None:
    """Two hard-swishes (constants as Constant nodes, as exporters write them) and one GELU."""
    text = """
    g (float[3, 16] x) => (float[3, 16] y) {
        c3 = Constant <value = float {3.0}> ()
        c0 = Constant <value = float {0.0}> ()
        c6 = Constant <value = float {6.0}> ()
        a = Add (x, c3)
        c = Clip (a, c0, c6)
        m = Mul (x, c)
        h1 = Div (m, c6)
        hs = HardSigmoid <alpha = 0.16666667, beta = 0.5> (h1)
        h2 = Mul (h1, hs)
        d = Div (h2, sqrt2)
        e = Erf (d)
        p = Add (e, one)
        g = Mul (h2, p)
        y = Mul (g, half)
    }
    """
    proto = _parse(text, 17)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    # the HardSigmoid form is written out first, then (nothing to fold its 1/6 into) recombined
    assert summary.canonicalized == {"HardSwish": 2, "Gelu": 1, "HardSwish → Add/Clip/Mul": 1}
    assert summary.declines == []
    assert builders.op_counts(model) == {"HardSwish": 2, "Gelu": 1}
    assert _only(model, "Gelu").domain == MS
    _assert_same(proto, model, _x_feeds(scale=7.0), atol=1e-4)


def test_preprocess_reports_the_declines() -> None:
    proto = _parse(_graph(HARD_SWISH_FORMS["div-by-six"]), 13)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    assert summary.canonicalized == {}
    canonicalize = [d for d in summary.declines if d.stage == "canonicalize"]
    assert len(canonicalize) == 1 and "opset 13" in canonicalize[0].message
    assert builders.op_counts(model)["Clip"] == 1


# ---------------------------------------------------------------------------------------------------
# Shapes


def test_scalar_of_higher_rank_keeps_the_broadcast_output_shape() -> None:
    """A size-1 constant of rank 2 broadcasts ``x: [16]`` to ``[1, 16]``; HardSwish(x) alone would not."""
    body = "a = Add (x, three)\nc = Clip (a, zero, six)\nm = Mul (x, c)\ny = Mul (m, sixth_2d)"
    proto = _parse(
        _graph(body, "(float[16] x) => (float[1, 16] y)"), 14, sixth_2d=np.full((1, 1), 1 / 6, np.float32)
    )
    model, _ = _canonicalize(proto)
    feeds: list[Mapping[str, np.ndarray]] = [{"x": _feed((16,), seed=0, scale=7.0)}]
    _assert_same(proto, model, feeds, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Sum


@pytest.mark.parametrize("count", [2, 3])
def test_sum_becomes_a_chain_of_adds(count: int) -> None:
    names = ["a", "b", "c"][:count]
    io = "(" + ", ".join(f"float[2, 5] {n}" for n in names) + ") => (float[2, 5] y)"
    proto = _parse(_graph(f"y = Sum ({', '.join(names)})", io), 13)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {"Add": 1}
    assert builders.op_counts(model) == {"Add": count - 1}
    assert model.graph.outputs[0].name == "y"
    rng = np.random.default_rng(3)
    feeds: list[Mapping[str, np.ndarray]] = [
        {n: rng.normal(size=(2, 5)).astype(np.float32) for n in names} for _ in range(2)
    ]
    _assert_same(proto, model, feeds, atol=1e-6)


def test_sum_of_one_input_is_left_alone() -> None:
    proto = _parse(_graph("y = Sum (x)", "(float[2, 5] x) => (float[2, 5] y)"), 13)
    model, canonical = _canonicalize(proto)
    assert canonical.rewritten == {} and builders.op_counts(model) == {"Sum": 1}


# ---------------------------------------------------------------------------------------------------
# Native HardSwish written out in the integer form (before the affine folds)

HSWISH_CONVS = """
hs (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1)
    h = HardSwish (c)
    y = Conv <kernel_shape = [1, 1]> (h, W2)
}
"""

HSWISH_OUTPUT = """
hs (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] h) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1)
    h = HardSwish (c)
}
"""


def _hswish_model(text: str) -> onnx.ModelProto:
    arrays = builders.normal_arrays(4, W1=(4, 4, 3, 3), W2=(4, 4, 1, 1))
    arrays["W1"] *= 2.0  # pre-activations well beyond ±3: both kinks and the linear part are used
    return builders.parse(text, {k: v for k, v in arrays.items() if k in text})


def test_native_hard_swish_is_written_out_and_its_sixth_folded() -> None:
    proto = _hswish_model(HSWISH_CONVS)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    ops = [n.op_type for n in model.graph]
    assert "HardSwish" not in ops and ops.count("Conv") == 2
    assert {"Add", "Clip", "Mul"} <= set(ops) and ops.count("Mul") == 1  # the 1/6 went into the Conv
    assert summary.canonicalized.get("HardSwish → Add/Clip/Mul") == 1
    feed = builders.random_feeds(proto, 1, seed=2)[0]
    (want,) = builders.run_disabled(proto, feed)
    (got,) = builders.run_disabled(model, feed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_hard_swish_with_nothing_to_fold_into_stays_one_op() -> None:
    """Its output is the graph output: the 1/6 has no reader to go into, so the late rule turns the
    written-out form back into a HardSwish (one float island rather than four ops)."""
    model = ir.from_proto(_hswish_model(HSWISH_OUTPUT))
    preprocess(model)
    assert [n.op_type for n in model.graph] == ["Conv", "HardSwish"]


def test_written_out_hard_swish_quantizes_to_integer_ops() -> None:
    import onnxq
    from onnxq.config import LatencyGuardConfig, QuantConfig

    proto = _hswish_model(HSWISH_CONVS)
    feeds = builders.random_feeds(proto, 16, seed=1)
    result = onnxq.quantize(proto, feeds, QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)))
    assert (
        result.report.quantized_op_types.get("Add") == 1 and result.report.quantized_op_types.get("Mul") == 1
    )
    want = np.concatenate(
        [builders.run_disabled(proto, f)[0] for f in builders.random_feeds(proto, 4, seed=7)]
    )
    got = np.concatenate(
        [builders.run_disabled(result.model, f)[0] for f in builders.random_feeds(proto, 4, seed=7)]
    )
    sqnr = 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2))
    assert sqnr >= 25.0, sqnr


PADDLE_HSWISH = """
hs (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1)
    g = HardSigmoid <alpha = 0.16666667, beta = 0.5> (c)
    h = Mul (c, g)
    y = Conv <kernel_shape = [1, 1]> (h, W2)
}
"""


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_paddles_hard_sigmoid_form_is_written_out_too(opset: int) -> None:
    """Paddle2ONNX below opset 14 writes hard-swish as x · HardSigmoid(x; 1/6, 0.5): the same integer
    form, the 1/6 folded into the Conv after it (at every opset: Clip exists from 11)."""
    arrays = builders.normal_arrays(4, W1=(4, 4, 3, 3), W2=(4, 4, 1, 1))
    arrays["W1"] *= 2.0
    proto = builders.parse(PADDLE_HSWISH, arrays, opset=opset)
    model = ir.from_proto(proto)
    summary = preprocess(model)
    ops = [n.op_type for n in model.graph]
    assert "HardSigmoid" not in ops and "HardSwish" not in ops
    assert {"Add", "Clip", "Mul"} <= set(ops) and ops.count("Mul") == 1 and ops.count("Conv") == 2
    assert summary.canonicalized.get("HardSwish → Add/Clip/Mul") == 1
    feed = builders.random_feeds(proto, 1, seed=2)[0]
    (want,) = builders.run_disabled(proto, feed)
    (got,) = builders.run_disabled(model, feed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("opset", "reduce", "keepdims", "rewritten"),
    [
        (17, "ReduceMean <axes = [2, 3], keepdims = 1> (x)", 1, True),
        (17, "ReduceMean <axes = [-1, -2], keepdims = 0> (x)", 0, True),
        (18, "ReduceMean <keepdims = 1> (x, axes)", 1, True),
        (18, "ReduceMean <keepdims = 0> (x, axes)", 0, True),
        (17, "ReduceMean <axes = [3], keepdims = 1> (x)", 1, False),  # one spatial axis only
        (17, "ReduceMean <axes = [1, 2, 3], keepdims = 1> (x)", 1, False),  # channels too
    ],
)
def test_a_mean_over_the_spatial_axes_becomes_a_global_average_pool(
    opset: int, reduce: str, keepdims: int, rewritten: bool
) -> None:
    out = "float[2, 5, 1, 1] y" if keepdims else "float[2, 5] y"
    if not rewritten:
        out = "float y"
    text = f"""
    spatial_mean (float[2, 5, 6, 7] x) => ({out}) {{
        y = {reduce}
    }}
    """
    arrays = {"axes": np.array([2, 3], np.int64)} if "axes)" in reduce else {}
    proto = builders.parse(text, arrays, opset=opset)
    model = builders.apply_pass(proto, CanonicalizePass(SHAPED_RULES))
    ops = [n.op_type for n in model.graph]
    if not rewritten:
        assert ops == ["ReduceMean"]
        return
    assert ops == ["GlobalAveragePool"] if keepdims else ops == ["GlobalAveragePool", "Squeeze"]
    feed = {"x": np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)}
    want = builders.run_disabled(proto, feed)[0]
    got = builders.run_disabled(model, feed)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_float_hard_swish_gets_its_sixth_back_from_the_conv() -> None:
    """Float forms: the written-out hard-swish whose 1/6 a float Conv took is one HardSwish again, the
    Conv's weight times 6 (the original weight kept for any other reader); same function."""
    proto = _hswish_model(HSWISH_CONVS)
    model = ir.from_proto(proto)
    preprocess(model)
    folded = next(n for n in model.graph if n.op_type == "Conv" and not n.inputs[0].is_graph_input())
    weight = folded.inputs[1].const_value.numpy().copy()
    assert write_float_forms(model) == 1
    assert [n.op_type for n in model.graph] == ["Conv", "HardSwish", "Conv"]
    np.testing.assert_allclose(model.graph.node(2).inputs[1].const_value.numpy(), 6 * weight, rtol=1e-6)
    feed = builders.random_feeds(proto, 1, seed=2)[0]
    (want,) = builders.run_disabled(proto, feed)
    (got,) = builders.run_disabled(model, feed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_hard_swish_read_by_a_quantized_conv_keeps_its_integer_form() -> None:
    """The int8 form (QLinearAdd, QLinearMul, the 1/6 in the int8 weight) stays where the Conv is
    quantized: its weight is a DequantizeLinear's output, not a float constant."""
    import onnxq
    from onnxq.config import LatencyGuardConfig, QuantConfig

    proto = _hswish_model(HSWISH_CONVS)
    result = onnxq.quantize(
        proto,
        builders.random_feeds(proto, 8, seed=1),
        QuantConfig(latency_guard=LatencyGuardConfig(enabled=False)),
    )
    model = result.model if isinstance(result.model, ir.Model) else ir.from_proto(result.model)
    ops = [n.op_type for n in model.graph]
    assert "HardSwish" not in ops and "Clip" in ops
    assert write_float_forms(model) == 0
