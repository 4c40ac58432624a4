"""Plan references in detail (gaps found by mutation testing, `make mutation`): long node numbers, the text a
reference records, field and index lookups and their messages, outputs as text inside strings, tuples, and the
node and field named when a reference cannot be resolved or checked."""

from __future__ import annotations

import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from branchwise.errors import PlanError
from branchwise.planners.plan import PlanNode, check_node, find_references, resolve_value

# -- parsing --------------------------------------------------------------------------------------------------------


def test_a_reference_records_the_text_it_was_written_as() -> None:
    (braced, bare) = find_references("compare ${2}.items.0 with $3 please")
    assert (braced.node, braced.path, braced.text) == (2, ("items", "0"), "${2}.items.0")
    assert (bare.node, bare.path, bare.text) == (3, (), "$3")


def test_node_numbers_up_to_nine_digits_parse_and_longer_ones_are_refused() -> None:
    (ref,) = find_references("$123456789")
    assert ref.node == 123456789
    (padded,) = find_references("$000000000012")  # leading zeros do not count
    assert padded.node == 12
    with pytest.raises(PlanError) as caught:
        find_references("$1234567890")
    assert str(caught.value) == "reference $1234567890... names a node number of 10 digits; no such node"
    with pytest.raises(PlanError) as caught:
        find_references("${12345678901234567890}")
    assert str(caught.value) == "reference ${12345678901234... names a node number of 20 digits; no such node"


# -- lookups --------------------------------------------------------------------------------------------------------


def test_fields_indexes_and_attributes_are_looked_up() -> None:
    outputs: dict[int, Any] = {1: {"a": {"b": [10, 20]}}, 2: SimpleNamespace(name="Ada", _secret="x"), 3: (7, 8)}
    assert resolve_value("$1.a.b.1", outputs) == 20
    assert resolve_value("$2.name", outputs) == "Ada"
    assert resolve_value("$3.1", outputs) == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$1.a.zz", "$1.a has no field 'zz' (fields: ['b'])"),
        ("$1.a.b.2", "$1.a.b has 2 items; index 2 is out of range"),
        ("$2._secret", "$2 (SimpleNamespace) has no field '_secret'"),
        ("$2.missing", "$2 (SimpleNamespace) has no field 'missing'"),
        ("$2.0", "$2 (SimpleNamespace) has no field '0'"),
        ("$4", "reference $4 names node 4, which has no output"),
    ],
)
def test_lookups_that_fail_say_where(text: str, message: str) -> None:
    outputs: dict[int, Any] = {1: {"a": {"b": [10, 20]}}, 2: SimpleNamespace(name="Ada", _secret="x")}
    with pytest.raises(PlanError) as caught:
        resolve_value(text, outputs)
    assert str(caught.value) == message


# -- outputs inside longer strings ----------------------------------------------------------------------------------


def test_containers_inside_text_are_json_keeping_non_ascii_and_stringifying_the_rest() -> None:
    outputs: dict[int, Any] = {1: {"city": "Zürich"}, 2: {"when": datetime.date(2024, 1, 2)}, 3: ["a", 1]}
    assert resolve_value("see $1", outputs) == 'see {"city": "Zürich"}'
    assert resolve_value("on $2", outputs) == 'on {"when": "2024-01-02"}'
    assert resolve_value("list $3", outputs) == 'list ["a", 1]'


def test_a_container_json_cannot_encode_falls_back_to_its_str() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert resolve_value("x $1", {1: loop}) == "x [[...]]"


def test_tuples_are_resolved_item_by_item() -> None:
    assert resolve_value(("$1", "b", ["$1"]), {1: 5}) == (5, "b", [5])


# -- a node's references, resolution and check ----------------------------------------------------------------------


def test_references_name_the_field_they_sit_in() -> None:
    tool = PlanNode(4, tool="search", args=["$1"], kwargs={"q": "$2 and $3", "r": "$1", "s": "plain"})
    assert [(field, ref.node) for field, ref in tool.references()] == [
        ("args[0]", 1),
        ("kwargs.q", 2),
        ("kwargs.q", 3),
        ("kwargs.r", 1),
    ]
    thought = PlanNode(5, kind="thought", question="Is $4 bigger than $2?")
    assert [(field, ref.node) for field, ref in thought.references()] == [("question", 4), ("question", 2)]


def test_resolved_arguments_and_question() -> None:
    tool = PlanNode(3, tool="search", args=["$1"], kwargs={"q": "about $2"})
    assert tool.resolved({1: [1, 2], 2: "x"}) == ([[1, 2]], {"q": "about x"}, None)
    thought = PlanNode(4, kind="thought", question="$1")
    assert thought.resolved({1: {"n": 1}}) == ([], {}, '{"n": 1}')  # the question is always text


@pytest.mark.parametrize(
    ("node", "field"),
    [
        (PlanNode(3, tool="search", args=["$1"]), "args"),
        (PlanNode(3, tool="search", kwargs={"q": "$1"}), "kwargs.q"),
        (PlanNode(3, kind="thought", question="why $1?"), "question"),
    ],
)
def test_an_unresolvable_reference_names_the_node_and_field(node: PlanNode, field: str) -> None:
    with pytest.raises(PlanError) as caught:
        node.resolved({})
    assert (caught.value.node, caught.value.field) == ("3", field)
    assert str(caught.value) == f"node 3, field {field!r}: reference $1 names node 1, which has no output"


def test_check_node_accepts_earlier_dependencies_and_names_an_unknown_tool() -> None:
    check_node(PlanNode(2, tool="search", deps=[1]), {1}, None)
    with pytest.raises(PlanError) as caught:
        check_node(PlanNode(2, tool="search", deps=[2]), {1}, None)
    assert caught.value.field == "deps"
    tools: dict[str, Any] = {}  # a registry whose get() answers None instead of raising
    with pytest.raises(PlanError) as caught:
        check_node(PlanNode(2, tool="search"), {1}, tools)  # type: ignore[arg-type]
    assert (str(caught.value), caught.value.node, caught.value.field) == (
        "node 2, field 'tool': unknown tool 'search'",
        "2",
        "tool",
    )
