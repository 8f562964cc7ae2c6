"""The built-in example: a small residual CNN and its data, built deterministically (no downloads).

``python -m onnxq example`` writes them and runs the optimize job on them, so a fresh install can
show the whole pipeline — BatchNorm folding, calibration, Q/DQ insertion, validation — in seconds.
Weights are He-initialised from a fixed seed and BatchNorm statistics are non-trivial, so folding
and calibration have real work to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.load.files import save_model

__all__ = ["ExamplePaths", "build_example_model", "example_images", "write_example"]

_SEED = 20261122
_IMAGE = (3, 64, 64)


class _Builder:
    """Appends nodes to one graph with readable, unique names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
        value.const_value = ir.tensor(array.astype(np.float32), name=name)
        self.initializers.append(value)
        return value

    def node(self, op: str, inputs: list[ir.Value], name: str, **attrs: Any) -> ir.Value:
        self.count += 1
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()]
        node = ir.Node("", op, inputs, attributes=attributes, name=name)
        node.outputs[0].name = f"{name}_out"
        self.nodes.append(node)
        return node.outputs[0]

    def conv_bn(
        self, x: ir.Value, cin: int, cout: int, name: str, stride: int = 1, relu: bool = True
    ) -> ir.Value:
        std = np.sqrt(2.0 / (cin * 9))
        w = self.const(f"{name}.weight", self.rng.normal(0, std, (cout, cin, 3, 3)))
        y = self.node("Conv", [x, w], name, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
        gamma = self.const(f"{name}.bn.gamma", self.rng.uniform(0.5, 1.5, cout))
        beta = self.const(f"{name}.bn.beta", self.rng.normal(0, 0.1, cout))
        mean = self.const(f"{name}.bn.mean", self.rng.normal(0, 0.2, cout))
        var = self.const(f"{name}.bn.var", self.rng.uniform(0.5, 2.0, cout))
        y = self.node("BatchNormalization", [y, gamma, beta, mean, var], f"{name}.bn", epsilon=1e-5)
        return self.node("Relu", [y], f"{name}.relu") if relu else y


def build_example_model() -> ir.Model:
    """A residual CNN (about 1.2 M parameters) for 3×64×64 images and 10 classes, dynamic batch."""
    rng = np.random.default_rng(_SEED)
    b = _Builder(rng)
    x = ir.Value(name="image", shape=ir.Shape(["batch", *_IMAGE]), type=ir.TensorType(ir.DataType.FLOAT))
    y = b.conv_bn(x, 3, 64, "stem")
    y = b.node("MaxPool", [y], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    for stage, (cin, cout) in enumerate([(64, 64), (64, 128), (128, 256)], start=1):
        stride = 1 if cin == cout else 2
        h = b.conv_bn(y, cin, cout, f"stage{stage}.conv1", stride=stride)
        h = b.conv_bn(h, cout, cout, f"stage{stage}.conv2", relu=False)
        if cin != cout:
            w = b.const(f"stage{stage}.down.weight", rng.normal(0, np.sqrt(2.0 / cin), (cout, cin, 1, 1)))
            y = b.node("Conv", [y, w], f"stage{stage}.down", kernel_shape=[1, 1], strides=[2, 2])
        y = b.node("Add", [h, y], f"stage{stage}.add")
        y = b.node("Relu", [y], f"stage{stage}.relu")
    y = b.node("GlobalAveragePool", [y], "gap")
    y = b.node("Flatten", [y], "flatten", axis=1)
    w = b.const("head.weight", rng.normal(0, np.sqrt(1.0 / 256), (10, 256)))
    bias = b.const("head.bias", rng.normal(0, 0.05, 10))
    logits = b.node("Gemm", [y, w, bias], "head", transB=1)
    logits.name = "logits"
    graph = ir.Graph(
        [x],
        [logits],
        nodes=b.nodes,
        initializers=b.initializers,
        opset_imports={"": 17},
        name="onnxq_example_cnn",
    )
    return ir.Model(graph, ir_version=8, producer_name="onnxq-example")


def example_images(count: int, seed: int) -> np.ndarray:
    """Smooth, image-like inputs: low-frequency colour patterns plus noise, shape (count, 3, 64, 64)."""
    rng = np.random.default_rng(seed)
    _, h, w = _IMAGE
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    images = np.empty((count, *_IMAGE), np.float32)
    for i in range(count):
        for c in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
            pattern = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
            images[i, c] = pattern + 0.1 * rng.standard_normal((h, w))
    return images


@dataclass(frozen=True)
class ExamplePaths:
    """Where :func:`write_example` put the model, its data and the quantized model's path."""

    model: Path
    calibration: Path
    evaluation: Path
    quantized: Path


def write_example(
    out_dir: Path, *, calibration_samples: int = 32, evaluation_samples: int = 32
) -> ExamplePaths:
    """Write the example model and its calibration/evaluation ``.npz`` files (samples stacked on axis 0)."""
    from onnxq.errors import OnnxqError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxqError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    paths = ExamplePaths(
        model=out_dir / "example_cnn.onnx",
        calibration=out_dir / "calibration.npz",
        evaluation=out_dir / "evaluation.npz",
        quantized=out_dir / "example_cnn.int8.onnx",
    )
    save_model(build_example_model(), paths.model)
    # Each array has one more axis than the input: array[i] is sample i's whole feed ([1, 3, 64, 64]).
    np.savez(paths.calibration, image=example_images(calibration_samples, seed=1)[:, None])
    np.savez(paths.evaluation, image=example_images(evaluation_samples, seed=2)[:, None])
    return paths
