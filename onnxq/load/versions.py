"""Versions: the opset and IR version a model must have for the installed ONNX Runtime to run it.

onnx's defaults run ahead of onnxruntime, and not evenly per op: the output opset must be one at which
every op of the model *and every op quantization adds* has a kernel (:mod:`onnxq.runtime.kernels`).
Models below opset 13 are upgraded (per-channel Q/DQ need 13); models above what onnxruntime runs are
converted down with onnx's version converter.
"""

from __future__ import annotations

import logging
import re

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph import DEFAULT_DOMAINS, default_opset, node_label
from onnxq.runtime.kernels import kernel_table, ort_max_versions

__all__ = [
    "EMITTED_OPS",
    "MIN_QDQ_OPSET",
    "MIN_QDQ_PER_AXIS_OPSET",
    "PREFERRED_OPSET",
    "check_runtime_ops",
    "normalize_versions",
]

logger = logging.getLogger(__name__)

#: The lowest default-domain opset at which per-axis QuantizeLinear/DequantizeLinear exist.
MIN_QDQ_PER_AXIS_OPSET = 13
#: The lowest default-domain opset that has QuantizeLinear/DequantizeLinear at all.
MIN_QDQ_OPSET = 10
#: Older models are upgraded to this opset when the converter and onnxruntime allow: it has the single
#: ops canonicalization writes (HardSwish since 14, LayerNormalization since 17).
PREFERRED_OPSET = 17


def _ir_for_opset(opset: int) -> int:
    """The IR version onnx released the default-domain ``opset`` with (its own release table)."""
    import onnx.helper

    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return int(ir_version)
    return int(onnx.helper.VERSION_TABLE[-1][1])


#: Default-domain ops that quantization adds to a model (Q/DQ form, QOperator form, dynamic form): the
#: output opset must be one at which the installed onnxruntime has kernels for all of them.
EMITTED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "Cast",
    "Mul",
    "Add",
)


def check_runtime_ops(model: ir.Model, label: str) -> None:
    """Refuse a model with ops onnxruntime does not know at all (training ops, unregistered custom ops).

    Such a model cannot be calibrated or validated; one line names the first op, its domain and node.
    Calls of the model's own functions are fine (onnxruntime inlines them).
    """
    table = kernel_table()
    local = {(f.domain, f.name) for f in model.functions.values()}
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if (node.domain, node.op_type) in local or table.knows(node.domain, node.op_type):
                continue
            domain = node.domain or "ai.onnx"
            if domain == "ai.onnx" and not onnx.defs.has(node.op_type):
                raise OnnxqError(
                    f"{label}: node {node_label(node)} uses {node.op_type}, which is not an ONNX operator "
                    "(an op the exporter could not convert and left in, as tf2onnx does with TensorFlow's "
                    "PartitionedCall or Erfc); onnxruntime cannot run the model either"
                )
            raise OnnxqError(
                f"{label}: node {node_label(node)} uses {node.op_type} of domain '{domain}', which "
                f"onnxruntime {table.version} cannot run (training and custom ops are not supported)"
            )


def normalize_versions(model: ir.Model) -> list[str]:
    """Make the model's opsets and IR version ones that the installed onnxruntime runs.

    The default-domain opset becomes the highest one, at most the model's own or
    :data:`PREFERRED_OPSET` (whichever is higher), at which every op of the model and every op
    quantization adds has a kernel in the installed onnxruntime; the version converter moves the model
    there. Older models are upgraded because per-channel Q/DQ need 13 and the single ops that
    canonicalization writes need up to 17 (HardSwish 14, LayerNormalization 17); when that conversion
    fails, opset 13 is tried, and a model that cannot reach 13 keeps its opset (weights per tensor).
    Returns notes for the report.
    """
    notes: list[str] = []
    max_ir, max_opset = ort_max_versions()
    original_ir = model.ir_version
    if original_ir < 4:
        # IR < 4 lists every initializer as a graph input too, and means constants; from IR 4 on,
        # such an input is an overridable default that ONNX Runtime neither folds nor prepacks
        # (ShuffleNet ran 1.7x slower), so the raised model keeps them constants. Raised before the
        # opset conversion: the converter reads an IR 3 initializer missing from the inputs (which
        # ONNX Runtime accepts: its datasets/mul_1.onnx) as an undefined input.
        _initializers_out_of_inputs(model)
        model.ir_version = 4
    if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
        if any(node.domain in DEFAULT_DOMAINS for node in model.graph.all_nodes()):
            raise OnnxqError("the model has ONNX operators but no opset import for the default domain")
        imported = min(PREFERRED_OPSET, max_opset)  # nothing to convert: Q/DQ may be added
        model.opset_imports[""] = imported
        notes.append(f"default-domain opset {imported} imported")
    table = kernel_table()
    opset = default_opset(model)
    model_ops = {node.op_type for node in model.graph.all_nodes() if node.domain in DEFAULT_DOMAINS}
    upper = min(max(opset, PREFERRED_OPSET), max_opset)
    target = table.highest_opset(model_ops | set(EMITTED_OPS), upper, MIN_QDQ_PER_AXIS_OPSET)
    if target is None:  # some op of the model runs at no such opset: onnxruntime will name it
        target = table.highest_opset(EMITTED_OPS, upper, MIN_QDQ_PER_AXIS_OPSET) or upper
    if target > opset and target > MIN_QDQ_PER_AXIS_OPSET:
        # An upgrade for canonical ops is a bonus: when the converter cannot do it, the least upgrade
        # that still allows per-channel Q/DQ (or none) will do.
        try:
            _convert_opset(model, target)
        except OnnxqError as exc:
            logger.info("%s; trying a smaller upgrade", exc)
            target = max(opset, MIN_QDQ_PER_AXIS_OPSET)
        else:
            notes.append(f"opset {opset} converted to {target}")
            opset = target
    if target != opset:
        try:
            _convert_opset(model, target)
        except OnnxqError as exc:
            if opset < MIN_QDQ_OPSET:
                raise
            # Keep the model as it is. Below 13, Q/DQ still exist (weights per tensor); above, a model
            # that gets Q/DQ fails the final check in onnxruntime with this note beside it, and one
            # that gets none (nothing to quantize) never needed the conversion.
            consequence = "weights per-tensor" if opset < MIN_QDQ_PER_AXIS_OPSET else "not converted"
            notes.append(f"{exc}; kept opset {opset} ({consequence})")
            target = opset
        else:
            notes.append(f"opset {opset} converted to {target}")
    opset = target
    needed_ir = _ir_for_opset(opset)
    model.ir_version = min(max(model.ir_version, needed_ir), max_ir)
    if model.ir_version != original_ir:
        notes.append(f"IR version {original_ir} set to {model.ir_version}")
    return notes


def _initializers_out_of_inputs(model: ir.Model) -> None:
    """Drop the main graph's inputs that are initializers (what IR < 4 requires, IR >= 4 reads otherwise)."""
    graph = model.graph
    kept = [value for value in graph.inputs if value.name not in graph.initializers]
    if len(kept) != len(graph.inputs):
        graph.inputs.clear()
        graph.inputs.extend(kept)


#: Main-graph initializers from this size on stay out of the version converter (see :func:`_convert_opset`).
_CONVERTER_HOLDS_BACK = 1024


def _convert_opset(model: ir.Model, target: int) -> None:
    """Convert ``model``'s default-domain opset to ``target`` with onnx's version converter, in place.

    The converter works on protobuf copies of the whole model (VGG-19's 548 MB of weights peaked at
    4.2 GB), yet no adapter reads a large weight: the large initializers go in as placeholders that
    point to no data and come back by name afterwards. Should an adapter need one after all, the
    conversion is redone with the data in.
    """
    import onnx.version_converter

    held = {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None and value.const_value.nbytes >= _CONVERTER_HOLDS_BACK
    }
    try:
        for name, tensor in held.items():
            model.graph.initializers[name].const_value = ir.ExternalTensor(
                "onnxq-held-back",
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape(tensor.shape.numpy()),
                name=name,
            )
        proto = ir.to_proto(model)
    finally:
        for name, tensor in held.items():
            model.graph.initializers[name].const_value = tensor
    try:
        try:
            converted = onnx.version_converter.convert_version(proto, target)
        except Exception:
            if not held:
                raise
            held = {}
            converted = onnx.version_converter.convert_version(ir.to_proto(model), target)
    except Exception as exc:
        raise OnnxqError(
            f"cannot convert the model from opset {default_opset(model)} to {target}: "
            f"{_converter_reason(exc)}"
        ) from exc
    new = ir.from_proto(converted)
    for name, tensor in held.items():
        value = new.graph.initializers.get(name)
        if value is None:
            raise OnnxqError(f"opset conversion to {target} lost initializer {name!r}")
        value.const_value = tensor
    model.graph = new.graph  # opset imports live on the graph
    model.functions.clear()
    model.functions.update(new.functions)


#: "/project/onnx/version_converter/adapters/x.h:48: fn: Assertion `...` failed: " before the reason.
_CONVERTER_ASSERTION = re.compile(r"^.*?\.h:\d+: [^:]*: Assertion `.*?` failed: ", re.DOTALL)


def _converter_reason(exc: BaseException) -> str:
    """The version converter's message without its C++ location and assertion text."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return _CONVERTER_ASSERTION.sub("", text)[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
