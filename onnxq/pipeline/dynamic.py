"""Dynamic quantization of a float model: int8 weights, activations quantized at run time.

Run-time activation ranges need no calibration, but the per-tensor range of an activation with outlier
channels is as wide at run time as a calibrated one: when data is given (``--calib``), outlier
smoothing (:func:`~onnxq.preprocess.smooth.smooth_outliers`) moves those channels' range into the
weights first, as in static mode (all-mpnet-base-v2: sentence-embedding cosine 0.919 → 0.99; ONNX
Runtime's ``quantize_dynamic``: 0.774).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.data import Feeds
from onnxq.pipeline.static import explained_on_random_data, nothing_to_quantize
from onnxq.pipeline.summary import ModeSummary
from onnxq.preprocess.smooth import smooth_outliers
from onnxq.rewrite.dynamic_quant import QUANTIZED_OP_TYPES, DynamicQuantizePass

__all__ = ["quantize_dynamic"]


def quantize_dynamic(
    model: ir.Model,
    config: QuantConfig,
    *,
    label: str,
    feeds: Feeds | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ModeSummary:
    """Rewrite ``model`` with :class:`~onnxq.rewrite.dynamic_quant.DynamicQuantizePass`.

    With ``feeds`` (and ``config.smooth``), outlier smoothing runs on them first (module docstring).
    """
    start = time.perf_counter()
    notes: list[str] = []
    rescaled: tuple[str, ...] = ()
    if feeds is not None and config.smooth:
        with explained_on_random_data(feeds):
            smoothing = smooth_outliers(model, feeds, providers, feature_maps=config.dynamic.conv)
        if smoothing.candidates:
            notes.append(smoothing.describe())
        rescaled = tuple(smoothing.smoothed)
    smoothed = time.perf_counter()
    rewrite = DynamicQuantizePass(config)
    rewrite(model)
    if not rewrite.quantized:
        raise nothing_to_quantize(model, label, rewrite.declined)
    float_ops = collections.Counter(n.op_type for n in model.graph if n.op_type not in QUANTIZED_OP_TYPES)
    return ModeSummary(
        mode="dynamic",
        quantized_op_types=dict(rewrite.quantized),
        float_op_types=dict(float_ops),
        declines=tuple(rewrite.declined),
        notes=tuple(notes),
        subgraph_nodes=sum(len(g) for g in model.graph.subgraphs()),
        timings_s={"smooth": smoothed - start, "rewrite": time.perf_counter() - smoothed},
        smoothed=rescaled,
    )
