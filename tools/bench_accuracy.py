"""Accuracy-budget benchmark: what ``--target`` buys and what it costs.

Run ``python tools/bench_accuracy.py [--models cnn,resnet18,minilm] [--out-dir bench-out] [--quick]``.

For each model: static int8 with onnxq's defaults, then the accuracy-budget search
(``QuantizationResult.meet_target``) for a target above what full int8 reaches. The search runs on one
set of evaluation samples; the scores in the table are measured on a second, held-out set. Latency is
float vs full int8 vs the budgeted model (``ORT_ENABLE_ALL``, interleaved, median). The search's wall
time is shown next to the time of one full quantize-variant + evaluate, which is what a search that
tries each layer in turn would pay per layer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import model_zoo
from tools.bench_static import _fmt, latency, write_outputs

logger = logging.getLogger("bench_accuracy")

#: Per model: the zoo name and a target above what full int8 reaches on it.
TARGETS: dict[str, tuple[str, str]] = {
    "cnn": ("cnn", "sqnr>=33"),
    "resnet18": ("resnet18", "sqnr>=19"),
    "minilm": ("minilm", "sqnr>=17"),
}


@dataclass
class Settings:
    models: tuple[str, ...]
    out_dir: Path
    calib: int
    search: int
    held_out: int
    runs: int


def _score(target: Any, reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """The target's metric of ``candidate`` against ``reference`` on ``feeds`` (ORT_ENABLE_ALL)."""
    from onnxq.runtime.session import make_session, run

    ref = make_session(str(reference), opt_level="all")
    cand = make_session(str(candidate), opt_level="all")
    return float(target.score([run(ref, f) for f in feeds], [run(cand, f) for f in feeds]))


def bench(name: str, settings: Settings, work: Path) -> dict[str, Any]:
    import onnxq
    from onnxq.tuning import AccuracyTarget

    zoo_name, target_text = TARGETS[name]
    target = AccuracyTarget.parse(target_text)
    float_path = model_zoo.build(zoo_name, work)
    calib = model_zoo.sample_feeds(zoo_name, settings.calib, split="calib")
    evaluation = model_zoo.sample_feeds(zoo_name, settings.search + settings.held_out, split="eval")
    search, held_out = evaluation[: settings.search], evaluation[settings.search :]

    logger.info("%s: quantizing and searching for %s", name, target_text)
    result = onnxq.quantize(float_path, calib, show_progress=False)
    int8_path = result.save(work / f"{name}.int8.onnx")
    outcome = result.meet_target(target, search)
    budget_path = result.save(work / f"{name}.budget.onnx")

    lat = latency(
        {"float": float_path, "int8": int8_path, "budget": budget_path},
        held_out[0],
        threads=(1,),
        runs=settings.runs,
        warmup=3,
    )[1]
    return {
        "model": name,
        "target": target_text,
        "held_out_before": _score(target, float_path, int8_path, held_out),
        "held_out_after": _score(target, float_path, budget_path, held_out),
        "search_before": outcome.score_before,
        "search_after": outcome.score_after,
        "met": outcome.met,
        "kept_float": list(outcome.kept_float),
        "anchors": len(result.static.quantized_nodes) if result.static else None,
        "float_ms": lat["float"][0],
        "int8_ms": lat["int8"][0],
        "budget_ms": lat["budget"][0],
        "evaluations": outcome.evaluations,
        "search_s": outcome.search_seconds,
        "full_evaluation_s": outcome.full_evaluation_seconds,
    }


def table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    body = [
        [
            r["model"],
            r["target"],
            _fmt(r["held_out_before"], 3),
            _fmt(r["held_out_after"], 3),
            "yes" if r["met"] else "no",
            f"{len(r['kept_float'])} of {r['anchors']}",
            _fmt(r["float_ms"], 3),
            _fmt(r["int8_ms"], 3),
            _fmt(r["budget_ms"], 3),
            _fmt(r["budget_ms"] / r["int8_ms"], 2),
            r["evaluations"],
            _fmt(r["search_s"], 2),
            _fmt(r["full_evaluation_s"], 2),
        ]
        for r in rows
    ]
    headers = [
        "model", "target", "int8 score", "budget score", "met", "kept float", "float ms", "int8 ms",
        "budget ms", "ms ×int8", "evals", "search s", "1 eval s",
    ]  # fmt: skip
    return tabulate(body, headers=headers, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,resnet18,minilm", help="comma list of cnn, resnet18, minilm")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true", help="cnn only, few samples and runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quick = args.quick
    settings = Settings(
        models=("cnn",) if quick else tuple(m for m in args.models.split(",") if m),
        out_dir=args.out_dir,
        calib=8 if quick else 32,
        search=8 if quick else 32,
        held_out=8 if quick else 48,
        runs=5 if quick else 30,
    )
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-acc-") as tmp:
        rows.extend(bench(name, settings, Path(tmp)) for name in settings.models)
    header = (
        f"accuracy budget: calibration {settings.calib}, search on {settings.search} evaluation samples, "
        f"scores on {settings.held_out} held-out samples (ORT_ENABLE_ALL); latency median of {settings.runs} "
        "interleaved runs, 1 thread, batch 1; 'ms ×int8' = budgeted / full-int8 latency"
    )
    write_outputs(
        settings, "bench_accuracy", [header, "", table(rows)], [], {"results": rows,
        "total_s": time.perf_counter() - started}
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
