"""Dynamic quantization and QOperator lowering: onnxq against onnxruntime.quantization.

Run ``python tools/bench_dynamic.py [--models minilm,lstm,cnn] [--out-dir bench-out] [--calib N]
[--eval N] [--runs R] [--threads 1,2] [--batches 1,8] [--seq-len 128] [--quick]``.

One table, three parts:

- ``minilm`` (all-MiniLM-L6-v2): float, ``onnxq-dynamic`` (``QuantConfig(mode="dynamic")``, float
  embedding tables, no data), ``onnxq-dynamic-emb`` (the default: int8 tables) and ``ort-dynamic``
  (``quant_pre_process`` then ``quantize_dynamic``, per-channel int8 weights).
  Latency at batch 1 and batch 8 (``--batches``) × ``--seq-len`` tokens (padded); accuracy as the SQNR
  and cosine of the token embeddings on non-padding tokens and the mean cosine of the sentence
  embeddings.
- ``lstm`` (the zoo's two-layer LSTM classifier, 32 steps): the same three models and batches; SQNR,
  cosine and top-1 agreement of the logits.
- ``cnn`` (the zoo's benchmark CNN), statically quantized from ``--calib`` calibration samples:
  ``onnxq-qdq`` (the default QDQ form), ``onnxq-qoperator`` (``format="qoperator"``: QLinearConv,
  QLinearMatMul, ...) and ``ort-qoperator`` (``quantize_static`` with ``QuantFormat.QOperator``, uint8
  activations, per-channel int8 weights, min-max). ``x/QDQ`` is onnxq-qdq's latency divided by the
  model's (above 1: faster than onnxq's QDQ form).

Evaluation feeds are disjoint from the calibration feeds. Everything else is
``tools/bench_static.py``'s machinery: each quantization runs in an isolated worker (``quant s`` is the
quantization call, ``peak RSS`` the worker's whole peak, ``Δ RSS`` the peak above its high-water mark
after imports and data loading); latency is the median of interleaved runs at ``ORT_ENABLE_ALL``
without thread spin-waiting (``x`` = float ms / model ms); accuracy is measured against the float
model at ``ORT_ENABLE_ALL``. Below the table, the quantized operators of every output file, and what
onnxq declined.

Results go to ``<out-dir>/bench_dynamic.json`` and ``<out-dir>/bench_dynamic.txt``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import model_zoo
from tools.bench_static import (
    BENCH_MODELS,
    NO_ACCURACY,
    BenchModel,
    Feed,
    Latencies,
    QuantRun,
    Variant,
    _csv,
    _fmt,
    _short_status,
    _unstable,
    accuracy_columns,
    cost_columns,
    evaluate,
    latency,
    quant_row,
    quantize_variants,
    save_feeds,
    write_outputs,
)

__all__ = ["SECTIONS", "Section", "main", "stack_feeds"]

logger = logging.getLogger("bench_dynamic")

DYNAMIC_VARIANTS = (
    Variant("onnxq-dynamic", "onnxq", "uint8", mode="dynamic", embeddings=False),
    Variant("onnxq-dynamic-emb", "onnxq", "uint8", mode="dynamic"),
    Variant("ort-dynamic", "ort", "uint8", mode="dynamic"),
)
QOPERATOR_VARIANTS = (
    Variant("onnxq-qdq", "onnxq", "uint8"),
    Variant("onnxq-qoperator", "onnxq", "uint8", fmt="qoperator"),
    Variant("ort-qoperator", "ort", "uint8", fmt="qoperator"),
)


@dataclass(frozen=True)
class Section:
    """One model of the table and the variants it is quantized with."""

    bench: BenchModel
    variants: tuple[Variant, ...]
    batched: bool = False  # latency at every --batches size (else batch 1 only)
    baseline: str | None = None  # the variant of the "x/QDQ" columns


SECTIONS: dict[str, Section] = {
    "minilm": Section(BENCH_MODELS["minilm"], DYNAMIC_VARIANTS, batched=True),
    "lstm": Section(BENCH_MODELS["lstm"], DYNAMIC_VARIANTS, batched=True),
    "cnn": Section(BENCH_MODELS["cnn"], QOPERATOR_VARIANTS, baseline="onnxq-qdq"),
}

# Op types that only a quantized graph holds; the "ops" notes count these in every output.
_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearReduceMean",
        "QLinearWhere",
        "QAttention",
        "QEmbedLayerNormalization",
        "GatherBlockQuantized",
    }
)


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    out_dir: Path
    calib: int
    eval: int
    runs: int
    warmup: int
    threads: tuple[int, ...]
    batches: tuple[int, ...]
    seq_len: int
    worker_timeout: float
    spin: bool = False


def stack_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> Feed:
    """Batch-1 feeds concatenated along axis 0 into one feed (MiniLM's are all padded to one length)."""
    if not feeds:
        raise ValueError("no feeds to stack")
    return {name: np.concatenate([f[name] for f in feeds], axis=0) for name in feeds[0]}


def _quantized_ops(path: str | None) -> dict[str, int]:
    """Quantized op types in a model file, main graph and subgraphs, with their counts."""
    if path is None:
        return {}
    import onnx

    model = onnx.load(path, load_external_data=False)
    counts: collections.Counter[str] = collections.Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in _QUANT_OPS:
                counts[node.op_type] += 1
            for attr in node.attribute:
                for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                    visit(sub)

    visit(model.graph)
    return dict(sorted(counts.items()))


# "<node> not quantized: <reason>" (onnxq's decline messages): grouped by reason in the notes.
_DECLINE = re.compile(r"^\S+ (not \w+): (.+)$")


def _onnxq_notes(key: str, run: QuantRun) -> list[str]:
    """What onnxq's report says it declined (quantization or lowering), one note per distinct reason."""
    report = run.detail.get("report")
    if not isinstance(report, dict):
        return []
    reasons: collections.Counter[str] = collections.Counter()
    for field in ("declined", "lowering_declined"):
        for message in report.get(field) or []:
            match = _DECLINE.match(str(message))
            reasons[f"{match[1]}: {match[2]}" if match else str(message)] += 1
    return [
        f"{key} {run.variant}: " + (f"{n} node(s) {reason}" if reason.startswith("not ") else reason)
        for reason, n in reasons.items()
    ]


def _latency_by_batch(
    section: Section,
    models: Mapping[str, str],
    batches: Sequence[int],
    settings: Settings,
    notes: list[str],
) -> dict[int, Latencies]:
    key, zoo = section.bench.key, section.bench.zoo
    pool = model_zoo.sample_feeds(zoo, max(batches), split="eval", seq_len=settings.seq_len)
    results: dict[int, Latencies] = {}
    for b in batches:
        logger.info("%s: latency at batch %d (%s threads, %d runs)", key, b, settings.threads, settings.runs)
        results[b] = latency(
            models,
            stack_feeds(pool[:b]),
            threads=settings.threads,
            runs=settings.runs,
            warmup=settings.warmup,
            spin=settings.spin,
        )
        notes.extend(_unstable(results[b], f"{key} batch {b}"))
    return results


def bench_section(section: Section, settings: Settings, notes: list[str]) -> list[dict[str, Any]]:
    """Quantize one model with its section's variants; cost, size, latency per batch, accuracy."""
    bench = section.bench
    work = settings.out_dir / bench.key
    logger.info("%s: building / loading the float model", bench.key)
    float_path = model_zoo.build(bench.zoo, settings.out_dir / "models")
    evals = model_zoo.sample_feeds(bench.zoo, settings.eval, split="eval", seq_len=settings.seq_len)
    feeds_path: Path | None = None
    if any(v.static for v in section.variants):
        calib = model_zoo.sample_feeds(bench.zoo, settings.calib, split="calib", seq_len=settings.seq_len)
        feeds_path = save_feeds(calib, work / f"calib-{settings.calib}.npz")

    runs, ok = quantize_variants(
        bench,
        section.variants,
        float_path,
        feeds_path,
        settings.calib,
        work,
        timeout=settings.worker_timeout,
        notes=notes,
    )
    for run in runs.values():
        notes.extend(_onnxq_notes(bench.key, run))

    batches = settings.batches if section.batched else (1,)
    lat = _latency_by_batch(section, {"float": str(float_path), **ok}, batches, settings, notes)
    logger.info("%s: accuracy on %d evaluation samples", bench.key, len(evals))
    acc = evaluate(bench, float_path, ok, evals, threads=max(settings.threads))

    variants = {v.name: v for v in section.variants}
    rows: list[dict[str, Any]] = []
    for name in ("float", *runs):
        quant = runs.get(name)
        variant = variants.get(name)
        row = quant_row(bench, name, float_path, quant, len(evals))
        row["mode"] = variant.mode if variant else "float"
        row["format"] = variant.fmt if variant and variant.static else None
        row["quantized_ops"] = _quantized_ops(quant.output if quant else None)
        for b in batches:
            for t in settings.threads:
                ms, p90 = lat[b][t].get(name, (None, None))
                row[f"ms_b{b}_{t}t"] = ms
                row[f"p90_ms_b{b}_{t}t"] = p90
                row[f"x_b{b}_{t}t"] = lat[b][t]["float"][0] / ms if ms else None
                if section.baseline is not None:
                    base = lat[b][t].get(section.baseline)
                    row[f"x_base_b{b}_{t}t"] = base[0] / ms if base and ms else None
        row.update(acc.get(name, NO_ACCURACY))
        rows.append(row)
    return rows


def table(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    from tabulate import tabulate

    batches = sorted({int(k.split("_")[1][1:]) for r in rows for k in r if k.startswith("ms_b")})
    with_base = any(k.startswith("x_base_") for r in rows for k in r)
    failed = any(r["status"] != "ok" for r in rows)
    lines = []
    for r in rows:
        line = cost_columns(r)
        for b in batches:
            for t in settings.threads:
                line[f"b{b} ms {t}t"] = _fmt(r.get(f"ms_b{b}_{t}t"), 3)
                line[f"b{b} x {t}t"] = _fmt(r.get(f"x_b{b}_{t}t"), 2)
        if with_base:
            for t in settings.threads:
                line[f"x/QDQ {t}t"] = _fmt(r.get(f"x_base_b1_{t}t"), 2)
        line.update(accuracy_columns(r))
        if failed:
            line["status"] = _short_status(r["status"])
        lines.append(line)
    return tabulate(lines, headers="keys", disable_numparse=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Dynamic quantization and QOperator lowering: onnxq vs onnxruntime.quantization."
    )
    parser.add_argument("--models", default=None, help=f"comma list of {', '.join(SECTIONS)} (default all)")
    parser.add_argument("--out-dir", default="bench-out", type=Path)
    parser.add_argument("--calib", type=int, default=None, help="CNN calibration samples (default 32)")
    parser.add_argument("--eval", type=int, default=None, help="evaluation samples (default 96)")
    parser.add_argument("--runs", type=int, default=None, help="timed latency runs per model (default 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per model (default 5)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts for latency")
    parser.add_argument("--batches", default="1,8", help="MiniLM and LSTM batch sizes for latency")
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length (padded)")
    parser.add_argument(
        "--spin", action="store_true", help="let ORT worker threads spin-wait (its default) in latency runs"
    )
    parser.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds per quantization")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test settings")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    models = _csv(args.models) if args.models else tuple(SECTIONS)
    unknown = [m for m in models if m not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
    batches = tuple(int(b) for b in _csv(args.batches))
    threads = tuple(int(t) for t in _csv(args.threads))
    if not batches or min(batches) < 1 or not threads or min(threads) < 1:
        raise SystemExit("--batches and --threads need positive integers")
    return Settings(
        models=models,
        out_dir=args.out_dir,
        calib=args.calib or (4 if quick else 32),
        eval=args.eval or (4 if quick else 96),
        runs=args.runs or (3 if quick else 50),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 5),
        threads=threads,
        batches=batches,
        seq_len=args.seq_len,
        worker_timeout=args.worker_timeout,
        spin=args.spin,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("bench_static").setLevel(logging.INFO)
    settings = settings_from(args)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for key in settings.models:
        rows.extend(bench_section(SECTIONS[key], settings, notes))

    header = (
        f"dynamic quantization and QOperator lowering: evaluation {settings.eval} samples"
        + (f", CNN calibration {settings.calib} (disjoint)" if "cnn" in settings.models else "")
        + f"; latency median of {settings.runs} interleaved runs at ORT_ENABLE_ALL, thread spinning "
        + ("on" if settings.spin else "off")
        + (
            f", batch {'/'.join(map(str, settings.batches))} "
            f"(MiniLM × seq {settings.seq_len}, LSTM × {model_zoo.LSTM_SEQ_LEN} steps)"
            if {"minilm", "lstm"} & set(settings.models)
            else ""
        )
        + (", CNN batch 1" if "cnn" in settings.models else "")
        + "; x = float ms / model ms (>1 faster)"
        + ("; x/QDQ = onnxq-qdq ms / model ms" if "cnn" in settings.models else "")
        + "; accuracy vs float at ORT_ENABLE_ALL"
    )
    ops = [
        f"- {r['model']} {r['variant']}: "
        + (", ".join(f"{op} {n}" for op, n in r["quantized_ops"].items()) or "none")
        for r in rows
        if r["variant"] != "float" and r["status"] == "ok"
    ]
    text = [header, "", table(rows, settings)]
    if ops:
        text += ["", "quantized operators in each file:", *ops]
    write_outputs(
        settings, "bench_dynamic", text, notes, {"results": rows, "total_s": time.perf_counter() - started}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
