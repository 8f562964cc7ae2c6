"""Tests for FoldConstantsPass: graphs written in onnx.parser text, numerics checked in ORT."""

from __future__ import annotations

import hashlib

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx.shape_inference
import onnx_ir as ir
import pytest

from onnxq.preprocess.fold_constants import FoldConstantsPass


def _rng() -> np.random.Generator:
    return np.random.default_rng(4321)


def _build(text: str, initializers: dict[str, np.ndarray] | None = None, *, infer: bool = False) -> ir.Model:
    proto = builders.parse_model_text(text, initializers)
    if infer:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return ir.from_proto(proto)


def _assert_close(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape
        assert e.dtype == a.dtype
        scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        assert float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)), initial=0.0)) < 1e-4 * scale


def _fold_and_compare(
    model: ir.Model, feeds: dict[str, np.ndarray], fold: FoldConstantsPass | None = None
) -> FoldConstantsPass:
    """Fold, check something changed, the outputs kept their names and the numerics held."""
    expected = builders.run_disabled(model, feeds)
    output_names = [v.name for v in model.graph.outputs]
    fold = fold or FoldConstantsPass()
    result = fold(model)
    assert result.modified
    assert result.model is model
    onnx.checker.check_model(ir.to_proto(model))
    assert [v.name for v in model.graph.outputs] == output_names
    _assert_close(expected, builders.run_disabled(model, feeds))
    return fold


def _assert_unchanged(model: ir.Model, fold: FoldConstantsPass | None = None) -> FoldConstantsPass:
    before = builders.serialize(model)
    fold = fold or FoldConstantsPass()
    result = fold(model)
    assert not result.modified
    assert builders.serialize(model) == before
    return fold


def _is_initializer_input(node: ir.Node, index: int) -> bool:
    value = node.inputs[index]
    return value is not None and value.producer() is None and value.is_initializer()


# ---------------------------------------------------------------------------------------------------
# Folding


def test_transposed_weight_folded_into_initializer() -> None:
    rng = _rng()
    w = rng.normal(0, 1, (5, 3)).astype(np.float32)
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 5] y) {
        wt = Transpose <perm = [1, 0]> (W)
        y = MatMul(x, wt)
    }"""
    model = _build(text, {"W": w})
    fold = _fold_and_compare(model, {"x": rng.normal(0, 1, (2, 3)).astype(np.float32)})

    assert builders.op_counts(model) == {"MatMul": 1}
    matmul = model.graph.node(0)
    assert _is_initializer_input(matmul, 1)
    folded = matmul.inputs[1]
    assert folded is not None and folded.name == "wt"  # named like the replaced output
    assert folded.const_value is not None
    np.testing.assert_array_equal(folded.const_value.numpy(), w.T)
    assert list(model.graph.initializers) == ["wt"]  # W was only used by the Transpose
    assert fold.folded_nodes == 1
    assert fold.sessions == 1
    assert builders.lines(fold.declined) == []


def test_weight_still_used_elsewhere_is_kept() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3, 3] x) => (float[3, 3] y) {
        wt = Transpose(W)
        a = MatMul(x, wt)
        y = MatMul(a, W)
    }"""
    model = _build(text, {"W": rng.normal(0, 1, (3, 3)).astype(np.float32)})
    _fold_and_compare(model, {"x": rng.normal(0, 1, (3, 3)).astype(np.float32)})
    assert builders.op_counts(model) == {"MatMul": 2}
    assert set(model.graph.initializers) == {"W", "wt"}


def test_constant_node_chain_folded_in_one_session() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
        c = Constant <value_floats = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]> ()
        two = Constant <value_int = 2> ()
        shape = Constant <value_ints = [2, 3]> ()
        t = Constant <value = float[1] {0.5}> ()
        twof = Cast <to = 1> (two)
        scaled = Mul(c, twof)
        shifted = Div(scaled, t)
        r = Reshape(shifted, shape)
        y = Add(x, r)
    }"""
    model = _build(text)
    assert builders.op_counts(model)["Constant"] == 4
    fold = _fold_and_compare(model, {"x": rng.normal(0, 1, (2, 3)).astype(np.float32)})

    assert builders.op_counts(model) == {"Add": 1}
    add = model.graph.node(0)
    assert _is_initializer_input(add, 1)
    folded = add.inputs[1]
    assert folded is not None and folded.name == "r"
    assert folded.const_value is not None
    np.testing.assert_array_equal(
        folded.const_value.numpy(), np.arange(1, 7, dtype=np.float32).reshape(2, 3) * 4
    )
    assert list(model.graph.initializers) == ["r"]  # intermediate constants are gone
    assert fold.folded_nodes == 4
    assert fold.sessions == 1


def test_many_constant_chains_share_one_session() -> None:
    """Real models have hundreds of constant Shape/Reshape-of-weight nodes: one session per graph."""
    rng = _rng()
    lines = []
    inits: dict[str, np.ndarray] = {}
    acc = "x"
    for i in range(40):
        inits[f"W{i}"] = rng.normal(0, 0.3, (4, 4)).astype(np.float32)
        lines.append(f"s{i} = Constant <value_ints = [4, 4]> ()")
        lines.append(f"r{i} = Reshape(W{i}, s{i})")
        lines.append(f"t{i} = Transpose(r{i})")
        lines.append(f"h{i} = MatMul({acc}, t{i})")
        acc = f"h{i}"
    body = "\n".join(lines)
    text = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 4] {acc}) {{
        {body}
    }}"""
    model = _build(text, inits)
    fold = _fold_and_compare(model, {"x": rng.normal(0, 1, (2, 4)).astype(np.float32)})
    assert builders.op_counts(model) == {"MatMul": 40}
    assert fold.folded_nodes == 80
    assert fold.sessions == 1


def test_graph_output_produced_by_constant_nodes_keeps_name() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y, float[3] k, float[3] c) {
        c = Constant <value_floats = [1.0, 2.0, 3.0]> ()
        k = Mul(c, c)
        y = Add(x, k)
    }"""
    model = _build(text)
    _fold_and_compare(model, {"x": rng.normal(0, 1, 3).astype(np.float32)})

    assert [v.name for v in model.graph.outputs] == ["y", "k", "c"]
    k = model.graph.outputs[1]
    assert k.producer() is None and k.is_initializer()
    assert model.graph.outputs[2].is_initializer()
    add = model.graph.node(0)
    assert add.inputs[1] is k  # the Add reads the folded graph output
    assert builders.op_counts(model) == {"Add": 1}


def test_integer_and_bool_results() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 6] x) => (float[3, 4] y) {
        a = Constant <value_ints = [3, 4, 1]> ()
        p = ReduceProd <keepdims = 1> (a)
        q = Div(p, a)
        sel = Constant <value_ints = [1, 0]> ()
        dims = Gather(q, sel)
        zero = Constant <value_int = 0> ()
        pos = Greater(dims, zero)
        dims2 = Where(pos, dims, dims)
        y = Reshape(x, dims2)
    }"""
    model = _build(text)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (2, 6)).astype(np.float32)})
    assert builders.op_counts(model) == {"Reshape": 1}
    shape = model.graph.node(0).inputs[1]
    assert shape is not None and shape.const_value is not None
    np.testing.assert_array_equal(shape.const_value.numpy(), [3, 4])


def test_castlike_of_constant_folded_with_non_constant_target() -> None:
    """CastLike reads only the type of its second input (torch's zero biases look like this)."""
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
        r = Relu(x)
        zero = Constant <value = double[1] {0.0}> ()
        zero_f = CastLike(zero, r)
        shape = Constant <value_ints = [3]> ()
        bias = Expand(zero_f, shape)
        y = Conv(r, W, bias)
    }"""
    model = _build(text, {"W": rng.normal(0, 1, (3, 2, 1, 1)).astype(np.float32)})
    model.graph.node(0).outputs[0].dtype = ir.DataType.FLOAT  # as after shape inference
    fold = _fold_and_compare(model, {"x": rng.normal(0, 1, (1, 2, 4, 4)).astype(np.float32)})
    assert builders.op_counts(model) == {"Relu": 1, "Conv": 1}
    conv = model.graph.node(1)
    assert _is_initializer_input(conv, 2)
    assert conv.inputs[2] is not None and conv.inputs[2].dtype == ir.DataType.FLOAT
    assert fold.sessions == 1


def test_castlike_with_unknown_target_type_not_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        r = Relu(x)
        c = CastLike(D, r)
        y = Add(r, c)
    }"""
    _assert_unchanged(_build(text, {"D": np.ones(3, np.float64)}))


def test_static_shape_folded() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[6, 4] y) {
        s = Shape <end = 2> (x)
        p = ReduceProd <keepdims = 1> (s)
        four = Constant <value_ints = [4]> ()
        target = Concat <axis = 0> (p, four)
        y = Reshape(x, target)
    }"""
    model = _build(text)
    fold = _fold_and_compare(model, {"x": rng.normal(0, 1, (2, 3, 4)).astype(np.float32)})
    assert builders.op_counts(model) == {"Reshape": 1}
    target = model.graph.node(0).inputs[1]
    assert target is not None and target.const_value is not None
    np.testing.assert_array_equal(target.const_value.numpy(), [6, 4])
    assert fold.folded_nodes == 3
    assert fold.sessions == 1


def test_dynamic_shape_not_folded_and_fold_shapes_off() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[N, 4] x) => (int64[2] s) {
        s = Shape(x)
    }"""
    _assert_unchanged(_build(text))
    static = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3, 4] x) => (int64[2] s) {
        s = Shape(x)
    }"""
    _assert_unchanged(_build(static), FoldConstantsPass(fold_shapes=False))
    model = _build(static)
    assert FoldConstantsPass()(model).modified
    assert model.graph.outputs[0].name == "s"
    assert model.graph.outputs[0].is_initializer()


def test_folding_is_deterministic() -> None:
    digests = []
    for _ in range(2):
        rng = _rng()
        text = """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 5] y) {
            c = Constant <value_float = 2.0> ()
            wt = Transpose(W)
            ws = Mul(wt, c)
            y = MatMul(x, ws)
        }"""
        model = _build(text, {"W": rng.normal(0, 1, (5, 3)).astype(np.float32)})
        FoldConstantsPass()(model)
        digests.append(hashlib.sha256(builders.serialize(model)).hexdigest())
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------------------------------
# Not folded


def test_random_ops_not_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
        r = RandomNormalLike(W)
        y = Add(x, r)
        u = RandomUniform <shape = [2, 3]> ()
        z = Add(x, u)
    }"""
    model = _build(text, {"W": np.ones((2, 3), np.float32)})
    _assert_unchanged(model)
    assert builders.op_counts(model) == {"RandomNormalLike": 1, "RandomUniform": 1, "Add": 2}


def test_qdq_not_folded() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 4] y, float[2, 4] z) {
        wq = DequantizeLinear <axis = 1> (Wq, scale, zp)
        y = MatMul(x, wq)
        q = QuantizeLinear(Wf, s1, z1)
        dq = DequantizeLinear(q, s1, z1)
        z = MatMul(x, dq)
    }"""
    inits: dict[str, np.ndarray] = {
        "Wq": rng.integers(-127, 128, (3, 4)).astype(np.int8),
        "scale": rng.uniform(0.01, 0.1, 4).astype(np.float32),
        "zp": np.zeros(4, np.int8),
        "Wf": rng.normal(0, 1, (3, 4)).astype(np.float32),
        "s1": np.array(0.02, np.float32),
        "z1": np.array(0, np.int8),
    }
    model = _build(text, inits)
    _assert_unchanged(model)
    assert builders.op_counts(model) == {"DequantizeLinear": 2, "QuantizeLinear": 1, "MatMul": 2}


def test_transpose_of_int8_weight_before_dq_folded_and_dq_kept() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 4] y) {
        wqt = Transpose(Wq)
        wq = DequantizeLinear(wqt, scale, zp)
        y = MatMul(x, wq)
    }"""
    inits: dict[str, np.ndarray] = {
        "Wq": rng.integers(-127, 128, (4, 3)).astype(np.int8),
        "scale": np.array(0.05, np.float32),
        "zp": np.array(0, np.int8),
    }
    model = _build(text, inits)
    _fold_and_compare(model, {"x": rng.normal(0, 1, (2, 3)).astype(np.float32)})
    assert builders.op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1}
    dq = model.graph.node(0)
    assert dq.op_type == "DequantizeLinear" and _is_initializer_input(dq, 0)
    assert dq.inputs[0] is not None and dq.inputs[0].dtype == ir.DataType.INT8


def _tile_text() -> str:
    return """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[40, 30] x) => (float[40, 30] y) {
        reps = Constant <value_ints = [20, 10]> ()
        big = Tile(C, reps)
        y = Add(x, big)
    }"""


@pytest.mark.parametrize("infer", [False, True])
def test_size_limit_respected(infer: bool) -> None:
    rng = _rng()
    c = rng.normal(0, 1, (2, 3)).astype(np.float32)
    feeds = {"x": rng.normal(0, 1, (40, 30)).astype(np.float32)}

    # The Tile result has 1200 elements: over a limit of 1000 it stays (Constant lifting still counts).
    model = _build(_tile_text(), {"C": c}, infer=infer)
    expected = builders.run_disabled(model, feeds)
    fold = FoldConstantsPass(size_limit=1000)
    assert fold(model).modified  # the Constant node became an initializer
    assert builders.op_counts(model) == {"Tile": 1, "Add": 1}
    assert len(builders.lines(fold.declined)) == 1
    assert builders.lines(fold.declined)[0].startswith("<Tile -> big> not folded: ")
    assert "1000" in builders.lines(fold.declined)[0]
    # With static shapes known up front the big tensor is never computed.
    assert fold.sessions == (0 if infer else 1)
    _assert_close(expected, builders.run_disabled(model, feeds))

    model = _build(_tile_text(), {"C": c}, infer=infer)
    _fold_and_compare(model, feeds)
    assert builders.op_counts(model) == {"Add": 1}


def test_oversized_node_keeps_its_consumers() -> None:
    """A node over the limit is not folded, so nodes reading it are not constant either."""
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[1, 1] x) => (float[1, 1] y) {
        reps = Constant <value_ints = [20, 10]> ()
        big = Tile(C, reps)
        small = ReduceSum <keepdims = 1> (big)
        y = Add(x, small)
    }"""
    model = _build(text, {"C": rng.normal(0, 1, (2, 3)).astype(np.float32)})
    fold = FoldConstantsPass(size_limit=100)
    fold(model)
    assert builders.op_counts(model) == {"Tile": 1, "ReduceSum": 1, "Add": 1}


def test_non_default_domain_not_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17, "custom.domain" : 1]>
    g (float[3] x) => (float[3] y) {
        c = custom.domain.Foo(W)
        y = Add(x, c)
    }"""
    model = _build(text, {"W": np.ones(3, np.float32)})
    assert model.graph.node(0).domain == "custom.domain"
    _assert_unchanged(model)


def test_string_constant_lifted_but_not_evaluated() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 19]>
    g (string[2] x) => (string[2] y, bool[2] e) {
        s = Constant <value_strings = ["a", "b"]> ()
        y = Identity(s)
        e = Equal(x, s)
    }"""
    model = _build(text)
    fold = FoldConstantsPass()
    assert fold(model).modified  # the Constant became an initializer
    assert builders.op_counts(model) == {"Identity": 1, "Equal": 1}
    assert builders.lines(fold.declined) == ["<Identity -> y> not folded: input s has data type STRING"]
    y, e = builders.run_disabled(model, {"x": np.array(["a", "c"], dtype=object)})
    assert list(y) == ["a", "b"]
    assert list(e) == [True, False]


def test_initializer_that_is_graph_input_is_not_constant() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3] x, float[3] W) => (float[3] y) {
        n = Neg(W)
        y = Add(x, n)
    }"""
    _assert_unchanged(_build(text, {"W": np.ones(3, np.float32)}))


def test_node_with_non_constant_input_not_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        y = Add(x, W)
    }"""
    _assert_unchanged(_build(text, {"W": np.ones(3, np.float32)}))


def test_ort_failure_declines_only_the_failing_node() -> None:
    """ORT has no int64 Relu kernel: that node and its consumers stay, the rest still folds."""
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 5] y, float[3] z) {
        wt = Transpose(W)
        y = MatMul(x, wt)
        r = Relu(I)
        rf = Cast <to = 1> (r)
        z = Add(rf, rf)
    }"""
    model = _build(text, {"W": rng.normal(0, 1, (5, 3)).astype(np.float32), "I": np.arange(-1, 2)})
    fold = FoldConstantsPass()
    assert fold(model).modified
    assert builders.op_counts(model) == {"MatMul": 1, "Relu": 1, "Cast": 1, "Add": 1}
    assert _is_initializer_input(model.graph.node(0), 1)
    assert len(builders.lines(fold.declined)) == 1
    assert builders.lines(fold.declined)[0].startswith(
        "<Relu -> r> not folded: ONNX Runtime could not evaluate it"
    )
    assert (
        "fold" not in builders.lines(fold.declined)[0].split("not folded")[1]
    )  # internal names are not leaked
    assert fold.sessions == 2  # the batch failed once, then ran without the Relu


class _NamelessErrors(FoldConstantsPass):
    """Hides which node failed, to exercise the node-by-node fallback."""

    def _run(self, model: ir.Model, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        try:
            return super()._run(model, feeds, outputs)
        except Exception as e:
            raise type(e)("evaluation failed") from e


def test_ort_failure_without_node_name_falls_back_to_single_nodes() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 5] y, float[3] z) {
        wt = Transpose(W)
        ws = Neg(wt)
        y = MatMul(x, ws)
        r = Relu(I)
        rf = Cast <to = 1> (r)
        z = Add(rf, rf)
    }"""
    model = _build(text, {"W": rng.normal(0, 1, (5, 3)).astype(np.float32), "I": np.arange(-1, 2)})
    fold = _NamelessErrors()
    assert fold(model).modified
    assert builders.op_counts(model) == {"MatMul": 1, "Relu": 1, "Cast": 1, "Add": 1}
    assert _is_initializer_input(model.graph.node(0), 1)
    assert builders.lines(fold.declined) == [
        "<Relu -> r> not folded: ONNX Runtime could not evaluate it: evaluation failed"
    ]
    assert fold.sessions == 4  # the failed batch, then Transpose, Neg and Relu one by one


# ---------------------------------------------------------------------------------------------------
# Subgraphs


def test_subgraph_constants_folded_and_dynamic_nodes_left_alone() -> None:
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (bool cond, float[3] x) => (float[3] out) {
        out = If (cond) <
            then_branch = then_g () => (float[3] a) <float[3] B = {1.0, 2.0, 3.0}> {
                c = Mul(W, B)
                a = Add(x, c)
            },
            else_branch = else_g () => (float[3] b) {
                n = Neg(x)
                k = Constant <value_floats = [4.0, 5.0, 6.0]> ()
                b = Sub(n, k)
            }
        >
    }"""
    model = _build(text, {"W": rng.normal(0, 1, 3).astype(np.float32)})
    x = rng.normal(0, 1, 3).astype(np.float32)
    expected = {c: builders.run_disabled(model, {"cond": np.array(c), "x": x}) for c in (True, False)}
    fold = FoldConstantsPass()
    assert fold(model).modified
    onnx.checker.check_model(ir.to_proto(model))
    for c in (True, False):
        _assert_close(expected[c], builders.run_disabled(model, {"cond": np.array(c), "x": x}))

    if_node = model.graph.node(0)
    then_branch = if_node.attributes.get_graph("then_branch")
    else_branch = if_node.attributes.get_graph("else_branch")
    assert [n.op_type for n in then_branch] == ["Add"]
    add = then_branch.node(0)
    assert _is_initializer_input(add, 1)
    assert add.inputs[1] is not None and add.inputs[1].graph is then_branch
    # Neg(x) depends on the outer input and stays; the Constant became a branch initializer.
    assert [n.op_type for n in else_branch] == ["Neg", "Sub"]
    assert "k" in else_branch.initializers
    assert builders.lines(fold.declined) == []


def test_outer_constant_consumed_in_subgraph_is_materialized() -> None:
    """A main-graph constant result read only inside a branch becomes a main-graph initializer."""
    rng = _rng()
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (bool cond, float[3] x) => (float[3] out) {
        c = Neg(W)
        out = If (cond) <
            then_branch = then_g () => (float[3] a) {
                a = Add(x, c)
            },
            else_branch = else_g () => (float[3] b) {
                b = Identity(x)
            }
        >
    }"""
    model = _build(text, {"W": rng.normal(0, 1, 3).astype(np.float32)})
    x = rng.normal(0, 1, 3).astype(np.float32)
    expected = builders.run_disabled(model, {"cond": np.array(True), "x": x})
    assert FoldConstantsPass()(model).modified
    _assert_close(expected, builders.run_disabled(model, {"cond": np.array(True), "x": x}))
    assert [n.op_type for n in model.graph] == ["If"]
    assert "c" in model.graph.initializers
    add = model.graph.node(0).attributes.get_graph("then_branch").node(0)
    assert add.inputs[1] is model.graph.initializers["c"]


def test_node_with_subgraph_not_folded() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        out = If (cond) <
            then_branch = then_g () => (float[3] a) { a = Identity(W) },
            else_branch = else_g () => (float[3] b) { b = Neg(W) }
        >
        y = Add(x, out)
    }"""
    model = _build(text, {"W": np.ones(3, np.float32), "cond": np.array(True)})
    fold = FoldConstantsPass()
    fold(model)
    # The If stays (subgraph attribute); the nodes inside its branches read only outer constants
    # and are folded in place, so the branches end up returning initializers.
    assert builders.op_counts(model) == {"If": 1, "Add": 1}
    x = np.zeros(3, np.float32)
    np.testing.assert_allclose(builders.run_disabled(model, {"x": x})[0], np.ones(3, np.float32))


# ---------------------------------------------------------------------------------------------------
# torch-built model


def test_torch_dynamo_export_folds_zero_bias_and_batchnorm() -> None:
    """The dynamo exporter builds a bias-free Conv's zero bias from Shape/CastLike/Expand nodes."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import warnings

    from onnxq.preprocess.fold_bn import FoldBatchNormPass

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
    ).eval()
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                net, (x,), dynamo=True, opset_version=18, optimize=False, verbose=False
            )
        except Exception as e:  # pragma: no cover - exporter availability differs between builds
            pytest.skip(f"torch.onnx.export (dynamo) unavailable: {e}")
    assert program is not None
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, 10)
    model = ir.from_proto(proto)
    input_name = model.graph.inputs[0].name
    assert input_name is not None
    feeds = {input_name: x.numpy()}
    with torch.no_grad():
        reference = net(x).numpy()

    _fold_and_compare(model, feeds)
    fold_bn = FoldBatchNormPass()
    assert fold_bn(model).modified, builders.lines(fold_bn.declined)
    assert builders.op_counts(model) == {"Conv": 1, "Relu": 1}
    _assert_close([reference], builders.run_disabled(model, feeds))
