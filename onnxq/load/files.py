"""Loading and saving ONNX model files.

Models come in as a path, an ``onnx.ModelProto`` or an onnx-ir model and always continue as an onnx-ir
model that the caller owns (inputs are never mutated). External data stays lazy until saving. A file is
untrusted input: external data must stay inside the model's folder, and every tensor must hold as much
data as its shape declares. Saving is atomic (temporary file in the target folder, then
``os.replace``) and byte-identical for identical inputs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "ModelLike",
    "check_tensor_sizes",
    "file_size",
    "load_model",
    "model_size_bytes",
    "save_model",
    "serialize_model",
    "serialized_size",
    "strip_unrepresented_types",
]

logger = logging.getLogger(__name__)

ModelLike = "str | os.PathLike[str] | onnx.ModelProto | ir.Model"

#: Metadata key under which the value types onnx-ir cannot represent travel through the pipeline (a map,
#: or a sequence of maps: scikit-learn's ZipMap output), restored when the model is serialized.
UNREPRESENTED_TYPES_KEY = "onnxq.unrepresented_types"

#: Above this many bytes of tensor data a saved model keeps its weights in a ``.data`` file beside it
#: (protobuf cannot hold a message over 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(model: Any, *, what: str = "model") -> ir.Model:
    """Load ``model`` (path, ModelProto or onnx-ir Model) as an onnx-ir model the caller may mutate."""
    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, (str, os.PathLike)):
        return _load_path(Path(model), what)
    if type(model).__name__ == "ModelProto":
        try:
            converted: ir.Model = _from_proto(model)
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
        fallback = _load_with_unrepresented_types(path)
        if fallback is None:
            raise OnnxqError(f"cannot read {path}: not a valid ONNX model ({_first_line(exc)})") from exc
        model = fallback
    if len(model.graph) == 0 and not model.graph.outputs:
        raise OnnxqError(f"cannot read {path}: the file parses but holds no ONNX graph")
    _check_external_data(model, path)
    check_tensor_sizes(model, str(path))
    return model


def _from_proto(proto: Any) -> ir.Model:
    """``proto`` as an onnx-ir model, the types onnx-ir cannot represent set aside (see below)."""
    try:
        converted: ir.Model = ir.from_proto(proto)
        return converted
    except Exception:
        copy = type(proto)()
        copy.CopyFrom(proto)
        model = _set_aside_and_convert(copy)
        if model is None:
            raise
        return model


def _load_with_unrepresented_types(path: Path) -> ir.Model | None:
    """The model at ``path`` with the value types onnx-ir cannot represent set aside; ``None`` if it has none.

    scikit-learn models converted by skl2onnx end in a ZipMap whose output is a sequence of maps
    (label -> probability); ONNX Runtime runs them, onnx-ir has no map type. Such values lose their type
    while onnxq works (ONNX Runtime infers it again), and get it back in the saved model.
    """
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return None
    model = _set_aside_and_convert(proto)
    if model is not None:
        ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def _set_aside_and_convert(proto: Any) -> ir.Model | None:
    """``proto`` (modified) as an onnx-ir model, its unrepresentable types kept in the metadata.

    ``None`` when it has none: then the reason onnx-ir failed lies elsewhere.
    """
    set_aside = strip_unrepresented_types(proto)
    if not set_aside:
        return None
    model: ir.Model = ir.from_proto(proto)
    model.metadata_props[UNREPRESENTED_TYPES_KEY] = json.dumps(set_aside, sort_keys=True)
    return model


def _unrepresented(type_proto: Any) -> bool:
    """Whether onnx-ir cannot represent the type (a map or an opaque type, at any depth)."""
    kind = type_proto.WhichOneof("value")
    if kind in ("map_type", "opaque_type"):
        return True
    if kind in ("sequence_type", "optional_type"):
        return _unrepresented(getattr(type_proto, kind).elem_type)
    return False


def _value_infos(graph: Any) -> Iterator[Any]:
    """Every ValueInfoProto of ``graph`` and of its subgraphs."""
    yield from (*graph.input, *graph.output, *graph.value_info)
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _value_infos(subgraph)


def strip_unrepresented_types(proto: Any) -> dict[str, str]:
    """Clear the types onnx-ir cannot represent in ``proto``; returns them (base64 TypeProto) by value."""
    set_aside: dict[str, str] = {}
    for info in _value_infos(proto.graph):
        if info.HasField("type") and _unrepresented(info.type):
            set_aside[info.name] = base64.b64encode(info.type.SerializeToString()).decode()
            info.ClearField("type")
    return set_aside


def _restore_unrepresented_types(proto: Any) -> None:
    """Give the values :func:`strip_unrepresented_types` set aside their types back (in place)."""
    entries = [p for p in proto.metadata_props if p.key == UNREPRESENTED_TYPES_KEY]
    if not entries:
        return
    set_aside = json.loads(entries[0].value)
    for info in _value_infos(proto.graph):
        if info.name in set_aside and not info.HasField("type"):
            info.type.ParseFromString(base64.b64decode(set_aside[info.name]))
    for entry in entries:
        proto.metadata_props.remove(entry)


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


def model_size_bytes(model: ir.Model) -> int:
    """Bytes of tensor data the model holds (initializers, including subgraphs)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def file_size(path: Path) -> int:
    """Bytes on disk of a model file plus the external data file beside it that it references."""
    return path.stat().st_size + sum(
        p.stat().st_size for p in path.parent.glob(path.name + ".data") if p.is_file()
    )


def serialized_size(model: ir.Model) -> int:
    """Bytes the model takes serialized (the tensor data alone for models over protobuf's 2 GiB)."""
    try:
        return len(serialize_model(model))
    except ValueError:
        return model_size_bytes(model)


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
        proto = ir.to_proto(model)
        _restore_unrepresented_types(proto)
        data: bytes = proto.SerializeToString(deterministic=True)
        return data
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


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
                if UNREPRESENTED_TYPES_KEY in model.metadata_props:  # the map types go back in too
                    proto = onnx.load(str(tmp_model), load_external_data=False)
                    _restore_unrepresented_types(proto)
                    tmp_model.write_bytes(proto.SerializeToString(deterministic=True))
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
