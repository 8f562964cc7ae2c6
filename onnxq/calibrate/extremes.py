"""Min-max calibration without copying activations out: each tensor's extremes computed inside the run.

Why: exposing every observed tensor as a graph output keeps all of them alive at the end of the run
(ONNX Runtime cannot reuse their memory) and copies each one into numpy. On a YOLO11s-seg at 640 × 640
that is 550 MB of activations per sample, and calibration's peak memory was that of the model plus
twice that. Min-max and moving-average min-max need only each sample's extremes, so the session gets,
per tensor, ``Flatten(axis=1)`` then ``ReduceMin``, ``ReduceMax`` and ``ReduceSum`` over axis 1: three
``[d0]`` vectors come back, and the activations are freed as in plain inference. The sum is there for
NaN: ONNX Runtime's vectorized minimum and maximum may skip a NaN and return the extreme of some of the
other elements only, while a sum with a NaN in it is NaN.

Per row (axis 0) rather than over the whole tensor: a batch of several samples lies along axis 0, and
the moving average steps once per sample. ``np.stack([minima, maxima], -1)`` is what the observers get:
its per-row and overall extremes are those of the tensor itself.

The observers' other duties need the values themselves: ignoring infinities (``Log(0)``), telling a
``-1e9`` attention mask from data (:data:`~onnxq.calibrate.observers.EXTREME_RANGE`), skipping empty
tensors. A tensor whose extremes are not :func:`plain` is therefore widened: exposed whole from then
on, and the sample run again. Main-graph tensors of float32 or unknown element type are reduced (one of
unknown rank, which may be a scalar, over all its elements); body tensors and other types come back
whole from the start.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.calibrate.observers import EXTREME_RANGE
from onnxq.graph import NameScope, default_opset, home_graph, insert_after_producer, prepend
from onnxq.runtime.session import SessionError, open_model, run

__all__ = [
    "ObservedRunner",
    "add_extremes",
    "element_counts",
    "plain",
    "reducible",
    "remove_nodes",
    "stacked",
]

#: The opset from which each reduction takes its axes as an input (an attribute before).
AXES_AS_INPUT = {"ReduceMin": 18, "ReduceMax": 18, "ReduceSum": 13, "ReduceMean": 18}


def reducible(value: ir.Value, main: ir.Graph) -> bool:
    """Whether ``value`` can be observed through its extremes: in ``main``, float32 or of unknown type.

    A tensor planned as float whose type shape inference could not tell may hold integers at run time:
    its reductions are then integers too, which the caller reports as it reports the tensor itself.
    """
    if value.dtype not in (ir.DataType.FLOAT, None):
        return False
    return home_graph(value) is main


def _rank_known(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) >= 1


def add_extremes(
    model: ir.Model, values: Iterable[ir.Value], *, per_row: bool = True
) -> tuple[list[ir.Node], dict[str, tuple[ir.Value, ir.Value, ir.Value]]]:
    """Insert into ``model``'s main graph the nodes computing each value's per-row extremes and sums.

    Each value's nodes go right after its producer (a graph input's at the start of the graph).

    A value of unknown rank (it may be a scalar, which ``Flatten(axis=1)`` refuses) is reduced over all
    its elements instead, unless ``per_row`` is required (the moving average over batches of several
    samples): then it must not be passed. Returns the nodes added (for :func:`remove_nodes` once the
    session is open) and, per value name, the ``(minima, maxima, sums)`` values to fetch.
    """
    graph = model.graph
    names = NameScope(graph)
    opset = default_opset(model)
    constant = ir.Node(
        "",
        "Constant",
        [],
        [ir.AttrTensor("value", ir.tensor(np.array([1], np.int64)))],
        name=names.fresh("calibration_axes"),
    )
    axes = constant.outputs[0]
    axes.name = names.fresh("calibration_axes")
    axes.type = ir.TensorType(ir.DataType.INT64)
    added: list[ir.Node] = [constant]
    fetch: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for value in values:
        base = value.name or "value"
        nodes: list[ir.Node] = []
        source = value
        if _rank_known(value):
            flat = ir.Node(
                "", "Flatten", [value], [ir.AttrInt64("axis", 1)], name=names.fresh(f"{base}_rows")
            )
            flat.outputs[0].name = names.fresh(f"{base}_rows")
            flat.outputs[0].type = value.type
            nodes.append(flat)
            source = flat.outputs[0]
        else:
            assert not per_row, f"{base}: rank unknown, its rows cannot be reduced"
        reductions = []
        for op_type in ("ReduceMin", "ReduceMax", "ReduceSum"):
            inputs, attributes = [source], [ir.AttrInt64("keepdims", 0)]
            if source is not value:  # over axis 1 of the flattened rows (else over every axis)
                if opset >= AXES_AS_INPUT[op_type]:
                    inputs.append(axes)
                else:
                    attributes.append(ir.AttrInt64s("axes", [1]))
            node = ir.Node("", op_type, inputs, attributes, name=names.fresh(f"{base}_{op_type.lower()}"))
            node.outputs[0].name = names.fresh(f"{base}_row_{op_type[6:].lower()}")
            node.outputs[0].type = value.type  # unknown stays unknown: ONNX Runtime infers it
            nodes.append(node)
            reductions.append(node.outputs[0])
        fetch[value.name or ""] = (reductions[0], reductions[1], reductions[2])
        added.extend(nodes)
        # Right after the producer: ONNX Runtime runs nodes in graph order, and a reduction at the end
        # would keep every observed tensor alive to the end of the run.
        insert_after_producer(graph, value, nodes)
    prepend(graph, [constant])  # last, so that it comes before a graph input's reductions
    return added, fetch


def element_counts(
    model: ir.Model, values: Sequence[ir.Value], feed: Mapping[str, np.ndarray], providers: Sequence[str]
) -> dict[str, int]:
    """How many elements each main-graph value holds on ``feed``: one run that fetches a ``Size`` each.

    What a calibration run that fetches those values whole would hold at its end (the histogram
    methods' runs). Each ``Size`` runs right after its value's producer, so this run takes the memory
    of plain inference.
    """
    graph = model.graph
    names = NameScope(graph)
    added: list[ir.Node] = []
    sizes: dict[str, ir.Value] = {}
    for value in values:
        base = value.name or "value"
        node = ir.Node("", "Size", [value], name=names.fresh(f"{base}_size"))
        node.outputs[0].name = names.fresh(f"{base}_size")
        node.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        insert_after_producer(graph, value, [node])
        added.append(node)
        sizes[value.name or ""] = node.outputs[0]
    try:
        session = open_model(model, outputs=list(sizes.values()), providers=providers, prepack=False)
    finally:
        remove_nodes(model, added)
    counts = run(session, feed, [v.name or "" for v in sizes.values()])
    return {name: int(np.asarray(count)) for name, count in zip(sizes, counts, strict=True)}


def remove_nodes(model: ir.Model, nodes: Sequence[ir.Node]) -> None:
    """Take the nodes :func:`add_extremes` added out of the graph again (the model is as it was)."""
    model.graph.remove(list(nodes), safe=True)


def plain(minima: np.ndarray, maxima: np.ndarray, sums: np.ndarray) -> bool:
    """Whether a tensor's per-row extremes stand for its values: all finite, below the sentinel range.

    Not so for an infinity or a NaN (which makes its row's sum NaN), a ``-1e9`` mask, or an empty row
    (ONNX Runtime's minimum of no element is ``inf``); such a tensor must be observed whole.
    """
    both = np.concatenate([np.ravel(minima), np.ravel(maxima)])
    if both.size == 0:
        return True
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(both) < EXTREME_RANGE) and np.all(np.isfinite(sums)))


def stacked(outputs: Mapping[str, np.ndarray], fetch: tuple[str, ...]) -> np.ndarray:
    """The ``[d0, 2]`` array of a tensor's per-row minima and maxima, what its observer is given."""
    return np.stack([np.ravel(outputs[fetch[0]]), np.ravel(outputs[fetch[1]])], axis=-1)


class ObservedRunner:
    """Runs the calibration model and returns, per observed tensor, the array its observer is given.

    The tensors named in ``reduce`` that :func:`reducible` allows come back as their per-row extremes
    (:func:`stacked`; over the whole tensor where its rank is unknown, unless ``per_row``); every
    other one whole. A tensor whose extremes are not :func:`plain` is widened
    (exposed whole from then on) and the feed run again; if the session with the reductions cannot be
    opened or run, every tensor is exposed whole and the feed run again, so the reductions never make
    calibration fail where it ran before.
    """

    def __init__(
        self,
        model: ir.Model,
        values: Sequence[ir.Value],
        *,
        reduce: Collection[str],
        per_row: bool,
        providers: Sequence[str],
    ) -> None:
        self.model = model
        self.values = list(values)
        self.providers = list(providers)
        self.per_row = per_row
        self.rows = {
            v.name or ""
            for v in self.values
            if (v.name or "") in reduce and reducible(v, model.graph) and (_rank_known(v) or not per_row)
        }
        self._open()

    def _open(self) -> None:
        reduced = [v for v in self.values if (v.name or "") in self.rows]
        whole = [v for v in self.values if (v.name or "") not in self.rows]
        added, pairs = add_extremes(self.model, reduced, per_row=self.per_row) if reduced else ([], {})
        extra = [value for fetch in pairs.values() for value in fetch]
        try:
            # Every optimisation (NCHWc convolutions are ~1.5x faster than the basic level's): fusions
            # never swallow a graph output. No prepacking: a one-off session needs no repacked weights.
            # Priority order: each reduction runs as soon as its tensor exists, which is then freed.
            session = open_model(
                self.model,
                outputs=[*whole, *extra],
                providers=self.providers,
                opt_level="all",
                prepack=False,
                priority_order=True,
            )
        except SessionError:
            if not reduced:
                raise
            session = None
        finally:
            if added:
                remove_nodes(self.model, added)
        if session is None:  # the reductions may be what ONNX Runtime refused: every tensor whole
            self.rows.clear()
            self._open()
            return
        self.session = session
        self.pairs = {name: tuple(v.name or "" for v in fetch) for name, fetch in pairs.items()}
        self.fetched = list(dict.fromkeys([*(v.name or "" for v in whole), *(v.name or "" for v in extra)]))

    def arrays(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each observed tensor's array for one feed (``[d0, 2]`` extremes, or the tensor itself)."""
        while True:
            try:
                fetched = run(self.session, feed, self.fetched) if self.fetched else []  # [] would mean all
                outputs = dict(zip(self.fetched, fetched, strict=True))
            except SessionError:
                if not self.pairs:
                    raise
                self.rows.clear()  # the reductions may be what failed: observe every tensor whole
                self._open()
                continue
            widen = [
                name for name, fetch in self.pairs.items() if not plain(*(outputs[out] for out in fetch))
            ]
            if not widen:
                return {
                    name: stacked(outputs, self.pairs[name]) if name in self.pairs else outputs[name]
                    for name in (v.name or "" for v in self.values)
                }
            self.rows.difference_update(widen)
            self._open()
