"""Quantized weights remembered per float weight tensor, for as long as that tensor lives.

Every candidate that ``--method auto``, the range rescue, the latency guard and ``--target`` score is
a rewrite of one float model with other activation ranges or other layers kept float: its weights
come out the same each time. Quantizing them again was most of a rewrite on models with large
weights: 7.4 s of ZFNet-512's 19 rewrites, 5.8 s of all-mpnet-base-v2's (its run-time MatMul weights
and its int8 embedding table). The float tensors are shared by every clone of the model
(``ir.Model.clone`` keeps them), so they key the memo; a tensor that a pass replaced (bias correction,
smoothing, equalization) is a new key.

The arrays handed out are read-only: several rewritten models hold the same one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import numpy as np
import onnx_ir as ir

from onnxq.qmath import QuantParams

__all__ = ["remembered"]

Quantized = tuple[np.ndarray, QuantParams]

_MEMO: weakref.WeakKeyDictionary[object, dict[Hashable, Quantized]] = weakref.WeakKeyDictionary()


def remembered(weight: ir.Value | None, key: Hashable, compute: Callable[[], Quantized]) -> Quantized:
    """``compute()``'s quantized form of the constant ``weight`` for ``key`` (the scheme, a transform).

    Keyed by the float tensor ``weight`` holds: the first call per (tensor, key) computes it, later
    calls return the same arrays. A value that holds no constant, or a tensor type that takes no weak
    reference, is not remembered.
    """
    tensor = ir.convenience.get_const_tensor(weight) if weight is not None else None
    if tensor is None:
        return compute()
    try:
        per_tensor = _MEMO.setdefault(tensor, {})
    except TypeError:
        return compute()
    found = per_tensor.get(key)
    if found is None:
        q, params = compute()
        q.setflags(write=False)
        found = per_tensor[key] = (q, params)
    return found
