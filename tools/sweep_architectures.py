"""Architecture sweep: export ~25 small transformers models with both torch exporters, quantize each with
``onnxq optimize`` and with onnxruntime's quantizer, and compare speed and accuracy.

Why: the unit tests and the zoo benchmark cover a handful of models; users export whatever Hugging Face
architecture they have, with whichever torch exporter they have. This sweep checks, per architecture and
exporter, that onnxq (1) does not crash, print a traceback or hang, (2) produces a model that is not
slower than the float model nor slower than onnxruntime's own quantizer, and (3) keeps accuracy (worst
output SQNR of 20 dB or more, and not clearly below onnxruntime's).

What: each architecture is built from a small ``transformers`` config (hidden 128-384, 1-4 layers,
random initialization, seeded from the architecture's name, eval mode; no weights are downloaded) and
wrapped in a module that returns one plain tensor (``last_hidden_state`` or the pooled output). Inputs
are realistic in shape and type rather than scaled: token ids drawn from the whole vocabulary with an
attention mask of ones followed by a random amount of padding per row, normal-distributed images at the
model's resolution, normal-distributed log-mel features or waveforms. The one exception to "random init
as is": BatchNorm layers get scale 1 / shift 0 and running statistics of their actual input (see
:func:`settle_batchnorm`), without which every BatchNorm CNN's output is ~1e-20. Every model is exported
twice:

- ``torchscript``: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` with ``dynamic_axes``;
- ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` (its default opset) with ``dynamic_shapes``
  (``torch.export.Dim``), from an example of batch 2 so that the batch axis is not specialized;

with a dynamic batch axis (and a dynamic sequence / sample axis for text and audio). When the dynamic
export fails it is retried with static shapes, and the row says so; when that fails too the row reads
``export failed`` (torch's fault, not onnxq's) and nothing else runs for it.

How, per exported model, in ``<work-dir>/<architecture>/<exporter>/``:

1. ``calib.npz`` (``--calib`` samples, 8) and ``eval.npz`` (``--eval`` other samples, 4): one array per
   graph input, samples of batch 1 stacked on a new leading axis (the CLI's ``.npz`` format); the same
   feeds also go to ``*.feeds.npz`` in :func:`tools.bench_static.save_feeds`'s format for the
   onnxruntime worker;
2. ``python -m onnxq optimize model.onnx -o onnxq.onnx --calib calib.npz --eval eval.npz
   --report-json onnxq.report.json`` in a subprocess with ``--timeout`` (stdout and stderr kept in
   ``onnxq.stdout.txt`` / ``onnxq.stderr.txt``): exit status, last stderr line, the report's own latency
   ratio and worst SQNR, what its latency guard kept float, and its quantization time;
3. onnxruntime's quantizer, :func:`tools.bench_static.quantize_ort` (``quant_pre_process`` then
   ``quantize_static``, QDQ, per-channel int8 weights, uint8 activations, min-max), in an isolated child
   process (:func:`tools.bench_static.run_isolated`) with the same timeout, writing ``ort/ort-uint8.onnx``;
4. float, onnxq and onnxruntime outputs on the evaluation feeds (``ORT_ENABLE_ALL``, one intra-op thread,
   no spin-waiting) for the SQNR of each output against the float model (worst output shown), and
   latency on the first evaluation feed: ``--runs`` rounds in which the three models run once each in
   rotating order, median per model; ``ratio`` = model ms / float ms (below 1 is faster). The three
   models are timed in the same loop, so the onnxq and onnxruntime ratios are comparable. When onnxq's
   model comes out slower than float or than onnxruntime's (by more than 5 %), the three are timed again
   with ``--confirm-runs`` rounds and that second measurement counts. ``CLI ratio`` is the ratio the
   onnxq report itself measured (its own interleaved float/int8 timing, after its latency guard).

Run from the repository root (torch, transformers and onnxscript installed: the ``bench`` extra)::

    python tools/sweep_architectures.py --json /tmp/archsweep/sweep.json   # everything, ~1-2 h on 2 cores
    python tools/sweep_architectures.py --filter bert,vit --exporters dynamo    # a subset
    python tools/sweep_architectures.py --list                                  # the architectures

The CLI runs with the repository root of this file as its working directory, so it quantizes with the
``onnxq/`` beside this ``tools/`` (``python -m`` puts the working directory first on the path). To pin a
version while ``onnxq/`` is being edited, run the copy of this file inside a snapshot (``git archive
HEAD | tar -x -C SNAP``); the onnxq source (commit, or a hash outside git) is printed at the start and the
end, and a change during the sweep is reported.

The table lists one row per (architecture, exporter); ``--json PATH`` writes every row with the full
detail (export notes, commands, stderr tails, the CLI's own figures). The exit status is 0 when onnxq
never crashed, timed out or printed a traceback, else 1. The sweep runs one process at a time (plus the
child it waits for), so it uses at most two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate

from tools.bench_static import Variant, run_isolated, save_feeds

logger = logging.getLogger("sweep_architectures")

REPO = Path(__file__).resolve().parents[1]
EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17
ORT_VARIANT = Variant("ort-uint8", "ort", "uint8")
#: Below this worst-output SQNR (dB) the onnxq CLI itself warns of a large accuracy loss.
LOW_SQNR_DB = 20.0
#: onnxq's SQNR counts as "clearly below" onnxruntime's when it trails by more than this (dB).
SQNR_MARGIN_DB = 3.0
#: onnxq's latency counts as "slower than onnxruntime's" when its ratio exceeds this multiple of ORT's.
SLOWER_MARGIN = 1.05

Feed = dict[str, np.ndarray]
InputMaker = Callable[[np.random.Generator, Any], Feed]  # (rng, wrapped module) -> one sample


# --------------------------------------------------------------------------------------------------
# Architectures


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: how to build its wrapped module, make one input sample, and which axes vary.

    ``dynamic`` maps each input name to ``{axis: (dim name, max)}``; axis 0 is the batch. ``make``
    returns one sample of batch 1 (numpy) for the built module (text reads its vocabulary size).
    """

    name: str
    family: str
    build: Callable[[], Any]
    make: InputMaker
    dynamic: Mapping[str, Mapping[int, tuple[str, int]]]


def _wrap(model: Any, output: str, kwargs: Mapping[str, Any] | None = None, flatten: bool = False) -> Any:
    """``model`` in a module whose ``forward`` takes the model's inputs by name and returns one tensor."""
    import inspect

    import torch

    extra = dict(kwargs or {})

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def _pick(self, out: Any) -> torch.Tensor:
            value = getattr(out, output)
            return torch.flatten(value, 1) if flatten else value

    params = list(inspect.signature(model.forward).parameters)
    first = params[0]
    if first == "input_ids":

        class Text(Wrapped):
            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self._pick(self.model(input_ids=input_ids, attention_mask=attention_mask, **extra))

        module: Any = Text()
    elif first == "pixel_values":

        class Pixels(Wrapped):
            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self._pick(self.model(pixel_values=pixel_values, **extra))

        module = Pixels()
    elif first == "input_features":

        class Features(Wrapped):
            def forward(self, input_features: torch.Tensor) -> torch.Tensor:
                return self._pick(self.model(input_features=input_features, **extra))

        module = Features()
    elif first == "input_values":

        class Waveform(Wrapped):
            def forward(self, input_values: torch.Tensor) -> torch.Tensor:
                return self._pick(self.model(input_values=input_values, **extra))

        module = Waveform()
    else:
        raise ValueError(f"no wrapper for a model whose first input is {first!r}")
    return module.eval()


SEQ_LEN = 128  # tokens per text sample
MAX_BATCH = 64


def _text_sample(rng: np.random.Generator, module: Any) -> Feed:
    """Token ids over the model's whole vocabulary; the mask is ones, then 0-50% trailing padding."""
    vocab = int(module.model.config.vocab_size)
    ids = rng.integers(0, vocab, size=(1, SEQ_LEN), dtype=np.int64)
    valid = int(rng.integers(SEQ_LEN // 2, SEQ_LEN + 1))
    mask = np.zeros((1, SEQ_LEN), dtype=np.int64)
    mask[:, :valid] = 1
    pad = getattr(module.model.config, "pad_token_id", None)
    ids[:, valid:] = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    return {"input_ids": ids, "attention_mask": mask}


def _text_axes(max_len: int) -> dict[str, dict[int, tuple[str, int]]]:
    axes = {0: ("batch", MAX_BATCH), 1: ("seq", max_len)}
    return {"input_ids": axes, "attention_mask": axes}


def _image_maker(size: int) -> InputMaker:
    def make(rng: np.random.Generator, module: Any) -> Feed:
        del module
        return {"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)}

    return make


IMAGE_AXES = {"pixel_values": {0: ("batch", MAX_BATCH)}}


def _text(name: str, family: str, config: Callable[[], Any], model: str, max_len: int, **kw: Any) -> Arch:
    def build() -> Any:
        import transformers

        return _wrap(getattr(transformers, model)(config()), "last_hidden_state", kw or None)

    return Arch(name, family, build, _text_sample, _text_axes(max_len))


def _vision(name: str, config: Callable[[], Any], model: str, output: str, size: int, flatten: bool) -> Arch:
    def build() -> Any:
        import transformers

        return _wrap(getattr(transformers, model)(config()), output, flatten=flatten)

    return Arch(name, "vision", build, _image_maker(size), IMAGE_AXES)


def _cfg(cls: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, cls)(**kw)

    return make


TEXT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
VIT = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 768}


def _whisper() -> Arch:
    def build() -> Any:
        import transformers

        cfg = transformers.WhisperConfig(
            d_model=192,
            encoder_layers=2,
            encoder_attention_heads=3,
            encoder_ffn_dim=768,
            decoder_layers=1,
            decoder_attention_heads=3,
            decoder_ffn_dim=768,
            num_mel_bins=80,
            max_source_positions=250,  # 500 mel frames (5 s); the encoder requires exactly this length
        )
        return _wrap(transformers.WhisperModel(cfg).get_encoder(), "last_hidden_state")

    def make(rng: np.random.Generator, module: Any) -> Feed:
        del module
        return {"input_features": rng.standard_normal((1, 80, 500), dtype=np.float32)}

    return Arch("whisper_encoder", "audio", build, make, {"input_features": {0: ("batch", MAX_BATCH)}})


def _wav2vec2() -> Arch:
    def build() -> Any:
        import transformers

        cfg = transformers.Wav2Vec2Config(
            hidden_size=192,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=768,
            conv_dim=(256,) * 7,
            num_conv_pos_embeddings=128,
            num_conv_pos_embedding_groups=16,
        )
        return _wrap(transformers.Wav2Vec2Model(cfg), "last_hidden_state")

    def make(rng: np.random.Generator, module: Any) -> Feed:
        del module
        return {"input_values": rng.standard_normal((1, 16000), dtype=np.float32)}

    axes = {"input_values": {0: ("batch", MAX_BATCH), 1: ("samples", 160000)}}
    return Arch("wav2vec2", "audio", build, make, axes)


def architectures() -> list[Arch]:
    """Every architecture of the sweep, in table order."""
    return [
        _text("bert", "encoder", _cfg("BertConfig", **TEXT), "BertModel", 512),
        _text(
            "distilbert",
            "encoder",
            _cfg("DistilBertConfig", dim=256, n_layers=4, n_heads=4, hidden_dim=1024),
            "DistilBertModel",
            512,
        ),
        _text("roberta", "encoder", _cfg("RobertaConfig", **TEXT), "RobertaModel", 512),
        _text(
            "albert",
            "encoder",
            _cfg("AlbertConfig", embedding_size=128, **TEXT),
            "AlbertModel",
            512,
        ),
        _text("electra", "encoder", _cfg("ElectraConfig", embedding_size=128, **TEXT), "ElectraModel", 512),
        _text(
            "deberta_v2",
            "encoder",
            _cfg(
                "DebertaV2Config",
                **TEXT,
                vocab_size=128100,
                relative_attention=True,
                position_buckets=256,
                pos_att_type=["p2c", "c2p"],
                max_relative_positions=-1,
                share_att_key=True,
                norm_rel_ebd="layer_norm",
                position_biased_input=False,
            ),
            "DebertaV2Model",
            512,
        ),
        _text("mpnet", "encoder", _cfg("MPNetConfig", **TEXT), "MPNetModel", 512),
        _text(
            "t5_encoder",
            "encoder",
            _cfg(
                "T5Config",
                d_model=256,
                d_kv=64,
                d_ff=1024,
                num_layers=4,
                num_heads=4,
                feed_forward_proj="gated-gelu",
            ),
            "T5EncoderModel",
            1024,
        ),
        _text(
            "xlm_roberta",
            "encoder",
            _cfg(
                "XLMRobertaConfig",
                vocab_size=250002,
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=512,
            ),
            "XLMRobertaModel",
            512,
        ),
        _text(
            "gpt2",
            "decoder",
            _cfg("GPT2Config", n_embd=256, n_layer=4, n_head=4, use_cache=False),
            "GPT2Model",
            1024,
            use_cache=False,
        ),
        _text(
            "llama",
            "decoder",
            _cfg(
                "LlamaConfig",
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=32000,
                max_position_embeddings=2048,
                use_cache=False,
            ),
            "LlamaModel",
            2048,
            use_cache=False,
        ),
        _vision(
            "vit",
            _cfg("ViTConfig", **VIT, image_size=224, patch_size=16),
            "ViTModel",
            "last_hidden_state",
            224,
            False,
        ),
        _vision(
            "deit",
            _cfg("DeiTConfig", **VIT, image_size=224, patch_size=16),
            "DeiTModel",
            "last_hidden_state",
            224,
            False,
        ),
        _vision(
            "swin",
            _cfg("SwinConfig", image_size=224, embed_dim=48, depths=[1, 1, 2, 1], num_heads=[3, 6, 12, 24]),
            "SwinModel",
            "pooler_output",
            224,
            True,
        ),
        _vision(
            "convnext",
            _cfg("ConvNextConfig", hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 3, 1]),
            "ConvNextModel",
            "pooler_output",
            224,
            True,
        ),
        _vision("mobilenet_v2", _cfg("MobileNetV2Config"), "MobileNetV2Model", "pooler_output", 224, True),
        _vision(
            "mobilevit",
            _cfg(
                "MobileViTConfig",
                hidden_sizes=[64, 80, 96],
                neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
                expand_ratio=2.0,
                image_size=256,
            ),
            "MobileViTModel",
            "pooler_output",
            256,
            True,
        ),
        _vision(
            "efficientnet_b0",
            _cfg(
                "EfficientNetConfig",
                image_size=224,
                width_coefficient=1.0,
                depth_coefficient=1.0,
                hidden_dim=1280,
            ),
            "EfficientNetModel",
            "pooler_output",
            224,
            True,
        ),
        _vision(
            "resnet18",
            _cfg("ResNetConfig", layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
            "ResNetModel",
            "pooler_output",
            224,
            True,
        ),
        _vision(
            "regnet_y_200mf",
            _cfg(
                "RegNetConfig",
                depths=[1, 1, 4, 7],
                hidden_sizes=[24, 56, 152, 368],
                groups_width=8,
                layer_type="y",
            ),
            "RegNetModel",
            "pooler_output",
            224,
            True,
        ),
        _vision("segformer_b0", _cfg("SegformerConfig"), "SegformerModel", "last_hidden_state", 224, False),
        _vision(
            "dinov2",
            _cfg("Dinov2Config", **VIT, image_size=224, patch_size=14),
            "Dinov2Model",
            "last_hidden_state",
            224,
            False,
        ),
        _vision(
            "clip_vision",
            _cfg("CLIPVisionConfig", **VIT, image_size=224, patch_size=32),
            "CLIPVisionModel",
            "last_hidden_state",
            224,
            False,
        ),
        _whisper(),
        _wav2vec2(),
    ]


def settle_batchnorm(
    module: Any, arch: Arch, rng: np.random.Generator, batches: int = 4, size: int = 4
) -> int:
    """Make every BatchNorm behave like a trained one; returns how many BatchNorms there are.

    At random initialization a BatchNorm's running statistics (mean 0, variance 1) do not match what
    reaches it, and ``transformers`` initializes some BatchNorm scales like Linear weights (N(0, 0.02):
    EfficientNet, MobileViT); with its small conv weights (std 0.02) the activations of every BatchNorm
    CNN then shrink layer by layer to ~1e-20: an output of zeros says nothing about quantization. So
    each BatchNorm gets PyTorch's own initial affine parameters (scale 1, shift 0) and running
    statistics of its actual input (cumulative average over ``batches`` batches of ``size`` fresh
    samples, only the BatchNorms in training mode), as a trained network's BatchNorms normalize their
    input. No other weight changes.
    """
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    for norm in norms:
        norm.reset_parameters()  # running statistics and the affine scale/shift
        norm.momentum = None  # cumulative moving average
        norm.train()
    with torch.no_grad():
        for _ in range(batches):
            samples = [arch.make(rng, module) for _ in range(size)]
            module(*(torch.from_numpy(np.concatenate([s[n] for s in samples])) for n in samples[0]))
    module.eval()
    return len(norms)


def select(names: str | None) -> list[Arch]:
    """The architectures named in ``names`` (comma-separated substrings), or all of them."""
    archs = architectures()
    if not names:
        return archs
    wanted = [part.strip() for part in names.split(",") if part.strip()]
    return [a for a in archs if any(part in a.name for part in wanted)]


def _seed(name: str) -> int:
    """A seed from the architecture's name alone, so that ``--filter`` does not change any model."""
    return zlib.crc32(name.encode())


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of the exception, and of its root cause when it has one (torch's exporters
    wrap the real error in a generic "Failed to export the model" message)."""

    def line(error: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        lines = [part.strip() for part in text.splitlines() if part.strip()]
        return f"{type(error).__name__}: {lines[0] if lines else ''}"

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = line(exc) if root is exc else f"{line(exc)} <- {line(root)}"
    return text[:limit]


# --------------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep the exporters' progress prints and warnings off the terminal."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _batched(sample: Feed, batch: int) -> Feed:
    return {k: np.repeat(v, batch, axis=0) for k, v in sample.items()}


def export(arch: Arch, module: Any, sample: Feed, exporter: str, path: Path, *, dynamic: bool) -> None:
    """Export ``module`` to ``path`` with one exporter, dynamic axes from ``arch`` or static shapes."""
    import torch

    names = list(sample)
    out_axes = {0: "batch"} if dynamic else {}
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            args = tuple(torch.from_numpy(sample[n]) for n in names)
            axes: dict[str, dict[int, str]] = {}
            if dynamic:
                axes = {n: {ax: dim for ax, (dim, _) in arch.dynamic.get(n, {}).items()} for n in names}
                axes["output"] = out_axes
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=TORCHSCRIPT_OPSET,
                input_names=names,
                output_names=["output"],
                dynamic_axes=axes or None,
            )
            return
        # dynamo: a batch-2 example, so that torch.export does not specialize the batch axis to 1
        batch = 2 if dynamic else 1
        args = tuple(torch.from_numpy(_batched(sample, batch)[n]) for n in names)
        shapes = None
        if dynamic:
            dims: dict[str, Any] = {}
            shapes = tuple(
                {
                    ax: dims.setdefault(dim, torch.export.Dim(dim, min=1 if ax == 0 else 2, max=top))
                    for ax, (dim, top) in arch.dynamic.get(n, {}).items()
                }
                or None
                for n in names
            )
        program = torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            input_names=names,
            output_names=["output"],
            dynamic_shapes=shapes,
            verbose=False,
        )
        if program is None:
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
        program.save(str(path), external_data=False)


def _graph_inputs(path: Path) -> list[tuple[str, list[int | str]]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims: list[int | str] = [
            d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in value.type.tensor_type.shape.dim
        ]
        inputs.append((value.name, dims))
    return inputs


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


# --------------------------------------------------------------------------------------------------
# Data


def write_feeds(feeds: Sequence[Feed], names: Sequence[str], stem: Path) -> tuple[Path, Path]:
    """``<stem>.npz`` in the CLI's format (samples stacked on a new axis 0) and ``<stem>.feeds.npz`` in
    :func:`tools.bench_static.save_feeds`'s format, both restricted to the graph's inputs ``names``."""
    kept = [{n: f[n] for n in names} for f in feeds]
    cli = stem.with_suffix(".npz")
    np.savez(cli, **{n: np.stack([f[n] for f in kept]) for n in names})  # type: ignore[arg-type]
    bench = save_feeds(kept, stem.with_suffix(".feeds.npz"))
    return cli, bench


# --------------------------------------------------------------------------------------------------
# onnxq CLI


def run_onnxq(case_dir: Path, model: Path, calib: Path, evaluation: Path, timeout: float) -> dict[str, Any]:
    """``python -m onnxq optimize`` in a subprocess; exit status, stderr tail and the report's figures."""
    out, report_path = case_dir / "onnxq.onnx", case_dir / "onnxq.report.json"
    for stale in (out, report_path):
        stale.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "onnxq",
        "optimize",
        str(model),
        "-o",
        str(out),
        "--calib",
        str(calib),
        "--eval",
        str(evaluation),
        "--report-json",
        str(report_path),
    ]
    row: dict[str, Any] = {"command": " ".join(command)}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    except subprocess.TimeoutExpired as exc:
        row.update(outcome=f"timeout after {timeout:g} s", exit=None, wall_s=time.perf_counter() - start)
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        (case_dir / "onnxq.stderr.txt").write_text(stderr)
        row["stderr_tail"] = stderr.strip().splitlines()[-5:]
        return row
    row["wall_s"] = time.perf_counter() - start
    row["exit"] = proc.returncode
    (case_dir / "onnxq.stdout.txt").write_text(proc.stdout)
    (case_dir / "onnxq.stderr.txt").write_text(proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    row["stderr_tail"] = lines[-5:]
    last = lines[-1].strip() if lines else ""
    if "Traceback" in proc.stderr or proc.returncode == 1 or proc.returncode < 0:
        row["outcome"] = f"traceback: {last[:200]}"
    elif proc.returncode == 0:
        row["outcome"] = "ok" if out.is_file() else "exit 0 but no output"
    elif proc.returncode == 2:
        row["outcome"] = f"error: {last[:200]}"
    else:
        row["outcome"] = f"exit {proc.returncode}: {last[:200]}"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        # Non-float outputs (lengths, labels) have no SQNR: the report writes "nan" for them.
        accuracy = report.get("accuracy", [])
        sqnrs = [a["sqnr_db"] for a in accuracy if isinstance(a.get("sqnr_db"), float | int)]
        row["cli_worst_sqnr_db"] = min(sqnrs, default=None)
        lat = report.get("latency", [])
        if lat:
            row["cli_ratio"] = lat[0]["quantized_ms"] / lat[0]["float_ms"] if lat[0]["float_ms"] else None
        guard = report.get("latency_guard") or {}
        if guard.get("all_float"):
            row["guard"] = "all float"
        elif guard.get("reverted"):
            row["guard"] = "; ".join(f"{len(v)} {k}" for k, v in guard["reverted"].items())
        else:
            row["guard"] = "-" if guard else "did not run"
        timings = report.get("timings_s", {})
        row["quantize_s"] = timings.get("total")
        row["guard_s"] = timings.get("latency_guard")
        row["nodes_quantized"] = report.get("nodes_quantized")
        row["quantized_op_types"] = report.get("quantized_op_types")
        row["float_op_types"] = report.get("float_op_types")
    return row


# --------------------------------------------------------------------------------------------------
# Evaluation in onnxruntime


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """``10·log10(Σ ref² / Σ (ref − act)²)`` in float64; ``inf`` when equal."""
    ref = reference.astype(np.float64).ravel()
    act = actual.astype(np.float64).ravel()
    noise = float(np.sum((ref - act) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def time_sessions(sessions: Mapping[str, Any], feed: Feed, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per session: ``warmup`` untimed runs each, then ``runs`` rounds in which every session
    runs once, in rotating order (no session always first, or always after the same other one)."""
    names = list(sessions)
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(runs):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {n: float(np.median(t)) * 1e3 for n, t in times.items() if t}


def _suspicious(ms: Mapping[str, float]) -> bool:
    """Whether onnxq's model timed slower than float or than onnxruntime's (worth timing again)."""
    if "onnxq" not in ms or "float" not in ms:
        return False
    slower_than_ort = "ort" in ms and ms["onnxq"] > ms["ort"] * SLOWER_MARGIN
    return ms["onnxq"] > ms["float"] or slower_than_ort


def evaluate(
    models: Mapping[str, Path], feeds: Sequence[Feed], runs: int, warmup: int, confirm_runs: int
) -> dict[str, Any]:
    """Worst-output SQNR of each model against ``float`` on ``feeds`` and interleaved latency.

    Latency: :func:`time_sessions` on ``feeds[0]``. When onnxq's model comes out slower than float or
    than onnxruntime's, all are timed again with ``confirm_runs`` rounds and that measurement counts
    (the first is kept as ``median_ms_first``). Models that onnxruntime cannot open or run are reported
    with the error.
    """
    sessions: dict[str, Any] = {}
    result: dict[str, Any] = {"errors": {}}
    outputs: dict[str, list[list[np.ndarray]]] = {}
    for name, path in models.items():
        try:
            session = _session(path)
            outputs[name] = [session.run(None, feed) for feed in feeds]
            sessions[name] = session
        except Exception as exc:
            result["errors"][name] = _first_line(exc)
    reference = outputs.get("float")
    result["sqnr_db"] = {}
    if reference is not None:
        for name, got in outputs.items():
            if name == "float":
                continue
            per_output = [
                sqnr_db(
                    np.concatenate([r[i].ravel() for r in reference]),
                    np.concatenate([g[i].ravel() for g in got]),
                )
                for i in range(len(reference[0]))
            ]
            result["sqnr_db"][name] = min(per_output)
    result["median_ms"] = time_sessions(sessions, feeds[0], runs, warmup)
    if confirm_runs > 0 and _suspicious(result["median_ms"]):
        result["median_ms_first"] = result["median_ms"]
        result["median_ms"] = time_sessions(sessions, feeds[0], confirm_runs, warmup)
        result["confirm_runs"] = confirm_runs
    return result


# --------------------------------------------------------------------------------------------------
# One case


@dataclasses.dataclass(frozen=True)
class Settings:
    work_dir: Path
    exporters: tuple[str, ...]
    timeout: float
    calib: int
    eval: int
    runs: int
    warmup: int
    confirm_runs: int


def _torch_reference(module: Any, feeds: Sequence[Feed]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [module(*(torch.from_numpy(v) for v in f.values())).numpy() for f in feeds]


def build(arch: Arch) -> Any:
    """The wrapped module of ``arch``: seeded from its name, BatchNorms settled, in eval mode.

    Every call gives the same weights, so each exporter can get a fresh module: after a TorchScript
    export, torch.export of the *same* Swin instance fails (a data-dependent guard), which a user who
    exports once never sees.
    """
    import torch

    torch.manual_seed(_seed(arch.name))
    with _quiet():
        module = arch.build()
    settle_batchnorm(module, arch, np.random.default_rng(_seed(arch.name) + 1))
    return module.eval()


def run_arch(arch: Arch, settings: Settings) -> list[dict[str, Any]]:
    """Build, export (a fresh module per exporter), quantize both ways and evaluate one architecture."""
    import torch

    base: dict[str, Any] = {"arch": arch.name, "family": arch.family}
    try:
        module = build(arch)
    except Exception as exc:
        reason = _first_line(exc)
        logger.warning("%s: could not be built: %s", arch.name, reason)
        return [{**base, "exporter": e, "export": f"build failed: {reason}"} for e in settings.exporters]
    base["batchnorms_settled"] = sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()
    )
    rng = np.random.default_rng(_seed(arch.name))
    samples = [arch.make(rng, module) for _ in range(settings.calib + settings.eval)]
    calib_feeds, eval_feeds = samples[: settings.calib], samples[settings.calib :]
    expected = _torch_reference(module, eval_feeds)
    params = sum(p.numel() for p in module.parameters())
    rows = []
    for index, exporter in enumerate(settings.exporters):
        row = {**base, "exporter": exporter, "params_m": params / 1e6}
        try:
            fresh = module if index == 0 else build(arch)
            row.update(run_case(arch, fresh, exporter, calib_feeds, eval_feeds, expected, settings))
        except Exception as exc:  # a bug in this tool: keep sweeping, but say so loudly
            row["export"] = row.get("export", "?")
            row["sweep_error"] = _first_line(exc)
            row["sweep_traceback"] = traceback.format_exc()
            logger.error("%s/%s: sweep error: %s", arch.name, exporter, row["sweep_error"])
        rows.append(row)
    return rows


def run_case(
    arch: Arch,
    module: Any,
    exporter: str,
    calib_feeds: Sequence[Feed],
    eval_feeds: Sequence[Feed],
    expected: Sequence[np.ndarray],
    settings: Settings,
) -> dict[str, Any]:
    case_dir = (settings.work_dir / arch.name / exporter).resolve()
    case_dir.mkdir(parents=True, exist_ok=True)
    model = case_dir / "model.onnx"
    model.unlink(missing_ok=True)
    row: dict[str, Any] = {"dir": str(case_dir), "model": str(model)}
    start = time.perf_counter()
    try:
        export(arch, module, calib_feeds[0], exporter, model, dynamic=True)
        row["shapes"] = "dynamic"
    except Exception as exc:
        row["dynamic_export_error"] = _first_line(exc)
        logger.info(
            "  %s/%s: dynamic export failed (%s); static", arch.name, exporter, row["dynamic_export_error"]
        )
        try:
            export(arch, module, calib_feeds[0], exporter, model, dynamic=False)
            row["shapes"] = "static (dynamic export failed)"
        except Exception as exc2:
            row["export"] = f"export failed: {_first_line(exc2)}"
            row["export_s"] = time.perf_counter() - start
            return row
    row["export_s"] = time.perf_counter() - start
    row["export"] = "ok"
    row["opset"] = _opset(model)
    inputs = _graph_inputs(model)
    row["inputs"] = dict(inputs)
    names = [name for name, _ in inputs]
    missing = [n for n in names if n not in calib_feeds[0]]
    if missing:
        row["export"] = f"export gave unexpected inputs {missing}"
        return row
    calib, calib_bench = write_feeds(calib_feeds, names, case_dir / "calib")
    evaluation, _ = write_feeds(eval_feeds, names, case_dir / "eval")
    row.update(calib=str(calib), eval=str(evaluation))
    eval_kept = [{n: f[n] for n in names} for f in eval_feeds]

    # the float export against torch: is the exported model right before anyone quantizes it?
    try:
        got = [_session(model).run(None, f)[0] for f in eval_kept]
        row["export_sqnr_db"] = min(sqnr_db(e, g) for e, g in zip(expected, got, strict=True))
    except Exception as exc:
        row["export"] = f"float model fails in onnxruntime: {_first_line(exc)}"

    logger.info(
        "  %s/%s: exported (%s, opset %s); onnxq ...", arch.name, exporter, row["shapes"], row["opset"]
    )
    row["onnxq"] = run_onnxq(case_dir, model, calib, evaluation, settings.timeout)
    logger.info("  %s/%s: onnxq %s; onnxruntime quantizer ...", arch.name, exporter, row["onnxq"]["outcome"])
    with _quiet():
        ort_run = run_isolated(
            arch.name,
            ORT_VARIANT,
            model,
            calib_bench,
            len(calib_feeds),
            case_dir / "ort",
            timeout=settings.timeout,
        )
    row["ort"] = {"outcome": ort_run.status, "quantize_s": ort_run.quant_s, "detail": ort_run.detail}
    models = {"float": model}
    if row["onnxq"]["outcome"] == "ok":
        models["onnxq"] = case_dir / "onnxq.onnx"
    if ort_run.output is not None:
        models["ort"] = Path(ort_run.output)
    if row["export"] == "ok":
        row["eval"] = evaluate(models, eval_kept, settings.runs, settings.warmup, settings.confirm_runs)
        ms = row["eval"]["median_ms"]
        for name in ("onnxq", "ort"):
            if name in ms and "float" in ms:
                row[name]["ratio"] = ms[name] / ms["float"]
            if name in row["eval"]["sqnr_db"]:
                row[name]["sqnr_db"] = row["eval"]["sqnr_db"][name]
            if name in row["eval"]["errors"]:
                row[name]["eval_error"] = row["eval"]["errors"][name]
    return row


# --------------------------------------------------------------------------------------------------
# Findings and table


def _num(value: Any, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return format(value, spec)


def findings(row: Mapping[str, Any]) -> list[str]:
    """What is wrong with onnxq on this row: crash, refusal, slower, less accurate (empty: nothing)."""
    q, o = row.get("onnxq"), row.get("ort") or {}
    if not q:
        return []
    found = []
    outcome = q["outcome"]
    if outcome.startswith(("traceback", "timeout", "exit")):
        found.append(f"(a) {outcome}")
    elif outcome.startswith("error"):
        found.append(f"(b) {outcome}")
    ratio, ort_ratio = q.get("ratio"), o.get("ratio")
    if ratio is not None and ratio > 1.0:
        found.append(f"(c) slower than float: {ratio:.2f}x")
    if ratio is not None and ort_ratio is not None and ratio > ort_ratio * SLOWER_MARGIN:
        found.append(f"(c) slower than ORT: {ratio:.2f}x vs {ort_ratio:.2f}x")
    sqnr, ort_sqnr = q.get("sqnr_db"), o.get("sqnr_db")
    if sqnr is not None and sqnr < LOW_SQNR_DB:
        found.append(f"(d) worst SQNR {sqnr:.1f} dB < {LOW_SQNR_DB:g}")
    if sqnr is not None and ort_sqnr is not None and sqnr < ort_sqnr - SQNR_MARGIN_DB:
        found.append(f"(d) SQNR {sqnr:.1f} dB vs ORT {ort_sqnr:.1f} dB")
    if q.get("eval_error"):
        found.append(f"(a) output fails in onnxruntime: {q['eval_error']}")
    return found


def _ort_cell(ort: Mapping[str, Any]) -> str:
    """onnxruntime's latency ratio, or why there is none (quantizer failed, output fails to run)."""
    if not ort:
        return ""
    if ort.get("outcome") != "ok":
        return str(ort.get("outcome", ""))[:40]
    if ort.get("eval_error"):
        return "output fails in ORT"
    return _num(ort.get("ratio"), ".2f")


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = [
        "architecture",
        "exporter",
        "opset",
        "shapes",
        "onnxq outcome",
        "onnxq ratio",
        "onnxq SQNR",
        "CLI ratio",
        "guard kept float",
        "ORT ratio",
        "ORT SQNR",
        "onnxq s",
        "ORT s",
    ]
    body = []
    for row in rows:
        q, o = row.get("onnxq") or {}, row.get("ort") or {}
        export_state = row.get("export", "?")
        outcome = q.get("outcome") or export_state
        if not q and " <- " in export_state:  # torch's generic wrapper message: show the root cause
            outcome = "export failed: " + export_state.split(" <- ", 1)[1]
        if row.get("sweep_error"):
            outcome = f"sweep error: {row['sweep_error']}"
        body.append(
            [
                row["arch"],
                row["exporter"],
                row.get("opset", ""),
                "static*" if str(row.get("shapes", "")).startswith("static") else row.get("shapes", ""),
                outcome[:70],
                _num(q.get("ratio"), ".2f"),
                _num(q.get("sqnr_db"), ".1f"),
                _num(q.get("cli_ratio"), ".2f"),
                q.get("guard", ""),
                _ort_cell(o),
                _num(o.get("sqnr_db"), ".1f"),
                _num(q.get("quantize_s"), ".1f"),
                _num(o.get("quantize_s"), ".1f"),
            ]
        )
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def format_findings(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for row in rows:
        found = findings(row)
        if not found:
            continue
        q = row["onnxq"]
        lines.append(f"- {row['arch']}/{row['exporter']}: " + "; ".join(found))
        lines.append(f"    reproduce: cd {REPO} && {q['command']}")
        if q["outcome"] != "ok":
            lines.extend(f"    stderr: {line}" for line in q.get("stderr_tail", [])[-3:])
    return "\n".join(lines) if lines else "no findings"


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export small random-init transformers architectures with both torch exporters, "
        "quantize each with onnxq and onnxruntime, and compare latency (1 thread) and SQNR.",
    )
    parser.add_argument("--filter", help="comma-separated substrings of architecture names")
    parser.add_argument(
        "--exporters", default=",".join(EXPORTERS), help="comma-separated: torchscript, dynamo (default both)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/archsweep"), help="models and data")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per quantization run")
    parser.add_argument("--calib", type=int, default=8, help="calibration samples")
    parser.add_argument("--eval", type=int, default=4, help="evaluation samples")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per model")
    parser.add_argument(
        "--confirm-runs",
        type=int,
        default=60,
        help="rounds of a second timing when onnxq's model measured slower than float or ORT's (0: off)",
    )
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--list", action="store_true", help="list the architectures and exit")
    return parser


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for package in ("onnxq", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def onnxq_source() -> str:
    """The onnxq source the CLI runs: the repository's commit, ``+dirty`` when ``onnxq/`` has changes.

    Recorded at the start and the end of a sweep: onnxq edited meanwhile makes rows incomparable.
    Outside a git checkout (a ``git archive`` snapshot) a hash of the ``onnxq/*.py`` files stands in.
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "onnxq"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        digest = 0
        for path in sorted((REPO / "onnxq").rglob("*.py")):
            digest = zlib.crc32(path.read_bytes(), zlib.crc32(str(path.relative_to(REPO)).encode(), digest))
        return f"no git; onnxq/*.py crc32 {digest:08x}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    archs = select(args.filter)
    if args.list:
        for arch in archs:
            print(f"{arch.name:18} {arch.family}")
        return 0
    exporters = tuple(e.strip() for e in args.exporters.split(",") if e.strip())
    unknown = [e for e in exporters if e not in EXPORTERS]
    if unknown or not exporters:
        print(f"unknown exporter(s) {unknown}; expected {', '.join(EXPORTERS)}", file=sys.stderr)
        return 2
    if not archs:
        print("no architecture selected", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    settings = Settings(
        args.work_dir,
        exporters,
        args.timeout,
        args.calib,
        args.eval,
        args.runs,
        args.warmup,
        args.confirm_runs,
    )
    start = time.perf_counter()
    source = onnxq_source()
    logger.info("onnxq source: %s (%s)", source, REPO / "onnxq")
    rows: list[dict[str, Any]] = []
    for index, arch in enumerate(archs, 1):
        logger.info("[%d/%d] %s", index, len(archs), arch.name)
        rows.extend(run_arch(arch, settings))
        if args.json:  # partial results survive an interrupted sweep
            _write_json(args.json, rows, time.perf_counter() - start)
    wall = time.perf_counter() - start
    source_end = onnxq_source()
    print(table(rows))
    print("\nFindings (a) crash/traceback/timeout, (b) refused, (c) slower, (d) less accurate:")
    print(format_findings(rows))
    print(f"\n{len(rows)} rows in {wall:.0f} s; " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"onnxq source: {source}")
    if source_end != source:
        print(f"WARNING: onnxq changed during the sweep ({source} -> {source_end}): rows are not comparable")
    if args.json:
        _write_json(args.json, rows, wall)
    crashed = any(
        str((r.get("onnxq") or {}).get("outcome", "")).startswith(("traceback", "timeout", "exit"))
        or r.get("sweep_error")
        for r in rows
    )
    return 1 if crashed else 0


def _write_json(path: Path, rows: Sequence[Mapping[str, Any]], wall: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "versions": versions(),
        "onnxq_source": onnxq_source(),
        "argv": sys.argv,
        "wall_seconds": round(wall, 1),
        "rows": list(rows),
    }
    path.write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
