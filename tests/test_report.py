"""The report: what the tables say, as data and as text, for each kind of run."""

from __future__ import annotations

import json
import logging

import builders
import pytest

import onnxq
from onnxq.report import AccuracyRow, LatencyRow, QuantReport
from onnxq.runtime.latency import LatencyResult


def _report(**fields: object) -> QuantReport:
    report = QuantReport(model="m.onnx", timings_s={})
    for name, value in fields.items():
        setattr(report, name, value)
    return report


def test_static_report_counts_quantized_nodes_and_compares_with_float() -> None:
    report = _report(
        mode="static",
        quantized_op_types={"Conv": 2, "Add": 1},
        nodes_after=5,
        accuracy=[AccuracyRow("y", 31.5, 0.9993, 0.02, 0.98, 16)],
    )
    text = report.format_table()
    assert "nodes quantized │ 3 of 5 (Add 1, Conv 2)" in text
    assert "Accuracy vs float (" in text
    assert report.to_dict()["nodes_quantized"] == 3


def test_requantized_input_is_labelled_as_what_it_is() -> None:
    """An already-quantized input is the reference: no 'vs float', no 'nodes quantized' count."""
    report = _report(
        mode="requantize",
        quantized_op_types={"QuantizeLinear": 3, "DequantizeLinear": 5},
        accuracy=[AccuracyRow("y", float("inf"), 1.0, 0.0, None, 4)],
        latency=[LatencyRow(1, 2.0, 1.0, 10)],
    )
    text = report.format_table()
    assert "vs float" not in text and "nodes quantized" not in text
    assert "Accuracy vs the input model (already quantized, not a float reference)" in text
    assert "Q/DQ nodes" in text and "already in the input; no calibration" in text
    assert "input ms" in text and "float ms" not in text


def test_slower_than_input_is_said_loudly() -> None:
    report = _report(latency=[LatencyRow(1, 1.0, 1.5, 10), LatencyRow(2, 1.0, 0.5, 10)])
    assert report.slower_threads == [1]
    assert "WARNING: the quantized model is SLOWER than the input at 1 thread(s)" in report.format_table()
    assert report.to_dict()["slower_than_input_at_threads"] == [1]
    assert "SLOWER" not in _report(latency=[LatencyRow(1, 1.0, 0.5, 10)]).format_table()
    # within the timings' noise (3 %): not a finding
    assert _report(latency=[LatencyRow(1, 1.0, 1.02, 10)]).slower_threads == []
    assert _report(latency=[LatencyRow(1, 1.0, 1.04, 10)]).slower_threads == [1]


def test_validate_warns_on_stderr_when_slower(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def slow(
        models: dict[str, object], feed: object, *, threads: int, **_: object
    ) -> dict[str, LatencyResult]:
        return {
            "float": LatencyResult("float", threads, 1.0, 1.1, 3),
            "quantized": LatencyResult("quantized", threads, 3.0, 3.1, 3),
        }

    monkeypatch.setattr("onnxq.runtime.latency.measure_latency", slow)
    feeds = [{"x": s} for s in builders.conv_calibration(samples=4)]
    result = onnxq.quantize(builders.conv_relu_model(), feeds)
    with caplog.at_level(logging.WARNING):
        result.validate(feeds, onnxq.ValidationConfig(threads=(1, 2), latency_runs=3))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "the quantized model is SLOWER than the input at 1 thread(s): 3.000 ms vs 1.000 ms (0.33x)",
        "the quantized model is SLOWER than the input at 2 thread(s): 3.000 ms vs 1.000 ms (0.33x)",
    ]


def test_report_json_is_standard_json() -> None:
    report = _report(accuracy=[AccuracyRow("y", float("inf"), 1.0, 0.0, None, 1)])
    data = json.loads(report.to_json())
    assert data["accuracy"][0]["sqnr_db"] == "inf"


@pytest.mark.parametrize(
    ("for_accuracy", "expected"),
    [(False, "(int8 slower here)"), (True, "(as fast in int8 here, 4.5 dB more accurate float)")],
)
def test_the_guard_row_says_why_a_kind_was_kept_float(for_accuracy: bool, expected: str) -> None:
    from onnxq.report import guard_line

    guard = {
        "latency_ms": {"float": 2.0, "quantized": 1.0, "keep narrow Conv float": 1.01},
        "sqnr_db": {"quantized": 30.0, "keep narrow Conv float": 34.5},
        "reverted": {"narrow Conv": ["c0"]},
        "chosen": "keep narrow Conv float",
        "for_accuracy": for_accuracy,
        "threads": 1,
        "runs": 12,
        "seconds": 0.2,
    }
    line = guard_line(guard)
    assert line.startswith("kept float: 1 narrow Conv ") and expected in line


def test_the_guard_row_leaves_out_what_was_not_timed_and_says_when_a_target_overrode_it() -> None:
    from onnxq.report import guard_line

    guard = {"latency_ms": {"input": 2.0, "quantized": 1.0}, "chosen": "quantized", "threads": 1}
    assert "float" not in guard_line(guard) and "nan" not in guard_line(guard)
    report = _report(latency_guard=guard, budget={"target": "cosine>=0.99", "float_returned": True})
    row = next(line for line in report.format_table().splitlines() if "latency guard" in line)
    assert "superseded: the accuracy target returned the float model" in row


def test_a_repeated_warning_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    from onnxq.cli import _OnceFilter

    handler = logging.StreamHandler()
    handler.addFilter(_OnceFilter())
    log = logging.getLogger("onnxq.test.once")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(3):
            log.warning("attribute is not UTF-8")
        log.warning("another")
    finally:
        log.removeHandler(handler)
    assert capsys.readouterr().err.splitlines() == ["attribute is not UTF-8", "another"]


def test_outputs_compared_without_padding_say_so() -> None:
    rows = [
        AccuracyRow("hidden", 25.0, 0.998, 0.1, None, 4, padding_excluded=True),
        AccuracyRow("pooled", 30.0, 0.999, 0.01, None, 4),
    ]
    text = _report(accuracy=rows).format_table()
    (note,) = [line for line in text.splitlines() if "real tokens only" in line]
    assert note.startswith("'hidden': compared on real tokens only") and "pooled" not in note
    assert json.loads(_report(accuracy=rows).to_json())["accuracy"][0]["padding_excluded"] is True


@pytest.mark.parametrize("reverted", [{}, {"narrow Conv": ["c0"]}], ids=["none-reverted", "one-reverted"])
def test_the_guard_row_names_the_silu_islands(reverted: dict[str, list[str]]) -> None:
    from onnxq.report import guard_line

    chosen = "quantized, SiLU as QuickGelu" if not reverted else "keep narrow Conv float, SiLU as QuickGelu"
    guard = {
        "latency_ms": {"input": 4.0, "quantized": 2.0, chosen: 1.5},
        "reverted": reverted,
        "chosen": chosen,
        "silu_islands": 56,
        "threads": 1,
    }
    line = guard_line(guard)
    assert "56 SiLU(s) as float QuickGelu" in line and "-> 1.5 ms" in line
