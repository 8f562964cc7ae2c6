"""Tests for onnxq.graph: the small questions every pass asks about an onnx-ir graph.

Constants (initializers, Constant nodes, and the initializer that is also a graph input and therefore
overridable), attribute defaults, the one node-label format, the default-domain opset however it is
spelled, unique fresh names across the main graph and its subgraphs, and new initializers that keep the
array they were made from (checked through a protobuf round trip and an ONNX Runtime run).
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq.graph import (
    NameScope,
    attr_float,
    attr_int,
    attr_str,
    const_array,
    default_opset,
    is_constant,
    is_float,
    make_initializer,
    materialize_initializers,
    node_label,
)
from onnxq.runtime.session import make_session, run

# ---------------------------------------------------------------------------------------------------
# Helpers

CONSTANTS = """
constants (float[2] x, float[2] w_in) => (float[2] y) {
    [c_node] c = Constant <value = float[2] {1.0, 2.0}> ()
    cf = Constant <value_float = 3.0> ()
    ci = Constant <value_ints = [4, 5, 6]> ()
    a = Add (x, c)
    b = Add (a, w)
    d = Add (b, w_in)
    y = Mul (d, cf)
}
"""


def _constants_model() -> ir.Model:
    """Constant nodes, a plain initializer ``w`` and an initializer ``w_in`` that is also a graph input."""
    arrays = {"w": np.array([5.0, 6.0], np.float32), "w_in": np.array([7.0, 8.0], np.float32)}
    return ir.from_proto(builders.parse(CONSTANTS, arrays))


def _values(model: ir.Model) -> dict[str, ir.Value]:
    """Every named value of the main graph: inputs, initializers and node outputs."""
    found: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs if v.name}
    found.update(model.graph.initializers)
    for node in model.graph:
        found.update({v.name: v for v in node.outputs if v.name})
    return found


def _session(model: ir.Model | onnx.ModelProto) -> ort.InferenceSession:
    return make_session(builders.serialize(model), opt_level="disable")


def _node(model: ir.Model, op_type: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op_type)


# ---------------------------------------------------------------------------------------------------
# const_array / is_constant


def test_initializer_is_a_constant_with_its_data() -> None:
    value = _values(_constants_model())["w"]
    assert is_constant(value)
    data = const_array(value)
    assert data is not None
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, [5.0, 6.0])


@pytest.mark.parametrize(
    ("name", "expected", "dtype"),
    [
        ("c", np.array([1.0, 2.0]), np.float32),
        ("cf", np.array(3.0), np.float32),
        ("ci", np.array([4, 5, 6]), np.int64),
    ],
)
def test_constant_node_outputs_are_constants(name: str, expected: np.ndarray, dtype: type) -> None:
    value = _values(_constants_model())[name]
    assert value.producer() is not None and value.producer().op_type == "Constant"  # type: ignore[union-attr]
    assert is_constant(value)
    data = const_array(value)
    assert data is not None
    assert data.dtype == dtype
    assert data.shape == expected.shape
    np.testing.assert_array_equal(data, expected)


def test_initializer_that_is_also_a_graph_input_is_not_constant() -> None:
    model = _constants_model()
    value = _values(model)["w_in"]
    # The precondition that makes the case interesting: the value does carry data.
    assert value.is_graph_input() and value.const_value is not None
    assert not is_constant(value)
    assert const_array(value) is None


def test_graph_inputs_and_computed_values_are_not_constant() -> None:
    values = _values(_constants_model())
    for name in ("x", "a", "b", "d", "y"):
        assert not is_constant(values[name]), name
        assert const_array(values[name]) is None, name


def test_none_is_not_a_constant() -> None:
    assert not is_constant(None)
    assert const_array(None) is None


def test_constant_of_another_domain_is_not_a_constant() -> None:
    attr = ir.AttrTensor("value", ir.tensor(np.array([1.0], np.float32)))
    custom = ir.Node("my.domain", "Constant", [], attributes=[attr])
    standard = ir.Node("", "Constant", [], attributes=[attr])
    assert not is_constant(custom.outputs[0])
    assert const_array(custom.outputs[0]) is None
    assert is_constant(standard.outputs[0])
    np.testing.assert_array_equal(const_array(standard.outputs[0]), [1.0])


def test_is_constant_and_const_array_agree_on_every_value() -> None:
    for name, value in _values(_constants_model()).items():
        assert is_constant(value) == (const_array(value) is not None), name


# ---------------------------------------------------------------------------------------------------
# is_float


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (ir.DataType.FLOAT, True),
        (None, True),  # unknown type: shape inference did not reach it
        (ir.DataType.FLOAT16, False),
        (ir.DataType.DOUBLE, False),
        (ir.DataType.BFLOAT16, False),
        (ir.DataType.INT8, False),
        (ir.DataType.UINT8, False),
        (ir.DataType.INT64, False),
        (ir.DataType.BOOL, False),
    ],
)
def test_is_float(dtype: ir.DataType | None, expected: bool) -> None:
    value = ir.Value(name="v", type=None if dtype is None else ir.TensorType(dtype))
    assert value.dtype == dtype
    assert is_float(value) is expected


def test_none_is_not_float() -> None:
    assert is_float(None) is False


def test_is_float_reads_types_from_a_parsed_model() -> None:
    model = ir.from_proto(
        builders.parse(
            """
            types (float[2] x, int64[2] i, float16[2] h) => (float[2] y) {
                y = Identity (x)
            }
            """
        )
    )
    flags = {v.name: is_float(v) for v in model.graph.inputs}
    assert flags == {"x": True, "i": False, "h": False}


# ---------------------------------------------------------------------------------------------------
# attr_int / attr_float / attr_str


def _attr_node() -> ir.Node:
    model = ir.from_proto(
        builders.parse(
            """
            attrs (float[1,3,8,8] x) => (float[1,3,4,4] y) {
                y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1,
                                 auto_pad = "VALID", count_include_pad = 0> (x)
            }
            """
        )
    )
    return _node(model, "AveragePool")


def _leaky_node() -> ir.Node:
    model = ir.from_proto(
        builders.parse("leaky (float[4] x) => (float[4] y) { y = LeakyRelu <alpha = 0.25> (x) }")
    )
    return _node(model, "LeakyRelu")


def test_attr_int_present_and_default() -> None:
    node = _attr_node()
    assert attr_int(node, "ceil_mode", 7) == 1
    assert attr_int(node, "count_include_pad", 7) == 0  # a present 0 is not "absent"
    assert attr_int(node, "no_such_attribute", 7) == 7
    assert attr_int(node, "no_such_attribute", -3) == -3
    assert isinstance(attr_int(node, "ceil_mode", 7), int)


def test_attr_float_present_and_default() -> None:
    node = _leaky_node()
    assert attr_float(node, "alpha", 0.01) == pytest.approx(0.25)
    assert attr_float(node, "beta", 0.5) == 0.5
    assert isinstance(attr_float(node, "alpha", 0.01), float)


def test_attr_str_present_and_default() -> None:
    node = _attr_node()
    assert attr_str(node, "auto_pad", "NOTSET") == "VALID"
    assert attr_str(node, "mode", "nearest") == "nearest"
    assert isinstance(attr_str(node, "auto_pad", ""), str)


def test_attr_helpers_on_a_node_without_attributes() -> None:
    node = ir.Node("", "Relu", [ir.Value(name="x")])
    assert attr_int(node, "axis", 1) == 1
    assert attr_float(node, "alpha", 0.2) == 0.2
    assert attr_str(node, "mode", "constant") == "constant"


# ---------------------------------------------------------------------------------------------------
# node_label


def test_node_label_is_the_name_when_the_node_has_one() -> None:
    node = ir.Node("", "Conv", [ir.Value(name="x")], name="/backbone/conv1")
    node.outputs[0].name = "c"
    assert node_label(node) == "/backbone/conv1"


def test_node_label_of_an_unnamed_node_names_op_and_first_output() -> None:
    node = ir.Node("", "Split", [ir.Value(name="x")], num_outputs=2)
    node.outputs[0].name = "first"
    node.outputs[1].name = "second"
    assert node_label(node) == "<Split -> first>"


def test_node_label_of_unnamed_nodes_read_from_a_model() -> None:
    model = ir.from_proto(builders.conv_relu_model())
    labels = [node_label(n) for n in model.graph]
    assert labels == ["<Conv -> c>", "<Relu -> y>"]


def test_node_label_without_outputs() -> None:
    node = ir.Node("", "Print", [ir.Value(name="x")], num_outputs=0)
    assert node.outputs == ()
    assert node_label(node) == "<unnamed Print>"


def test_node_label_with_an_unnamed_output() -> None:
    node = ir.Node("", "Relu", [ir.Value(name="x")])
    assert not node.outputs[0].name
    assert node_label(node) == "<unnamed Relu>"


# ---------------------------------------------------------------------------------------------------
# default_opset


def _relu_proto(opsets: dict[str, int]) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    imports = [onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    return onnx.helper.make_model(graph, opset_imports=imports, ir_version=10)


@pytest.mark.parametrize(
    ("opsets", "expected"),
    [
        ({"": 17}, 17),
        ({"ai.onnx": 15}, 15),
        ({"": 19, "com.microsoft": 1}, 19),
        ({"com.microsoft": 1}, 1),
        ({}, 1),
    ],
)
def test_default_opset_from_a_proto(opsets: dict[str, int], expected: int) -> None:
    assert default_opset(ir.from_proto(_relu_proto(opsets))) == expected


def test_default_opset_follows_the_model_imports() -> None:
    model = ir.from_proto(builders.conv_relu_model(opset=13))
    assert default_opset(model) == 13
    model.opset_imports.clear()
    assert default_opset(model) == 1
    model.opset_imports["ai.onnx"] = 12
    assert default_opset(model) == 12
    model.opset_imports[""] = 21  # the plain spelling wins when a model has both
    assert default_opset(model) == 21
    assert isinstance(default_opset(model), int)


# ---------------------------------------------------------------------------------------------------
# NameScope

LOOP_IF = """
loop_if (float[2] x, int64 trip, bool cond) => (float[2] out) {
    [outer] h = Relu (x)
    out = Loop (trip, cond, h) <
        body = loop_body (int64 iter, bool cond_in, float[2] carried) => (bool cond_out, float[2] next) {
            cond_out = Identity (cond_in)
            [inner_if] next = If (cond_in) <
                then_branch = then_g () => (float[2] deep) {
                    [deep_node] deep = Neg (carried)
                },
                else_branch = else_g () => (float[2] shallow) {
                    shallow = Identity (carried)
                }
            >
        }
    >
}
"""


def _loop_if_model() -> ir.Model:
    return ir.from_proto(builders.parse(LOOP_IF))


def test_fresh_returns_the_base_when_free() -> None:
    scope = NameScope(ir.from_proto(builders.conv_relu_model()).graph)
    assert scope.fresh("c_quantized") == "c_quantized"
    assert scope.fresh("c_quantized") == "c_quantized_1"
    assert scope.fresh("c_quantized") == "c_quantized_2"


def test_fresh_avoids_inputs_initializers_outputs_and_node_names() -> None:
    proto = builders.conv_relu_model()
    proto.graph.node[0].name = "conv_node"
    scope = NameScope(ir.from_proto(proto).graph)
    for taken in ("x", "w", "b", "c", "y", "conv_node"):
        assert scope.fresh(taken) == f"{taken}_1"


def test_fresh_avoids_names_of_every_nested_subgraph() -> None:
    scope = NameScope(_loop_if_model().graph)
    # Loop body inputs/outputs, the If inside the body, and the branches of that If.
    body_names = ("iter", "cond_in", "carried", "cond_out", "next", "inner_if")
    for taken in (*body_names, "deep", "deep_node", "shallow"):
        assert scope.fresh(taken) == f"{taken}_1", taken
    # main-graph names too
    for taken in ("x", "trip", "cond", "h", "outer", "out"):
        assert scope.fresh(taken) == f"{taken}_1", taken


def test_fresh_skips_suffixed_names_that_are_taken() -> None:
    proto = builders.parse(
        """
        taken (float[2] a) => (float[2] a_2) {
            a_1 = Relu (a)
            a_2 = Neg (a_1)
        }
        """
    )
    scope = NameScope(ir.from_proto(proto).graph)
    assert scope.fresh("a") == "a_3"
    assert scope.fresh("a") == "a_4"
    assert scope.fresh("a_1") == "a_1_1"


def test_fresh_names_are_unique() -> None:
    model = _loop_if_model()
    existing = {v.name for g in model.graphs() for n in g for v in n.outputs}
    scope = NameScope(model.graph)
    names = [scope.fresh(base) for base in ["x", "h", "deep", "new"] * 10]
    assert len(set(names)) == len(names)
    assert not set(names) & existing


def test_fresh_names_are_deterministic() -> None:
    bases = ["h", "deep", "q", "h", "q", "x", "deep"]
    first = NameScope(_loop_if_model().graph)
    second = NameScope(_loop_if_model().graph)
    assert [first.fresh(b) for b in bases] == [second.fresh(b) for b in bases]
    scope = NameScope(_loop_if_model().graph)
    assert [scope.fresh(b) for b in bases] == ["h_1", "deep_1", "q", "h_2", "q_1", "x_1", "deep_2"]


def test_reserve_marks_names_as_taken() -> None:
    scope = NameScope(ir.from_proto(builders.conv_relu_model()).graph)
    scope.reserve(["made_outside", "made_outside_1"])
    scope.reserve(iter(["from_a_generator"]))
    assert scope.fresh("made_outside") == "made_outside_2"
    assert scope.fresh("from_a_generator") == "from_a_generator_1"
    assert scope.fresh("untouched") == "untouched"


# ---------------------------------------------------------------------------------------------------
# make_initializer


def _roundtrip(model: ir.Model, name: str) -> np.ndarray:
    """The initializer ``name`` after serializing the model to protobuf."""
    proto = ir.to_proto(model)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    return onnx.numpy_helper.to_array(tensor)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([-128, 0, 127], np.int8),
        np.array([0, 128, 255], np.uint8),
        np.array([[1, -2]], np.int32),
        np.array([1, 2], np.int64),
        np.array([0.5, -1.5], np.float16),
        np.array([True, False]),
    ],
    ids=lambda a: str(a.dtype),
)
def test_make_initializer_keeps_dtype_shape_and_data(array: np.ndarray) -> None:
    model = ir.from_proto(builders.conv_relu_model())
    scope = NameScope(model.graph)
    value = make_initializer(model.graph, scope, "extra", array)
    assert value.name == "extra"
    assert model.graph.initializers["extra"] is value
    assert value.dtype == ir.DataType.from_numpy(array.dtype)
    assert value.shape is not None and tuple(value.shape) == array.shape
    assert is_constant(value)
    data = const_array(value)
    assert data is not None and data.dtype == array.dtype
    np.testing.assert_array_equal(data, array)
    back = _roundtrip(model, "extra")
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("scalar", [np.array(0.125, np.float32), np.float32(0.125), np.array(7, np.int8)])
def test_make_initializer_keeps_a_scalar_zero_dimensional(scalar: np.ndarray) -> None:
    model = ir.from_proto(builders.conv_relu_model())
    value = make_initializer(model.graph, NameScope(model.graph), "s", scalar)
    assert value.shape is not None and tuple(value.shape) == ()
    assert value.const_value is not None and tuple(value.const_value.shape) == ()
    back = _roundtrip(model, "s")
    assert back.shape == ()
    assert back == np.asarray(scalar)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],  # strided view
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4).T,  # transposed (Fortran order)
        lambda: np.asfortranarray(np.arange(12, dtype=np.int8).reshape(3, 4)),
        lambda: np.arange(10, dtype=np.float32)[::-1],  # negative stride
    ],
    ids=["strided", "transposed", "fortran", "reversed"],
)
def test_make_initializer_accepts_non_contiguous_arrays(make: object) -> None:
    array = make()  # type: ignore[operator]
    assert not array.flags.c_contiguous
    expected = array.copy()
    model = ir.from_proto(builders.conv_relu_model())
    value = make_initializer(model.graph, NameScope(model.graph), "nc", array)
    assert tuple(value.shape) == expected.shape  # type: ignore[arg-type]
    np.testing.assert_array_equal(const_array(value), expected)
    np.testing.assert_array_equal(_roundtrip(model, "nc"), expected)


def test_make_initializer_picks_a_fresh_name_on_a_clash() -> None:
    model = ir.from_proto(builders.conv_relu_model())
    scope = NameScope(model.graph)
    original_w = model.graph.initializers["w"]
    first = make_initializer(model.graph, scope, "w", np.zeros(2, np.float32))
    second = make_initializer(model.graph, scope, "w", np.ones(2, np.float32))
    assert (first.name, second.name) == ("w_1", "w_2")
    assert model.graph.initializers["w"] is original_w  # the existing weight is untouched
    np.testing.assert_array_equal(const_array(model.graph.initializers["w_2"]), [1.0, 1.0])
    assert scope.fresh("w") == "w_3"  # the scope remembers what it handed out


def test_make_initializer_value_runs_in_onnxruntime() -> None:
    """A new initializer wired into the graph is data ONNX Runtime reads, with the given values."""
    model = ir.from_proto(builders.conv_relu_model())
    scope = NameScope(model.graph)
    offset = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)
    value = make_initializer(model.graph, scope, "offset", offset)
    relu = _node(model, "Relu")
    add = ir.Node("", "Add", [relu.outputs[0], value], name=scope.fresh("add_offset"))
    add.outputs[0].name = scope.fresh("y")
    add.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.append(add)
    old_output = model.graph.outputs[0]
    model.graph.outputs[0] = add.outputs[0]

    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    (reference,) = run(_session(builders.conv_relu_model()), feed)
    (shifted,) = run(_session(model), feed)
    assert old_output.name == "y" and add.outputs[0].name == "y_1"
    np.testing.assert_allclose(shifted, reference + offset, rtol=0, atol=1e-6)
    assert not np.allclose(shifted, reference)


# ---------------------------------------------------------------------------------------------------
# materialize_initializers


def _loaded_with_typed_initializers() -> ir.Model:
    """A model read from protobuf (as a file load gives it), its initializers of several element types."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        initializer=[
            onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "w"),
            onnx.numpy_helper.from_array(np.array([3, -1], np.int64), "shape"),
            onnx.numpy_helper.from_array(np.array([b"a", b"bc"], dtype=object), "names"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.load_from_string(model.SerializeToString()))


def test_materialized_initializers_keep_their_data_read_only() -> None:
    model = _loaded_with_typed_initializers()
    before = {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}  # type: ignore[union-attr]
    assert materialize_initializers(model) == 2  # the float and the int64 ones; strings stay protobuf
    initializers = model.graph.initializers
    assert not isinstance(initializers["w"].const_value, ir.TensorProtoTensor)
    for name in ("w", "shape"):
        array = const_array(initializers[name])
        assert array is not None
        np.testing.assert_array_equal(array, before[name])
        assert array.dtype == before[name].dtype
        assert array is const_array(initializers[name])  # decoded once, not per call
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
    # The written model reads back the same data.
    proto = ir.to_proto(model)
    written = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(written["w"], before["w"])
    np.testing.assert_array_equal(written["shape"], before["shape"])
    assert materialize_initializers(model) == 0  # nothing left to decode
