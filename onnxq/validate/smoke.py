"""The smoke test every output passes before it is written: it loads and runs in ONNX Runtime.

A quantized model that loads at ``ORT_DISABLE_ALL`` can still fail at ``ORT_ENABLE_ALL``, where ONNX
Runtime fuses Q/DQ into integer kernels with their own constraints (a batched MatMul weight with
per-column scales is one). So the check is what a deployment does: a session at ``ORT_ENABLE_ALL`` and
one run. When the run fails, the float model is run on the same feed to tell onnxq's fault (the float
model runs) from the data's (it does not).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.runtime.kernels import onnxruntime_version
from onnxq.runtime.session import SessionError, make_session, run

__all__ = ["check_runs"]

logger = logging.getLogger(__name__)


def check_runs(
    quantized: bytes | Path,
    reference: bytes | Path,
    feed: Mapping[str, np.ndarray] | None,
    *,
    random_feed: bool,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> None:
    """Raise :class:`OnnxqError` unless ``quantized`` loads at ``ORT_ENABLE_ALL`` and runs on ``feed``.

    ``reference`` is the model it was made from. With ``feed=None`` only loading is checked. A
    ``random_feed`` on which the reference fails too proves nothing either way and is skipped.
    """
    where = f"onnxruntime {onnxruntime_version()} at ORT_ENABLE_ALL"
    try:
        session = make_session(quantized, providers=providers, opt_level="all")
    except OnnxqError as exc:
        raise OnnxqError(f"the quantized model does not load in {where}: {_reason(exc)}") from exc
    if feed is None:
        return
    try:
        run(session, feed)
    except OnnxqError as exc:
        try:
            run(make_session(reference, providers=providers, opt_level="all"), feed)
        except OnnxqError as reference_exc:
            if random_feed:
                logger.info("smoke test skipped: the input model does not run on random inputs either")
                return
            raise OnnxqError(f"the input model fails on this data: {_reason(reference_exc)}") from exc
        raise OnnxqError(f"the quantized model fails in {where}: {_reason(exc)}") from exc


def _reason(exc: OnnxqError) -> str:
    """ONNX Runtime's reason, without onnxq's framing (the caller says what failed)."""
    return exc.reason if isinstance(exc, SessionError) else str(exc)
