"""Provenance: what a saved model records about how onnxq made it.

Whoever finds the file later must be able to tell that onnxq made it, with which version and settings,
from which calibration data, and on which ONNX Runtime it was validated. The model's
``producer_name``/``producer_version`` become onnxq's, and ``metadata_props`` gain ``onnxq.*`` keys
(the user's own keys are kept). Everything recorded is a function of the inputs (model, data,
settings) and of the installed versions: no timestamps, paths or timings, so identical inputs still
give byte-identical files.
"""

from __future__ import annotations

import json
from typing import Any

import onnx_ir as ir

from onnxq.report import QuantReport
from onnxq.version import __version__

__all__ = ["PROVENANCE_KEYS", "provenance", "stamp_provenance"]

#: The ``metadata_props`` keys onnxq writes.
PROVENANCE_KEYS = (
    "onnxq.version",
    "onnxq.source_producer",
    "onnxq.settings",
    "onnxq.calibration",
    "onnxq.accuracy_budget",
    "onnxq.validated_with",
    "onnxq.smoothed",
)


def provenance(report: QuantReport) -> dict[str, str]:
    """The ``onnxq.*`` metadata for a model described by ``report``."""
    props = {
        "onnxq.version": __version__,
        "onnxq.source_producer": report.source_producer or "unknown",
        "onnxq.settings": _json(report.settings),
        "onnxq.validated_with": report.validated_with or "not validated",
    }
    calibration = report.calibration
    if calibration:
        props["onnxq.calibration"] = _json(
            {
                "samples": calibration.get("samples"),
                "fingerprint": calibration.get("fingerprint"),
                "random": calibration.get("random", False),
            }
        )
    if report.smoothed_tensors:  # the per-layer numeric suite compares these after their rescale
        props["onnxq.smoothed"] = _json(report.smoothed_tensors)
    if report.budget:
        budget = report.budget
        props["onnxq.accuracy_budget"] = _json(
            {"target": budget.get("target"), "met": budget.get("met"), "kept_float": budget.get("kept_float")}
        )
    return props


def stamp_provenance(model: ir.Model, report: QuantReport) -> None:
    """Set onnxq as the producer and write :func:`provenance` into ``model.metadata_props``."""
    model.producer_name = "onnxq"
    model.producer_version = __version__
    for key in PROVENANCE_KEYS:
        model.metadata_props.pop(key, None)
    model.metadata_props.update(provenance(report))


def _json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
