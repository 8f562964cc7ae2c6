"""The one shape of every graph rewrite in onnxq: a table of rules, each match → check → rewrite.

A :class:`Rule` names the op types it looks at and answers three questions about a node:

- ``match(node, ctx)``: is this a pattern the rule is about? (``None``: not its business, nothing is
  recorded);
- ``check(match)``: can it be rewritten? A :class:`~onnxq.declines.Reason` when not — the decline the
  report shows;
- ``rewrite(match)``: do it, and return the op type the node became (what the pass counts).

Rules that emit an integer kernel also say which one (``kernel(match)``): :func:`apply_rules` asks the
installed ONNX Runtime's kernel table whether it exists before rewriting, so no rule ever writes a node
the runtime cannot run. :func:`apply_rules` is the one traversal: the main graph, then every If/Loop/Scan
body, each node visited once in graph order (nodes removed by an earlier rewrite are skipped), with
match, check and rewrite interleaved so a rule sees the graph as the rules before it left it.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import onnx_ir as ir

from onnxq.declines import Decline, Reason, Stage
from onnxq.graph import DEFAULT_DOMAINS, NameScope, body_owners, default_opset, node_label
from onnxq.runtime.kernels import kernel_table

__all__ = ["Kernel", "RewriteContext", "Rule", "RuleOutcome", "RuleTablePass", "apply_rules", "graphs_of"]

MatchT = TypeVar("MatchT")
ContextT = TypeVar("ContextT")


@dataclass
class RewriteContext:
    """What a graph-rewriting rule needs besides its match: the model, fresh names, the opset."""

    model: ir.Model
    names: NameScope
    opset: int

    @classmethod
    def of(cls, model: ir.Model) -> RewriteContext:
        return cls(model, NameScope(model.graph), default_opset(model))


@dataclass(frozen=True)
class Kernel:
    """An op a rule emits, with the element types of the inputs (by index) that select its kernel."""

    op_type: str
    types: dict[int, ir.DataType | None]
    domain: str = ""

    def problem(self, opset: int) -> str | None:
        """Why the installed ONNX Runtime cannot run it (``None`` when it can)."""
        known = {i: t for i, t in self.types.items() if t is not None}
        opset = opset if self.domain in DEFAULT_DOMAINS else 1
        return kernel_table().problem(self.domain, self.op_type, opset, known)


class Rule(abc.ABC, Generic[MatchT, ContextT]):
    """One rewrite: ``match`` → ``check`` → ``rewrite`` (see the module docstring).

    ``op_types`` (default domain unless ``domain`` says otherwise) are the nodes the rule is asked about.
    """

    op_types: tuple[str, ...] = ()
    domain: str = ""

    @abc.abstractmethod
    def match(self, node: ir.Node, ctx: ContextT) -> MatchT | None:
        """The pattern around ``node``, or ``None`` when the rule is not about it."""

    @abc.abstractmethod
    def check(self, match: MatchT) -> Reason | None:
        """Why the match cannot be rewritten (``None``: it can). Never changes the graph."""

    def kernel(self, match: MatchT) -> Kernel | None:
        """The integer kernel ``rewrite`` would emit (``None``: none that needs checking)."""
        return None

    @abc.abstractmethod
    def rewrite(self, match: MatchT) -> str:
        """Rewrite the graph; return the op type the node became."""


@dataclass
class RuleOutcome:
    """What :func:`apply_rules` did: rewrites counted by resulting op type, and the declines."""

    rewritten: collections.Counter[str] = field(default_factory=collections.Counter)
    declines: list[Decline] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.rewritten)

    def extend(self, other: RuleOutcome) -> None:
        self.rewritten.update(other.rewritten)
        self.declines.extend(other.declines)


def graphs_of(model: ir.Model, scope: Literal["all", "main"] = "all") -> Iterator[ir.Graph]:
    """The graphs a pass visits: the main graph, then (``"all"``) every If/Loop/Scan body, nested ones too."""
    if scope == "main":
        yield model.graph
        return
    yield from model.graphs()


def _first_match(
    candidates: Sequence[Rule[MatchT, ContextT]], node: ir.Node, ctx: ContextT
) -> tuple[Rule[MatchT, ContextT], MatchT] | None:
    for rule in candidates:
        match = rule.match(node, ctx)
        if match is not None:
            return rule, match
    return None


def _attached(graph: ir.Graph, model: ir.Model, owners: dict[int, ir.Node]) -> bool:
    """Whether ``graph`` is still part of ``model``: the main graph, or a body whose holder still is."""
    while graph is not model.graph:
        owner = owners.get(id(graph))
        if owner is None or owner.graph is None:
            return False
        graph = owner.graph
    return True


def apply_rules(
    model: ir.Model,
    rules: Sequence[Rule[MatchT, ContextT]],
    ctx: ContextT,
    *,
    stage: Stage,
    opset: int,
    scope: Literal["all", "main"] = "all",
    nodes: Iterable[ir.Node] | None = None,
) -> RuleOutcome:
    """Apply a rule table to every node of ``model``'s graphs (see the module docstring).

    ``opset`` is the default-domain opset kernels are looked up at. ``nodes`` restricts the visit to
    those nodes (in the order given); by default every node of the graphs in ``scope``. The rules whose
    ``op_types`` hold a node's op type (in its domain) are asked in table order; the first that matches
    decides (checks it, and rewrites or declines), the later ones are not asked.
    """
    table: dict[tuple[str, str], list[Rule[MatchT, ContextT]]] = {}
    for entry in rules:
        domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
        for op_type in entry.op_types:
            table.setdefault((domain, op_type), []).append(entry)
    outcome = RuleOutcome()
    owners = {body: node for body, (node, _) in body_owners(model).items()}
    if nodes is None:
        visits: Iterable[tuple[ir.Graph | None, ir.Node]] = (
            (graph, node) for graph in list(graphs_of(model, scope)) for node in list(graph)
        )
    else:
        visits = ((node.graph, node) for node in list(nodes))
    for graph, node in visits:
        if graph is None or node.graph is not graph or not _attached(graph, model, owners):
            continue  # removed by an earlier rewrite, itself or with the If/Loop/Scan that held it
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        found = _first_match(table.get((domain, node.op_type), ()), node, ctx)
        if found is None:
            continue
        rule, match = found
        reason = rule.check(match)
        if reason is None:
            kernel = rule.kernel(match)
            problem = kernel.problem(opset) if kernel is not None else None
            reason = Reason("no_kernel", problem) if problem is not None else None
        if reason is not None:
            outcome.declines.append(Decline.of(stage, node_label(node), reason))
            continue
        outcome.rewritten[rule.rewrite(match)] += 1
    return outcome


class RuleTablePass(ir.passes.InPlacePass):
    """A pass that is one rule table over every graph of a model (:func:`apply_rules` at the model's opset).

    The preprocessing passes made of rules whose context is a :class:`RewriteContext` (canonical
    activations, affine folds, slow kernels, ONNX Runtime's fusions undone) differ only in their table
    and their report stage. ``later`` tables are applied after it, in order, each over the graph the
    ones before left (a rule that must see a node before another rule rewrites it). After a call,
    ``rewritten`` counts the rewrites by what they became and ``declined`` lists the matches left as
    they were, with the reason.
    """

    #: The stage the declines are reported under.
    stage: Stage = "canonicalize"

    def __init__(
        self, table: Sequence[Rule[Any, RewriteContext]], *later: Sequence[Rule[Any, RewriteContext]]
    ) -> None:
        super().__init__()
        self.table = tuple(table)
        self.later = tuple(tuple(phase) for phase in later)
        self.rewritten: dict[str, int] = {}
        self.declined: list[Decline] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = RewriteContext.of(model)
        outcome = RuleOutcome()
        for table in (self.table, *self.later):
            outcome.extend(apply_rules(model, table, ctx, stage=self.stage, opset=ctx.opset))
        self.rewritten = dict(outcome.rewritten)
        self.declined = outcome.declines
        return ir.passes.PassResult(model, modified=outcome.modified)
