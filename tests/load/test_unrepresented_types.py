"""Models with value types onnx-ir has no form for: scikit-learn's ZipMap output (a sequence of maps).

skl2onnx ends every classifier in a ZipMap by default; ONNX Runtime runs such models, so onnxq must
quantize them, compare their map outputs, and write the types back into the saved model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq.load.files import UNREPRESENTED_TYPES_KEY, load_model
from onnxq.validate.metrics import OutputStats, as_array

CLASSES = 10


def zipmap_classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N, 64] -> MatMul/Add/Relu/MatMul -> Softmax -> ZipMap, plus the ArgMax label (int64)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (64, 128)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (128, CLASSES)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 128).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], name="argmax", axis=1, keepdims=0),
        helper.make_node(
            "ZipMap",
            ["probabilities"],
            ["output_probability"],
            name="zipmap",
            domain="ai.onnx.ml",
            classlabels_int64s=list(range(CLASSES)),
        ),
    ]
    seq_of_maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        nodes,
        "zipmap_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_value_info("output_probability", seq_of_maps),
        ],
        [
            onnx.numpy_helper.from_array(w1, "w1"),
            onnx.numpy_helper.from_array(b1, "b1"),
            onnx.numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 64)).astype(np.float32)} for _ in range(count)]


def test_the_map_type_is_set_aside_and_written_back(tmp_path: Path) -> None:
    proto = zipmap_classifier()
    path = tmp_path / "classifier.onnx"
    onnx.save(proto, path)
    for given in (path, proto):
        model = load_model(given)
        assert UNREPRESENTED_TYPES_KEY in model.metadata_props
        assert model.graph.outputs[1].type is None  # onnx-ir has no map type
    assert proto.graph.output[1].type.HasField("sequence_type")  # the caller's proto is left alone

    result = onnxq.quantize(path, feeds(16, seed=1))
    assert result.report.quantized_op_types.get("MatMul") == 2
    out = tmp_path / "classifier.int8.onnx"
    result.save(out)
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert saved.graph.output[1].type == proto.graph.output[1].type
    assert UNREPRESENTED_TYPES_KEY not in {p.key for p in saved.metadata_props}

    # ONNX Runtime runs it and the probabilities stay close to float's
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    stats = OutputStats("output_probability")
    for feed in feeds(8, seed=2):
        stats.update(reference.run(None, feed)[1], session.run(None, feed)[1])
    assert stats.sqnr_db > 25 and stats.top1 is not None and stats.top1 >= 0.85


def test_the_map_type_is_written_back_beside_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxq.load.files as files

    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 64)  # the branch that writes weights apart
    path = tmp_path / "classifier.onnx"
    proto = zipmap_classifier()
    onnx.save(proto, path)
    out = tmp_path / "classifier.int8.onnx"
    onnxq.quantize(path, feeds(16, seed=1)).save(out)
    assert (tmp_path / "classifier.int8.onnx.data").is_file()
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert saved.graph.output[1].type == proto.graph.output[1].type
    assert UNREPRESENTED_TYPES_KEY not in {p.key for p in saved.metadata_props}
    assert (
        len(ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, feeds(1, seed=2)[0])) == 2
    )


def test_validation_compares_maps_as_scores_and_labels_exactly(tmp_path: Path) -> None:
    path = tmp_path / "classifier.onnx"
    onnx.save(zipmap_classifier(), path)
    result = onnxq.quantize(path, feeds(16, seed=1))
    result.validate(feeds(8, seed=2))
    rows = {row.output: row for row in result.report.accuracy}
    assert rows["output_probability"].sqnr_db > 25 and rows["output_probability"].cosine > 0.99
    label = rows["label"]
    assert np.isnan(label.sqnr_db) and np.isnan(label.cosine)  # a class number is right or wrong
    assert label.top1 is not None and 0.85 <= label.top1 <= 1.0
    assert all(row.output != "label" for row in result.report.large_loss)


def test_outputs_as_arrays() -> None:
    rows = [{1: 0.25, 0: 0.75}, {0: 0.5, 1: 0.5}]
    np.testing.assert_array_equal(as_array(rows), [[0.75, 0.25], [0.5, 0.5]])  # label order
    np.testing.assert_array_equal(as_array(np.array(rows, dtype=object)), [[0.75, 0.25], [0.5, 0.5]])
    assert as_array([np.zeros(3), np.ones(3)]).shape == (2, 3)
    stats = OutputStats("label")
    stats.update(np.array(["cat", "dog"]), np.array(["cat", "cow"]))
    assert stats.exact and stats.top1 == 0.5 and np.isnan(stats.sqnr_db)
    stats.update(np.array([1, 2]), np.array([1]))  # one label fewer: compared padded, a miss
    assert stats.top1 == 0.5 and stats.length_changes == 1
    with pytest.raises(ValueError, match="shape mismatch"):
        stats.update(np.array([1, 2]), np.array([[1, 2]]))
