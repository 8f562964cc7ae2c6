"""How much each quantized anchor node (Conv, ConvTranspose, Gemm, MatMul) costs in accuracy.

Two analyses:

- :func:`estimate_sensitivity`, a *one-pass* estimate: the fully quantized model runs once over the
  feeds with a float shadow of every anchor beside it, and per anchor the error its own quantization
  adds is measured (below).
- :func:`measure_sensitivity`, the exact one-at-a-time analysis: for each anchor, re-quantize with only
  that anchor quantized (``"only"``) and/or with all but that anchor quantized (``"all_but"``), and
  score the variant against the float model under the target's metric. Cost: one re-quantization (a
  rewrite, no calibration) and one full evaluation per node and mode; results are cached as JSON.

The estimate's proxy: *local added noise*
-----------------------------------------
For an anchor ``n`` in the quantized model, let ``ŷ`` be its output and ``y'`` what the float operator
computes from the same upstream values — the values feeding ``n``'s input Q/DQ, and the float weights
and bias. A float *shadow* copy of every anchor is added to a copy of the quantized model, so one run
gives both. Then::

    estimate(n) = 10·log10( Σ(y' − ŷ)² / Σy'² )      [dB, higher = more sensitive]

is the noise that ``n``'s own quantization (its input Q/DQ and its weights) adds, relative to its
output, on the inputs it really sees. Upstream error cancels out by construction, so the proxy does
not depend on how errors propagate (an earlier version subtracted inherited noise-to-signal ratios,
which cancel badly in residual transformers and left most MatMuls unranked). Cost: one ONNX Runtime
pass over the feeds, whatever the number of layers; memory: two float64 sums per anchor.

Why this ranks an outlier-heavy layer first: when a few channels of an activation are far larger than
the rest, one per-tensor scale is set by the outliers and the other channels are rounded away. The
damage is invisible at the quantized tensor itself (its SQNR is dominated by the well-represented
outliers) but shows at the output of the layer that reads it, whose weights give the small channels
their weight back. The node that *reads* a quantized tensor is charged for its quantization, matching
how onnxq plans: a tensor between two MatMuls/Gemms is quantized because its reader is. (A Conv's
output is quantized whenever the Conv is, so in a Conv chain the tensor stays quantized until both its
producer and its reader are kept float.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxq.data import Feeds
from onnxq.errors import OnnxqError
from onnxq.graph import NameScope, const_array, make_initializer, rounded_from
from onnxq.plan.op_rules import ANCHOR_OPS
from onnxq.progress import progress
from onnxq.runtime.session import OptLevel, open_model, run, serialize_lean
from onnxq.tuning.interfaces import RequantizableState
from onnxq.tuning.latency_guard import dynamic_lstms
from onnxq.tuning.targets import AccuracyTarget, CustomTarget, TargetEvaluator, as_target, evaluation_feeds
from onnxq.validate.metrics import OutputStats, is_distribution

__all__ = [
    "Mode",
    "NodeSensitivity",
    "decision_proxy",
    "estimate_sensitivity",
    "measure_sensitivity",
    "rank_by_estimate",
    "score_each_kept_float",
]

logger = logging.getLogger(__name__)

Mode = Literal["only", "all_but", "both"]
_MODES = ("only", "all_but", "both")
_CACHE_VERSION = 1


@dataclass
class NodeSensitivity:
    """One anchor's sensitivity.

    ``estimate`` is the one-pass estimate (added noise in dB, higher = more sensitive, see the module
    docstring). ``only_this_quantized`` is the target's score with only this anchor quantized and
    ``all_but_this_quantized`` with every other anchor quantized (higher = better; ``None`` when that
    mode was not measured).
    """

    node: str
    op_type: str
    estimate: float
    only_this_quantized: float | None = None
    all_but_this_quantized: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# One-pass estimate


@dataclass
class _Energy:
    """Streaming sums of a reference tensor's energy and of its error."""

    signal: float = 0.0
    noise: float = 0.0
    valid: bool = True

    def update(self, ref: np.ndarray, act: np.ndarray) -> None:
        if ref.shape != act.shape:
            self.valid = False
            return
        r = np.asarray(ref, dtype=np.float64).ravel()
        e = r - np.asarray(act, dtype=np.float64).ravel()
        self.signal += float(np.dot(r, r))
        self.noise += float(np.dot(e, e))

    @property
    def ratio(self) -> float:
        """Noise-to-signal power ratio (0 when exact, ``inf`` for noise on a zero signal)."""
        if not self.valid or math.isnan(self.signal) or math.isnan(self.noise):
            return math.nan
        if self.noise == 0.0:
            return 0.0
        if self.signal == 0.0:
            return math.inf
        return self.noise / self.signal


def _unrounded(value: ir.Value) -> ir.Value:
    """The value a DequantizeLinear(QuantizeLinear(v)) chain started from, or ``value`` itself."""
    return rounded_from(value) or value


def _has_anchors(model: ir.Model, anchors: Iterable[str]) -> bool:
    """Whether ``model`` is in QDQ form.

    Every anchor is there under its name, or is gone because it quantizes its input at run time
    (``QuantConfig.run_time_ranges``: the same rewrite in both forms), and at least one is there.
    """
    by_name = {n.name: n.op_type for n in model.graph}
    kinds = [by_name.get(name) for name in anchors]
    return all(kind is None or kind in ANCHOR_OPS for kind in kinds) and any(
        kind in ANCHOR_OPS for kind in kinds
    )


def _add_shadows(
    state: RequantizableState,
    quantized: ir.Model,
    lstms: Sequence[str] | None = None,
    *,
    anchors: bool = True,
) -> list[tuple[str, str, str]]:
    """Add a float twin of every quantized anchor to ``quantized`` (a copy the caller owns).

    The twin reads the values that feed the anchor's input Q/DQ and the float model's weights and bias.
    The LSTMs named in ``lstms`` (default: those static mode runs as DynamicQuantizeLSTM) get one too;
    ``anchors=False`` shadows only those. Returns ``(node, twin output, anchor output)`` name triples.
    """
    graph = quantized.graph
    names = NameScope(graph)
    float_nodes = {n.name: n for n in state.float_model.graph}
    triples = []
    for node in list(graph) if anchors else []:
        f_node = float_nodes.get(node.name)
        if node.name not in state.quantized_nodes or f_node is None or not node.outputs:
            continue
        inputs: list[ir.Value | None] = []
        for index, value in enumerate(node.inputs):
            f_value = f_node.inputs[index] if index < len(f_node.inputs) else None
            constant = const_array(f_value) if f_value is not None else None
            if value is None:
                inputs.append(None)
            elif constant is not None:
                inputs.append(make_initializer(graph, names, f"{node.name}_shadow_input{index}", constant))
            else:
                inputs.append(_unrounded(value))
        twin = _twin(node, inputs, names)
        graph.insert_after(node, [twin])
        triples.append((node.name or "", twin.outputs[0].name or "", node.outputs[0].name or ""))
    present = {n.name for n in graph}
    run_time = [
        float_nodes[name]
        for name in (state.quantized_nodes if anchors else ())
        if name not in present and name in float_nodes
    ]
    triples += [t for f_node in run_time if (t := _shadow_run_time(f_node, graph, names)) is not None]
    wanted = dynamic_lstms(state) if lstms is None else lstms
    lstm_nodes = [float_nodes[name] for name in wanted if name in float_nodes]
    triples += [t for f_node in lstm_nodes if (t := _shadow_lstm(f_node, graph, names)) is not None]
    return triples


def _twin(node: ir.Node, inputs: list[ir.Value | None], names: NameScope, outputs: int = 1) -> ir.Node:
    """A float copy of ``node`` (same op, attributes) on ``inputs``, its outputs given fresh names."""
    attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    twin = ir.Node(
        node.domain,
        node.op_type,
        inputs,
        attributes=attributes,
        num_outputs=outputs,
        name=names.fresh(f"{node.name}_shadow"),
    )
    for out in twin.outputs:
        out.name = names.fresh(f"{node.name}_shadow_output")
    return twin


#: The LSTM inputs that are weights (W, R, B, P): the twin takes the float model's.
_LSTM_WEIGHTS = (1, 2, 3, 7)


def _shadow_lstm(f_node: ir.Node, graph: ir.Graph, names: NameScope) -> tuple[str, str, str] | None:
    """A float twin of an LSTM rewritten as ``com.microsoft.DynamicQuantizeLSTM``.

    The rewrite keeps the LSTM's output names: the twin reads the same input, sequence lengths and
    initial states as the rewritten node (its inputs 0 and 4-6) with the float model's weights, and is
    compared on the first output the model uses. ``None`` when the rewritten node is not found (the LSTM
    is inside a body, or another rewrite took it).
    """
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    used = [i for i, out in enumerate(f_node.outputs) if out.name and out.name in values]
    if not used:
        return None
    compared = values[f_node.outputs[used[0]].name or ""]
    rewritten = compared.producer()
    if rewritten is None or rewritten.op_type != "DynamicQuantizeLSTM":
        return None
    inputs: list[ir.Value | None] = []
    for index in range(min(len(f_node.inputs), 8)):
        value = f_node.inputs[index]
        if index in _LSTM_WEIGHTS and value is not None:  # the float model's W, R, B, P
            constant = const_array(value)
            if constant is None:
                return None
            inputs.append(make_initializer(graph, names, f"{f_node.name}_shadow_input{index}", constant))
        else:  # X, sequence_lens, initial_h, initial_c: what the rewritten node reads
            inputs.append(rewritten.inputs[index] if index < len(rewritten.inputs) else None)
    twin = _twin(f_node, inputs, names, outputs=used[0] + 1)
    graph.insert_after(rewritten, [twin])
    return (f_node.name or "", twin.outputs[used[0]].name or "", compared.name or "")


def _shadow_run_time(f_node: ir.Node, graph: ir.Graph, names: NameScope) -> tuple[str, str, str] | None:
    """A float twin of an anchor rewritten to quantize its input at run time (``DynamicQuantizeMatMul``).

    The rewrite keeps the product's output name, or the name of the bias ``Add`` it folded in: the
    twin is the float product of the same input (with that bias). ``None`` when neither is found.
    """
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    source = f_node.inputs[0]
    data = values.get(source.name) if source is not None else None
    if data is None or f_node.outputs[0].name is None:
        return None
    data = _unrounded(data)
    inputs: list[ir.Value | None] = [data]
    for index, value in enumerate(f_node.inputs[1:], start=1):
        constant = const_array(value) if value is not None else None
        if value is not None and constant is None:
            return None
        inputs.append(
            None
            if constant is None
            else make_initializer(graph, names, f"{f_node.name}_shadow_input{index}", constant)
        )
    twin = _twin(f_node, inputs, names)
    nodes, compared = [twin], values.get(f_node.outputs[0].name)
    if compared is None:  # the bias Add was folded into the rewritten node: it carries the Add's name
        folded = _bias_add(f_node)
        compared = values.get(folded[0].outputs[0].name) if folded is not None else None
        if folded is None or compared is None:
            return None
        bias = make_initializer(graph, names, f"{f_node.name}_shadow_bias", folded[1])
        biased = ir.Node("", "Add", [twin.outputs[0], bias], name=names.fresh(f"{f_node.name}_shadow_add"))
        biased.outputs[0].name = names.fresh(f"{f_node.name}_shadow_biased")
        nodes.append(biased)
    producer = compared.producer()
    if producer is None:
        return None
    graph.insert_after(producer, nodes)
    return (f_node.name or "", nodes[-1].outputs[0].name or "", compared.name or "")


def _bias_add(node: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """The ``Add`` of a constant that is the only reader of ``node``'s output, and that constant."""
    readers = [use.node for use in node.outputs[0].uses()]
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    constants = [c for v in readers[0].inputs if v is not None and (c := const_array(v)) is not None]
    return (readers[0], constants[0]) if len(constants) == 1 else None


def _fetcher(model: ir.Model, names: Iterable[str], providers: Sequence[str], opt_level: OptLevel) -> Any:
    """A function ``feed -> {name: array}`` for the named tensors of ``model`` (one run per feed)."""
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            values.setdefault(out.name, out)
    graph_inputs = {v.name for v in model.graph.inputs}
    wanted = [n for n in dict.fromkeys(names) if n not in graph_inputs]
    unknown = [n for n in wanted if n not in values]
    if unknown:
        raise OnnxqError(f"cannot observe tensor(s) {', '.join(unknown[:3])}: not in the model")
    session = open_model(model, outputs=[values[n] for n in wanted], providers=providers, opt_level=opt_level)

    def fetch(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = dict(zip(wanted, run(session, feed, wanted), strict=True))
        outputs.update({k: v for k, v in feed.items() if k in graph_inputs})
        return outputs

    return fetch


def estimate_sensitivity(
    state: RequantizableState,
    quantized_model: ir.Model | None,
    feeds: Feeds | Iterable[Mapping[str, Any]] | str,
    *,
    providers: Sequence[str] | None = None,
    lstms: Sequence[str] | None = None,
    anchors: bool = True,
) -> dict[str, float]:
    """One-pass estimate of every quantized anchor's added noise, in dB (higher = more sensitive).

    Runs ``state.float_model`` and ``quantized_model`` (the fully quantized model in QDQ form; ``None``,
    or a QOperator model, makes a QDQ one with ``state.requantize()``) once over ``feeds`` and returns
    ``{node name: estimate}`` for the anchors it could observe, in graph order, and for the LSTMs it
    runs as DynamicQuantizeLSTM (``lstms`` names them where ``state`` does not know them yet;
    ``anchors=False`` estimates those only). See the module docstring for the proxy and why it ranks
    an outlier-heavy layer first.
    """
    providers = tuple(providers or state.providers)
    feeds = evaluation_feeds(feeds, state.float_model)
    if quantized_model is None or (anchors and not _has_anchors(quantized_model, state.quantized_nodes)):
        quantized_model = state.requantize(output_format="qdq")
    shadowed = quantized_model.clone()
    triples = _add_shadows(state, shadowed, lstms, anchors=anchors)
    if not triples:
        return {}
    # At "disable": every observed value is what the QDQ graph itself computes (no fusion).
    fetch = _fetcher(shadowed, [n for _, a, b in triples for n in (a, b)], providers, "disable")
    energies = {node: _Energy() for node, _, _ in triples}
    runs = 0
    for feed in feeds:
        values = fetch(feed)
        for node, twin, anchor in triples:
            energies[node].update(values[twin], values[anchor])
        runs += 1
    if runs == 0:
        raise OnnxqError("no evaluation data to estimate sensitivity on")
    estimates: dict[str, float] = {}
    for node, _, _ in triples:
        ratio = energies[node].ratio
        if math.isnan(ratio):
            estimates[node] = math.nan
        elif ratio <= 0.0:
            estimates[node] = -math.inf
        else:
            estimates[node] = 10.0 * math.log10(ratio) if not math.isinf(ratio) else math.inf
    logger.debug("sensitivity estimate over %d feeds: %s", runs, estimates)
    return estimates


def rank_by_estimate(estimates: Mapping[str, float], nodes: Sequence[str]) -> list[str]:
    """``nodes`` by decreasing estimate (unknown or NaN last), ties in the given (graph) order."""
    order = {name: i for i, name in enumerate(nodes)}

    def key(name: str) -> tuple[float, int]:
        value = estimates.get(name, math.nan)
        return (math.inf if math.isnan(value) else -value, order[name])

    return sorted(nodes, key=key)


def score_each_kept_float(
    state: RequantizableState,
    nodes: Sequence[str],
    feeds: Feeds,
    *,
    base: ir.Model | None = None,
    providers: Sequence[str] | None = None,
    opt_level: OptLevel = "all",
) -> tuple[dict[str, float], int]:
    """What keeping each node alone float gains over ``base``, and on how many batches it was measured.

    Gains are in dB of :func:`decision_proxy` over ``base`` (all int8). Where the estimate's local
    proxy ranks badly (an int8 error spread over many layers, whose parts partly cancel at the
    output), this measures what keeping each layer float does to the output: one rewrite and one run
    over ``feeds`` per node, plus one of ``base`` (default: the state's model with every anchor
    quantized); the float model's outputs are kept. Uncached; no gains (and 0 batches) when the float
    outputs on ``feeds`` exceed 256 MiB.
    """
    providers = tuple(providers or state.providers)
    names = [v.name or "" for v in state.reference_model.graph.outputs]
    session = open_model(state.reference_model, providers=providers, opt_level=opt_level)
    reference: list[list[np.ndarray]] = []
    for feed in feeds:
        reference.append(run(session, dict(feed), names))
        if sum(a.nbytes for outputs in reference for a in outputs) > _PROXY_REFERENCE_BYTES:
            return {}, 0

    def proxy(model: ir.Model) -> float:
        candidate = open_model(model, providers=providers, opt_level=opt_level)
        return decision_proxy(reference, [run(candidate, dict(feed), names) for feed in feeds])

    start = proxy(base if base is not None else state.requantize(keep_float=[]))
    gains = {
        name: proxy(state.requantize(keep_float=[name])) - start
        for name in progress(nodes, total=len(nodes), desc="rank layers")
    }
    return gains, len(reference)


_PROXY_REFERENCE_BYTES = 256 << 20


def decision_proxy(
    reference: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]]
) -> float:
    """How close a candidate's outputs are to float (dB, higher is closer), smoothly.

    A top-1 agreement moves in steps; this does not. ``reference`` / ``actual``: per feed, the
    outputs. Where some output holds probability distributions (a Softmax over classes or
    characters), ``-10·log10`` of the mean KL divergence of the candidate's distributions from
    float's, summed over those outputs: it weighs the classes by their probability, so it moves with
    the near-ties a decision flips on, where the SQNR of probabilities is set by the few confident
    rows. Otherwise (logits, scores) the lowest output SQNR.
    """
    count = len(reference[0]) if reference else 0
    distributions = [i for i in range(count) if all(is_distribution(outputs[i]) for outputs in reference)]
    if distributions:
        total = 0.0
        for i in distributions:
            divergences = [
                _kl_rows(np.asarray(ref[i], np.float64), np.asarray(act[i], np.float64))
                for ref, act in zip(reference, actual, strict=True)
            ]
            rows = np.concatenate(divergences)
            total += float(rows.mean()) if rows.size else 0.0
        return -10.0 * math.log10(total) if total > 0.0 else math.inf
    stats = [OutputStats(str(i)) for i in range(count)]
    for ref_outputs, act_outputs in zip(reference, actual, strict=True):
        for stat, ref, act in zip(stats, ref_outputs, act_outputs, strict=True):
            stat.update(ref, act)
    return min((s.sqnr_db for s in stats if not s.exact), default=math.nan)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) of each distribution on the last axis (q floored at 1e-12: a Softmax may underflow)."""
    if p.shape != q.shape:
        return np.array([math.inf])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0.0, p * (np.log(p) - np.log(np.maximum(q, 1e-12))), 0.0)
    rows: np.ndarray = terms.sum(axis=-1).reshape(-1)
    return rows


# ---------------------------------------------------------------------------------------------------
# Exact one-at-a-time analysis, cached


def _hash_update_array(digest: Any, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    if array.dtype.hasobject:
        digest.update(repr(array.tolist()).encode())
    else:
        digest.update(array.reshape(-1).view(np.uint8).data)


def _cache_key(
    state: RequantizableState,
    target: AccuracyTarget | CustomTarget,
    feeds: Feeds,
    providers: Sequence[str],
    opt_level: str,
) -> str:
    """A hash of everything the scores depend on (the minimum of the target excepted)."""
    digest = hashlib.sha256()
    digest.update(f"onnxq-sensitivity-v{_CACHE_VERSION}|".encode())
    data, arrays = serialize_lean(state.float_model)
    digest.update(hashlib.sha256(data).digest())
    for name in sorted(arrays):
        _hash_update_array(digest, name, arrays[name])
    digest.update(repr(state.config).encode())
    digest.update(repr(sorted(state.ranges.items())).encode())
    digest.update(repr(state.quantized_nodes).encode())
    metric = target.cache_key if isinstance(target, CustomTarget) else f"metric:{target.metric}"
    digest.update(f"|{metric}|{tuple(providers)}|{opt_level}|".encode())
    if isinstance(target, AccuracyTarget):  # a custom function brings its own data
        for index, feed in enumerate(feeds):
            digest.update(f"feed {index}|".encode())
            for name in sorted(feed):
                _hash_update_array(digest, name, feed[name])
    return digest.hexdigest()


def _load_cache(path: Path) -> dict[str, dict[str, float]]:
    empty: dict[str, dict[str, float]] = {"estimate": {}, "only": {}, "all_but": {}}
    if not path.is_file():
        return empty
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable sensitivity cache %s: %s", path, exc)
        return empty
    if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
        return empty
    for section in empty:
        entries = content.get(section)
        if isinstance(entries, dict):
            empty[section] = {str(k): float(v) for k, v in entries.items()}
    return empty


def _save_cache(path: Path, entries: Mapping[str, Mapping[str, float]], description: str) -> None:
    content = {"version": _CACHE_VERSION, "target": description, **{k: dict(v) for k, v in entries.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as handle:
            json.dump(content, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write sensitivity cache %s: %s", path, exc)


def _rank(results: list[NodeSensitivity], mode: Mode) -> list[NodeSensitivity]:
    order = {r.node: i for i, r in enumerate(results)}

    def desc(value: float | None) -> float:
        return math.inf if value is None or math.isnan(value) else -value

    def asc(value: float | None) -> float:
        return math.inf if value is None or math.isnan(value) else value

    def key(r: NodeSensitivity) -> tuple[float, float, float, int]:
        if mode == "only":
            return (asc(r.only_this_quantized), 0.0, desc(r.estimate), order[r.node])
        # "all_but" and "both": what keeping the node float recovers decides; "both" breaks ties by the
        # damage the node does alone.
        return (desc(r.all_but_this_quantized), asc(r.only_this_quantized), desc(r.estimate), order[r.node])

    return sorted(results, key=key)


def measure_sensitivity(
    state: RequantizableState,
    target_metric: AccuracyTarget | CustomTarget | str,
    feeds: Feeds | Iterable[Mapping[str, Any]] | str,
    *,
    nodes: Sequence[str] | None = None,
    mode: Mode = "all_but",
    cache_dir: str | os.PathLike[str] | None = None,
    providers: Sequence[str] | None = None,
    opt_level: OptLevel = "all",
) -> list[NodeSensitivity]:
    """Exact one-at-a-time sensitivity of the quantized anchors, most sensitive first.

    For each node of ``nodes`` (default: every quantized anchor, ``state.quantized_nodes``):

    - ``"only"``: the score with only this anchor quantized
      (``state.requantize(keep_float=<every other anchor>)``); lower = more sensitive;
    - ``"all_but"``: the score with every anchor but this one quantized
      (``state.requantize(keep_float=[node])``); higher = more sensitive (keeping it float helps most);
    - ``"both"``: both, ranked by ``all_but``, ties broken by ``only``.

    Scores are of ``target_metric`` (an :class:`AccuracyTarget`, a :class:`CustomTarget`, a
    ``"sqnr>=30"`` string or a bare metric name; the minimum plays no part) against the float model on
    ``feeds``, at ``opt_level``. Each result also carries the one-pass estimate.

    With ``cache_dir``, scores are kept in ``sensitivity-<hash>.json`` there, the hash covering the
    float model's bytes, the configuration, the calibrated ranges, the feeds' content, the metric, the
    providers and the optimisation level; each node and mode is stored separately, so a re-run — or a
    run over a subset of nodes, or the other mode — only evaluates what is missing.
    """
    if mode not in _MODES:
        raise OnnxqError(f"sensitivity mode must be one of {', '.join(_MODES)}, got {mode!r}")
    target = as_target(target_metric)
    providers = tuple(providers or state.providers)
    feeds = evaluation_feeds(feeds, state.float_model)
    anchors = list(state.quantized_nodes)
    selected = list(dict.fromkeys(nodes)) if nodes is not None else anchors
    unknown = [n for n in selected if n not in anchors]
    if unknown:
        raise OnnxqError(
            f"not a quantized anchor node: {', '.join(repr(n) for n in unknown[:5])} "
            f"(quantized anchors: {', '.join(anchors[:10])}{', ...' if len(anchors) > 10 else ''})"
        )
    modes = ("only", "all_but") if mode == "both" else (mode,)

    cache_path: Path | None = None
    entries: dict[str, dict[str, float]] = {"estimate": {}, "only": {}, "all_but": {}}
    if cache_dir is not None:
        key = _cache_key(state, target, feeds, providers, opt_level)
        cache_path = Path(cache_dir) / f"sensitivity-{key[:32]}.json"
        entries = _load_cache(cache_path)

    def save() -> None:
        if cache_path is not None:
            _save_cache(cache_path, entries, str(target))

    if any(n not in entries["estimate"] for n in anchors):
        estimates = estimate_sensitivity(state, None, feeds, providers=providers)
        entries["estimate"] = {n: estimates.get(n, math.nan) for n in anchors}
        save()

    evaluator = TargetEvaluator(
        state.reference_model, feeds, target, providers=providers, opt_level=opt_level
    )
    for name in selected:
        for which in modes:
            if name in entries[which]:
                continue
            keep = [a for a in anchors if a != name] if which == "only" else [name]
            entries[which][name] = evaluator.score(state.requantize(keep_float=keep))
            save()
    if evaluator.evaluations:
        logger.info(
            "sensitivity: %d evaluations in %.2f s (%s)", evaluator.evaluations, evaluator.seconds, target
        )

    op_types = {n.name: n.op_type for n in state.float_model.graph}
    results = [
        NodeSensitivity(
            node=name,
            op_type=op_types.get(name, "?"),
            estimate=entries["estimate"].get(name, math.nan),
            only_this_quantized=entries["only"].get(name) if "only" in modes else None,
            all_but_this_quantized=entries["all_but"].get(name) if "all_but" in modes else None,
        )
        for name in selected
    ]
    return _rank(results, mode)
