"""Preprocess: put a float model into the form planning expects.

Composed from onnx-ir's common passes and onnxq's folding passes. Initializers stop being overridable
graph inputs, Constant nodes become initializers (so weights written as Constant nodes are seen as
weights), constant subgraphs are folded
(:mod:`~onnxq.preprocess.fold_constants`), BatchNorm is folded into Conv/ConvTranspose/Gemm
(:mod:`~onnxq.preprocess.fold_bn`), per-channel Mul/Add and zero Pads next to a Conv are folded into
or into the Conv/Gemm/MatMul that reads them (:mod:`~onnxq.preprocess.fold_affine`), decomposed GELU and
LayerNorm (before the folds) and hard-swish (after them, where its ``/ 6`` did not fold) become single
ops (:mod:`~onnxq.preprocess.canonicalize`), Identity (:mod:`~onnxq.preprocess.identity`) and dead nodes are
removed, shapes are inferred, ops whose ONNX Runtime kernels are scalar loops (LRN, PRelu, Softplus,
Mish) are written out in vectorized primitives (:mod:`~onnxq.preprocess.slow_kernels`) and nodes sorted
topologically.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxq.declines import Decline
from onnxq.graph import NameScope, materialize_initializers, node_label
from onnxq.load.files import UNREPRESENTED_TYPES_KEY, strip_unrepresented_types
from onnxq.preprocess.canonicalize import (
    DECOMPOSE_RULES,
    FLOAT_ISLAND_RULES,
    LATE_RULES,
    SHAPED_RULES,
    CanonicalizePass,
)
from onnxq.preprocess.defuse import DefusePass
from onnxq.preprocess.equalize import EqualizePass
from onnxq.preprocess.fold_affine import BatchNormAffinePass, FoldAffinePass
from onnxq.preprocess.fold_bn import FoldBatchNormPass
from onnxq.preprocess.fold_constants import FoldConstantsPass
from onnxq.preprocess.fold_shapes import FoldShapesPass
from onnxq.preprocess.identity import RemoveIdentityPass
from onnxq.preprocess.share_constants import share_constants
from onnxq.preprocess.slow_kernels import SlowKernelsPass
from onnxq.preprocess.upcast import UpcastHalfPass

__all__ = ["PreprocessSummary", "infer_shapes", "preprocess"]

logger = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    """What preprocessing changed, for the report."""

    nodes_before: int = 0
    nodes_after: int = 0
    batchnorms_folded: int = 0
    #: Per-channel Mul/Add/Sub and zero Pads folded into a neighbouring Conv/ConvTranspose/Gemm.
    affine_folded: int = 0
    #: Decomposed activations/normalizations rewritten into one op, by the op they became.
    canonicalized: dict[str, int] = field(default_factory=dict)
    #: Conv → Relu → Conv pairs rescaled by cross-layer equalization (``equalize=True`` only).
    equalized: int = 0
    #: Values of a float16/bfloat16 model now computed in float32 (0: the model was float32).
    upcast: int = 0
    notes: list[str] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    seconds: float = 0.0


class _OpTypeNames(common.naming.SimpleNameGenerator):
    """Unnamed nodes are named after their op type (``Conv``, ``Conv_1``, …) so reports can name them."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type


def unique_names(model: ir.Model) -> int:
    """Give every value and node of every graph a name of its own; returns how many were renamed.

    Sibling If branches may reuse a name (valid ONNX), but calibration, ranges and exclusions are
    keyed by name. The main graph comes first, so its inputs, outputs and nodes keep their names.
    """
    scope = NameScope(model.graph)
    seen_values: set[str] = set()
    seen_nodes: set[str] = set()
    renamed = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        values = [*graph.inputs, *(out for node in graph for out in node.outputs)]
        for value in values:
            if value.name and value.name in seen_values and graph is not model.graph:
                value.name = scope.fresh(value.name)
                renamed += 1
            if value.name:
                seen_values.add(value.name)
        seen_values.update(graph.initializers)
        for node in graph:
            if node.name and node.name in seen_nodes and graph is not model.graph:
                node.name = scope.fresh(node.name)
                renamed += 1
            if node.name:
                seen_nodes.add(node.name)
    return renamed


#: Rounds of shape folding and shape inference at most (each round's constants inform the next).
SHAPE_FOLD_ROUNDS = 6


def infer_shapes(model: ir.Model) -> bool:
    """Run ONNX shape inference leniently; a model it cannot handle keeps the shapes it has."""
    try:
        if UNREPRESENTED_TYPES_KEY in model.metadata_props:
            _infer_shapes_around_unrepresented_types(model)
        else:
            common.ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:
        logger.warning("shape inference failed, continuing without it: %s", str(exc).splitlines()[0])
        return False
    return True


def _infer_shapes_around_unrepresented_types(model: ir.Model) -> None:
    """Shape inference for a model with values onnx-ir cannot represent (a ZipMap's sequence of maps).

    ONNX infers those types again, and onnx-ir cannot read them back: they are cleared in the inferred
    model (:func:`~onnxq.load.files.strip_unrepresented_types`), and the inferred types and shapes of
    the other values are copied over by name. Such models are small (scikit-learn pipelines), so the
    whole model goes through ONNX's inference.
    """
    proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), strict_mode=False)
    strip_unrepresented_types(proto)
    inferred = {
        value.name: value for node in ir.from_proto(proto).graph.all_nodes() for value in node.outputs
    }
    for node in model.graph.all_nodes():
        for value in node.outputs:
            found = inferred.get(value.name or "")
            if found is None:
                continue
            if value.type is None and found.type is not None:
                value.type = found.type
            if value.shape is None and found.shape is not None:
                value.shape = found.shape


def _fold_batchnorms_again(model: ir.Model, summary: PreprocessSummary, first: list[Decline]) -> None:
    """Fold the BatchNorms the first fold declined and the affine folds have since put after a Conv.

    Paddle2ONNX writes a biased Conv as ``Conv → Add(bias) → Identity → BatchNormalization``: only
    once the bias went into the Conv and the Identity is gone does the BatchNorm read the Conv. The
    first fold's declines (``first``) for the nodes folded now are dropped.
    """
    if not any(node.op_type == "BatchNormalization" for node in model.graph.all_nodes()):
        return
    again = FoldBatchNormPass()
    again(model)
    if not again.folded:
        return
    summary.batchnorms_folded += len(again.folded)
    left = {node_label(node) for node in model.graph.all_nodes() if node.op_type == "BatchNormalization"}
    stale = [d for d in first if d.node not in left]
    summary.declines = [d for d in summary.declines if not any(d is s for s in stale)]


def preprocess(model: ir.Model, *, equalize: bool = False, upcast: bool = True) -> PreprocessSummary:
    """Normalize a float model in place before planning (see module docstring).

    ``equalize`` also runs cross-layer equalization (:mod:`~onnxq.preprocess.equalize`) once the folds
    are done, so it sees the BatchNorm-folded weights and no Identity between the Convs. ``upcast``
    computes a float16/bfloat16 model in float32 (:mod:`~onnxq.preprocess.upcast`), its inputs and
    outputs unchanged.
    """
    start = time.perf_counter()
    summary = PreprocessSummary(nodes_before=sum(1 for _ in model.graph.all_nodes()))
    common.RemoveInitializersFromInputsPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    materialize_initializers(model)  # every pass below reads weights: decode them once
    if upcast:
        half = UpcastHalfPass()
        if half(model).modified:
            summary.upcast = half.upcast
            summary.notes.append(
                f"half-precision model computed in float32 ({half.upcast} values upcast; "
                f"{half.casts} Cast(s) keep the inputs' and outputs' types)"
            )
    common.NameFixPass(_OpTypeNames())(model)
    unique_names(model)
    common.TopologicalSortPass()(model)
    FoldConstantsPass()(model)
    # ONNX Runtime's fused transformer ops (Attention, SkipLayerNormalization) back in standard form,
    # so that their weight products are quantized and their LayerNorms take smoothing's divisors.
    defuse = DefusePass()
    defuse(model)
    # Before the folds: an Identity between a Conv and its BatchNorm or affine Mul/Add (Paddle exports
    # have them) hides the producer from every fold (PP-OCRv5's detector: 81 folds missed).
    RemoveIdentityPass()(model)
    fold_bn = FoldBatchNormPass()
    fold_bn(model)
    summary.batchnorms_folded = len(fold_bn.folded)
    summary.declines.extend(fold_bn.declined)
    canonical = CanonicalizePass(FLOAT_ISLAND_RULES)
    canonical(model)
    decompose = CanonicalizePass(DECOMPOSE_RULES)
    decompose(model)
    fold_affine = FoldAffinePass()
    fold_affine(model)
    summary.affine_folded = sum(fold_affine.folded.values())
    late = CanonicalizePass(LATE_RULES)
    late(model)
    summary.canonicalized = dict(
        collections.Counter(defuse.rewritten)
        + collections.Counter(canonical.rewritten)
        + collections.Counter(decompose.rewritten)
        + collections.Counter(late.rewritten)
    )
    summary.declines.extend(
        [*defuse.declined, *canonical.declined, *decompose.declined, *fold_affine.declined, *late.declined]
    )
    RemoveIdentityPass()(model)
    common.RemoveUnusedNodesPass()(model)
    _fold_batchnorms_again(model, summary, fold_bn.declined)
    if equalize:
        equalizer = EqualizePass()
        equalizer(model)
        summary.equalized = len(equalizer.equalized)
    shared = share_constants(model)
    if shared:
        summary.notes.append(f"{shared / 1e6:.2f} MB of constants that several bodies held stored once")
    if not infer_shapes(model):
        summary.notes.append("shape inference failed; tensors of unknown type are treated as float")
    # After shape inference: a TorchScript export's Shape → Gather → Concat → Reshape arithmetic, where
    # the inferred shapes decide it, becomes constants (then folded on, and the chains removed).
    # Each round's constants let shape inference see further (a Reshape's output shape once its target
    # is known), so it runs again while a round folds something, a few rounds at most.
    known = copied = 0
    for _ in range(SHAPE_FOLD_ROUNDS):
        shapes = FoldShapesPass()
        shapes(model)
        if not (shapes.known or shapes.copied):
            break
        known, copied = known + shapes.known, copied + shapes.copied
        FoldConstantsPass()(model)
        common.RemoveUnusedNodesPass()(model)
        infer_shapes(model)
    if known or copied:
        summary.notes.append(
            f"shape arithmetic: {known} dimension(s) the inferred shapes fix written as constants, "
            f"{copied} Reshape target(s) made constant"
        )
    if any(node.op_type == "BatchNormalization" for node in model.graph.all_nodes()):
        # After shape inference: a constant's alignment with a BatchNorm's channels needs its rank.
        into_batch_norm = BatchNormAffinePass()
        into_batch_norm(model)
        summary.affine_folded += sum(into_batch_norm.rewritten.values())
        summary.declines.extend(into_batch_norm.declined)
    # After shape inference: a ReduceMean is a GlobalAveragePool only over every spatial axis.
    shaped = CanonicalizePass(SHAPED_RULES)
    shaped(model)
    summary.canonicalized.update(shaped.rewritten)
    summary.declines.extend(shaped.declined)
    # After shape inference: the LRN expansion's pool needs the input's rank.
    slow = SlowKernelsPass()
    slow(model)
    summary.canonicalized.update(slow.rewritten)
    summary.declines.extend(slow.declined)
    common.TopologicalSortPass()(model)
    summary.nodes_after = sum(1 for _ in model.graph.all_nodes())
    summary.seconds = time.perf_counter() - start
    return summary
