"""ONNX Runtime sessions and runs: the one module that creates sessions, for every stage of onnxq.

Calibration, validation, tuning and constant folding all open their sessions here (:func:`open_model`
for a model they hold, :func:`make_session` for a file or bytes), so every session is made the same
way (numbers taken by different parts of onnxq are comparable) and every ONNX Runtime error reaches
the user as one line: sequential execution, one inter-op thread, a chosen number of intra-op threads,
and ONNX Runtime's own logging silenced (``log_severity_level=4``, fatal only): a model that fails at run
time must reach the user as onnxq's one line naming the node, not as ONNX Runtime's colored log
followed by that line.

The optimisation level is an explicit argument because it changes the numbers, not just the speed:
from ``"extended"`` on, ONNX Runtime fuses QuantizeLinear/DequantizeLinear pairs into QLinear kernels
and rewrites int4 weight-only MatMuls into ``MatMulNBits`` with a lower accuracy level. Check graph
semantics at ``"disable"``; measure deployed accuracy and latency at ``"all"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxq.errors import OnnxqError
from onnxq.load import files

__all__ = [
    "ModelSource",
    "OptLevel",
    "SessionError",
    "describe_failure",
    "make_session",
    "open_model",
    "resolve_providers",
    "run",
    "runtime_source",
    "serialize_lean",
]

logger = logging.getLogger(__name__)

OptLevel = Literal["disable", "basic", "extended", "all"]

_OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# ONNX Runtime raises its own exception classes (InvalidGraph, Fail, InvalidArgument, ...), which
# derive from Exception only; its Python layer adds ValueError/RuntimeError for some checks.
_ORT_ERRORS: tuple[type[BaseException], ...] = (
    *(obj for obj in vars(_ort_state).values() if isinstance(obj, type) and issubclass(obj, Exception)),
    ValueError,
    RuntimeError,
)

_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
#: "Non-zero status code returned while running Conv node. Name:'conv1' Status Message: ..."
_NODE_FAILURE = re.compile(
    r"Non-zero status code returned while running (?P<op>\S+) node\. Name:'(?P<name>[^']*)' "
    r"Status Message: (?P<message>.*)",
    re.DOTALL,
)
#: A C++ source location, and the signature after it, that ONNX Runtime puts before its message.
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|cpp|h):\d+ (?:[^()]*\([^()]*\)(?: const)? )?")
#: Session log severity: fatal only.
_SILENT = 4

ModelSource = bytes | str | os.PathLike[str]


class SessionError(OnnxqError):
    """ONNX Runtime could not load or run a model; ``reason`` is its one line without onnxq's framing."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message, without ORT's ``[ONNXRuntimeError] : n : CODE :``."""
    text = _ORT_PREFIX.sub("", str(exc))
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def describe_failure(exc: BaseException) -> str:
    """One line for an ONNX Runtime error; a node that failed at run time is named with its op type."""
    text = _ORT_PREFIX.sub("", str(exc)).strip()
    found = _NODE_FAILURE.search(text)
    if found is None:
        return _first_line(exc)
    message = found["message"].strip()
    if " was false." in message:  # "<condition> was false. <message>": the condition is noise
        message = message.rsplit(" was false.", 1)[1]
    message = _SOURCE_LOCATION.sub("", message.strip())
    message = next((line.strip() for line in message.splitlines() if line.strip()), "no message")
    return f"node '{found['name']}' ({found['op']}) failed: {message}"


def _describe(model: ModelSource) -> str:
    if isinstance(model, bytes | bytearray):
        return f"the in-memory model ({len(model)} bytes)"
    return os.fspath(model)


def resolve_providers(provider: str) -> list[str]:
    """Execution providers, in priority order, for a user-facing provider name.

    ``"cpu"`` gives ``["CPUExecutionProvider"]``; ``"cuda"`` gives CUDA with CPU as the fallback for the
    nodes CUDA does not implement, and fails when this onnxruntime build has no CUDA provider.
    """
    name = provider.strip().lower()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise OnnxqError(
                "CUDA execution provider requested but onnxruntime has only: "
                f"{', '.join(available)}; install onnxruntime-gpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise OnnxqError(f"unknown execution provider {provider!r}; expected 'cpu' or 'cuda'")


def make_session(
    model: ModelSource,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    opt_level: OptLevel = "all",
    threads: int | None = None,
    spin: bool = True,
    initializers: Mapping[str, np.ndarray] | None = None,
    prepack: bool = True,
    priority_order: bool = False,
) -> ort.InferenceSession:
    """Open an ONNX Runtime session on a serialized model or a model file.

    ``threads`` sets the intra-op thread count (``None`` keeps ONNX Runtime's default); execution is
    sequential with one inter-op thread. Pass a path rather than bytes for models with external data.
    Use ``opt_level="disable"`` to check what a graph computes and ``"all"`` for what a deployment
    computes (see the module docstring). Any failure to load raises :class:`OnnxqError`.
    """
    if opt_level not in _OPT_LEVELS:
        raise OnnxqError(
            f"unknown optimisation level {opt_level!r}; expected one of {', '.join(_OPT_LEVELS)}"
        )
    if threads is not None and threads < 1:
        raise OnnxqError(f"thread count must be at least 1, got {threads}")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise OnnxqError(
            f"execution provider {', '.join(missing)} is not available; onnxruntime has only: "
            f"{', '.join(available)}"
        )

    options = ort.SessionOptions()
    options.graph_optimization_level = _OPT_LEVELS[opt_level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = _SILENT
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:  # no repacked copy of every MatMul/Conv weight: for one-off sessions (calibration)
        options.add_session_config_entry("session.disable_prepacking", "1")
    if priority_order:
        # The default order runs the nodes ONNX Runtime's own transformations add (NCHWc reorders) late,
        # which keeps the tensors they read alive to the end of the run: with many extra outputs (a
        # calibration model) PP-OCRv4 det peaked at 1.2 GB instead of 0.4 GB.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # Initializers handed over as arrays (see onnxq.runtime.session.serialize_lean): ORT uses their memory.
    kept_alive = [
        ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in (initializers or {}).values()
    ]
    if kept_alive:
        options.add_external_initializers(list(initializers or {}), kept_alive)

    source: bytes | str
    if isinstance(model, bytes | bytearray):
        source = bytes(model)
    else:
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise OnnxqError(f"onnxruntime cannot load {source}: file does not exist")
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except _ORT_ERRORS as exc:
        reason = _first_line(exc)
        raise SessionError(f"onnxruntime cannot load {_describe(model)}: {reason}", reason) from exc

    session._onnxq_initializers = kept_alive  # must outlive the session
    used = session.get_providers()
    dropped = [p for p in providers if p not in used]
    if dropped:
        # ORT falls back to the next provider when one fails to initialise (e.g. missing CUDA libraries).
        logger.warning("onnxruntime did not use %s for %s", ", ".join(dropped), _describe(model))
    return session


def _describe_inputs(session: ort.InferenceSession) -> str:
    parts = []
    for arg in session.get_inputs():
        dims = ",".join(str(d) if d is not None else "?" for d in (arg.shape or []))
        parts.append(f"{arg.name}: {arg.type}[{dims}]")
    return "; ".join(parts)


def run(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Run a session on one feed and return its outputs (all of them, or ``output_names`` in order).

    Inputs that do not fit the model (missing or unknown names, wrong shapes or types) raise
    :class:`OnnxqError` with ONNX Runtime's first line and the inputs the model expects.
    """
    names = list(output_names) if output_names is not None else None
    try:
        outputs: list[Any] = session.run(names, dict(feed))
    except _ORT_ERRORS as exc:
        if _NODE_FAILURE.search(str(exc)):
            reason = describe_failure(exc)
            raise SessionError(f"onnxruntime: {reason}", reason) from exc
        reason = _first_line(exc)
        raise SessionError(
            f"onnxruntime rejected the input: {reason} (model inputs: {_describe_inputs(session)})", reason
        ) from exc
    return [np.asarray(out) for out in outputs]


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


def serialize_lean(model: ir.Model, *, min_bytes: int = 1024) -> tuple[bytes, dict[str, np.ndarray]]:
    """Protobuf bytes without the large initializers' data, and those initializers as arrays.

    Pass both to :func:`make_session` (``initializers=``): ONNX Runtime then
    uses the arrays' memory directly instead of parsing a serialized copy and copying it again, so a
    session on a 90 MB model costs about its weights once, not three times; and models over protobuf's
    2 GiB limit need no temporary file. The arrays are views of the model's own tensors where possible.
    Initializers of If/Loop/Scan bodies are serialized inline (ONNX Runtime resolves in-memory data
    for the main graph only).
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    arrays: dict[str, np.ndarray] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                continue
            external = isinstance(tensor, ir.ExternalTensor)
            # ONNX Runtime looks up in-memory initializers in the main graph only: a body's stay inline.
            if tensor.dtype in _NON_NUMPY_DTYPES or graph is not model.graph:
                if external:  # ONNX Runtime would resolve a bytes model's data paths against the cwd
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=name)
                continue
            if tensor.nbytes < min_bytes and not external:
                continue
            if not value.uses() and not value.is_graph_output() and not external:
                continue  # ONNX Runtime drops an unused initializer, then cannot find it to replace
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
    """What an ONNX Runtime session should load for ``model``.

    Its bytes, or for models too large for one protobuf message, a temporary file with external data
    (removed afterwards).
    """
    if files.model_size_bytes(model) <= files.EXTERNAL_DATA_THRESHOLD:
        yield files.serialize_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield path


def open_model(
    model: ir.Model,
    *,
    outputs: Sequence[ir.Value] = (),
    providers: Sequence[str] = ("CPUExecutionProvider",),
    opt_level: OptLevel = "all",
    threads: int | None = None,
    prepack: bool = True,
    spin: bool = True,
    priority_order: bool = False,
) -> ort.InferenceSession:
    """A session on an in-memory onnx-ir model, optionally with extra graph ``outputs``.

    The one way the pipeline's stages (calibration, validation, tuning, constant folding) open a
    session over a model they hold: the large weights are handed to ONNX Runtime as arrays that share
    the model's memory (:func:`serialize_lean`), and the extra outputs are added to a serialized copy
    only (``model`` is left as it was). Ask for outputs at ``opt_level="disable"`` or ``"basic"`` when
    every requested tensor must survive as it is in the graph.
    """
    graph = model.graph
    original = list(graph.outputs)
    added = [v for v in dict.fromkeys(outputs) if not v.is_graph_output()]
    try:
        graph.outputs.extend(added)
        data, initializers = serialize_lean(model)
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original)
    return make_session(
        data,
        providers=providers,
        opt_level=opt_level,
        threads=threads,
        initializers=initializers,
        prepack=prepack,
        spin=spin,
        priority_order=priority_order,
    )
