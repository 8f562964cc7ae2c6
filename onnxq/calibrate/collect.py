"""Running the float model on calibration data and streaming the tensors that need ranges into observers.

The tensors to observe are made extra graph outputs of the serialized model (nothing is written to
disk; :mod:`onnxq.calibrate.subgraphs` lifts those inside If/Loop/Scan bodies out first). Each ONNX
Runtime run's outputs go straight into the observers and are dropped, so memory is bounded by the
observers' fixed-size state, not by the number of samples — unlike ``onnxruntime.quantization``, which
keeps every activation of every sample. For the min-max methods the run itself reduces each main-graph
tensor to its per-row extremes (:mod:`onnxq.calibrate.extremes`), so a run takes the memory of plain
inference, not that of every activation at once. The histogram methods need the values: a run fetches
at most :data:`HISTOGRAM_RUN_BYTES` of them, the tensors in groups with one pass over the data each
where a batch holds more, and each run's arrays are dropped before the next run starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.calibrate.extremes import ObservedRunner, element_counts
from onnxq.calibrate.observers import AutoObserver, Observer, make_observer
from onnxq.calibrate.subgraphs import Exposed, expose_values, merge_exposed
from onnxq.config import ActivationScheme, CalibrationConfig
from onnxq.data import FeedFingerprint, Feeds
from onnxq.errors import OnnxqError
from onnxq.graph import home_graph
from onnxq.progress import progress
from onnxq.runtime.output_budget import groups_within
from onnxq.runtime.session import SessionError

__all__ = ["CalibrationResult", "collect_ranges"]

logger = logging.getLogger(__name__)

#: Methods whose observers need only each sample's extremes (see :mod:`onnxq.calibrate.extremes`).
EXTREMES_METHODS = ("minmax", "moving_average")

#: The histogram methods get each observed tensor whole, and a run holds all it fetches until it ends:
#: the tensors are fetched in groups of at most this many bytes per batch, one pass over the data per
#: group. (YOLO11s-seg at 640 x 640 holds 1.2 GB of them per sample, which put the range rescue's
#: histogram pass above ONNX Runtime's own calibrator in peak memory; a 4K segmentation model would
#: not fit at all.) Below it, one pass as before.
HISTOGRAM_RUN_BYTES = 512 << 20


def _static_elements(value: ir.Value) -> int | None:
    """The element count of ``value``'s inferred shape when every dimension is a number, else ``None``."""
    shape = value.shape
    dims = [d for d in shape if isinstance(d, int)] if shape is not None else []
    if shape is None or len(dims) != len(shape):
        return None
    count: int = math.prod(dims)
    return count


def _groups_within(
    model: ir.Model, values: Sequence[ir.Value], feeds: Feeds, providers: Sequence[str]
) -> list[list[ir.Value]]:
    """``values`` in consecutive groups whose float32 arrays fit :data:`HISTOGRAM_RUN_BYTES` per batch.

    Sized by the inferred shapes where every dimension is known, else on the first batch (one run
    fetching a ``Size`` per tensor). A tensor larger than the budget is a group of its own; with one
    tensor, or all of them within the budget, there is one group.
    """
    if len(values) < 2:
        return [list(values)]
    static = [_static_elements(v) for v in values]
    if all(count is not None for count in static):
        sizes = [4 * (count or 0) for count in static]
    else:  # some dimension is symbolic: measured on the first batch
        first = next(iter(feeds), None)
        if first is None:
            return [list(values)]
        try:
            counts = element_counts(model, values, first, providers)
        except SessionError:  # the run that follows reports what is wrong with the data or the model
            return [list(values)]
        sizes = [4 * counts.get(v.name or "", 0) for v in values]
    groups = groups_within(values, sizes, HISTOGRAM_RUN_BYTES)
    if len(groups) > 1:
        logger.info("histogram calibration: %d tensors observed in %d groups", len(values), len(groups))
    return groups


@dataclass(frozen=True)
class CalibrationResult:
    """Calibrated range per observed tensor, and what it took to get them."""

    ranges: dict[ir.Value, tuple[float, float]]
    method: str
    samples: int
    runs: int
    seconds: float
    unobserved: tuple[str, ...]
    #: Tensors planned as float that turned out to hold another type at run time.
    non_float: tuple[str, ...] = ()
    #: :class:`~onnxq.data.FeedFingerprint` of the calibration data (``""`` when nothing was run).
    fingerprint: str = ""
    #: Tensors that held an infinity, or a sentinel such as a -1e9 mask (no range given; see
    #: :attr:`~onnxq.calibrate.observers.Observer.sentinel`).
    non_finite: tuple[str, ...] = ()
    #: Method ``auto``: each candidate method's ranges from all the data, and from the even-numbered
    #: batches only (``fit``), to be scored on the odd-numbered ones (:mod:`onnxq.pipeline.range_choice`).
    candidates: dict[str, dict[ir.Value, tuple[float, float]]] = field(default_factory=dict)
    fit_candidates: dict[str, dict[ir.Value, tuple[float, float]]] = field(default_factory=dict)


def _batch_size(feed: Mapping[str, np.ndarray], per_batch: int) -> int:
    if per_batch <= 1:
        return 1
    for array in feed.values():
        if array.ndim:
            return int(array.shape[0])
    return 1


def _lifted_runner(
    copy: ir.Model, exposed: Mapping[str, Exposed], *, reduce: bool, per_row: bool, providers: Sequence[str]
) -> ObservedRunner:
    """The runner over a copy whose body tensors were lifted to main-graph outputs.

    The main graph's own tensors (exposed as themselves) may come back as extremes; the lifted ones
    come back whole (an If branch's tensor may be empty, a Loop's already holds per-iteration extremes).
    """
    graph = copy.graph
    found = {v.name: v for v in graph.inputs}
    found.update({out.name: out for node in graph for out in node.outputs})
    outputs = list(dict.fromkeys(out for how in exposed.values() for out in how.outputs))
    own = {name for name, how in exposed.items() if how.outputs == (name,) and not how.reduced}
    return ObservedRunner(
        copy,
        [found[out] for out in outputs],
        reduce=own if reduce else set(),
        per_row=per_row,
        providers=providers,
    )


def collect_ranges(
    model: ir.Model,
    values: Sequence[ir.Value],
    schemes: Mapping[ir.Value, ActivationScheme],
    feeds: Feeds,
    config: CalibrationConfig,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    show_progress: bool | None = None,
) -> CalibrationResult:
    """Observe ``values`` over every feed and return their calibrated ranges.

    ``schemes`` gives each value's activation scheme (histogram methods search the range for the
    integer grid the tensor will be stored on).
    """
    start = time.perf_counter()
    values = list(dict.fromkeys(values))
    names = [value.name or "" for value in values]
    if not names:  # nothing needs a range (e.g. only constant tables are quantized)
        return CalibrationResult(
            {}, config.method, feeds.num_samples or 0, 0, time.perf_counter() - start, ()
        )
    # Min-max methods need each sample's extremes only: computed inside the run (calibrate.extremes),
    # for the main graph's tensors. The moving average steps once per sample: batches of several
    # need each row's extremes.
    reduce = config.method in EXTREMES_METHODS
    per_row = config.method == "moving_average" and feeds.samples_per_batch > 1
    exposed: dict[str, Exposed]
    if all(home_graph(v) is model.graph for v in values):
        exposed = {name: Exposed((name,), reduced=False) for name in names}
        # Tensors fetched whole (the histogram methods) are observed in groups whose arrays fit
        # HISTOGRAM_RUN_BYTES, one pass over the data per group.
        groups = [values] if reduce else _groups_within(model, values, feeds, providers)

        def runner_for(group: Sequence[ir.Value]) -> ObservedRunner:
            return ObservedRunner(
                model, group, reduce=set(names) if reduce else set(), per_row=per_row, providers=providers
            )

    else:  # tensors inside If/Loop/Scan bodies: lifted to main-graph outputs on a copy
        groups = [values]
        try:
            copy, exposed = expose_values(model, names)
            lifted = _lifted_runner(copy, exposed, reduce=reduce, per_row=per_row, providers=providers)
        except SessionError:  # an untyped If-branch tensor was not float: lift the typed ones only
            copy, exposed = expose_values(model, names, assume_float=False)
            lifted = _lifted_runner(copy, exposed, reduce=reduce, per_row=per_row, providers=providers)

        def runner_for(group: Sequence[ir.Value]) -> ObservedRunner:
            return lifted

    observers: dict[str, Observer] = {}
    halves: dict[str, AutoObserver] = {}  # method auto: the odd-numbered batches' observations
    minmax = CalibrationConfig(method="minmax")
    for value, name in zip(values, names, strict=True):
        scheme = schemes[value]
        # Loop/Scan body tensors arrive as per-iteration minima and maxima: a min-max range.
        method = minmax if exposed[name].reduced else config
        observers[name] = make_observer(method, dtype=scheme.dtype, symmetric=scheme.symmetric)
        if isinstance(observers[name], AutoObserver):
            odd = make_observer(method, dtype=scheme.dtype, symmetric=scheme.symmetric)
            assert isinstance(odd, AutoObserver)
            halves[name] = odd
    samples = runs = 0
    non_float: dict[str, None] = {}
    fingerprint = FeedFingerprint()
    total = feeds.num_batches * len(groups) if feeds.num_batches is not None else None
    batches = progress(
        ((g, b) for g in range(len(groups)) for b in enumerate(feeds)),
        total=total,
        desc="calibrate",
        enabled=show_progress,
    )
    runner: ObservedRunner | None = None
    current = -1
    for index, (batch_index, feed) in batches:
        if index != current:  # the next group: its own session (the previous one is dropped first)
            runner = None
            runner = runner_for(groups[index])
            current = index
        assert runner is not None
        group_names = [v.name or "" for v in groups[index]]
        outputs = runner.arrays(feed)
        arrays = {
            name: merge_exposed([outputs[out] for out in exposed[name].outputs], exposed[name].reduced)
            for name in group_names
        }
        n = _batch_size(feed, feeds.samples_per_batch)
        for name in group_names:
            array = arrays[name]
            if array.dtype != np.float32:
                non_float[name] = None
            elif array.size:
                observer = halves[name] if batch_index % 2 and name in halves else observers[name]
                observer.update(array, num_samples=n)
        if index == 0:  # every group sees the same batches: counted once
            fingerprint.update(feed)
            samples += n
            runs += 1
        # Dropped before the next run, not when the next run's arrays replace them: held over, they
        # doubled what the histogram methods hold (PP-OCRv4 det: +0.5 GB).
        outputs = arrays = {}
    runner = None
    if runs == 0:
        raise OnnxqError("calibration data holds no samples")
    fit_candidates: dict[str, dict[ir.Value, tuple[float, float]]] = {}
    candidates: dict[str, dict[ir.Value, tuple[float, float]]] = {}
    for value in values:
        name = value.name or ""
        even = observers[name]
        if name not in halves or not isinstance(even, AutoObserver):
            continue
        odd = halves[name]
        if not even.empty and not odd.empty and not (even.infinite or even.sentinel):
            for kind, found in even.candidate_ranges().items():
                fit_candidates.setdefault(kind, {})[value] = found
        even.merge(odd)
        if not even.empty and not (even.infinite or even.sentinel):
            for kind, found in even.candidate_ranges().items():
                candidates.setdefault(kind, {})[value] = found
    ranges: dict[ir.Value, tuple[float, float]] = {}
    unobserved: list[str] = []
    non_finite: list[str] = []
    for value in values:
        observer = observers[value.name or ""]
        if observer.empty:
            (non_finite if observer.infinite else unobserved).append(value.name or "")
            continue
        lo, hi = observer.compute_range()
        if observer.infinite or observer.sentinel:
            non_finite.append(value.name or "")
            continue
        ranges[value] = (lo, hi)
    if unobserved:
        logger.info("%d tensors never held a finite value during calibration", len(unobserved))
    return CalibrationResult(
        ranges=ranges,
        method=config.method,
        samples=samples,
        runs=runs,
        seconds=time.perf_counter() - start,
        unobserved=tuple(unobserved),
        non_float=tuple(non_float),
        fingerprint=fingerprint.hexdigest(),
        non_finite=tuple(non_finite),
        candidates=candidates,
        fit_candidates=fit_candidates,
    )
