"""Tests for InsertQDQPass and group_params: the rewritten graph's structure and what it computes.

Each model goes through the pipeline pieces (preprocess → plan → calibrate on real data → group_params →
InsertQDQPass → cleanup). Structure is checked through use-def chains and initializer data, never
through generated names; numerics run the float and the quantized model in ONNX Runtime at
ORT_DISABLE_ALL on held-out data, with SQNR bounds that the corruptions at the end of the file break.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.calibrate.collect import collect_ranges
from onnxq.config import ActivationScheme, QuantConfig, WeightScheme
from onnxq.data import input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.plan.planner import QuantPlan, plan_quantization
from onnxq.preprocess import preprocess
from onnxq.qmath import QuantParams
from onnxq.rewrite import insert_qdq
from onnxq.rewrite.cleanup import cleanup
from onnxq.rewrite.insert_qdq import InsertQDQPass, group_params

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'
CALIBRATION_SAMPLES = 64
EVAL_SAMPLES = 8
#: Every model below reaches this with per-channel weights; each corruption falls far below it.
SQNR_BOUND_DB = 30.0

Feed = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _session(model: ir.Model | onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(builders.serialize(model), options, providers=["CPUExecutionProvider"])


def _outputs(model: ir.Model | onnx.ModelProto, feeds: list[Feed]) -> dict[str, np.ndarray]:
    """Every output of the model over all feeds, concatenated along a new leading axis."""
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    runs = [session.run(None, feed) for feed in feeds]
    return {name: np.stack([np.asarray(r[i]) for r in runs]) for i, name in enumerate(names)}


def _sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - actual.astype(np.float64)) ** 2))
    return float("inf") if noise == 0.0 else 10.0 * float(np.log10(np.sum(ref * ref) / noise))


def _channel_sqnr(reference: np.ndarray, actual: np.ndarray, axis: int) -> list[float]:
    ref = np.moveaxis(reference, axis, 0)
    act = np.moveaxis(actual, axis, 0)
    return [_sqnr(r, a) for r, a in zip(ref, act, strict=True)]


@dataclass
class Quantized:
    model: ir.Model
    plan: QuantPlan
    params: dict[int, QuantParams]
    modified: bool


def _quantize(
    proto: onnx.ModelProto,
    config: QuantConfig | None = None,
    *,
    seed: int = 1,
    edit_plan: Callable[[QuantPlan], None] | None = None,
) -> Quantized:
    """preprocess → plan → calibrate (min-max, real data) → group_params → InsertQDQPass → cleanup.

    ``edit_plan`` may corrupt the plan before it is applied (to show that a test's bound catches it).
    """
    config = config or QuantConfig()
    model = ir.from_proto(proto)
    preprocess(model)
    plan = plan_quantization(model, config)
    if edit_plan is not None:
        edit_plan(plan)
    feeds = load_feeds(builders.random_feeds(proto, CALIBRATION_SAMPLES, seed), input_specs(model))
    observed = plan.observed_values()
    schemes = {v: plan.group_of[v].scheme for v in observed}
    ranges: dict[ir.Value, tuple[float, float]] = {}
    if observed:  # (collect_ranges fails on an empty list: see test_pipeline_with_nothing_to_observe)
        ranges = collect_ranges(model, observed, schemes, feeds, config.calibration).ranges
    params = group_params(plan, ranges)
    result = InsertQDQPass(plan, params)(model)
    assert result.model is model
    cleanup(model)
    onnx.checker.check_model(ir.to_proto(model))
    return Quantized(model, plan, params, result.modified)


def _float_vs_quantized(
    proto: onnx.ModelProto, quantized: ir.Model, *, seed: int = 99
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    feeds = builders.random_feeds(proto, EVAL_SAMPLES, seed)  # held out: not the calibration seed
    return _outputs(proto, feeds), _outputs(quantized, feeds)


def _min_sqnr(proto: onnx.ModelProto, quantized: ir.Model) -> float:
    expected, actual = _float_vs_quantized(proto, quantized)
    assert expected.keys() == actual.keys()
    return min(_sqnr(expected[name], actual[name]) for name in expected)


def _node(model: ir.Model, name: str) -> ir.Node:
    found = [n for n in model.graph if n.name == name]
    assert len(found) == 1, f"no single node named {name!r}"
    return found[0]


def _const(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None, "expected an initializer"
    return value.const_value.numpy()


def _producer(value: ir.Value | None, op_type: str) -> ir.Node:
    assert value is not None
    producer = value.producer()
    assert producer is not None and producer.op_type == op_type, f"{value.name} not made by {op_type}"
    return producer


def _dequantized_from(value: ir.Value | None) -> ir.Value:
    """The float tensor behind ``DequantizeLinear(QuantizeLinear(x))``, checking the Q/DQ pair."""
    dq = _producer(value, "DequantizeLinear")
    q = _producer(dq.inputs[0], "QuantizeLinear")
    assert q.inputs[1] is dq.inputs[1] and q.inputs[2] is dq.inputs[2], "Q and DQ must share parameters"
    source = q.inputs[0]
    assert source is not None
    return source


def _stored_weight(node: ir.Node, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]:
    """(integer data, scale, zero point, axis) of the constant a node reads through a DequantizeLinear."""
    dq = _producer(node.inputs[index], "DequantizeLinear")
    zero_point = _const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    axis_attr = dq.attributes.get("axis")
    axis = None if axis_attr is None else axis_attr.as_int()
    return _const(dq.inputs[0]), _const(dq.inputs[1]), zero_point, axis


def _activation_scale(node: ir.Node, index: int) -> np.ndarray:
    return _const(_producer(node.inputs[index], "DequantizeLinear").inputs[1])


def _assert_rewired(q: Quantized) -> None:
    """Every planned slot reads a DequantizeLinear; each group member is read only by its one
    QuantizeLinear, and all members of a group use the same scale and zero-point initializers."""
    for node, index in q.plan.quantized_inputs:
        _producer(node.inputs[index], "DequantizeLinear")
    for group in q.plan.groups:
        params = set()
        for value in group.members:
            if value in group.constants:
                continue
            readers = [use.node for use in value.uses()]
            assert [r.op_type for r in readers] == ["QuantizeLinear"], f"{value.name} has other readers"
            params.add((id(readers[0].inputs[1]), id(readers[0].inputs[2])))
        assert len(params) <= 1, f"group {group.name} has {len(params)} parameter pairs"


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = scale.shape[0]
    return scale.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Conv → Relu → Conv: structure

CONV_RELU_CONV = """
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    [relu] r = Relu (c)
    [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, W2, B2)
}"""


def _conv_relu_conv_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return builders.normal_arrays(seed, W1=(4, 3, 3, 3), B1=(4,), W2=(4, 4, 3, 3), B2=(4,))


def _conv_relu_conv() -> onnx.ModelProto:
    return builders.parse(CONV_RELU_CONV, _conv_relu_conv_weights())


def test_conv_relu_conv_structure() -> None:
    proto = _conv_relu_conv()
    q = _quantize(proto)
    model = q.model
    assert q.modified
    # Activations x, r (after the absorbed Relu) and y; plus two weights and two biases.
    counts = builders.op_counts(model)
    assert counts["QuantizeLinear"] == 3
    assert counts["DequantizeLinear"] == 3 + 2 + 2
    assert counts["Conv"] == 2 and counts["Relu"] == 1

    conv1, relu, conv2 = _node(model, "conv1"), _node(model, "relu"), _node(model, "conv2")
    assert _dequantized_from(conv1.inputs[0]) is model.graph.inputs[0]
    # No Q/DQ between conv1 and the absorbed Relu; conv2 reads the Relu output through Q/DQ.
    assert relu.inputs[0] is conv1.outputs[0]
    assert _dequantized_from(conv2.inputs[0]) is relu.outputs[0]

    # The graph output keeps its name; the float Conv output got another one.
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert _dequantized_from(model.graph.outputs[0]) is conv2.outputs[0]
    assert conv2.outputs[0].name != "y"

    # The float weights and biases are gone (replaced by their quantized forms).
    for name in ("W1", "B1", "W2", "B2"):
        assert name not in model.graph.initializers


def test_weights_are_int8_per_channel_and_biases_int32_with_product_scale() -> None:
    proto = _conv_relu_conv()
    floats = _conv_relu_conv_weights()
    model = _quantize(proto).model
    for node_name, w_name, b_name in (("conv1", "W1", "B1"), ("conv2", "W2", "B2")):
        node = _node(model, node_name)
        w_float, b_float = floats[w_name], floats[b_name]

        data, scale, zero_point, axis = _stored_weight(node, 1)
        assert data.dtype == np.int8 and data.shape == w_float.shape
        assert axis == 0 and scale.shape == (w_float.shape[0],)
        assert zero_point is not None and zero_point.dtype == np.int8 and not zero_point.any()
        expected_scale = np.abs(w_float).reshape(w_float.shape[0], -1).max(axis=1) / 127.0
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
        assert np.all(np.abs(data.astype(np.int32)) <= 127)
        dequantized = data.astype(np.float32) * _broadcast(scale, data.ndim, 0)
        assert np.all(np.abs(dequantized - w_float) <= _broadcast(scale, data.ndim, 0) / 2 + 1e-7)

        b_data, b_scale, b_zero_point, b_axis = _stored_weight(node, 2)
        assert b_data.dtype == np.int32 and b_zero_point is None
        assert b_axis == 0 and b_scale.shape == (w_float.shape[0],)
        input_scale = _activation_scale(node, 0)
        assert input_scale.shape == ()
        np.testing.assert_allclose(b_scale, input_scale * scale, rtol=1e-6)
        np.testing.assert_array_equal(b_data, np.rint(b_float.astype(np.float64) / b_scale).astype(np.int32))


def test_conv_relu_conv_numerics() -> None:
    proto = _conv_relu_conv()
    assert _min_sqnr(proto, _quantize(proto).model) >= SQNR_BOUND_DB


def test_graph_output_read_by_another_node_keeps_its_name() -> None:
    proto = builders.parse(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] r) {
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            [relu] r = Relu (c)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, W2, B2)
        }""",
        _conv_relu_conv_weights(),
    )
    q = _quantize(proto)
    model = q.model
    assert [v.name for v in model.graph.outputs] == ["y", "r"]
    relu, conv2 = _node(model, "relu"), _node(model, "conv2")
    r_out = model.graph.outputs[1]
    assert _dequantized_from(r_out) is relu.outputs[0]
    assert relu.outputs[0].name != "r"
    assert conv2.inputs[0] is r_out  # the reader and the graph output see the same dequantized tensor
    assert _min_sqnr(proto, model) >= SQNR_BOUND_DB


def test_graph_input_that_is_also_a_graph_output_keeps_its_name() -> None:
    proto = builders.parse(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 3, 8, 8] x) {
            [conv] y = Conv <pads = [1, 1, 1, 1]> (x, W, B)
        }""",
        builders.normal_arrays(0, W=(4, 3, 3, 3), B=(4,)),
    )
    q = _quantize(proto)
    graph = q.model.graph
    assert [v.name for v in graph.inputs] == ["x"]
    assert [v.name for v in graph.outputs] == ["y", "x"]
    assert graph.outputs[1] is graph.inputs[0]  # the echoed input stays the exact float input
    assert _dequantized_from(_node(q.model, "conv").inputs[0]) is graph.inputs[0]
    expected, actual = _float_vs_quantized(proto, q.model)
    np.testing.assert_array_equal(expected["x"], actual["x"])
    assert _sqnr(expected["y"], actual["y"]) >= SQNR_BOUND_DB


def test_tensor_read_by_two_quantized_nodes_gets_one_qdq_pair() -> None:
    proto = builders.parse(
        """
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] z) {
            [conv1] y = Conv <pads = [1, 1, 1, 1]> (x, W1)
            [conv2] z = Conv <pads = [1, 1, 1, 1]> (x, W2)
        }""",
        builders.normal_arrays(0, W1=(4, 3, 3, 3), W2=(4, 3, 3, 3)),
    )
    q = _quantize(proto)
    assert builders.op_counts(q.model)["QuantizeLinear"] == 3  # x, y, z
    assert _node(q.model, "conv1").inputs[0] is _node(q.model, "conv2").inputs[0]
    assert _min_sqnr(proto, q.model) >= SQNR_BOUND_DB


def test_symmetric_int8_activations() -> None:
    proto = _conv_relu_conv()
    q = _quantize(proto, QuantConfig(activations=ActivationScheme("int8", symmetric=True)))
    # The Relu is not absorbed: Q/DQ on x, c, r and y.
    assert builders.op_counts(q.model)["QuantizeLinear"] == 4
    relu = _node(q.model, "relu")
    assert _dequantized_from(relu.inputs[0]) is _node(q.model, "conv1").outputs[0]
    for node in q.model.graph:
        if node.op_type == "QuantizeLinear":
            zero_point = _const(node.inputs[2])
            assert zero_point.dtype == np.int8 and int(zero_point) == 0
    assert _min_sqnr(proto, q.model) >= SQNR_BOUND_DB


def test_per_tensor_weights_structure() -> None:
    proto = _conv_relu_conv()
    q = _quantize(proto, QuantConfig(weights=WeightScheme(per_channel=False)))
    for name in ("conv1", "conv2"):
        node = _node(q.model, name)
        data, scale, zero_point, axis = _stored_weight(node, 1)
        assert data.dtype == np.int8 and axis is None and scale.shape == ()
        assert zero_point is not None and zero_point.shape == ()
        b_data, b_scale, _, b_axis = _stored_weight(node, 2)
        assert b_data.dtype == np.int32 and b_axis is None and b_scale.shape == ()
        np.testing.assert_allclose(b_scale, _activation_scale(node, 0) * scale, rtol=1e-6)
    assert _min_sqnr(proto, q.model) >= SQNR_BOUND_DB


# ---------------------------------------------------------------------------------------------------
# Every op kind, numerically


@dataclass(frozen=True)
class Case:
    text: str
    shapes: dict[str, tuple[int, ...]]
    ops: str  # comma-separated op types under test, each expected among the quantized (or absorbed) nodes
    consts: tuple[tuple[str, tuple[float, ...] | tuple[int, ...], str], ...] = ()
    min_sqnr: float = SQNR_BOUND_DB

    def proto(self) -> onnx.ModelProto:
        initializers = builders.normal_arrays(7, **self.shapes)
        for name, values, dtype in self.consts:
            initializers[name] = np.array(values, dtype=dtype)
        return builders.parse(self.text, initializers)


_CONV_IN = "[conv_in] c = Conv <pads = [1, 1, 1, 1]> (x, Wi, Bi)"
_IN_SHAPES = {"Wi": (4, 3, 3, 3), "Bi": (4,)}


def _conv_sandwich(middle: str, *, out_shape: str = "float[1, 4, 8, 8]", w_out: int = 4) -> str:
    """x → Conv → <middle: c → m> → Conv → y."""
    return f"""
    g (float[1, 3, 8, 8] x) => ({out_shape} y) {{
        {_CONV_IN}
        {middle}
        [conv_out] y = Conv <pads = [1, 1, 1, 1]> (m, Wo, Bo)
    }}"""


def _sandwich_shapes(w_in: int = 4) -> dict[str, tuple[int, ...]]:
    return {**_IN_SHAPES, "Wo": (4, w_in, 3, 3), "Bo": (4,)}


#: Add/Mul of two conv outputs requantize heavy-tailed data once more than the other cases.
_TWO_STAGE_BOUND_DB = SQNR_BOUND_DB - 5

CASES: dict[str, Case] = {
    "Conv": Case(
        "g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) "
        "{ [conv] y = Conv <pads = [1, 1, 1, 1]> (x, W, B) }",
        {"W": (4, 3, 3, 3), "B": (4,)},
        "Conv",
    ),
    "ConvTranspose": Case(
        _conv_sandwich(
            "[deconv] m = ConvTranspose <strides = [2, 2], pads = [1, 1, 0, 0]> (c, Wt, Bt)",
            out_shape="float[1, 4, 15, 15]",
        ),
        {**_sandwich_shapes(), "Wt": (4, 4, 3, 3), "Bt": (4,)},
        "ConvTranspose",
    ),
    "ConvTranspose_group2": Case(
        _conv_sandwich(
            "[deconv] m = ConvTranspose <group = 2, strides = [2, 2], pads = [1, 1, 0, 0]> (c, Wt, Bt)",
            out_shape="float[1, 4, 15, 15]",
        ),
        {**_sandwich_shapes(), "Wt": (4, 2, 3, 3), "Bt": (4,)},
        "ConvTranspose",
    ),
    "Gemm_transB1": Case(
        """
        g (float[4, 16] x) => (float[4, 6] y) {
            [gemm1] h = Gemm <transB = 1> (x, W1, B1)
            [relu] hr = Relu (h)
            [gemm2] y = Gemm <transB = 1> (hr, W2, B2)
        }""",
        {"W1": (8, 16), "B1": (8,), "W2": (6, 8), "B2": (6,)},
        "Gemm,Relu",
    ),
    "Gemm_transB0": Case(
        """
        g (float[4, 16] x) => (float[4, 6] y) {
            [gemm1] h = Gemm (x, W1, B1)
            [relu] hr = Relu (h)
            [gemm2] y = Gemm (hr, W2, B2)
        }""",
        {"W1": (16, 8), "B1": (8,), "W2": (8, 6), "B2": (6,)},
        "Gemm,Relu",
    ),
    "MatMul_weight": Case(
        "g (float[1, 4, 16] x) => (float[1, 4, 8] y) { [mm] y = MatMul (x, W) }",
        {"W": (16, 8)},
        "MatMul",
    ),
    "MatMul_activations": Case(
        """
        g (float[1, 4, 16] x) => (float[1, 4, 4] y) {
            [proj_a] a = MatMul (x, Wa)
            [proj_b] b = MatMul (x, Wb)
            [transpose] bt = Transpose <perm = [0, 2, 1]> (b)
            [scores] y = MatMul (a, bt)
        }""",
        {"Wa": (16, 8), "Wb": (16, 8)},
        "MatMul,Transpose",
    ),
    "Add": Case(
        _conv_sandwich("[conv_b] b = Conv <pads = [1, 1, 1, 1]> (c, Wb)\n[add] m = Add (c, b)"),
        {**_sandwich_shapes(), "Wb": (4, 4, 3, 3)},
        "Add",
        min_sqnr=_TWO_STAGE_BOUND_DB,
    ),
    "Add_constant": Case(
        # (After a MaxPool: right after the Conv, preprocessing would fold the offset into its bias.)
        _conv_sandwich("[pool] p = MaxPool <kernel_shape = [1, 1]> (c)\n[add] m = Add (p, offset)"),
        {**_sandwich_shapes(), "offset": (1, 4, 1, 1)},
        "Add",
    ),
    "Mul": Case(
        _conv_sandwich("[conv_b] b = Conv <pads = [1, 1, 1, 1]> (c, Wb)\n[mul] m = Mul (c, b)"),
        {**_sandwich_shapes(), "Wb": (4, 4, 3, 3)},
        "Mul",
        min_sqnr=_TWO_STAGE_BOUND_DB,
    ),
    "Concat": Case(
        _conv_sandwich(
            "[conv_b] b = Conv <pads = [1, 1, 1, 1]> (x, Wb)\n[concat] m = Concat <axis = 1> (c, b)"
        ),
        {**_sandwich_shapes(w_in=6), "Wb": (2, 3, 3, 3)},
        "Concat",
    ),
    "Concat_constant": Case(
        _conv_sandwich("[concat] m = Concat <axis = 1> (c, k)"),
        {**_sandwich_shapes(w_in=6), "k": (1, 2, 8, 8)},
        "Concat",
    ),
    "Mul_square": Case(_conv_sandwich("[mul] m = Mul (c, c)"), _sandwich_shapes(), "Mul"),
    "AveragePool": Case(
        _conv_sandwich(
            "[pool] m = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (c)",
            out_shape="float[1, 4, 4, 4]",
        ),
        _sandwich_shapes(),
        "AveragePool",
    ),
    "GlobalAveragePool": Case(
        f"""
        g (float[1, 3, 8, 8] x) => (float[1, 6] y) {{
            {_CONV_IN}
            [gap] p = GlobalAveragePool (c)
            [flatten] f = Flatten (p)
            [fc] y = Gemm <transB = 1> (f, Wf, Bf)
        }}""",
        {**_IN_SHAPES, "Wf": (6, 4), "Bf": (6,)},
        "GlobalAveragePool,Flatten",
    ),
    "MaxPool": Case(
        _conv_sandwich(
            "[pool] m = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)", out_shape="float[1, 4, 4, 4]"
        ),
        _sandwich_shapes(),
        "MaxPool",
    ),
    "Reshape_Transpose_Flatten": Case(
        f"""
        g (float[1, 3, 8, 8] x) => (float[1, 6] y) {{
            {_CONV_IN}
            [reshape] r = Reshape (c, shape)
            [transpose] t = Transpose <perm = [0, 2, 1]> (r)
            [flatten] f = Flatten (t)
            [fc] y = Gemm <transB = 1> (f, Wf, Bf)
        }}""",
        {**_IN_SHAPES, "Wf": (6, 256), "Bf": (6,)},
        "Reshape,Transpose,Flatten",
        consts=(("shape", (1, 4, 64), "int64"),),
    ),
    "Resize_nearest": Case(
        _conv_sandwich(
            '[resize] m = Resize <mode = "nearest"> (c, , scales)', out_shape="float[1, 4, 16, 16]"
        ),
        _sandwich_shapes(),
        "Resize",
        consts=(("scales", (1.0, 1.0, 2.0, 2.0), "float32"),),
    ),
    "Slice": Case(
        _conv_sandwich("[slice] m = Slice (c, starts, ends, axes)", out_shape="float[1, 4, 4, 4]"),
        _sandwich_shapes(),
        "Slice",
        consts=(("starts", (2, 2), "int64"), ("ends", (6, 6), "int64"), ("axes", (2, 3), "int64")),
    ),
    "Split": Case(
        f"""
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y1, float[1, 4, 8, 8] y2) {{
            {_CONV_IN}
            [split] s1, s2 = Split <axis = 1> (c)
            [conv_1] y1 = Conv <pads = [1, 1, 1, 1]> (s1, W1)
            [conv_2] y2 = Conv <pads = [1, 1, 1, 1]> (s2, W2)
        }}""",
        {**_IN_SHAPES, "W1": (4, 2, 3, 3), "W2": (4, 2, 3, 3)},
        "Split",
    ),
    "Gather": Case(
        _conv_sandwich("[gather] m = Gather <axis = 1> (c, indices)"),
        _sandwich_shapes(w_in=3),
        "Gather",
        consts=(("indices", (3, 0, 2), "int64"),),
    ),
    "Gather_embedding": Case(
        """
        g (int64[1, 6] ids) => (float[1, 6, 4] y) {
            [embed] e = Gather (table, ids)
            [proj] y = MatMul (e, W)
        }""",
        {"table": (10, 8), "W": (8, 4)},
        "Gather,MatMul",
    ),
    "LeakyRelu": Case(
        _conv_sandwich("[act] m = LeakyRelu <alpha = 0.1> (c)"),
        _sandwich_shapes(),
        "LeakyRelu",
    ),
    "Sigmoid": Case(_conv_sandwich("[act] m = Sigmoid (c)"), _sandwich_shapes(), "Sigmoid"),
    "Clip": Case(
        _conv_sandwich("[act] m = Clip (c, lo, hi)"),
        _sandwich_shapes(),
        "Clip",
        consts=(("lo", (0.0,), "float32"), ("hi", (2.0,), "float32")),
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_op_numerics(case: str) -> None:
    spec = CASES[case]
    proto = spec.proto()
    q = _quantize(proto)
    assert q.modified
    planned = q.plan.quantized_op_types() + collections.Counter(n.op_type for n in q.plan.absorbed_nodes)
    for op in spec.ops.split(","):
        assert planned[op] >= 1, f"{op} was not quantized: {q.plan.declined}"
    counts = builders.op_counts(q.model)
    assert counts["QuantizeLinear"] >= 1 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    _assert_rewired(q)
    sqnr = _min_sqnr(proto, q.model)
    assert sqnr >= spec.min_sqnr, f"{case}: {sqnr:.1f} dB"


def test_clip_after_conv_is_absorbed_in_the_graph() -> None:
    q = _quantize(CASES["Clip"].proto())
    conv, clip = _node(q.model, "conv_in"), _node(q.model, "act")
    assert clip.inputs[0] is conv.outputs[0]
    assert _dequantized_from(_node(q.model, "conv_out").inputs[0]) is clip.outputs[0]


def test_constant_add_input_is_stored_quantized_from_its_data() -> None:
    proto = CASES["Add_constant"].proto()
    offset = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "offset"))
    q = _quantize(proto)
    add = _node(q.model, "add")
    data, scale, zero_point, axis = _stored_weight(add, 1)
    assert data.dtype == np.uint8 and data.shape == offset.shape and axis is None
    assert zero_point is not None
    # The constant's own range sets its parameters: it round-trips within half a step.
    restored = (data.astype(np.float32) - zero_point.astype(np.float32)) * scale
    assert np.all(np.abs(restored - offset) <= scale / 2 + 1e-7)
    assert "offset" not in q.model.graph.initializers


def test_concat_constant_input_is_stored_with_the_shared_parameters() -> None:
    proto = CASES["Concat_constant"].proto()
    k = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "k"))
    q = _quantize(proto)
    concat = _node(q.model, "concat")
    activation_dq = _producer(concat.inputs[0], "DequantizeLinear")
    constant_dq = _producer(concat.inputs[1], "DequantizeLinear")
    assert constant_dq.inputs[1] is activation_dq.inputs[1]
    assert constant_dq.inputs[2] is activation_dq.inputs[2]
    assert _dequantized_from(_node(q.model, "conv_out").inputs[0]) is concat.outputs[0]
    data, scale, zero_point, _ = _stored_weight(concat, 1)
    assert data.dtype == np.uint8 and zero_point is not None
    restored = (data.astype(np.float32) - zero_point.astype(np.float32)) * scale
    assert np.all(np.abs(restored - k) <= scale / 2 + 1e-6)  # the group range covers the constant


def test_embedding_table_is_stored_quantized_from_its_data() -> None:
    proto = CASES["Gather_embedding"].proto()
    table = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "table"))
    q = _quantize(proto)
    embed, proj = _node(q.model, "embed"), _node(q.model, "proj")
    data, scale, zero_point, axis = _stored_weight(embed, 0)
    assert data.dtype == np.uint8 and data.shape == table.shape and axis is None
    assert zero_point is not None
    restored = (data.astype(np.float32) - zero_point.astype(np.float32)) * scale
    assert np.all(np.abs(restored - table) <= scale / 2 + 1e-6)
    assert embed.inputs[1] is q.model.graph.inputs[0]  # indices untouched
    # The gathered rows are requantized with the table's own parameters before the MatMul.
    assert _dequantized_from(proj.inputs[0]) is embed.outputs[0]
    table_dq = _producer(embed.inputs[0], "DequantizeLinear")
    rows_dq = _producer(proj.inputs[0], "DequantizeLinear")
    assert rows_dq.inputs[1] is table_dq.inputs[1] and rows_dq.inputs[2] is table_dq.inputs[2]
    assert "table" not in q.model.graph.initializers


@pytest.mark.parametrize(
    ("case", "axis", "channels"), [("ConvTranspose", 1, 4), ("ConvTranspose_group2", None, 1)]
)
def test_conv_transpose_weight_axis(case: str, axis: int | None, channels: int) -> None:
    q = _quantize(CASES[case].proto())
    deconv = _node(q.model, "deconv")
    data, scale, _, stored_axis = _stored_weight(deconv, 1)
    assert data.dtype == np.int8 and stored_axis == axis
    assert scale.size == channels
    b_data, b_scale, _, _ = _stored_weight(deconv, 2)
    assert b_data.dtype == np.int32
    np.testing.assert_allclose(
        b_scale.reshape(-1), (_activation_scale(deconv, 0) * scale).reshape(-1), rtol=1e-6
    )


@pytest.mark.parametrize(("case", "axis"), [("Gemm_transB1", 0), ("Gemm_transB0", 1)])
def test_gemm_weight_axis_and_bias_scale(case: str, axis: int) -> None:
    proto = CASES[case].proto()
    q = _quantize(proto)
    for name, outputs in (("gemm1", 8), ("gemm2", 6)):
        gemm = _node(q.model, name)
        data, scale, _, stored_axis = _stored_weight(gemm, 1)
        assert data.dtype == np.int8 and stored_axis == axis and scale.shape == (outputs,)
        assert data.shape[axis] == outputs
        b_data, b_scale, _, _ = _stored_weight(gemm, 2)
        assert b_data.dtype == np.int32 and b_scale.shape == (outputs,)
        np.testing.assert_allclose(b_scale, _activation_scale(gemm, 0) * scale, rtol=1e-6)
    # gemm1 → Relu (absorbed) → gemm2; gemm2's output has no quantized reader and stays float.
    gemm2 = _node(q.model, "gemm2")
    assert q.model.graph.outputs[0] is gemm2.outputs[0]
    assert q.model.graph.outputs[0].name == "y"


def test_matmul_weight_is_per_column_and_output_stays_float() -> None:
    q = _quantize(CASES["MatMul_weight"].proto())
    mm = _node(q.model, "mm")
    data, scale, _, axis = _stored_weight(mm, 1)
    assert data.dtype == np.int8 and axis == 1 and scale.shape == (8,)
    assert q.model.graph.outputs[0] is mm.outputs[0]
    assert builders.op_counts(q.model)["QuantizeLinear"] == 1


def test_activation_matmul_reads_both_inputs_quantized() -> None:
    q = _quantize(CASES["MatMul_activations"].proto())
    scores, transpose = _node(q.model, "scores"), _node(q.model, "transpose")
    assert _dequantized_from(scores.inputs[0]) is _node(q.model, "proj_a").outputs[0]
    assert _dequantized_from(scores.inputs[1]) is transpose.outputs[0]
    # Transpose passes its input's parameters through: the same scale initializer on both sides.
    before = _producer(transpose.inputs[0], "DequantizeLinear")
    after = _producer(scores.inputs[1], "DequantizeLinear")
    assert before.inputs[1] is after.inputs[1] and before.inputs[2] is after.inputs[2]


# ---------------------------------------------------------------------------------------------------
# Shared and float-shared weights


def test_shared_weight_is_quantized_once() -> None:
    proto = builders.parse(
        """
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
            [conv1] a = Conv <pads = [1, 1, 1, 1]> (x, W)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (a, W)
        }""",
        builders.normal_arrays(3, W=(4, 4, 3, 3)),
    )
    q = _quantize(proto)
    int8 = [
        v
        for v in q.model.graph.initializers.values()
        if v.dtype == ir.DataType.INT8 and v.shape == (4, 4, 3, 3)
    ]
    assert len(int8) == 1
    conv1, conv2 = _node(q.model, "conv1"), _node(q.model, "conv2")
    assert conv1.inputs[1] is conv2.inputs[1]
    assert _producer(conv1.inputs[1], "DequantizeLinear").inputs[0] is int8[0]
    assert "W" not in q.model.graph.initializers
    assert _min_sqnr(proto, q.model) >= SQNR_BOUND_DB


def test_weight_shared_with_a_float_consumer_stays_available_to_it() -> None:
    proto = builders.parse(
        """
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] z) {
            [conv1] y = Conv <pads = [1, 1, 1, 1]> (x, W)
            [conv_float] z = Conv <pads = [1, 1, 1, 1]> (x, W)
        }""",
        builders.normal_arrays(3, W=(4, 4, 3, 3)),
    )
    q = _quantize(proto, QuantConfig(exclude_nodes=("conv_float",)))
    conv1, conv_float = _node(q.model, "conv1"), _node(q.model, "conv_float")
    _producer(conv1.inputs[1], "DequantizeLinear")
    assert conv_float.inputs[1] is q.model.graph.initializers["W"]
    assert q.model.graph.initializers["W"].dtype == ir.DataType.FLOAT
    # Every reader of a quantized tensor reads its dequantized value, the excluded Conv included.
    assert conv_float.inputs[0] is conv1.inputs[0]
    assert _dequantized_from(conv_float.inputs[0]) is q.model.graph.inputs[0]
    expected, actual = _float_vs_quantized(proto, q.model)
    assert _sqnr(expected["y"], actual["y"]) >= SQNR_BOUND_DB
    assert _sqnr(expected["z"], actual["z"]) >= SQNR_BOUND_DB


# ---------------------------------------------------------------------------------------------------
# No match, subgraphs, determinism


def test_model_without_anchors_is_left_unchanged() -> None:
    proto = builders.parse(
        "g (float[1, 8] x) => (float[1, 8] y) { s = Sigmoid (x)\n y = Softmax <axis = -1> (s) }"
    )
    model = ir.from_proto(proto)
    preprocess(model)
    plan = plan_quantization(model, QuantConfig())
    assert plan.empty
    before = builders.serialize(model)
    result = InsertQDQPass(plan, group_params(plan, {}))(model)
    assert not result.modified
    assert builders.serialize(model) == before
    with pytest.raises(OnnxqError, match="nothing to quantize"):
        onnxq.quantize(proto, builders.random_feeds(proto, 2, 0))


def test_quantized_model_is_not_quantized_again() -> None:
    proto = _conv_relu_conv()
    feeds = builders.random_feeds(proto, 4, 0)
    once = ir.to_proto(onnxq.quantize(proto, feeds).model)
    model = ir.from_proto(once)
    preprocess(model)
    plan = plan_quantization(model, QuantConfig())
    assert plan.empty
    assert "conv1 not quantized: input is already quantized (Q/DQ)" in builders.lines(plan.declined)
    # The pipeline recognises the Q/DQ model and re-emits it without a second round of Q/DQ.
    again = onnxq.quantize(once, feeds)
    assert again.report.mode == "requantize"
    ops = [n.op_type for n in again.model.graph]
    assert ops.count("QuantizeLinear") == [n.op_type for n in once.graph.node].count("QuantizeLinear")


IF_MODEL = """
g (float[1, 3, 8, 8] x, bool cond) => (float[1, 4, 8, 8] y) {
    [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    [branch] y = If (cond) <
        then_branch = then_g () => (float[1, 4, 8, 8] t) {
            [inner_conv] t = Conv <pads = [1, 1, 1, 1]> (c, W2, B2)
        },
        else_branch = else_g () => (float[1, 4, 8, 8] e) {
            [inner_relu] e = Relu (c)
        }
    >
}"""


def test_if_subgraph_is_quantized_in_its_body_and_both_branches_match() -> None:
    proto = builders.parse(IF_MODEL, _conv_relu_conv_weights())
    q = _quantize(proto)
    assert q.modified and q.plan.subgraph_nodes == 1  # the else-branch Relu
    branch = _node(q.model, "branch")
    then_graph = branch.attributes["then_branch"].as_graph()
    inner_conv = next(n for n in then_graph if n.op_type == "Conv")
    # The inner Conv reads the outer Conv's output through the Q/DQ of the main graph (where it lives),
    # and its int8 weight and bias through DequantizeLinear nodes of its own body, whose parameters are
    # initializers of that body (ONNX Runtime's fusions look there).
    assert _dequantized_from(inner_conv.inputs[0]) is _node(q.model, "conv1").outputs[0]
    for index in (1, 2):
        dq = _producer(inner_conv.inputs[index], "DequantizeLinear")
        assert dq.graph is then_graph
        assert all(v is not None and v.name in then_graph.initializers for v in dq.inputs)
    # The body's output is quantized there too (its Q/DQ inside the body).
    out_dq = _producer(then_graph.outputs[0], "DequantizeLinear")
    assert out_dq.graph is then_graph
    else_ops = collections.Counter(n.op_type for n in branch.attributes["else_branch"].as_graph())
    assert else_ops == collections.Counter({"Relu": 1})

    for cond in (True, False):
        feeds = [{**f, "cond": np.array(cond)} for f in builders.random_feeds(proto, EVAL_SAMPLES, 99)]
        expected, actual = _outputs(proto, feeds)["y"], _outputs(q.model, feeds)["y"]
        assert _sqnr(expected, actual) >= SQNR_BOUND_DB, f"cond={cond}"


def test_pipeline_output_is_byte_identical_across_runs() -> None:
    proto = CASES["Add"].proto()
    feeds = builders.random_feeds(proto, 4, 0)
    first = builders.serialize(onnxq.quantize(proto, feeds).model)
    second = builders.serialize(onnxq.quantize(proto, feeds).model)
    assert first == second
    assert builders.serialize(_quantize(proto).model) == builders.serialize(_quantize(proto).model)


def test_pipeline_with_nothing_to_observe() -> None:
    # Embedding Gather → MatMul: the only quantized activation group holds the constant table.
    proto = CASES["Gather_embedding"].proto()
    result = onnxq.quantize(proto, builders.random_feeds(proto, 4, 0))
    assert result.report.calibration["tensors"] == 0
    assert _min_sqnr(proto, result.model) >= SQNR_BOUND_DB


def test_quantize_end_to_end_matches_the_pieces() -> None:
    proto = _conv_relu_conv()
    feeds = builders.random_feeds(proto, CALIBRATION_SAMPLES, 1)
    # Outlier smoothing (it may even out r's channels through the first Conv) and the input bias
    # correction (it shifts the biases) are pieces of their own.
    result = onnxq.quantize(proto, feeds, QuantConfig(smooth=False, input_bias_correction=False))
    assert result.report.quantized_op_types == {"Conv": 2}
    assert result.report.activations_absorbed == 1
    assert builders.serialize(result.model) == builders.serialize(_quantize(proto).model)
    assert _min_sqnr(proto, result.model) >= SQNR_BOUND_DB


# ---------------------------------------------------------------------------------------------------
# The bounds are meaningful: corruptions a broken pass could make fall clearly below them


def _spread_columns(seed: int, k: int, n: int, *, transposed: bool) -> np.ndarray:
    """A (k, n) weight (or (n, k) when ``transposed``) whose output channel j is scaled by 10**(j-2)."""
    weight = np.random.default_rng(seed).normal(0.0, 1.0, (k, n)) * 10.0 ** (np.arange(n) - 2)
    weight = weight.astype(np.float32)
    return np.ascontiguousarray(weight.T) if transposed else weight


def _spread_gemm(trans_b: int) -> onnx.ModelProto:
    return builders.parse(
        f"g (float[8, 16] x) => (float[8, 5] y) {{ [gemm] y = Gemm <transB = {trans_b}> (x, W) }}",
        {"W": _spread_columns(5, 16, 5, transposed=bool(trans_b))},
    )


def _worst_channel_sqnr(proto: onnx.ModelProto, model: ir.Model) -> float:
    expected, actual = _float_vs_quantized(proto, model)
    return min(_channel_sqnr(expected["y"], actual["y"], axis=-1))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_channel_weights_keep_small_channels(trans_b: int) -> None:
    proto = _spread_gemm(trans_b)
    assert _worst_channel_sqnr(proto, _quantize(proto).model) >= SQNR_BOUND_DB


@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_tensor_weights_lose_small_channels(trans_b: int) -> None:
    proto = _spread_gemm(trans_b)
    model = _quantize(proto, QuantConfig(weights=WeightScheme(per_channel=False))).model
    assert _worst_channel_sqnr(proto, model) < SQNR_BOUND_DB - 15


@pytest.mark.parametrize("trans_b", [0, 1])
def test_wrong_weight_axis_is_caught(trans_b: int) -> None:
    proto = _spread_gemm(trans_b)
    right_axis = 0 if trans_b else 1

    def wrong_axis(plan: QuantPlan) -> None:
        assert [t.axis for t in plan.weights] == [right_axis]
        plan.weights = [replace(t, axis=1 - right_axis) for t in plan.weights]

    model = _quantize(proto, edit_plan=wrong_axis).model
    assert _stored_weight(_node(model, "gemm"), 1)[3] == 1 - right_axis
    assert _worst_channel_sqnr(proto, model) < SQNR_BOUND_DB - 15


def _bias_heavy_conv_relu_conv() -> onnx.ModelProto:
    weights = _conv_relu_conv_weights()
    weights["B1"] = weights["B1"] * 3
    weights["B2"] = weights["B2"] * 3
    return builders.parse(CONV_RELU_CONV, weights)


def test_bias_bound_holds_for_a_bias_heavy_model() -> None:
    proto = _bias_heavy_conv_relu_conv()
    assert _min_sqnr(proto, _quantize(proto).model) >= SQNR_BOUND_DB


@pytest.mark.parametrize("corruption", ["input_scale_only", "dropped"])
def test_wrong_bias_is_caught(corruption: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proto = _bias_heavy_conv_relu_conv()
    real = insert_qdq.quantize_bias

    def broken(
        bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        q, scale = real(bias, input_scale, weight_scale)
        if corruption == "dropped":
            return np.zeros_like(q), scale
        wrong = np.broadcast_to(np.asarray(input_scale, np.float32), scale.shape).astype(np.float32)
        return q, wrong

    monkeypatch.setattr(insert_qdq, "quantize_bias", broken)
    assert _min_sqnr(proto, _quantize(proto).model) < SQNR_BOUND_DB - 10


def test_group_params_cover_the_observed_range_and_fall_back_to_a_unit_range() -> None:
    model = ir.from_proto(_conv_relu_conv())
    preprocess(model)
    plan = plan_quantization(model, QuantConfig())
    params = group_params(plan, {})
    assert all(
        float(p.scale) == pytest.approx(1.0 / 255.0) and int(p.zero_point) == 0 for p in params.values()
    )
    ranges = dict.fromkeys(plan.observed_values(), (-1.0, 3.0))
    params = group_params(plan, ranges)
    for group in plan.groups:
        p = params[group.index]
        assert float(p.scale) == pytest.approx(4.0 / 255.0)
        low = (0 - int(p.zero_point)) * float(p.scale)
        high = (255 - int(p.zero_point)) * float(p.scale)
        assert low <= -1.0 + float(p.scale) and high >= 3.0 - float(p.scale)


def _iter_values(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs


def test_no_value_name_is_used_twice() -> None:
    q = _quantize(CASES["Concat"].proto())
    names = [v.name for v in _iter_values(q.model)] + list(q.model.graph.initializers)
    assert len(names) == len(set(names))


def test_a_near_zero_channel_keeps_its_bias() -> None:
    """A BatchNorm with gamma near 0 folded into a Conv leaves weights of 1e-40 and its beta as bias:
    the int32 bias must not saturate (the channel outputs its bias, 0.3, not garbage)."""
    import onnxq
    from onnxq.config import LatencyGuardConfig, QuantConfig

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    weight[0] = 1e-40
    bias = np.array([0.3, 0.1, -0.1, 0.2], np.float32)
    proto = builders.parse(
        "g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) { y = Conv (x, w, b) }", {"w": weight, "b": bias}
    )
    calib = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    model = onnxq.quantize(proto, calib, QuantConfig(latency_guard=LatencyGuardConfig(enabled=False))).model
    feed = {"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    got, want = builders.run_disabled(model, feed)[0], builders.run_disabled(proto, feed)[0]
    np.testing.assert_allclose(got[0, 0], want[0, 0], atol=0.02)  # the bias channel (0.3 everywhere)
    assert np.max(np.abs(got - want)) < 0.2  # and the others as int8 allows


def test_weight_quantization_is_remembered_per_tensor_and_a_binding_bias_floor_still_applies() -> None:
    """Every candidate ``auto``/the rescue/``--target`` scores rewrites the same weights: they are
    quantized once per tensor and scheme; the bias floor (which depends on the input's range) is
    checked on every call, and where it binds the weight is quantized with it."""
    from onnxq.qmath import quantize_weight

    rng = np.random.default_rng(3)
    data = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    data[0] = 1e-30  # a channel a zero-gamma BatchNorm left: its scale is tiny
    tensor = ir.Value(name="w", const_value=ir.Tensor(data))
    q, params = insert_qdq._quantized_weight(tensor, data, "int8", True, 0, None)
    want_q, want_params = quantize_weight(data, "int8", True, 0)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(params.scale, want_params.scale)
    assert not q.flags.writeable
    again = insert_qdq._quantized_weight(tensor, data, "int8", True, 0, None)
    assert again[0] is q  # remembered, not quantized again
    loose = np.full(4, 1e-38)  # below every channel's scale: the floor does not bind
    assert insert_qdq._quantized_weight(tensor, data, "int8", True, 0, loose)[0] is q
    binding = np.array([1e-6, 0.0, 0.0, 0.0])  # channel 0's scale must reach 1e-6
    floored_q, floored = insert_qdq._quantized_weight(tensor, data, "int8", True, 0, binding)
    want_q, want_params = quantize_weight(data, "int8", True, 0, min_scale=binding)
    np.testing.assert_array_equal(floored_q, want_q)
    np.testing.assert_array_equal(floored.scale, want_params.scale)
    assert floored.scale[0] >= 1e-6 > params.scale[0]
    # Another scheme of the same tensor is its own entry.
    per_tensor_q, per_tensor = insert_qdq._quantized_weight(tensor, data, "int8", True, None, None)
    assert per_tensor.axis is None and per_tensor_q is not q
