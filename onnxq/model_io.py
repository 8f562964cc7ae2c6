"""Loading and saving ONNX models.

Models come in as a path, an ``onnx.ModelProto`` or an onnx-ir model and always continue as an onnx-ir
model that the caller owns (inputs are never mutated). External data stays lazy until saving.
Saving is atomic (temporary file in the target folder, then ``os.replace``) and byte-identical for
identical inputs. :func:`normalize_versions` makes the IR version and opsets ones that the installed
onnxruntime accepts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    pass

__all__ = [
    "EMITTED_OPS",
    "EXTERNAL_DATA_THRESHOLD",
    "MIN_QDQ_PER_AXIS_OPSET",
    "ModelLike",
    "check_runtime_ops",
    "check_tensor_sizes",
    "default_opset",
    "load_model",
    "model_size_bytes",
    "normalize_versions",
    "ort_max_versions",
    "runtime_source",
    "save_model",
    "serialize_lean",
    "serialize_model",
]

logger = logging.getLogger(__name__)

ModelLike = "str | os.PathLike[str] | onnx.ModelProto | ir.Model"

#: Above this many bytes of tensor data a saved model keeps its weights in a ``.data`` file beside it
#: (protobuf cannot hold a message over 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

#: The lowest default-domain opset at which per-axis QuantizeLinear/DequantizeLinear exist.
MIN_QDQ_PER_AXIS_OPSET = 13
#: The lowest default-domain opset that has QuantizeLinear/DequantizeLinear at all.
MIN_QDQ_OPSET = 10


def load_model(model: Any, *, what: str = "model") -> ir.Model:
    """Load ``model`` (path, ModelProto or onnx-ir Model) as an onnx-ir model the caller may mutate."""
    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, (str, os.PathLike)):
        return _load_path(Path(model), what)
    if type(model).__name__ == "ModelProto":
        try:
            converted = ir.from_proto(model)
        except Exception as exc:
            raise OnnxqError(f"cannot convert the ModelProto: {_first_line(exc)}") from exc
        check_tensor_sizes(converted, "the ModelProto")
        return converted
    raise OnnxqError(
        f"{what} must be a path, an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}"
    )


def _load_path(path: Path, what: str) -> ir.Model:
    if not path.exists():
        raise OnnxqError(f"{what} not found: {path}")
    if path.is_dir():
        raise OnnxqError(f"{what} is a directory, expected an .onnx file: {path}")
    if path.stat().st_size == 0:
        raise OnnxqError(f"{what} is empty: {path}")
    try:
        model = ir.load(path)
    except Exception as exc:
        raise OnnxqError(f"cannot read {path}: not a valid ONNX model ({_first_line(exc)})") from exc
    if len(model.graph) == 0 and not model.graph.outputs:
        raise OnnxqError(f"cannot read {path}: the file parses but holds no ONNX graph")
    _check_external_data(model, path)
    check_tensor_sizes(model, str(path))
    return model


#: ``TensorProto`` fields that hold values when ``raw_data`` is empty.
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _stored_values(tensor: ir.TensorProtoTensor) -> tuple[int, int]:
    """(values the proto declares by its dims, values it actually stores), in the units it stores."""
    proto = tensor.raw
    declared = tensor.size
    if proto.HasField("raw_data") or not any(len(getattr(proto, f)) for f in _TYPED_FIELDS):
        return tensor.nbytes, len(proto.raw_data)
    stored = sum(len(getattr(proto, f)) for f in _TYPED_FIELDS)
    if tensor.dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        declared *= 2
    elif tensor.dtype.bitwidth == 4:
        declared = (declared + 1) // 2
    return declared, stored


def check_tensor_sizes(model: ir.Model, label: str) -> None:
    """Refuse tensors whose data does not match their declared shape (a damaged or hostile file).

    Without this, a tensor declaring 10^12 elements over 64 bytes of data fails deep inside a pass.
    Only sizes are compared: no tensor data is read or copied.
    """
    for value, tensor in _all_tensors(model):
        if isinstance(tensor, ir.TensorProtoTensor):
            declared, stored = _stored_values(tensor)
            unit = "bytes" if tensor.raw.HasField("raw_data") or declared == tensor.nbytes else "values"
        elif isinstance(tensor, ir.ExternalTensor):
            declared, stored, unit = tensor.nbytes, tensor.length or 0, "bytes"
            if tensor.length is None:
                continue
        else:
            continue
        if declared != stored:
            dims = ", ".join(str(d) for d in tensor.shape)
            raise OnnxqError(
                f"{label}: tensor '{value}' declares shape [{dims}] of {tensor.dtype.name.lower()} "
                f"({declared} {unit}) but holds {stored} {unit}"
            )


def _all_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Every initializer and Constant-node tensor, with a name for messages, subgraphs included."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                yield name, value.const_value
        for node in graph:
            if node.op_type != "Constant":
                continue
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                yield (node.outputs[0].name or node.name or "Constant"), attr.as_tensor()


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse external data that points outside the model's folder or is missing.

    A model file is untrusted input: a location like ``../../etc/passwd`` must not be read.
    """
    base = path.resolve().parent
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            target = (base / tensor.location).resolve()
            if base != target and base not in target.parents:
                raise OnnxqError(
                    f"{path}: initializer '{value.name}' has external data at '{tensor.location}', "
                    "which is outside the model's folder"
                )
            if not target.is_file():
                raise OnnxqError(
                    f"{path}: initializer '{value.name}' needs external data file '{tensor.location}', "
                    "which does not exist"
                )
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
            if target.stat().st_size < end:
                raise OnnxqError(
                    f"{path}: initializer '{value.name}' needs bytes up to {end} of '{tensor.location}', "
                    f"which holds {target.stat().st_size}"
                )


@functools.lru_cache(maxsize=1)
def ort_max_versions() -> tuple[int, int]:
    """The highest (IR version, default-domain opset import) the installed onnxruntime loads at all.

    Probed once with a one-node model because the limits move with each onnxruntime release and
    onnx's defaults run ahead of them (onnx 1.23 writes IR 14 / opset 28; onnxruntime 1.31 takes 13 / 26).
    Loading the import is not enough for a node to run: which ops have kernels at that opset is the
    kernel table's question (:mod:`onnxq.runtime.kernels`).
    """
    import onnxruntime as ort

    def loads(ir_version: int, opset: int) -> bool:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
        node = ir.Node("", "Relu", [x])
        node.outputs[0].name = "y"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": opset})
        proto = ir.to_proto(ir.Model(graph, ir_version=ir_version))
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:
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


#: IR version each default-domain opset first appeared with (onnx's release table).
_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 11}

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
    from onnxq.graph import node_label
    from onnxq.runtime.kernels import kernel_table

    table = kernel_table()
    local = {(f.domain, f.name) for f in model.functions.values()}
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if (node.domain, node.op_type) in local or table.knows(node.domain, node.op_type):
                continue
            domain = node.domain or "ai.onnx"
            raise OnnxqError(
                f"{label}: node {node_label(node)} uses {node.op_type} of domain '{domain}', which "
                f"onnxruntime {table.version} cannot run (training and custom ops are not supported)"
            )


def normalize_versions(model: ir.Model) -> list[str]:
    """Make the model's opsets and IR version ones that the installed onnxruntime runs.

    The default-domain opset becomes the highest one, at most the model's own (at least 13, where
    per-channel Q/DQ exist), at which every op of the model and every op quantization adds has a
    kernel in the installed onnxruntime; the version converter moves the model there. Models below 13
    that cannot be upgraded keep their opset (weights per tensor). Returns notes for the report.
    """
    from onnxq.runtime.kernels import kernel_table

    notes: list[str] = []
    max_ir, max_opset = ort_max_versions()
    if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
        if any(node.domain in ("", "ai.onnx") for node in model.graph.all_nodes()):
            raise OnnxqError("the model has ONNX operators but no opset import for the default domain")
        model.opset_imports[""] = MIN_QDQ_PER_AXIS_OPSET  # nothing to convert: Q/DQ may be added
        notes.append(f"default-domain opset {MIN_QDQ_PER_AXIS_OPSET} imported")
    table = kernel_table()
    opset = default_opset(model)
    model_ops = {node.op_type for node in model.graph.all_nodes() if node.domain in ("", "ai.onnx")}
    upper = min(max(opset, MIN_QDQ_PER_AXIS_OPSET), max_opset)
    target = table.highest_opset(model_ops | set(EMITTED_OPS), upper, MIN_QDQ_PER_AXIS_OPSET)
    if target is None:  # some op of the model runs at no such opset: onnxruntime will name it
        target = table.highest_opset(EMITTED_OPS, upper, MIN_QDQ_PER_AXIS_OPSET) or upper
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
    needed_ir = _IR_FOR_OPSET.get(opset, 10 if opset > 24 else 7)
    ir_version = min(max(model.ir_version, needed_ir), max_ir)
    if ir_version != model.ir_version:
        notes.append(f"IR version {model.ir_version} set to {ir_version}")
        model.ir_version = ir_version
    return notes


def _convert_opset(model: ir.Model, target: int) -> None:
    import onnx.version_converter

    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        raise OnnxqError(
            f"cannot convert the model from opset {default_opset(model)} to {target}: "
            f"{_converter_reason(exc)}"
        ) from exc
    new = ir.from_proto(converted)
    model.graph = new.graph  # opset imports live on the graph
    model.functions.clear()
    model.functions.update(new.functions)


#: Tensor types numpy cannot hold natively; they stay inside the protobuf.
_NON_NUMPY_DTYPES = frozenset(
    {
        ir.DataType.STRING,
        ir.DataType.BFLOAT16,
        ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E4M3FNUZ,
        ir.DataType.FLOAT8E5M2,
        ir.DataType.FLOAT8E5M2FNUZ,
        ir.DataType.INT4,
        ir.DataType.UINT4,
    }
)


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    imports = model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))


def model_size_bytes(model: ir.Model) -> int:
    """Bytes of tensor data the model holds (initializers, including subgraphs)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def serialize_model(model: ir.Model) -> bytes:
    """The model as protobuf bytes (for ONNX Runtime sessions); deterministic for identical models.

    External data is embedded: ONNX Runtime resolves the relative locations of a model given as bytes
    against the working directory (and refuses them), and a file written from these bytes lives in
    another folder than the data. ``model`` itself is left unchanged (its tensors stay lazy).
    """
    swapped: list[tuple[ir.Value, ir.ExternalTensor]] = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                swapped.append((value, tensor))
                value.const_value = ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name)
    try:
        return ir.to_proto(model).SerializeToString(deterministic=True)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def serialize_lean(model: ir.Model, *, min_bytes: int = 1024) -> tuple[bytes, dict[str, np.ndarray]]:
    """Protobuf bytes without the large initializers' data, and those initializers as arrays.

    Pass both to :func:`onnxq.validate.runtime.make_session` (``initializers=``): ONNX Runtime then
    uses the arrays' memory directly instead of parsing a serialized copy and copying it again, so a
    session on a 90 MB model costs about its weights once, not three times; and models over protobuf's
    2 GiB limit need no temporary file. The arrays are views of the model's own tensors where possible.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    arrays: dict[str, np.ndarray] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                continue
            external = isinstance(tensor, ir.ExternalTensor)
            if tensor.dtype in _NON_NUMPY_DTYPES:
                if external:  # ONNX Runtime would resolve a bytes model's data paths against the cwd
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=name)
                continue
            if tensor.nbytes < min_bytes and not external:
                continue
            array = tensor.numpy()
            arrays[name] = array
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                "onnxq-in-memory", 0, tensor.nbytes, tensor.dtype, shape=ir.Shape(array.shape), name=name
            )
    try:
        return ir.to_proto(model).SerializeToString(deterministic=True), arrays
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


@contextlib.contextmanager
def runtime_source(model: ir.Model) -> Iterator[bytes | Path]:
    """What an ONNX Runtime session should load for ``model``: its bytes, or for models too large for
    one protobuf message, a temporary file with external data (removed afterwards)."""
    if model_size_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        yield serialize_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield path


def save_model(model: ir.Model, path: str | os.PathLike[str], *, input_path: Path | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; refuses to overwrite the input model.

    Large models (tensor data over :data:`EXTERNAL_DATA_THRESHOLD`) keep weights in ``<name>.data``.
    """
    out = Path(path)
    if input_path is not None and _same_file(out, input_path):
        raise OnnxqError(f"output path is the input model: {out} (choose another -o)")
    folder = out.resolve().parent
    if not folder.is_dir():
        raise OnnxqError(f"cannot write {out}: folder {folder} does not exist")
    if out.is_dir():
        raise OnnxqError(f"cannot write {out}: it is a directory")
    external = model_size_bytes(model) > EXTERNAL_DATA_THRESHOLD
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".{out.name}.") as tmp:
            tmp_model = Path(tmp) / out.name
            if external:
                data_name = out.name + ".data"
                ir.save(model, tmp_model, external_data=data_name)
                os.replace(Path(tmp) / data_name, folder / data_name)
            else:
                tmp_model.write_bytes(serialize_model(model))
            os.replace(tmp_model, out)
    except OSError as exc:
        raise OnnxqError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


#: "/project/onnx/version_converter/adapters/x.h:48: fn: Assertion `...` failed: " before the reason.
_CONVERTER_ASSERTION = re.compile(r"^.*?\.h:\d+: [^:]*: Assertion `.*?` failed: ", re.DOTALL)


def _converter_reason(exc: BaseException) -> str:
    """The version converter's message without its C++ location and assertion text."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return _CONVERTER_ASSERTION.sub("", text)[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
