"""Tiny float models for tests, written in ``onnx.parser`` text with seeded random weights.

Every builder returns an ``onnx.ModelProto`` (IR version 10, default-domain opset 17 unless ``opset``
is given) whose weights are initializers drawn from ``np.random.default_rng(seed)``, so the same call
always gives the same bytes.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "add_initializers",
    "conv_calibration",
    "conv_relu_model",
    "externalize",
    "if_conv_model",
    "lines",
    "matmul_model",
    "no_quantizable_model",
    "op_counts",
    "parse",
    "save",
]

IR_VERSION = 10
DEFAULT_OPSET = 17


def _header(opset: int, ir_version: int) -> str:
    return f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>'


def add_initializers(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Append ``arrays`` to the main graph's initializers (in the given order) and return ``model``."""
    for name, array in arrays.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    return model


def parse(
    body: str,
    arrays: Mapping[str, np.ndarray] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """A checked model from a graph written in ``onnx.parser`` text plus initializers."""
    return parse_model_text(f"{_header(opset, ir_version)}\n{body}", arrays)


def parse_model_text(text: str, arrays: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Like :func:`parse`, for text that carries its own ``<ir_version, opset_import>`` header."""
    model = onnx.parser.parse_model(text)
    add_initializers(model, arrays or {})
    onnx.checker.check_model(model)
    return model


def random_feeds(
    model: onnx.ModelProto, count: int, seed: int, *, index_range: tuple[int, int] = (0, 10)
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds for the declared (fixed) input shapes: standard-normal floats, bools that
    alternate between feeds, int64 indices drawn from ``index_range``."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(count):
        feed: dict[str, np.ndarray] = {}
        for value in model.graph.input:
            tensor = value.type.tensor_type
            shape = [d.dim_value for d in tensor.shape.dim]
            if tensor.elem_type == onnx.TensorProto.BOOL:
                feed[value.name] = np.full(shape, i % 2 == 0)
            elif tensor.elem_type == onnx.TensorProto.INT64:
                feed[value.name] = rng.integers(*index_range, shape).astype(np.int64)
            else:
                feed[value.name] = rng.normal(0.0, 1.0, shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def normal_arrays(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Standard-normal float32 arrays named after the keyword arguments, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0.0, 1.0, shape).astype(np.float32) for name, shape in shapes.items()}


def serialize(model: ir.Model | onnx.ModelProto) -> bytes:
    """Deterministic protobuf bytes of an onnx-ir model or a ModelProto."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return proto.SerializeToString(deterministic=True)


def apply_pass(proto: onnx.ModelProto, rewrite: ir.passes.PassBase) -> ir.Model:
    """``proto`` as an IR model rewritten in place by ``rewrite``, checked valid by the ONNX checker."""
    model = ir.from_proto(proto)
    rewrite(model)
    onnx.checker.check_model(ir.to_proto(model))
    return model


def run_disabled(model: ir.Model | onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` on one feed in ONNX Runtime with every graph optimization off (what the
    graph itself computes)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(serialize(model), options, providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, dict(feed))]


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.normal(0.0, std, shape).astype(np.float32)


def conv_relu_model(*, opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """``x: float[N,3,8,8]`` → Conv (3→4, 3×3, pads 1, bias) → Relu → ``y: float[N,4,8,8]``."""
    rng = np.random.default_rng(seed)
    body = """
    conv_relu (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }
    """
    arrays = {"w": _normal(rng, (4, 3, 3, 3), 0.3), "b": _normal(rng, (4,), 0.1)}
    return parse(body, arrays, opset=opset)


def matmul_model(*, opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """``x: float[N,16]`` @ constant ``[16,8]`` → Add bias → ``y: float[N,8]``."""
    rng = np.random.default_rng(seed)
    body = """
    matmul_add (float[N,16] x) => (float[N,8] y) {
        m = MatMul (x, w)
        y = Add (m, b)
    }
    """
    arrays = {"w": _normal(rng, (16, 8), 0.25), "b": _normal(rng, (8,), 0.1)}
    return parse(body, arrays, opset=opset)


def no_quantizable_model(*, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Only Relu and Sigmoid: nothing onnxq can quantize."""
    body = """
    activations (float[N,3,8,8] x) => (float[N,3,8,8] y) {
        r = Relu (x)
        y = Sigmoid (r)
    }
    """
    return parse(body, opset=opset)


def if_conv_model(*, opset: int = DEFAULT_OPSET, seed: int = 0) -> onnx.ModelProto:
    """Conv → If(``cond``: a bool graph input) whose then-branch holds a second Conv, else a Relu.

    The outer Conv makes the model quantizable; the Conv inside the subgraph reads its weight ``w2``
    from the outer scope.
    """
    rng = np.random.default_rng(seed)
    body = """
    if_conv (float[N,3,8,8] x, bool cond) => (float[N,4,8,8] y) {
        h = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        y = If (cond) <
            then_branch = then_graph () => (float[N,4,8,8] t) {
                t = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (h, w2)
            },
            else_branch = else_graph () => (float[N,4,8,8] e) {
                e = Relu (h)
            }
        >
    }
    """
    arrays = {
        "w1": _normal(rng, (4, 3, 3, 3), 0.3),
        "b1": _normal(rng, (4,), 0.1),
        "w2": _normal(rng, (4, 4, 3, 3), 0.3),
    }
    return parse(body, arrays, opset=opset)


def externalize(model: onnx.ModelProto, name: str, model_dir: str | os.PathLike[str], location: str) -> Path:
    """Move initializer ``name`` to external data at ``location`` (relative to ``model_dir``).

    The bytes are written to that file, so the reference resolves; ``location`` may deliberately point
    outside ``model_dir`` (``../outside.bin``) to test that loaders refuse it. Returns the data file.
    """
    tensor = next(t for t in model.graph.initializer if t.name == name)
    data = onnx.numpy_helper.to_array(tensor).tobytes()
    target = Path(model_dir) / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    if not tensor.HasField("raw_data"):
        tensor.raw_data = data
    onnx.external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return target


def conv_calibration(samples: int = 8, seed: int = 7) -> np.ndarray:
    """Stacked calibration inputs for :func:`conv_relu_model`: float32 ``[samples, 1, 3, 8, 8]``.

    ``result[i]`` is the whole feed of sample ``i`` (a batch of one).
    """
    rng = np.random.default_rng(seed)
    return rng.standard_normal((samples, 1, 3, 8, 8)).astype(np.float32)


def save(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` (deterministic bytes) and return the path."""
    out = Path(path)
    out.write_bytes(model.SerializeToString(deterministic=True))
    return out


# MatMul chain with outlier channels (sensitivity analysis and accuracy-budget tests)

CHAIN_LAYERS = 6
CHAIN_WIDTH = 32


def outlier_chain_model(outlier_readers: tuple[int, ...] = (3,), *, seed: int = 0) -> onnx.ModelProto:
    """``x: float[N,32]`` → 6 × (MatMul → Relu), the last without Relu; layer ``i`` reads ``w{i}``.

    For each ``k`` in ``outlier_readers``, layer ``k − 1``'s output gets three ×50 outlier channels and
    layer ``k`` the matching ÷50 weight rows (the float function is unchanged).
    """
    rng = np.random.default_rng(seed)
    lines, prev = [], "x"
    for i in range(CHAIN_LAYERS):
        out = "y" if i == CHAIN_LAYERS - 1 else f"h{i}"
        lines.append(f"{out} = MatMul({prev}, w{i})")
        if i < CHAIN_LAYERS - 1:
            lines.append(f"r{i} = Relu(h{i})")
            prev = f"r{i}"
    text = (
        '<ir_version: 10, opset_import: ["" : 17]>\n'
        f"chain (float[N,{CHAIN_WIDTH}] x) => (float[N,{CHAIN_WIDTH}] y) {{\n" + "\n".join(lines) + "\n}"
    )
    model = onnx.parser.parse_model(text)
    weights = [
        rng.normal(0.0, 1.4 / np.sqrt(CHAIN_WIDTH), (CHAIN_WIDTH, CHAIN_WIDTH)).astype(np.float32)
        for _ in range(CHAIN_LAYERS)
    ]
    for k in outlier_readers:
        weights[k - 1][:, :3] *= 50.0
        weights[k][:3, :] /= 50.0
    for i, w in enumerate(weights):
        model.graph.initializer.append(onnx.numpy_helper.from_array(w, f"w{i}"))
    onnx.checker.check_model(model)
    return model


def chain_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, CHAIN_WIDTH)).astype(np.float32)} for _ in range(count)]


def node_reading(model: ir.Model, weight: str) -> str:
    for node in model.graph:
        if any(v is not None and v.name == weight for v in node.inputs):
            return node.name or ""
    raise AssertionError(f"no node reads {weight}")


def op_counts(
    model: ir.Model | onnx.ModelProto | bytes, *, subgraphs: bool = True
) -> collections.Counter[str]:
    """How many nodes of each op type the model has (in If/Loop/Scan bodies too, unless ``subgraphs``)."""
    if isinstance(model, bytes):
        model = onnx.load_model_from_string(model)
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    nodes = model.graph.all_nodes() if subgraphs else iter(model.graph)
    return collections.Counter(node.op_type for node in nodes)


def lines(declines: Iterable[object]) -> list[str]:
    """Typed declines (or any records) as the one-line strings the report shows."""
    return [str(d) for d in declines]


def spiky_heavy_tailed(rng: np.random.Generator, *, spike: bool) -> np.ndarray:
    """A [64, 32] batch of Student-t (4 dof) values; with ``spike``, one value of 400 at [5, 7].

    The range methods differ on it: min-max, percentile and MSE keep a spike in range, entropy clips it.
    """
    batch = rng.standard_t(4, size=(64, 32)).astype(np.float32)
    if spike:
        batch[5, 7] = 400.0
    return batch


def two_branch_model_and_data() -> tuple[object, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Two independent MatMuls: ``a`` is heavy-tailed with a one-off spike in the fitted half (entropy
    clips it and wins), ``b`` has one channel 30x the others in every sample (clipping it costs the
    output: entropy loses there). No single method is right for both."""
    text = """
    two (float[N, 32] a, float[N, 32] b) => (float[N, 16] y, float[N, 16] z) {
        y = MatMul (a, V)
        z = MatMul (b, W)
    }
    """
    proto = parse(text, normal_arrays(0, V=(32, 16), W=(32, 16)))

    def feeds(seed: int, count: int, spikes: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        out = []
        for index in range(count):
            a = spiky_heavy_tailed(rng, spike=index in spikes)
            b = rng.standard_normal((64, 32)).astype(np.float32)
            b[:, 3] *= 30.0
            out.append({"a": a, "b": b})
        return out

    return proto, feeds(1, 16, spikes=(0, 4)), feeds(2, 8)


def silu_convs() -> onnx.ModelProto:
    """Conv → SiLU (``c1 · Sigmoid(c1)``) → Conv → SiLU (operands the other way round) → Conv: two SiLUs
    between quantized convolutions, the pattern of YOLO and EfficientNet."""
    text = """
    silu_convs (float[1, 3, 16, 16] x) => (float[1, 8, 16, 16] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
        s1 = Sigmoid (c1)
        a1 = Mul (c1, s1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a1, w2)
        s2 = Sigmoid (c2)
        a2 = Mul (s2, c2)
        y = Conv <kernel_shape = [1, 1]> (a2, w3)
    }
    """
    arrays = normal_arrays(0, w1=(8, 3, 3, 3), w2=(8, 8, 3, 3), w3=(8, 8, 1, 1))
    return parse(text, {name: array * 0.3 for name, array in arrays.items()})


def log_spectrum_cnn(
    *, front_end_only: bool = False
) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """A log-power spectrum front end before a small CNN, with harmonic "voiced" frames to feed it.

    Frames of 256 samples ``[1, 256, 32]`` → STFT as two 1×1 Convs (Hann-windowed cosine and sine
    kernels, 129 bins) → power ``re² + im²`` → ``Max`` with a 1e-10 floor → ``Log`` → two 3×3 Conv +
    Relu → GlobalAveragePool ``[1, 8]``: the shape of DNSMOS's ``sig_bak_ovr`` (keras2onnx). The
    frames hold a harmonic tone whose partials fall off 0.7× each, over a faint hiss, so the power spans
    about ten decades and most bins are far below one 8-bit step of the STFT's range. Returns the model,
    16 calibration feeds and 8 held-out feeds. ``front_end_only``: the model ends at the log spectrum
    ``[1, 129, 32]`` (a feature extractor shipped as its own file, as openWakeWord's melspectrogram).
    """
    n = np.arange(256)
    bins = np.arange(129)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 256)
    arrays = {
        "wre": (np.cos(2 * np.pi * bins * n / 256) * window)[:, :, None].astype(np.float32),
        "wim": (-np.sin(2 * np.pi * bins * n / 256) * window)[:, :, None].astype(np.float32),
        "floor": np.array(1e-10, np.float32),
        "axes": np.array([1], np.int64),
        **{k: v * 0.2 for k, v in normal_arrays(3, w1=(8, 1, 3, 3), w2=(8, 8, 3, 3)).items()},
        "b1": np.full(8, 1.5, np.float32),
        "b2": np.zeros(8, np.float32),
    }
    text = """
    log_spectrum_cnn (float[1, 256, 32] frames) => (float[1, 8, 1, 1] y) {
        re = Conv <kernel_shape = [1]> (frames, wre)
        im = Conv <kernel_shape = [1]> (frames, wim)
        re2 = Mul (re, re)
        im2 = Mul (im, im)
        power = Add (re2, im2)
        floored = Max (power, floor)
        spectrum = Log (floored)
        image = Unsqueeze (spectrum, axes)
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (image, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, w2, b2)
        r2 = Relu (c2)
        y = GlobalAveragePool (r2)
    }
    """
    if front_end_only:
        text = (
            text.split("        image = ")[0].replace("float[1, 8, 1, 1] y", "float[1, 129, 32] spectrum")
            + "}"
        )
        arrays = {k: v for k, v in arrays.items() if k in ("wre", "wim", "floor")}
    proto = parse(text, arrays)

    def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        t = np.arange(256 * 32) / 16000.0
        out = []
        for _ in range(count):
            f0 = rng.uniform(100.0, 300.0)
            partials = np.arange(1, int(7000 / f0) + 1)
            tone = sum(0.5 * 0.7**k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in partials)
            signal = tone + rng.normal(0.0, 1e-4, t.size)
            out.append({"frames": signal.reshape(32, 256).T[None].astype(np.float32)})
        return out

    return proto, feeds(1, 16), feeds(2, 8)


def lstm_on_spread_input(
    spread: float = 2.5,
) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """An LSTM over an input that spans orders of magnitude, and a MatMul head on its last state.

    ``x`` [24, 1, 8] is log-normal (``exp(spread·N(0, 1))``; at 2.5, 1e-3 to 1e3, like a linear, not
    log, mel spectrogram); LSTM(hidden 16) → ``Y_h`` → Reshape → MatMul → ``y`` [1, 4]. Static mode
    runs the LSTM as DynamicQuantizeLSTM, whose run-time uint8 range over the whole input rounds its
    small values away. Returns the model, 16 calibration feeds and 16 held-out feeds.
    """
    hidden, width, steps = 16, 8, 24
    rng = np.random.default_rng(0)
    arrays = {
        "W": (rng.normal(0, 0.5, (1, 4 * hidden, width))).astype(np.float32),
        "R": (rng.normal(0, 0.3, (1, 4 * hidden, hidden))).astype(np.float32),
        "B": np.zeros((1, 8 * hidden), np.float32),
        "shape": np.array([1, hidden], np.int64),
        "wh": rng.normal(0, 1, (hidden, 4)).astype(np.float32),
    }
    text = f"""
    lstm_on_spread_input (float[{steps}, 1, {width}] x) => (float[1, 4] y) {{
        seq, last = LSTM <hidden_size = {hidden}> (x, W, R, B)
        flat = Reshape (last, shape)
        y = MatMul (flat, wh)
    }}
    """

    def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(seed)
        shape = (steps, 1, width)
        return [{"x": np.exp(r.normal(0, spread, shape)).astype(np.float32)} for _ in range(count)]

    return parse(text, arrays), feeds(16, 1), feeds(16, 2)


def embedding_then_matmul() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """ids → Gather of a 600 × 8 table (rows spanning 1e-2..1 in scale) → LayerNorm → MatMul; 4 feeds.

    A table read by a float op: static mode stores it int8, one scale per row.
    """
    rng = np.random.default_rng(4)
    table = (rng.normal(0.0, 1.0, (600, 8)) * np.geomspace(1e-2, 1.0, 600).reshape(600, 1)).astype(np.float32)
    arrays = {
        "table": table,
        "gamma": np.ones(8, np.float32),
        "beta": np.zeros(8, np.float32),
        "w": rng.normal(0.0, 0.3, (8, 8)).astype(np.float32),
    }
    text = """
    embed (int64[2, 6] ids) => (float[2, 6, 8] y) {
        e = Gather (table, ids)
        n = LayerNormalization <axis = -1> (e, gamma, beta)
        y = MatMul (n, w)
    }
    """
    feeds = [{"ids": rng.integers(0, 600, (2, 6)).astype(np.int64)} for _ in range(4)]
    return parse(text, arrays), feeds
