"""Lowering a QDQ model to QOperator form (integer operators)."""

from __future__ import annotations

import time

import onnx_ir as ir

from onnxq.pipeline.summary import LoweringSummary
from onnxq.rewrite.fuse_qlinear import FuseQLinearPass

__all__ = ["lower_to_qoperator"]


def lower_to_qoperator(model: ir.Model) -> LoweringSummary:
    """QDQ → integer operators; what could not be lowered stays in QDQ form, with the reason."""
    start = time.perf_counter()
    lower = FuseQLinearPass()
    lower(model)
    return LoweringSummary(dict(lower.lowered), tuple(lower.declined), time.perf_counter() - start)
