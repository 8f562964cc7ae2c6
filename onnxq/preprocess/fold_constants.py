"""Fold constant subgraphs into initializers, evaluating them once in ONNX Runtime."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxq.declines import Decline
from onnxq.graph import initializer_value, node_label
from onnxq.runtime.session import SessionError, make_session, run

__all__ = ["FoldConstantsPass"]

logger = logging.getLogger(__name__)

_ONNX_DOMAINS = frozenset({"", "ai.onnx"})

# Never folded: random or stateful ops, the Q/DQ structure that quantization relies on, and ops whose
# results are not tensors.
_EXCLUDED_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Dropout",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Constant",
        "If",
        "Loop",
        "Scan",
        "SplitToSequence",
        "ConcatFromSequence",
    }
)
_EXCLUDED_PREFIXES = ("Sequence", "Optional")

# Data types that ONNX Runtime's Python API takes and returns as plain numpy arrays.
_FEEDABLE = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.UINT8,
        ir.DataType.UINT16,
        ir.DataType.UINT32,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)
_EVAL_IR_VERSION = 10
_MAX_BATCH_RETRIES = 8
_NODE_NAME = re.compile(r"\bfold(\d+)\b")


def _is_constant(value: ir.Value) -> bool:
    """An initializer (or value with data) that cannot be overridden by a graph input."""
    return value.const_value is not None and not value.is_graph_input()


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
    )


def _has_ref_attribute(node: ir.Node) -> bool:
    return any(attr.is_ref() for attr in node.attributes.values())


def _static_size(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or not shape.is_static():
        return None
    return int(np.prod(shape.numpy(), dtype=np.int64))


def _castlike_target(node: ir.Node) -> ir.DataType | None:
    """For ``CastLike(x, like)``, the data type of ``like`` when known: only its type is read."""
    if node.op_type != "CastLike" or len(node.inputs) != 2 or node.inputs[1] is None:
        return None
    return node.inputs[1].dtype


def _value_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs whose data a node reads (``CastLike`` with a known target reads only ``x``)."""
    if _castlike_target(node) is not None:
        return [v for v in node.inputs[:1] if v is not None]
    return [v for v in node.inputs if v is not None]


def _is_live(node: ir.Node) -> bool:
    return any(out.uses() or out.is_graph_output() for out in node.outputs)


def _to_initializer(name: str, array: np.ndarray, like: ir.Value | None = None) -> ir.Value:
    value = initializer_value(name, array)
    if like is not None:
        value.metadata_props.update(like.metadata_props)
    return value


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    if len(node.outputs) != 1 or len(node.attributes) != 1:
        return None
    attr = next(iter(node.attributes.values()))
    if attr.is_ref() or attr.name == "sparse_value":
        return None
    try:
        return ir.convenience.get_const_tensor(node.outputs[0])
    except ValueError:
        return None


def _drop_unused_initializer(value: ir.Value) -> bool:
    if value.uses() or value.is_graph_output() or value.is_graph_input() or not value.is_initializer():
        return False
    owner = value.graph
    if owner is None or value.name is None or owner.initializers.get(value.name) is not value:
        return False
    owner.initializers.pop(value.name)
    return True


class _EvaluationError(Exception):
    """ORT could not build or run an evaluation model; ``node`` is the culprit when ORT names it."""

    def __init__(self, message: str, node: ir.Node | None = None) -> None:
        super().__init__(message)
        self.node = node


class FoldConstantsPass(ir.passes.InPlacePass):
    """Replace nodes whose inputs are all constants by initializers holding their results.

    Rewrite rules, applied to the main graph and then to each subgraph (If/Loop/Scan bodies, where
    outer-scope initializers count as constants and new initializers are added to the subgraph):

    1. Every ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``, ``value_string(s)``)
       becomes an initializer with the name of its output (a graph output keeps its name).
    2. A node is *foldable* when it is in the default ONNX domain, is deterministic (not
       Random*/Bernoulli/Multinomial/Dropout), is not part of the Q/DQ structure
       (QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear), has no subgraph or reference
       attributes, does not produce sequences/optionals, has at least one input and all of its
       inputs are constants: initializers that are not graph inputs, values with ``const_value``, or
       outputs of foldable nodes. ``CastLike(x, like)`` needs only ``x`` constant when the data
       type of ``like`` is known (it is evaluated as ``Cast``; torch exports zero biases this way).
       With ``fold_shapes``, a ``Shape`` of a value whose shape is fully static is foldable as well
       (computed from the shape, not evaluated).
    3. All foldable nodes of a graph (the maximal constant subgraph, in topological order) are
       evaluated together in one ONNX Runtime CPU session built from a one-graph onnx_ir model (IR
       version 10, the model's default-domain opset). Constants are fed as session inputs, so
       large weights are never copied into a protobuf.
    4. Outputs consumed by non-folded nodes (including nodes in subgraphs) or by graph outputs
       become initializers named like the original outputs; the folded nodes are removed, and
       initializers they used that are left without uses are removed too.

    Declines (nodes are left in place, logged at debug level) when: a result of a node has more
    than ``size_limit`` elements (checked before evaluation from static shapes and after it from the
    results; the node's consumers then stay too); an input or result has a data type ORT's Python
    API cannot exchange (string, bfloat16, float8, int4, ...); or ORT cannot build or run the
    node. When ORT names the failing node, that node (and so its consumers) is excluded and the
    batch is run again; otherwise the plan is evaluated node by node, so one bad node never blocks
    the rest. Reasons are appended to :attr:`declined`; :attr:`folded_nodes` and :attr:`sessions`
    count the nodes removed and the ORT sessions built. Graphs are expected in topological order
    (a node that reads a value defined after it is not folded). Nodes left without uses are not
    evaluated (dead-code removal is another pass's job), and functions are not visited.
    """

    def __init__(self, size_limit: int = 16 * 1024 * 1024, *, fold_shapes: bool = True) -> None:
        super().__init__()
        if size_limit < 0:
            raise ValueError(f"size_limit must be >= 0, got {size_limit}")
        self.size_limit = size_limit
        self.fold_shapes = fold_shapes
        self.declined: list[Decline] = []
        self.folded_nodes = 0
        self.sessions = 0
        self._declined_nodes: set[ir.Node] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.declined = []
        self.folded_nodes = 0
        self.sessions = 0
        self._declined_nodes = set()
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        modified = False
        for graph in list(model.graphs()):
            modified |= self._lift_constant_nodes(graph)
            if opset is not None:
                modified |= self._fold_graph(graph, opset)
            elif not modified:
                logger.debug("Model has no default-domain opset import; nothing to fold")
        if self.folded_nodes:
            logger.info("Folded %d constant nodes in %d ORT sessions", self.folded_nodes, self.sessions)
        return ir.passes.PassResult(model, modified=modified)

    # ------------------------------------------------------------------------------------------------
    # Constant nodes

    def _lift_constant_nodes(self, graph: ir.Graph) -> bool:
        lifted = False
        for node in list(graph):
            if node.op_type != "Constant" or node.domain not in _ONNX_DOMAINS:
                continue
            tensor = _constant_node_tensor(node)
            output = node.outputs[0]
            name = output.name
            if tensor is None or not name:
                logger.debug("Constant node %s not lifted: unsupported attribute", node.name)
                continue
            tensor.name = name
            value = ir.Value(
                name=name,
                shape=ir.Shape(tensor.shape.numpy()),
                type=ir.TensorType(tensor.dtype),
                const_value=tensor,
            )
            value.metadata_props.update(output.metadata_props)
            output.replace_all_uses_with(value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            output.name = None
            graph.register_initializer(value)
            lifted = True
        return lifted

    # ------------------------------------------------------------------------------------------------
    # Planning

    def _foldable_op(self, node: ir.Node) -> bool:
        if node.domain not in _ONNX_DOMAINS or node.op_type in _EXCLUDED_OPS:
            return False
        if node.op_type.startswith(_EXCLUDED_PREFIXES):
            return False
        return not (_has_subgraph(node) or _has_ref_attribute(node))

    def _static_shape_value(self, node: ir.Node) -> np.ndarray | None:
        """The value of ``Shape(x)`` when ``x`` has a fully static shape."""
        if not self.fold_shapes or node.op_type != "Shape" or node.domain not in _ONNX_DOMAINS:
            return None
        x = node.inputs[0] if node.inputs else None
        if x is None or x.shape is None or not x.shape.is_static() or _has_ref_attribute(node):
            return None
        dims = list(x.shape.numpy())
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        return np.array(dims[start:end], dtype=np.int64)

    def _plan(
        self, graph: ir.Graph, excluded: set[ir.Node], shapes: dict[ir.Value, np.ndarray]
    ) -> list[ir.Node]:
        """Foldable nodes of ``graph`` in graph order; ``shapes`` receives statically known Shapes."""
        plan: list[ir.Node] = []
        produced: set[ir.Value] = set()
        for node in graph:
            if node in excluded or not _is_live(node):
                continue
            shape_value = self._static_shape_value(node)
            if shape_value is not None:
                shapes[node.outputs[0]] = shape_value
                plan.append(node)
                produced.update(node.outputs)
                continue
            if not self._foldable_op(node):
                continue
            inputs = _value_inputs(node)
            if not inputs or not all(v in produced or _is_constant(v) for v in inputs):
                continue
            unfeedable = [
                v
                for v in inputs
                if v not in produced and v.const_value is not None and v.const_value.dtype not in _FEEDABLE
            ]
            if unfeedable:
                value = unfeedable[0]
                assert value.const_value is not None
                self._decline(
                    node, "type", f"input {value.name} has data type {value.const_value.dtype.name}"
                )
                excluded.add(node)
                continue
            too_big = [out.name for out in node.outputs if (_static_size(out) or 0) > self.size_limit]
            if too_big:
                self._decline(node, "size", f"output {too_big[0]} has more than {self.size_limit} elements")
                excluded.add(node)
                continue
            plan.append(node)
            produced.update(node.outputs)
        return plan

    # ------------------------------------------------------------------------------------------------
    # Folding one graph

    def _fold_graph(self, graph: ir.Graph, default_opset: int) -> bool:
        opset = graph.opset_imports.get("", default_opset)
        excluded: set[ir.Node] = set()
        shapes: dict[ir.Value, np.ndarray] = {}
        plan = self._plan(graph, excluded, shapes)
        if not plan:
            return False
        values = dict(shapes)
        # One session for the whole plan. When ORT names a node it cannot build or run, exclude that
        # node (its consumers follow, as their inputs are no longer constant) and try again; after a
        # few rounds, or for an error that names no node, fall back to one session per node.
        for _ in range(_MAX_BATCH_RETRIES):
            try:
                values.update(self._evaluate(plan, values, opset))
                break
            except _EvaluationError as e:
                if e.node is None:
                    logger.debug("Batched constant evaluation failed (%s); evaluating node by node", e)
                    values.update(self._evaluate_each(plan, values, opset, excluded))
                    break
                self._decline(e.node, "evaluation", f"ONNX Runtime could not evaluate it: {e}")
                excluded.add(e.node)
                plan = self._plan(graph, excluded, shapes)
        else:
            values.update(self._evaluate_each(plan, values, opset, excluded))

        # Results decide the rest: drop nodes with missing, non-numeric or oversized results, and
        # re-plan (each plan is a subset of the evaluated one, so no second evaluation is needed).
        plan = self._plan(graph, excluded, {})
        while True:
            newly_excluded = False
            for node in plan:
                reason = self._result_problem(node, values)
                if reason is not None:
                    self._decline(node, "result", reason)
                    excluded.add(node)
                    newly_excluded = True
            if not newly_excluded:
                break
            plan = self._plan(graph, excluded, {})
        if not plan:
            return False
        self._apply(graph, plan, values)
        return True

    def _result_problem(self, node: ir.Node, values: dict[ir.Value, np.ndarray]) -> str | None:
        for out in node.outputs:
            if not out.name or not (out.uses() or out.is_graph_output()):
                continue
            array = values.get(out)
            if array is None:
                return "ONNX Runtime could not evaluate it"
            if not isinstance(array, np.ndarray) or array.dtype.kind in "OUSV":
                return f"output {out.name} is not a numeric tensor"
            if array.size > self.size_limit:
                return f"output {out.name} has {array.size} elements, more than {self.size_limit}"
        return None

    def _apply(self, graph: ir.Graph, plan: list[ir.Node], values: dict[ir.Value, np.ndarray]) -> None:
        in_plan = set(plan)
        replacements: list[ir.Value] = []
        for node in plan:
            for out in node.outputs:
                if not out.name:
                    continue
                outside = out.is_graph_output() or any(use.node not in in_plan for use in out.uses())
                if not outside:
                    continue
                name = out.name
                new = _to_initializer(name, values[out], like=out)
                out.replace_all_uses_with(new, replace_graph_outputs=True)
                out.name = None
                replacements.append(new)
        used_inputs = {v for node in plan for v in node.inputs if v is not None and v.producer() is None}
        graph.remove(plan, safe=True)
        for new in replacements:
            graph.register_initializer(new)
        for value in used_inputs:
            _drop_unused_initializer(value)
        self.folded_nodes += len(plan)
        logger.debug("Folded %d nodes into %d initializers", len(plan), len(replacements))

    def _decline(self, node: ir.Node, code: str, reason: str) -> None:
        if node in self._declined_nodes:
            return
        self._declined_nodes.add(node)
        decline = Decline("fold", code, reason, node_label(node))
        self.declined.append(decline)
        logger.debug("%s", decline)

    # ------------------------------------------------------------------------------------------------
    # Evaluation in ONNX Runtime

    def _evaluate(
        self, nodes: Sequence[ir.Node], known: dict[ir.Value, np.ndarray], opset: int
    ) -> dict[ir.Value, np.ndarray]:
        """Run ``nodes`` (topologically ordered) in one session; return their live outputs."""
        to_run = [node for node in nodes if not all(out in known for out in node.outputs)]
        if not to_run:
            return {}
        value_map: dict[ir.Value, ir.Value] = {}
        feeds: dict[str, np.ndarray] = {}
        graph_inputs: list[ir.Value] = []
        eval_nodes: list[ir.Node] = []
        wanted: list[tuple[ir.Value, ir.Value]] = []

        def feed(value: ir.Value) -> ir.Value:
            if value in value_map:
                return value_map[value]
            if value in known:
                array = known[value]
            elif value.const_value is not None:
                array = value.const_value.numpy()
            else:
                raise _EvaluationError(f"input {value.name} has no value")
            name = f"input_{len(graph_inputs)}"
            dtype = ir.DataType.from_numpy(array.dtype)
            new = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape))
            graph_inputs.append(new)
            feeds[name] = array
            value_map[value] = new
            return new

        for index, node in enumerate(to_run):
            op_type = node.op_type
            attributes = list(node.attributes.values())
            target = _castlike_target(node)
            if target is not None:
                # CastLike(x, like) == Cast(x, to=dtype(like)); ``like`` need not be constant.
                op_type = "Cast"
                attributes = [*attributes, ir.AttrInt64("to", int(target))]
                inputs: list[ir.Value | None] = [feed(v) for v in _value_inputs(node)]
            else:
                inputs = [None if value is None else feed(value) for value in node.inputs]
            outputs = [
                ir.Value(name=f"fold{index}_out{i}" if out.name else "") for i, out in enumerate(node.outputs)
            ]
            eval_nodes.append(
                ir.Node(
                    "",
                    op_type,
                    inputs,
                    attributes=attributes,
                    outputs=outputs,
                    version=node.version,
                    name=f"fold{index}",
                )
            )
            for out, new in zip(node.outputs, outputs, strict=True):
                value_map[out] = new
                if out.name and (out.uses() or out.is_graph_output()):
                    wanted.append((out, new))
        if not wanted:
            return {}
        model = ir.Model(
            ir.Graph(
                graph_inputs,
                [new for _, new in wanted],
                nodes=eval_nodes,
                opset_imports={"": opset},
                name="fold_constants",
            ),
            ir_version=_EVAL_IR_VERSION,
        )
        try:
            results = self._run(model, feeds, [new.name or "" for _, new in wanted])
        except _EvaluationError as e:
            match = _NODE_NAME.search(str(e))
            if match is not None and int(match.group(1)) < len(to_run):
                e.node = to_run[int(match.group(1))]
                label = e.node.name or e.node.outputs[0].name or e.node.op_type
                e.args = (str(e).replace(match.group(0), label),)
            raise
        return {out: result for (out, _), result in zip(wanted, results, strict=True)}

    def _evaluate_each(
        self,
        nodes: Sequence[ir.Node],
        known: dict[ir.Value, np.ndarray],
        opset: int,
        excluded: set[ir.Node],
    ) -> dict[ir.Value, np.ndarray]:
        """Fallback: evaluate nodes one at a time, excluding those ORT cannot evaluate."""
        values = dict(known)
        for node in nodes:
            if all(out in values for out in node.outputs):
                continue
            if any(v not in values and v.const_value is None for v in _value_inputs(node)):
                continue  # an input's producer failed; re-planning drops this node
            try:
                values.update(self._evaluate([node], values, opset))
            except _EvaluationError as e:
                self._decline(node, "evaluation", f"ONNX Runtime could not evaluate it: {e}")
                excluded.add(node)
        return values

    def _run(self, model: ir.Model, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        try:
            self.sessions += 1
            session = make_session(ir.to_proto(model).SerializeToString(), opt_level="disable")
            return run(session, feeds, outputs)
        except SessionError as e:
            raise _EvaluationError(e.reason) from e
