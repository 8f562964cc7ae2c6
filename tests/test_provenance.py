"""Provenance: what a saved model records about how onnxq made it, and that it is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.provenance import PROVENANCE_KEYS, provenance, stamp_provenance
from onnxq.report import QuantReport
from onnxq.version import __version__

SETTINGS = {"mode": "static", "calibration": {"method": "minmax", "percentile": 99.999}, "exclude_nodes": []}
CALIBRATION = {
    "method": "minmax",
    "samples": 16,
    "runs": 4,
    "seconds": 0.123,
    "tensors": 3,
    "random": False,
    "fingerprint": "sha256:" + "0f" * 32,
}
BUDGET = {
    "target": "sqnr>=30",
    "met": True,
    "kept_float": ["MatMul_3"],
    "score_before": 18.5,
    "score_after": 31.2,
    "evaluations": 3,
    "search_seconds": 0.42,
}


def full_report(**changes: object) -> QuantReport:
    fields: dict[str, object] = {
        "model": "net.onnx",
        "source_producer": "pytorch 2.13.0",
        "settings": SETTINGS,
        "calibration": CALIBRATION,
        "budget": BUDGET,
        "validated_with": "onnxruntime 1.32.0 CPUExecutionProvider",
        "smoothed_tensors": ["r0", "r2"],
    }
    fields.update(changes)
    return QuantReport(**fields)  # type: ignore[arg-type]


def float_model(**metadata: str) -> ir.Model:
    proto = builders.conv_relu_model()
    proto.producer_name = "pytorch"
    proto.producer_version = "2.13.0"
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return ir.from_proto(proto)


# ---------------------------------------------------------------------------------------------------
# provenance(): keys and values


def test_keys_and_values() -> None:
    props = provenance(full_report())
    assert set(props) == set(PROVENANCE_KEYS)
    assert json.loads(props["onnxq.smoothed"]) == ["r0", "r2"]
    assert props["onnxq.version"] == __version__
    assert props["onnxq.source_producer"] == "pytorch 2.13.0"
    assert json.loads(props["onnxq.settings"]) == SETTINGS
    assert props["onnxq.validated_with"] == "onnxruntime 1.32.0 CPUExecutionProvider"
    assert json.loads(props["onnxq.calibration"]) == {
        "samples": 16,
        "fingerprint": "sha256:" + "0f" * 32,
        "random": False,
    }
    assert json.loads(props["onnxq.accuracy_budget"]) == {
        "target": "sqnr>=30",
        "met": True,
        "kept_float": ["MatMul_3"],
    }


def test_every_value_is_a_string() -> None:
    assert all(isinstance(v, str) for v in provenance(full_report()).values())


def test_no_timings_paths_or_run_counts_are_recorded() -> None:
    """Only functions of the inputs: a second run on a slower machine writes the same metadata."""
    text = json.dumps(provenance(full_report()))
    for volatile in ("seconds", "0.123", "search_seconds", "0.42", "runs", "score_before", "net.onnx"):
        assert volatile not in text, volatile


def test_json_is_compact_and_key_sorted() -> None:
    props = provenance(full_report(settings={"b": 1, "a": {"d": 2, "c": [1, 2]}}))
    assert props["onnxq.settings"] == '{"a":{"c":[1,2],"d":2},"b":1}'
    assert props["onnxq.calibration"] == (
        '{"fingerprint":"sha256:' + "0f" * 32 + '","random":false,"samples":16}'
    )


def test_defaults_for_missing_facts() -> None:
    props = provenance(QuantReport(model="m"))
    assert props == {
        "onnxq.version": __version__,
        "onnxq.source_producer": "unknown",
        "onnxq.settings": "{}",
        "onnxq.validated_with": "not validated",
    }


def test_random_calibration_is_recorded() -> None:
    props = provenance(full_report(calibration={**CALIBRATION, "random": True}))
    assert json.loads(props["onnxq.calibration"])["random"] is True


def test_calibration_without_random_flag_defaults_to_false() -> None:
    props = provenance(full_report(calibration={"samples": 2, "fingerprint": "sha256:x"}))
    assert json.loads(props["onnxq.calibration"]) == {
        "samples": 2,
        "fingerprint": "sha256:x",
        "random": False,
    }


def test_unmet_budget_is_recorded_as_unmet() -> None:
    props = provenance(full_report(budget={**BUDGET, "met": False, "kept_float": []}))
    assert json.loads(props["onnxq.accuracy_budget"]) == {
        "target": "sqnr>=30",
        "met": False,
        "kept_float": [],
    }


# ---------------------------------------------------------------------------------------------------
# stamp_provenance(): the model


def test_stamp_sets_the_producer_and_metadata() -> None:
    model = float_model()
    stamp_provenance(model, full_report())
    assert model.producer_name == "onnxq"
    assert model.producer_version == __version__
    assert model.metadata_props == provenance(full_report())


def test_stamp_keeps_the_users_metadata() -> None:
    model = float_model(author="me", license="MIT", **{"onnxq_like": "not ours", "onnxq.custom": "x"})
    stamp_provenance(model, full_report())
    assert model.metadata_props["author"] == "me"
    assert model.metadata_props["license"] == "MIT"
    assert model.metadata_props["onnxq_like"] == "not ours"
    assert model.metadata_props["onnxq.custom"] == "x"  # not one of onnxq's keys
    assert set(model.metadata_props) == {"author", "license", "onnxq_like", "onnxq.custom", *PROVENANCE_KEYS}


def test_stamp_replaces_stale_onnxq_keys() -> None:
    """A model that onnxq made before (re-quantized): its old record must not survive."""
    stale = {
        "onnxq.version": "0.0.1",
        "onnxq.settings": '{"old":true}',
        "onnxq.calibration": '{"samples":999}',
        "onnxq.accuracy_budget": '{"target":"cosine>=0.9"}',
        "onnxq.validated_with": "onnxruntime 1.0",
        "onnxq.source_producer": "somebody",
    }
    model = float_model(**stale)
    stamp_provenance(model, QuantReport(model="m", source_producer="onnxq 0.0.1"))
    props = model.metadata_props
    assert props["onnxq.version"] == __version__
    assert props["onnxq.settings"] == "{}"
    assert props["onnxq.source_producer"] == "onnxq 0.0.1"
    assert props["onnxq.validated_with"] == "not validated"
    # this run had no calibration and no budget: the old entries are gone, not kept
    assert "onnxq.calibration" not in props
    assert "onnxq.accuracy_budget" not in props
    assert "onnxq.smoothed" not in props


def test_stamping_twice_is_idempotent() -> None:
    model = float_model(author="me")
    stamp_provenance(model, full_report())
    once = builders.serialize(model)
    stamp_provenance(model, full_report())
    assert builders.serialize(model) == once


def test_budget_entry_appears_only_with_a_budget() -> None:
    with_budget = float_model()
    stamp_provenance(with_budget, full_report())
    without = float_model()
    stamp_provenance(without, full_report(budget={}))
    assert "onnxq.accuracy_budget" in with_budget.metadata_props
    assert "onnxq.accuracy_budget" not in without.metadata_props


def test_stamped_metadata_survives_serialization() -> None:
    model = float_model(author="me")
    stamp_provenance(model, full_report())
    proto = onnx.load_model_from_string(builders.serialize(model))
    assert proto.producer_name == "onnxq" and proto.producer_version == __version__
    stored = {p.key: p.value for p in proto.metadata_props}
    assert stored == {"author": "me", **provenance(full_report())}


# ---------------------------------------------------------------------------------------------------
# End to end: a saved model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same model quantized twice, from the same data, saved to two files."""
    folder = tmp_path_factory.mktemp("provenance")
    calibration = [{"x": s} for s in builders.conv_calibration(4)]
    paths = []
    for name in ("a.onnx", "b.onnx"):
        result = onnxq.quantize(float_model(author="me"), calibration)
        result.save(folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


def test_a_saved_model_records_its_provenance(saved: tuple[Path, Path]) -> None:
    proto = onnx.load(saved[0])
    assert proto.producer_name == "onnxq"
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["author"] == "me"
    assert props["onnxq.version"] == __version__
    assert props["onnxq.source_producer"].startswith("pytorch")
    calibration = json.loads(props["onnxq.calibration"])
    assert calibration["samples"] == 4 and calibration["random"] is False
    assert calibration["fingerprint"].startswith("sha256:")
    assert json.loads(props["onnxq.settings"])["mode"] == "static"
    assert "onnxq.accuracy_budget" not in props


def test_identical_inputs_give_identical_files(saved: tuple[Path, Path]) -> None:
    assert saved[0].read_bytes() == saved[1].read_bytes()
