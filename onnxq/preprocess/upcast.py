"""Half-precision models computed in float32, so that they can be calibrated and quantized.

Models exported for a GPU are often stored in float16 (``model.half()`` before ``torch.onnx.export``)
or bfloat16. Quantization needs float32 arithmetic around the integer kernels (QuantizeLinear on a
float16 tensor exists only from opset 19, and ONNX Runtime's CPU provider runs most float16 ops by
casting to float32 and back anyway), so :class:`UpcastHalfPass` turns the computation into float32:

- half-precision initializers, ``ConstantOfShape`` fills, ``Cast``/``RandomNormal``-style ``to`` and
  ``dtype`` attributes and every half-precision value type (in subgraphs too) become float32;
- the model's interface does not change: a half-precision graph input is cast to float32 once, right
  after the input, and a half-precision graph output is cast back, under its own name;
- a ``Cast`` to float32 whose input is already float32 after this (an autocast export's round trip)
  is removed.

The float32 model computes what the half-precision one does, only with less rounding; validation
compares the result with the user's half-precision model.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, prepend

__all__ = ["HALF_TYPES", "UpcastHalfPass", "has_half_computation"]

#: The storage types computed in float32 instead.
HALF_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})

#: Ops whose attribute names a produced element type (the ``onnx.TensorProto`` enum).
_DTYPE_ATTRIBUTES = {
    "Cast": "to",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "EyeLike": "dtype",
    "Bernoulli": "dtype",
}


def _is_half(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in HALF_TYPES


def has_half_computation(model: ir.Model) -> bool:
    """Whether any anchor-type op of the main graph or a body computes in half precision."""
    return any(
        node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and any(_is_half(v) for v in node.inputs)
        for node in model.graph.all_nodes()
    )


class UpcastHalfPass(ir.passes.InPlacePass):
    """Compute a float16/bfloat16 model in float32, its interface unchanged (see the module docstring).

    ``upcast`` counts the values whose type changed; ``casts`` the boundary Casts added.
    """

    def __init__(self) -> None:
        super().__init__()
        self.upcast = 0
        self.casts = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not has_half_computation(model):
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        half_inputs = [v for v in graph.inputs if _is_half(v)]
        half_outputs = [(i, v, v.dtype) for i, v in enumerate(graph.outputs) if v.dtype in HALF_TYPES]
        for graph_ in (graph, *graph.subgraphs()):
            for value in graph_.initializers.values():
                if _is_half(value) and value.const_value is not None:
                    array = value.const_value.numpy().astype("float32")
                    value.const_value = ir.Tensor(array, name=value.name)
                    self._float(value)
            for value in (*graph_.inputs, *graph_.outputs) if graph_ is not graph else ():
                self._float(value)
            for node in graph_:
                self._node(node)
        for value in half_inputs:
            self._cast_input(graph, value)
        for index, value, half in half_outputs:
            assert half is not None
            self._cast_output(graph, index, value, half)
        self._drop_float_round_trips(model)
        return ir.passes.PassResult(model, modified=True)

    def _float(self, value: ir.Value) -> None:
        if _is_half(value):
            value.dtype = ir.DataType.FLOAT
            self.upcast += 1

    def _node(self, node: ir.Node) -> None:
        """Float32 outputs, ``to``/``dtype`` attributes and ConstantOfShape fills."""
        if node.domain in DEFAULT_DOMAINS:
            name = _DTYPE_ATTRIBUTES.get(node.op_type, "")
            attribute = node.attributes.get(name) if name else None
            if attribute is not None and ir.DataType(attribute.as_int()) in HALF_TYPES:
                node.attributes[name] = ir.AttrInt64(name, int(ir.DataType.FLOAT))
            if node.op_type == "ConstantOfShape" and "value" in node.attributes:
                fill = node.attributes["value"].as_tensor()
                if fill.dtype in HALF_TYPES:
                    upcast = ir.Tensor(fill.numpy().astype("float32"))
                    node.attributes["value"] = ir.AttrTensor("value", upcast)
        for output in node.outputs:
            self._float(output)

    def _cast_input(self, graph: ir.Graph, value: ir.Value) -> None:
        """Read a half-precision graph input through one Cast to float32."""
        uses = list(value.uses())
        cast = ir.node("Cast", [value], {"to": int(ir.DataType.FLOAT)}, name=f"{value.name}_to_float32")
        upcast = cast.outputs[0]
        upcast.name, upcast.dtype, upcast.shape = f"{value.name}_float32", ir.DataType.FLOAT, value.shape
        for user, index in uses:
            user.replace_input_with(index, upcast)
        prepend(graph, [cast])
        self.casts += 1

    def _cast_output(self, graph: ir.Graph, index: int, value: ir.Value, half: ir.DataType) -> None:
        """Cast a graph output (now computed in float32) back to its half type, under its own name."""
        name = value.name
        value.name = f"{name}_float32"
        cast = ir.node("Cast", [value], {"to": int(half)}, name=f"{name}_to_{half.name.lower()}")
        cast.outputs[0].name = name
        cast.outputs[0].dtype = half
        cast.outputs[0].shape = value.shape
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]
        self.casts += 1

    @staticmethod
    def _drop_float_round_trips(model: ir.Model) -> None:
        """Remove a Cast to float32 of a float32 value (not one that writes a graph output)."""
        for graph in (model.graph, *model.graph.subgraphs()):
            for node in list(graph):
                if node.op_type != "Cast" or node.domain not in DEFAULT_DOMAINS or not node.inputs:
                    continue
                source, target = node.inputs[0], node.outputs[0]
                if source is None or target.is_graph_output():
                    continue
                if source.dtype == ir.DataType.FLOAT and node.attributes.get_int("to") == ir.DataType.FLOAT:
                    target.replace_all_uses_with(source)
                    graph.remove(node, safe=True)
