"""Plan model: references, validation (networkx), construction from dicts and YAML."""

from __future__ import annotations

from typing import Any

import pytest
from tool_fakes import FakeRegistry

from branchwise.errors import PlanError
from branchwise.planners.plan import Plan, PlanNode, find_references, resolve_value


def retrieve(query: str, k: int = 3) -> list[str]:
    return [f"doc about {query}"] * k


def add(a: float, b: float) -> float:
    return a + b


TOOLS = FakeRegistry(retrieve, add)


def test_references_forms() -> None:
    refs = find_references("compare $1 and ${2} then $3.items.0, not $ or $x")
    assert [(r.node, r.path) for r in refs] == [(1, ()), (2, ()), (3, ("items", "0"))]
    assert find_references({"a": ["$4"], "b": 5}) == [find_references("$4")[0]]


def test_resolution_keeps_types_for_whole_references_and_interpolates_in_strings() -> None:
    outputs = {1: 41, 2: {"name": "Paris", "pop": [1, 2]}, 3: "x"}
    assert resolve_value("$1", outputs) == 41
    assert resolve_value("${2}.name", outputs) == "Paris"
    assert resolve_value("$2.pop.1", outputs) == 2
    assert resolve_value("$1 and ${3} and $2.name", outputs) == "41 and x and Paris"
    assert resolve_value(["$1", {"k": "$3"}], outputs) == [41, {"k": "x"}]
    with pytest.raises(PlanError, match="no field 'size'"):
        resolve_value("$2.size", outputs)
    with pytest.raises(PlanError, match="out of range"):
        resolve_value("$2.pop.5", outputs)
    with pytest.raises(PlanError, match="node 9"):
        resolve_value("$9", outputs)


def test_multi_digit_references_name_the_whole_number() -> None:
    """``$12`` is node 12, never node 1 followed by the text "2" (plans with ten or more nodes)."""
    refs = find_references("add $12 to $1, then ${10}.total and $11.items.3")
    assert [(r.node, r.path) for r in refs] == [(12, ()), (1, ()), (10, ("total",)), (11, ("items", "3"))]
    outputs = {1: "one", 10: {"total": 7}, 11: {"items": [0, 1, 2, 3]}, 12: 1200}
    assert resolve_value("$12", outputs) == 1200
    assert resolve_value("$12/$1 ${10}.total $11.items.3", outputs) == "1200/one 7 3"
    nodes: list[dict[str, Any]] = [{"id": i, "tool": "retrieve", "args": [f"q{i}"]} for i in range(1, 13)]
    nodes += [{"id": 13, "tool": "add", "args": ["$12", "$10"]}, {"id": 14, "kind": "join", "question": "$13"}]
    plan = _plan(*nodes).validate(TOOLS)
    assert plan.node(13).dependencies() == [12, 10]
    assert plan.node(14).dependencies() == [13]


def test_node_resolved_names_the_field() -> None:
    node = PlanNode(3, tool="add", args=["$1"], kwargs={"b": "$2.missing"})
    with pytest.raises(PlanError) as info:
        node.resolved({1: 1, 2: {"x": 1}})
    assert info.value.node == "3" and info.value.field == "kwargs.b"


def _plan(*nodes: dict[str, Any]) -> Plan:
    return Plan.from_dict({"nodes": list(nodes)})


GOOD = [
    {"id": 1, "tool": "retrieve", "args": ["Paris"]},
    {"id": 2, "tool": "retrieve", "kwargs": {"query": "Berlin", "k": 2}},
    {"id": 3, "kind": "thought", "question": "Which is bigger, $1 or $2?"},
    {"id": 4, "tool": "add", "args": ["$1.0", 2]},
    {"id": 5, "kind": "join"},
]


def test_valid_plan_passes_and_graph_has_join_after_everything() -> None:
    plan = _plan(*GOOD).validate(TOOLS)
    graph = plan.graph()
    assert set(graph.predecessors(5)) == {1, 2, 3, 4}
    assert set(graph.predecessors(3)) == {1, 2}
    assert plan.width() == 2
    assert plan.join.id == 5
    assert [n.id for n in plan.work_nodes()] == [1, 2, 3, 4]
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


@pytest.mark.parametrize(
    ("nodes", "node", "field", "message"),
    [
        ([{"id": 1, "tool": "retrieve", "args": ["$2"]}, {"id": 2, "kind": "join"}], "1", "args[0]", "before"),
        ([{"id": 1, "tool": "retrieve", "args": ["$1"]}, {"id": 2, "kind": "join"}], "1", "args[0]", "itself"),
        ([{"id": 1, "tool": "retreive", "args": ["x"]}, {"id": 2, "kind": "join"}], "1", "tool", "retrieve"),
        (
            [{"id": 1, "tool": "retrieve", "args": ["x"], "kwargs": {"kk": 1}}, {"id": 2, "kind": "join"}],
            "1",
            "kk",
            "unknown",
        ),
        (
            [{"id": 1, "tool": "retrieve", "kwargs": {"query": "x", "k": "many"}}, {"id": 2, "kind": "join"}],
            "1",
            "k",
            "integer",
        ),
        ([{"id": 1, "tool": "add", "args": ["$0", "zz"]}], "1", "args[0]", "before"),
        (
            [
                {"id": 1, "tool": "retrieve", "args": ["a"]},
                {"id": 2, "tool": "add", "args": ["$1"]},
                {"id": 3, "kind": "join"},
            ],
            "2",
            "b",
            "needs argument",
        ),
        (
            [
                {"id": 1, "tool": "retrieve", "args": ["a"]},
                {"id": 2, "tool": "add", "args": ["$1", "two"]},
                {"id": 3, "kind": "join"},
            ],
            "2",
            "b",
            "invalid",
        ),
        (
            [
                {"id": 1, "tool": "retrieve", "args": ["a"]},
                {"id": 1, "tool": "retrieve", "args": ["b"]},
                {"id": 2, "kind": "join"},
            ],
            "1",
            "id",
            "duplicate",
        ),
        (
            [{"id": 1, "tool": "retrieve", "args": ["a"], "deps": [3]}, {"id": 3, "kind": "join"}],
            "1",
            "deps",
            "dependency 3",
        ),
    ],
)
def test_violations_name_node_and_field(nodes: list[dict[str, Any]], node: str, field: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        _plan(*nodes).validate(TOOLS)
    assert info.value.node == node
    assert info.value.field == field


def test_join_rules() -> None:
    with pytest.raises(PlanError, match="exactly one join"):
        _plan({"id": 1, "tool": "retrieve", "args": ["a"]}).validate(TOOLS)
    with pytest.raises(PlanError, match="exactly one join"):
        _plan({"id": 1, "kind": "join"}, {"id": 2, "kind": "join"}).validate(TOOLS)
    with pytest.raises(PlanError, match="final node") as info:
        _plan({"id": 1, "kind": "join"}, {"id": 2, "tool": "retrieve", "args": ["a"]}).validate(TOOLS)
    assert info.value.node == "1"
    _plan({"id": 1, "tool": "retrieve", "args": ["a"]}).validate(TOOLS, require_join=False)


def test_cycles_are_found_by_networkx() -> None:
    plan = Plan(nodes=[PlanNode(1, tool="retrieve", args=["a"]), PlanNode(2, tool="retrieve", args=["b"])])
    plan.nodes[0].deps = [2]
    plan.nodes[1].deps = [1]
    with pytest.raises(PlanError):
        plan.validate(TOOLS, require_join=False)
    with pytest.raises(PlanError, match="cycle"):
        plan._check_acyclic()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"id": 0, "tool": "x"}, "id"),
        ({"id": 1, "kind": "tool"}, "tool"),
        ({"id": 1, "kind": "thought"}, "question"),
        ({"id": 1, "kind": "join", "tool": "x"}, "tool"),
        ({"id": 1, "kind": "loop", "tool": "x"}, "kind"),
        ({"id": 1, "tool": "x", "bogus": 1}, "bogus"),
        ({"id": 1, "tool": "x", "deps": ["a"]}, "deps"),
        ({"id": 1, "tool": "x", "timeout_s": -1}, "timeout_s"),
        ({"id": 1, "kind": "thought", "question": "q", "max_attempts": 0}, "max_attempts"),
        ({"id": 1, "tool": "x", "strategy": {"strategy": "single"}}, "strategy"),
    ],
)
def test_malformed_nodes(data: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanError) as info:
        PlanNode.from_dict(data)
    assert info.value.field == field


def test_yaml_and_python_static_plans() -> None:
    plan = Plan.from_yaml(
        """
nodes:
  - {id: 1, tool: retrieve, args: [Paris]}
  - {id: 2, tool: retrieve, args: {query: Berlin}}
  - {id: 3, kind: thought, question: "Compare $1 with $2", strategy: {strategy: self_consistency, n: 4}}
  - {id: 4, kind: join, question: "$3"}
"""
    ).validate(TOOLS)
    assert plan.node(2).kwargs == {"query": "Berlin"}
    assert plan.node(3).strategy == {"strategy": "self_consistency", "n": 4}
    assert plan.describe().splitlines()[0] == '1. retrieve("Paris")'
    built = Plan.from_nodes([{"tool": "retrieve", "args": ["a"]}, {"tool": "add", "args": ["$1.0", 1]}], add_join=True)
    assert [n.id for n in built] == [1, 2, 3] and built.validate(TOOLS).join.id == 3
    with pytest.raises(PlanError, match="invalid YAML"):
        Plan.from_yaml("nodes: [")
    with pytest.raises(PlanError, match="nodes"):
        Plan.from_dict({"steps": []})
    with pytest.raises(PlanError, match="no nodes"):
        Plan().validate()
