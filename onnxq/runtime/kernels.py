"""What the installed ONNX Runtime can run: its operator schemas and its CPU kernel registrations.

Why a table and not a probe: onnx's defaults run ahead of onnxruntime, and not evenly. onnxruntime 1.32
loads opset 28 models (it runs ``Relu`` there) but has no ``QuantizeLinear``/``DequantizeLinear``
kernel for their opset-28 schema; onnxruntime 1.19 has ``ConvInteger`` for uint8 weights only. A model
is runnable when *every* node resolves, at the model's opset, to a schema version for which a kernel
is registered with the node's types (or whose schema has a function body ONNX Runtime expands).
onnxruntime exposes both tables to Python (``get_all_operator_schema``, ``get_all_opkernel_def``), so
the answer is exact for the installed version and costs a few milliseconds once.

Kernel matching follows ONNX Runtime's rule: a kernel registered for versions ``[start, end]`` serves a
node whose schema ``since_version`` equals ``start``, or lies in ``(start, end]`` when ``end`` is
closed; an open-ended registration (``end`` = INT_MAX) serves ``start`` only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph import DEFAULT_DOMAINS, node_label

__all__ = ["KernelTable", "Unsupported", "kernel_table", "onnxruntime_version", "ort_max_versions"]

logger = logging.getLogger(__name__)

_OPEN_END = 2**31 - 1
_CPU = "CPUExecutionProvider"
#: Ops onnxruntime resolves while loading the graph, without a kernel (a Constant becomes an initializer).
_NO_KERNEL_NEEDED = frozenset({("", "Constant")})


def _domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


@dataclass(frozen=True)
class _Kernel:
    start: int
    end: int
    types: Mapping[str, frozenset[str]]

    def serves(self, since_version: int) -> bool:
        if self.start == since_version:
            return True
        return self.start < since_version <= self.end and self.end != _OPEN_END


@dataclass(frozen=True)
class _Schema:
    since_version: int
    inputs: tuple[tuple[str, bool], ...]  # (type string, variadic)
    outputs: tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class Unsupported:
    """A node that the installed ONNX Runtime cannot run, and why (one line)."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op}): {self.reason}"


def onnxruntime_version() -> str:
    """The installed onnxruntime's version string."""
    import onnxruntime

    return str(onnxruntime.__version__)


def _type_string(dtype: ir.DataType) -> str:
    return f"tensor({dtype.name.lower()})"


class KernelTable:
    """Schemas and CPU kernels of the installed onnxruntime; see the module docstring."""

    def __init__(self, schemas: Iterable[object], kernels: Iterable[object], version: str) -> None:
        self.version = version
        self._schemas: dict[tuple[str, str], list[_Schema]] = {}
        for schema in schemas:
            key = (_domain(schema.domain), schema.name)  # type: ignore[attr-defined]
            self._schemas.setdefault(key, []).append(
                _Schema(
                    int(schema.since_version),  # type: ignore[attr-defined]
                    tuple(_params(schema.inputs)),  # type: ignore[attr-defined]
                    tuple(_params(schema.outputs)),  # type: ignore[attr-defined]
                )
            )
        for versions in self._schemas.values():
            versions.sort(key=lambda s: s.since_version)
        self._kernels: dict[tuple[str, str], list[_Kernel]] = {}
        for kernel in kernels:
            if kernel.provider != _CPU:  # type: ignore[attr-defined]
                continue
            start, end = kernel.version_range  # type: ignore[attr-defined]
            types = {
                name: frozenset(allowed)
                for name, allowed in kernel.type_constraints.items()  # type: ignore[attr-defined]
            }
            key = (_domain(kernel.domain), kernel.op_name)  # type: ignore[attr-defined]
            self._kernels.setdefault(key, []).append(_Kernel(int(start), int(end), types))

    # -- questions about one op ----------------------------------------------------------------------
    def op_types(self) -> frozenset[str]:
        """Every op type onnxruntime has a schema for, in any domain."""
        return frozenset(op for _, op in self._schemas)

    def knows(self, domain: str, op_type: str) -> bool:
        """Whether onnxruntime has any schema for the op (it cannot load a node it has none for)."""
        return (_domain(domain), op_type) in self._schemas

    def schema(self, domain: str, op_type: str, opset: int) -> _Schema | None:
        """The schema version a node of this op resolves to at ``opset`` (``None``: none exists)."""
        found = None
        for schema in self._schemas.get((_domain(domain), op_type), ()):
            if schema.since_version <= opset:
                found = schema
        return found

    def since_version(self, domain: str, op_type: str, opset: int) -> int | None:
        schema = self.schema(domain, op_type, opset)
        return None if schema is None else schema.since_version

    def runs(
        self,
        domain: str,
        op_type: str,
        opset: int,
        types: Mapping[int, ir.DataType] | None = None,
        output_types: Mapping[int, ir.DataType] | None = None,
    ) -> bool:
        """Whether a node of this op at ``opset``, with these input/output types, has a CPU kernel.

        ``types``/``output_types`` map input/output indices to element types; types left out are not
        checked. An op without a kernel whose schema has a function body counts as runnable (ONNX
        Runtime expands the function).
        """
        return self.problem(domain, op_type, opset, types, output_types) is None

    def problem(
        self,
        domain: str,
        op_type: str,
        opset: int,
        types: Mapping[int, ir.DataType] | None = None,
        output_types: Mapping[int, ir.DataType] | None = None,
    ) -> str | None:
        """Why onnxruntime cannot run such a node (``None`` when it can); see :meth:`runs`."""
        key = (_domain(domain), op_type)
        schema = self.schema(domain, op_type, opset)
        where = f"onnxruntime {self.version}"
        if schema is None:
            if key not in self._schemas:
                return f"{where} does not know the op {_qualified(domain, op_type)}"
            return f"{where} has no {op_type} schema at opset {opset}"
        if key in _NO_KERNEL_NEEDED:
            return None
        kernels = [k for k in self._kernels.get(key, ()) if k.serves(schema.since_version)]
        if not kernels:
            if _has_function(domain, op_type, schema.since_version):
                return None
            return f"{where} has no CPU kernel for {op_type}-{schema.since_version}"
        bound = _bind(schema, types or {}, output_types or {})
        for kernel in kernels:
            if all(
                name not in kernel.types or type_string in kernel.types[name]
                for name, type_string in bound.items()
            ):
                return None
        listed = ", ".join(f"{name}={value[7:-1]}" for name, value in sorted(bound.items()))
        return f"{where} has no CPU kernel for {op_type}-{schema.since_version} with {listed}"

    def highest_opset(self, ops: Iterable[str], upper: int, lower: int) -> int | None:
        """The highest default-domain opset in ``[lower, upper]`` at which every op in ``ops`` runs."""
        needed = sorted(set(ops))
        for opset in range(upper, lower - 1, -1):
            if all(self.runs("", op, opset) for op in needed):
                return opset
        return None

    # -- questions about a model -------------------------------------------------------------------
    def unsupported(self, model: ir.Model) -> list[Unsupported]:
        """Every node (subgraphs included) that the installed onnxruntime cannot run, in graph order.

        Calls of the model's own functions are skipped (onnxruntime inlines them); so are nodes whose
        op onnxruntime knows no schema for in a domain the model does not import (they are reported by
        onnxruntime itself when it loads the model).
        """
        local = {(_domain(f.domain), f.name) for f in model.functions.values()}
        found: list[Unsupported] = []
        for node in _all_nodes(model.graph):
            domain = _domain(node.domain)
            if (domain, node.op_type) in local:
                continue
            opset = model.opset_imports.get(domain, model.opset_imports.get(node.domain, 1))
            if domain == "" and "" not in model.opset_imports:
                opset = model.opset_imports.get("ai.onnx", 1)
            types = {i: v.dtype for i, v in enumerate(node.inputs) if v is not None and v.dtype is not None}
            outputs = {i: v.dtype for i, v in enumerate(node.outputs) if v.dtype is not None}
            problem = self.problem(domain, node.op_type, opset, types, outputs)
            if problem is not None:
                found.append(Unsupported(node_label(node), _qualified(domain, node.op_type), problem))
        return found


def _qualified(domain: str, op_type: str) -> str:
    return op_type if _domain(domain) == "" else f"{domain}.{op_type}"


def _all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _all_nodes(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    yield from _all_nodes(sub)


def _params(params: Iterable[object]) -> Iterator[tuple[str, bool]]:
    for param in params:
        yield str(param.typeStr), "Variadic" in str(param.option)  # type: ignore[attr-defined]


def _bind(
    schema: _Schema, inputs: Mapping[int, ir.DataType], outputs: Mapping[int, ir.DataType]
) -> dict[str, str]:
    """Type-constraint name → ``tensor(<type>)`` for the node's known tensor types."""
    bound: dict[str, str] = {}
    for params, types in ((schema.inputs, inputs), (schema.outputs, outputs)):
        if not params:
            continue
        for index, dtype in types.items():
            if index >= len(params) and not params[-1][1]:
                continue
            name = params[min(index, len(params) - 1)][0]
            if name.startswith(("tensor(", "seq(", "optional(")):
                continue  # a fixed type, checked by onnxruntime's type inference
            bound.setdefault(name, _type_string(dtype))
    return bound


@functools.cache
def _has_function(domain: str, op_type: str, since_version: int) -> bool:
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(op_type, since_version, _domain(domain))
    except Exception:  # not in the installed onnx (a com.microsoft op, an older schema)
        return False
    return bool(
        getattr(schema, "has_function", False) or getattr(schema, "has_context_dependent_function", False)
    )


@functools.lru_cache(maxsize=1)
def kernel_table() -> KernelTable:
    """The installed onnxruntime's table (built once per process)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return KernelTable(
        ort_state.get_all_operator_schema(), ort_state.get_all_opkernel_def(), onnxruntime_version()
    )


@functools.lru_cache(maxsize=1)
def ort_max_versions() -> tuple[int, int]:
    """The highest (IR version, default-domain opset import) the installed onnxruntime loads at all.

    Probed once with a one-node model because the limits move with each onnxruntime release and
    onnx's defaults run ahead of them (onnx 1.23 writes IR 14 / opset 28; onnxruntime 1.31 takes 13 / 26).
    Loading the import is not enough for a node to run: which ops have kernels at that opset is the
    kernel table's question (:meth:`KernelTable.highest_opset`).
    """
    from onnxq.runtime.session import make_session

    def loads(ir_version: int, opset: int) -> bool:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
        node = ir.Node("", "Relu", [x])
        node.outputs[0].name = "y"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": opset})
        proto = ir.to_proto(ir.Model(graph, ir_version=ir_version))
        try:
            make_session(proto.SerializeToString(), opt_level="disable")
        except OnnxqError:
            return False
        return True

    max_opset = 17
    for opset in range(30, 17, -1):
        if loads(9, opset):
            max_opset = opset
            break
    max_ir = 9
    for ir_version in range(16, 9, -1):
        if loads(ir_version, 17):
            max_ir = ir_version
            break
    return max_ir, max_opset
