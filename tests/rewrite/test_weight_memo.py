"""Tests for weight_memo: a float tensor's quantized form, computed once per key, handed out read-only."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.qmath import QuantParams, quantize_weight
from onnxq.rewrite.weight_memo import remembered


def _counting(data: np.ndarray, axis: int | None, calls: list[int]):  # type: ignore[no-untyped-def]
    def compute() -> tuple[np.ndarray, QuantParams]:
        calls.append(1)
        return quantize_weight(data, "int8", True, axis)

    return compute


def test_one_computation_per_tensor_and_key() -> None:
    data = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    tensor = ir.Value(name="w", const_value=ir.Tensor(data))
    other = ir.Value(name="w2", const_value=ir.Tensor(data.copy()))
    calls: list[int] = []
    first = remembered(tensor, ("int8", 0), _counting(data, 0, calls))
    assert remembered(tensor, ("int8", 0), _counting(data, 0, calls)) is first
    assert len(calls) == 1
    per_tensor = remembered(tensor, ("int8", None), _counting(data, None, calls))
    assert per_tensor[1].axis is None and len(calls) == 2  # another key: computed
    remembered(other, ("int8", 0), _counting(data, 0, calls))
    assert len(calls) == 3  # another tensor with equal data is another key (tensors are not compared)
    # Another value holding the same tensor (a clone of the model) finds it.
    assert (
        remembered(ir.Value(name="w", const_value=tensor.const_value), ("int8", 0), _counting(data, 0, calls))
        is first
    )
    assert len(calls) == 3
    want, _ = quantize_weight(data, "int8", True, 0)
    np.testing.assert_array_equal(first[0], want)
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0] = 1


def test_nothing_to_key_on_computes_every_time() -> None:
    data = np.ones((2, 2), np.float32)
    calls: list[int] = []
    remembered(None, "k", _counting(data, None, calls))
    remembered(None, "k", _counting(data, None, calls))
    computed = ir.Value(name="x")  # no constant behind it
    remembered(computed, "k", _counting(data, None, calls))
    remembered(computed, "k", _counting(data, None, calls))
    assert len(calls) == 4
