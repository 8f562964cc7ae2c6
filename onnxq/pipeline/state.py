"""What a static quantization learned, kept so that variants cost a rewrite, not a calibration."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import onnx_ir as ir

from onnxq.calibrate.bias_correction import correct_biases, restore_biases
from onnxq.calibrate.collect import collect_ranges
from onnxq.calibrate.input_rounding import InputRounding
from onnxq.config import QuantConfig
from onnxq.data import Feeds
from onnxq.declines import Decline
from onnxq.pipeline.range_choice import choose_range_method
from onnxq.plan.planner import QuantPlan, plan_quantization
from onnxq.preprocess.canonicalize import write_float_forms
from onnxq.preprocess.equalize import EqualizePass
from onnxq.preprocess.smooth import smooth_outliers
from onnxq.rewrite.cleanup import cleanup
from onnxq.rewrite.dynamic_quant import StaticLeftoversPass, run_time_products
from onnxq.rewrite.fuse_qlinear import QDQ_PASS_THROUGH_RULES, FuseQLinearPass
from onnxq.rewrite.insert_qdq import InsertQDQPass, group_params
from onnxq.rewrite.silu_island import count_as_islands, planned_silus, write_silu_islands
from onnxq.rewrite.sum_form import write_bias_adds_as_sum, write_residual_adds_as_sum
from onnxq.tuning.interfaces import FIXES

__all__ = ["PlanCounts", "QDQWritten", "StaticState", "count_op_types", "planning_config", "write_qdq"]


@dataclass
class QDQWritten:
    """What :func:`write_qdq` did beyond the plan: dynamic LSTMs and tables, pass-through integer ops."""

    #: Nodes the dynamic rules rewrote, by op type (``LSTM``, ``Gather``; not the run-time products).
    dynamic: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Products that quantize their input at run time (:attr:`QuantConfig.run_time_ranges`), by op type.
    run_time: collections.Counter[str] = field(default_factory=collections.Counter)
    pass_through: collections.Counter[str] = field(default_factory=collections.Counter)
    declines: list[Decline] = field(default_factory=list)
    #: Biases shifted by the input bias correction (:mod:`onnxq.calibrate.input_rounding`).
    rounding_corrected: int = 0


def planning_config(
    model: ir.Model, config: QuantConfig, keep_float: Iterable[str] = ()
) -> tuple[QuantConfig, tuple[str, ...]]:
    """The configuration the static plan of ``model`` is made with, and its run-time products.

    ``keep_float`` anchors are excluded from the plan. With :attr:`QuantConfig.run_time_ranges`, so
    are the MatMul/Gemm nodes that quantize their input at run time
    (:func:`~onnxq.rewrite.dynamic_quant.run_time_products`): :func:`write_qdq` rewrites them after
    the plan's Q/DQ are in, and their inputs need no calibrated range.
    """
    keep_float = tuple(keep_float)
    if keep_float:
        config = config.replace(exclude_nodes=(*config.exclude_nodes, *keep_float))
    run_time = run_time_products(model, config)
    if run_time:
        config = config.replace(exclude_nodes=(*config.exclude_nodes, *run_time))
    return config, run_time


def write_qdq(
    model: ir.Model,
    plan: QuantPlan,
    ranges: Mapping[ir.Value, tuple[float, float]],
    config: QuantConfig,
    run_time: Iterable[str] = (),
    rounding: InputRounding | None = None,
) -> QDQWritten:
    """Rewrite ``model`` into QDQ form from a plan and calibrated ranges.

    Q/DQ insertion (:class:`~onnxq.rewrite.insert_qdq.InsertQDQPass`), then the dynamic rules for
    what the plan leaves float (:class:`~onnxq.rewrite.dynamic_quant.StaticLeftoversPass`: the
    ``run_time`` products of :func:`planning_config`, LSTMs with ``DynamicConfig.lstm``, int8
    embedding tables with ``DynamicConfig.embeddings``), then the pass-through ops ONNX Runtime would
    leave between a DQ and a Q (Pad, DepthToSpace, SpaceToDepth) made to run on the integer tensor.
    With ``rounding``, the biases of the layers whose input the plan quantizes first absorb the mean
    error of that input's rounding (:mod:`onnxq.calibrate.input_rounding`).
    """
    params = group_params(plan, dict(ranges), narrow=bool(config.calibration.narrow_to_readers))
    written = QDQWritten()
    if rounding is not None:
        written.rounding_corrected = rounding.correct(model, plan, params)
    InsertQDQPass(plan, params)(model)
    leftovers = StaticLeftoversPass(config, products=tuple(run_time))
    leftovers(model)
    written.run_time = leftovers.run_time
    written.dynamic = leftovers.quantized - leftovers.run_time
    written.declines += leftovers.declined
    integer = FuseQLinearPass(table=QDQ_PASS_THROUGH_RULES)
    integer(model)
    written.pass_through = integer.lowered
    return written


def count_op_types(plan: QuantPlan, dynamic: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The quantized and the float op types of ``plan``'s model, as the report shows them.

    The nodes that the dynamic rules rewrote (:attr:`QDQWritten.dynamic`: LSTMs, embedding Gathers)
    are moved from float to quantized: the plan leaves them float, the written model does not.
    """
    quantized = collections.Counter(plan.quantized_op_types())
    quantized.update(dynamic)
    floating = collections.Counter(plan.float_op_types)
    floating.subtract(dynamic)
    return dict(sorted(quantized.items())), dict(sorted((k, n) for k, n in floating.items() if n > 0))


@dataclass(frozen=True)
class PlanCounts:
    """What the report counts of a quantized model.

    Its quantized and float op types, the activations fused into their producers, and the products
    that quantize their input at run time.
    """

    quantized: dict[str, int]
    floating: dict[str, int]
    absorbed: int
    run_time: int


@dataclass
class StaticState:
    """What a static quantization learned, kept so that variants cost a rewrite, not a calibration.

    ``float_model`` is the preprocessed float model (before Q/DQ); ``ranges`` the calibrated range
    of every observed tensor by name; ``quantized_nodes`` the anchor nodes that were quantized.
    """

    float_model: ir.Model
    config: QuantConfig
    feeds: Feeds
    ranges: dict[str, tuple[float, float]]
    providers: tuple[str, ...]
    quantized_nodes: tuple[str, ...]
    #: The float model as the input computes it, where ``float_model`` differs from it (bias
    #: correction changes the function to quantize); ``None``: ``float_model`` is it.
    reference: ir.Model | None = None
    #: Nodes the dynamic rules rewrite, by op type (:attr:`QDQWritten.dynamic`; anchors kept float
    #: do not change them).
    dynamic_ops: dict[str, int] = field(default_factory=dict)
    #: Write residual Adds before LayerNormalization as ``Sum`` (the latency guard found the unfused
    #: form faster here: :mod:`onnxq.rewrite.sum_form`).
    residual_sums: bool = False
    #: Write SiLUs as float QuickGelu islands (the latency guard found that faster here:
    #: :mod:`onnxq.rewrite.silu_island`).
    silu_islands: bool = False
    #: The input bias correction's statistics for ``float_model`` (``None``: not applied).
    rounding: InputRounding | None = None

    @property
    def reference_model(self) -> ir.Model:
        """What the quantized model is compared with, and what "every layer float" returns."""
        return self.reference if self.reference is not None else self.float_model

    def float_form(self) -> ir.Model:
        """Every layer float, as it runs fastest: :attr:`reference_model` in its float forms.

        :func:`~onnxq.preprocess.canonicalize.write_float_forms`: a hard-swish whose ``/ 6`` a Conv
        took is one op again.
        """
        model = self.reference_model.clone()
        write_float_forms(model)
        return model

    def plan(self, keep_float: Iterable[str] = ()) -> QuantPlan:
        """The plan of :meth:`requantize` for the same ``keep_float`` (what it would quantize)."""
        model = self.float_model.clone()
        return plan_quantization(model, planning_config(model, self.config, keep_float)[0])

    def counts(self, keep_float: Iterable[str] = ()) -> PlanCounts:
        """What the report counts of :meth:`requantize`'s model for the same ``keep_float`` (one plan)."""
        model = self.float_model.clone()
        config, run_time = planning_config(model, self.config, keep_float)
        plan = plan_quantization(model, config)
        rewritten = collections.Counter(self.dynamic_ops)
        rewritten.update(n.op_type for n in model.graph if n.name in run_time)
        quantized, floating = count_op_types(plan, rewritten)
        if self.silu_islands:  # each SiLU's Sigmoid and Mul run as one float QuickGelu
            count_as_islands(quantized, floating, planned_silus(plan.quantized_nodes))
        return PlanCounts(quantized, floating, len(plan.absorbed_nodes), len(run_time))

    def requantize(
        self, keep_float: Iterable[str] = (), *, output_format: Literal["qdq", "qoperator"] | None = None
    ) -> ir.Model:
        """The same quantization with the nodes named in ``keep_float`` left float.

        Calibrated ranges are reused; only tensors that no earlier run observed are calibrated now.
        Anchors kept float get the input's bias back where bias correction had shifted it.
        ``output_format`` overrides the configuration's format (analyses want QDQ form).
        """
        keep_float = tuple(keep_float)
        model = self.float_model.clone()
        if self.reference is not None and keep_float:  # a bias corrected for rounding it no longer has
            restore_biases(model, self.reference, keep_float)
        config, run_time = planning_config(model, self.config, keep_float)
        plan = plan_quantization(model, config)
        observed = plan.observed_values()
        missing = [v for v in observed if (v.name or "") not in self.ranges]
        if missing:
            schemes = {v: plan.group_of[v].scheme for v in missing}
            extra = collect_ranges(
                model, missing, schemes, self.feeds, config.calibration, providers=self.providers
            )
            self.ranges.update({v.name or "": r for v, r in extra.ranges.items()})
        ranges = {v: self.ranges[v.name or ""] for v in observed if (v.name or "") in self.ranges}
        write_qdq(model, plan, ranges, config, run_time, self.rounding)
        qoperator = (output_format or config.format) == "qoperator"
        if qoperator:
            FuseQLinearPass()(model)
        cleanup(model)
        if not qoperator:
            write_bias_adds_as_sum(model)
        if self.residual_sums:
            write_residual_adds_as_sum(model)
        if self.silu_islands:
            write_silu_islands(model)
        write_float_forms(model)
        return model

    def qdq_with_ranges(self, ranges: dict[str, tuple[float, float]]) -> ir.Model:
        """The same quantization in QDQ form with other ``ranges`` (by tensor name).

        A rewrite of the float model, no calibration: what :func:`~onnxq.pipeline.range_choice.
        choose_range_method` scores for each candidate assignment of range methods.
        """
        # Scored without the input bias correction: each candidate's ranges would need a float run of
        # their own; the chosen ranges get it when the model is written.
        return dataclasses.replace(self, ranges=ranges, rounding=None).requantize(output_format="qdq")

    def _auto_ranges(self, config: QuantConfig) -> dict[str, tuple[float, float]]:
        """Every tensor's range by method ``auto`` (:mod:`onnxq.pipeline.range_choice`)."""
        model = self.float_model.clone()
        plan = plan_quantization(model, planning_config(model, config)[0])
        observed = plan.observed_values()
        schemes = {v: plan.group_of[v].scheme for v in observed}
        calibration = collect_ranges(
            model, observed, schemes, self.feeds, config.calibration, providers=self.providers
        )

        trial = dataclasses.replace(self, float_model=model, config=config)
        choice = choose_range_method(model, calibration, self.feeds, trial.qdq_with_ranges, self.providers)
        return {v.name or "": r for v, r in choice.ranges.items()}

    def with_fix(self, fix: str) -> StaticState:
        """The same quantization with one of :data:`FIXES` applied; its ranges calibrated on demand.

        ``method=<name>`` re-calibrates with another range method (``method=auto`` also makes its
        choice, per tensor, here); ``smooth``, ``equalize_depthwise_inputs`` and ``equalize`` apply
        the outlier smoothing (its depthwise-input part: a float ``Mul`` in front of the depthwise
        Convs whose input's producer cannot take the factor) / cross-layer equalization to the float
        model (exact in float);
        ``bias_correction`` shifts the anchors' biases by the mean error quantization adds
        (:mod:`onnxq.calibrate.bias_correction`); ``input_bias_correction`` turns on the correction of
        the input's rounding (:mod:`onnxq.calibrate.input_rounding`, made when the model is written).
        Every anchor stays quantized: a fix costs one calibration (bias corrections: one float run),
        and no speed (``equalize_depthwise_inputs``: the float ``Mul`` it adds,
        :data:`~onnxq.tuning.interfaces.COSTLY_FIXES`).
        """
        model, config = self.float_model, self.config
        if fix == "method=auto":  # the choice needs model runs: made here, not left to requantize
            calibration = dataclasses.replace(config.calibration, method="auto")
            config = config.replace(calibration=calibration)
            return dataclasses.replace(self, config=config, ranges=self._auto_ranges(config))
        if fix.startswith("method="):
            calibration = dataclasses.replace(config.calibration, method=fix.removeprefix("method="))  # type: ignore[arg-type]
            config = config.replace(calibration=calibration)
        elif fix == "smooth":
            model = model.clone()
            smooth_outliers(model, self.feeds, self.providers)
            config = config.replace(smooth=True)
        elif fix == "equalize_depthwise_inputs":
            model = model.clone()
            smooth_outliers(model, self.feeds, self.providers, products=False, depthwise_inputs=True)
            config = config.replace(equalize_depthwise_inputs=True)
        elif fix == "equalize":
            model = model.clone()
            EqualizePass()(model)
            config = config.replace(equalize=True)
        elif fix == "run_time_ranges":  # fewer tensors need a calibrated range: the ones known serve
            config = config.replace(run_time_ranges=True)
            return dataclasses.replace(self, config=config, ranges=dict(self.ranges))
        elif fix == "input_bias_correction":  # the ranges stay: the correction is made when written
            config = config.replace(input_bias_correction=True)
            rounding = InputRounding(self.feeds, self.providers)
            return dataclasses.replace(self, config=config, ranges=dict(self.ranges), rounding=rounding)
        elif fix == "bias_correction":  # the ranges stay: a bias shift moves them by a rounding step
            model = model.clone()
            correct_biases(model, self.quantized_nodes, config.weights, self.feeds, self.providers)
            config = config.replace(bias_correction=True)
            return dataclasses.replace(
                self,
                float_model=model,
                config=config,
                ranges=dict(self.ranges),
                reference=self.reference_model,
                rounding=self._rounding_for(model),
            )
        else:
            raise ValueError(f"unknown fix {fix!r}; expected one of {', '.join(FIXES)}")
        return dataclasses.replace(
            self, float_model=model, config=config, ranges={}, rounding=self._rounding_for(model)
        )

    def _rounding_for(self, model: ir.Model) -> InputRounding | None:
        """The input bias correction's statistics for ``model``.

        This state's for its own float model, fresh ones for a model whose activations a fix changed
        (none when the correction is off).
        """
        if self.rounding is None or model is self.float_model:
            return self.rounding
        return InputRounding(self.feeds, self.providers)
