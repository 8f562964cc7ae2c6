"""Latency: the same feed through several models, interleaved, so that no model is favoured.

Latency is a deployment number, measured at ``ORT_ENABLE_ALL`` by default, with warm-up runs and the
models' runs interleaved in rotating order; the median and 90th percentile are reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from onnxq.errors import OnnxqError
from onnxq.runtime.session import ModelSource, OptLevel, make_session, run

__all__ = ["LatencyResult", "measure_latency", "time_sessions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one model: median and 90th percentile over ``runs`` timed runs, in milliseconds.

    ``times_ms`` keeps every timed run in round order, so that callers can pair one model's runs with
    another's from the same rounds (the latency guard compares paired ratios, which drift cancels out of).
    """

    name: str
    threads: int
    median_ms: float
    p90_ms: float
    runs: int
    times_ms: tuple[float, ...] = ()


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
    return time_sessions(sessions, feed, threads=threads, runs=runs, warmup=warmup)


def time_sessions(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int,
    runs: int,
    warmup: int = 1,
) -> dict[str, LatencyResult]:
    """Time open sessions on the same feed, interleaved in rotating order (see :func:`measure_latency`).

    For callers that keep a session across several timings (the latency guard times the quantized
    model against one variant after another without opening it again).
    """
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
            times_ms=tuple(float(t) for t in ms),
        )
        logger.debug(
            "latency %s: median %.3f ms, p90 %.3f ms", name, results[name].median_ms, results[name].p90_ms
        )
    return results
