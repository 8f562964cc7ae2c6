"""A DequantizeLinear whose Transpose/Reshape/… output an If body reads is moved past those ops.

ONNX Runtime's QDQ propagation aborts the process on that pattern (an assertion in 1.19–1.32), so every
ONNX Runtime session here is opened in a child process: a regression fails the test instead of
killing the test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx_ir as ir

import onnxq
from onnxq.config import LatencyGuardConfig, QuantConfig
from onnxq.rewrite.captured_dequantize import move_dequantize_past_captured

# A quantized tensor, transposed and reshaped in the main graph, read only inside the If's branches;
# the same tensor also feeds a Relu in the main graph through a Transpose that no body reads.
CAPTURED = """
captured (float[4, 8] x, bool cond) => (float[32] y, float[8, 4] z) {
    q = QuantizeLinear (x, s, zp)
    d = DequantizeLinear (q, s, zp)
    t = Transpose <perm = [1, 0]> (d)
    r = Reshape (t, shape)
    y = If (cond) <
        then_branch = then_graph () => (float[32] a) { a = Relu (r) },
        else_branch = else_graph () => (float[32] b) { b = Neg (r) }
    >
    t2 = Transpose <perm = [1, 0]> (d)
    z = Relu (t2)
}
"""

# What the pipeline meets in Silero VAD v4: a quantized Conv, its output transposed and read by the
# branches of an If.
CONV_INTO_IF = """
conv_into_if (float[1, 3, 8, 8] x, bool cond) => (float[1, 64, 4] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    f = Reshape (r, shape)
    t = Transpose <perm = [0, 2, 1]> (f)
    y = If (cond) <
        then_branch = then_graph () => (float[1, 64, 4] a) { a = Relu (t) },
        else_branch = else_graph () => (float[1, 64, 4] e) { e = Neg (t) }
    >
}
"""

_CHILD = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
np.savez(sys.argv[3], *session.run(None, feeds))
"""


def _run_in_child(
    model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray], tmp: Path
) -> list[np.ndarray]:
    """The model's outputs at ORT_ENABLE_ALL, from a child process (an abort fails, not kills, the test)."""
    path, inputs, outputs = tmp / "model.onnx", tmp / "feed.npz", tmp / "out.npz"
    path.write_bytes(builders.serialize(model))
    np.savez(inputs, **feed)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(inputs), str(outputs)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"onnxruntime failed (exit {done.returncode}): {done.stderr[-400:]}"
    with np.load(outputs) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _captured_model() -> onnx.ModelProto:
    return builders.parse(
        CAPTURED,
        {
            "s": np.array(0.05, np.float32),
            "zp": np.array(128, np.uint8),
            "shape": np.array([32], np.int64),
        },
    )


def test_the_chain_to_the_body_runs_on_integers_and_the_rest_is_untouched(tmp_path: Path) -> None:
    proto = _captured_model()
    model = ir.from_proto(proto)
    assert move_dequantize_past_captured(model) == 2  # past the Transpose, then past the Reshape
    by_output = {n.outputs[0].name: n for n in model.graph}
    assert by_output["r"].op_type == "DequantizeLinear"  # the body still reads 'r', now a DQ's output
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    transpose = reshape.inputs[0].producer()  # type: ignore[union-attr]
    assert transpose is not None and transpose.op_type == "Transpose"
    assert transpose.inputs[0] is not None and transpose.inputs[0].name == "q"  # the uint8 tensor
    assert by_output["t2"].op_type == "Transpose" and by_output["t2"].inputs[0].name == "d"  # type: ignore[union-attr]

    rng = np.random.default_rng(0)
    for cond in (True, False):
        feed = {"x": rng.normal(0, 2, (4, 8)).astype(np.float32), "cond": np.array(cond)}
        expected = builders.run_disabled(proto, feed)  # without optimizations the input runs
        for got, want in zip(_run_in_child(model, feed, tmp_path), expected, strict=True):
            np.testing.assert_array_equal(got, want)  # data moves: the same numbers


def test_a_quantized_conv_read_by_if_branches_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    proto = builders.parse(
        CONV_INTO_IF,
        {
            "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
            "b": rng.normal(0, 0.1, (4,)).astype(np.float32),
            "shape": np.array([1, 4, 64], np.int64),
        },
    )
    calib = [
        {"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32), "cond": np.array(i % 2 == 0)}
        for i in range(8)
    ]
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=False))
    model = onnxq.quantize(proto, calib, config).model
    assert any(n.op_type == "QuantizeLinear" for n in model.graph)
    feed = {"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32), "cond": np.array(True)}
    got = _run_in_child(model, feed, tmp_path)[0]
    want = builders.run_disabled(proto, feed)[0]
    sqnr = 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2))
    assert sqnr > 25.0, sqnr  # measured 38 dB; a wrong move (scale, layout) would not come close
