"""The quantization report: what was done, what it cost and what it changed, as data and as tables.

Rows are plain data (``to_dict`` / ``to_json``) so that scripts can use them; ``format_table`` renders
the same data with tabulate for people.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

from onnxq.config import TIMING_NOISE
from onnxq.declines import Decline, group_declines

__all__ = ["RESIDUAL_SUMS", "SILU_ISLANDS", "AccuracyRow", "LatencyRow", "QuantReport", "guard_line"]


@dataclass
class AccuracyRow:
    """Float vs quantized on one model output."""

    output: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    top1: float | None
    samples: int
    #: Feeds on which the output's length differed from float's (compared zero-padded).
    length_changes: int = 0
    #: Whether padded positions (attention mask 0) were left out of this per-token output's figures.
    padding_excluded: bool = False


@dataclass
class LatencyRow:
    """Median latency of float and quantized model at one thread count (interleaved runs)."""

    threads: int
    float_ms: float
    quantized_ms: float
    runs: int

    @property
    def speedup(self) -> float:
        return self.float_ms / self.quantized_ms if self.quantized_ms > 0 else math.nan


#: Below either bound on any output, the default run's loss is "large": the report and stderr say so
#: and name the ``--target`` command that recovers it (at 20 dB the error is a tenth of the signal's
#: amplitude; a cosine under 0.99 moves embeddings and logits visibly).
LARGE_LOSS_SQNR_DB = 20.0
LARGE_LOSS_COSINE = 0.99

#: The latency guard's alternative forms, by the labels its report entry names them with
#: (``forms_for_accuracy``): defined here so the guard and the row that renders it share them.
RESIDUAL_SUMS = "residual Adds as Sum"
SILU_ISLANDS = "SiLU as QuickGelu"


@dataclass
class QuantReport:
    """Everything onnxq knows about one quantization run."""

    model: str
    output: str | None = None
    #: ``static``, ``dynamic``, or ``requantize`` (the input already held Q/DQ).
    mode: str = "static"
    scheme: dict[str, Any] = field(default_factory=dict)
    version_notes: list[str] = field(default_factory=list)
    preprocess_notes: list[str] = field(default_factory=list)
    batchnorms_folded: int = 0
    affine_folded: int = 0
    #: Conv → Relu → Conv pairs rescaled by cross-layer equalization (``--equalize``).
    equalized_pairs: int = 0
    #: The tensors outlier smoothing divided per channel (their readers' weights took the factors).
    smoothed_tensors: list[str] = field(default_factory=list)
    canonicalized: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    quantized_op_types: dict[str, int] = field(default_factory=dict)
    activations_absorbed: int = 0
    float_op_types: dict[str, int] = field(default_factory=dict)
    #: What each stage left as it was, and why (typed: stage, reason code, message, node).
    declines: list[Decline] = field(default_factory=list)
    lowered_op_types: dict[str, int] = field(default_factory=dict)
    subgraph_nodes: int = 0
    #: Per If/Loop/Scan body (``"<If If_0>.then_branch"``): [nodes quantized, nodes in the body].
    bodies: dict[str, list[int]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    size_float_bytes: int = 0
    size_quantized_bytes: int = 0
    accuracy: list[AccuracyRow] = field(default_factory=list)
    accuracy_opt_level: str = ""
    latency: list[LatencyRow] = field(default_factory=list)
    provider: str = "CPUExecutionProvider"
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Per-layer numeric suite rows (``--layers``), worst first.
    layers: list[dict[str, Any]] = field(default_factory=list)
    #: The accuracy-budget search (``--target``): target, scores, layers kept float, cost.
    budget: dict[str, Any] = field(default_factory=dict)
    #: The latency guard: candidates timed, kinds of layers kept float, gain (empty when it did not run).
    latency_guard: dict[str, Any] = field(default_factory=dict)
    #: The input model's producer (``"pytorch 2.13.0"``), kept in the output's provenance.
    source_producer: str = ""
    #: The configuration as data (what the output file records in its metadata).
    settings: dict[str, Any] = field(default_factory=dict)
    #: ``"onnxruntime 1.32.0 CPUExecutionProvider"`` once validated.
    validated_with: str = ""

    @property
    def requantized(self) -> bool:
        """The input already held Q/DQ: accuracy is against that input, not against a float model."""
        return self.mode == "requantize"

    @property
    def slower_threads(self) -> list[int]:
        """Thread counts at which the quantized model measured slower than the input.

        By more than :data:`~onnxq.config.TIMING_NOISE`: two runs of one model differ by that much (a
        0.99x "slower" is the timing's noise, not a finding).
        """
        return [row.threads for row in self.latency if row.speedup < 1.0 - TIMING_NOISE]

    @property
    def large_loss(self) -> list[AccuracyRow]:
        """Outputs below :data:`LARGE_LOSS_SQNR_DB` or :data:`LARGE_LOSS_COSINE` against the float model.

        None for an already-quantized input (compared with itself, not with a float model).
        """
        if self.requantized:
            return []
        return [
            row for row in self.accuracy if row.sqnr_db < LARGE_LOSS_SQNR_DB or row.cosine < LARGE_LOSS_COSINE
        ]

    def recovery_target(self) -> str:
        """The ``--target`` that asks for what the large-loss outputs miss (cosine first)."""
        if any(row.cosine < LARGE_LOSS_COSINE for row in self.large_loss):
            return f"cosine>={LARGE_LOSS_COSINE:g}"
        return f"sqnr>={LARGE_LOSS_SQNR_DB:g}"

    @property
    def nodes_quantized(self) -> int:
        return sum(self.quantized_op_types.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodes_quantized"] = self.nodes_quantized
        data["slower_than_input_at_threads"] = self.slower_threads
        data["large_loss_outputs"] = [row.output for row in self.large_loss]
        for row, raw in zip(self.latency, data["latency"], strict=True):
            raw["speedup"] = row.speedup
        finite: dict[str, Any] = _finite(data)
        return finite

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format_table(self) -> str:
        """Tables for the terminal: summary, accuracy per output, latency per thread count."""
        parts = [tabulate(self._summary_rows(), tablefmt="simple_outline", disable_numparse=True)]
        if self.accuracy:
            rows = [
                [
                    a.output,
                    _fmt(a.sqnr_db, ".1f"),
                    _fmt(a.cosine, ".5f"),
                    _fmt(a.max_abs_error, ".4g"),
                    "-" if a.top1 is None else f"{100 * a.top1:.1f}%",
                    a.samples,
                ]
                for a in self.accuracy
            ]
            reference = (
                "the input model (already quantized, not a float reference)" if self.requantized else "float"
            )
            parts.append(
                f"Accuracy vs {reference} ({self.provider}, {self.accuracy_opt_level}):\n"
                + tabulate(
                    rows,
                    headers=["output", "SQNR dB", "cosine", "max |err|", "top-1 agree", "samples"],
                    tablefmt="simple_outline",
                    disable_numparse=True,
                    colalign=("left", "right", "right", "right", "right", "right"),
                )
            )
            parts.extend(
                f"output {row.output!r}: its length differs from the reference's on "
                f"{row.length_changes} of {row.samples} feeds (a data-dependent length: a decoder "
                "that stopped at another step, another number of detections); compared zero-padded"
                for row in self.accuracy
                if row.length_changes
            )
            padded = [repr(row.output) for row in self.accuracy if row.padding_excluded]
            if padded:
                parts.append(
                    f"{', '.join(padded)}: compared on real tokens only (positions where the feed's "
                    "attention mask is 0 are padding, which nothing reads)"
                )
            if self.large_loss:
                names = ", ".join(repr(row.output) for row in self.large_loss)
                parts.append(
                    f"WARNING: large accuracy loss on {names} (below {LARGE_LOSS_SQNR_DB:g} dB SQNR or "
                    f"{LARGE_LOSS_COSINE:g} cosine): --target '{self.recovery_target()}' keeps the most "
                    "sensitive layers float until it holds"
                )
        if self.latency:
            rows = [
                [r.threads, f"{r.float_ms:.3f}", f"{r.quantized_ms:.3f}", f"{r.speedup:.2f}x", r.runs]
                for r in self.latency
            ]
            reference = "input ms" if self.requantized else "float ms"
            parts.append(
                "Latency (ORT_ENABLE_ALL, interleaved runs, median):\n"
                + tabulate(
                    rows,
                    headers=["threads", reference, "quantized ms", "speed-up", "runs"],
                    tablefmt="simple_outline",
                    disable_numparse=True,
                    colalign=("right",) * 5,
                )
            )
            if self.slower_threads:
                threads = ", ".join(str(t) for t in self.slower_threads)
                parts.append(
                    f"WARNING: the quantized model is SLOWER than the input at {threads} thread(s): "
                    "it does not pay to deploy it on this machine"
                )
        sections = (
            ("Preprocessing and normalization", ("fold", "normalize")),
            ("Not quantized", ("plan", "calibrate", "dynamic")),
            ("Not lowered", ("lower",)),
        )
        for title, stages in sections:
            lines = group_declines(d for d in self.declines if d.stage in stages)
            if stages[0] == "fold":
                lines = [*self.preprocess_notes, *lines]
            if lines:
                parts.append(f"{title}:\n" + "\n".join(f"  - {line}" for line in _limited(lines)))
        return "\n".join(parts)

    def _summary_rows(self) -> list[list[str]]:
        quantized = ", ".join(f"{op} {n}" for op, n in sorted(self.quantized_op_types.items()))
        float_ops = ", ".join(f"{op} {n}" for op, n in sorted(self.float_op_types.items()))
        rows = [["model", self.model]]
        if self.output:
            rows.append(["output", self.output])
        rows.append(["scheme", ", ".join(f"{k}={v}" for k, v in self.scheme.items())])
        if self.calibration:
            c = self.calibration
            rows.append(
                [
                    "calibration",
                    f"{c.get('method')} on {c.get('samples')} samples ({c.get('runs')} runs, "
                    f"{c.get('seconds', 0.0):.2f} s)" + ("  RANDOM DATA" if c.get("random") else ""),
                ]
            )
        rows.append(["size", f"{_mb(self.size_float_bytes)} -> {_mb(self.size_quantized_bytes)}"])
        if self.requantized:
            rows.append(["Q/DQ nodes", f"{quantized or 'none'} (already in the input; no calibration)"])
        else:
            rows.append(
                [
                    "nodes quantized",
                    (
                        f"{self.nodes_quantized} of {self.nodes_after} ({quantized or 'none'}); "
                        f"{self.activations_absorbed} activations fused"
                    ),
                ]
            )
            rows.append(["stayed float", float_ops or "none"])
        if self.lowered_op_types:
            lowered = ", ".join(f"{op} {n}" for op, n in sorted(self.lowered_op_types.items()))
            rows.append(["lowered", lowered])
        folded = [
            f"{count} {what} folded"
            for count, what in (
                (self.batchnorms_folded, "BatchNorm"),
                (self.affine_folded, "per-channel Mul/Add/Pad"),
            )
            if count
        ]
        folded += [
            f"{count} {op}" if "→" in op else f"{count} decomposed {op} made one op"
            for op, count in sorted(self.canonicalized.items())
        ]
        if self.equalized_pairs:
            folded.append(f"{self.equalized_pairs} Conv pairs equalized")
        if folded:
            rows.append(["preprocess", ", ".join(folded)])
        quantized_bodies = [f"{body} {q} of {n}" for body, (q, n) in self.bodies.items() if q]
        if quantized_bodies:
            rows.append(["subgraphs", "nodes quantized in " + ", ".join(_limited(quantized_bodies, 6))])
        if self.subgraph_nodes:
            rows.append(["subgraphs", f"{self.subgraph_nodes} nodes inside If/Loop/Scan bodies left float"])
        rows.extend(["versions", note] for note in self.version_notes)
        if self.budget:
            b = self.budget
            kept = ", ".join(b.get("kept_float", [])) or "none"
            rows.append(
                [
                    "accuracy budget",
                    (
                        f"{b.get('target')}: {b.get('score_before', float('nan')):.4g} -> "
                        f"{b.get('score_after', float('nan')):.4g} ({'met' if b.get('met') else 'NOT met'}); "
                        + (f"applied to every layer: {b['fix']}; " if b.get("fix") else "")
                        + f"kept float: {kept}; {b.get('evaluations')} evaluations in "
                        f"{b.get('search_seconds', 0.0):.1f} s (one full evaluation "
                        f"{b.get('full_evaluation_seconds', 0.0):.2f} s"
                        + (
                            f"; layers ranked by keeping each of {b['measured_anchors']} float alone "
                            f"on {b.get('measured_batches', 0)} batch(es), "
                            f"{b.get('estimate_seconds', 0.0):.1f} s"
                            if b.get("measured_anchors")
                            else ""
                        )
                        + ")"
                        + (f"; {b['speed']}" if b.get("speed") else "")
                    ),
                ]
            )
        if self.latency_guard:
            line = guard_line(self.latency_guard)
            if self.budget.get("float_returned"):
                line += "; superseded: the accuracy target returned the float model"
            rows.append(["latency guard", line])
        return rows


def guard_line(guard: dict[str, Any]) -> str:
    """What the latency guard chose, in one line, from its report entry (``GuardOutcome.as_dict``)."""
    ms = guard.get("latency_ms", {})
    given = f"input {ms['input']:.3g} ms, " if "input" in ms else ""
    preprocessed = f"float {ms['float']:.3g} ms, " if "float" in ms else ""
    timed = f"{given}{preprocessed}int8 {ms.get('quantized', math.nan):.3g} ms"
    threads, runs, seconds = guard.get("threads", 1), guard.get("runs", 0), guard.get("seconds", 0.0)
    where = f"{threads} thread(s), {runs} rounds, {seconds:.1f} s"
    if "default_threads_ratio" in guard:
        where += f"; int8 {guard['default_threads_ratio']:.2f}x float at ONNX Runtime's default threads"
    if guard.get("all_float"):
        returned = (
            "the input model as it was" if guard.get("chosen") == "input" else "the preprocessed float model"
        )
        if guard.get("lossy_front_end"):
            lost = guard.get("sqnr_db", {}).get("quantized", math.nan)
            verdict = (
                f"a log-spectrum front end whose quiet bins int8 rounds to the log's floor ({lost:.1f} dB "
                "output SQNR on the guard's feed)"
            )
        elif guard.get("slower_at_default_threads"):
            verdict = "int8 slower than float at the default thread count"
        else:
            verdict = "no int8 variant beat float"
        return f"{verdict} ({timed}; {where}): every layer kept float, {returned} written"
    reverted = guard.get("reverted", {})
    sums, islands = guard.get("residual_sums", 0), guard.get("silu_islands", 0)
    for_accuracy = guard.get("forms_for_accuracy", [])
    sums_why = "as fast, more accurate" if RESIDUAL_SUMS in for_accuracy else "unfused: faster here"
    unfused = f"; {sums} residual Add(s) before LayerNorm as Sum ({sums_why})" if sums else ""
    if islands:
        islands_why = (
            "as fast here as QLinearSigmoid + QLinearMul, more accurate"
            if SILU_ISLANDS in for_accuracy
            else "faster here than QLinearSigmoid + QLinearMul"
        )
        unfused += f"; {islands} SiLU(s) as float QuickGelu ({islands_why})"
    if not reverted:
        chosen_ms = ms.get(guard.get("chosen", ""), math.nan)
        tail = f" -> {chosen_ms:.3g} ms" if sums or islands else ""
        return f"every kind of layer is faster in int8 ({timed}{tail}; {where}){unfused}"
    kinds = ", ".join(f"{len(names)} {kind}" for kind, names in reverted.items())
    chosen = ms.get(guard.get("chosen", ""), math.nan)
    if guard.get("for_accuracy"):
        sqnr = guard.get("sqnr_db", {})
        gain = sqnr.get(guard.get("chosen", ""), math.nan) - sqnr.get("quantized", math.nan)
        why = f"as fast in int8 here, {gain:.1f} dB more accurate float"
    else:
        why = "int8 slower here"
    return f"kept float: {kinds} ({why}); {timed} -> {chosen:.3g} ms ({where}){unfused}"


def _limited(lines: list[str], limit: int = 12) -> list[str]:
    """At most ``limit`` lines, and a pointer to the JSON report for the rest."""
    if len(lines) > limit:
        return [*lines[:limit], f"... and {len(lines) - limit} more (see --report-json)"]
    return lines


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _fmt(value: float, spec: str) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "-"
    return format(value, spec)


def _finite(data: Any) -> Any:
    """JSON has no inf/nan: write them as strings so that the file stays standard JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data
