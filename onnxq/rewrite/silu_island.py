"""SiLU between quantized layers as one float ``com.microsoft.QuickGelu`` island instead of two integer ops.

SiLU (``x · Sigmoid(x)``, YOLOv5/v8/v11's and EfficientNet's activation) reads a quantized tensor and
feeds a quantized one, so static quantization runs it as ``QLinearSigmoid`` then ``QLinearMul``: two
integer kernels, one more rounding (the sigmoid's), and neither runs on more than one thread at these
sizes. ONNX Runtime's fused float ``QuickGelu`` (``x · Sigmoid(α·x)``, here ``α = 1``) between a
DequantizeLinear and a QuantizeLinear costs less on this machine: in onnxq's int8 outputs, YOLOv8n
5.34 → 4.91 ms, ddddocr's YOLOX 13.27 → 11.93 ms, YOLO11s-seg 65.2 → 62.0 ms, EfficientNet-B0 6.59 →
5.85 ms (1 thread). Whether it does depends on the CPU and the release, so the latency guard times the
model both ways and keeps the faster (:mod:`onnxq.tuning.latency_guard`, step 5); a variant made later
(``--target``) keeps the choice (``StaticState.silu_islands``).

Matched (:func:`integer_silus`), in every graph:

- QDQ form: ``DequantizeLinear(x) → Sigmoid → QuantizeLinear → DequantizeLinear → Mul`` whose other
  input is ``DequantizeLinear`` of the same integer tensor with the same scale and zero point, the
  Mul's output read by one ``QuantizeLinear`` only;
- QOperator form: ``QLinearSigmoid(x)`` read only by a ``QLinearMul`` whose other input is ``x`` with
  the same scale and zero point.

Each becomes ``DequantizeLinear(x) → QuickGelu(α = 1) → QuantizeLinear`` with the product's output
scale and zero point: the same function with one rounding fewer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, NameScope, const_array, remove_dead, sole_reader, take_over
from onnxq.rewrite.fuse_qlinear import MS_DOMAIN

__all__ = ["IntegerSilu", "count_as_islands", "integer_silus", "planned_silus", "write_silu_islands"]


@dataclass(frozen=True)
class IntegerSilu:
    """One SiLU in integer form: what the island reads and writes, and the nodes it replaces."""

    #: The integer tensor and its scale and zero point (the island's DequantizeLinear inputs).
    x: tuple[ir.Value, ir.Value, ir.Value | None]
    #: The product's output scale and zero point (the island's QuantizeLinear parameters).
    y_params: tuple[ir.Value, ir.Value | None]
    #: The integer output that the island's QuantizeLinear produces instead.
    y: ir.Value
    #: The nodes it replaces, readers first.
    replaced: tuple[ir.Node, ...]
    #: DequantizeLinear nodes it read, removed when nothing else reads them.
    inputs: tuple[ir.Node, ...] = ()
    #: The product's QuantizeLinear attributes (``saturate``, ``output_dtype``), kept on the island's.
    q_attributes: tuple[ir.Attr, ...] = ()


def _is(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    if node is None or node.op_type != op_type:
        return False
    return node.domain in DEFAULT_DOMAINS if domain == "" else node.domain == domain


def _same(a: ir.Value | None, b: ir.Value | None) -> bool:
    """Two scale or zero-point inputs with the same constant value (or both absent)."""
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    left, right = const_array(a), const_array(b)
    return (
        left is not None and right is not None and left.dtype == right.dtype and np.array_equal(left, right)
    )


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _qdq_silu(sigmoid: ir.Node) -> IntegerSilu | None:
    """The QDQ pattern around ``sigmoid`` (module docstring), or ``None``."""
    x_dq = sigmoid.inputs[0].producer() if sigmoid.inputs and sigmoid.inputs[0] is not None else None
    if not _is(x_dq, "DequantizeLinear") or x_dq is None or x_dq.inputs[0] is None:
        return None
    s_q = sole_reader(sigmoid.outputs[0])
    s_dq = sole_reader(s_q.outputs[0]) if _is(s_q, "QuantizeLinear") and s_q is not None else None
    mul = sole_reader(s_dq.outputs[0]) if _is(s_dq, "DequantizeLinear") and s_dq is not None else None
    if mul is None or not _is(mul, "Mul") or len(mul.inputs) != 2 or s_dq is None or s_q is None:
        return None
    other = mul.inputs[1] if mul.inputs[0] is s_dq.outputs[0] else mul.inputs[0]
    other_dq = other.producer() if other is not None else None
    if other_dq is None or not _is(other_dq, "DequantizeLinear") or other_dq.inputs[0] is not x_dq.inputs[0]:
        return None
    if any(not _same(_input(other_dq, i), _input(x_dq, i)) for i in (1, 2)) or "axis" in x_dq.attributes:
        return None
    y_q = sole_reader(mul.outputs[0])
    if y_q is None or not _is(y_q, "QuantizeLinear") or y_q.inputs[1] is None or "axis" in y_q.attributes:
        return None
    x_scale = x_dq.inputs[1]
    assert x_scale is not None
    return IntegerSilu(
        (x_dq.inputs[0], x_scale, _input(x_dq, 2)),
        (y_q.inputs[1], _input(y_q, 2)),
        y_q.outputs[0],
        (y_q, mul, s_dq, s_q, sigmoid),
        (x_dq, other_dq),
        tuple(y_q.attributes.values()),
    )


def _qoperator_silu(sigmoid: ir.Node) -> IntegerSilu | None:
    """``QLinearSigmoid`` read only by a ``QLinearMul`` of the same input (module docstring), or ``None``."""
    if len(sigmoid.inputs) < 4 or sigmoid.inputs[0] is None or sigmoid.inputs[1] is None:
        return None
    mul = sole_reader(sigmoid.outputs[0])
    if mul is None or not _is(mul, "QLinearMul", MS_DOMAIN) or len(mul.inputs) < 7 or mul.inputs[6] is None:
        return None
    gate_first = mul.inputs[0] is sigmoid.outputs[0]
    x_at = 3 if gate_first else 0
    if mul.inputs[x_at] is not sigmoid.inputs[0]:
        return None
    if not (
        _same(mul.inputs[x_at + 1], sigmoid.inputs[1]) and _same(_input(mul, x_at + 2), _input(sigmoid, 2))
    ):
        return None
    return IntegerSilu(
        (sigmoid.inputs[0], sigmoid.inputs[1], _input(sigmoid, 2)),
        (mul.inputs[6], _input(mul, 7)),
        mul.outputs[0],
        (mul, sigmoid),
    )


def integer_silus(model: ir.Model) -> list[IntegerSilu]:
    """Every SiLU that runs on integers in ``model`` (QDQ or QOperator form), in graph order."""
    found = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if _is(node, "Sigmoid"):
                match = _qdq_silu(node)
            elif _is(node, "QLinearSigmoid", MS_DOMAIN):
                match = _qoperator_silu(node)
            else:
                continue
            if match is not None:
                found.append(match)
    return found


def write_silu_islands(model: ir.Model) -> int:
    """Rewrite every :func:`integer_silus` match as a QuickGelu float island; return how many."""
    matches = integer_silus(model)
    names = NameScope(model.graph)
    for match in matches:
        first = match.replaced[-1]
        graph = first.graph
        assert graph is not None
        base = first.name or "silu"
        dq = ir.node("DequantizeLinear", list(match.x), name=names.fresh(f"{base}_island_dequantize"))
        dq.outputs[0].name = names.fresh(f"{base}_island_input")
        silu = ir.node(
            "QuickGelu", [dq.outputs[0]], {"alpha": 1.0}, domain=MS_DOMAIN, name=names.fresh(f"{base}_silu")
        )
        silu.outputs[0].name = names.fresh(f"{base}_silu_output")
        q = ir.node("QuantizeLinear", [silu.outputs[0], *match.y_params], name=names.fresh(f"{base}_island"))
        for attribute in match.q_attributes:
            q.attributes[attribute.name] = ir.Attr(attribute.name, attribute.type, attribute.value)
        for node in (dq, silu, q):
            graph.insert_before(first, node)
        q.outputs[0].type = match.y.type
        take_over(match.y, q.outputs[0])
        remove_dead([*match.replaced, *match.inputs])
    if matches and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    return len(matches)


def planned_silus(quantized_nodes: Collection[ir.Node]) -> int:
    """How many SiLUs a plan quantizes (its Sigmoid and its Mul both among ``quantized_nodes``).

    What :func:`write_silu_islands` finds in the written model, counted before writing it: a Sigmoid
    read only by a quantized Mul whose other operand is the Sigmoid's own input.
    """
    chosen = set(map(id, quantized_nodes))
    found = 0
    for node in quantized_nodes:
        if not _is(node, "Sigmoid") or not node.inputs or node.inputs[0] is None:
            continue
        mul = sole_reader(node.outputs[0])
        if mul is None or id(mul) not in chosen or not _is(mul, "Mul") or len(mul.inputs) != 2:
            continue
        if node.inputs[0] in (mul.inputs[0], mul.inputs[1]):
            found += 1
    return found


def count_as_islands(quantized: dict[str, int], floating: dict[str, int], islands: int) -> None:
    """Move ``islands`` SiLUs' Sigmoid and Mul from the quantized op counts to float QuickGelu (in place)."""
    if not islands:
        return
    for op in ("Sigmoid", "Mul"):
        left = quantized.get(op, 0) - islands
        if left > 0:
            quantized[op] = left
        else:
            quantized.pop(op, None)
    floating["QuickGelu"] = floating.get("QuickGelu", 0) + islands
