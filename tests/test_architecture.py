"""The shape of the code: imports point down the pipeline, one module opens ONNX Runtime sessions, no
module reaches into another's private names, and every rewrite pass is a rule table.

Imports are read from the source (module-level and function-level alike), so a lazy import that goes
upward or closes a cycle fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import onnxq
from onnxq import rules
from onnxq.preprocess import fold_bn
from onnxq.rewrite import dynamic_quant, fuse_qlinear, normalize_qdq

PACKAGE = Path(onnxq.__file__).parent

#: Layers, lowest first: a module may import modules of its own layer or below, never above. Within
#: the stages, the order is the pipeline's (a later stage may use an earlier one's results).
LAYERS: list[tuple[str, ...]] = [
    ("onnxq.errors", "onnxq.version", "onnxq.qmath", "onnxq.progress", "onnxq.config"),
    ("onnxq.graph", "onnxq.declines", "onnxq.data", "onnxq.report", "onnxq.load.files"),
    ("onnxq.provenance",),
    ("onnxq.runtime",),
    ("onnxq.rules", "onnxq.load.versions"),
    ("onnxq.preprocess",),
    ("onnxq.plan",),
    ("onnxq.calibrate",),
    ("onnxq.rewrite",),
    ("onnxq.validate",),
    ("onnxq.tuning",),
    ("onnxq.pipeline",),
    ("onnxq.examples", "onnxq.cli", "onnxq.__main__", "onnxq"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, str]]:
    """(module, name) for every ``from onnxq... import name`` and ``import onnxq...`` in the source."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "onnxq":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "onnxq"]
    return found


def _target(module: str, name: str) -> str:
    """The module an import reaches: ``from onnxq.rewrite import cleanup`` reaches a submodule."""
    candidate = f"{module}.{name}"
    return candidate if candidate in MODULES else module


def _layer(module: str) -> int:
    best, length = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best >= 0, f"{module} is in no layer of LAYERS: add it where it belongs"
    return best


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_imports_never_point_upward() -> None:
    upward = []
    for module, tree in MODULES.items():
        for imported, name in _imports(tree):
            target = _target(imported, name)
            if target != module and _layer(target) > _layer(module):
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_import_cycles() -> None:
    edges = {
        module: {_target(m, n) for m, n in _imports(tree)} - {module} for module, tree in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_private_names_imported_across_modules() -> None:
    private = [
        f"{module} imports {imported}.{name}"
        for module, tree in MODULES.items()
        for imported, name in _imports(tree)
        if name.startswith("_") and not name.startswith("__") and imported != module
    ]
    assert private == []


def test_one_module_creates_onnxruntime_sessions() -> None:
    creators = []
    for module, tree in MODULES.items():
        for node in ast.walk(tree):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if call and node.func.attr == "InferenceSession":  # type: ignore[attr-defined]
                creators.append(module)
    assert sorted(set(creators)) == ["onnxq.runtime.session"]


def test_the_default_domain_is_spelled_once() -> None:
    spelled = [
        module
        for module, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Tuple) and [getattr(e, "value", None) for e in node.elts] == ["", "ai.onnx"]
    ]
    assert spelled == ["onnxq.graph"]


@pytest.mark.parametrize(
    ("module", "table"),
    [
        (fuse_qlinear, fuse_qlinear.RULES),
        (dynamic_quant, dynamic_quant.RULES),
        (fold_bn, fold_bn.RULES),
        (normalize_qdq, tuple(rule for phase in normalize_qdq.PHASES for rule in phase.rules)),
    ],
    ids=["fuse_qlinear", "dynamic_quant", "fold_bn", "normalize_qdq"],
)
def test_every_rewrite_pass_is_a_rule_table(module: object, table: tuple[rules.Rule, ...]) -> None:  # type: ignore[type-arg]
    assert table and all(isinstance(rule, rules.Rule) for rule in table)
    assert all(rule.op_types for rule in table)
    source = Path(module.__file__).read_text()  # type: ignore[attr-defined]
    assert "apply_rules(" in source or "run_phase" in source
