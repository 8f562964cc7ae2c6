"""Several models on the same data: size, latency and accuracy against the first (the reference).

Every model must take the same inputs as the reference, and every output of the reference must exist
(by name) in every other model. Accuracy is accumulated feed by feed (:class:`OutputStats`), so memory
does not grow with the data; outputs of any floating type (float16 models included) are compared as
float32. Latency comes from :func:`measure_latency` with all models interleaved in one measurement per
thread count, timed on the first feed.

Both accuracy and latency use ``opt_level="all"`` by default: these are the numbers a deployment gets,
with ONNX Runtime's own QDQ fusions. Pass ``"disable"`` to check graph semantics instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tabulate import tabulate

from onnxq.data import Feeds
from onnxq.errors import OnnxqError
from onnxq.runtime.latency import measure_latency
from onnxq.runtime.session import OptLevel, make_session, run
from onnxq.validate.metrics import OutputStats, output_stats, padding_mask

__all__ = ["ModelComparison", "compare_models_table", "comparison_to_dict", "format_comparison"]

logger = logging.getLogger(__name__)

_OPT_LEVEL_NAMES = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass
class ModelComparison:
    """One model's row: size, latency per thread count, and accuracy per output against the reference.

    ``latency_ms`` and ``speedup`` map a thread count to the median latency and to the reference's
    median divided by this model's (above 1: faster than the reference). ``outputs`` holds one dict per
    reference output: ``name``, ``sqnr_db``, ``cosine``, ``max_abs_error``, ``top1`` (``None`` when
    the output is not class scores) and ``samples``; the reference's own metrics are ``None``.
    """

    name: str
    path: str
    size_bytes: int
    latency_ms: dict[int, float]
    speedup: dict[int, float]
    outputs: list[dict[str, Any]]
    is_reference: bool = False
    latency_p90_ms: dict[int, float] = field(default_factory=dict)
    latency_runs: int = 0
    samples: int = 0
    provider: str = "CPUExecutionProvider"
    opt_level: str = "all"


def _display_names(paths: Sequence[Path]) -> list[str]:
    """File names, or the paths as given where two models share a file name."""
    names = [p.name for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _size_bytes(path: Path) -> int:
    """Bytes on disk: the model file plus the external data files its initializers point to."""
    try:
        total = path.stat().st_size
    except OSError as exc:
        raise OnnxqError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        model = ir.load(path)
    except Exception:  # the session will report what is wrong with the file
        return total
    locations: set[str] = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                locations.add(os.fspath(tensor.location))
    for location in sorted(locations):
        data = path.parent / location
        if data.is_file():
            total += data.stat().st_size
    return total


def _as_float32(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def _check_interfaces(paths: Sequence[Path], sessions: Sequence[Any]) -> list[str]:
    """The reference's output names; raises when a model's inputs or outputs do not fit it."""
    ref_inputs = [arg.name for arg in sessions[0].get_inputs()]
    outputs = [arg.name for arg in sessions[0].get_outputs()]
    for path, session in zip(paths[1:], sessions[1:], strict=True):
        inputs = [arg.name for arg in session.get_inputs()]
        missing = [n for n in ref_inputs if n not in inputs]
        extra = [n for n in inputs if n not in ref_inputs]
        if missing or extra:
            parts = []
            if missing:
                parts.append("lacks input(s) " + ", ".join(repr(n) for n in missing))
            if extra:
                parts.append("has other input(s) " + ", ".join(repr(n) for n in extra))
            raise OnnxqError(
                f"{path} does not take the same inputs as the reference {paths[0]}: {'; '.join(parts)}"
            )
        names = {arg.name for arg in session.get_outputs()}
        lacking = [n for n in outputs if n not in names]
        if lacking:
            raise OnnxqError(
                f"{path} lacks output(s) {', '.join(repr(n) for n in lacking)} of the reference {paths[0]}"
            )
    return outputs


def _accuracy(
    paths: Sequence[Path],
    feeds: Feeds | Iterable[Mapping[str, np.ndarray]],
    providers: Sequence[str],
    opt_level: OptLevel,
) -> tuple[list[str], list[list[OutputStats]], dict[str, np.ndarray], int]:
    """Run every model on the feeds.

    Returns the output names, the stats per (model, output) of every model after the first, the first
    feed, and the number of feeds.
    """
    from onnxq.progress import progress

    sessions = [make_session(p, providers=providers, opt_level=opt_level) for p in paths]
    names = _check_interfaces(paths, sessions)
    stats = [output_stats(sessions[0], names) for _ in paths[1:]]
    first: dict[str, np.ndarray] | None = None
    count = 0
    total = feeds.num_batches if isinstance(feeds, Feeds) else None
    for feed in progress(feeds, total=total, desc="compare"):
        count += 1
        if first is None:
            first = dict(feed)
        try:
            reference = [_as_float32(a) for a in run(sessions[0], feed, names)]
        except OnnxqError as exc:
            raise OnnxqError(f"{paths[0]}: {exc}") from exc
        keep = padding_mask(feed)
        for path, session, model_stats in zip(paths[1:], sessions[1:], stats, strict=True):
            try:
                actual = run(session, feed, names)
            except OnnxqError as exc:
                raise OnnxqError(f"{path}: {exc}") from exc
            for stat, ref, act in zip(model_stats, reference, actual, strict=True):
                try:
                    stat.update(ref, _as_float32(act), keep)
                except (ValueError, TypeError) as exc:
                    raise OnnxqError(f"{path}: {exc}") from exc
    if first is None:
        raise OnnxqError("no input data to compare the models on")
    return names, stats, first, count


def compare_models_table(
    paths: Sequence[str | os.PathLike[str]],
    feeds: Feeds | Iterable[Mapping[str, np.ndarray]],
    *,
    threads: Sequence[int] = (1,),
    runs: int = 30,
    warmup: int = 3,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    opt_level: OptLevel = "all",
) -> list[ModelComparison]:
    """Compare every model in ``paths`` with the first on ``feeds``; one row per model, in order.

    ``feeds`` is iterated once (it may be a generator); latency is timed on its first feed, once per
    entry of ``threads``, with the models interleaved. Raises :class:`OnnxqError` when a model takes
    other inputs than the first, lacks one of its outputs, or the data does not fit.
    """
    model_paths = [Path(p) for p in paths]
    if not model_paths:
        raise OnnxqError("no models to compare")
    for path in model_paths:
        if not path.is_file():
            raise OnnxqError(f"model not found: {path}")
    if not threads:
        raise OnnxqError("no thread counts to measure latency with")
    names = _display_names(model_paths)
    sizes = [_size_bytes(p) for p in model_paths]

    outputs, stats, first, samples = _accuracy(model_paths, feeds, providers, opt_level)

    latency: dict[str, dict[int, float]] = {n: {} for n in names}
    p90: dict[str, dict[int, float]] = {n: {} for n in names}
    for count in threads:
        results = measure_latency(
            dict(zip(names, (str(p) for p in model_paths), strict=True)),
            first,
            threads=count,
            runs=runs,
            warmup=warmup,
            providers=providers,
            opt_level=opt_level,
        )
        for name in names:
            latency[name][count] = results[name].median_ms
            p90[name][count] = results[name].p90_ms

    reference_ms = latency[names[0]]
    rows = []
    for index, (name, path, size) in enumerate(zip(names, model_paths, sizes, strict=True)):
        if index == 0:
            per_output: list[dict[str, Any]] = [
                {"name": n, "sqnr_db": None, "cosine": None, "max_abs_error": None, "top1": None}
                for n in outputs
            ]
        else:
            per_output = [
                {
                    "name": s.name,
                    "sqnr_db": s.sqnr_db,
                    "cosine": s.cosine,
                    "max_abs_error": s.max_abs_error,
                    "top1": s.top1,
                    "padding_excluded": s.padding_excluded,
                }
                for s in stats[index - 1]
            ]
        rows.append(
            ModelComparison(
                name=name,
                path=str(path),
                size_bytes=size,
                latency_ms=dict(latency[name]),
                speedup={
                    t: (reference_ms[t] / ms if ms > 0 else math.nan) for t, ms in latency[name].items()
                },
                outputs=per_output,
                is_reference=index == 0,
                latency_p90_ms=dict(p90[name]),
                latency_runs=runs,
                samples=samples,
                provider=providers[0] if providers else "",
                opt_level=opt_level,
            )
        )
    return rows


def _num(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def format_comparison(rows: Sequence[ModelComparison]) -> str:
    """One table: a line per (model, output); size and latency on each model's first line.

    Latency cells read ``median ms (speed-up vs the reference)``.
    """
    if not rows:
        return "no models compared"
    reference = rows[0]
    thread_counts = list(reference.latency_ms)
    several = len(reference.outputs) > 1
    headers = ["model", "size"]
    headers += [f"{t} thread{'s' if t != 1 else ''} ms" for t in thread_counts]
    if several:
        headers.append("output")
    headers += ["SQNR dB", "cosine", "max |err|", "top-1 agree"]
    table: list[list[str]] = []
    for row in rows:
        for i, out in enumerate(row.outputs or [{"name": "-"}]):
            line = [row.name, _size(row.size_bytes)] if i == 0 else ["", ""]
            for t in thread_counts:
                if i:
                    line.append("")
                    continue
                ms = row.latency_ms.get(t)
                if ms is None:
                    line.append("-")
                elif row.is_reference:
                    line.append(f"{ms:.3f}")
                else:
                    line.append(f"{ms:.3f} ({_num(row.speedup.get(t), '.2f')}x)")
            if several:
                line.append(str(out["name"]))
            if row.is_reference:
                line += ["reference", "", "", ""]
            else:
                top1 = out.get("top1")
                line += [
                    _num(out.get("sqnr_db"), ".1f"),
                    _num(out.get("cosine"), ".5f"),
                    _num(out.get("max_abs_error"), ".4g"),
                    "-" if top1 is None else f"{100 * top1:.1f}%",
                ]
            table.append(line)
    colalign = ["left", "right"] + ["right"] * len(thread_counts)
    if several:
        colalign.append("left")
    colalign += ["right"] * 4
    level = _OPT_LEVEL_NAMES.get(reference.opt_level, reference.opt_level)
    title = (
        f"Against {reference.name} on {reference.samples} feeds ({reference.provider}, {level}); "
        f"latency: median of {reference.latency_runs} interleaved runs (speed-up vs the reference)"
    )
    if not several and reference.outputs:
        title += f"; output {reference.outputs[0]['name']!r}"
    body = tabulate(
        table, headers=headers, tablefmt="simple_outline", disable_numparse=True, colalign=colalign
    )
    padded = sorted({str(o["name"]) for r in rows for o in r.outputs if o.get("padding_excluded")})
    if padded:
        body += f"\n{', '.join(map(repr, padded))}: compared on real tokens only (attention mask 1)"
    return f"{title}:\n{body}"


def _finite(data: Any) -> Any:
    """Make ``data`` standard JSON: inf/nan and thread-count keys become strings.

    JSON has no inf/nan and only string keys (inf/nan are written as in :mod:`onnxq.report`).
    """
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {str(k): _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def comparison_to_dict(rows: Sequence[ModelComparison]) -> dict[str, Any]:
    """The rows as JSON-ready data: ``{"reference": name, "models": [row, ...]}``."""
    return {
        "reference": rows[0].name if rows else None,
        "models": [_finite(asdict(row)) for row in rows],
    }
