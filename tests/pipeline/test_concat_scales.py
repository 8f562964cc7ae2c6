"""A Concat input that something else reads keeps its own scale (:meth:`_Planner.reads_only`).

The model concatenates a narrow map ``a`` (range about ±0.3) with a wide one ``b`` (about ±30), and a
second Conv reads ``a`` as well. Sharing the Concat's scale with every input, as onnxq did before,
put ``a`` on a grid a hundred times too coarse for that second reader: its output ``h`` read 1.5 dB
SQNR against float. Kept apart, ``a`` has its own range and ``h`` reads over 30 dB; the Concat
requantizes ``a`` onto its output's grid (a ``QLinearConcat`` after fusion). ``b``, read by the
Concat alone, still takes the output's scale.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import normal_arrays, parse, random_feeds, serialize

import onnxq
from onnxq.config import LatencyGuardConfig

#: A shared grid for ``a`` reads 1.5 dB on ``h``; both correct forms read over 30.
SQNR_BOUND_DB = 25.0


def _model() -> object:
    text = """
    g (float[1, 3, 12, 12] x) => (float[1, 4, 12, 12] y, float[1, 2, 12, 12] h) {
        a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
        b = Conv <pads = [1, 1, 1, 1]> (x, Wb)
        k = Concat <axis = 1> (a, b)
        y = Conv <pads = [1, 1, 1, 1]> (k, Wc)
        h = Conv <pads = [1, 1, 1, 1]> (a, Wh)
    }
    """
    arrays = normal_arrays(3, Wa=(2, 3, 3, 3), Wb=(2, 3, 3, 3), Wc=(4, 4, 3, 3), Wh=(2, 2, 3, 3))
    arrays["Wa"] *= 0.05
    arrays["Wb"] *= 5.0
    return parse(text, arrays)


def _sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - actual) ** 2))
    return 10.0 * float(np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise))


def _outputs(blob: bytes, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    runs = [session.run(None, feed) for feed in feeds]
    return [np.stack([run[i] for run in runs]) for i in range(len(runs[0]))]


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_concat_input_read_elsewhere_keeps_its_precision(fmt: str) -> None:
    proto = _model()
    config = onnxq.QuantConfig(format=fmt, latency_guard=LatencyGuardConfig(enabled=False))
    result = onnxq.quantize(proto, random_feeds(proto, 32, seed=1), config, show_progress=False)
    held_out = random_feeds(proto, 8, seed=2)
    expected = _outputs(serialize(proto), held_out)
    actual = _outputs(ir.to_proto(result.model).SerializeToString(), held_out)
    y_db, h_db = (_sqnr(e, a) for e, a in zip(expected, actual, strict=True))
    assert h_db >= SQNR_BOUND_DB, f"h (a's other reader): {h_db:.1f} dB"
    assert y_db >= SQNR_BOUND_DB, f"y (after the Concat): {y_db:.1f} dB"
    ops = [node.op_type for node in result.model.graph]
    if fmt == "qoperator":
        concat = next(node for node in result.model.graph if node.op_type == "QLinearConcat")
        # inputs: y_scale, y_zp, then (x, scale, zp) per input: a is requantized, b is not
        scales = [concat.inputs[i].const_value.numpy().item() for i in (0, 3, 6)]  # type: ignore[union-attr]
        assert scales[1] < scales[0] / 20
        assert scales[2] == scales[0]
    else:
        assert "Concat" in ops
