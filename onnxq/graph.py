"""Small helpers over the onnx-ir graph that several passes need.

Passes work on :mod:`onnx_ir` objects (use-def chains, safe mutation); these helpers answer the few
questions they ask again and again: is this value a constant, what is an attribute's value, which fresh
name can a new value get.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

__all__ = [
    "DEFAULT_DOMAINS",
    "NameScope",
    "attr_float",
    "attr_int",
    "attr_ints",
    "attr_str",
    "body_owners",
    "clip_bounds",
    "const_array",
    "default_opset",
    "float_scalar",
    "home_graph",
    "initializer_bytes",
    "insert_after_producer",
    "is_constant",
    "is_float",
    "make_initializer",
    "materialize_initializers",
    "node_label",
    "prepend",
    "remove_dead",
    "rounded_from",
]


#: The default (``ai.onnx``) domain, as nodes and opset imports may spell it.
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (``ai.onnx``) opset version (1 when it imports none)."""
    imports = model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a constant (initializer or Constant node output), else ``None``.

    A graph input that also has an initializer is overridable at run time and is *not* a constant.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


#: Element types :func:`materialize_initializers` decodes: numpy holds them one element per item, as
#: the serialized form does (4-bit, 8-bit float, bfloat16 and string tensors keep their protobuf form).
_MATERIALIZED_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)


def materialize_initializers(model: ir.Model) -> int:
    """Hold every in-memory protobuf initializer (all graphs) as a read-only numpy array; return how many.

    An initializer read from a file is a protobuf tensor whose ``numpy()`` decodes its bytes on every
    call, and the passes ask again and again: the planner, the Q/DQ writer, the rewrite behind each
    candidate that ``auto``, the range rescue and ``--target`` score. On ZFNet-512 (349 MB of
    weights) 19 rewrites decoded 633 tensors for 9.1 s of a 28 s quantization. Decoded once here, a
    weight costs its bytes once: the protobuf's copy goes when the last reference to it does.

    Read-only because the array is now the model's own: a pass that changes a weight must build a new
    tensor (as they all do), never write into what :func:`const_array` returned.
    """
    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.TensorProtoTensor) or tensor.dtype not in _MATERIALIZED_TYPES:
                continue
            try:
                array = tensor.numpy()
            except ValueError:  # external data, read where it lies
                continue
            array.setflags(write=False)
            value.const_value = ir.Tensor(
                array, dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string
            )
            count += 1
    return count


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant in :func:`const_array`'s sense; ``None`` for anything else.

    Its data is not read: a classifier's weight can be 400 MB.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tuple(tensor.shape.numpy())


def is_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a compile-time constant (see :func:`const_array`)."""
    if value is None or value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in DEFAULT_DOMAINS


def is_float(value: ir.Value | None) -> bool:
    """Whether ``value`` is a float32 tensor, or of unknown type (shape inference did not reach it)."""
    if value is None:
        return False
    return value.dtype is None or value.dtype == ir.DataType.FLOAT


def node_label(node: ir.Node) -> str:
    """How reports and errors name a node: its name, else ``<Conv -> conv_out>`` (op and first output)."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else None
    return f"<{node.op_type} -> {out}>" if out else f"<unnamed {node.op_type}>"


def rounded_from(value: ir.Value | None) -> ir.Value | None:
    """``x`` when ``value`` is ``DequantizeLinear(QuantizeLinear(x))``, else ``None``.

    ``value`` is then ``x`` rounded to an integer grid and back: ``x`` is the tensor a reader of the
    rounded one could read instead (a float twin, a product that takes its own range at run time).
    """
    dequantize = value.producer() if value is not None else None
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.inputs[0] is None:
        return None
    quantize = dequantize.inputs[0].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return None
    return quantize.inputs[0]


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value`` (at any input), when it has one use and is no graph output.

    What a rewrite that changes ``value`` needs to know: nobody else sees the change.
    """
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None


def remove_dead(nodes: Sequence[ir.Node | None]) -> None:
    """Remove the nodes (readers before producers) whose outputs nothing reads any more."""
    for node in nodes:
        if node is None or node.graph is None:
            continue
        if any(out.is_graph_output() or list(out.uses()) for out in node.outputs):
            continue
        node.graph.remove(node, safe=True)


def attr_int(node: ir.Node, name: str, default: int) -> int:
    """An INT attribute, or ``default`` when absent."""
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def attr_ints(node: ir.Node, name: str, default: Sequence[int]) -> list[int]:
    """An INTS attribute, or ``default`` when absent."""
    attr = node.attributes.get(name)
    return list(default) if attr is None else [int(v) for v in attr.as_ints()]


def attr_float(node: ir.Node, name: str, default: float) -> float:
    """A FLOAT attribute, or ``default`` when absent."""
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def float_scalar(value: ir.Value | None, *, any_rank: bool = False) -> float | None:
    """A constant float of rank 0 or 1 and one element, as a Python float; else ``None``.

    Rank ≤ 1: a size-1 constant of higher rank would broadcast an elementwise result to that rank,
    which matters to a rewrite; ``any_rank`` accepts one of any rank (for reading a value only).
    """
    data = const_array(value)
    if data is None or data.size != 1 or not np.issubdtype(data.dtype, np.floating):
        return None
    if data.ndim > 1 and not any_rank:
        return None
    return float(data.reshape(-1)[0])


def clip_bounds(node: ir.Node, opset: int | None = None) -> tuple[float, float] | None:
    """A ``Clip``'s ``(min, max)``, a missing bound infinite; ``None`` when a bound is not a constant.

    Attributes below opset 11, constant inputs from it. ``opset`` ``None``: the node's own form decides
    (``min``/``max`` attributes, else inputs), for callers that hold a node and not its model.
    """
    attributes = "min" in node.attributes or "max" in node.attributes
    if (opset is not None and opset < 11) or (opset is None and attributes):
        return attr_float(node, "min", -math.inf), attr_float(node, "max", math.inf)
    bounds = []
    for index, default in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            bounds.append(default)
            continue
        found = float_scalar(value)
        if found is None:
            return None
        bounds.append(found)
    return bounds[0], bounds[1]


def attr_str(node: ir.Node, name: str, default: str) -> str:
    """A STRING attribute, or ``default`` when absent."""
    attr = node.attributes.get(name)
    return default if attr is None else str(attr.as_string())


class NameScope:
    """Hands out value and node names that do not clash with any existing name.

    Names are derived from a readable base (``conv1_out_quantized``) and made unique with a counter in
    the order they are requested, so the same model and the same passes give the same names.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = set()
        for g in (graph, *graph.subgraphs()):
            self._taken.update(v.name for v in g.inputs if v.name)
            self._taken.update(g.initializers)
            for node in g:
                if node.name:
                    self._taken.add(node.name)
                self._taken.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str) -> str:
        """A name starting with ``base`` that no value or node has yet."""
        name = base
        counter = 1
        while name in self._taken:
            name = f"{base}_{counter}"
            counter += 1
        self._taken.add(name)
        return name

    def reserve(self, names: Iterable[str]) -> None:
        """Mark names as used (values created outside this scope)."""
        self._taken.update(names)


def initializer_value(name: str, array: np.ndarray) -> ir.Value:
    """A value holding ``array`` as its constant, typed and shaped, not yet registered in a graph."""
    # ir.Tensor directly: ir.tensor() first checks the array against runtime protocols, ~10x the
    # cost (a quarter of a second per rewrite of a model with thousands of Q/DQ parameters).
    tensor = ir.Tensor(array, name=name)
    return ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )


def make_initializer(graph: ir.Graph, names: NameScope, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base`` and return its value."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape [1])
        array = array.copy(order="C")
    value = initializer_value(names.fresh(base), array)
    graph.register_initializer(value)
    return value


def trim_inputs(inputs: Sequence[ir.Value | None]) -> list[ir.Value | None]:
    """``inputs`` without trailing missing optional inputs (what a new node's input list ends with)."""
    trimmed = list(inputs)
    while trimmed and trimmed[-1] is None:
        trimmed.pop()
    return trimmed


def take_over(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (graph outputs included) reads ``new``, which also takes ``old``'s name.

    ``new`` keeps its own type and shape where it has them and takes ``old``'s where it has none (a
    graph output must have a type).
    """
    name = old.name
    if new.type is None and old.type is not None and old.dtype is not None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers (what a session holds a copy of, at most)."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)


def body_owners(model: ir.Model) -> dict[int, tuple[ir.Node, str]]:
    """The node holding each If/Loop/Scan body of ``model`` and the attribute name, by ``id`` of the body.

    One walk serves the rule engine (is a body still attached?), the calibration's lifting of body
    tensors and the sharing of body constants (which graph encloses a body?).
    """
    owners: dict[int, tuple[ir.Node, str]] = {}
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                owners[id(attr.as_graph())] = (node, attr.name)
            elif attr.type == ir.AttributeType.GRAPHS:
                for body in attr.as_graphs():
                    owners[id(body)] = (node, attr.name)
    return owners


def home_graph(value: ir.Value) -> ir.Graph | None:
    """The graph a value belongs to: its producer's, or the graph that declares it as input/initializer.

    A value read inside an If/Loop/Scan body but defined outside it belongs to the outer graph.
    """
    producer = value.producer()
    if producer is not None:
        return producer.graph
    graph = value.graph
    return graph if isinstance(graph, ir.Graph) else None


def prepend(graph: ir.Graph, nodes: Sequence[ir.Node]) -> None:
    """Insert ``nodes`` at the start of ``graph``, in their order."""
    first = next(iter(graph), None)
    if first is None:
        graph.extend(nodes)
    else:
        graph.insert_before(first, nodes)


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: Sequence[ir.Node]) -> None:
    """Insert ``nodes`` (which read ``value``) right after its producer when ``graph`` holds it.

    Else, for a graph input or a value from an outer graph, at the start of ``graph``: either way the
    nodes run as soon as ``value`` exists.
    """
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, nodes)
    else:
        prepend(graph, nodes)
