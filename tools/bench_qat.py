"""QAT vs PTQ on scikit-learn's digits (1,797 8×8 images shipped in the wheel), int8 and 4-bit weights.

A small CNN (3 Conv+BN+ReLU, 2 MaxPool, 2 Linear) is trained in float on a fixed split (seeded), then
measured on the held-out split in ONNX Runtime (ORT_ENABLE_ALL):

- ``float``: the float export;
- ``PTQ int8``: :func:`onnxq.torch.quantize_module` (static, min-max calibration on 64 training images);
- ``QAT int8``: :func:`onnxq.torch.prepare_qat` from the float model, a few epochs of fine-tuning,
  :func:`onnxq.torch.export_qat`, then ``onnxq.quantize`` (already-quantized path);
- ``PTQ w4``: onnxq's WeightScheme has no 4-bit option, so 4-bit PTQ is simulated: the BatchNorms are
  folded into the Convs, every Conv/Linear weight is rounded to the symmetric per-channel 4-bit grid
  ([-7, 7]·scale, scale from the channel's absmax), and that model goes through the same onnxq PTQ;
- ``QAT w4``: QAT with ``weight_bits=4`` and learnable (LSQ) scales.

4-bit weights are stored in int8, so their file size equals int8's. Latency: batch 1, 1 thread,
interleaved runs, median. The latency guard is off so that every variant is int8.

    python tools/bench_qat.py [--json PATH] [--epochs 30] [--qat-epochs 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxq
from onnxq.torch import QATConfig, export, export_qat, prepare_qat, quantize_module
from onnxq.torch.fake_quant import WeightFakeQuant, weight_grid

SEED = 0
HELD_OUT = 597


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, held-out x, held-out y): images scaled to [0, 1], a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    test, train = order[:HELD_OUT], order[HELD_OUT:]
    return x[train], y[train], x[test], y[test]


def make_cnn(width: int = 16) -> nn.Sequential:
    torch.manual_seed(SEED)
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x), size):
        index = order[start : start + size]
        yield x[index], y[index]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float) -> nn.Module:
    """Adam with a cosine learning-rate schedule, batch 64, seeded order."""
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, 64, SEED + epoch):
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def ort_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    from onnxq.runtime.session import make_session

    out = make_session(str(path)).run(None, {"input": x.numpy()})[0]
    return float((out.argmax(1) == y.numpy()).mean())


def fold_and_round_weights(model: nn.Sequential, bits: int) -> nn.Sequential:
    """A copy with each BatchNorm folded into its Conv and every weight on the 4-bit per-channel grid."""
    layers: list[nn.Module] = []
    source = list(copy.deepcopy(model))
    index = 0
    while index < len(source):
        layer = source[index]
        nxt = source[index + 1] if index + 1 < len(source) else None
        if isinstance(layer, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            assert nxt.running_var is not None and nxt.running_mean is not None
            factor = nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)
            with torch.no_grad():
                bias = layer.bias if layer.bias is not None else torch.zeros_like(factor)
                layer.weight.mul_(factor.reshape(-1, 1, 1, 1))
                layer.bias = nn.Parameter(nxt.bias + (bias - nxt.running_mean) * factor)
            index += 1
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fq = WeightFakeQuant(weight_grid(bits), layer.weight.shape[0])
            with torch.no_grad():
                layer.weight.copy_(fq(layer.weight))
        layers.append(layer)
        index += 1
    return nn.Sequential(*layers).eval()


def qat(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bits: int, epochs: int, lr: float, learnable: bool
) -> nn.Module:
    calibration = [x[i : i + 64] for i in range(0, 256, 64)]
    steps_per_epoch = (len(x) + 63) // 64
    config = QATConfig(weight_bits=bits, learnable_scales=learnable, freeze_bn_after=steps_per_epoch * 2)
    prepared = prepare_qat(model, config, calibration)
    return train(prepared, x, y, epochs=epochs, lr=lr)


def file_size(path: Path) -> int:
    return os.path.getsize(path)


def run(epochs: int, qat_epochs: int, runs: int, width: int = 16) -> dict[str, Any]:
    from onnxq.runtime.latency import measure_latency

    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = load_split()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    float_model = train(make_cnn(width), x_train, y_train, epochs=epochs, lr=3e-3)
    timings["float training"] = time.perf_counter() - start
    example = x_train[:1]
    calib = [x_train[i : i + 1] for i in range(64)]
    config = onnxq.QuantConfig(latency_guard=onnxq.config.LatencyGuardConfig(enabled=False))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths: dict[str, Path] = {}
        paths["float"] = export(float_model, example, folder / "float.onnx", ({0: "batch"},))

        start = time.perf_counter()
        quantize_module(float_model, example, calib, config, path=folder / "ptq8.onnx")
        paths["PTQ int8"] = folder / "ptq8.onnx"
        rounded = fold_and_round_weights(float_model, 4)
        quantize_module(rounded, example, calib, config, path=folder / "ptq4.onnx")
        paths["PTQ w4"] = folder / "ptq4.onnx"
        timings["PTQ (both)"] = time.perf_counter() - start

        for name, bits, learnable, lr in (("QAT int8", 8, False, 1e-4), ("QAT w4", 4, True, 5e-4)):
            start = time.perf_counter()
            trained = qat(
                float_model, x_train, y_train, bits=bits, epochs=qat_epochs, lr=lr, learnable=learnable
            )
            raw = export_qat(trained, example, folder / f"{name}.qdq.onnx")
            result = onnxq.quantize(raw, [{"input": x.numpy()} for x in calib[:8]], config)
            paths[name] = result.save(folder / f"{name}.onnx")
            timings[name] = time.perf_counter() - start
            rows[name] = {"torch fake-quant accuracy": torch_accuracy(trained, x_test, y_test)}

        latency = measure_latency(
            {name: str(path) for name, path in paths.items()},
            {"input": x_test[:1].numpy()},
            threads=1,
            runs=runs,
        )
        for name, path in paths.items():
            row = rows.setdefault(name, {})
            row["accuracy"] = ort_accuracy(path, x_test, y_test)
            row["size_bytes"] = file_size(path)
            row["latency_ms"] = latency[name].median_ms
    base = rows["float"]["accuracy"]
    for row in rows.values():
        row["delta_points"] = (row["accuracy"] - base) * 100
    order = ["float", "PTQ int8", "QAT int8", "PTQ w4", "QAT w4"]
    return {
        "dataset": (
            f"sklearn digits, {len(x_train)} train / {len(x_test)} held-out, seed {SEED}, width {width}"
        ),
        "rows": {name: rows[name] for name in order},
        "timings_s": timings,
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--epochs", type=int, default=30, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=8, help="QAT fine-tuning epochs")
    parser.add_argument("--width", type=int, default=16, help="channels of the first Conv")
    parser.add_argument("--runs", type=int, default=300, help="latency rounds (interleaved)")
    args = parser.parse_args(argv)
    os.environ.setdefault("ONNXQ_LATENCY_GUARD", "off")
    results = run(args.epochs, args.qat_epochs, args.runs, args.width)
    table = [
        [
            name,
            f"{row['accuracy'] * 100:.2f}",
            f"{row['delta_points']:+.2f}",
            f"{row['size_bytes'] / 1024:.1f}",
            f"{row['latency_ms'] * 1000:.1f}",
        ]
        for name, row in results["rows"].items()
    ]
    print(results["dataset"])
    print(tabulate(table, headers=["model", "top-1 %", "Δ points", "size KiB", "latency µs (1 thr)"]))
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
