"""Tests for FuseQLinearPass: QDQ graphs lowered to ONNX Runtime's integer operators.

Two kinds of input: float models quantized by onnxq's static pipeline (``onnxq.quantize``), and QDQ graphs
written by hand (int8 weights as initializers) for what onnxq does not emit: outputs without Q, odd
parameters, subgraphs. Every lowered model is checked for structure (op counts, which value feeds which
node) and run against its QDQ original in ONNX Runtime at ORT_DISABLE_ALL on held-out inputs: quantized
outputs agree within two output steps (``2 * y_scale``; integer kernels and float-then-round may differ
by one), float outputs within a tight relative tolerance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.config import ActivationScheme, QuantConfig, WeightScheme
from onnxq.rewrite.fuse_qlinear import MS_DOMAIN, FuseQLinearPass
from onnxq.runtime.kernels import kernel_table

Feed = dict[str, np.ndarray]

CALIBRATION_SAMPLES = 16
EVAL_SAMPLES = 6

# The lowering of calibrated products (QLinearMatMul, QGemm, ...): run-time ranges off.
UINT8 = QuantConfig(run_time_ranges=False)
INT8_SYMMETRIC = QuantConfig(
    activations=ActivationScheme(dtype="int8", symmetric=True), run_time_ranges=False
)
INT8_ASYMMETRIC = QuantConfig(
    activations=ActivationScheme(dtype="int8", symmetric=False), run_time_ranges=False
)
PER_TENSOR = QuantConfig(weights=WeightScheme(per_channel=False), run_time_ranges=False)
CONFIGS = {
    "uint8": UINT8,
    "int8-symmetric": INT8_SYMMETRIC,
    "int8-asymmetric": INT8_ASYMMETRIC,
    "per-tensor-weights": PER_TENSOR,
}


# ---------------------------------------------------------------------------------------------------
# Helpers


def _proto(body: str, arrays: Mapping[str, np.ndarray] | None = None, *, opset: int = 17) -> onnx.ModelProto:
    """A checked model (IR 10) from parser text; unnamed nodes are named ``<OpType>_<index>``."""
    proto = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\n{body}')
    for name, array in (arrays or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    onnx.checker.check_model(proto)
    return proto


def _weights(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0.0, 0.3, shape).astype(np.float32) for name, shape in shapes.items()}


def _int8(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(-100, 100, shape).astype(np.int8)


def _q(
    prefix: str, scale: float, zero_point: int, dtype: type[np.integer] = np.uint8
) -> dict[str, np.ndarray]:
    """Scalar scale ``<prefix>_s`` and zero point ``<prefix>_z`` initializers."""
    return {f"{prefix}_s": np.array(scale, np.float32), f"{prefix}_z": np.array(zero_point, dtype)}


def _feeds(proto: onnx.ModelProto, count: int, seed: int) -> list[Feed]:
    """Standard-normal float inputs of the declared shapes; bool inputs alternate."""
    rng = np.random.default_rng(seed)
    feeds: list[Feed] = []
    for i in range(count):
        feed: Feed = {}
        for value in proto.graph.input:
            tensor = value.type.tensor_type
            shape = [d.dim_value for d in tensor.shape.dim]
            if tensor.elem_type == onnx.TensorProto.BOOL:
                feed[value.name] = np.array(i % 2 == 0)
            else:
                feed[value.name] = rng.normal(0.0, 1.0, shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _quantize(proto: onnx.ModelProto, config: QuantConfig | None = None) -> ir.Model:
    """onnxq's static pipeline (QDQ), calibrated on seeded random data (products on calibrated ranges:
    their lowering is what these tests check)."""
    result = onnxq.quantize(proto, _feeds(proto, CALIBRATION_SAMPLES, seed=1), config or UINT8)
    return result.model


def _lower(model: ir.Model, **options: bool) -> tuple[ir.Model, FuseQLinearPass, bool]:
    """Apply the pass to a clone of ``model``; the lowered model must pass the ONNX checker."""
    lowered = model.clone()
    fuse = FuseQLinearPass(**options)
    result = fuse(lowered)
    assert result.model is lowered
    onnx.checker.check_model(ir.to_proto(lowered))
    return lowered, fuse, result.modified


def _session(model: ir.Model | onnx.ModelProto) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _outputs(model: ir.Model | onnx.ModelProto, feeds: list[Feed]) -> dict[str, np.ndarray]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    runs = [session.run(None, feed) for feed in feeds]
    return {name: np.stack([np.asarray(r[i]) for r in runs]) for i, name in enumerate(names)}


def _output_steps(model: ir.Model) -> dict[str, float | None]:
    """Per graph output: the scale of the DequantizeLinear that produces it (None: a float output)."""
    steps: dict[str, float | None] = {}
    for value in model.graph.outputs:
        producer = value.producer()
        step = None
        if producer is not None and producer.op_type == "DequantizeLinear":
            scale = producer.inputs[1]
            assert scale is not None and scale.const_value is not None
            step = float(scale.const_value.numpy().reshape(-1)[0])
        steps[value.name or ""] = step
    return steps


def _assert_equivalent(
    qdq: ir.Model | onnx.ModelProto,
    lowered: ir.Model,
    *,
    seed: int = 99,
    float_rtol: float = 1e-5,
    float_atol: float = 1e-6,
) -> None:
    """QDQ and lowered model agree on held-out inputs: within 2 output steps, or tightly for floats."""
    qdq_model = qdq if isinstance(qdq, ir.Model) else ir.from_proto(qdq)
    feeds = _feeds(ir.to_proto(qdq_model), EVAL_SAMPLES, seed)
    expected, actual = _outputs(qdq_model, feeds), _outputs(lowered, feeds)
    assert expected.keys() == actual.keys()
    for name, step in _output_steps(qdq_model).items():
        diff = float(np.max(np.abs(expected[name].astype(np.float64) - actual[name])))
        if step is not None:
            bound = 2 * step * (1 + 1e-6)
        else:
            bound = float_rtol * float(np.max(np.abs(expected[name]))) + float_atol
        assert diff <= bound, f"output {name}: max abs diff {diff:.3g} > {bound:.3g}"


def _only(model: ir.Model, op_type: str) -> ir.Node:
    found = [node for node in model.graph.all_nodes() if node.op_type == op_type]
    assert len(found) == 1, f"expected one {op_type}, found {len(found)}"
    return found[0]


def _producer(value: ir.Value | None) -> ir.Node:
    assert value is not None
    producer = value.producer()
    assert producer is not None
    return producer


def _quantized_input(model: ir.Model, name: str) -> ir.Value:
    """The output of the QuantizeLinear that reads graph input ``name``."""
    readers = [n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0] is not None]
    (q,) = [n for n in readers if n.inputs[0].name == name]  # type: ignore[union-attr]
    return q.outputs[0]


def _const(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None, "expected an initializer"
    return value.const_value.numpy()


# ---------------------------------------------------------------------------------------------------
# Rule 1: Conv → QLinearConv (onnxq-quantized models)

CONV_RELU = """
conv_relu (float[1,3,8,8] x) => (float[1,4,8,8] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}
"""
CONV_NO_BIAS = """
conv (float[1,3,8,8] x) => (float[1,4,8,8] y) {
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [1, 1]> (x, w)
}
"""


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_conv_relu_lowered_for_every_scheme(scheme: str) -> None:
    proto = _proto(CONV_RELU, _weights(0, w=(4, 3, 3, 3), b=(4,)))
    qdq = _quantize(proto, CONFIGS[scheme])
    lowered, fuse, modified = _lower(qdq)

    assert modified
    assert fuse.lowered["QLinearConv"] == 1 and not builders.lines(fuse.declined)
    counts = builders.op_counts(lowered)
    assert counts["Conv"] == 0
    qconv = _only(lowered, "QLinearConv")
    # Rewiring: the integer kernel reads the quantized input and shares its scale/zero point.
    x_q = _quantized_input(lowered, "x")
    assert qconv.inputs[0] is x_q
    assert qconv.inputs[1] is _producer(x_q).inputs[1]
    assert _const(qconv.inputs[8]).dtype == np.int32  # bias stays int32
    w_scale = _const(qconv.inputs[4])
    assert w_scale.size == (1 if scheme == "per-tensor-weights" else 4)
    assert qconv.attributes["pads"].as_ints() == (1, 1, 1, 1)
    if scheme == "int8-symmetric":
        # Zero point 0 does not clamp at 0: onnxq keeps the Relu with its own Q/DQ, and so does lowering.
        assert counts["Relu"] == 1
        assert _producer(_only(lowered, "Relu").inputs[0]).op_type == "DequantizeLinear"
    else:
        assert counts["Relu"] == 0
        assert counts["DequantizeLinear"] == 1 and counts["QuantizeLinear"] == 1
    assert MS_DOMAIN not in lowered.opset_imports  # default-domain ops only
    _assert_equivalent(qdq, lowered)


def test_conv_without_bias_and_clip_absorbed() -> None:
    body = """
    conv_clip (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        k = Clip (c, lo, hi)
        y = Conv <kernel_shape = [1, 1]> (k, w2)
    }
    """
    arrays = {
        **_weights(1, w1=(4, 3, 3, 3), w2=(4, 4, 1, 1)),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(0.5, np.float32),
    }
    qdq = _quantize(_proto(body, arrays))
    assert builders.op_counts(qdq)["Clip"] == 1
    lowered, fuse, modified = _lower(qdq)

    assert modified and fuse.lowered == {"QLinearConv": 2} and not builders.lines(fuse.declined)
    counts = builders.op_counts(lowered)
    assert counts["Clip"] == 0 and counts["Conv"] == 0
    first, second = [n for n in lowered.graph if n.op_type == "QLinearConv"]
    assert len(first.inputs) == 8  # no bias
    assert second.inputs[0] is first.outputs[0]
    _assert_equivalent(qdq, lowered)


def test_conv_with_strides_keeps_attributes() -> None:
    qdq = _quantize(_proto(CONV_NO_BIAS, _weights(2, w=(4, 3, 3, 3))), INT8_ASYMMETRIC)
    lowered, _, _ = _lower(qdq)
    qconv = _only(lowered, "QLinearConv")
    assert qconv.attributes["strides"].as_ints() == (1, 1)
    assert qconv.attributes["kernel_shape"].as_ints() == (3, 3)
    assert _const(qconv.inputs[2]).dtype == np.int8
    _assert_equivalent(qdq, lowered)


# ---------------------------------------------------------------------------------------------------
# Rules 1 and 8 on hand-written QDQ graphs

CONV_QDQ = """
conv_qdq (float[1,3,6,6] x) => (float[1,4,6,6] y) {{
    xq = QuantizeLinear (x, x_s, x_z)
    xd = DequantizeLinear (xq, x_s, x_z)
    wd = DequantizeLinear <axis = 0> (wq, w_s, w_z)
    {bias_dq}
    {conv_out} = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xd, wd{bias})
    {activation}
    yq = QuantizeLinear (a, y_s, y_z)
    y = DequantizeLinear (yq, y_s, y_z)
}}
"""
W_SCALE = np.array([0.004, 0.005, 0.006, 0.003], np.float32)


CLIP_BOUNDS = {
    name: np.array(value, np.float32) for name, value in {"lo": 0, "hi": 6, "m1": -1, "p1": 1}.items()
}


def _conv_qdq(
    activation: str | None = None,
    *,
    y: tuple[float, int] = (8 / 255, 128),
    dtype: type[np.integer] = np.uint8,
    bias: np.ndarray | None = None,
    bias_scale: np.ndarray | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """x → Q/DQ, int8 per-channel weight → Conv [+ bias] [→ activation ``a = Op (c)``] → Q/DQ → y.

    An int32 ``bias`` is read through a DequantizeLinear (scale x_scale × w_scale unless ``bias_scale``),
    a float one directly.
    """
    x_zero = 128 if dtype is np.uint8 else 0
    arrays: dict[str, np.ndarray] = {
        **_q("x", 4 / 255, x_zero, dtype),
        **_q("y", y[0], y[1], dtype),
        "wq": _int8(3, (4, 3, 3, 3)),
        "w_s": W_SCALE,
        "w_z": np.zeros(4, np.int8),
        **(extra or {}),
    }
    bias_dq, bias_text = "", ""
    if bias is not None and bias.dtype == np.int32:
        arrays["bq"] = bias
        arrays["b_s"] = (
            (np.float32(4 / 255) * W_SCALE).astype(np.float32) if bias_scale is None else bias_scale
        )
        bias_dq, bias_text = "bd = DequantizeLinear <axis = 0> (bq, b_s)", ", bd"
    elif bias is not None:
        arrays["bf"] = bias
        bias_text = ", bf"
    body = CONV_QDQ.format(
        bias_dq=bias_dq,
        bias=bias_text,
        conv_out="a" if activation is None else "c",
        activation=activation or "",
    )
    return _proto(body, arrays)


@pytest.mark.parametrize(
    ("activation", "y", "dtype"),
    [
        ("a = Relu (c)", (6 / 255, 0), np.uint8),
        ("a = Relu (c)", (6 / 255, -128), np.int8),
        ("a = Clip (c, lo, hi)", (6 / 255, 0), np.uint8),  # range [0, 6] = Clip range
        ("a = Clip (c, lo, hi)", (6 / 255, -128), np.int8),
        ("a = Clip (c, m1, p1)", (1 / 128, 0), np.int8),  # range [-1, 0.992] inside [-1, 1]
    ],
    ids=["relu-uint8", "relu-int8-zp-min", "clip-uint8", "clip-int8", "clip-symmetric"],
)
def test_activation_absorbed_when_the_output_range_clamps(
    activation: str, y: tuple[float, int], dtype: type[np.integer]
) -> None:
    bounds = CLIP_BOUNDS
    proto = _conv_qdq(activation, y=y, dtype=dtype, extra=bounds)
    lowered, fuse, modified = _lower(ir.from_proto(proto))

    assert modified and fuse.lowered == {"QLinearConv": 1} and not builders.lines(fuse.declined)
    counts = builders.op_counts(lowered)
    assert counts["Relu"] == 0 and counts["Clip"] == 0 and counts["Conv"] == 0
    qconv = _only(lowered, "QLinearConv")
    assert _producer(lowered.graph.outputs[0]).inputs[0] is qconv.outputs[0]
    _assert_equivalent(proto, lowered)


@pytest.mark.parametrize(
    ("activation", "y", "dtype", "reason"),
    [
        ("a = Relu (c)", (6 / 127, 0), np.int8, "zero point 0 is not the lowest int8"),
        ("a = Relu (c)", (6 / 255, 10), np.uint8, "zero point 10 is not the lowest uint8"),
        ("a = Clip (c, lo, hi)", (10 / 255, 0), np.uint8, "is not inside [0, 6]"),
        ("a = Clip (c, m1, p1)", (1 / 127, 0), np.int8, "is not inside [-1, 1]"),  # -128/127 < -1 - step/2
        (
            "hi2 = Abs (hi)\n    a = Clip (c, lo, hi2)",
            (6 / 255, 0),
            np.uint8,
            "bounds that are not constants",
        ),
    ],
    ids=["relu-symmetric-int8", "relu-zp-10", "clip-wider", "clip-half-step", "clip-dynamic"],
)
def test_activation_not_covered_by_the_output_range_is_declined(
    activation: str, y: tuple[float, int], dtype: type[np.integer], reason: str
) -> None:
    bounds = CLIP_BOUNDS
    proto = _conv_qdq(activation, y=y, dtype=dtype, extra=bounds)
    lowered, fuse, modified = _lower(ir.from_proto(proto))

    assert not modified and not fuse.lowered
    assert len(builders.lines(fuse.declined)) == 1
    assert builders.lines(fuse.declined)[0].startswith("Conv_3 not lowered: ")
    assert reason in builders.lines(fuse.declined)[0]
    assert builders.op_counts(lowered)["Conv"] == 1 and builders.op_counts(lowered)["QLinearConv"] == 0


def test_input_dq_still_read_as_float_stays() -> None:
    proto = _conv_qdq()
    sigmoid = onnx.helper.make_node("Sigmoid", ["xd"], ["z"], name="Sigmoid_float")
    proto.graph.node.insert(2, sigmoid)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3, 6, 6]))
    lowered, fuse, modified = _lower(ir.from_proto(proto))

    assert modified and fuse.lowered == {"QLinearConv": 1}
    counts = builders.op_counts(lowered)
    assert counts["DequantizeLinear"] == 2  # x's DQ (read by the Sigmoid) and the output's
    x_dq = _producer(_only(lowered, "Sigmoid").inputs[0])
    assert x_dq.op_type == "DequantizeLinear" and x_dq.inputs[0] is _quantized_input(lowered, "x")
    assert not any(n.op_type == "DequantizeLinear" and n.inputs[0] is not None and n.inputs[0].name == "wq"
                   for n in lowered.graph)  # fmt: skip
    _assert_equivalent(proto, lowered)


def test_conv_bias_int32_reused_and_float_bias_quantized() -> None:
    bias = np.array([100, -250, 40, 0], np.int32)
    proto = _conv_qdq(bias=bias)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QLinearConv": 1}
    qconv = _only(lowered, "QLinearConv")
    assert qconv.inputs[8] is not None and qconv.inputs[8].name == "bq"  # the int32 tensor as it was
    assert builders.op_counts(lowered)["DequantizeLinear"] == 1  # the bias and weight DQs are gone
    _assert_equivalent(proto, lowered)

    float_bias = np.array([0.3, -0.2, 0.05, 0.0], np.float32)
    proto = _conv_qdq(bias=float_bias)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QLinearConv": 1}
    stored = _const(_only(lowered, "QLinearConv").inputs[8])
    assert stored.dtype == np.int32
    np.testing.assert_array_equal(
        stored, np.rint(float_bias / (np.float32(4 / 255) * W_SCALE).astype(np.float64))
    )
    _assert_equivalent(proto, lowered)


def test_conv_bias_with_wrong_scale_is_declined() -> None:
    bias = np.array([100, -250, 40, 0], np.int32)
    wrong = np.full(4, 0.0001, np.float32)
    proto = _conv_qdq(bias=bias, bias_scale=wrong)
    _, fuse, modified = _lower(ir.from_proto(proto))
    assert not modified
    assert (
        len(builders.lines(fuse.declined)) == 1
        and "bias scale 0.0001 is not input scale × weight scale" in builders.lines(fuse.declined)[0]
    )


def test_conv_weight_not_constant_is_declined() -> None:
    body = """
    conv_dynamic_weight (float[1,3,6,6] x, int8[4,3,3,3] wq) => (float[1,4,6,6] y) {
        xq = QuantizeLinear (x, x_s, x_z)
        xd = DequantizeLinear (xq, x_s, x_z)
        wd = DequantizeLinear (wq, w_s, w_z)
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xd, wd)
        yq = QuantizeLinear (c, y_s, y_z)
        y = DequantizeLinear (yq, y_s, y_z)
    }
    """
    arrays = {**_q("x", 4 / 255, 128), **_q("w", 0.005, 0, np.int8), **_q("y", 8 / 255, 128)}
    proto = _proto(body, arrays)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert not modified
    assert builders.lines(fuse.declined) == ["Conv_3 not lowered: weight is not a constant"]
    assert fuse.lowered == {}
    assert builders.op_counts(lowered) == builders.op_counts(ir.from_proto(proto))


def test_conv_int8_input_with_uint8_weight_is_declined() -> None:
    body = """
    conv_u8_weight (float[1,3,6,6] x) => (float[1,4,6,6] y) {
        xq = QuantizeLinear (x, x_s, x_z)
        xd = DequantizeLinear (xq, x_s, x_z)
        wd = DequantizeLinear (wq, w_s, w_z)
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xd, wd)
        yq = QuantizeLinear (c, y_s, y_z)
        y = DequantizeLinear (yq, y_s, y_z)
    }
    """
    arrays = {
        **_q("x", 4 / 127, 0, np.int8),
        **_q("w", 0.005, 128),
        **_q("y", 8 / 127, 0, np.int8),
        "wq": np.random.default_rng(0).integers(0, 255, (4, 3, 3, 3)).astype(np.uint8),
    }
    _, fuse, modified = _lower(ir.from_proto(_proto(body, arrays)))
    assert not modified
    assert builders.lines(fuse.declined) == [
        "Conv_3 not lowered: int8 activations with uint8 weights have no kernel in ONNX Runtime"
    ]


def test_conv_weight_without_zero_point_gets_one() -> None:
    proto = _conv_qdq()
    for node in proto.graph.node:
        if node.output[0] == "wd":
            del node.input[2]  # int8 data, zero point omitted (reads as 0)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QLinearConv": 1}
    w_zero = _const(_only(lowered, "QLinearConv").inputs[5])
    assert w_zero.dtype == np.int8 and w_zero.shape == (4,) and not w_zero.any()
    _assert_equivalent(proto, lowered)


CONV_FLOAT_OUTPUT = """
conv_float_out (float[1,3,6,6] x) => (float[1,4,6,6] y) {
    xq = QuantizeLinear (x, x_s, x_z)
    xd = DequantizeLinear (xq, x_s, x_z)
    wd = DequantizeLinear <axis = 0> (wq, w_s, w_z)
    bd = DequantizeLinear <axis = 0> (bq, b_s)
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xd, wd, bd)
}
"""


def _conv_float_output(w_zero: np.ndarray) -> onnx.ModelProto:
    w_scale = np.array([0.004, 0.005, 0.006, 0.003], np.float32)
    arrays = {
        **_q("x", 4 / 255, 128),
        "wq": _int8(4, (4, 3, 3, 3)),
        "w_s": w_scale,
        "w_z": w_zero,
        "bq": np.array([300, -120, 0, 77], np.int32),
        "b_s": (np.float32(4 / 255) * w_scale).astype(np.float32),
    }
    return _proto(CONV_FLOAT_OUTPUT, arrays)


def test_conv_without_output_q_declined_by_default() -> None:
    proto = _conv_float_output(np.zeros(4, np.int8))
    _, fuse, modified = _lower(ir.from_proto(proto))
    assert not modified
    assert builders.lines(fuse.declined) == [
        "Conv_4 not lowered: its output is not quantized (ConvInteger lowering is off: conv_integer=False)"
    ]


def test_conv_without_output_q_to_conv_integer() -> None:
    proto = _conv_float_output(np.zeros(4, np.int8))
    if not kernel_table().runs("", "ConvInteger", 17, {0: ir.DataType.UINT8, 1: ir.DataType.INT8}):
        # onnxruntime before 1.20 has ConvInteger for uint8 weights only: declined, never emitted.
        _, fuse, modified = _lower(ir.from_proto(proto), conv_integer=True)
        assert not modified
        assert (
            len(builders.lines(fuse.declined)) == 1
            and "no CPU kernel for ConvInteger-10 with" in builders.lines(fuse.declined)[0]
        )
        return
    lowered, fuse, modified = _lower(ir.from_proto(proto), conv_integer=True)
    assert modified and fuse.lowered == {"ConvInteger": 1} and not builders.lines(fuse.declined)
    counts = builders.op_counts(lowered)
    assert counts["Conv"] == 0 and counts["DequantizeLinear"] == 0
    assert counts["ConvInteger"] == counts["Cast"] == counts["Mul"] == counts["Add"] == 1
    conv = _only(lowered, "ConvInteger")
    assert conv.inputs[0] is _quantized_input(lowered, "x")
    mul = _only(lowered, "Mul")
    assert _const(mul.inputs[1]).shape == (1, 4, 1, 1)
    add = _only(lowered, "Add")
    assert lowered.graph.outputs[0] is add.outputs[0] and add.outputs[0].name == "y"
    _assert_equivalent(proto, lowered)


def test_rules_decline_what_the_installed_runtime_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rule asks the kernel table before rewriting: a runtime without the kernel gets QDQ kept."""
    real = kernel_table()

    class WithoutQLinearConv:
        def problem(self, domain: str, op_type: str, opset: int, types: object = None) -> str | None:
            if op_type == "QLinearConv":
                return "onnxruntime 0.0 has no CPU kernel for QLinearConv-10 with T1=uint8"
            return real.problem(domain, op_type, opset, types)  # type: ignore[arg-type]

    monkeypatch.setattr("onnxq.rules.kernel_table", WithoutQLinearConv)
    model = onnxq.quantize(
        builders.conv_relu_model(), [{"x": s} for s in builders.conv_calibration(samples=4)]
    ).model
    lowered, fuse, _ = _lower(model)
    assert builders.op_counts(lowered)["QLinearConv"] == 0 and builders.op_counts(lowered)["Conv"] == 1
    assert any(
        line.endswith("not lowered: onnxruntime 0.0 has no CPU kernel for QLinearConv-10 with T1=uint8")
        for line in builders.lines(fuse.declined)
    )


def test_conv_integer_declines_per_channel_weight_zero_points() -> None:
    proto = _conv_float_output(np.array([0, 1, 2, 3], np.int8))
    _, fuse, modified = _lower(ir.from_proto(proto), conv_integer=True)
    assert not modified
    assert builders.lines(fuse.declined) == [
        "Conv_4 not lowered: ConvInteger takes one weight zero point, the weight has one per channel"
    ]


# ---------------------------------------------------------------------------------------------------
# Rule 2: MatMul

MATMUL_CHAIN = """
matmuls (float[2,16] v) => (float[2,5] z) {
    h = MatMul (v, w1)
    z0 = MatMul (h, w2)
    z = Add (z0, b2)
}
"""


@pytest.mark.parametrize("scheme", ["uint8", "int8-asymmetric", "per-tensor-weights"])
def test_matmul_lowered_to_qlinear_and_integer_to_float_with_bias(scheme: str) -> None:
    proto = _proto(MATMUL_CHAIN, _weights(5, w1=(16, 8), w2=(8, 5), b2=(5,)))
    qdq = _quantize(proto, CONFIGS[scheme])
    lowered, fuse, modified = _lower(qdq)

    assert modified and not builders.lines(fuse.declined)
    assert fuse.lowered == {"QLinearMatMul": 1, "MatMulIntegerToFloat": 1}
    counts = builders.op_counts(lowered)
    assert counts["MatMul"] == 0 and counts["Add"] == 0 and counts["DequantizeLinear"] == 0
    qmatmul = _only(lowered, "QLinearMatMul")
    assert _const(qmatmul.inputs[4]).size == (1 if scheme == "per-tensor-weights" else 8)  # per column
    to_float = _only(lowered, "MatMulIntegerToFloat")
    assert to_float.domain == MS_DOMAIN and lowered.opset_imports[MS_DOMAIN] == 1
    assert to_float.inputs[0] is qmatmul.outputs[0]
    assert to_float.inputs[6] is not None and to_float.inputs[6].name == "b2"  # the Add's bias, folded
    assert lowered.graph.outputs[0] is to_float.outputs[0] and to_float.outputs[0].name == "z"
    _assert_equivalent(qdq, lowered)


def test_matmul_without_ms_domain_uses_matmul_integer() -> None:
    proto = _proto(MATMUL_CHAIN, _weights(5, w1=(16, 8), w2=(8, 5), b2=(5,)))
    qdq = _quantize(proto)
    lowered, fuse, modified = _lower(qdq, ms_domain=False)

    assert modified and fuse.lowered == {"QLinearMatMul": 1, "MatMulInteger": 1}
    counts = builders.op_counts(lowered)
    assert counts["MatMulInteger"] == counts["Cast"] == counts["Mul"] == 1
    assert counts["Add"] + counts["Sum"] == 1  # the float bias add stays (onnxq's QDQ form writes a Sum)
    assert MS_DOMAIN not in lowered.opset_imports
    assert all(node.domain == "" for node in lowered.graph)
    assert _const(_only(lowered, "Mul").inputs[1]).shape == (5,)  # a_scale × per-column b_scale
    _assert_equivalent(qdq, lowered)


def test_matmul_of_two_activations() -> None:
    body = """
    attention_like (float[2,3,4] a, float[2,4,5] b) => (float[2,3,5] y) {
        aq = QuantizeLinear (a, a_s, a_z)
        ad = DequantizeLinear (aq, a_s, a_z)
        bq = QuantizeLinear (b, b_s, b_z)
        bd = DequantizeLinear (bq, b_s, b_z)
        m = MatMul (ad, bd)
        yq = QuantizeLinear (m, y_s, y_z)
        y = DequantizeLinear (yq, y_s, y_z)
    }
    """
    arrays = {**_q("a", 0.03, 120), **_q("b", 0.025, 130), **_q("y", 0.08, 128)}
    proto = _proto(body, arrays)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QLinearMatMul": 1}
    qmatmul = _only(lowered, "QLinearMatMul")
    assert qmatmul.inputs[0] is _quantized_input(lowered, "a")
    assert qmatmul.inputs[3] is _quantized_input(lowered, "b")
    _assert_equivalent(proto, lowered)


MATMUL_WEIGHT = """
matmul_weight (float[2,3,4] a) => (float[2,3,5] y) {{
    aq = QuantizeLinear (a, a_s, a_z)
    ad = DequantizeLinear (aq, a_s, a_z)
    bd = DequantizeLinear <axis = {axis}> (bq, b_s, b_z)
    m = MatMul (ad, bd)
    yq = QuantizeLinear (m, y_s, y_z)
    y = DequantizeLinear (yq, y_s, y_z)
}}
"""


@pytest.mark.parametrize(
    ("b_shape", "axis", "channels", "reason"),
    [
        ((2, 4, 5), 2, 5, "input B is quantized per column but has rank 3"),
        ((4, 5), 0, 4, "input B is quantized along axis 0"),
    ],
    ids=["per-column-3d", "per-row"],
)
def test_matmul_per_axis_b_that_runtime_rejects_is_declined(
    b_shape: tuple[int, ...], axis: int, channels: int, reason: str
) -> None:
    arrays = {
        **_q("a", 0.03, 120),
        **_q("y", 0.08, 128),
        "bq": _int8(6, b_shape),
        "b_s": np.linspace(0.002, 0.004, channels).astype(np.float32),
        "b_z": np.zeros(channels, np.int8),
    }
    proto = _proto(MATMUL_WEIGHT.format(axis=axis), arrays)
    _, fuse, modified = _lower(ir.from_proto(proto))
    assert not modified
    assert len(builders.lines(fuse.declined)) == 1 and builders.lines(fuse.declined)[0].startswith(
        "MatMul_3 not lowered: " + reason
    )


def test_matmul_per_column_2d_b_lowered() -> None:
    arrays = {
        **_q("a", 0.03, 120),
        **_q("y", 0.02, 128),
        "bq": _int8(6, (4, 5)),
        "b_s": np.linspace(0.002, 0.004, 5).astype(np.float32),
        "b_z": np.zeros(5, np.int8),
    }
    proto = _proto(MATMUL_WEIGHT.format(axis=-1), arrays)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QLinearMatMul": 1}
    _assert_equivalent(proto, lowered)


# ---------------------------------------------------------------------------------------------------
# Rule 3: Gemm → QGemm

GEMMS = """
gemms (float[2,16] v) => (float[2,5] y) {
    h = Gemm <transB = 1> (v, w1, b1)
    r = Relu (h)
    y = Gemm <alpha = 0.5> (r, w2, b2)
}
"""


@pytest.mark.parametrize("scheme", ["uint8", "int8-asymmetric", "per-tensor-weights"])
def test_gemm_lowered_to_qgemm_with_and_without_output_q(scheme: str) -> None:
    proto = _proto(GEMMS, _weights(7, w1=(8, 16), b1=(8,), w2=(8, 5), b2=(5,)))
    qdq = _quantize(proto, CONFIGS[scheme])
    lowered, fuse, modified = _lower(qdq)

    assert modified and fuse.lowered == {"QGemm": 2} and not builders.lines(fuse.declined)
    counts = builders.op_counts(lowered)
    assert counts["Gemm"] == 0 and counts["Relu"] == 0 and counts["DequantizeLinear"] == 0
    first, second = [n for n in lowered.graph if n.op_type == "QGemm"]
    assert first.domain == second.domain == MS_DOMAIN
    assert len(first.inputs) == 9 and first.attributes["transB"].as_int() == 1  # quantized output
    assert len(second.inputs) == 7 and second.inputs[0] is first.outputs[0]  # float output
    assert second.attributes["alpha"].as_float() == 0.5
    assert _const(second.inputs[6]).dtype == np.int32
    channels = 1 if scheme == "per-tensor-weights" else 5
    assert _const(second.inputs[4]).size == channels  # per output channel: axis 1 of B (transB = 0)
    # The float bias is quantized at alpha × a_scale × b_scale: within half a step of that scale.
    a_scale = float(_const(second.inputs[1]))
    bias_step = 0.5 * a_scale * float(np.max(_const(second.inputs[4])))
    _assert_equivalent(qdq, lowered, float_atol=bias_step * 1.01)


GEMM_QDQ = """
gemm_qdq (float[2,16] v) => (float[2,5] y) {{
    vq = QuantizeLinear (v, v_s, v_z)
    vd = DequantizeLinear (vq, v_s, v_z)
    wd = DequantizeLinear <axis = 0> (wq, w_s, w_z)
    y = Gemm <transB = 1, beta = {beta}> (vd, wd, c)
}}
"""


def _gemm_qdq(beta: float) -> onnx.ModelProto:
    arrays = {
        **_q("v", 0.03, 128),
        "wq": _int8(8, (5, 16)),
        "w_s": np.linspace(0.002, 0.004, 5).astype(np.float32),
        "w_z": np.zeros(5, np.int8),
        "c": np.linspace(-0.5, 0.5, 5).astype(np.float32),
    }
    return _proto(GEMM_QDQ.format(beta=beta), arrays)


def test_gemm_declines() -> None:
    _, fuse, modified = _lower(ir.from_proto(_gemm_qdq(0.5)))
    assert not modified and builders.lines(fuse.declined) == ["Gemm_3 not lowered: beta is not 1"]

    _, fuse, modified = _lower(ir.from_proto(_gemm_qdq(1.0)), ms_domain=False)
    assert not modified
    assert builders.lines(fuse.declined) == [
        "Gemm_3 not lowered: QGemm is a com.microsoft op and ms_domain=False"
    ]

    proto = _gemm_qdq(1.0)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QGemm": 1}
    a_scale, b_scale = 0.03, 0.004
    _assert_equivalent(proto, lowered, float_atol=0.5 * a_scale * b_scale * 1.01)


# ---------------------------------------------------------------------------------------------------
# Rules 4 and 5: Add/Mul and Concat

BINARY = """
binary (float[2,3,4] a, float[3,4] b) => (float[2,3,4] y) {{
    aq = QuantizeLinear (a, a_s, a_z)
    ad = DequantizeLinear (aq, a_s, a_z)
    bq = QuantizeLinear (b, b_s, b_z)
    bd = DequantizeLinear (bq, b_s, b_z)
    s = {op} (ad, bd)
    yq = QuantizeLinear (s, y_s, y_z)
    y = DequantizeLinear (yq, y_s, y_z)
}}
"""


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["uint8", "int8"])
def test_add_and_mul_lowered(op: str, dtype: type[np.integer]) -> None:
    shift = 0 if dtype is np.uint8 else -128
    arrays = {
        **_q("a", 0.03, 128 + shift, dtype),
        **_q("b", 0.02, 120 + shift, dtype),
        **_q("y", 0.05, 100 + shift, dtype),
    }
    proto = _proto(BINARY.format(op=op), arrays)
    lowered, fuse, modified = _lower(ir.from_proto(proto))

    assert modified and fuse.lowered == {f"QLinear{op}": 1}
    node = _only(lowered, f"QLinear{op}")
    assert node.domain == MS_DOMAIN
    assert node.inputs[0] is _quantized_input(lowered, "a") and node.inputs[3] is _quantized_input(
        lowered, "b"
    )
    assert builders.op_counts(lowered)[op] == 0
    _assert_equivalent(proto, lowered)


def test_add_of_mixed_types_is_declined() -> None:
    arrays = {**_q("a", 0.03, 128), **_q("b", 0.02, 0, np.int8), **_q("y", 0.05, 100)}
    _, fuse, modified = _lower(ir.from_proto(_proto(BINARY.format(op="Add"), arrays)))
    assert not modified
    assert builders.lines(fuse.declined) == [
        "Add_4 not lowered: the inputs are uint8 and int8; QLinearAdd takes one type"
    ]


def test_add_mul_concat_from_onnxq() -> None:
    body = """
    branches (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        c2 = Conv <kernel_shape = [1, 1]> (x, w2, b2)
        a = Add (c1, c2)
        m = Mul (a, c2)
        k = Concat <axis = 1> (m, c1)
        y = Conv <kernel_shape = [1, 1]> (k, w3, b3)
    }
    """
    arrays = _weights(9, w1=(4, 3, 3, 3), b1=(4,), w2=(4, 3, 1, 1), b2=(4,), w3=(4, 8, 1, 1), b3=(4,))
    qdq = _quantize(_proto(body, arrays))
    lowered, fuse, modified = _lower(qdq)

    assert modified and not builders.lines(fuse.declined)
    assert fuse.lowered == {"QLinearConv": 3, "QLinearAdd": 1, "QLinearMul": 1, "QLinearConcat": 1}
    counts = builders.op_counts(lowered)
    assert counts["Add"] == counts["Mul"] == counts["Concat"] == counts["Conv"] == 0
    concat = _only(lowered, "QLinearConcat")
    assert concat.attributes["axis"].as_int() == 1
    assert _producer(concat.inputs[2]).op_type == "QLinearMul"
    assert _producer(concat.inputs[5]).op_type == "QLinearConv"
    assert _producer(_only(lowered, "QLinearMul").inputs[0]).op_type == "QLinearAdd"
    _assert_equivalent(qdq, lowered)


# ---------------------------------------------------------------------------------------------------
# Rule 6: pools, Sigmoid, LeakyRelu, Softmax; rule 7 inside an onnxq model

POOLS = """
pools (float[1,3,8,8] x) => (float[1,5] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
    s = Sigmoid (c1)
    p = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (s)
    c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (p, w2, b2)
    l = LeakyRelu <alpha = 0.2> (c2)
    m = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (l)
    c3 = Conv <kernel_shape = [1, 1]> (m, w3, b3)
    g = GlobalAveragePool (c3)
    f = Flatten (g)
    y = Gemm <transB = 1> (f, w4, b4)
}
"""


@pytest.mark.parametrize("scheme", ["uint8", "int8-symmetric"])
def test_pools_and_activations_lowered(scheme: str) -> None:
    arrays = _weights(
        11, w1=(4, 3, 3, 3), b1=(4,), w2=(4, 4, 3, 3), b2=(4,), w3=(6, 4, 1, 1), b3=(6,), w4=(5, 6), b4=(5,)
    )
    qdq = _quantize(_proto(POOLS, arrays), CONFIGS[scheme])
    lowered, fuse, modified = _lower(qdq)

    assert modified and not builders.lines(fuse.declined)
    assert fuse.lowered == {
        "QLinearConv": 3,
        "QLinearSigmoid": 1,
        "QLinearAveragePool": 1,
        "QLinearLeakyRelu": 1,
        "MaxPool": 1,
        "QLinearGlobalAveragePool": 1,
        "Flatten": 1,
        "QGemm": 1,
    }
    counts = builders.op_counts(lowered)
    assert counts["DequantizeLinear"] == 0 and counts["QuantizeLinear"] == 1  # only the input's Q is left
    pool = _only(lowered, "QLinearAveragePool")
    assert pool.attributes["kernel_shape"].as_ints() == (2, 2) and pool.attributes["strides"].as_ints() == (
        2,
        2,
    )
    assert _only(lowered, "QLinearLeakyRelu").attributes["alpha"].as_float() == pytest.approx(0.2)
    assert _only(lowered, "QLinearGlobalAveragePool").attributes["channels_last"].as_int() == 0
    max_pool = _only(lowered, "MaxPool")
    assert max_pool.inputs[0] is _only(lowered, "QLinearLeakyRelu").outputs[0]  # runs on the integers
    assert _only(lowered, "Flatten").outputs[0] is _only(lowered, "QGemm").inputs[0]
    _assert_equivalent(qdq, lowered, float_rtol=1e-4)


SOFTMAX = """
softmax (float[2,3,5] x) => (float[2,3,5] y) {
    xq = QuantizeLinear (x, x_s, x_z)
    xd = DequantizeLinear (xq, x_s, x_z)
    s = Softmax <axis = 1> (xd)
    yq = QuantizeLinear (s, y_s, y_z)
    y = DequantizeLinear (yq, y_s, y_z)
}
"""


@pytest.mark.parametrize("opset", [12, 17])
def test_softmax_lowered_with_the_model_opset(opset: int) -> None:
    # Opset 12 normalizes over the coerced 2-D tensor ([2, 15]), opset 13+ over axis 1 alone.
    proto = _proto(SOFTMAX, {**_q("x", 0.05, 128), **_q("y", 1 / 256, 0)}, opset=opset)
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and fuse.lowered == {"QLinearSoftmax": 1}
    softmax = _only(lowered, "QLinearSoftmax")
    assert softmax.attributes["opset"].as_int() == opset
    assert softmax.attributes["axis"].as_int() == 1
    _assert_equivalent(proto, lowered)


def test_unary_op_without_output_q_is_left_alone() -> None:
    body = """
    sigmoid_float (float[2,3,5] x) => (float[2,3,5] y) {
        xq = QuantizeLinear (x, x_s, x_z)
        xd = DequantizeLinear (xq, x_s, x_z)
        y = Sigmoid (xd)
    }
    """
    _, fuse, modified = _lower(ir.from_proto(_proto(body, _q("x", 0.05, 128))))
    assert not modified and not builders.lines(fuse.declined) and not fuse.lowered


# ---------------------------------------------------------------------------------------------------
# Rule 7: pass-through ops on hand-written graphs

PASS_THROUGH = """
pass_through (float[1,2,4,4] x) => ({outputs}) {{
    xq = QuantizeLinear (x, x_s, x_z)
    xd = DequantizeLinear (xq, x_s, x_z)
    {op}
{requantize}
}}
"""

PASS_THROUGH_CASES: dict[str, tuple[str, list[str], dict[str, np.ndarray]]] = {
    "MaxPool": ("o = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (xd)", ["float[1,2,2,2] y"], {}),
    "Reshape": ("o = Reshape (xd, shape)", ["float[1,32] y"], {"shape": np.array([1, -1], np.int64)}),
    "Transpose": ("o = Transpose <perm = [0, 2, 3, 1]> (xd)", ["float[1,4,4,2] y"], {}),
    "Flatten": ("o = Flatten <axis = 2> (xd)", ["float[2,16] y"], {}),
    "Squeeze": ("o = Squeeze (xd, axes)", ["float[2,4,4] y"], {"axes": np.array([0], np.int64)}),
    "Unsqueeze": ("o = Unsqueeze (xd, axes)", ["float[1,1,2,4,4] y"], {"axes": np.array([1], np.int64)}),
    "Slice": (
        "o = Slice (xd, starts, ends, axes)",
        ["float[1,2,2,4] y"],
        {"starts": np.array([1], np.int64), "ends": np.array([3], np.int64), "axes": np.array([2], np.int64)},
    ),
    "Split": (
        "o, o2 = Split <axis = 3> (xd, split)",
        ["float[1,2,4,1] y", "float[1,2,4,3] y2"],
        {"split": np.array([1, 3], np.int64)},
    ),
    "Resize": (  # factor 1.5: not a repeat (those become an Expand: tests/rewrite/test_nearest_upsample.py)
        'o = Resize <mode = "nearest"> (xd, , scales)',
        ["float[1,2,6,6] y"],
        {"scales": np.array([1, 1, 1.5, 1.5], np.float32)},
    ),
    "Gather": (
        "o = Gather <axis = 2> (xd, idx)",
        ["float[1,2,3,4] y"],
        {"idx": np.array([3, 0, 1], np.int64)},
    ),
}


def _pass_through(op: str, *, out_scale: float = 0.03, mode: str | None = None) -> onnx.ModelProto:
    text, outputs, arrays = PASS_THROUGH_CASES[op]
    if mode is not None:
        text = text.replace('"nearest"', f'"{mode}"')
    names = ["o", "o2"][: len(outputs)]
    results = ["y", "y2"][: len(outputs)]
    requantize = "\n".join(
        f"    {n}q = QuantizeLinear ({n}, o_s, o_z)\n    {r} = DequantizeLinear ({n}q, o_s, o_z)"
        for n, r in zip(names, results, strict=True)
    )
    body = PASS_THROUGH.format(outputs=", ".join(outputs), op=text, requantize=requantize)
    # The output parameters are separate initializers: equal values, other names.
    return _proto(body, {**_q("x", 0.03, 128), **_q("o", out_scale, 128), **arrays})


@pytest.mark.parametrize("op", list(PASS_THROUGH_CASES))
def test_pass_through_op_runs_on_integers(op: str) -> None:
    proto = _pass_through(op)
    lowered, fuse, modified = _lower(ir.from_proto(proto))

    assert modified and fuse.lowered == {op: 1} and not builders.lines(fuse.declined)
    node = _only(lowered, op)
    assert node.inputs[0] is _quantized_input(lowered, "x")
    for value in node.outputs:
        assert value.dtype == ir.DataType.UINT8
        (use,) = value.uses()
        assert use.node.op_type == "DequantizeLinear"
    counts = builders.op_counts(lowered)
    assert counts["QuantizeLinear"] == 1 and counts["DequantizeLinear"] == len(node.outputs)
    feeds = _feeds(proto, EVAL_SAMPLES, seed=5)
    expected, actual = _outputs(proto, feeds), _outputs(lowered, feeds)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])  # exact: same integers


@pytest.mark.parametrize(
    ("op", "options", "reason"),
    [
        ("Reshape", {"out_scale": 0.06}, "output o is quantized with other parameters than the input"),
        ("Resize", {"mode": "linear"}, "Resize mode is linear; only nearest runs unchanged on integers"),
    ],
    ids=["other-scale", "resize-linear"],
)
def test_pass_through_declines(op: str, options: dict[str, object], reason: str) -> None:
    proto = _pass_through(op, **options)  # type: ignore[arg-type]
    _, fuse, modified = _lower(ir.from_proto(proto))
    assert not modified
    assert len(builders.lines(fuse.declined)) == 1 and builders.lines(fuse.declined)[0].startswith(
        f"{op}_2 not lowered: {reason}"
    )


# ---------------------------------------------------------------------------------------------------
# Rule 9: DQ → Q pairs and chains


def _chain(scales: list[float]) -> onnx.ModelProto:
    """x → Q/DQ with each scale in turn (zero point 128) → y."""
    lines: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    source = "x"
    for i, scale in enumerate(scales):
        out = "y" if i == len(scales) - 1 else f"d{i}"
        lines += [
            f"q{i} = QuantizeLinear ({source}, s{i}, z{i})",
            f"{out} = DequantizeLinear (q{i}, s{i}, z{i})",
        ]
        arrays.update({f"s{i}": np.array(scale, np.float32), f"z{i}": np.array(128, np.uint8)})
        source = out
    body = "chain (float[2,8] x) => (float[2,8] y) {\n" + "\n".join(lines) + "\n}"
    return _proto(body, arrays)


def test_dq_q_with_identical_parameters_collapses() -> None:
    proto = _chain([0.02, 0.02])
    lowered, fuse, modified = _lower(ir.from_proto(proto))
    assert modified and not fuse.lowered
    counts = builders.op_counts(lowered)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == 1
    assert _producer(lowered.graph.outputs[0]).inputs[0] is _quantized_input(lowered, "x")
    feeds = _feeds(proto, EVAL_SAMPLES, seed=3)
    np.testing.assert_array_equal(_outputs(lowered, feeds)["y"], _outputs(proto, feeds)["y"])


def test_requantize_stays() -> None:
    _, _, modified = _lower(ir.from_proto(_chain([0.02, 0.03])))
    assert not modified


def test_dq_q_dq_q_chain_collapses_to_last_parameters() -> None:
    proto = _chain([0.01, 0.015, 0.03])  # the middle range covers the first: it never clips
    lowered, _, modified = _lower(ir.from_proto(proto))
    assert modified
    counts = builders.op_counts(lowered)
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 2
    last_q = _producer(_producer(lowered.graph.outputs[0]).inputs[0])
    assert last_q.inputs[1] is not None and last_q.inputs[1].name == "s2"
    assert _producer(last_q.inputs[0]).inputs[0] is _quantized_input(lowered, "x")
    _assert_equivalent(proto, lowered)


def test_chain_whose_middle_clips_stays() -> None:
    _, _, modified = _lower(ir.from_proto(_chain([0.01, 0.005, 0.03])))
    assert not modified


# ---------------------------------------------------------------------------------------------------
# No match, subgraphs, a real CNN


def test_float_model_is_not_modified() -> None:
    proto = _proto(CONV_RELU, _weights(0, w=(4, 3, 3, 3), b=(4,)))
    model = ir.from_proto(proto)
    lowered, fuse, modified = _lower(model)
    assert not modified and not fuse.lowered and not builders.lines(fuse.declined)
    assert builders.op_counts(lowered) == builders.op_counts(model)
    assert MS_DOMAIN not in lowered.opset_imports


def test_lowering_is_deterministic_and_idempotent() -> None:
    arrays = _weights(
        11, w1=(4, 3, 3, 3), b1=(4,), w2=(4, 4, 3, 3), b2=(4,), w3=(6, 4, 1, 1), b3=(6,), w4=(5, 6), b4=(5,)
    )
    qdq = _quantize(_proto(POOLS, arrays))
    first, _, _ = _lower(qdq)
    second, _, _ = _lower(qdq)
    digests = {
        hashlib.sha256(ir.to_proto(m).SerializeToString(deterministic=True)).hexdigest()
        for m in (first, second)
    }
    assert len(digests) == 1
    again, fuse, modified = _lower(first)
    assert not modified and not fuse.lowered and not builders.lines(fuse.declined)
    assert builders.op_counts(again) == builders.op_counts(first)


IF_CONV = """
if_conv (float[1,3,6,6] x, bool cond) => (float[1,4,6,6] y) {
    xq = QuantizeLinear (x, x_s, x_z)
    y = If (cond) <
        then_branch = then_graph () => (float[1,4,6,6] t) {
            xd = DequantizeLinear (xq, x_s, x_z)
            wd = DequantizeLinear <axis = 0> (wq, w_s, w_z)
            c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xd, wd)
            r = Relu (c)
            tq = QuantizeLinear (r, y_s, y_z)
            t = DequantizeLinear (tq, y_s, y_z)
        },
        else_branch = else_graph () => (float[1,4,6,6] e) {
            e = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, wf)
        }
    >
}
"""


def test_conv_inside_if_branch_is_lowered() -> None:
    arrays = {
        **_q("x", 4 / 255, 128),
        **_q("y", 6 / 255, 0),
        "wq": _int8(12, (4, 3, 3, 3)),
        "w_s": np.array([0.004, 0.005, 0.006, 0.003], np.float32),
        "w_z": np.zeros(4, np.int8),
        **_weights(13, wf=(4, 3, 3, 3)),
    }
    proto = _proto(IF_CONV, arrays)
    lowered, fuse, modified = _lower(ir.from_proto(proto))

    assert modified and fuse.lowered == {"QLinearConv": 1} and not builders.lines(fuse.declined)
    if_node = _only(lowered, "If")
    then_graph = if_node.attributes["then_branch"].as_graph()
    else_graph = if_node.attributes["else_branch"].as_graph()
    assert [n.op_type for n in then_graph] == ["QLinearConv", "DequantizeLinear"]
    assert then_graph[0].inputs[0] is _quantized_input(lowered, "x")  # read from the outer scope
    assert [n.op_type for n in else_graph] == ["Conv"]  # float: untouched
    feeds = _feeds(proto, 4, seed=21)  # cond alternates: both branches run
    assert {bool(f["cond"]) for f in feeds} == {True, False}
    _assert_equivalent(proto, lowered)


def test_small_cnn_from_the_model_zoo_is_fully_lowered(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tools import model_zoo

    path = model_zoo.build("small_cnn", tmp_path)
    result = onnxq.quantize(str(path), model_zoo.sample_feeds("small_cnn", 8), UINT8)
    qdq = result.model
    convs = builders.op_counts(qdq)["Conv"]
    lowered, fuse, modified = _lower(qdq)

    assert modified and not builders.lines(fuse.declined)
    assert convs > 0 and fuse.lowered["QLinearConv"] == convs
    counts = builders.op_counts(lowered)
    assert counts["Conv"] == 0 and counts["Relu"] == 0 and counts["DequantizeLinear"] == 0
    assert fuse.lowered["QGemm"] == 1
    feeds = model_zoo.sample_feeds("small_cnn", 8, split="eval")
    expected, actual = _outputs(qdq, feeds)["logits"], _outputs(lowered, feeds)["logits"]
    # Integer kernels round a few intermediate values one step the other way; the logits barely move.
    assert float(np.max(np.abs(expected - actual))) <= 0.01 * float(np.max(np.abs(expected)))
    assert np.mean(np.argmax(expected, -1) == np.argmax(actual, -1)) >= 7 / 8
