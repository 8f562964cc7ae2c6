"""ONNX Runtime sessions, runs with one-line errors, and interleaved latency measurement.

Every session is created the same way, so that numbers taken by different parts of onnxq are
comparable: sequential execution, one inter-op thread, a chosen number of intra-op threads, and
ONNX Runtime's own logging silenced (``log_severity_level=4``, fatal only): a model that fails at run
time must reach the user as onnxq's one line naming the node, not as ONNX Runtime's colored log
followed by that line.

The optimisation level is an explicit argument because it changes the numbers, not just the speed:
from ``"extended"`` on, ONNX Runtime fuses QuantizeLinear/DequantizeLinear pairs into QLinear kernels
and rewrites int4 weight-only MatMuls into ``MatMulNBits`` with a lower accuracy level. Check graph
semantics at ``"disable"``; measure deployed accuracy and latency at ``"all"``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxq.errors import OnnxqError

__all__ = [
    "LatencyResult",
    "OptLevel",
    "describe_failure",
    "make_session",
    "measure_latency",
    "resolve_providers",
    "run",
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
    # Initializers handed over as arrays (see onnxq.model_io.serialize_lean): ORT uses their memory.
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
        raise OnnxqError(f"onnxruntime cannot load {_describe(model)}: {_first_line(exc)}") from exc

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
            raise OnnxqError(f"onnxruntime: {describe_failure(exc)}") from exc
        raise OnnxqError(
            f"onnxruntime rejected the input: {_first_line(exc)} (model inputs: {_describe_inputs(session)})"
        ) from exc
    return [np.asarray(out) for out in outputs]


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one model: median and 90th percentile over ``runs`` timed runs, in milliseconds."""

    name: str
    threads: int
    median_ms: float
    p90_ms: float
    runs: int


def measure_latency(
    models: Mapping[str, ModelSource],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int,
    runs: int = 30,
    warmup: int = 3,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    opt_level: OptLevel = "all",
    spin: bool = False,
) -> dict[str, LatencyResult]:
    """Time each model on the same feed, interleaving the models so that none is favoured.

    One session is opened per model and run ``warmup`` times untimed. Then, for ``runs`` rounds, every
    model runs once; the order rotates each round, so no model is always first (after an idle
    period) or always right after another model (sharing its warm caches). Each run is timed with
    :func:`time.perf_counter`. Latency is a deployment number, hence ``opt_level="all"`` by default.

    Worker threads do not spin-wait unless ``spin``: with several sessions interleaved, the idle
    sessions' workers would otherwise keep spinning after their run and take the cores from the
    session being timed (a 2-thread ResNet-18 measured 24-34 ms that way on 2 cores, 11-12 ms alone).
    Every model gets the same setting, so ratios stay fair.
    """
    if runs < 1:
        raise OnnxqError(f"latency runs must be at least 1, got {runs}")
    if warmup < 0:
        raise OnnxqError(f"latency warmup runs must be at least 0, got {warmup}")
    sessions = {
        name: make_session(model, providers=providers, opt_level=opt_level, threads=threads, spin=spin)
        for name, model in models.items()
    }
    feed_dict = dict(feed)
    for session in sessions.values():
        for _ in range(warmup):
            run(session, feed_dict)

    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            session = sessions[name]
            start = time.perf_counter()
            run(session, feed_dict)
            times[name].append(time.perf_counter() - start)

    results = {}
    for name in names:
        ms = np.asarray(times[name], dtype=np.float64) * 1e3
        results[name] = LatencyResult(
            name=name,
            threads=threads,
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            runs=len(ms),
        )
        logger.debug(
            "latency %s: median %.3f ms, p90 %.3f ms", name, results[name].median_ms, results[name].p90_ms
        )
    return results
