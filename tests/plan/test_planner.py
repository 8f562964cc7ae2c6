"""Tests for plan_quantization: which nodes run quantized and which tensors are observed and grouped.

Graphs are written in onnx.parser text, preprocessed as the pipeline does, and the plan is checked by
node name, op type and value identity (never by names the quantizer would generate).
"""

from __future__ import annotations

import collections

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

from onnxq.config import ActivationScheme, NodeOverride, QuantConfig, WeightScheme
from onnxq.plan.planner import QuantPlan, WeightTask, plan_quantization
from onnxq.preprocess import preprocess

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'
SYMMETRIC_INT8 = ActivationScheme("int8", symmetric=True)


def _random_arrays(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0.0, 1.0, shape).astype(np.float32) for name, shape in shapes.items()}


def _weights(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    return _random_arrays(shapes)


def _model(graph_text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """Parse, attach initializers, check, convert to onnx-ir and preprocess (as the pipeline does)."""
    proto = onnx.parser.parse_model(HEADER + graph_text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    preprocess(model)
    return model


def _plan(model: ir.Model, config: QuantConfig | None = None) -> QuantPlan:
    return plan_quantization(model, config or QuantConfig())


def _node(model: ir.Model, name: str) -> ir.Node:
    found = [n for n in model.graph if n.name == name]
    assert len(found) == 1, f"no single node named {name!r}"
    return found[0]


def _value(model: ir.Model, name: str) -> ir.Value:
    for value in model.graph.inputs:
        if value.name == name:
            return value
    if name in model.graph.initializers:
        return model.graph.initializers[name]
    for node in model.graph:
        for value in node.outputs:
            if value.name == name:
                return value
    raise AssertionError(f"no value named {name!r}")


def _names(nodes: list[ir.Node]) -> list[str]:
    return [n.name or "" for n in nodes]


def _slots(plan: QuantPlan) -> set[tuple[str, int]]:
    return {(node.name or "", index) for node, index in plan.quantized_inputs}


def _weight_task(plan: QuantPlan, node_name: str) -> WeightTask:
    found = [t for t in plan.weights if t.node.name == node_name]
    assert len(found) == 1
    return found[0]


def _same_group(plan: QuantPlan, *values: ir.Value) -> bool:
    groups = {id(plan.group_of[v]) for v in values}
    return len(groups) == 1


# ---------------------------------------------------------------------------------------------------
# Conv → Relu → Conv: activation absorption

CONV_RELU_CONV = """
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    [relu] r = Relu (c)
    [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, W2, B2)
}"""


def _conv_relu_conv() -> ir.Model:
    return _model(CONV_RELU_CONV, _weights(W1=(4, 3, 3, 3), B1=(4,), W2=(4, 4, 3, 3), B2=(4,)))


def test_relu_after_conv_is_absorbed() -> None:
    model = _conv_relu_conv()
    plan = _plan(model)
    x, c, r, y = (_value(model, n) for n in ("x", "c", "r", "y"))

    assert not plan.empty
    assert _names(plan.quantized_nodes) == ["conv1", "conv2"]
    assert _names(plan.absorbed_nodes) == ["relu"]
    # No Q/DQ between the Conv and the Relu: the Relu output carries conv1's quantized range.
    assert c not in plan.group_of
    assert r in plan.group_of
    assert plan.observed_values() == [x, r, y]
    assert _slots(plan) == {("conv1", 0), ("conv2", 0)}
    assert plan.quantized_op_types() == collections.Counter({"Conv": 2})
    assert plan.float_op_types == collections.Counter()
    assert builders.lines(plan.declined) == []
    # Each Conv: weight per output channel, bias against that Conv's own input.
    assert [(t.node.name, t.input_index, t.axis) for t in plan.weights] == [("conv1", 1, 0), ("conv2", 1, 0)]
    assert [(b.node.name, b.input_index, b.weight_index) for b in plan.biases] == [
        ("conv1", 2, 1),
        ("conv2", 2, 1),
    ]
    assert [b.activation for b in plan.biases] == [x, r]


def test_relu_not_absorbed_with_symmetric_activations() -> None:
    model = _conv_relu_conv()
    plan = _plan(model, QuantConfig(activations=SYMMETRIC_INT8))
    c, r = _value(model, "c"), _value(model, "r")

    # A symmetric zero point sits mid-range, so it cannot clamp like a Relu: Q/DQ on both sides.
    assert plan.absorbed_nodes == []
    assert _names(plan.quantized_nodes) == ["conv1", "relu", "conv2"]
    assert c in plan.group_of and r in plan.group_of
    assert not _same_group(plan, c, r)
    assert plan.group_of[c].scheme == SYMMETRIC_INT8
    assert ("relu", 0) in _slots(plan)


def test_relu_not_absorbed_when_producer_output_has_another_use() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] c) {
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1)
            [relu] r = Relu (c)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, W2)
        }""",
        _weights(W1=(4, 3, 3, 3), W2=(4, 4, 3, 3)),
    )
    plan = _plan(model)
    assert plan.absorbed_nodes == []
    assert "relu" in _names(plan.quantized_nodes)
    assert _value(model, "c") in plan.group_of


def test_clip_after_conv_is_absorbed_unless_bounds_are_variable() -> None:
    text = """
    g (float[1, 3, 8, 8] x{extra}) => (float[1, 4, 8, 8] y) {{
        [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1)
        [clip] r = Clip (c, lo, {hi})
        [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, W2)
    }}"""
    weights = _weights(W1=(4, 3, 3, 3), W2=(4, 4, 3, 3))
    weights.update(lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32))
    model = _model(text.format(extra="", hi="hi"), weights)
    plan = _plan(model)
    assert _names(plan.absorbed_nodes) == ["clip"]
    assert _value(model, "c") not in plan.group_of

    model = _model(text.format(extra=", float hi_in", hi="hi_in"), weights)
    plan = _plan(model)
    assert "clip" not in _names(plan.quantized_nodes) + _names(plan.absorbed_nodes)
    assert "clip not quantized: Clip bounds are not constants" in builders.lines(plan.declined)
    assert _value(model, "c") in plan.group_of  # conv1's output is still quantized ("always")


# ---------------------------------------------------------------------------------------------------
# Pass-through and integer ops


def test_maxpool_between_convs_passes_the_scale_through() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 4, 4] y) {
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1)
            [pool] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (p, W2)
        }""",
        _weights(W1=(4, 3, 3, 3), W2=(4, 4, 3, 3)),
    )
    plan = _plan(model)
    c, p = _value(model, "c"), _value(model, "p")
    assert _names(plan.quantized_nodes) == ["conv1", "pool", "conv2"]
    assert _same_group(plan, c, p)
    group = plan.group_of[p]
    assert group.members == [c, p]
    assert group.observed == [c]  # only the input is observed
    assert p not in plan.observed_values()


@pytest.mark.parametrize(
    ("reader", "out"),
    [("", "int64[1, 4, 4, 4] idx"), ("f = Cast <to = 1> (idx)", "float[1, 4, 4, 4] f")],
    ids=["graph-output", "node"],
)
def test_maxpool_with_used_indices_stays_float(reader: str, out: str) -> None:
    # Ties created by rounding could change which index wins, so the indices must come from float data.
    model = _model(
        f"""
        g (float[1, 3, 8, 8] x) => (float[1, 4, 4, 4] y, {out}) {{
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1)
            [pool] p, idx = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (p, W2)
            {reader}
        }}""",
        _weights(W1=(4, 3, 3, 3), W2=(4, 4, 3, 3)),
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["conv1", "conv2"]
    assert "pool not quantized: MaxPool indices output is used" in builders.lines(plan.declined)
    assert not _same_group(plan, _value(model, "c"), _value(model, "p"))


def test_passthrough_at_the_edges_of_quantized_code_stays_float() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 4, 4] y) {
            [pool_in] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (p, W1)
            [pool_out] q = MaxPool <kernel_shape = [1, 1]> (c)
            [softmax] y = Softmax <axis = -1> (q)
        }""",
        _weights(W1=(4, 3, 3, 3)),
    )
    plan = _plan(model)
    # pool_in reads a graph input (float), pool_out feeds only a float Softmax: both stay float.
    assert _names(plan.quantized_nodes) == ["conv1"]
    assert _value(model, "x") not in plan.group_of
    assert _value(model, "p") in plan.group_of
    assert _value(model, "q") not in plan.group_of
    assert plan.float_op_types == collections.Counter({"MaxPool": 2, "Softmax": 1})
    assert any(d.startswith("Softmax: ") for d in builders.lines(plan.declined))


def test_residual_add_between_conv_paths_is_quantized() -> None:
    model = _model(
        """
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [conv_b] b = Conv <pads = [1, 1, 1, 1]> (a, Wb)
            [add] s = Add (a, b)
            [conv_c] y = Conv <pads = [1, 1, 1, 1]> (s, Wc)
        }""",
        _weights(Wa=(4, 4, 3, 3), Wb=(4, 4, 3, 3), Wc=(4, 4, 3, 3)),
    )
    plan = _plan(model)
    a, b, s = (_value(model, n) for n in "abs")
    assert "add" in _names(plan.quantized_nodes)
    assert {("add", 0), ("add", 1), ("conv_b", 0), ("conv_c", 0)} <= _slots(plan)
    assert s in plan.observed_values()
    # An integer op requantizes: its inputs and output have their own parameters.
    assert len({id(plan.group_of[v]) for v in (a, b, s)}) == 3


def test_add_of_graph_input_and_constant_stays_float() -> None:
    model = _model(
        """
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
            [add] s = Add (x, offset)
            [conv1] y = Conv <pads = [1, 1, 1, 1]> (s, W1)
        }""",
        {**_weights(W1=(4, 4, 3, 3)), "offset": np.full((1, 4, 1, 1), 0.5, np.float32)},
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["conv1"]
    assert plan.float_op_types == collections.Counter({"Add": 1})
    assert _value(model, "x") not in plan.group_of
    assert _value(model, "offset") not in plan.group_of
    assert _value(model, "s") in plan.group_of  # the Conv input still gets Q/DQ
    assert _slots(plan) == {("conv1", 0)}


def test_add_whose_output_nobody_reads_quantized_stays_float() -> None:
    model = _model(
        """
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] s) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [conv_b] b = Conv <pads = [1, 1, 1, 1]> (x, Wb)
            [add] s = Add (a, b)
        }""",
        _weights(Wa=(4, 4, 3, 3), Wb=(4, 4, 3, 3)),
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["conv_a", "conv_b"]
    assert _value(model, "s") not in plan.group_of


def test_matmul_bias_softmax_keeps_the_matmul_output_float() -> None:
    model = _model(
        """
        g (float[1, 4, 8] x) => (float[1, 4, 8] y) {
            [mm] m = MatMul (x, W)
            [bias_add] a = Add (m, bias)
            [softmax] y = Softmax <axis = -1> (a)
        }""",
        _weights(W=(8, 8), bias=(8,)),
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["mm"]
    assert _value(model, "m") not in plan.group_of  # "if_wanted" output, nobody wants it
    assert _value(model, "a") not in plan.group_of
    assert plan.float_op_types == collections.Counter({"Add": 1, "Softmax": 1})
    assert [(t.node.name, t.axis) for t in plan.weights] == [("mm", 1)]
    assert plan.biases == []  # MatMul has no bias input
    assert plan.observed_values() == [_value(model, "x")]


def test_matmul_add_reshape_transpose_matmul_chain_is_quantized() -> None:
    model = _model(
        """
        g (float[1, 4, 8] x, float[1, 2, 4, 4] q) => (float[1, 2, 4, 4] y) {
            [mm] m = MatMul (x, W)
            [bias_add] a = Add (m, bias)
            [reshape] r = Reshape (a, shape)
            [transpose] t = Transpose <perm = [0, 2, 1, 3]> (r)
            [attn] y = MatMul (q, t)
        }""",
        {**_weights(W=(8, 8), bias=(8,)), "shape": np.array([1, 4, 2, 4], np.int64)},
    )
    plan = _plan(model)
    m, a, r, t, bias = (_value(model, n) for n in ("m", "a", "r", "t", "bias"))
    assert _names(plan.quantized_nodes) == ["mm", "bias_add", "reshape", "transpose", "attn"]
    assert m in plan.group_of  # now wanted by the quantized Add
    assert _same_group(plan, a, r, t)
    assert plan.group_of[t].observed == [a]
    # The constant bias is stored quantized with its own parameters, from its data (not observed).
    assert plan.group_of[bias].constants == [bias]
    assert plan.group_of[bias].observed == []
    # Activation × activation MatMul: both inputs quantized, no weight task.
    assert {("attn", 0), ("attn", 1), ("bias_add", 0), ("bias_add", 1)} <= _slots(plan)
    assert [t.node.name for t in plan.weights] == ["mm"]


def test_concat_of_conv_outputs_shares_one_group() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [conv_b] b = Conv <pads = [1, 1, 1, 1]> (x, Wb)
            [concat] k = Concat <axis = 1> (a, b)
            [conv_c] y = Conv <pads = [1, 1, 1, 1]> (k, Wc)
        }""",
        _weights(Wa=(2, 3, 3, 3), Wb=(2, 3, 3, 3), Wc=(4, 4, 3, 3)),
    )
    plan = _plan(model)
    a, b, k = (_value(model, n) for n in "abk")
    assert "concat" in _names(plan.quantized_nodes)
    assert _same_group(plan, a, b, k)
    group = plan.group_of[k]
    assert set(group.members) == {a, b, k}
    assert set(group.observed) == {a, b}  # the output's range is the union of its inputs'
    assert {("concat", 0), ("concat", 1)} <= _slots(plan)


def test_concat_input_read_elsewhere_keeps_its_own_group() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 2, 8, 8] h) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [conv_b] b = Conv <pads = [1, 1, 1, 1]> (x, Wb)
            [concat] k = Concat <axis = 1> (a, b)
            [conv_c] y = Conv <pads = [1, 1, 1, 1]> (k, Wc)
            [conv_h] h = Conv <pads = [1, 1, 1, 1]> (a, Wh)
        }""",
        _weights(Wa=(2, 3, 3, 3), Wb=(2, 3, 3, 3), Wc=(4, 4, 3, 3), Wh=(2, 2, 3, 3)),
    )
    plan = _plan(model)
    a, b, k = (_value(model, n) for n in "abk")
    assert "concat" in _names(plan.quantized_nodes)
    # conv_h reads a too: a shared grid would be as wide as both inputs' ranges for conv_h as well.
    assert not _same_group(plan, a, k)
    assert _same_group(plan, b, k)
    assert set(plan.group_of[k].observed) == {b, k}  # k holds a's values, which b's range does not
    assert plan.group_of[a].observed == [a]
    assert {("concat", 0), ("concat", 1), ("conv_h", 0)} <= _slots(plan)


def test_concat_input_shares_through_its_own_moves_but_not_past_another_reader() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 2, 8, 8] m) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [pool] p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a)
            [concat1] k1 = Concat <axis = 1> (a, p)
            [conv_s] s = Conv <pads = [1, 1, 1, 1]> (x, Ws)
            [split] s0, s1 = Split <axis = 1> (s, sizes)
            [conv_m] m = Conv <pads = [1, 1, 1, 1]> (s1, Wm)
            [concat2] k2 = Concat <axis = 1> (s0, k1)
            [conv_c] y = Conv (k2, Wc)
        }""",
        {
            **_weights(Wa=(1, 3, 3, 3), Ws=(4, 3, 3, 3), Wm=(2, 2, 3, 3), Wc=(4, 4, 1, 1)),
            "sizes": np.array([2, 2], np.int64),
        },
    )
    plan = _plan(model)
    a, p, k1, s, s0, s1, k2 = (_value(model, n) for n in ("a", "p", "k1", "s", "s0", "s1", "k2"))
    # An SPPF-like Concat of a map and its pooled self: the pool is the map's own move, so one group.
    # Its output then feeds only concat2: the groups merge.
    assert _same_group(plan, a, p, k1, k2)
    # s0 and s1 are one Split's outputs, and conv_m reads s1: s0 cannot take concat2's grid alone.
    assert _same_group(plan, s, s0, s1)
    assert not _same_group(plan, s0, k2)
    assert set(plan.group_of[k2].observed) == {a, k2}


def test_resize_feeding_concat_stays_quantized_in_one_group() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 16, 16] y) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [resize] u = Resize <mode = "nearest"> (a, , scales)
            [up_x] xu = Resize <mode = "nearest"> (x, , scales)
            [conv_b] b = Conv <pads = [1, 1, 1, 1]> (xu, Wb)
            [concat] k = Concat <axis = 1> (u, b)
            [conv_c] y = Conv <pads = [1, 1, 1, 1]> (k, Wc)
        }""",
        {
            **_weights(Wa=(2, 3, 3, 3), Wb=(2, 3, 3, 3), Wc=(4, 4, 3, 3)),
            "scales": np.array([1, 1, 2, 2], np.float32),
        },
    )
    plan = _plan(model)
    x, xu, a, u, b, k = (_value(model, n) for n in ("x", "xu", "a", "u", "b", "k"))
    quantized = _names(plan.quantized_nodes)
    assert "resize" in quantized and "concat" in quantized
    # up_x reads a graph input, but conv_a reads that input quantized anyway: up_x runs on int8 too.
    assert "up_x" in quantized
    assert _same_group(plan, x, xu)
    assert plan.group_of[xu].observed == [x]
    assert _same_group(plan, a, u, b, k)
    assert set(plan.group_of[k].observed) == {a, b}
    assert _value(model, "scales") not in plan.group_of


def test_embedding_gather_of_a_constant_table_is_quantized() -> None:
    model = _model(
        """
        g (int64[1, 6] ids) => (float[1, 6, 4] y) {
            [embed] e = Gather (table, ids)
            [proj] y = MatMul (e, W)
        }""",
        _weights(table=(10, 8), W=(8, 4)),
    )
    plan = _plan(model)
    table, e = _value(model, "table"), _value(model, "e")
    assert _names(plan.quantized_nodes) == ["embed", "proj"]
    # The table is stored quantized with the group's parameters; nothing needs observing.
    assert _same_group(plan, table, e)
    group = plan.group_of[e]
    assert group.constants == [table]
    assert group.observed == []
    assert _value(model, "ids") not in plan.group_of


def test_embedding_gather_feeding_only_float_code_stays_float() -> None:
    model = _model(
        """
        g (int64[1, 6] ids) => (float[1, 6, 8] y) {
            [embed] e = Gather (table, ids)
            [softmax] y = Softmax <axis = -1> (e)
        }""",
        _weights(table=(10, 8)),
    )
    plan = _plan(model)
    assert plan.empty
    assert plan.float_op_types == collections.Counter({"Gather": 1, "Softmax": 1})


def test_activation_after_a_float_output_is_not_absorbed() -> None:
    model = _model(
        """
        g (float[4, 16] x) => (float[4, 8] y) {
            [gemm] h = Gemm <transB = 1> (x, W, B)
            [relu] r = Relu (h)
            [softmax] y = Softmax <axis = -1> (r)
        }""",
        _weights(W=(8, 16), B=(8,)),
    )
    plan = _plan(model)
    # The Gemm output is not quantized (nobody wants it), so the Relu runs in float: nothing absorbed.
    assert _names(plan.quantized_nodes) == ["gemm"]
    assert plan.absorbed_nodes == []
    assert _value(model, "h") not in plan.group_of and _value(model, "r") not in plan.group_of
    assert plan.float_op_types == collections.Counter({"Relu": 1, "Softmax": 1})


def test_resize_cubic_is_declined() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 16, 16] y) {
            [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [resize] u = Resize <mode = "cubic"> (a, , scales)
            [conv_b] y = Conv <pads = [1, 1, 1, 1]> (u, Wb)
        }""",
        {**_weights(Wa=(4, 3, 3, 3), Wb=(4, 4, 3, 3)), "scales": np.array([1, 1, 2, 2], np.float32)},
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["conv_a", "conv_b"]
    assert "resize not quantized: Resize mode is not nearest/linear" in builders.lines(plan.declined)


# ---------------------------------------------------------------------------------------------------
# Configuration: exclusions and overrides (global < op type < node)

THREE_CONVS = """
g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
    [conv1] a = Conv <pads = [1, 1, 1, 1]> (x, W1)
    [relu1] ar = Relu (a)
    [conv2] b = Conv <pads = [1, 1, 1, 1]> (ar, W2)
    [relu2] br = Relu (b)
    [conv3] y = Conv <pads = [1, 1, 1, 1]> (br, W3)
}"""


def _three_convs() -> ir.Model:
    return _model(THREE_CONVS, _weights(W1=(4, 4, 3, 3), W2=(4, 4, 3, 3), W3=(4, 4, 3, 3)))


def test_exclude_op_types() -> None:
    plan = _plan(_three_convs(), QuantConfig(exclude_op_types=("Conv",)))
    assert plan.empty
    assert plan.groups == [] and plan.weights == [] and plan.observed_values() == []
    for name in ("conv1", "conv2", "conv3"):
        assert f"{name} not quantized: excluded by configuration" in builders.lines(plan.declined)
    assert plan.float_op_types == collections.Counter({"Conv": 3, "Relu": 2})


def test_exclude_nodes() -> None:
    model = _three_convs()
    plan = _plan(model, QuantConfig(exclude_nodes=("conv2",)))
    assert _names(plan.quantized_nodes) == ["conv1", "conv3"]
    assert builders.lines(plan.declined) == ["conv2 not quantized: excluded by configuration"]
    # conv1's output is always quantized, taken after relu1 (absorbed) even though conv2 reads it
    # in float; relu2 reads the float conv2 and stays float, its output quantized for conv3.
    assert _names(plan.absorbed_nodes) == ["relu1"]
    assert _value(model, "a") not in plan.group_of
    assert _value(model, "ar") in plan.group_of
    assert _value(model, "b") not in plan.group_of
    assert _value(model, "br") in plan.group_of
    assert plan.float_op_types == collections.Counter({"Conv": 1, "Relu": 1})
    assert [t.node.name for t in plan.weights] == ["conv1", "conv3"]


def test_node_override_re_enables_a_node_of_an_excluded_op_type() -> None:
    config = QuantConfig(
        op_type_overrides={"Conv": NodeOverride(quantize=False)},
        node_overrides={"conv2": NodeOverride(quantize=True)},
    )
    plan = _plan(_three_convs(), config)
    assert _names(plan.quantized_nodes) == ["conv2"]
    assert "conv1 not quantized: excluded by configuration" in builders.lines(plan.declined)
    assert "conv3 not quantized: excluded by configuration" in builders.lines(plan.declined)
    assert not any(d.startswith("conv2") for d in builders.lines(plan.declined))


def test_node_override_disables_one_node_of_an_enabled_op_type() -> None:
    config = QuantConfig(
        exclude_op_types=("Conv",),
        op_type_overrides={"Conv": NodeOverride(quantize=True)},
        node_overrides={"conv3": NodeOverride(quantize=False)},
    )
    plan = _plan(_three_convs(), config)
    assert _names(plan.quantized_nodes) == ["conv1", "conv2"]
    assert builders.lines(plan.declined) == ["conv3 not quantized: excluded by configuration"]


def test_exclude_nodes_wins_over_a_node_override() -> None:
    config = QuantConfig(exclude_nodes=("conv2",), node_overrides={"conv2": NodeOverride(quantize=True)})
    plan = _plan(_three_convs(), config)
    assert "conv2" not in _names(plan.quantized_nodes)
    assert "conv2 not quantized: excluded by configuration" in builders.lines(plan.declined)


def test_scheme_overrides_by_op_type_and_node() -> None:
    model = _three_convs()
    per_tensor = WeightScheme(per_channel=False)
    config = QuantConfig(
        op_type_overrides={"Conv": NodeOverride(weights=per_tensor)},
        node_overrides={
            "conv1": NodeOverride(weights=WeightScheme()),
            "conv2": NodeOverride(activations=SYMMETRIC_INT8),
        },
    )
    plan = _plan(model, config)
    axes = {t.node.name: (t.axis, t.scheme) for t in plan.weights}
    assert axes == {"conv1": (0, WeightScheme()), "conv2": (None, per_tensor), "conv3": (None, per_tensor)}
    # conv2 has symmetric activations: relu2 after it is not absorbed; relu1 after conv1 still is.
    assert _names(plan.absorbed_nodes) == ["relu1"]
    assert "relu2" in _names(plan.quantized_nodes)
    assert plan.group_of[_value(model, "b")].scheme == SYMMETRIC_INT8
    assert plan.group_of[_value(model, "ar")].scheme == ActivationScheme()


# ---------------------------------------------------------------------------------------------------
# Declines


def test_conv_with_weight_from_graph_input_is_declined() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] W) => (float[1, 4, 8, 8] y) {
            [conv1] y = Conv <pads = [1, 1, 1, 1]> (x, W)
        }"""
    )
    plan = _plan(model)
    assert plan.empty
    assert builders.lines(plan.declined) == ["conv1 not quantized: weight is not a constant"]
    assert plan.float_op_types == collections.Counter({"Conv": 1})


def test_conv_fed_by_dequantize_linear_is_declined() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
            xq = QuantizeLinear (x, s, zp)
            xd = DequantizeLinear (xq, s, zp)
            [conv1] y = Conv <pads = [1, 1, 1, 1]> (xd, W1)
        }""",
        {**_weights(W1=(4, 3, 3, 3)), "s": np.array(0.05, np.float32), "zp": np.array(128, np.uint8)},
    )
    plan = _plan(model)
    assert plan.empty
    assert builders.lines(plan.declined) == ["conv1 not quantized: input is already quantized (Q/DQ)"]


def test_unnamed_declined_node_is_reported_by_op_type() -> None:
    model = _model(
        """
        g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] W) => (float[1, 4, 8, 8] y) {
            y = Conv <pads = [1, 1, 1, 1]> (x, W)
        }"""
    )
    assert builders.lines(_plan(model).declined) == ["Conv not quantized: weight is not a constant"]


# ---------------------------------------------------------------------------------------------------
# No match and subgraphs


def test_model_without_anchors_gives_an_empty_plan() -> None:
    model = _model(
        """
        g (float[1, 8] x) => (float[1, 8] y) {
            [sig] s = Sigmoid (x)
            [softmax] y = Softmax <axis = -1> (s)
        }"""
    )
    plan = _plan(model)
    assert plan.empty
    assert plan.quantized_nodes == [] and plan.groups == [] and plan.weights == [] and plan.biases == []
    assert plan.observed_values() == []
    assert plan.float_op_types == collections.Counter({"Sigmoid": 1, "Softmax": 1})
    assert plan.subgraph_nodes == 0
    assert [d.split(":")[0] for d in builders.lines(plan.declined)] == ["Softmax"]


IF_MODEL = """
g (float[1, 3, 8, 8] x, bool cond) => (float[1, 4, 4, 4] y) {
    [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1)
    [pool] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
    [branch] y = If (cond) <
        then_branch = then_g () => (float[1, 4, 4, 4] t) {
            [inner_conv] t = Conv <pads = [1, 1, 1, 1]> (p, W2)
        },
        else_branch = else_g () => (float[1, 4, 4, 4] e) {
            [inner_relu] e = Relu (p)
        }
    >
}"""


def test_if_subgraph_anchors_are_planned_and_bodies_counted() -> None:
    model = _model(IF_MODEL, _weights(W1=(4, 3, 3, 3), W2=(4, 4, 3, 3)))
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["conv1", "inner_conv"]
    then_graph = _node(model, "branch").attributes["then_branch"].as_graph()
    assert plan.quantized_nodes[1].graph is then_graph
    assert [t.node.name for t in plan.weights] == ["conv1", "inner_conv"]
    # Only the else-branch Relu stays float among the body nodes.
    assert plan.subgraph_nodes == 1
    assert sorted(plan.bodies.values()) == [(0, 1), (1, 1)]
    assert any(key.endswith(".then_branch") and counts == (1, 1) for key, counts in plan.bodies.items())
    # The MaxPool's readers are inside the bodies: they read it in float (its quantized copy is the
    # inner Conv's input, quantized in the main graph where it lives), so the MaxPool itself stays float.
    assert _value(model, "p") in plan.group_of
    assert plan.float_op_types == collections.Counter({"MaxPool": 1, "If": 1, "Relu": 1})


# ---------------------------------------------------------------------------------------------------
# Weight axes


def _single_anchor(op: str) -> ir.Model:
    """One anchor named ``anchor`` with a constant weight ``W`` (and bias ``B`` where it has one)."""
    cases: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {
        "Conv": (
            (
                "g (float[1, 4, 8, 8] x) => (float[1, 6, 8, 8] y) "
                "{ [anchor] y = Conv <pads = [1, 1, 1, 1]> (x, W, B) }"
            ),
            {"W": (6, 4, 3, 3), "B": (6,)},
        ),
        "ConvTranspose": (
            "g (float[1, 4, 8, 8] x) => (float[1, 6, 10, 10] y) { [anchor] y = ConvTranspose (x, W, B) }",
            {"W": (4, 6, 3, 3), "B": (6,)},
        ),
        "ConvTranspose_group2": (
            (
                "g (float[1, 4, 8, 8] x) => (float[1, 6, 10, 10] y) "
                "{ [anchor] y = ConvTranspose <group = 2> (x, W, B) }"
            ),
            {"W": (4, 3, 3, 3), "B": (6,)},
        ),
        "Gemm_transB1": (
            "g (float[2, 8] x) => (float[2, 6] y) { [anchor] y = Gemm <transB = 1> (x, W, B) }",
            {"W": (6, 8), "B": (6,)},
        ),
        "Gemm_transB0": (
            "g (float[2, 8] x) => (float[2, 6] y) { [anchor] y = Gemm (x, W, B) }",
            {"W": (8, 6), "B": (6,)},
        ),
        "MatMul": ("g (float[2, 8] x) => (float[2, 6] y) { [anchor] y = MatMul (x, W) }", {"W": (8, 6)}),
        "MatMul_batched": (
            "g (float[3, 2, 8] x) => (float[3, 2, 6] y) { [anchor] y = MatMul (x, W) }",
            {"W": (3, 8, 6)},
        ),
    }
    text, shapes = cases[op]
    return _model(text, _random_arrays(shapes))


@pytest.mark.parametrize(
    ("case", "axis"),
    [
        ("Conv", 0),
        ("ConvTranspose", 1),
        ("ConvTranspose_group2", None),
        ("Gemm_transB1", 0),
        ("Gemm_transB0", 1),
        ("MatMul", 1),
        ("MatMul_batched", None),  # per tensor: ORT's batched integer MatMul rejects 1-D scales
    ],
)
def test_weight_axis(case: str, axis: int | None) -> None:
    model = _single_anchor(case)
    task = _weight_task(_plan(model), "anchor")
    assert task.input_index == 1
    assert task.node.inputs[1] is _value(model, "W")
    assert task.axis == axis
    assert task.scheme == WeightScheme()

    per_tensor = WeightScheme(per_channel=False)
    task = _weight_task(_plan(model, QuantConfig(weights=per_tensor)), "anchor")
    assert task.axis is None
    assert task.scheme == per_tensor


@pytest.mark.parametrize(
    "case", ["Conv", "ConvTranspose", "ConvTranspose_group2", "Gemm_transB1", "Gemm_transB0"]
)
def test_bias_task_reads_the_anchor_input(case: str) -> None:
    model = _single_anchor(case)
    plan = _plan(model)
    assert [(b.node.name, b.input_index, b.weight_index) for b in plan.biases] == [("anchor", 2, 1)]
    assert plan.biases[0].activation is _value(model, "x")
    assert _value(model, "B") not in plan.group_of  # the bias is not an activation


@pytest.mark.parametrize(
    ("attrs", "bias_shape"),
    [("<alpha = 0.5>", (6,)), ("<beta = 2.0>", (6,)), ("", (1, 6))],
)
def test_gemm_bias_left_float_when_it_is_not_a_plain_per_channel_vector(
    attrs: str, bias_shape: tuple[int, ...]
) -> None:
    model = _model(
        f"g (float[2, 8] x) => (float[2, 6] y) {{ [anchor] y = Gemm {attrs} (x, W, B) }}",
        _weights(W=(8, 6), B=bias_shape),
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["anchor"]
    assert len(plan.weights) == 1
    assert plan.biases == []


def test_gemm_and_matmul_with_activation_weight_quantize_both_inputs() -> None:
    model = _model(
        """
        g (float[2, 8] x, float[8, 6] w, float[6, 8] v) => (float[2, 6] y, float[2, 8] z) {
            [gemm] y = Gemm (x, w)
            [mm] z = MatMul (y, v)
        }"""
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["gemm", "mm"]
    assert plan.weights == [] and plan.biases == []
    assert _slots(plan) == {("gemm", 0), ("gemm", 1), ("mm", 0), ("mm", 1)}
    # The Gemm output is wanted by the quantized MatMul; the MatMul output by nobody.
    assert _value(model, "y") in plan.group_of
    assert _value(model, "z") not in plan.group_of


def test_observed_values_are_unique_and_deterministic() -> None:
    first = [v.name for v in _plan(_three_convs()).observed_values()]
    second = [v.name for v in _plan(_three_convs()).observed_values()]
    assert first == second
    assert len(first) == len(set(first))
    assert first == ["x", "ar", "br", "y"]


def test_a_gru_stays_float_with_the_reason() -> None:
    """ONNX Runtime has no int8 GRU (its DynamicQuantizeLSTM covers LSTM only): the report says so."""
    model = _model(
        """
        g (float[4, 1, 16] x) => (float[4, 1, 1, 8] y, float[4, 1, 32] z) {
            y = GRU <hidden_size = 8> (x, w, r)
            z = MatMul (x, m)
        }
        """,
        _weights(w=(1, 24, 16), r=(1, 24, 8), m=(16, 32)),
    )
    plan = plan_quantization(model, QuantConfig())
    reasons = {d.op_type: d.message for d in plan.declined}
    assert "no int8 GRU kernel in ONNX Runtime" in reasons["GRU"]
    assert plan.float_op_types["GRU"] == 1


# ---------------------------------------------------------------------------------------------------
# Squeeze-and-excitation gates: a small float operand broadcast over a quantized feature map

RESIDUAL_SE = """
g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
    [conv_a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
    [pool] p = GlobalAveragePool (a)
    [conv_g] q = Conv (p, Wg)
    [gate] g = HardSigmoid (q)
    [mul] m = Mul (a, g)
    [add] s = Add (a, m)
    [conv_c] y = Conv <pads = [1, 1, 1, 1]> (s, Wc)
}"""


def _residual_se(text: str = RESIDUAL_SE) -> ir.Model:
    return _model(text, _weights(Wa=(4, 4, 3, 3), Wg=(4, 4, 1, 1), Wc=(4, 4, 3, 3)))


def test_se_gate_is_quantized_when_it_unlocks_integer_ops_on_the_map() -> None:
    """``a + a·gate``: without the gate quantized, the Mul and the Add would run float on the full map."""
    model = _residual_se()
    plan = _plan(model)
    assert {"mul", "add"} <= set(_names(plan.quantized_nodes))
    assert {("mul", 0), ("mul", 1), ("add", 0), ("add", 1)} <= _slots(plan)
    gate = _value(model, "g")
    assert gate in plan.observed_values()  # calibrated: its range is measured like any activation
    assert plan.float_op_types["HardSigmoid"] == 1  # the gate itself is still computed in float


def test_se_gate_stays_float_where_an_anchor_reads_the_product() -> None:
    """The product is quantized for the Conv anyway; the Add reads that, and the Mul stays float."""
    model = _residual_se(
        RESIDUAL_SE.replace(
            "[conv_c] y = Conv <pads = [1, 1, 1, 1]> (s, Wc)",
            "[conv_m] n = Conv <pads = [1, 1, 1, 1]> (m, Wc)\n"
            "    [conv_c] t = Conv <pads = [1, 1, 1, 1]> (s, Wc)\n"
            "    [out] y = Add (n, t)",
        )
    )
    plan = _plan(model)
    names = set(_names(plan.quantized_nodes))
    assert "mul" not in names and "add" in names
    assert ("conv_m", 0) in _slots(plan) and ("add", 1) in _slots(plan)
    assert _value(model, "g") not in plan.group_of


def test_a_full_size_float_operand_is_not_a_gate() -> None:
    """Tanh of the whole map is as large as the map: quantizing it would be a float island, not a gate."""
    model = _residual_se(RESIDUAL_SE.replace("[gate] g = HardSigmoid (q)", "[gate] g = Tanh (a)"))
    plan = _plan(model)
    assert "mul" not in _names(plan.quantized_nodes)
    assert _value(model, "g") not in plan.group_of


@pytest.mark.parametrize(
    ("small", "large", "expected"),
    [
        (["N", 4, 1, 1], ["N", 4, "H", "W"], True),
        ([1, 4, 1, 1], [1, 4, 8, 8], True),
        ([1, 1, 8, 8], [1, 4, 8, 8], True),  # a spatial gate (CBAM), broadcast over channels
        ([1, 4, 8, 8], [1, 4, 8, 8], False),  # no broadcast
        ([1, 8192, 1, 1], [1, 8192, 4, 4], False),  # too many values
        ([1, 4, 1], [1, 4, 8, 8], False),  # ranks differ
        ([1, "C", 1, 1], [1, "C", 8, 8], False),  # unknown size
    ],
)
def test_broadcast_gate_shapes(small: list[object], large: list[object], expected: bool) -> None:
    from onnxq.plan.planner import _broadcasts_small

    assert _broadcasts_small(ir.Value(shape=ir.Shape(small)), ir.Value(shape=ir.Shape(large))) is expected


def test_conv_transpose_output_is_quantized_only_for_a_quantized_reader() -> None:
    """ONNX Runtime runs ConvTranspose in float (no integer kernel on CPU): a QuantizeLinear after it
    serves a reader that reads it quantized, and otherwise only rounds (a DB head's final logits)."""
    model = _model(
        """
        g (float[1, 4, 8, 8] x) => (float[1, 1, 32, 32] y) {
            [up1] a = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (x, W1, B1)
            [relu] r = Relu (a)
            [up2] b = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (r, W2, B2)
            [head] y = Sigmoid (b)
        }""",
        _weights(W1=(4, 4, 2, 2), B1=(4,), W2=(4, 1, 2, 2), B2=(1,)),
    )
    plan = _plan(model)
    assert _names(plan.quantized_nodes) == ["up1", "up2"]
    assert _value(model, "r") in plan.group_of  # up2 reads it quantized (the Relu absorbed into it)
    assert _value(model, "b") not in plan.group_of  # the float Sigmoid reads the logits unrounded


# ---------------------------------------------------------------------------------------------------
# A Mul by a constant whose values no single 8-bit grid holds stays float

SCALED_MAP = """
s (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
    [conv_a] c = Conv <pads = [1, 1, 1, 1]> (x, Wa)
    [conv_r] r = Conv <pads = [1, 1, 1, 1]> (x, Wr)
    [add] a = Add (c, r)
    [scale] m = Mul (a, k)
    [residual] s = Add (m, c)
    [conv_b] y = Conv <pads = [1, 1, 1, 1]> (s, Wb)
}"""


@pytest.mark.parametrize(
    ("factors", "declined"), [((1.0, 0.8, 2.0, 40.0), False), ((1.0, 0.5, 2.0, 60.0), True)]
)
def test_a_mul_by_factors_spanning_more_than_51x_stays_float(
    factors: tuple[float, ...], declined: bool
) -> None:
    """At 120× apart the smallest factor falls below 5 steps of the shared grid: over 10 % lost."""
    arrays = _weights(Wa=(4, 4, 3, 3), Wr=(4, 4, 3, 3), Wb=(4, 4, 3, 3))
    arrays["k"] = np.array(factors, np.float32).reshape(1, 4, 1, 1)
    plan = _plan(_model(SCALED_MAP, arrays))
    declines = [d for d in plan.declined if d.node == "scale"]
    assert [d.code for d in declines] == (["constant_precision"] if declined else [])
    if declined:
        assert "spans 120x" in declines[0].message
        assert "scale" not in _names(plan.quantized_nodes)
    assert ("conv_b", 0) in _slots(plan)
