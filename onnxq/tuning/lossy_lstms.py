"""LSTMs that dynamic quantization would rob of their input: kept float in static mode.

Static mode runs LSTMs as ``com.microsoft.DynamicQuantizeLSTM`` (ONNX Runtime has no static int8 LSTM):
int8 weights, and each call's input quantized to uint8 over that input's own range. Where the input
spans orders of magnitude — a *linear* mel spectrogram, as Resemblyzer's speaker encoder reads — the
range is set by the loudest bins and the quiet ones round to zero: that encoder's embedding fell to
cosine 0.84 against float, where every other LSTM met in the zoo and the wheel scans lost nothing
measurable. Nothing in the graph tells the two apart, so it is measured: the quantized model runs
once over a few calibration samples with a float twin beside each such LSTM
(:func:`onnxq.tuning.sensitivity.estimate_sensitivity`), and an LSTM whose own quantization adds more
than :data:`NOISE_LIMIT_DB` of noise to its output stays float, with a decline that names it and the
noise measured. Resemblyzer's first LSTM adds −5.4 dB; its other two −32 and −37 dB, ddddocr's −37,
Silero VAD v6's −37, openWakeWord's wake-word LSTMs −36 and −44.
"""

from __future__ import annotations

import itertools

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.declines import Decline
from onnxq.graph import DEFAULT_DOMAINS, const_array
from onnxq.tuning.interfaces import RequantizableState
from onnxq.tuning.sensitivity import estimate_sensitivity

__all__ = ["MAX_FEEDS", "NOISE_LIMIT_DB", "lossy_lstms"]

#: An LSTM whose own quantization adds more noise than this to its output (dB against the output's
#: energy: -20 dB is 1 %) stays float.
NOISE_LIMIT_DB = -20.0

#: Calibration samples the measuring run takes at most.
MAX_FEEDS = 4


def _candidates(model: ir.Model, config: QuantConfig) -> list[str]:
    """LSTMs of the main graph that static mode would run as DynamicQuantizeLSTM (constant weights)."""
    if not config.dynamic.lstm:
        return []
    excluded = set(config.exclude_nodes)
    return [
        node.name or ""
        for node in model.graph
        if node.op_type == "LSTM"
        and node.domain in DEFAULT_DOMAINS
        and node.name not in excluded
        and len(node.inputs) > 2
        and const_array(node.inputs[1]) is not None
        and const_array(node.inputs[2]) is not None
    ]


def lossy_lstms(state: RequantizableState) -> tuple[dict[str, float], list[Decline]]:
    """The LSTMs to keep float, with the noise (dB) each one's quantization adds, and their declines.

    Costs a rewrite and one ONNX Runtime pass over :data:`MAX_FEEDS` calibration samples, only in a
    model with such LSTMs.
    """
    lstms = _candidates(state.float_model, state.config)
    if not lstms:
        return {}, []
    probe = state.requantize(output_format="qdq")
    feeds = list(itertools.islice(state.feeds, MAX_FEEDS))
    estimates = estimate_sensitivity(state, probe, feeds, lstms=lstms, anchors=False)
    lossy = {name: db for name, db in estimates.items() if db > NOISE_LIMIT_DB}
    declines = [
        Decline(
            "dynamic",
            "lossy_input_range",
            f"one run-time uint8 range for its input adds noise at {db:.1f} dB of its output's energy "
            f"(limit {NOISE_LIMIT_DB:g} dB; the input spans orders of magnitude): kept float",
            name,
        )
        for name, db in lossy.items()
    ]
    return lossy, declines
