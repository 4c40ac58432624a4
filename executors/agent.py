"""The agent loop: plan → execute → join → maybe replan, all under one budget. `run_agent` is the entry point.

```python
from branchwise.executors.agent import run_agent
from branchwise.executors.tools import default_tools

result = await run_agent(
    "Which is older, Ann Lee or Bo Ray?",
    planner="structured",                       # or "llmcompiler", "decompose", a Planner, a Plan
    tools=default_tools(corpus="docs/"),
    engine=engine,
    budget=Budget(max_tokens=50_000),
    thought={"strategy": "self_consistency", "n": 4},
    max_replans=1,
)
print(result.answer, result.llm_calls, result.usage.total_tokens, result.repairs)
```

With the LLMCompiler planner, nodes are dispatched while the plan streams (each task starts the moment its line
is complete); the other planners hand their nodes over as soon as the plan is parsed. The run's events
(``plan_node``, ``node_start``, ``node_end``, ``node_error``, ``plan``, ``join``, ``replan``, ``plan_error``,
``agent_end``) go to the run's event channel (`branchwise.events`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..budget import Budget, BudgetedEngine, UsageSnapshot
from ..engine.base import Engine
from ..errors import ConfigError, PlanError
from ..events import emit
from ..planners import JoinDecision, Joiner, Plan, Planner, Repair, ReplanContext, get_planner
from ..planners.plan import PlanNode, ToolsLike
from .executor import Executor
from .nodes import FailurePolicy, NodeResult, RetryPolicy, ThoughtSpec

__all__ = ["AgentResult", "run_agent"]


@dataclass
class AgentResult:
    """What an agent run produced (the same shape for the DAG agent and the ReAct baseline).

    Attributes:
        answer: the final answer (None when the run produced none).
        plans: every plan made, in order (one per round; empty for ReAct).
        nodes: per round, the node results by node id (for ReAct, one round of steps).
        repairs: every repair applied to planner output, over all rounds.
        decisions: the joiner's decision per round.
        usage: what the whole run cost (planner, nodes, joiner); None until the run ends.
        llm_calls: engine calls made (a call with n samples counts once).
        wall_time_s: seconds from start to answer.
        errors: plan errors met on the way (rounds whose plan could not be made).
        agent: "dag" or "react".
    """

    answer: str | None
    plans: list[Plan] = field(default_factory=list)
    nodes: list[dict[int, NodeResult]] = field(default_factory=list)
    repairs: list[Repair] = field(default_factory=list)
    decisions: list[JoinDecision] = field(default_factory=list)
    usage: UsageSnapshot | None = None
    llm_calls: int = 0
    wall_time_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    agent: str = "dag"

    @property
    def replans(self) -> int:
        """Rounds after the first."""
        return max(len(self.nodes) - 1, 0)

    def node_errors(self) -> list[NodeResult]:
        """Every node that failed or was skipped, over all rounds."""
        return [res for nodes in self.nodes for res in nodes.values() if res.status in ("error", "skipped")]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "agent": self.agent,
            "answer": self.answer,
            "plans": [p.to_dict() for p in self.plans],
            "nodes": [{str(i): r.to_dict() for i, r in nodes.items()} for nodes in self.nodes],
            "repairs": [r.to_dict() for r in self.repairs],
            "decisions": [d.to_dict() for d in self.decisions],
            "usage": self.usage.to_dict() if self.usage is not None else None,
            "llm_calls": self.llm_calls,
            "wall_time_s": self.wall_time_s,
            "errors": self.errors,
        }

    def finish(self, budget: Budget, started: float, **summary: Any) -> AgentResult:
        """Record what the run cost and took, and report ``agent_end`` (with ``summary``)."""
        self.usage = budget.usage.snapshot()
        self.llm_calls = self.usage.calls
        self.wall_time_s = time.perf_counter() - started
        emit(
            "agent_end",
            {"answer": self.answer, "llm_calls": self.llm_calls, "wall_time_s": self.wall_time_s, **summary},
        )
        return self


@dataclass
class _Rounds:
    """The state of one `run_agent` call: what stays fixed across rounds, and the replanning context."""

    query: str
    planner: Planner
    joiner: Joiner
    tools: ToolsLike
    llm: BudgetedEngine
    executor_args: dict[str, Any]
    result: AgentResult
    context: ReplanContext = field(default_factory=ReplanContext)

    async def plan_and_run(self, round_no: int, can_replan: bool) -> tuple[Plan, dict[int, NodeResult]] | None:
        """Plan (dispatching nodes as they come) and run the plan; None when the plan could not be made."""
        executor = Executor(tools=self.tools, **self.executor_args)

        def dispatch(node: PlanNode, repairs: Sequence[Repair]) -> None:
            executor.add(node, repairs=repairs)

        async with executor:
            try:
                plan = await self.planner.plan(
                    self.query, engine=self.llm, tools=self.tools, context=self.context, on_node=dispatch
                )
            except PlanError as err:
                await executor.cancel()
                self.result.errors.append(str(err))
                emit("plan_error", {"round": round_no, "error": str(err), "node": err.node, "field": err.field})
                if not can_replan:
                    raise
                self.replan(round_no, Plan(nodes=[]), {}, f"the previous plan was invalid: {err}")
                return None
            executor.close()
            results = await executor.wait()
        self.result.plans.append(plan)
        self.result.nodes.append(results)
        self.result.repairs.extend(plan.repairs)
        emit(
            "plan",
            {
                "round": round_no,
                "planner": self.planner.kind,
                "nodes": len(plan),
                "width": plan.width(),
                "repairs": [r.to_dict() for r in plan.repairs],
            },
        )
        return plan, results

    async def join(self, round_no: int, can_replan: bool, plan: Plan, results: dict[int, NodeResult]) -> bool:
        """Ask the joiner; True when the run is finished (the answer is recorded)."""
        decision = await self.joiner.decide(self.query, plan, results, engine=self.llm, can_replan=can_replan)
        self.result.decisions.append(decision)
        emit("join", {"round": round_no, **decision.to_dict()})
        if decision.action == "finish":
            self.result.answer = decision.answer
            join = results.get(plan.join.id)
            if join is not None:  # the join "ran": it is the joiner's decision
                join.status, join.output = "ok", decision.answer
            return True
        observations = {i: r.observation() for i, r in results.items() if r.kind != "join"}
        self.replan(round_no, plan, observations, decision.reason)
        return False

    def replan(self, round_no: int, plan: Plan, observations: Mapping[int, str], reason: str) -> None:
        self.context.plans.append(plan)
        self.context.observations.append(observations)
        self.context.reason = reason
        emit("replan", {"round": round_no, "reason": reason})


async def run_agent(
    query: str,
    *,
    planner: str | Planner | Plan | Mapping[str, Any],
    tools: ToolsLike,
    engine: Engine,
    budget: Budget | None = None,
    thought: ThoughtSpec = None,
    max_replans: int = 1,
    concurrency: int = 16,
    joiner: Joiner | None = None,
    failure: FailurePolicy = "continue",
    timeout_s: float | None = None,
    retry: RetryPolicy | None = None,
    thought_context: Mapping[str, Any] | None = None,
) -> AgentResult:
    """Answer ``query`` by planning a DAG, running it, and joining (replanning up to ``max_replans`` times).

    Events of the run go to the current event sink (`branchwise.events.use_sink`).

    Args:
        query: the question.
        planner: a planner name ("llmcompiler", "structured", "decompose"), a spec mapping
            (``{"kind": "structured", "max_steps": 6}``), a `Planner`, or a `Plan` (run as a static plan).
        tools: the tool registry.
        engine: the engine for planning, thoughts and joining.
        budget: the run's `Budget` (every engine call of the run is charged to a child of it); metering only
            when None.
        thought: the strategy of reasoning-thread nodes (a `Strategy`, a name, ``(name, params)`` or
            ``{"strategy": name, **params}``); "single" when None.
        max_replans: how many times the joiner may ask for a new plan (>= 0). A plan the planner could not
            make (`PlanError`) also uses a replan, with the error as feedback.
        concurrency: the most nodes running at once.
        joiner: decides finish or replan (`Joiner()` when None).
        failure: the executor's failure policy; "continue" (default) passes node errors to the joiner,
            "fail_fast" raises `NodeFailedError`.
        timeout_s: per-attempt node time limit.
        retry: the node retry policy.
        thought_context: extra `SearchContext` fields for thoughts (``max_tokens``, ``temperature``, ...).

    Returns:
        An `AgentResult`.

    Raises:
        PlanError: the last allowed plan could not be made.
        NodeFailedError: a node failed under ``failure="fail_fast"``.
        ConfigError: invalid arguments.
    """
    if isinstance(max_replans, bool) or not isinstance(max_replans, int) or max_replans < 0:
        raise ConfigError(f"max_replans must be an integer >= 0, got {max_replans!r}")
    planner_ = get_planner(planner)
    run_budget = budget.child("agent") if budget is not None else Budget(name="agent")
    started = time.perf_counter()
    executor_args = {
        "engine": engine,
        "budget": run_budget,
        "thought": thought,
        "thought_context": thought_context,
        "concurrency": concurrency,
        "timeout_s": timeout_s,
        "retry": retry,
        "failure": failure,
    }
    rounds_state = _Rounds(
        query, planner_, joiner or Joiner(), tools, run_budget.bind(engine), executor_args, AgentResult(answer=None)
    )
    rounds = max_replans + 1 if planner_.replannable else 1
    for round_no in range(1, rounds + 1):
        can_replan = round_no < rounds
        ran = await rounds_state.plan_and_run(round_no, can_replan)
        if ran is not None and await rounds_state.join(round_no, can_replan, *ran):
            break
    return rounds_state.result.finish(run_budget, started, rounds=len(rounds_state.result.nodes))
