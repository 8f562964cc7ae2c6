"""Pixel-repeating Resize nodes become a channels-last Expand on the integer tensor (rule 7b).

Which Resize nodes repeat is checked against ONNX Runtime itself: every combination of coordinate
transformation mode, nearest mode and factor is run on a ramp and compared with ``np.repeat``, and
:func:`repeat_factors` must agree both ways. Rewritten graphs must compute the same integers.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.config import LatencyGuardConfig, QuantConfig
from onnxq.rewrite.fuse_qlinear import QDQ_PASS_THROUGH_RULES, FuseQLinearPass
from onnxq.rewrite.nearest_upsample import repeat_factors

CTMS = ("asymmetric", "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "align_corners")
NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")
FACTORS = ((2, 2), (3, 3), (4, 4), (2, 3))


def _resize_model(
    shape: list[int | str],
    factors: tuple[int, int] | None,
    *,
    ctm: str = "asymmetric",
    nearest_mode: str = "floor",
    sizes: list[int] | None = None,
    quantized: bool = True,
    opset: int = 17,
) -> onnx.ModelProto:
    """[Q → DQ →] Resize(nearest) [→ Q → DQ] with equal parameters on both sides."""
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]  # required below opset 13
    resize_inputs = ["xd" if quantized else "x", "roi"]
    if factors is not None:
        inits.append(numpy_helper.from_array(np.array([1, 1, *factors], np.float32), "scales"))
        resize_inputs.append("scales")
    else:
        assert sizes is not None
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        resize_inputs += ["", "sizes"]
    resize = helper.make_node(
        "Resize",
        resize_inputs,
        ["r" if quantized else "y"],
        mode="nearest",
        coordinate_transformation_mode=ctm,
        nearest_mode=nearest_mode,
    )
    nodes = [resize]
    if quantized:
        inits += [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z")]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
            resize,
            helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
            helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)  # as onnxq's pipeline has them


def _run(model: onnx.ModelProto | ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _resize_node(proto: onnx.ModelProto) -> ir.Node:
    model = ir.from_proto(proto)
    (node,) = [n for n in model.graph if n.op_type == "Resize"]
    return node


@pytest.mark.parametrize(("ctm", "nearest_mode"), list(itertools.product(CTMS, NEAREST_MODES)))
def test_repeat_factors_agree_with_onnxruntime(ctm: str, nearest_mode: str) -> None:
    """repeat_factors claims a repeat exactly when ORT's Resize equals np.repeat at every length tried.

    (``align_corners`` depends on the length: it is always declined, even where it happens to repeat.)
    """
    for fh, fw in FACTORS:
        repeats = []
        for h, w in [(1, 1), (3, 5), (7, 2)]:
            proto = _resize_model([1, 2, h, w], (fh, fw), ctm=ctm, nearest_mode=nearest_mode, quantized=False)
            x = np.arange(2 * h * w, dtype=np.float32).reshape(1, 2, h, w)
            repeats.append(np.array_equal(_run(proto, x), np.repeat(np.repeat(x, fh, axis=2), fw, axis=3)))
            claimed = repeat_factors(_resize_node(proto), 17)
            assert claimed in (None, (fh, fw))
        if ctm == "align_corners":
            assert claimed is None
        else:
            assert (claimed is not None) == all(repeats), f"{ctm}/{nearest_mode} x{fh}x{fw}: {repeats}"


def test_common_exports_repeat() -> None:
    """torch.nn.Upsample / Paddle (asymmetric, floor) at any factor; torch's default half-pixel ×2."""
    for factors in FACTORS:
        assert repeat_factors(_resize_node(_resize_model([1, 2, 4, 4], factors)), 17) == factors
    half = _resize_model([1, 2, 4, 4], (2, 2), ctm="half_pixel", nearest_mode="round_prefer_floor")
    assert repeat_factors(_resize_node(half), 17) == (2, 2)
    assert repeat_factors(_resize_node(_resize_model([1, 2, 4, 4], (2, 2))), 10) is None  # opset 10's Resize


def _lower(proto: onnx.ModelProto, table: str) -> ir.Model:
    model = ir.from_proto(proto)
    fuse = FuseQLinearPass(table=QDQ_PASS_THROUGH_RULES) if table == "qdq" else FuseQLinearPass()
    fuse(model)
    onnx.checker.check_model(ir.to_proto(model))
    assert fuse.lowered["Expand"] == 1 and not fuse.declined
    return model


@pytest.mark.parametrize("table", ["qdq", "qoperator"])
@pytest.mark.parametrize(
    ("shape", "factors", "sizes", "opset"),
    [
        ([1, 3, 5, 4], (2, 2), None, 17),
        ([2, 3, 5, 4], (2, 3), None, 17),
        (["N", 3, "H", "W"], (4, 4), None, 17),  # dynamic dims: the target shape comes from Shape
        ([1, 3, 5, 4], None, [1, 3, 10, 12], 17),  # sizes on a static input
        (["N", 3, "H", "W"], (2, 2), None, 12),  # Unsqueeze with its axes attribute
    ],
    ids=["x2", "batch2-2x3", "dynamic-x4", "sizes", "opset12"],
)
def test_rewrite_computes_the_same_integers(
    table: str, shape: list[int | str], factors: tuple[int, int] | None, sizes: list[int] | None, opset: int
) -> None:
    proto = _resize_model(shape, factors, sizes=sizes, opset=opset)
    lowered = _lower(proto, table)
    ops = [n.op_type for n in lowered.graph]
    assert "Resize" not in ops and "Expand" in ops
    expand = next(n for n in lowered.graph if n.op_type == "Expand")
    assert expand.inputs[0] is not None and expand.inputs[0].dtype == ir.DataType.UINT8
    rng = np.random.default_rng(0)
    for batch, h, w in [(1, 5, 4), (2, 5, 4), (1, 7, 3)]:
        if isinstance(shape[2], int) and (h, w) != (shape[2], shape[3]):
            continue
        dims = [batch if isinstance(shape[0], str) else shape[0], 3, h, w]
        x = rng.standard_normal(dims).astype(np.float32)
        expected = _run(proto, x)
        np.testing.assert_array_equal(_run(lowered, x), expected)


def test_non_repeating_resize_stays_a_resize() -> None:
    proto = _resize_model([1, 3, 5, 4], (2, 2), ctm="align_corners", nearest_mode="round_prefer_floor")
    model = ir.from_proto(proto)
    fuse = FuseQLinearPass(table=QDQ_PASS_THROUGH_RULES)
    fuse(model)
    assert "Resize" in [n.op_type for n in model.graph] and "Expand" not in fuse.lowered


def _fpn(upsample_ctm: str) -> onnx.ModelProto:
    """Conv → Relu → Resize ×2 → Add(skip Conv) → Conv: the top-down step of an FPN neck."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((8, 3, 1, 1)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32), "w3"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "Resize",
            ["r1", "", "scales"],
            ["u"],
            mode="nearest",
            coordinate_transformation_mode=upsample_ctm,
            nearest_mode="floor",
        ),
        helper.make_node("Conv", ["x", "w2"], ["c2"]),
        helper.make_node("Add", ["u", "c2"], ["a"]),
        helper.make_node("Conv", ["a", "w3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "fpn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_quantized_fpn_upsamples_on_integers_and_matches_float() -> None:
    """Through onnxq.quantize: the upsample becomes the Expand form and the output stays accurate."""
    proto = _fpn("asymmetric")
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((1, 3, 16, 12)).astype(np.float32)} for _ in range(8)]
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=False))
    result = onnxq.quantize(proto, calib, config=config, show_progress=False)
    quantized = ir.to_proto(result.model)
    ops = [n.op_type for n in quantized.graph.node]
    assert "Resize" not in ops and ops.count("Expand") == 1
    for shape in [(1, 3, 16, 12), (2, 3, 16, 12)]:  # held-out samples; a batch of two
        x = rng.standard_normal(shape).astype(np.float32)
        ref, out = _run(proto, x), _run(quantized, x)
        sqnr = 10 * np.log10(
            np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)
        )
        assert sqnr > 25.0, f"{shape}: {sqnr:.1f} dB"


def test_old_opset_upsample_becomes_the_expand_form() -> None:
    """An opset-9 ``Upsample`` (old darknet/YOLO exports) reaches the rule through the opset upgrade."""
    proto = _fpn("asymmetric")
    graph = proto.graph
    resize = next(n for n in graph.node if n.op_type == "Resize")
    upsample = helper.make_node("Upsample", ["r1", "scales"], ["u"], mode="nearest")
    nodes = [upsample if n is resize else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", 9))
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((1, 3, 16, 12)).astype(np.float32)} for _ in range(8)]
    config = QuantConfig(latency_guard=LatencyGuardConfig(enabled=False))
    quantized = ir.to_proto(onnxq.quantize(proto, calib, config=config, show_progress=False).model)
    ops = [n.op_type for n in quantized.graph.node]
    assert "Resize" not in ops and "Upsample" not in ops and ops.count("Expand") == 1
    x = rng.standard_normal((1, 3, 16, 12)).astype(np.float32)
    ref = _run(proto, x).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - _run(quantized, x)) ** 2))
    assert sqnr > 25.0, f"{sqnr:.1f} dB"
