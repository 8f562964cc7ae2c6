"""Tests for the kernel table: what the installed ONNX Runtime can run, checked against ONNX Runtime itself.

The table's answers are compared with real sessions (a Q/DQ pair at every opset ONNX Runtime imports,
integer kernels with both weight types), so they hold for whichever onnxruntime CI installs (the newest
and the oldest one pyproject.toml admits). The version-matching rule is pinned on a synthetic table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import builders
import numpy as np
import onnx
import onnx.helper
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq.load.versions import EMITTED_OPS
from onnxq.runtime.kernels import KernelTable, kernel_table, onnxruntime_version, ort_max_versions

U8, I8, F32 = ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.FLOAT


def _loads(proto: onnx.ModelProto) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def _qdq_model(opset: int) -> onnx.ModelProto:
    return builders.parse(
        """
        g (float[2,4] x) => (float[2,4] y) {
            s = Constant <value = float {0.1}> ()
            z = Constant <value = uint8 {128}> ()
            q = QuantizeLinear (x, s, z)
            y = DequantizeLinear (q, s, z)
        }
        """,
        opset=opset,
        ir_version=min(ort_max_versions()[0], 10),
    )


def test_quantize_linear_kernels_match_what_onnxruntime_loads() -> None:
    """The table says QuantizeLinear/DequantizeLinear run at opset N exactly when a session loads them."""
    table = kernel_table()
    _, max_opset = ort_max_versions()
    answers = {}
    for opset in range(13, max_opset + 1):
        expected = _loads(_qdq_model(opset))
        said = table.runs("", "QuantizeLinear", opset) and table.runs("", "DequantizeLinear", opset)
        answers[opset] = (said, expected)
    assert all(said == expected for said, expected in answers.values()), answers


@pytest.mark.parametrize("weight", [U8, I8])
def test_conv_integer_weight_types_match_what_onnxruntime_loads(weight: ir.DataType) -> None:
    np_type = np.uint8 if weight == U8 else np.int8
    proto = builders.parse(
        "g (uint8[1,2,4,4] x) => (int32[1,3,2,2] y) { y = ConvInteger (x, w) }",
        {"w": np.ones((3, 2, 3, 3), np_type)},
    )
    said = kernel_table().runs("", "ConvInteger", builders.DEFAULT_OPSET, {0: U8, 1: weight})
    assert said == _loads(proto)


def test_emitted_ops_run_at_the_opsets_normalization_picks() -> None:
    table = kernel_table()
    _, max_opset = ort_max_versions()
    best = table.highest_opset(EMITTED_OPS, max_opset, 13)
    assert best is not None
    assert _loads(_qdq_model(best))


def test_unsupported_names_the_node() -> None:
    model = ir.from_proto(_qdq_model(13))
    assert kernel_table().unsupported(model) == []
    node = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    node.op_type = "NoSuchOp"
    node.name = "quantize_x"
    [problem] = kernel_table().unsupported(model)
    assert problem.node == "quantize_x" and problem.op == "NoSuchOp"
    assert str(problem) == (
        f"node quantize_x (NoSuchOp): onnxruntime {onnxruntime_version()} does not know the op NoSuchOp"
    )


def test_function_ops_without_kernels_count_as_runnable() -> None:
    """An op ONNX Runtime expands from its function body (no kernel registered) still runs."""
    table = kernel_table()
    expandable = [
        (op, opset)
        for op, opset in (("HardSwish", 22), ("Shrink", 13), ("MeanVarianceNormalization", 13))
        if table.knows("", op)
    ]
    assert expandable
    for op, opset in expandable:
        assert table.problem("", op, opset) is None, op


# ---------------------------------------------------------------------------------------------------
# The version rule, on a synthetic table


@dataclass
class _Param:
    typeStr: str  # noqa: N815 - onnxruntime's attribute name
    option: str = "FormalParameterOption.Single"


@dataclass
class _Schema:
    name: str
    since_version: int
    domain: str = ""
    inputs: list[_Param] = field(default_factory=lambda: [_Param("T")])
    outputs: list[_Param] = field(default_factory=lambda: [_Param("T")])


@dataclass
class _KernelDef:
    op_name: str
    version_range: tuple[int, int]
    type_constraints: dict[str, list[str]]
    domain: str = ""
    provider: str = "CPUExecutionProvider"


OPEN = 2**31 - 1


def _table(kernels: list[_KernelDef], versions: tuple[int, ...] = (10, 13, 19, 21)) -> KernelTable:
    schemas: list[Any] = [_Schema("Op", v) for v in versions]
    return KernelTable(schemas, kernels, "test")


def test_open_ended_kernel_serves_its_start_version_only() -> None:
    table = _table([_KernelDef("Op", (19, OPEN), {"T": ["tensor(float)"]})])
    assert table.runs("", "Op", 19) and table.runs("", "Op", 20)  # opset 20 resolves to Op-19
    assert not table.runs("", "Op", 21)  # Op-21 exists; the open-ended kernel is Op-19's
    assert table.problem("", "Op", 21) == "onnxruntime test has no CPU kernel for Op-21"


def test_closed_kernel_range_serves_every_version_inside() -> None:
    table = _table([_KernelDef("Op", (10, 20), {"T": ["tensor(float)"]})])
    assert table.runs("", "Op", 13) and table.runs("", "Op", 19) and not table.runs("", "Op", 21)
    assert table.problem("", "Op", 9) == "onnxruntime test has no Op schema at opset 9"


def test_type_constraints_select_the_kernel() -> None:
    table = _table(
        [
            _KernelDef("Op", (13, 18), {"T": ["tensor(uint8)"]}),
            _KernelDef("Op", (19, OPEN), {"T": ["tensor(uint8)", "tensor(int8)"]}),
        ]
    )
    assert table.runs("", "Op", 13, {0: U8}) and not table.runs("", "Op", 13, {0: I8})
    assert table.runs("", "Op", 19, {0: I8})
    assert table.problem("", "Op", 13, {0: I8}) == "onnxruntime test has no CPU kernel for Op-13 with T=int8"
    assert table.highest_opset(["Op"], 21, 13) == 20


def test_other_providers_kernels_do_not_count() -> None:
    table = _table([_KernelDef("Op", (13, OPEN), {}, provider="CUDAExecutionProvider")])
    assert not table.runs("", "Op", 13)
