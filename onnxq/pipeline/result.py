"""The result of quantization: the model, its report, and what can be done with it next.

:class:`QuantizationResult` saves the model (only once it has run in ONNX Runtime), validates it
against the float model, searches an accuracy budget (through :mod:`onnxq.tuning`, which sees it only
through the typed interface it declares) and runs the per-layer numeric suite.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq.config import ValidationConfig
from onnxq.data import DataSource, Feeds, input_specs, load_feeds
from onnxq.errors import OnnxqError
from onnxq.load.files import file_size, load_model, save_model, serialized_size
from onnxq.pipeline.state import StaticState
from onnxq.pipeline.static import with_run_time_note
from onnxq.provenance import stamp_provenance
from onnxq.report import LARGE_LOSS_COSINE, LARGE_LOSS_SQNR_DB, AccuracyRow, LatencyRow, QuantReport
from onnxq.runtime.kernels import onnxruntime_version
from onnxq.runtime.session import runtime_source

__all__ = ["QuantizationResult"]

logger = logging.getLogger(__name__)


class QuantizationResult:
    """The quantized model, its report, and the means to save and validate it."""

    def __init__(
        self,
        model: ir.Model,
        report: QuantReport,
        *,
        float_source: bytes | Path,
        calibration: Feeds | None,
        input_path: Path | None,
        static: StaticState | None = None,
    ) -> None:
        self.model = model
        self.report = report
        #: Set for static quantization of a float model: re-quantize variants without recalibrating.
        self.static = static
        self._float_source = float_source
        self._calibration = calibration
        self._input_path = input_path
        self._saved: Path | None = None
        #: Whether ``model`` (as it is now) has run in ONNX Runtime at ORT_ENABLE_ALL.
        self._ran = False

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the quantized model atomically; never overwrites the input model.

        A model is written only once it has run in ONNX Runtime at ``ORT_ENABLE_ALL``: by
        :meth:`validate`, or else by a smoke run on one feed here (:meth:`check_runs`). The file records
        its provenance in ``metadata_props`` (onnxq version, settings, calibration data fingerprint,
        the ONNX Runtime it was validated with), deterministically.
        """
        start = time.perf_counter()
        if not self._ran:
            self.check_runs()
        stamp_provenance(self.model, self.report)
        self._saved = save_model(self.model, path, input_path=self._input_path)
        self.report.output = str(self._saved)
        self.report.size_quantized_bytes = file_size(self._saved)
        self.report.timings_s["save"] = time.perf_counter() - start
        return self._saved

    def validate(
        self,
        data: DataSource | None = None,
        config: ValidationConfig | None = None,
        *,
        show_progress: bool | None = None,
    ) -> QuantReport:
        """Compare float and quantized models in ONNX Runtime and time both; fills ``report``.

        Accuracy is measured at ``ORT_ENABLE_ALL`` (what a deployment computes, with ONNX Runtime's QDQ
        fusions); latency at ``ORT_ENABLE_ALL`` with interleaved runs. ``data`` defaults to the
        calibration data, and to random inputs (with a warning) when there was none.
        """
        from onnxq.runtime.session import resolve_providers

        config = config or ValidationConfig()
        start = time.perf_counter()
        providers = resolve_providers(config.provider)
        feeds = self._eval_feeds(data)
        with contextlib.ExitStack() as stack:
            quantized: bytes | Path = (
                self._saved if self._saved is not None else stack.enter_context(runtime_source(self.model))
            )
            self._compare(quantized, feeds, providers)
            self._ran = True
            self._time(quantized, feeds, providers, config)
        self.report.validated_with = f"onnxruntime {onnxruntime_version()} {providers[0]}"
        self.report.timings_s["validate"] = time.perf_counter() - start
        # (by more than the timings' noise: a 0.99x "slower" is no finding, and says so nowhere else)
        slower = [row for row in self.report.latency if row.threads in self.report.slower_threads]
        for lossy in self.report.large_loss:
            logger.warning(
                "large accuracy loss on output %r: SQNR %.1f dB, cosine %.4f (below %g dB or %g); an "
                "accuracy target (%r) keeps the most sensitive layers float until it holds",
                lossy.output,
                lossy.sqnr_db,
                lossy.cosine,
                LARGE_LOSS_SQNR_DB,
                LARGE_LOSS_COSINE,
                self.report.recovery_target(),
            )
        for row in slower:
            logger.warning(
                "the quantized model is SLOWER than the input at %d thread(s): %.3f ms vs %.3f ms (%.2fx)",
                row.threads,
                row.quantized_ms,
                row.float_ms,
                row.speedup,
            )
        return self.report

    def check_runs(self) -> None:
        """Load the model in ONNX Runtime at ``ORT_ENABLE_ALL`` and run it once; raise if it fails.

        The feed is the first calibration sample, else random inputs from the declared shapes (when
        the float model runs on them). A failure raises :class:`OnnxqError` naming the node.
        """
        from onnxq.validate.smoke import check_runs

        feeds = self._calibration
        if feeds is None:
            with contextlib.suppress(OnnxqError):
                feeds = load_feeds(
                    "random", input_specs(self.model), random_samples=1, what="smoke-test data", quiet=True
                )
        first = next(iter(feeds), None) if feeds is not None else None
        random = feeds is None or feeds.is_random
        providers = ("CPUExecutionProvider",)
        with runtime_source(self.model) as quantized:
            check_runs(quantized, self._float_source, first, random_feed=random, providers=providers)
        self._ran = True
        if not self.report.validated_with:
            self.report.validated_with = f"onnxruntime {onnxruntime_version()} {providers[0]}"

    def meet_target(self, target: Any, data: DataSource | None = None) -> Any:
        """Keep the most sensitive layers float until ``target`` holds on ``data`` (an accuracy budget).

        ``target`` is an :class:`onnxq.tuning.AccuracyTarget` (``AccuracyTarget.parse("sqnr>=30")``) or
        an :class:`onnxq.tuning.CustomTarget` wrapping the user's own evaluation function. Replaces
        ``model`` with the result and records the search in the report; returns the search outcome.
        """
        from onnxq.tuning.budget import meet_target

        if self.static is None:
            raise OnnxqError("an accuracy target needs static quantization of a float model")
        start = time.perf_counter()
        outcome = meet_target(
            self,
            target,
            self._eval_feeds(data),
            guard=self.report.latency_guard or None,
            baseline=self._float_source,
        )
        if isinstance(outcome.state, StaticState):  # a fix (range method, smoothing, ...) was kept
            self.static = outcome.state
            if "calibration" in self.report.scheme:  # the scheme line names the ranges the model has
                self.report.scheme["calibration"] = self.static.config.calibration.method
        self.model = outcome.model
        self._saved = None
        self._ran = False
        self.report.budget = outcome.as_dict()
        # The report counts what the chosen model quantizes, not what the first plan did.
        kept = self.static.quantized_nodes if outcome.float_returned else outcome.kept_float
        counts = self.static.counts(keep_float=kept)
        self.report.quantized_op_types, self.report.float_op_types = counts.quantized, counts.floating
        self.report.activations_absorbed = counts.absorbed
        self.report.preprocess_notes = with_run_time_note(self.report.preprocess_notes, counts.run_time)
        self.report.size_quantized_bytes = serialized_size(self.model)
        self.report.timings_s["budget"] = time.perf_counter() - start
        return outcome

    def inspect_layers(self, data: DataSource | None = None, *, limit: int | None = 30) -> str:
        """Per-layer numeric suite against the float model; stored in the report, returned as a table."""
        from onnxq.validate.layers import format_layers, inspect_layers, layers_to_dict

        reference = (
            self.static.float_model if self.static is not None else load_model(self._float_reference())
        )
        stats = inspect_layers(
            self.model, reference, self._eval_feeds(data), smoothed=self.report.smoothed_tensors
        )
        self.report.layers = layers_to_dict(stats)
        return format_layers(stats, limit=limit)

    def _float_reference(self) -> Any:
        if isinstance(self._float_source, Path):
            return self._float_source
        import onnx

        return onnx.load_model_from_string(self._float_source)

    def _eval_feeds(self, data: DataSource | None) -> Feeds:
        """Evaluation data: given, else the calibration data, else random inputs with a warning."""
        if isinstance(data, Feeds):
            return data
        if data is not None:
            return load_feeds(data, input_specs(self.model), what="evaluation data")
        if self._calibration is not None:
            return self._calibration
        return load_feeds("random", input_specs(self.model), what="evaluation data")

    def _compare(self, quantized: bytes | Path, feeds: Feeds, providers: list[str]) -> None:
        from onnxq.validate.metrics import compare_models

        stats = compare_models(
            self._float_source,
            quantized,
            feeds,
            providers=providers,
            opt_level="all",
            progress_total=feeds.num_batches,
            progress_desc="validate",
        )
        self.report.provider = providers[0]
        self.report.accuracy_opt_level = "ORT_ENABLE_ALL"
        self.report.accuracy = [
            AccuracyRow(
                s.name,
                s.sqnr_db,
                s.cosine,
                s.max_abs_error,
                s.top1,
                s.samples,
                s.length_changes,
                s.padding_excluded,
            )
            for s in stats
        ]

    def _time(
        self, quantized: bytes | Path, feeds: Feeds, providers: list[str], config: ValidationConfig
    ) -> None:
        from onnxq.runtime.latency import measure_latency

        self.report.latency = []
        first = next(iter(feeds), None)
        if first is None:
            return
        for threads in config.threads:
            timing = measure_latency(
                {"float": self._float_source, "quantized": quantized},
                first,
                threads=threads,
                runs=config.latency_runs,
                warmup=config.warmup_runs,
                providers=providers,
            )
            self.report.latency.append(
                LatencyRow(
                    threads, timing["float"].median_ms, timing["quantized"].median_ms, config.latency_runs
                )
            )
