"""The joiner: after a plan has run, decide to finish (with an answer) or to plan again.

Decisions, cheapest first:

1. The join has an answer template (``join($3)``) whose references all succeeded: that is the answer, no LLM
   call.
2. The joiner asks the model (structured output ``{"action": "finish" | "replan", "answer": ...}``) with the
   question and every node's observation. When no replan is left, only "finish" is allowed.
3. ``use_llm=False``: the answer is the output of the last successful node (the plan's sink); a replan is asked
   for when nothing succeeded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest, StructuredOutput
from ..errors import PlanError
from .plan import Plan, find_references

__all__ = ["JoinDecision", "Joiner", "NodeOutcome"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinDecision:
    """What the joiner decided.

    Attributes:
        action: "finish" or "replan".
        answer: the final answer (for "finish"), or None.
        reason: why a new plan is needed (for "replan"), or how the answer was chosen.
        llm: whether an LLM call was made.
    """

    action: Literal["finish", "replan"]
    answer: str | None
    reason: str = ""
    llm: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "answer": self.answer, "reason": self.reason, "llm": self.llm}


class NodeOutcome(Protocol):
    """What the joiner reads of a node's result (the executor's `NodeResult` is one)."""

    @property
    def status(self) -> str: ...

    @property
    def output(self) -> Any: ...

    def observation(self) -> str: ...


_PROMPT = """Question: {question}

Results of the plan:
{observations}

{instruction}"""


class Joiner:
    """Decides finish or replan from a plan's results.

    Args:
        use_llm: ask the model (else pick the sink node's output).
        max_tokens: cap on the decision's tokens.
        max_answer_chars: the longest answer the model may write.
    """

    def __init__(self, *, use_llm: bool = True, max_tokens: int = 96, max_answer_chars: int = 160) -> None:
        self.use_llm = use_llm
        self.max_tokens = max_tokens
        self.max_answer_chars = max_answer_chars

    async def decide(
        self, question: str, plan: Plan, results: Mapping[int, NodeOutcome], *, engine: Engine, can_replan: bool
    ) -> JoinDecision:
        """Decide for ``plan`` whose node results are ``results`` (`NodeResult` by id)."""
        template = plan.join.question
        outputs = {i: r.output for i, r in results.items() if r.status == "ok"}
        if template:
            refs = find_references(template)
            if all(ref.node in outputs for ref in refs):
                try:
                    _, _, answer = plan.join.resolved(outputs)
                except PlanError as err:
                    logger.info("join template could not be resolved: %s", err)
                else:
                    return JoinDecision("finish", answer, reason="join answer template")
        if not self.use_llm:
            return self._sink(plan, results, can_replan)
        return await self._ask(question, plan, results, engine=engine, can_replan=can_replan)

    def _sink(self, plan: Plan, results: Mapping[int, NodeOutcome], can_replan: bool) -> JoinDecision:
        for node in reversed(plan.work_nodes()):
            r = results.get(node.id)
            if r is not None and r.status == "ok":
                text = r.output if isinstance(r.output, str) else json.dumps(r.output, default=str)
                return JoinDecision("finish", text, reason=f"output of node {node.id}")
        if can_replan:
            return JoinDecision("replan", None, reason="no node succeeded")
        return JoinDecision("finish", None, reason="no node succeeded")

    def request(
        self, question: str, plan: Plan, results: Mapping[int, NodeOutcome], *, can_replan: bool
    ) -> GenerationRequest:
        lines = []
        for node in plan.work_nodes():
            r = results.get(node.id)
            obs = r.observation() if r is not None else "(not run)"
            lines.append(f"{node.describe()}\n   -> {obs}")
        instruction = (
            'Reply with JSON {"action": "finish", "answer": <the short final answer>} if the results answer the '
            'question, or {"action": "replan", "answer": <what is missing>} if a new plan is needed.'
            if can_replan
            else 'Reply with JSON {"action": "finish", "answer": <the short final answer>}.'
        )
        actions = ["finish", "replan"] if can_replan else ["finish"]
        schema = {
            "type": "object",
            "properties": {
                "action": {"enum": actions},
                "answer": {"type": "string", "maxLength": self.max_answer_chars},
            },
            "required": ["action", "answer"],
            "additionalProperties": False,
        }
        prompt = _PROMPT.format(question=question, observations="\n".join(lines), instruction=instruction)
        return GenerationRequest(
            messages=(ChatMessage("user", prompt),),
            temperature=0.0,
            max_tokens=self.max_tokens,
            structured=StructuredOutput(json_schema=schema),
        )

    async def _ask(
        self, question: str, plan: Plan, results: Mapping[int, NodeOutcome], *, engine: Engine, can_replan: bool
    ) -> JoinDecision:
        request = self.request(question, plan, results, can_replan=can_replan)
        if not engine.capabilities.structured_output:
            request = request.replace(structured=None)
        generation = await engine.generate(request)
        text = generation.completions[0].text.strip()
        try:
            data = json.loads(text)
            action = data["action"]
            answer = data.get("answer")
            if action not in ("finish", "replan"):
                raise ValueError(action)
        except (ValueError, KeyError, TypeError):
            logger.info("joiner output is not the decision JSON; using it as the answer: %r", text[:200])
            return JoinDecision("finish", text or None, reason="unstructured joiner output", llm=True)
        answer = str(answer) if answer is not None else None
        if action == "replan" and can_replan:
            return JoinDecision("replan", None, reason=answer or "the joiner asked for a new plan", llm=True)
        return JoinDecision("finish", answer, reason="joiner", llm=True)
