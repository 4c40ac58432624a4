"""The `Plan` model: a DAG of tool calls, reasoning threads and one final join, with argument references.

A plan is a list of nodes numbered 1, 2, ... . A node's arguments may refer to the outputs of earlier nodes:

- ``$2`` or ``${2}``: the output of node 2. An argument that is exactly one reference takes the output's value
  (any type); references inside a longer string are replaced by the output's text.
- ``$2.field`` (or ``${2}.field``): a field of node 2's output (a mapping key, an attribute, or a list index
  such as ``$2.0``); fields chain (``$2.items.0.title``).

Every reference is a dependency; ``deps`` adds dependencies without a reference. Validation (`Plan.validate`)
checks that ids are unique, references and dependencies exist and point backwards (to an earlier node), the
graph is acyclic, tools exist, literal arguments match the tool's schema (references are checked after
resolution, when the node runs) and that the plan ends with exactly one join. Every violation raises
`PlanError` naming the node and the field.

```python
plan = Plan.from_dict({"nodes": [
    {"id": 1, "tool": "retrieve", "args": ["population of Paris"]},
    {"id": 2, "tool": "retrieve", "args": ["population of Berlin"]},
    {"id": 3, "kind": "thought", "question": "Which city is larger? $1 / $2"},
    {"id": 4, "kind": "join"},
]})
```
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import networkx as nx
import pydantic
import yaml

from ..errors import ConfigError, PlanError, ToolArgumentError
from .protocols import ToolLike, ToolsLike

__all__ = [
    "REFERENCE",
    "NodeKind",
    "Plan",
    "PlanNode",
    "Reference",
    "Repair",
    "ToolLike",
    "ToolsLike",
    "find_references",
    "resolve_value",
]

NodeKind = Literal["tool", "thought", "join"]
_KINDS = ("tool", "thought", "join")

_MAX_ID_DIGITS = 9

REFERENCE = re.compile(r"\$(?:\{(\d+)\}|(\d+))((?:\.[A-Za-z0-9_]+)*)")
"""A reference inside an argument: ``$2``, ``${2}``, ``$2.field``, ``${2}.a.0``."""


@dataclass(frozen=True, slots=True)
class Reference:
    """One ``$N[.field...]`` reference found in an argument.

    Attributes:
        node: the referenced node id.
        path: the field path after the node (``("items", "0")`` for ``$2.items.0``).
        text: the reference as written.
    """

    node: int
    path: tuple[str, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Repair:
    """A fix applied to planner output, recorded so that nothing is changed silently.

    Attributes:
        kind: what was fixed ("missing_join", "duplicate_join", "ref_braces", "trailing_prose", ...).
        detail: what exactly, in words.
        node: the node concerned, if any.
        line: the planner output line concerned, if any.
    """

    kind: str
    detail: str
    node: int | None = None
    line: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "node": self.node, "line": self.line}


def find_references(value: Any) -> list[Reference]:
    """Every reference inside ``value`` (strings, and strings nested in lists and mappings)."""
    found: list[Reference] = []
    _collect(value, found)
    return found


_SCALARS = (int, float, bool, type(None))


def _collect(value: Any, found: list[Reference]) -> None:
    if isinstance(value, str):
        if "$" in value:
            for m in REFERENCE.finditer(value):
                found.append(_ref(m))
    elif isinstance(value, _SCALARS):  # the common case, before the slower ABC check below
        return
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, found)
    elif isinstance(value, Mapping):
        for v in value.values():
            _collect(v, found)


def _ref(m: re.Match[str]) -> Reference:
    number = m.group(1) or m.group(2)
    if len(number.lstrip("0")) > _MAX_ID_DIGITS:
        # int() refuses numbers this long outright (CPython's digit limit); no plan has such a node anyway.
        raise PlanError(f"reference {m.group(0)[:16]}... names a node number of {len(number)} digits; no such node")
    path = tuple(p for p in m.group(3).split(".") if p)
    return Reference(int(number), path, m.group(0))


def _lookup(output: Any, ref: Reference) -> Any:
    value = output
    for i, part in enumerate(ref.path):
        where = f"${ref.node}" + "".join("." + p for p in ref.path[:i])
        if isinstance(value, Mapping):
            if part not in value:
                raise PlanError(f"{where} has no field {part!r} (fields: {sorted(map(str, value))})")
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit():
            if int(part) >= len(value):
                raise PlanError(f"{where} has {len(value)} items; index {part} is out of range")
            value = value[int(part)]
        elif hasattr(value, part) and not part.startswith("_"):
            value = getattr(value, part)
        else:
            raise PlanError(f"{where} ({type(value).__name__}) has no field {part!r}")
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def resolve_value(value: Any, outputs: Mapping[int, Any]) -> Any:
    """``value`` with every reference replaced by the referenced output.

    A string that is exactly one reference becomes the output itself (any type); references inside longer
    strings are replaced by the output's text (JSON for containers). Lists and mappings are resolved item by item.

    Raises:
        PlanError: a reference names a node without an output, or a missing field.
    """
    if isinstance(value, str):
        if "$" not in value:
            return value
        whole = REFERENCE.fullmatch(value)
        if whole is not None:
            ref = _ref(whole)
            return _lookup(_output_of(ref, outputs), ref)

        def sub(m: re.Match[str]) -> str:
            ref = _ref(m)
            return _as_text(_lookup(_output_of(ref, outputs), ref))

        return REFERENCE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: resolve_value(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_value(v, outputs) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve_value(v, outputs) for v in value)
    return value


def _output_of(ref: Reference, outputs: Mapping[int, Any]) -> Any:
    try:
        return outputs[ref.node]
    except KeyError:
        raise PlanError(f"reference {ref.text} names node {ref.node}, which has no output") from None


@dataclass
class PlanNode:
    """One node of a plan.

    Attributes:
        id: the node's number (positive, unique in the plan; references use it).
        kind: "tool" (call ``tool``), "thought" (a reasoning thread answering ``question`` with a search/
            strategy) or "join" (the final node: the answer, from ``answer`` or decided by the joiner).
        tool: the tool name, for tool nodes.
        args: positional arguments (may hold references).
        kwargs: keyword arguments (may hold references).
        question: the thought's question, or the join's answer template (``"$3"``); may hold references.
        deps: dependencies besides the referenced nodes.
        strategy: for a thought, a strategy spec overriding the run's (``{"strategy": "self_consistency", "n": 4}``).
        timeout_s: per-attempt time limit overriding the executor's.
        max_attempts: attempts overriding the executor's retry policy.
    """

    id: int
    kind: NodeKind = "tool"
    tool: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    question: str | None = None
    deps: list[int] = field(default_factory=list)
    strategy: dict[str, Any] | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        where = str(self.id)
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 1:
            raise PlanError(f"id must be a positive integer, got {self.id!r}", node=where, field="id")
        if self.kind not in _KINDS:
            raise PlanError(f"kind must be one of {_KINDS}, got {self.kind!r}", node=where, field="kind")
        if self.kind == "tool":
            if not isinstance(self.tool, str) or not self.tool:
                raise PlanError("a tool node needs a tool name", node=where, field="tool")
        elif self.tool is not None:
            raise PlanError(f"a {self.kind} node takes no tool (got {self.tool!r})", node=where, field="tool")
        if self.kind == "thought" and (not isinstance(self.question, str) or not self.question.strip()):
            raise PlanError("a thought node needs a non-empty question", node=where, field="question")
        if self.question is not None and not isinstance(self.question, str):
            raise PlanError("must be a string", node=where, field="question")
        if isinstance(self.args, tuple):
            self.args = list(self.args)
        if not isinstance(self.args, list):
            raise PlanError(f"must be a list, got {type(self.args).__name__}", node=where, field="args")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise PlanError("must be a mapping with string keys", node=where, field="kwargs")
        self.kwargs = dict(self.kwargs)
        if self.kind != "tool" and (self.args or self.kwargs):
            raise PlanError(f"a {self.kind} node takes no arguments", node=where, field="args")
        if not isinstance(self.deps, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in self.deps
        ):
            raise PlanError(f"must be a list of node ids, got {self.deps!r}", node=where, field="deps")
        self.deps = list(self.deps)
        if self.strategy is not None and (self.kind != "thought" or not isinstance(self.strategy, Mapping)):
            raise PlanError("only a thought node takes a strategy (a mapping)", node=where, field="strategy")
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0
        ):
            raise PlanError(f"must be a positive number, got {self.timeout_s!r}", node=where, field="timeout_s")
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1
        ):
            raise PlanError(f"must be an integer >= 1, got {self.max_attempts!r}", node=where, field="max_attempts")

    # -- references ---------------------------------------------------------------------------------------------
    def references(self) -> list[tuple[str, Reference]]:
        """Every reference with the field it sits in (``"args[0]"``, ``"kwargs.query"``, ``"question"``)."""
        out: list[tuple[str, Reference]] = []
        found: list[Reference] = []
        for i, a in enumerate(self.args):
            _collect(a, found)
            if found:
                out.extend((f"args[{i}]", r) for r in found)
                found = []
        for k, v in self.kwargs.items():
            _collect(v, found)
            if found:
                out.extend((f"kwargs.{k}", r) for r in found)
                found = []
        if self.question is not None:
            _collect(self.question, found)
            out.extend(("question", r) for r in found)
        return out

    def dependencies(self, references: Sequence[tuple[str, Reference]] | None = None) -> list[int]:
        """The nodes this one waits for: referenced ones and ``deps``, in first-mention order, no duplicates.

        Args:
            references: this node's `references` when the caller already has them.
        """
        seen: dict[int, None] = {}
        for _, ref in self.references() if references is None else references:
            seen.setdefault(ref.node, None)
        for d in self.deps:
            seen.setdefault(d, None)
        return list(seen)

    def resolved(self, outputs: Mapping[int, Any]) -> tuple[list[Any], dict[str, Any], str | None]:
        """Arguments and question with references replaced by ``outputs`` (see `resolve_value`).

        Raises:
            PlanError: naming this node and the field when a reference cannot be resolved.
        """
        try:
            args = [resolve_value(a, outputs) for a in self.args]
        except PlanError as err:
            raise PlanError(str(err), node=str(self.id), field="args") from err
        kwargs = {}
        for k, v in self.kwargs.items():
            try:
                kwargs[k] = resolve_value(v, outputs)
            except PlanError as err:
                raise PlanError(str(err), node=str(self.id), field=f"kwargs.{k}") from err
        question = None
        if self.question is not None:
            try:
                question = _as_text(resolve_value(self.question, outputs))
            except PlanError as err:
                raise PlanError(str(err), node=str(self.id), field="question") from err
        return args, kwargs, question

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (only the fields that are set), the inverse of `Plan.from_dict`'s node entries."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        if self.tool is not None:
            out["tool"] = self.tool
        for name in ("args", "kwargs", "deps"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        for name in ("question", "strategy", "timeout_s", "max_attempts"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def describe(self) -> str:
        """A one-line rendering in the LLMCompiler plan syntax (``3. calculator("$1 + $2")``)."""
        if self.kind == "join":
            inner = json.dumps(self.question) if self.question else ""
            return f"{self.id}. join({inner})"
        if self.kind == "thought":
            return f"{self.id}. think({json.dumps(self.question)})"
        parts = [json.dumps(a, default=str) for a in self.args]
        parts += [f"{k}={json.dumps(v, default=str)}" for k, v in self.kwargs.items()]
        return f"{self.id}. {self.tool}({', '.join(parts)})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, index: int | None = None) -> PlanNode:
        """Build a node from a mapping; ``kind`` defaults to "tool" when ``tool`` is given.

        Raises:
            PlanError: unknown keys or invalid values (naming the node and field).
        """
        where = str(data.get("id", index if index is not None else "?")) if isinstance(data, Mapping) else "?"
        if not isinstance(data, Mapping):
            raise PlanError(f"a node must be a mapping, got {type(data).__name__}", node=where)
        known = {"id", "kind", "tool", "args", "kwargs", "question", "deps", "strategy", "timeout_s", "max_attempts"}
        extra = sorted(set(data) - known)
        if extra:
            raise PlanError(f"unknown field(s) {extra}; known: {sorted(known)}", node=where, field=extra[0])
        fields = dict(data)
        if "id" not in fields:
            if index is None:
                raise PlanError("missing id", node=where, field="id")
            fields["id"] = index
        if "kind" not in fields:
            fields["kind"] = "tool" if fields.get("tool") is not None else ("thought" if "question" in fields else "")
        args = fields.get("args", [])
        if isinstance(args, Mapping):  # {"args": {"query": ...}} is keyword arguments
            fields["kwargs"] = {**dict(args), **dict(fields.get("kwargs") or {})}
            fields["args"] = []
        elif args is not None and not isinstance(args, (list, tuple)):
            fields["args"] = [args]
        return cls(**fields)


@dataclass
class Plan:
    """A validated-on-demand DAG of `PlanNode` s ending in one join.

    Attributes:
        nodes: the nodes, dependencies before dependents.
        repairs: fixes applied to the planner output this plan came from (empty for hand-written plans).
        source: the planner output text, when the plan came from an LLM.
    """

    nodes: list[PlanNode] = field(default_factory=list)
    repairs: list[Repair] = field(default_factory=list)
    source: str | None = None

    # -- access -------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PlanNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, node_id: int) -> PlanNode:
        """The node with id ``node_id``.

        Raises:
            PlanError: no such node.
        """
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise PlanError(f"no node {node_id} in the plan (ids: {[n.id for n in self.nodes]})", node=str(node_id))

    @property
    def join(self) -> PlanNode:
        """The final join node.

        Raises:
            PlanError: the plan has no join.
        """
        joins = [n for n in self.nodes if n.kind == "join"]
        if not joins:
            raise PlanError("the plan has no join node", field="kind")
        return joins[-1]

    def work_nodes(self) -> list[PlanNode]:
        """The tool and thought nodes (everything the executor runs)."""
        return [n for n in self.nodes if n.kind != "join"]

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self, tools: ToolsLike | None = None, *, require_join: bool = True) -> Plan:
        """Check the whole plan; returns it for chaining.

        Args:
            tools: the registry tools must exist in (and literal arguments are checked against); None skips
                tool checks.
            require_join: demand exactly one join, as the last node.

        Raises:
            PlanError: the first violation, naming the node and the field.
        """
        if not self.nodes:
            raise PlanError("the plan has no nodes")
        seen: set[int] = set()
        for n in self.nodes:
            check_node(n, seen, tools)
            seen.add(n.id)
        self._check_acyclic()
        if require_join:
            joins = [n for n in self.nodes if n.kind == "join"]
            if len(joins) != 1:
                ids = [j.id for j in joins]
                raise PlanError(f"a plan needs exactly one join node, found {len(joins)} {ids or ''}".rstrip())
            if self.nodes[-1].kind != "join":
                raise PlanError("the join must be the final node", node=str(joins[0].id), field="kind")
        return self

    def _check_acyclic(self) -> None:
        graph = self.graph()
        try:
            cycle = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            return
        path = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
        raise PlanError(f"dependency cycle {path}", node=str(cycle[0][0]), field="deps")

    def graph(self) -> nx.DiGraph[int]:
        """The dependency graph (edge u -> v: v waits for u); the join depends on every other node."""
        graph: nx.DiGraph[int] = nx.DiGraph()
        graph.add_nodes_from(n.id for n in self.nodes)
        work = [n.id for n in self.nodes if n.kind != "join"]
        for n in self.nodes:
            deps = work if n.kind == "join" else n.dependencies()
            graph.add_edges_from((d, n.id) for d in deps if d in graph)
        return graph

    def width(self) -> int:
        """The largest number of nodes that can run at once (the widest topological generation)."""
        return max((len(g) for g in nx.topological_generations(self.graph())), default=0)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_nodes(cls, nodes: Iterable[PlanNode | Mapping[str, Any]], *, add_join: bool = False) -> Plan:
        """A plan from nodes or node mappings (ids default to their position, from 1)."""
        built = [n if isinstance(n, PlanNode) else PlanNode.from_dict(n, index=i) for i, n in enumerate(nodes, start=1)]
        if add_join and not any(n.kind == "join" for n in built):
            built.append(PlanNode(id=max((n.id for n in built), default=0) + 1, kind="join"))
        return cls(nodes=built)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Plan:
        """A plan from ``{"nodes": [...]}`` or a bare list of node mappings (not yet validated).

        Raises:
            PlanError: malformed nodes or unknown keys.
        """
        if isinstance(data, Mapping):
            extra = sorted(set(data) - {"nodes"})
            if extra:
                raise PlanError(f"unknown plan field(s) {extra}; a plan is {{'nodes': [...]}}", field=extra[0])
            if not isinstance(data.get("nodes"), (list, tuple)):
                raise PlanError("a plan needs a 'nodes' list", field="nodes")
            nodes: Sequence[Any] = data["nodes"]
        elif isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise PlanError(f"a plan must be a mapping or a list of nodes, got {type(data).__name__}")
        else:
            nodes = data
        return cls.from_nodes(nodes)

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        """A plan from YAML text (the same shape as `from_dict`).

        Raises:
            PlanError: invalid YAML or a malformed plan.
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PlanError(f"invalid YAML: {err}") from err
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """``{"nodes": [...]}``, the inverse of `from_dict`."""
        return {"nodes": [n.to_dict() for n in self.nodes]}

    def describe(self) -> str:
        """The plan in the LLMCompiler syntax, one node a line (used in replanning prompts)."""
        return "\n".join(n.describe() for n in self.nodes)


def check_node(
    node: PlanNode,
    earlier: set[int] | Mapping[int, Any],
    tools: ToolsLike | None,
    references: Sequence[tuple[str, Reference]] | None = None,
) -> None:
    """Validate one node against the ids before it and the tool registry (used incrementally by executors).

    ``references`` are the node's `PlanNode.references` when the caller already has them.

    Raises:
        PlanError: naming the node and field: an unknown or forward reference, an unknown tool, a literal
            argument that does not match the tool's schema.
    """
    where = str(node.id)
    if node.id in earlier:
        raise PlanError(f"duplicate node id {node.id}", node=where, field="id")
    for fld, ref in node.references() if references is None else references:
        if ref.node == node.id:
            raise PlanError(f"{ref.text} refers to the node itself", node=where, field=fld)
        if ref.node not in earlier:
            raise PlanError(
                f"{ref.text} refers to node {ref.node}, which does not come before this node", node=where, field=fld
            )
    for d in node.deps:
        if d == node.id or d not in earlier:
            raise PlanError(f"dependency {d} does not come before this node", node=where, field="deps")
    if node.kind == "tool" and tools is not None:
        assert node.tool is not None
        if node.tool not in tools:
            # the registry's own error carries the "did you mean" suggestion
            try:
                tools.get(node.tool)
            except ConfigError as err:
                raise PlanError(str(err), node=where, field="tool") from err
            raise PlanError(f"unknown tool {node.tool!r}", node=where, field="tool")
        check_arguments(node, tools.get(node.tool))


def check_arguments(node: PlanNode, tool: ToolLike) -> None:
    """Check a tool node's arguments against the tool: binding (names, count) and the literal values' types.

    Arguments holding references are only checked for presence here; their values are validated after
    resolution, when the node runs.

    Raises:
        PlanError: naming the node and the argument.
    """
    where = str(node.id)
    try:
        named = tool.bind(node.args, node.kwargs)
    except (ConfigError, ToolArgumentError) as err:
        raise PlanError(str(err), node=where, field=_field_of(err, "args")) from err
    literal = {k: v for k, v in named.items() if not find_references(v)}
    if len(literal) == len(named):
        try:
            tool.validate(named)
        except (ConfigError, ToolArgumentError) as err:
            raise PlanError(str(err), node=where, field=_field_of(err, "args")) from err
        return
    model = getattr(tool, "args_model", None)
    model_fields = getattr(model, "model_fields", None)
    if not model_fields:
        return
    # fields are looked up by their alias when they have one (a model may name fields apart from the arguments)
    fields = {info.alias or key: info for key, info in model_fields.items()}
    for name, value in literal.items():
        info = fields.get(name)
        if info is None:
            raise PlanError(f"tool {tool.name!r} has no argument {name!r}", node=where, field=name)
        try:
            _adapter(info).validate_python(value)
        except pydantic.ValidationError as err:
            raise PlanError(
                f"argument {name!r} of tool {tool.name!r} is invalid: {_first_error(err)}", node=where, field=name
            ) from err
    for name, info in fields.items():
        if info.is_required() and name not in named:
            raise PlanError(f"tool {tool.name!r} needs argument {name!r}", node=where, field=name)


_ADAPTERS: dict[int, tuple[Any, Any]] = {}


def _adapter(info: Any) -> Any:
    # keyed by id(); the FieldInfo is kept alive in the entry so the id cannot be reused
    entry = _ADAPTERS.get(id(info))
    if entry is None:
        annotation = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        entry = _ADAPTERS[id(info)] = (pydantic.TypeAdapter(annotation), info)
    return entry[0]


def _first_error(err: pydantic.ValidationError) -> str:
    errors = err.errors(include_url=False)
    return str(errors[0]["msg"]) if errors else str(err)


def _field_of(err: Exception, default: str) -> str:
    value = getattr(err, "field", None)
    return value if isinstance(value, str) and value else default
