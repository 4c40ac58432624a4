"""Decomposition planning (ParallelSearch / HybridDeepSearcher style), and static plans.

`DecomposePlanner` asks the model (structured output) to split the question into independent sub-queries, which
become parallel search nodes, and dependent sub-questions, which become reasoning threads chained after all of
them; the last one feeds the join. `StaticPlanner` returns a fixed plan (declared in Python, a dict or YAML).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest, StructuredOutput
from ..errors import PlanError
from .base import NodeCallback, Planner, ReplanContext
from .plan import Plan, PlanNode, Repair, ToolsLike

__all__ = ["DecomposePlanner", "StaticPlanner", "decomposition_plan"]


def decomposition_plan(
    independent: list[str], dependent: list[str], *, search_tool: str | None, query: str, argument: str = "query"
) -> Plan:
    """The plan for a decomposition: one search node per independent sub-query (parallel), then the dependent
    sub-questions as chained thoughts that see every search result; with none, one thought answers ``query``.

    Args:
        independent: sub-queries that need no other result.
        dependent: sub-questions answered in order after them (each sees the previous one).
        search_tool: the tool each independent sub-query calls; None makes them thoughts too.
        query: the original question.
        argument: the search tool's query argument name.
    """
    nodes: list[PlanNode] = []
    for q in independent:
        i = len(nodes) + 1
        if search_tool is None:
            nodes.append(PlanNode(i, kind="thought", question=q))
        else:
            nodes.append(PlanNode(i, tool=search_tool, kwargs={argument: q}))
    facts = "\n".join(f"- {q}: ${n.id}" for q, n in zip(independent, nodes, strict=True))
    questions = dependent or [query]
    for q in questions:
        i = len(nodes) + 1
        context = f"Facts:\n{facts}\n" if facts else ""
        if i > len(independent) + 1:
            context += f"Previous finding: ${i - 1}\n"
        nodes.append(PlanNode(i, kind="thought", question=f"{context}Question: {q}"))
    nodes.append(PlanNode(len(nodes) + 1, kind="join", question=f"${len(nodes)}"))
    return Plan(nodes=nodes)


_PROMPT = """Split the question into sub-questions.
"independent": searches that can run at the same time (one per entity or fact needed).
"dependent": questions to answer after those searches, in order (the last one answers the question).
Example: for "Which is older, Ann Lee or Bo Ray?" reply
{{"independent": ["Ann Lee birth year", "Bo Ray birth year"], "dependent": ["Who is older, Ann Lee or Bo Ray?"]}}
Question: {question}"""


class DecomposePlanner(Planner):
    """Plans by decomposing the question into independent (parallel) and dependent (chained) sub-questions.

    Args:
        search_tool: the tool for independent sub-queries (a thought when None or not registered).
        argument: that tool's query argument.
        max_independent: the most parallel sub-queries.
        max_dependent: the most chained sub-questions.
        max_tokens: cap on the decomposition's tokens.
    """

    kind = "decompose"

    def __init__(
        self,
        *,
        search_tool: str | None = "retrieve",
        argument: str = "query",
        max_independent: int = 8,
        max_dependent: int = 2,
        max_tokens: int = 256,
    ) -> None:
        self.search_tool = search_tool
        self.argument = argument
        self.max_independent = max_independent
        self.max_dependent = max_dependent
        self.max_tokens = max_tokens

    def request(self, query: str, context: ReplanContext | None) -> GenerationRequest:
        schema = {
            "type": "object",
            "properties": {
                "independent": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 120},
                    "minItems": 1,
                    "maxItems": self.max_independent,
                },
                "dependent": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 160},
                    "maxItems": self.max_dependent,
                },
            },
            "required": ["independent", "dependent"],
            "additionalProperties": False,
        }
        prompt = _PROMPT.format(question=query)
        if context is not None and context.plans:
            prompt = f"{context.render()}\n\n{prompt}"
        return GenerationRequest(
            messages=(ChatMessage("user", prompt),),
            temperature=0.0,
            max_tokens=self.max_tokens,
            structured=StructuredOutput(json_schema=schema),
        )

    async def plan(
        self,
        query: str,
        *,
        engine: Engine,
        tools: ToolsLike,
        context: ReplanContext | None = None,
        on_node: NodeCallback | None = None,
    ) -> Plan:
        request = self.request(query, context)
        if not engine.capabilities.structured_output:
            request = request.replace(structured=None)
        text = (await engine.generate(request)).completions[0].text
        try:
            data = json.loads(text)
            independent = [str(q) for q in data["independent"] if str(q).strip()]
            dependent = [str(q) for q in data.get("dependent", []) if str(q).strip()]
        except (ValueError, KeyError, TypeError) as err:
            raise PlanError(f"the decomposition is not the expected JSON: {text[:200]!r}") from err
        repairs: list[Repair] = []
        unique = list(dict.fromkeys(q.strip() for q in independent))
        if len(unique) < len(independent):
            repairs.append(
                Repair("duplicate_subquery", f"dropped {len(independent) - len(unique)} repeated sub-queries")
            )
            independent = unique
        if len(independent) > self.max_independent:
            repairs.append(Repair("truncated", f"kept the first {self.max_independent} of {len(independent)}"))
            independent = independent[: self.max_independent]
        if not independent:
            raise PlanError("the decomposition has no sub-query", field="independent")
        tool = self.search_tool if self.search_tool is not None and self.search_tool in tools else None
        plan = decomposition_plan(
            independent, dependent[: self.max_dependent], search_tool=tool, query=query, argument=self.argument
        )
        plan.repairs, plan.source = repairs, text
        plan.validate(tools)
        if on_node is not None:
            for node in plan.nodes:
                on_node(node, ())
        return plan


class StaticPlanner(Planner):
    """Returns a fixed plan (validated against the tools on each use).

    Args:
        plan: a `Plan`, a ``{"nodes": [...]}`` mapping or node list, YAML text, or a path to a YAML file.
    """

    kind = "static"
    replannable = False

    def __init__(self, plan: Plan | Mapping[str, Any] | list[Any] | str | Path) -> None:
        if isinstance(plan, Plan):
            self.plan_ = plan
        elif isinstance(plan, Path) or (
            isinstance(plan, str) and "\n" not in plan and plan.endswith((".yaml", ".yml"))
        ):
            path = Path(plan)
            if not path.is_file():
                raise PlanError(f"plan file {str(path)!r} does not exist")
            self.plan_ = Plan.from_yaml(path.read_text(encoding="utf-8"))
        elif isinstance(plan, str):
            self.plan_ = Plan.from_yaml(plan)
        else:
            self.plan_ = Plan.from_dict(plan)

    async def plan(
        self,
        query: str,
        *,
        engine: Engine,
        tools: ToolsLike,
        context: ReplanContext | None = None,
        on_node: NodeCallback | None = None,
    ) -> Plan:
        plan = Plan(nodes=copy.deepcopy(self.plan_.nodes)).validate(tools)  # each run may change its own copy
        if on_node is not None:
            for node in plan.nodes:
                on_node(node, ())
        return plan
