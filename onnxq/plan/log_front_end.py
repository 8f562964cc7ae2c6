"""Anchors in front of a logarithm: the STFT Convs and filterbank MatMuls of log-spectrum front ends.

A log-power or log-mel spectrum spans many orders of magnitude. Quantized to 8 bits over its linear
range, every bin quieter than half a step rounds to zero (or to one step) and the ``Log`` turns that
into its floor: errors of whole nepers where the float model had a smooth spectrum. Measured on two
third-party audio models whose network reads such a front end: DNSMOS's ``sig_bak_ovr`` (keras2onnx:
STFT as two Convs → magnitude → ``Log`` → a CNN) reads 11.3 dB output SQNR with the STFT Convs int8
and 44.2 dB with them float, at the same latency; onnx_asr's Kaldi front end −3.7 dB int8.

Keeping such anchors float is not always right: front ends that clamp the log's range below its
maximum (Whisper's ``max(log, max − 8)``, openwakeword's melspectrogram) are fine in int8 (57.8 dB at
1.67× there), and a structural rule that kept every one float was measured and reverted. So this
module only *finds* them; the latency guard (:mod:`onnxq.tuning.latency_guard`) gives them a kind of
their own, times the variant that keeps them float, and takes it when it is as fast as the int8 one
and clearly more accurate on the guard's feed.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS

__all__ = ["LOG_SEARCH_DEPTH", "MAGNITUDE_OPS", "MOVE_OPS", "log_downstream"]

#: Ops that only move, select or join values: followed at no cost to the search's depth (basic-pitch's
#: constant-Q transform joins its octaves with a chain of nine Concats before the magnitude).
MOVE_OPS = frozenset(
    {
        "Concat",
        "Expand",
        "Flatten",
        "Identity",
        "Pad",
        "Reshape",
        "Slice",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)

#: Ops that carry a magnitude through unchanged in kind (linear maps, powers, sums, a floor): between an
#: anchor and a ``Log``, what the anchor's rounding erases is what the ``Log`` magnifies.
MAGNITUDE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Clip",
        "Conv",
        "Div",
        "Gemm",
        "MatMul",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pow",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "Sqrt",
        "Sub",
    }
)

#: How many :data:`MAGNITUDE_OPS` the search from an anchor to a ``Log`` passes at most (DNSMOS: STFT
#: Conv → Mul → Add → Sqrt → Pow → Max → Log is 5; basic-pitch: Conv → Neg → Mul → ReduceSum → Sqrt →
#: Mul → Add → Log is 6).
LOG_SEARCH_DEPTH = 8


def log_downstream(node: ir.Node) -> ir.Node | None:
    """A ``Log`` of ``node``'s graph that its output reaches, if any.

    Through :data:`MOVE_OPS` and at most ``LOG_SEARCH_DEPTH - 1`` of :data:`MAGNITUDE_OPS`.
    """
    frontier = [(value, 0) for value in node.outputs]
    seen: set[int] = set()
    while frontier:
        value, depth = frontier.pop()
        for use in value.uses():
            reader = use.node
            if reader.graph is not node.graph or reader.domain not in DEFAULT_DOMAINS or id(reader) in seen:
                continue
            seen.add(id(reader))
            if reader.op_type == "Log":
                return reader
            if reader.op_type in MOVE_OPS:
                frontier.extend((out, depth) for out in reader.outputs)
            elif reader.op_type in MAGNITUDE_OPS and depth + 1 < LOG_SEARCH_DEPTH:
                frontier.extend((out, depth + 1) for out in reader.outputs)
    return None
