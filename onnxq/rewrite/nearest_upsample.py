"""Nearest-neighbour upsampling by whole factors, written as a channels-last repeat for integer tensors.

FPN necks (PP-OCR's DB detectors, YOLO, UNet decoders) upsample by ``Resize(mode="nearest")`` with
scales 2, 4, 8. In an int8 convolution network ONNX Runtime runs QLinearConv in NHWC layout and moves
its layout Transposes through the ops between the convolutions, so the Resize runs on an NHWC uint8
tensor, where its kernel has no fast path: 2.6 ms for a ×2 upsample of a 96×120×92 map where the NCHW
float kernel takes 0.26 ms and the NCHW uint8 one 0.1 ms (ONNX Runtime 1.32, 1 thread). Six of them
were 11 % of PP-OCRv4 det's int8 latency.

A ``Resize`` whose output pixel ``(y, x)`` reads input pixel ``(y // fh, x // fw)`` is a repeat, and a
repeat is a broadcast: ::

    Transpose(NCHW → NHWC) → Unsqueeze(axes 2, 4) → Expand([1, 1, fh, 1, fw, 1]) →
    Reshape([N, H·fh, W·fw, C]) → Transpose(NHWC → NCHW)

ONNX Runtime's transpose optimizer cancels the two Transposes against the ones its NHWC kernels put
around themselves, and Expand copies whole channel vectors (C bytes at a time). Measured in onnxq's
int8 output of PP-OCRv4 det: 47.3 → 42.4 ms; PP-OCRv5 det 45.3 → 40.4 ms, YOLOv8n 4.91 → 4.70 ms, the
same outputs bit for bit. Between float ops the Resize stays as it is (its NCHW float kernel is fast):
only the integer pass-through stage uses this form.

Which Resize nodes repeat (:func:`repeat_factors`) follows the ONNX specification's coordinate mapping
for each ``coordinate_transformation_mode`` and ``nearest_mode``, checked per factor: ``asymmetric``
with ``floor`` (what ``torch.nn.Upsample(mode="nearest")`` and Paddle export), ``tf_half_pixel_for_nn``
with ``floor`` and ``half_pixel``/``pytorch_half_pixel`` with either rounding (what the ONNX version
converter gives an old ``Upsample``) repeat at every factor, ``asymmetric`` with ``round_prefer_floor``
at factor 2 only; ``align_corners``, ``half_pixel_symmetric`` and ``tf_crop_and_resize`` depend on the
sizes and are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.graph import DEFAULT_DOMAINS, attr_str, const_array

__all__ = ["channels_last_repeat", "repeat_factors"]

#: Input lengths the coordinate mapping is checked on (the clamp at the border shows at length 1).
_CHECKED_LENGTHS = (1, 2, 3, 7)

#: Output coordinate → input coordinate, per ``coordinate_transformation_mode`` (the modes missing here
#: depend on the sizes, not only the factor, and are declined). ``pytorch_half_pixel`` equals
#: ``half_pixel`` for outputs longer than 1, which every factor of 2 or more gives.
_SOURCE: dict[str, Callable[[int, int], float]] = {
    "asymmetric": lambda o, f: o / f,
    "half_pixel": lambda o, f: (o + 0.5) / f - 0.5,
    "pytorch_half_pixel": lambda o, f: (o + 0.5) / f - 0.5,
    "tf_half_pixel_for_nn": lambda o, f: (o + 0.5) / f,
}

#: Input coordinate → input index, per ``nearest_mode``.
_ROUND: dict[str, Callable[[float], int]] = {
    "round_prefer_floor": lambda x: math.ceil(x - 0.5),
    "round_prefer_ceil": lambda x: math.floor(x + 0.5),
    "floor": math.floor,
    "ceil": math.ceil,
}


def _repeats(ctm: str, nearest_mode: str, factor: int) -> bool:
    """Whether output index ``o`` reads input index ``o // factor`` at every checked length."""
    source, rounding = _SOURCE.get(ctm), _ROUND.get(nearest_mode)
    if source is None or rounding is None:
        return False
    for length in _CHECKED_LENGTHS:
        for o in range(length * factor):
            index = min(max(rounding(source(o, factor)), 0), length - 1)
            if index != o // factor:
                return False
    return True


def _factors(node: ir.Node) -> tuple[int, ...] | None:
    """The per-axis factors of a 4-D Resize from its constant ``scales`` or ``sizes`` (static input)."""
    scales = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if scales is not None and scales.size:
        if scales.shape != (4,) or not all(float(s).is_integer() and s >= 1 for s in scales):
            return None
        return tuple(int(s) for s in scales)
    sizes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    dims = _static_dims(node.inputs[0])
    if sizes is None or sizes.shape != (4,) or dims is None or any(d <= 0 for d in dims):
        return None
    if any(int(s) % d for s, d in zip(sizes, dims, strict=True)):
        return None
    return tuple(int(s) // d for s, d in zip(sizes, dims, strict=True))


def _static_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    """The dims of a 4-D ``value`` when all are known integers, else ``None``."""
    shape = value.shape if value is not None else None
    if shape is None or len(shape) != 4:
        return None
    dims = tuple(d for d in shape if isinstance(d, int))
    return dims if len(dims) == 4 else None


def repeat_factors(node: ir.Node, opset: int) -> tuple[int, int] | None:
    """``(fh, fw)`` when Resize ``node`` repeats each pixel of its NCHW input ``fh × fw`` times.

    ``None`` for anything else: another mode, an ``axes`` attribute, non-constant or fractional
    scales, a batch or channel factor, a coordinate mapping that is not a repeat, opset 10's Resize.
    """
    if node.op_type != "Resize" or node.domain not in DEFAULT_DOMAINS or opset < 11:
        return None
    if attr_str(node, "mode", "nearest") != "nearest" or "axes" in node.attributes:
        return None
    factors = _factors(node)
    if factors is None or factors[:2] != (1, 1) or factors[2:] == (1, 1):
        return None
    ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel")
    nearest_mode = attr_str(node, "nearest_mode", "round_prefer_floor")
    if not all(_repeats(ctm, nearest_mode, f) for f in set(factors[2:])):
        return None
    return factors[2], factors[3]


#: ``emit(op_type, inputs, attributes, dtype)``: insert one node, return its output (of ``dtype``;
#: ``None``: the integer tensor's type).
Emit = Callable[[str, list[ir.Value | None], list[ir.Attr], ir.DataType | None], ir.Value]


def channels_last_repeat(
    x: ir.Value,
    factors: tuple[int, int],
    opset: int,
    emit: Emit,
    constant: Callable[[str, np.ndarray], ir.Value],
) -> ir.Value:
    """Emit the repeat of NCHW ``x`` by ``factors`` (see the module docstring); return its NCHW output.

    ``emit`` inserts one node (:data:`Emit`); ``constant(name, array)`` makes an initializer. The
    target shape is a constant when ``x``'s shape is static, else computed from ``Shape`` (a few
    integers per run).
    """
    fh, fw = factors
    nhwc = emit("Transpose", [x], [ir.AttrInt64s("perm", [0, 2, 3, 1])], None)
    if opset >= 13:
        axes = constant("upsample_axes", np.array([2, 4], np.int64))
        spread = emit("Unsqueeze", [nhwc, axes], [], None)
    else:
        spread = emit("Unsqueeze", [nhwc], [ir.AttrInt64s("axes", [2, 4])], None)
    broadcast = constant(f"upsample_expand_{fh}x{fw}", np.array([1, 1, fh, 1, fw, 1], np.int64))
    repeated = emit("Expand", [spread, broadcast], [], None)
    dims = _static_dims(x)
    if dims is not None:
        n, c, h, w = dims
        target = constant("upsample_shape", np.array([n, h * fh, w * fw, c], np.int64))
    else:
        multiplier = constant(f"upsample_factors_{fh}x{fw}", np.array([1, fh, fw, 1], np.int64))
        size = emit("Shape", [nhwc], [], ir.DataType.INT64)
        target = emit("Mul", [size, multiplier], [], ir.DataType.INT64)
    merged = emit("Reshape", [repeated, target], [], None)
    return emit("Transpose", [merged], [ir.AttrInt64s("perm", [0, 3, 1, 2])], None)
