"""Which float model the latency guard may answer with when no int8 variant wins."""

from __future__ import annotations

import types

import builders
import numpy as np
import onnx_ir as ir

from onnxq.load.files import serialize_model
from onnxq.pipeline.entry import _may_replace_input
from onnxq.preprocess import preprocess

# A resampler's kernel computed from a few numbers (Expand of one row): constant folding stores it.
GENERATED_KERNEL = """
generated (float[1, 1, 1024] x) => (float[1, 64, 513] y) {
    k = Expand (row, kshape)
    y = Conv (x, k)
}
"""


def _state(model: ir.Model) -> types.SimpleNamespace:
    return types.SimpleNamespace(reference_model=model)


def test_a_preprocessed_model_larger_than_the_input_does_not_replace_it() -> None:
    proto = builders.parse(
        GENERATED_KERNEL,
        {
            "row": np.hanning(512).astype(np.float32).reshape(1, 1, 512),
            "kshape": np.array([64, 1, 512], np.int64),
        },
    )
    model = ir.from_proto(proto)
    input_bytes = len(serialize_model(model))
    preprocess(model)
    assert any(
        v.const_value is not None and v.const_value.size == 64 * 512
        for v in model.graph.initializers.values()
    )
    assert not _may_replace_input(_state(model), input_bytes, upcast=0)  # 2 kB grew to 128 kB: no
    assert _may_replace_input(_state(model), 100 * input_bytes, upcast=0)  # as large as the input: may
    assert not _may_replace_input(_state(model), 100 * input_bytes, upcast=3)  # float16 run in float32
