"""The latency guard: keep float the kinds of layers whose int8 version is slower on this machine.

Integer kernels do not win everywhere. Depthwise and grouped convolutions have little arithmetic to
save, small layers pay more for their QuantizeLinear/DequantizeLinear than the kernel saves, and ONNX
Runtime's NHWC layout for quantized convolutions adds Transposes wherever an op between them needs
NCHW (ShuffleNet's channel shuffle). Which of these loses depends on the CPU, so the guard measures,
on this machine, instead of guessing:

1. The quantized anchors are grouped into *kinds* by what decides their speed (:func:`anchor_kinds`):
   depthwise / grouped / narrow (at most :data:`NARROW_CHANNELS` input channels per group) / 1×1 /
   spatial Conv, ConvTranspose, MatMul with a constant weight, MatMul of two activations, Gemm;
   anchors with little work (fewer than :data:`SMALL_MACS` multiply-adds per sample, from the inferred
   shapes) form "small" kinds of their own. The LSTMs static mode runs as DynamicQuantizeLSTM are one
   more kind (:data:`DYNAMIC_LSTM`): over long sequences they win 4×, over one-step calls they lose.
   Anchors whose output reaches a ``Log`` through linear and magnitude ops (a log-spectrum front end's
   STFT Conv or filterbank MatMul, :mod:`onnxq.plan.log_front_end`) are a kind of their own too
   (:data:`LOG_FRONT_END`), whatever their speed: their int8 rounding may erase the quiet bins the
   ``Log`` spreads out, and step 4's tie-breaker on accuracy keeps them float when that costs no time
   (DNSMOS: output SQNR 11.3 → 44.2 dB at the same latency).
2. The user's float model as given (or, without it, the preprocessed float model) and the fully
   quantized model are timed together, interleaved, on one calibration sample.
3. Each *suspect* kind — every kind but the large, wide Conv/1×1 Conv/MatMul/Gemm of
   :data:`TRUSTED_KINDS`, whose integer kernels win by a wide margin on x86 — gets one variant that
   keeps it float (a rewrite of the calibrated model, no calibration), timed against the quantized
   model. For a fast model (under :data:`MERGED_BLOCK_MAX_RUN_S` a run) whose sessions' weights
   together stay under :data:`MERGED_BLOCK_BYTES`, the variants race in step 2's block, each leaving
   it once its decision is clear (the quantized model's runs serve them all: the guard took 1.1 s
   instead of 1.8 s on the zoo's orientation classifier); other models time one variant at a time,
   three sessions open at most, so memory stays bounded.
4. Every kind whose variant is faster than the quantized model by more than ``min_gain`` is kept float;
   when several are, their combination is timed too (reverting two kinds may cost more than each alone
   saves). The kinds whose variant was faster by less than that (each within the noise) are timed once
   more, together with the fastest candidate's kinds: their gains may add up, a layer between two float
   ones saving its Q/DQ too. The fastest candidate is taken. Candidates within ``min_gain`` of it cannot
   be told apart by their timings; among those, one whose output is clearly more accurate on the same
   feed (:data:`ACCURACY_TIE_DB`; the warm-up runs give the outputs for free) is taken instead. Where
   kinds are kept float for speed and the model has a log front end, the union of those kinds and the
   front end is timed too and goes through the same tie-breaker (the front end's own variant was timed
   with them int8). A choice below the report's large-loss SQNR on the guard's feed has the most
   accurate candidate above it timed once more when it measured at most :data:`CONFIRM_RATIO` times as
   slow, and the tie-breaker decides on that second timing: one noisy block turned DNSMOS's 38.6 dB
   front-end-float model into its 5.2 dB int8 one.
5. Where the chosen model has residual Adds feeding LayerNormalization, the same model with those
   Adds written as ``Sum`` (:mod:`onnxq.rewrite.sum_form`: ONNX Runtime then does not fuse them
   into SkipLayerNormalization, which some releases run several times slower) is timed too, and kept
   when it is faster by more than ``min_gain``.
   Where it runs SiLU (``x · Sigmoid(x)``) as QLinearSigmoid + QLinearMul, the same model with each
   written as one float ``QuickGelu`` between a DequantizeLinear and a QuantizeLinear
   (:mod:`onnxq.rewrite.silu_island`) is timed too, and kept when it is faster by more than
   ``min_gain`` (YOLOv8n 5.34 → 4.91 ms, EfficientNet-B0 6.59 → 5.85 ms here). A form within
   ``min_gain`` of the chosen model's latency is kept when it is clearly more accurate on the guard's
   feed (:data:`ACCURACY_TIE_DB`), as in step 4.
6. The preprocessed float model (BatchNorm folded, activations canonicalized, outlier smoothing's
   divisors: these serve quantization and may cost in float, 4 % on MobileViT, or save, 22 % on the
   zoo's PP-OCR classifier) becomes the float model to beat when it is faster than the input by more
   than ``min_gain``. Where the variants race in step 2's block, it races there too; elsewhere it is
   timed in a block of its own only when the chosen model is not clearly faster than the input (above
   :data:`PREPROCESSED_CHECK` of its latency). The PP-OCR classifier's best int8 variant was 0.79x its
   input and its preprocessed float model 0.78x: below that bound, so it was shipped int8 at 0.84x.
7. If the chosen model is not faster than the float model to beat by more than ``min_gain`` (a gain
   within the timings' noise is not worth the quantization error), every anchor is kept float and that
   float model is the output (the input as it was, or the preprocessed one); the report says why.
   So is a model whose every anchor is in the :data:`LOG_FRONT_END` kind (a log-spectrum front end and
   nothing else) when its int8 output is below the report's large-loss bound on the guard's feed. The
   output is never slower than the input by more than the timings' noise.
8. A chosen int8 model that gains little (above :data:`DEFAULT_THREADS_CHECK` of the float model's
   latency) is timed against that float model once more at ONNX Runtime's default thread count, on a
   machine with more than one core: what a session opened without options runs. Int8's gain shrinks
   with threads on small models; one slower there by more than ``min_gain`` is not written, the float
   model is.

In a timing block, a candidate stops running as soon as its round-by-round ratio to the quantized model
is clearly on one side of the threshold it is judged by (a few rounds for a 20 % difference); the block
ends at the latest after ``budget_s`` per candidate (at least ``min_runs`` rounds, at most
``max_runs``): the guard costs a handful of inferences per candidate, not one run per layer, and
spends its rounds on the close calls.

The outcome (:class:`GuardOutcome`) names the kinds and nodes reverted and the measured latencies, so
the report can show what the guard changed and what it gained. Timings are medians of interleaved
runs at ``threads`` intra-op threads; they depend on the machine, so two runs may choose differently
when two candidates are within noise of each other.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.config import LatencyGuardConfig
from onnxq.graph import DEFAULT_DOMAINS, attr_int, const_array, initializer_bytes
from onnxq.load.files import load_model
from onnxq.plan.log_front_end import log_downstream
from onnxq.report import LARGE_LOSS_SQNR_DB, RESIDUAL_SUMS, SILU_ISLANDS
from onnxq.rewrite.silu_island import integer_silus, write_silu_islands
from onnxq.rewrite.sum_form import residual_adds, write_residual_adds_as_sum
from onnxq.runtime.latency import time_sessions
from onnxq.runtime.session import ModelSource, make_session, open_model, run
from onnxq.tuning.interfaces import RequantizableState
from onnxq.validate.metrics import worst_sqnr_db

__all__ = [
    "DYNAMIC_LSTM",
    "LOG_FRONT_END",
    "NARROW_CHANNELS",
    "RESIDUAL_SUMS",
    "SILU_ISLANDS",
    "SMALL_MACS",
    "TRUSTED_KINDS",
    "GuardOutcome",
    "anchor_kinds",
    "anchor_macs",
    "dynamic_lstms",
    "guard_latency",
    "load_input_model",
]

logger = logging.getLogger(__name__)

#: Anchors with fewer multiply-adds per sample than this are "small": their Q/DQ may cost more than
#: the integer kernel saves (1×1 Conv of 64 → 64 channels on 16×16 pixels is ~1M).
SMALL_MACS = 1 << 18

#: Conv with at most this many input channels per group (a network's first layer on RGB input) is
#: "narrow": the integer kernel has little to reduce over.
NARROW_CHANNELS = 4

#: Kinds whose integer kernels win by a wide margin on x86 (large, wide convolutions and products with
#: a constant weight): not timed one by one; the float-versus-quantized timing still covers them.
TRUSTED_KINDS = ("Conv", "1x1 Conv", "MatMul", "Gemm")

_FLOAT = "float"
#: The user's model as given: the float baseline when the caller passes it.
_INPUT = "input"
_QUANTIZED = "quantized"


@dataclass
class GuardOutcome:
    """What the latency guard measured and decided.

    ``latency_ms`` holds the median latency of every candidate timed (``input``, the preprocessed
    ``float`` model, ``quantized``, one ``keep <kind> float`` per kind, and the combination when one
    was tried); ``reverted`` maps each kind kept float to its nodes; ``all_float`` is set when no
    quantized candidate beat the faster float model, and ``chosen`` then says which one is returned.
    """

    model: ir.Model
    threads: int
    runs: int
    kinds: dict[str, list[str]]
    latency_ms: dict[str, float]
    reverted: dict[str, list[str]] = field(default_factory=dict)
    #: Output SQNR against the float model on the guard's feed, per candidate (the tie-breaker).
    sqnr_db: dict[str, float] = field(default_factory=dict)
    #: Set when the choice was made for accuracy among candidates the timings could not tell apart.
    for_accuracy: bool = False
    #: Residual Adds written as ``Sum`` in the chosen model (0: the fused form was as fast or faster).
    residual_sums: int = 0
    #: SiLUs written as QuickGelu float islands in the chosen model (0: the integer form was as fast).
    silu_islands: int = 0
    #: The alternative forms (step 5) taken for accuracy, as fast as the chosen model but more accurate.
    forms_for_accuracy: list[str] = field(default_factory=list)
    all_float: bool = False
    chosen: str = _QUANTIZED
    seconds: float = 0.0
    #: The chosen int8 model's latency over the float model's at ONNX Runtime's default thread count,
    #: when that was timed (:data:`DEFAULT_THREADS_CHECK`); NaN when it was not.
    default_threads_ratio: float = math.nan
    #: Set when that ratio made the guard keep every layer float.
    slower_at_default_threads: bool = False
    #: Set when the model is a log-spectrum front end only and int8 lost its output (below the report's
    #: large-loss bound on the guard's feed): every layer is kept float.
    lossy_front_end: bool = False

    @property
    def kept_float(self) -> list[str]:
        """Every anchor the guard kept float."""
        return sorted(name for names in self.reverted.values() for name in names)

    @property
    def gain(self) -> float:
        """Latency of the fully quantized model over that of the chosen one (1.0: nothing changed)."""
        chosen = self.latency_ms.get(self.chosen, math.nan)
        return self.latency_ms.get(_QUANTIZED, math.nan) / chosen if chosen else math.nan

    @property
    def speedup(self) -> float:
        """Input latency over the chosen model's (above 1: the output is faster than the input)."""
        chosen = self.latency_ms.get(self.chosen, math.nan)
        given = self.latency_ms.get(_INPUT, self.latency_ms.get(_FLOAT, math.nan))
        return given / chosen if chosen else math.nan

    @property
    def wrote_input(self) -> bool:
        """Whether the returned model is the user's own input, as it came."""
        return self.all_float and self.chosen == _INPUT

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form for the report."""
        return {
            "threads": self.threads,
            "runs": self.runs,
            "latency_ms": {k: round(v, 4) for k, v in self.latency_ms.items()},
            "sqnr_db": {k: round(v, 2) for k, v in self.sqnr_db.items() if math.isfinite(v)},
            "kinds": {k: len(v) for k, v in self.kinds.items()},
            "reverted": {k: sorted(v) for k, v in self.reverted.items()},
            "all_float": self.all_float,
            **({"lossy_front_end": True} if self.lossy_front_end else {}),
            "chosen": self.chosen,
            "for_accuracy": self.for_accuracy,
            "residual_sums": self.residual_sums,
            "silu_islands": self.silu_islands,
            **({"forms_for_accuracy": list(self.forms_for_accuracy)} if self.forms_for_accuracy else {}),
            "gain": round(self.gain, 4),
            "speedup_vs_float": round(self.speedup, 4),
            "seconds": round(self.seconds, 3),
            **(
                {
                    "default_threads_ratio": round(self.default_threads_ratio, 4),
                    "slower_at_default_threads": self.slower_at_default_threads,
                }
                if math.isfinite(self.default_threads_ratio)
                else {}
            ),
        }


def _dims(value: ir.Value | None) -> list[int] | None:
    """The value's shape, a symbolic batch axis counted as 1 (work per sample).

    ``None`` when another axis is unknown: a '?' image size may be large, so such a layer is never
    called small.
    """
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)
    if dims and not isinstance(dims[0], int):
        dims[0] = 1
    known = [d for d in dims if isinstance(d, int)]
    return known if len(known) == len(dims) else None


def anchor_macs(node: ir.Node) -> int | None:
    """Multiply-adds per sample of an anchor, from inferred shapes; ``None`` when a shape is unknown."""
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type == "LSTM":
        return _lstm_macs(node, weight)
    out = _dims(node.outputs[0])
    if out is None:
        return None
    if node.op_type == "Conv" and weight is not None:
        return int(np.prod(out)) * int(np.prod(weight.shape[1:]))
    if node.op_type == "ConvTranspose" and weight is not None:
        source = _dims(node.inputs[0])
        return None if source is None else int(np.prod(source)) * int(np.prod(weight.shape[1:]))
    reduced = _dims(node.inputs[0])
    if reduced is None or not reduced:
        return None
    inner = reduced[-1]
    if node.op_type == "Gemm" and attr_int(node, "transA", 0) and len(reduced) == 2:
        inner = reduced[0]
    return int(np.prod(out)) * inner


#: The kind of the LSTMs static mode runs as ``com.microsoft.DynamicQuantizeLSTM``: 4× faster than float
#: over ddddocr's long sequences, slower over silero VAD's one-step calls (0.054 vs 0.048 ms a call).
DYNAMIC_LSTM = "dynamic LSTM"

#: The kind of the anchors in front of a ``Log`` (:mod:`onnxq.plan.log_front_end`): whatever their
#: speed, their int8 version may erase a log spectrum's quiet bins, so they are timed as a kind of their
#: own and the tie-breaker on accuracy (step 4) decides.
LOG_FRONT_END = "front end of a Log"


def _lstm_macs(node: ir.Node, weight: np.ndarray | None) -> int | None:
    """An LSTM's multiply-adds: per time step and batch row, ``4H·(I + H)`` per direction.

    Its first axis is the sequence (``layout = 0``), not the batch, so an unknown length gives ``None``.
    """
    x = node.inputs[0]
    if weight is None or weight.ndim != 3 or x is None or x.shape is None:
        return None
    dims = list(x.shape)
    steps = (dims[1] if attr_int(node, "layout", 0) else dims[0]) if len(dims) == 3 else None
    if not isinstance(steps, int):
        return None
    directions, gates, inputs = weight.shape
    return int(steps) * int(directions) * int(gates) * (int(inputs) + int(gates) // 4)


def _kind(node: ir.Node) -> str:
    """What decides the speed of an anchor's integer kernel (see the module docstring)."""
    op = node.op_type
    if op == "LSTM":
        return DYNAMIC_LSTM
    if log_downstream(node) is not None:
        return LOG_FRONT_END
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if op == "Conv" and weight is not None:
        group = attr_int(node, "group", 1)
        if group > 1 and weight.shape[1] == 1:
            return "depthwise Conv"
        if group > 1:
            return "grouped Conv"
        if weight.shape[1] <= NARROW_CHANNELS:
            return "narrow Conv"
        return "1x1 Conv" if all(k == 1 for k in weight.shape[2:]) else "Conv"
    if op == "MatMul":
        return "MatMul" if weight is not None else "MatMul of activations"
    return op


def dynamic_lstms(state: RequantizableState) -> list[str]:
    """The LSTM nodes (any graph) that static quantization writes as DynamicQuantizeLSTM."""
    if not state.config.dynamic.lstm or not state.dynamic_ops.get("LSTM"):
        return []
    excluded = set(state.config.exclude_nodes)
    return [
        node.name or ""
        for node in state.float_model.graph.all_nodes()
        if node.op_type == "LSTM" and node.domain in DEFAULT_DOMAINS and node.name not in excluded
    ]


def anchor_kinds(model: ir.Model, anchors: Iterable[str]) -> dict[str, list[str]]:
    """The named anchors of ``model`` (the float model) grouped by kind, kinds in first-seen order.

    If/Loop/Scan bodies included (silero VAD's network lives in an If).
    """
    wanted = set(anchors)
    kinds: dict[str, list[str]] = {}
    for node in model.graph.all_nodes():
        if node.name not in wanted:
            continue
        kind = _kind(node)
        macs = anchor_macs(node)
        if kind not in (LOG_FRONT_END, DYNAMIC_LSTM) and macs is not None and macs < SMALL_MACS:
            kind = f"small {kind}"
        kinds.setdefault(kind, []).append(node.name or "")
    return kinds


#: Untimed runs of a fresh session: ONNX Runtime's first two runs of a model take up to 1.7× longer
#: than the steady state (arena growth, kernel caches), measured on the zoo's CNNs.
WARMUP_RUNS = 2

#: How many standard errors a paired ratio's median must lie from a decision threshold to count as
#: settled (about 1 % two-sided under normal noise).
SETTLED_SE = 2.6


def _threshold(name: str, min_gain: float) -> float:
    """The ratio to the quantized model that ``name``'s decision turns on.

    1.0 for the float models (is the quantized model faster at all?), ``1 - min_gain`` for a variant
    (is keeping a kind float a real gain?).
    """
    return 1.0 if name in (_FLOAT, _INPUT) else 1.0 - min_gain


def _paired_ratios(candidate: Sequence[float], quantized: Sequence[float]) -> np.ndarray:
    """Round-by-round ratios of a candidate's runs to the quantized model's runs of the same rounds.

    A candidate runs in the first rounds of its block and leaves once settled, so its runs pair with
    the quantized model's first ones; a slow drift of the machine cancels out of each ratio.
    """
    runs = np.asarray(candidate, dtype=np.float64)
    return runs / np.asarray(quantized[: len(runs)], dtype=np.float64)


def _settled(ratios: np.ndarray, threshold: float) -> bool:
    """Whether a candidate's decision is clear from its paired ratios.

    It is when their median lies :data:`SETTLED_SE` standard errors (from the median absolute
    deviation) from ``threshold``.
    """
    middle = float(np.median(ratios))
    spread = 1.4826 * float(np.median(np.abs(ratios - middle)))
    error = max(1.2533 * spread / math.sqrt(len(ratios)), 0.002)
    return abs(middle - threshold) >= SETTLED_SE * error


class _Timer:
    """Interleaved timing blocks against one open session of the fully quantized model.

    Sessions run ``config.threads`` intra-op threads, or with ``default_threads`` ONNX Runtime's default
    count (what a session opened without options runs).
    """

    def __init__(
        self,
        quantized: ir.Model,
        feed: dict[str, np.ndarray],
        config: LatencyGuardConfig,
        *,
        default_threads: bool = False,
    ) -> None:
        self.feed = feed
        self.config = config
        self.threads: int | None = None if default_threads else config.threads
        #: Sessions that had their untimed runs (weak: a closed session's id may be reused by a new one).
        self.warm: weakref.WeakSet[Any] = weakref.WeakSet()
        #: The outputs of each session's last warm-up run, by block name (the float model's as "float").
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.quantized = self.open(quantized)
        self.runs = 0

    def open(self, model: ir.Model | ModelSource) -> Any:
        """A timing session (no spin-waiting) on a model held in memory, or on the user's file/bytes.

        A held model's weights go to ONNX Runtime as arrays sharing its memory (:func:`open_model`;
        its latency is that of a session loaded from the file): a serialized copy would add the
        model's size to the peak memory while the session loads.
        """
        providers, threads = self.config.providers, self.threads
        if isinstance(model, ir.Model):
            return open_model(model, providers=providers, threads=threads, spin=False)
        return make_session(model, providers=providers, threads=threads, spin=False)

    def block(self, sessions: dict[str, Any]) -> dict[str, float]:
        """Latency (ms) of each session and of the quantized one, interleaved.

        Each round runs the quantized model and every candidate still in the race once, the running
        order rotating from round to round. A candidate leaves the race once its paired ratio to the
        quantized model is clearly on one side of its threshold (:func:`_settled`): a candidate 20 %
        slower is settled in a few rounds and stops costing runs, a close call gets the rest of the
        block. The block ends when no candidate is left, after ``max_runs`` rounds, or once its time
        budget (``budget_s`` per candidate) is spent. A candidate's latency is the quantized model's
        median times its median paired ratio.
        """
        names = list(sessions)
        sessions = {_QUANTIZED: self.quantized, **sessions}
        kwargs = {"threads": self.threads or 0}
        for name, session in sessions.items():  # a fresh session's first runs are slow: not timed
            self.warm_up(name, session)
        start = time.perf_counter()
        probe = time_sessions(sessions, self.feed, runs=1, warmup=0, **kwargs)
        times = {name: list(result.times_ms) for name, result in probe.items()}
        pair_s = (probe[_QUANTIZED].median_ms + max((probe[n].median_ms for n in names), default=0.0)) / 1e3
        fewest = self.config.min_runs if pair_s < 0.1 else 2  # long runs are steady: fewer rounds
        # A sub-millisecond model's rounds are noisy and nearly free: spend a tenth of the budget on
        # them before any early stop (a 0.6 ms classifier measured 0.84-1.01x float from 3-round blocks).
        fewest = max(fewest, int(min(0.1 * self.config.budget_s / max(pair_s, 1e-6), self.config.max_runs)))
        deadline = start + self.config.budget_s * max(len(names), 1)
        racing = list(names)
        rounds = 1
        while racing and rounds < self.config.max_runs:
            if rounds >= fewest:
                base = times[_QUANTIZED]
                racing = [
                    n
                    for n in racing
                    if not _settled(_paired_ratios(times[n], base), _threshold(n, self.config.min_gain))
                ]
                if not racing or time.perf_counter() > deadline:
                    break
            # One round at a time, each in the next rotation of the running order (no model always first).
            order = [_QUANTIZED, *racing]
            order = order[rounds % len(order) :] + order[: rounds % len(order)]
            timing = time_sessions({n: sessions[n] for n in order}, self.feed, runs=1, warmup=0, **kwargs)
            for name, result in timing.items():
                times[name].extend(result.times_ms)
            rounds += 1
        self.runs += rounds
        quantized_ms = float(np.median(times[_QUANTIZED]))
        measured = {_QUANTIZED: quantized_ms}
        for name in names:
            measured[name] = quantized_ms * float(np.median(_paired_ratios(times[name], times[_QUANTIZED])))
        return measured

    def warm_up(self, name: str, session: Any) -> float:
        """Give a fresh session its untimed runs (their outputs kept under ``name``).

        Returns the last one's wall time in seconds (0.0 for a session already warm).
        """
        if session in self.warm:
            return 0.0
        for _ in range(WARMUP_RUNS):
            start = time.perf_counter()
            outputs = run(session, self.feed)
            seconds = time.perf_counter() - start
        self.warm.add(session)
        self.outputs[name] = outputs
        return seconds

    def ratio(self, model: ir.Model) -> tuple[float, float]:
        """Latency of ``model`` over the quantized model's, timed in one block, and its output SQNR."""
        measured = self.block({"candidate": self.open(model)})
        return measured["candidate"] / measured[_QUANTIZED], self.sqnr("candidate")

    def sqnr(self, name: str) -> float:
        """The lowest SQNR (dB) of session ``name``'s float outputs against the float model's.

        On the guard's feed, from the warm-up runs (the input's outputs, else the preprocessed float
        model's: the same function); NaN before a float model ran.
        """
        reference = self.outputs.get(_INPUT, self.outputs.get(_FLOAT))
        if reference is None or name not in self.outputs:
            return math.nan
        return worst_sqnr_db(reference, self.outputs[name])


#: Other forms of the chosen model that ONNX Runtime may run faster (step 5), tried in this order: a
#: label, whether the model has something to rewrite, and the rewrite (returning how many places).
Form = tuple[str, Callable[[ir.Model], Sequence[object]], Callable[[ir.Model], int]]
ALTERNATIVE_FORMS: tuple[Form, ...] = (
    (RESIDUAL_SUMS, residual_adds, write_residual_adds_as_sum),
    (SILU_ISLANDS, integer_silus, write_silu_islands),
)

#: The variants race in one block with the float baseline while that many copies of the float model's
#: weights fit in this many bytes (a session holds a copy of its weights, prepacked).
MERGED_BLOCK_BYTES = 256 << 20

#: ... and while the quantized model runs faster than this (seconds). A slower model has large
#: activations (every open session holds its own arena: +230 MB on PP-OCRv4 det's 960x960 feature
#: maps) and only a few rounds to share, so racing saves it nothing.
MERGED_BLOCK_MAX_RUN_S = 0.02

#: A model whose variants are timed one at a time has the preprocessed float model timed only when the
#: chosen int8 model is slower than this fraction of the input's latency: below it, preprocessing
#: alone (a few % from folds, 22 % on a Paddle classifier whose hard-swishes fuse again) is not
#: expected to do better, and a block of its own costs a large model seconds.
PREPROCESSED_CHECK = 0.8

#: The chosen int8 model is timed against the float model at ONNX Runtime's default thread count too
#: when it takes more than this fraction of the float model's latency at the guard's thread count. Int8
#: gains shrink with threads on small models (the zoo's PP-LCNet orientation classifier: 0.86x float at
#: 1 thread, 1.14x at 2); a model that is 0.6x at 1 thread measured at most 0.7x at 2.
DEFAULT_THREADS_CHECK = 0.75


def _cores() -> int:
    """CPUs this process may run on (ONNX Runtime's default uses one thread per physical core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: A candidate as fast as the chosen one (within ``min_gain``) replaces it when its output SQNR on the
#: guard's feed is higher by at least this much (dB): when speed does not tell them apart, accuracy does.
ACCURACY_TIE_DB = 1.0


def _more_accurate_tie(
    candidates: dict[str, tuple[ir.Model, tuple[str, ...], float, float]], chosen: str, min_gain: float
) -> str:
    """The most accurate candidate among those whose latency is within noise of ``chosen``'s.

    The guard's timings cannot tell apart candidates within ``min_gain`` of each other; the SQNR of
    each one's output against the float model on the same feed (free: the warm-up runs computed it)
    can. A candidate replaces ``chosen`` only when it is clearly more accurate (:data:`ACCURACY_TIE_DB`),
    never when it is measurably slower: the CDLA layout detector's first Conv, within noise of its int8
    version, keeps 0.61 detection F1 float and 0.49 int8.
    """
    limit = candidates[chosen][2] + min_gain
    floor = candidates[chosen][3]
    if math.isnan(floor):
        return chosen
    tied = [
        name
        for name, (_, _, ratio, sqnr) in candidates.items()
        if ratio <= limit and not math.isnan(sqnr) and sqnr > floor and sqnr >= floor + ACCURACY_TIE_DB
    ]
    return max(tied, key=lambda n: candidates[n][3]) if tied else chosen


#: A chosen candidate below the report's large-loss SQNR has the most accurate candidate above it timed
#: once more when that one measured at most this much slower: one noisy block must not decide it.
CONFIRM_RATIO = 1.5


def _confirm_lossy_choice(
    candidates: dict[str, tuple[ir.Model, tuple[str, ...], float, float]],
    chosen: str,
    timer: _Timer,
    min_gain: float,
) -> str:
    """``chosen``, or a far more accurate candidate that a second timing finds within noise of it.

    Keeping a kind float for accuracy turns on a tie (:func:`_more_accurate_tie`), and a tie is a
    timing: DNSMOS's log front end float measured 53.3 ms against the int8 model's 52.6 in one run
    (kept float: 38.6 dB) and 68.4 against 50.4 in another (int8 kept: 5.2 dB, every clip's MOS off).
    Where the chosen candidate is below :data:`~onnxq.report.LARGE_LOSS_SQNR_DB` on the guard's feed
    and a candidate above it measured at most :data:`CONFIRM_RATIO` times as slow, that candidate
    is timed once more, in a block of its own, and the tie-breaker decides on that timing.
    """
    chosen_sqnr = candidates[chosen][3]
    if math.isnan(chosen_sqnr) or chosen_sqnr >= LARGE_LOSS_SQNR_DB:
        return chosen
    limit = candidates[chosen][2] * CONFIRM_RATIO
    accurate = [
        name
        for name, (_, _, ratio, sqnr) in candidates.items()
        if sqnr >= LARGE_LOSS_SQNR_DB and candidates[chosen][2] + min_gain < ratio <= limit
    ]
    if not accurate:
        return chosen
    name = max(accurate, key=lambda n: candidates[n][3])
    model, kinds, _, _ = candidates[name]
    ratio, sqnr = timer.ratio(model)  # against the quantized model, as the first timing was
    candidates[name] = (model, kinds, ratio, sqnr)
    logger.info("latency guard: %s timed again: %.3f of the quantized model's latency", name, ratio)
    return _more_accurate_tie(candidates, chosen, min_gain)


def _time_together(
    candidates: dict[str, tuple[ir.Model, tuple[str, ...], float, float]],
    together: Sequence[str],
    state: RequantizableState,
    kinds: dict[str, list[str]],
    timer: _Timer,
) -> None:
    """Time the variant that keeps the ``together`` kinds float as one more candidate (once per set)."""
    name = "keep " + " + ".join(together) + " float"
    if name not in candidates:
        model = state.requantize([n for kind in together for n in kinds[kind]])
        candidates[name] = (model, tuple(together), *timer.ratio(model))


def guard_latency(
    state: RequantizableState,
    quantized: ir.Model,
    feed: dict[str, np.ndarray],
    config: LatencyGuardConfig,
    input_model: ModelSource | None = None,
    *,
    preprocessed_may_win: bool = True,
) -> GuardOutcome:
    """Keep float the kinds of anchors whose quantized version is slower here (module docstring).

    ``quantized`` is the fully quantized model in its output format; ``state`` re-quantizes variants
    in the same format. ``input_model`` (a path or serialized bytes) is the user's model, the baseline
    "never slower" is judged against and the output when nothing quantized beats it; without it the
    preprocessed float model plays that part. ``preprocessed_may_win=False`` keeps the preprocessed
    float model from replacing the input (a half-precision input computed in float32: twice its size).
    """
    start = time.perf_counter()
    kinds = anchor_kinds(state.float_model, state.quantized_nodes)
    lstms = dynamic_lstms(state)
    if lstms:
        kinds[DYNAMIC_LSTM] = lstms
    timer = _Timer(quantized, feed, config)
    # The float model to beat: the input as the user gave it (else the preprocessed float model).
    float_name = _FLOAT if input_model is None else _INPUT
    # With one kind only, keeping it float gives a float model: the baseline's comparison covers it.
    suspects = [kind for kind in kinds if kind not in TRUSTED_KINDS] if len(kinds) > 1 else []
    variants = {f"keep {kind} float": (kind, state.requantize(kinds[kind])) for kind in suspects}
    # Small, fast models: every variant races in the baseline's block (the quantized model's runs are
    # shared and each variant leaves once settled); others: one variant at a time, three sessions open.
    run_s = timer.warm_up(_QUANTIZED, timer.quantized)
    fits = len(variants) + 3 <= MERGED_BLOCK_BYTES // max(initializer_bytes(state.float_model), 1)
    together = fits and run_s < MERGED_BLOCK_MAX_RUN_S
    float_form = state.float_form()  # "every layer float" as written, when preprocessing's float wins
    sessions = {float_name: timer.open(float_form if input_model is None else input_model)}
    # Where the variants race, the preprocessed float model races too (step 6 costs no block of its own).
    races_float_form = together and float_name == _INPUT and preprocessed_may_win
    if races_float_form:
        sessions[_FLOAT] = timer.open(float_form)
    if together:
        sessions.update({name: timer.open(model) for name, (_, model) in variants.items()})
    first = timer.block(sessions)
    del sessions  # the variants' sessions close here
    base = first[_QUANTIZED]
    baseline = {name: first[name] for name in (_QUANTIZED, float_name)}
    outcome = GuardOutcome(quantized, config.threads, 0, kinds, baseline)
    candidates: dict[str, tuple[ir.Model, tuple[str, ...], float, float]] = {
        _QUANTIZED: (quantized, (), 1.0, timer.sqnr(_QUANTIZED))
    }
    for name, (kind, model) in variants.items():
        ratio, sqnr = (first[name] / base, timer.sqnr(name)) if together else timer.ratio(model)
        candidates[name] = (model, (kind,), ratio, sqnr)
    slower = [kind for kind in suspects if candidates[f"keep {kind} float"][2] < 1.0 - config.min_gain]
    if len(slower) > 1:
        # Reverting two kinds may cost more than each alone saves: time the combination too.
        _time_together(candidates, slower, state, kinds, timer)
    best = min(candidates, key=lambda n: candidates[n][2])
    # Kinds that each gained a little float, within the noise: together with the fastest candidate's,
    # their gains may add up (a small 1x1 Conv between two float depthwise Convs: PP-OCR cls).
    near = [
        kind
        for kind in suspects
        if kind not in candidates[best][1] and candidates[f"keep {kind} float"][2] < 1.0
    ]
    if near:
        union = [kind for kind in suspects if kind in candidates[best][1] or kind in near]
        _time_together(candidates, union, state, kinds, timer)
        best = min(candidates, key=lambda n: candidates[n][2])
    if candidates[best][2] >= 1.0 - config.min_gain:
        best = _QUANTIZED  # within noise of the fully quantized model: keep every anchor quantized
    fastest = best
    best = _more_accurate_tie(candidates, best, config.min_gain)
    if LOG_FRONT_END in kinds and candidates[best][1] and LOG_FRONT_END not in candidates[best][1]:
        # Kinds kept float for speed plus the log front end: its variant alone was timed with those
        # kinds int8 (basic-pitch: its other narrow Convs float 15.6 ms at 6.8 dB; with its constant-Q
        # transform float too, as fast and more accurate).
        _time_together(candidates, [*candidates[best][1], LOG_FRONT_END], state, kinds, timer)
        best = _more_accurate_tie(candidates, best, config.min_gain)
    best = _confirm_lossy_choice(candidates, best, timer, config.min_gain)
    outcome.for_accuracy = best != fastest
    for name, (_, _, ratio, sqnr) in candidates.items():
        outcome.latency_ms[name] = base * ratio
        outcome.sqnr_db[name] = sqnr
    rewritten: dict[str, int] = {}
    for label, present, rewrite in ALTERNATIVE_FORMS:
        if not present(candidates[best][0]):
            continue
        variant = candidates[best][0].clone()
        count = rewrite(variant)
        name = f"{best}, {label}"
        ratio, sqnr = timer.ratio(variant)
        entry = (variant, candidates[best][1], ratio, sqnr)
        faster = ratio < candidates[best][2] * (1.0 - config.min_gain)
        # As fast within the noise and clearly more accurate: the tie goes to accuracy, as in step 4
        # (a speech-quality model's SiLUs: 4.65 vs 4.75 ms, 51.9 vs 42.8 dB on the guard's feed).
        tied = _more_accurate_tie({best: candidates[best], name: entry}, best, config.min_gain) == name
        if faster or tied:
            candidates[name] = entry
            best, rewritten[label] = name, count
            if not faster:
                outcome.forms_for_accuracy.append(label)
        outcome.latency_ms[name], outcome.sqnr_db[name] = base * ratio, sqnr
    outcome.residual_sums = rewritten.get(RESIDUAL_SUMS, 0)
    outcome.silu_islands = rewritten.get(SILU_ISLANDS, 0)
    if races_float_form or (
        float_name == _INPUT
        and preprocessed_may_win
        and outcome.latency_ms[best] > PREPROCESSED_CHECK * first[_INPUT]
    ):
        # Preprocessing alone (BatchNorm folds, canonical activations) may beat the input: measured in
        # the first block where the variants raced there, else only where int8 gains little (a block
        # of its own: two sessions open at most); taken as the float model to beat when it is
        # clearly faster than the input.
        if races_float_form:
            outcome.latency_ms[_FLOAT] = first[_FLOAT]
        else:
            preprocessed = timer.block({_FLOAT: timer.open(float_form)})
            outcome.latency_ms[_FLOAT] = base * preprocessed[_FLOAT] / preprocessed[_QUANTIZED]
        if outcome.latency_ms[_FLOAT] < first[_INPUT] * (1.0 - config.min_gain):
            float_name = _FLOAT
    outcome.runs = timer.runs
    del timer  # its sessions close: the check below opens two of its own
    # A quantized model must beat float by more than the noise to be worth its rounding error.
    keep_float = outcome.latency_ms[best] >= outcome.latency_ms[float_name] * (1.0 - config.min_gain)
    if not keep_float and set(kinds) == {LOG_FRONT_END} and candidates[best][3] < LARGE_LOSS_SQNR_DB:
        # A model that is a log-spectrum front end and nothing else: its only other form is float, and
        # int8 rounds the quiet bins to the log's floor (onnx_asr's front ends -9.5 to 8.4 dB,
        # openWakeWord's melspectrogram 7.6 dB on speech). Features that wrong serve no one.
        keep_float = outcome.lossy_front_end = True
    if (
        not keep_float
        and config.check_default_threads
        and _cores() > config.threads
        and outcome.latency_ms[best] > DEFAULT_THREADS_CHECK * outcome.latency_ms[float_name]
    ):
        # A user who opens a session without options runs it at ONNX Runtime's default thread
        # count: int8 must not be slower there either (beyond the noise).
        float_source = input_model if float_name == _INPUT else float_form
        assert float_source is not None
        check = _Timer(candidates[best][0], feed, config, default_threads=True)
        measured = check.block({float_name: check.open(float_source)})
        outcome.runs += check.runs
        outcome.default_threads_ratio = measured[_QUANTIZED] / measured[float_name]
        # Not slower at all: a model that gains little at one thread is marginal here, and the noise
        # margin let 1.03x through (the orientation classifier measured 1.09x at 2 threads then).
        keep_float = outcome.slower_at_default_threads = outcome.default_threads_ratio > 1.0
        del check
    if keep_float:
        outcome.chosen, outcome.all_float = float_name, True
        outcome.silu_islands = 0  # the float model has no integer SiLU to rewrite
        outcome.forms_for_accuracy = []
        outcome.reverted = dict(kinds)
        if float_name == _INPUT:
            assert input_model is not None
            outcome.model = load_input_model(input_model)
        else:
            outcome.model = float_form
    else:
        outcome.chosen = best
        outcome.reverted = {kind: kinds[kind] for kind in candidates[best][1]}
        outcome.model = candidates[best][0]
    outcome.seconds = time.perf_counter() - start
    logger.info("latency guard: %s", outcome.as_dict())
    return outcome


def load_input_model(source: ModelSource) -> ir.Model:
    """The user's model from the path or the serialized bytes the guard timed."""
    if isinstance(source, bytes):
        model: ir.Model = ir.from_proto(onnx.ModelProto.FromString(source))
        return model
    return load_model(source)
