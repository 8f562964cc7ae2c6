"""Static-quantization benchmark: onnxq against onnxruntime.quantization on the example models.

Run ``python tools/bench_static.py [--models cnn,resnet18,minilm] [--out-dir bench-out] [--calib N]
[--eval N] [--runs R] [--only-ort] [--quick]``.

Every model is quantized from the same calibration feeds by

- ``onnxq``: ``onnxq.quantize(model, feeds, config=QuantConfig())`` (uint8 activations, per-channel
  symmetric int8 weights, min-max calibration; ``quantize`` does not validate, so its time is
  comparable);
- ``ort-int8`` / ``ort-uint8``: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel,
  min-max) with int8 weights and int8 (onnxruntime's default) or uint8 activations (what its docs
  recommend on x86). When onnxruntime's symbolic shape inference rejects a model, pre-processing is
  retried without it and the output says so.

Each quantization runs in a fresh child process (``--_worker``), started through a tiny launcher
that reads the child's peak RSS with ``os.wait4`` (Linux would otherwise carry this process's own
high-water mark into the child's). ``quant s`` is the wall time of the quantization call(s) inside
the child; ``peak RSS`` is the child's whole peak; ``Δ RSS`` is that peak minus the child's
high-water mark just before quantizing, after its imports (including the modules each quantizer
would import lazily; for onnxruntime that includes torch, which ``onnxruntime.tools`` imports when
installed) and after loading the calibration data.

Then, on evaluation feeds disjoint from the calibration ones, at ``ORT_ENABLE_ALL`` (what is deployed):
latency at 1 and 2 intra-op threads (all models interleaved in rotating order, median, ``x`` = float ms
/ model ms, above 1 is faster; worker threads do not spin-wait, see :func:`latency`) and accuracy
against the float model (SQNR of the main output, mean per-sample cosine, top-1 agreement for
classifiers, cosine of the mean-pooled sentence embedding for MiniLM; MiniLM token metrics use
non-padding tokens only).

A second table compares the cost of histogram calibration: onnxq ``entropy`` / ``percentile`` against
onnxruntime ``CalibrationMethod.Entropy`` / ``Percentile`` (uint8 activations), on the same samples.
When onnxruntime's entropy calibration runs past ``--calib-timeout``, the sample count is halved for
every method of that model and the output says so. When it fails outright (on MiniLM it does: the
attention mask holds float32 min, and its histogram code raises "Too many bins for data range"), it
is run again restricted to MatMul/Gemm/Conv tensors, so that a cost figure still exists.

Results go to ``<out-dir>/bench_static.json`` and ``<out-dir>/bench_static.txt``.

The quantizers, the isolated workers, latency and accuracy are shared with ``tools/bench_dynamic.py``:
a :class:`Variant` also names a ``mode`` (``static`` / ``dynamic``) and a ``fmt`` (``qdq`` /
``qoperator``), which :func:`quantize_onnxq` and :func:`quantize_ort` honour; the defaults are this
benchmark's static QDQ.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import model_zoo

__all__ = [
    "BENCH_MODELS",
    "BenchModel",
    "QuantRun",
    "Variant",
    "evaluate",
    "latency",
    "loadable",
    "main",
    "model_size_mb",
    "quantize_onnxq",
    "quantize_ort",
    "quantize_variants",
    "run_isolated",
    "save_feeds",
]

logger = logging.getLogger("bench_static")

Feed = dict[str, np.ndarray]
Tool = Literal["onnxq", "ort"]
Activation = Literal["int8", "uint8"]
Method = Literal["minmax", "entropy", "percentile"]
Mode = Literal["static", "dynamic"]
Format = Literal["qdq", "qoperator"]
Latencies = dict[int, dict[str, tuple[float, float]]]  # threads → model → (median ms, p90 ms)


@dataclass(frozen=True)
class BenchModel:
    """How one zoo model is benchmarked."""

    key: str
    zoo: str
    main_output: str
    classifier: bool = False
    sentence_output: str | None = None
    token_mask: str | None = None


BENCH_MODELS: dict[str, BenchModel] = {
    "cnn": BenchModel("cnn", "cnn", "logits", classifier=True),
    "small_cnn": BenchModel("small_cnn", "small_cnn", "logits", classifier=True),
    "resnet18": BenchModel("resnet18", "resnet18", "logits", classifier=True),
    "minilm": BenchModel(
        "minilm",
        "minilm",
        "last_hidden_state",
        sentence_output="sentence_embedding",
        token_mask="attention_mask",
    ),
    "mlp": BenchModel("mlp", "mlp", "logits", classifier=True),
    "transformer": BenchModel("transformer", "transformer_encoder", "output"),
    "lstm": BenchModel("lstm", "lstm", "logits", classifier=True),
}


@dataclass(frozen=True)
class Variant:
    """One way of quantizing a model.

    ``mode="dynamic"`` needs no calibration data (``activations``, ``method`` and ``op_types`` are then
    unused: activations are quantized to uint8 at run time); ``fmt="qoperator"`` asks for integer
    operators (QLinearConv, QLinearMatMul, ...) instead of QuantizeLinear/DequantizeLinear pairs.
    """

    name: str
    tool: Tool
    activations: Activation
    method: Method = "minmax"
    op_types: tuple[str, ...] | None = None  # onnxruntime's op_types_to_quantize; None = its default
    mode: Mode = "static"
    fmt: Format = "qdq"
    embeddings: bool = True  # onnxq: int8 embedding Gather tables (DynamicConfig.embeddings, its default)
    run_time_ranges: bool = True  # onnxq: QuantConfig.run_time_ranges (its default; --no-run-time-ranges)
    #: onnxruntime only: convert models below this opset up to it first (per-channel Q/DQ need 13; its
    #: quantizer writes an ``axis`` that older DequantizeLinear lacks). 0: leave the opset alone.
    min_opset: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.fmt not in ("qdq", "qoperator"):
            raise ValueError(f"fmt must be 'qdq' or 'qoperator', got {self.fmt!r}")

    @property
    def static(self) -> bool:
        return self.mode == "static"

    @property
    def label(self) -> str:
        return self.method if self.op_types is None else f"{self.method} ({'/'.join(self.op_types)} only)"


MAIN_VARIANTS = (
    Variant("onnxq", "onnxq", "uint8"),
    Variant("ort-int8", "ort", "int8"),
    Variant("ort-uint8", "ort", "uint8"),
)
CALIB_VARIANTS = (
    Variant("ort-entropy", "ort", "uint8", "entropy"),  # first: the slowest; it decides the sample count
    Variant("ort-percentile", "ort", "uint8", "percentile"),
    Variant("onnxq-entropy", "onnxq", "uint8", "entropy"),
    Variant("onnxq-percentile", "onnxq", "uint8", "percentile"),
)
# Run when onnxruntime's entropy calibration fails with its default op types: MiniLM's attention-mask
# tensors hold float32 min (-3.4e38), on which its histogram code raises "Too many bins for data
# range". Collecting only MatMul/Gemm/Conv tensors avoids them and still gives a cost figure.
ORT_ENTROPY_FALLBACK = Variant("ort-entropy-matmul", "ort", "uint8", "entropy", ("MatMul", "Gemm", "Conv"))


# --------------------------------------------------------------------------------------------------
# Feeds on disk (parent → worker)


def save_feeds(feeds: Sequence[Mapping[str, np.ndarray]], path: Path) -> Path:
    """Write feeds to one ``.npz``, keys ``<index>/<input name>``."""
    arrays = {f"{i:06d}/{name}": value for i, feed in enumerate(feeds) for name, value in feed.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def load_feeds(path: Path) -> list[Feed]:
    """The feeds written by :func:`save_feeds`, in order."""
    feeds: dict[int, Feed] = {}
    with np.load(path) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


# --------------------------------------------------------------------------------------------------
# Quantizers (run inside the worker)


def quantize_onnxq(
    model_path: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]] | None,
    out_path: str | os.PathLike[str],
    *,
    method: Method = "minmax",
    mode: Mode = "static",
    fmt: Format = "qdq",
    embeddings: bool = True,
    run_time_ranges: bool = True,
) -> dict[str, Any]:
    """Quantize with onnxq's default configuration for ``mode`` and ``fmt`` and save.

    ``method`` picks the calibration of static mode; dynamic mode takes no data (``feeds`` is
    ignored). ``onnxq.quantize`` does not validate, so the time is quantization only, like
    onnxruntime's ``quantize_static`` / ``quantize_dynamic``. Returns onnxq's report as a dict.
    """
    import onnxq
    from onnxq.config import CalibrationConfig, DynamicConfig, QuantConfig

    config = QuantConfig(
        mode=mode,
        format=fmt,
        calibration=CalibrationConfig(method=method),
        dynamic=DynamicConfig(embeddings=embeddings),
        run_time_ranges=run_time_ranges,
    )
    if mode == "static" and feeds is None:
        raise ValueError("static quantization needs calibration feeds")
    data = list(feeds) if mode == "static" and feeds is not None else None
    result = onnxq.quantize(os.fspath(model_path), data, config=config, show_progress=False)
    result.save(os.fspath(out_path))
    return {"report": result.report.to_dict()}


def quantize_ort(
    model_path: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]] | None,
    out_path: str | os.PathLike[str],
    *,
    activations: Activation = "uint8",
    method: Method = "minmax",
    op_types: Sequence[str] | None = None,
    mode: Mode = "static",
    fmt: Format = "qdq",
    min_opset: int = 0,
) -> dict[str, Any]:
    """``quant_pre_process``, then ``quantize_static`` or ``quantize_dynamic``, and save.

    Static (the default): ``quantize_static`` in ``fmt`` (``QuantFormat.QDQ`` or ``QOperator``),
    per-channel int8 weights, ``activations`` and ``method`` as given; ``op_types`` is passed as
    ``op_types_to_quantize`` (``None`` keeps onnxruntime's default, every op type its quantizer
    knows). Dynamic: ``quantize_dynamic`` with per-channel int8 weights (``feeds``, ``activations``,
    ``method`` and ``fmt`` are unused; its output is always operator-based).

    Returns the time of each step and a note when pre-processing had to skip onnxruntime's symbolic
    shape inference.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class FeedReader(CalibrationDataReader):
        def __init__(self, items: Sequence[Mapping[str, np.ndarray]]) -> None:
            self._items = list(items)
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= len(self._items):
                return None
            self._next += 1
            return dict(self._items[self._next - 1])

        def rewind(self) -> None:
            self._next = 0

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    act_type = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
    detail: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ort-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        start = time.perf_counter()
        if min_opset:
            model_path = _upgrade_opset(Path(model_path), min_opset, Path(tmp) / "upgraded.onnx", detail)
        try:
            quant_pre_process(os.fspath(model_path), os.fspath(pre))
        except Exception as exc:
            retried = (
                f"quant_pre_process failed ({str(exc).strip().splitlines()[-1]}); "
                "retried with skip_symbolic_shape=True"
            )
            detail["note"] = "; ".join(filter(None, (detail.get("note"), retried)))
            quant_pre_process(os.fspath(model_path), os.fspath(pre), skip_symbolic_shape=True)
        detail["pre_process_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if mode == "dynamic":
            quantize_dynamic(
                os.fspath(pre), os.fspath(out_path), per_channel=True, weight_type=QuantType.QInt8
            )
            detail["quantize_dynamic_s"] = time.perf_counter() - start
            return detail
        if feeds is None:
            raise ValueError("static quantization needs calibration feeds")
        quantize_static(
            os.fspath(pre),
            os.fspath(out_path),
            FeedReader(feeds),
            quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
            per_channel=True,
            activation_type=act_type,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            op_types_to_quantize=list(op_types) if op_types is not None else None,
        )
        detail["quantize_static_s"] = time.perf_counter() - start
    return detail


def _upgrade_opset(path: Path, minimum: int, out: Path, detail: dict[str, Any]) -> Path:
    """``path`` made ready for onnxruntime's quantizer the way its users must do it by hand: models
    below opset ``minimum`` converted up with onnx's version converter (its per-channel output is
    invalid below opset 13), and initializers removed from the graph inputs (IR < 4 models list them
    there, and its quantizer then demands them as inputs)."""
    import onnx
    import onnx.version_converter

    model = onnx.load(str(path))
    notes = []
    weights = {t.name for t in model.graph.initializer}
    as_inputs = [v for v in model.graph.input if v.name in weights]
    if as_inputs:
        for value in as_inputs:
            model.graph.input.remove(value)
        model.ir_version = max(model.ir_version, 4)
        notes.append(f"{len(as_inputs)} initializers removed from the graph inputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), minimum)
    if opset < minimum:
        model = onnx.version_converter.convert_version(model, minimum)
        notes.append(f"opset {opset} converted to {minimum} first (onnx.version_converter)")
    if not notes:
        return path
    onnx.save(model, str(out))
    detail["note"] = "; ".join(notes)
    return out


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# Modules each quantizer imports lazily, imported before the baseline so that "quant s" and "Δ RSS"
# measure the work rather than import costs (which still show in "peak RSS"). onnxruntime.tools, which
# quant_pre_process's symbolic shape inference lives in, imports torch when torch is installed.
_PREIMPORTS: dict[str, tuple[str, ...]] = {
    "onnxq": ("onnxq", "onnxq.config", "onnxq.pipeline", "onnx_ir", "onnx_ir.passes.common", "onnxruntime"),
    "ort": ("onnxruntime.quantization", "onnxruntime.tools.symbolic_shape_infer"),
}
# onnxq's passes behind a mode or format that the static QDQ path does not import.
_ONNXQ_PREIMPORTS: dict[str, tuple[str, ...]] = {
    "dynamic": ("onnxq.rewrite.dynamic_quant",),
    "qoperator": ("onnxq.rewrite.fuse_qlinear",),
}


def _preimport(tool: str, mode: str = "static", fmt: str = "qdq") -> None:
    names = _PREIMPORTS[tool]
    if tool == "onnxq":
        names += _ONNXQ_PREIMPORTS.get(mode, ()) + _ONNXQ_PREIMPORTS.get(fmt, ())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a module onnxq does not have (yet) is no reason to fail
            logger.debug("pre-import of %s failed: %s", name, exc)


def _worker(job_path: Path) -> int:
    """Child process: load the feeds (static mode), quantize once, write ``<job>.result.json``."""
    job = json.loads(job_path.read_text())
    mode, fmt = job.get("mode", "static"), job.get("fmt", "qdq")
    _preimport(job["tool"], mode, fmt)
    feeds = load_feeds(Path(job["feeds"])) if job.get("feeds") else None
    baseline = _max_rss_mib()
    start = time.perf_counter()
    if job["tool"] == "onnxq":
        detail = quantize_onnxq(
            job["model"],
            feeds,
            job["output"],
            method=job["method"],
            mode=mode,
            fmt=fmt,
            embeddings=job.get("embeddings", True),
            run_time_ranges=job.get("run_time_ranges", True),
        )
    else:
        detail = quantize_ort(
            job["model"],
            feeds,
            job["output"],
            activations=job["activations"],
            method=job["method"],
            op_types=job["op_types"],
            mode=mode,
            fmt=fmt,
            min_opset=job.get("min_opset", 0),
        )
    seconds = time.perf_counter() - start
    result = {"quant_s": seconds, "baseline_rss_mib": baseline, "worker_peak_rss_mib": _max_rss_mib()}
    Path(job["result"]).write_text(json.dumps({**result, "detail": detail}, indent=1))
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side


@dataclass
class QuantRun:
    """What one isolated quantization cost, and where its model is."""

    model: str
    variant: str
    samples: int
    status: str  # "ok", "error: ...", "timeout after N s"
    output: str | None = None
    quant_s: float | None = None
    peak_rss_mib: float | None = None
    delta_rss_mib: float | None = None
    process_s: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


# Runs the worker given on its command line, then writes the worker's rusage peak RSS (KiB) to argv[1].
_LAUNCHER = """\
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"maxrss_kib": usage.ru_maxrss}, out)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _last_error_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_isolated(
    model_key: str,
    variant: Variant,
    model_path: Path,
    feeds_path: Path | None,
    samples: int,
    work_dir: Path,
    *,
    timeout: float,
) -> QuantRun:
    """Quantize in a fresh Python process; its peak RSS comes from ``os.wait4`` in a small launcher.

    ``feeds_path`` is the calibration data of a static variant; a dynamic variant gets none
    (``None``), whatever is passed, and its run counts 0 samples.

    The launcher is there because Linux carries a process's RSS high-water mark into the
    ``ru_maxrss`` of every child it forks, even across ``exec``: a worker started straight from this
    process (which has run ONNX Runtime sessions and possibly torch) would report at least this
    process's peak. The launcher is a fresh ``python -S`` of ~10 MiB, so its children start clean.
    The launcher gets its own process group, which a timeout kills as a whole.
    """
    work_dir = work_dir.resolve()  # the worker runs there: onnxruntime's tools write scratch files to cwd
    model_path = model_path.resolve()
    feeds_path = feeds_path.resolve() if feeds_path is not None else None
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{variant.name}-{samples}" if variant.method != "minmax" else variant.name
    output = work_dir / f"{stem}.onnx"
    result_path = work_dir / f"{stem}.result.json"
    log_path = work_dir / f"{stem}.log"
    job_path = work_dir / f"{stem}.job.json"
    for stale in (output, result_path):
        stale.unlink(missing_ok=True)
    if not variant.static:
        feeds_path, samples = None, 0
    elif feeds_path is None:
        raise ValueError(f"{variant.name}: static quantization needs calibration feeds")
    job = {
        "tool": variant.tool,
        "activations": variant.activations,
        "method": variant.method,
        "op_types": list(variant.op_types) if variant.op_types is not None else None,
        "mode": variant.mode,
        "fmt": variant.fmt,
        "embeddings": variant.embeddings,
        "run_time_ranges": variant.run_time_ranges,
        "min_opset": variant.min_opset,
        "model": str(model_path),
        "feeds": str(feeds_path) if feeds_path is not None else None,
        "output": str(output),
        "result": str(result_path),
    }
    job_path.write_text(json.dumps(job, indent=1))
    run = QuantRun(model_key, variant.name, samples, "ok")
    usage_path = work_dir / f"{stem}.rusage.json"
    usage_path.unlink(missing_ok=True)
    worker = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(job_path)]
    command = [sys.executable, "-S", "-c", _LAUNCHER, str(usage_path), *worker]
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work_dir
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group: launcher and worker
            proc.wait()
            run.status = f"timeout after {timeout:g} s"
    run.process_s = time.perf_counter() - start
    if usage_path.is_file():
        run.peak_rss_mib = json.loads(usage_path.read_text())["maxrss_kib"] / 1024.0
    if run.status == "ok" and (proc.returncode != 0 or not result_path.is_file()):
        run.status = f"error: {_last_error_line(log_path)} (log: {log_path})"
    if run.status == "ok":
        result = json.loads(result_path.read_text())
        run.output = str(output)
        run.quant_s = result["quant_s"]
        if run.peak_rss_mib is not None:
            run.delta_rss_mib = run.peak_rss_mib - result["baseline_rss_mib"]
        run.detail = result.get("detail", {})
    logger.info(
        "  %-17s %s%s",
        variant.name,
        run.status,
        f"  {run.quant_s:.1f} s, peak RSS {run.peak_rss_mib:.0f} MiB" if run.status == "ok" else "",
    )
    return run


def model_size_mb(path: str | os.PathLike[str]) -> float:
    """Size of a model file plus any external-data files it references, in MB (10^6 bytes)."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    total += sum((path.parent / loc).stat().st_size for loc in locations)
    return total / 1e6


def loadable(models: Mapping[str, str], notes: list[str], key: str) -> dict[str, str]:
    """The models that onnxruntime opens at ``ORT_ENABLE_ALL``; the others are noted and dropped."""
    from onnxq.errors import OnnxqError
    from onnxq.runtime.session import make_session

    kept = {}
    for name, path in models.items():
        try:
            make_session(path, opt_level="all", threads=1)
        except OnnxqError as exc:
            notes.append(f"{key} {name}: {exc}")
            continue
        kept[name] = path
    return kept


def evaluate(
    bench: BenchModel, float_path: Path, candidates: Mapping[str, str], feeds: Sequence[Feed], threads: int
) -> dict[str, dict[str, float | None]]:
    """Accuracy of each candidate against the float model at ``ORT_ENABLE_ALL`` (deployed numerics)."""
    from onnxq.runtime.session import make_session, run
    from onnxq.validate.metrics import cosine_similarity, sqnr_db, top1_agreement

    def outputs(path: str | os.PathLike[str]) -> list[dict[str, np.ndarray]]:
        session = make_session(path, opt_level="all", threads=threads)
        names = [o.name for o in session.get_outputs()]
        return [dict(zip(names, run(session, feed), strict=True)) for feed in feeds]

    def main_rows(feed: Feed, value: np.ndarray) -> np.ndarray:
        if bench.token_mask is None:
            return value
        return value[feed[bench.token_mask].astype(bool)]  # [valid tokens, hidden]

    reference = outputs(float_path)
    metrics: dict[str, dict[str, float | None]] = {}
    for name, path in candidates.items():
        got = outputs(path)
        ref_main = [main_rows(f, r[bench.main_output]) for f, r in zip(feeds, reference, strict=True)]
        act_main = [main_rows(f, g[bench.main_output]) for f, g in zip(feeds, got, strict=True)]
        row: dict[str, float | None] = {
            "sqnr_db": sqnr_db(
                np.concatenate([r.ravel() for r in ref_main]), np.concatenate([a.ravel() for a in act_main])
            ),
            "cosine": float(
                np.mean([cosine_similarity(r, a) for r, a in zip(ref_main, act_main, strict=True)])
            ),
            "top1": None,
            "sentence_cosine": None,
        }
        if bench.classifier:
            row["top1"] = top1_agreement(np.concatenate(ref_main), np.concatenate(act_main))
        if bench.sentence_output is not None:
            out = bench.sentence_output
            row["sentence_cosine"] = float(
                np.mean(
                    [
                        cosine_similarity(r[out][i], g[out][i])
                        for r, g in zip(reference, got, strict=True)
                        for i in range(r[out].shape[0])
                    ]
                )
            )
        metrics[name] = row
    return metrics


def latency(
    models: Mapping[str, str | os.PathLike[str]],
    feed: Feed,
    *,
    threads: Sequence[int],
    runs: int,
    warmup: int,
    spin: bool = False,
) -> Latencies:
    """``(median ms, p90 ms)`` per thread count and model: :func:`onnxq.runtime.latency.measure_latency`
    (all models interleaved in rotating order, ``ORT_ENABLE_ALL``, no spin-waiting unless ``spin``)."""
    from onnxq.runtime.latency import measure_latency

    results: Latencies = {}
    for t in threads:
        timed = measure_latency(models, feed, threads=t, runs=runs, warmup=warmup, spin=spin)
        results[t] = {name: (r.median_ms, r.p90_ms) for name, r in timed.items()}
    return results


def _unstable(lat: Latencies, key: str, limit: float = 1.5) -> list[str]:
    """Notes for thread counts whose p90 is far above the median: the numbers there are noise-prone."""
    notes = []
    for t, by_model in lat.items():
        worst = max(p90 / median for median, p90 in by_model.values())
        if worst > limit:
            notes.append(
                f"{key}: latency at {t} thread(s) is unstable (p90/median up to {worst:.1f}); "
                "treat those ratios with care"
            )
    return notes


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    calib_models: tuple[str, ...]
    out_dir: Path
    calib: int
    eval: int
    runs: int
    warmup: int
    threads: tuple[int, ...]
    only_ort: bool
    calib_samples: int
    calib_timeout: float
    worker_timeout: float
    seq_len: int
    spin: bool = False


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def quantize_variants(
    bench: BenchModel,
    variants: Sequence[Variant],
    float_path: Path,
    feeds_path: Path | None,
    samples: int,
    work: Path,
    *,
    timeout: float,
    notes: list[str],
) -> tuple[dict[str, QuantRun], dict[str, str]]:
    """Quantize ``float_path`` with every variant, each in an isolated worker (:func:`run_isolated`).

    Returns the runs by variant name and the outputs that onnxruntime loads; failures, load errors
    and the quantizers' notes are added to ``notes``.
    """
    runs = {
        v.name: run_isolated(bench.key, v, float_path, feeds_path, samples, work, timeout=timeout)
        for v in variants
    }
    for run in runs.values():
        if run.status != "ok":
            notes.append(f"{bench.key} {run.variant}: {run.status}")
        elif "note" in run.detail:
            notes.append(f"{bench.key} ({run.variant.split('-')[0]}): {run.detail['note']}")
    ok = loadable(
        {name: run.output for name, run in runs.items() if run.output is not None}, notes, bench.key
    )
    return runs, ok


def quant_row(
    bench: BenchModel, name: str, float_path: Path, quant: QuantRun | None, evals: int
) -> dict[str, Any]:
    """The first columns of a result row: what a variant cost (``quant`` is ``None`` for float)."""
    path = float_path if quant is None else quant.output
    return {
        "model": bench.key,
        "variant": name,
        "status": "ok" if quant is None else quant.status,
        "calib_samples": None if quant is None else quant.samples,
        "eval_samples": evals,
        "quant_s": None if quant is None else quant.quant_s,
        "peak_rss_mib": None if quant is None else quant.peak_rss_mib,
        "delta_rss_mib": None if quant is None else quant.delta_rss_mib,
        "size_mb": model_size_mb(path) if path else None,
        "detail": {} if quant is None else quant.detail,
    }


NO_ACCURACY: dict[str, float | None] = {
    "sqnr_db": None,
    "cosine": None,
    "top1": None,
    "sentence_cosine": None,
}


def bench_model(bench: BenchModel, settings: Settings, notes: list[str]) -> list[dict[str, Any]]:
    """Quantize one model with every main variant; measure cost, size, latency and accuracy."""
    models_dir = settings.out_dir / "models"
    work = settings.out_dir / bench.key
    logger.info("%s: building / loading the float model", bench.key)
    float_path = model_zoo.build(bench.zoo, models_dir)
    calib = model_zoo.sample_feeds(bench.zoo, settings.calib, split="calib", seq_len=settings.seq_len)
    evals = model_zoo.sample_feeds(bench.zoo, settings.eval, split="eval", seq_len=settings.seq_len)
    feeds_path = save_feeds(calib, work / f"calib-{settings.calib}.npz")

    variants = [v for v in MAIN_VARIANTS if not (settings.only_ort and v.tool == "onnxq")]
    runs, ok = quantize_variants(
        bench,
        variants,
        float_path,
        feeds_path,
        settings.calib,
        work,
        timeout=settings.worker_timeout,
        notes=notes,
    )

    logger.info("%s: latency (%s threads, %d runs)", bench.key, settings.threads, settings.runs)
    lat = latency(
        {"float": str(float_path), **ok},
        evals[0],
        threads=settings.threads,
        runs=settings.runs,
        warmup=settings.warmup,
        spin=settings.spin,
    )
    notes.extend(_unstable(lat, bench.key))
    logger.info("%s: accuracy on %d evaluation samples", bench.key, len(evals))
    acc = evaluate(bench, float_path, ok, evals, threads=max(settings.threads))

    rows: list[dict[str, Any]] = []
    for name in ("float", *runs):
        row = quant_row(bench, name, float_path, runs.get(name), len(evals))
        for t in settings.threads:
            ms, p90 = lat[t].get(name, (None, None))
            row[f"ms_{t}t"] = ms
            row[f"p90_ms_{t}t"] = p90
            row[f"x_{t}t"] = lat[t]["float"][0] / ms if ms else None
        row.update(acc.get(name, NO_ACCURACY))
        rows.append(row)
    return rows


def calibration_cost(bench: BenchModel, settings: Settings, notes: list[str]) -> list[dict[str, Any]]:
    """Entropy / percentile calibration cost, onnxq against onnxruntime, with the same samples."""
    float_path = model_zoo.build(bench.zoo, settings.out_dir / "models")
    work = settings.out_dir / bench.key / "calibration"
    variants = [v for v in CALIB_VARIANTS if not (settings.only_ort and v.tool == "onnxq")]
    samples = settings.calib_samples
    runs: list[QuantRun] = []
    run_variants: list[Variant] = []
    while True:
        feeds = model_zoo.sample_feeds(bench.zoo, samples, split="calib", seq_len=settings.seq_len)
        feeds_path = save_feeds(feeds, work / f"calib-{samples}.npz")
        logger.info("%s: calibration cost with %d samples", bench.key, samples)
        done = [
            run_isolated(
                bench.key, variants[0], float_path, feeds_path, samples, work, timeout=settings.calib_timeout
            )
        ]
        if done[0].status.startswith("error"):
            done.append(
                run_isolated(
                    bench.key,
                    ORT_ENTROPY_FALLBACK,
                    float_path,
                    feeds_path,
                    samples,
                    work,
                    timeout=settings.calib_timeout,
                )
            )
        if done[-1].status.startswith("timeout") and samples > 1:
            notes.append(
                f"{bench.key}: {done[-1].variant} ran past {settings.calib_timeout:g} s with {samples} "
                f"samples; calibration methods compared with {samples // 2} samples instead"
            )
            samples //= 2
            continue
        run_variants = [variants[0], ORT_ENTROPY_FALLBACK][: len(done)] + variants[1:]
        runs = done + [
            run_isolated(bench.key, v, float_path, feeds_path, samples, work, timeout=settings.calib_timeout)
            for v in variants[1:]
        ]
        break
    if samples != settings.calib_samples:
        notes.append(f"{bench.key}: calibration-cost table uses {samples} samples for every method")
    ok = loadable({run.variant: run.output for run in runs if run.output is not None}, notes, bench.key)
    evals = model_zoo.sample_feeds(bench.zoo, settings.eval, split="eval", seq_len=settings.seq_len)
    acc = evaluate(bench, float_path, ok, evals, threads=max(settings.threads))
    rows = []
    for run, variant in zip(runs, run_variants, strict=True):
        if run.status != "ok":
            notes.append(f"{bench.key} {run.variant}: {run.status}")
        rows.append(
            {
                "model": bench.key,
                "tool": variant.tool,
                "method": variant.label,
                "status": run.status,
                "samples": run.samples,
                "quant_s": run.quant_s,
                "process_s": run.process_s,
                "peak_rss_mib": run.peak_rss_mib,
                "delta_rss_mib": run.delta_rss_mib,
                "detail": run.detail,
                **acc.get(run.variant, {}),
            }
        )
    return rows


def _short_status(status: str, width: int = 48) -> str:
    if status == "ok":
        return ""
    status = status.split(" (log: ")[0]
    return status if len(status) <= width else status[: width - 1] + "…"


def cost_columns(r: Mapping[str, Any]) -> dict[str, str]:
    """The first columns of a results row: which model and variant, and what quantizing it cost."""
    return {
        "model": r["model"],
        "variant": r["variant"],
        "quant s": _fmt(r["quant_s"], 2),
        "peak RSS MiB": _fmt(r["peak_rss_mib"], 0),
        "Δ RSS MiB": _fmt(r["delta_rss_mib"], 0),
        "size MB": _fmt(r["size_mb"], 2),
    }


def accuracy_columns(r: Mapping[str, Any]) -> dict[str, str]:
    """The last columns of a results row: accuracy against the float model."""
    return {
        "SQNR dB": _fmt(r["sqnr_db"], 1),
        "cosine": _fmt(r["cosine"], 5),
        "top-1": _fmt(r["top1"], 3),
        "sent. cos": _fmt(r["sentence_cosine"], 5),
    }


def main_table(rows: Sequence[Mapping[str, Any]], threads: Sequence[int]) -> str:
    from tabulate import tabulate

    table = []
    for r in rows:
        line = cost_columns(r)
        for t in threads:
            line[f"ms {t}t"] = _fmt(r[f"ms_{t}t"], 3)
            line[f"x {t}t"] = _fmt(r[f"x_{t}t"], 2)
        line.update(accuracy_columns(r))
        if any(row["status"] != "ok" for row in rows):
            line["status"] = _short_status(r["status"])
        table.append(line)
    return tabulate(table, headers="keys", disable_numparse=True)


def calib_table(rows: Sequence[Mapping[str, Any]]) -> str:
    from tabulate import tabulate

    failed = any(r["status"] != "ok" for r in rows)
    table = [
        {
            "model": r["model"],
            "tool": r["tool"],
            "method": r["method"],
            "samples": r["samples"],
            "quant s": _fmt(r["quant_s"], 2),
            "peak RSS MiB": _fmt(r["peak_rss_mib"], 0),
            "Δ RSS MiB": _fmt(r["delta_rss_mib"], 0),
            "SQNR dB": _fmt(r.get("sqnr_db"), 1),
            "cosine": _fmt(r.get("cosine"), 5),
            "sent. cos": _fmt(r.get("sentence_cosine"), 5),
            **({"status": _short_status(r["status"])} if failed else {}),
        }
        for r in rows
    ]
    return tabulate(table, headers="keys", disable_numparse=True)


def _environment() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        **{pkg: version(pkg) for pkg in ("onnxruntime", "onnx", "onnx-ir", "numpy", "torch", "transformers")},
    }


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Static quantization: onnxq vs onnxruntime.quantization (cost, size, latency, accuracy)."
    )
    parser.add_argument("--models", default=None, help=f"comma list of {', '.join(BENCH_MODELS)}")
    parser.add_argument("--out-dir", default="bench-out", type=Path)
    parser.add_argument("--calib", type=int, default=None, help="calibration samples (default 32)")
    parser.add_argument("--eval", type=int, default=None, help="evaluation samples (default 96)")
    parser.add_argument("--runs", type=int, default=None, help="timed latency runs per model (default 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per model (default 5)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts for latency")
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length (padded)")
    parser.add_argument(
        "--spin", action="store_true", help="let ORT worker threads spin-wait (its default) in latency runs"
    )
    parser.add_argument("--only-ort", action="store_true", help="skip onnxq (compare ORT with float only)")
    parser.add_argument(
        "--calib-models", default=None, help="models for the calibration-cost table (default cnn,minilm)"
    )
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help="samples for the calibration-cost table (default --calib)",
    )
    parser.add_argument("--no-calib-cost", action="store_true", help="skip the calibration-cost table")
    parser.add_argument(
        "--calib-timeout",
        type=float,
        default=600.0,
        help="seconds before ORT entropy is retried with half the samples",
    )
    parser.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds per quantization")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test settings (CNN only)")
    parser.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    models = _csv(args.models) if args.models else (("cnn",) if quick else ("cnn", "resnet18", "minilm"))
    if args.no_calib_cost:
        calib_models: tuple[str, ...] = ()
    elif args.calib_models is not None:
        calib_models = _csv(args.calib_models)
    else:
        calib_models = ("cnn",) if quick else ("cnn", "minilm")
    unknown = [m for m in (*models, *calib_models) if m not in BENCH_MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; expected {', '.join(BENCH_MODELS)}")
    calib = args.calib or (4 if quick else 32)
    return Settings(
        models=models,
        calib_models=calib_models,
        out_dir=args.out_dir,
        calib=calib,
        eval=args.eval or (4 if quick else 96),
        runs=args.runs or (5 if quick else 50),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 5),
        threads=tuple(int(t) for t in _csv(args.threads)),
        only_ort=args.only_ort,
        calib_samples=args.calib_samples or calib,
        calib_timeout=args.calib_timeout,
        worker_timeout=args.worker_timeout,
        seq_len=args.seq_len,
        spin=args.spin,
    )


def write_outputs(
    settings: Any, stem: str, text: list[str], notes: list[str], results: dict[str, Any]
) -> None:
    """Print the tables and notes; write them to ``<out_dir>/<stem>.txt`` and, with ``results`` and the
    settings (a dataclass with ``out_dir``), to ``<stem>.json``."""
    notes = list(dict.fromkeys(notes))  # the same note from several variants once
    if notes:
        text = [*text, "", "notes:", *(f"- {note}" for note in notes)]
    output = "\n".join(text)
    print(output)
    (settings.out_dir / f"{stem}.txt").write_text(output + "\n")
    report = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
        },
        "environment": _environment(),
        **results,
        "notes": notes,
    }
    (settings.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    logger.info("wrote %s", settings.out_dir / f"{stem}.json")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        logging.basicConfig(level=logging.WARNING)
        return _worker(args._worker)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    settings = settings_from(args)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for key in settings.models:
        rows.extend(bench_model(BENCH_MODELS[key], settings, notes))
    calib_rows: list[dict[str, Any]] = []
    for key in settings.calib_models:
        calib_rows.extend(calibration_cost(BENCH_MODELS[key], settings, notes))

    header = (
        f"static quantization: calibration {settings.calib} samples, evaluation {settings.eval} "
        f"(disjoint), latency median of {settings.runs} interleaved runs at ORT_ENABLE_ALL, batch 1, "
        f"thread spinning {'on' if settings.spin else 'off'}"
        + (f", MiniLM seq {settings.seq_len}" if "minilm" in settings.models else "")
        + "; x = float ms / model ms (>1 faster); accuracy vs float at ORT_ENABLE_ALL"
    )
    text = [header, "", main_table(rows, settings.threads)]
    if calib_rows:
        text += [
            "",
            "calibration cost (uint8 activations; same samples for every method of a model):",
            "",
            calib_table(calib_rows),
        ]
    write_outputs(
        settings,
        "bench_static",
        text,
        notes,
        {"results": rows, "calibration_cost": calib_rows, "total_s": time.perf_counter() - started},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
