"""The PyTorch path: export a module, quantize it (PTQ), or train it with fake quantization (QAT).

Importing this package imports torch; ``import onnxq`` never does. In five lines::

    from onnxq.torch import quantize_module

    result = quantize_module(net, example, calibration_batches, path="net.int8.onnx")
    print(result.report.format_table())

QAT: :func:`prepare_qat` → train → :func:`export_qat` → ``onnxq.quantize(path)`` (already-quantized
path; ``QuantConfig(format="qoperator")`` lowers it to integer operators).
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without torch
    raise ImportError(
        "onnxq.torch needs PyTorch, which onnxq does not install by default: "
        "pip install 'onnxq[torch]' (or the 'qat' extra for QAT with the digits benchmark)"
    ) from exc

from onnxq.torch.export import export, quantize_module, to_feeds
from onnxq.torch.qat import QATConfig, calibrate_qat, export_qat, prepare_qat

__all__ = ["QATConfig", "calibrate_qat", "export", "export_qat", "prepare_qat", "quantize_module", "to_feeds"]
