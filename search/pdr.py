"""`pdr`: Parallel-Distill-Refine — rounds of parallel drafts, each distilled into a small bounded workspace
(after the idea of Madaan et al., 2025, "Rethinking Thinking Tokens: LLMs as Improvement Operators").

Round r samples ``m[r]`` drafts in one request (the prompt's KV cache is shared). Round 0 sees the problem only;
every later round sees the problem plus the *workspace* distilled from the round before, never the raw drafts, so
the context stays bounded however many drafts were generated. The workspace is either

- ``"summary"``: an LLM call asked to summarise the drafts (key steps, agreements and disagreements, candidate
  answers); its ``max_tokens`` is ``workspace_tokens``, so the summary can never be longer; or
- ``"topk"``: no LLM call — the ``top_k`` most confident drafts (confidence from logprobs; drafts with an
  answer first), each cut to its last ``workspace_tokens // top_k`` tokens (the conclusion is at the end).

After the last round the strategy either distils once more and samples one refined answer from the workspace
(``final="refine"``) or takes a majority vote over the last round's drafts (``final="vote"``).

Trace tree: drafts are "draft" nodes whose parent is the workspace they were conditioned on (none in round 0);
each workspace is a "distill" node whose parent is the previous workspace (its text is the workspace, its
``scores["workspace_tokens"]`` the size); the final answer is a "refine" node under the last workspace.
Decisions record every round (drafts, answers) and every workspace (size, limit, source drafts).

Budget: when a cap stops the run, the result holds the best answer so far — the refined answer if there is one,
else a vote over the most recent round that finished drafts with answers — and is marked ``budget_exhausted``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.types import ChatMessage
from ..errors import ConfigError
from ..verifiers.confidence import ConfidenceMetric
from .base import Candidate, Result, SearchContext, Strategy, TraceTree
from .registry import MAX_ROUNDS, MAX_SAMPLES, MAX_TOKENS, MAX_TOP_LOGPROBS, MAX_WIDTH, register_strategy
from .sampling import SampledTrace, candidates_of, cluster_votes, pick_answer, sample

__all__ = ["DEFAULT_DISTILL_PROMPT", "DEFAULT_WORKSPACE_PROMPT", "PDR"]

DEFAULT_WORKSPACE_PROMPT = (
    "{question}\n\n"
    "Notes distilled from earlier attempts at this problem (they may contain mistakes):\n"
    "{workspace}\n\n"
    "Use what is right in the notes, fix what is wrong, and solve the problem yourself."
)
"""How a round's drafts see the workspace: it replaces ``{question}`` in the context's prompt template."""

DEFAULT_DISTILL_PROMPT = (
    "Problem:\n{question}\n\n"
    "Here are {count} attempted solutions:\n\n{drafts}\n\n"
    "Final answers given: {answers}\n\n"
    "Write a short summary of these attempts for someone who will solve the problem again: the key steps, where "
    "the attempts agree and where they disagree, any mistakes you notice, and the candidate final answers. "
    "Do not write a new full solution. Keep it under {limit} words."
)
"""The summary request (``distill="summary"``): ``{question}``, ``{count}``, ``{drafts}``, ``{answers}`` (the
tally of extracted answers) and ``{limit}`` (a word limit derived from ``workspace_tokens``)."""

Distill = Literal["summary", "topk"]
FinalMode = Literal["refine", "vote"]

_PLACEHOLDER = re.compile(r"\{(question|workspace|count|drafts|answers|limit)\}")


def _fill(template: str, values: Mapping[str, str]) -> str:
    # One pass, so braces inside the problem or the drafts (LaTeX) are never read as placeholders.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass(frozen=True)
class _Workspace:
    text: str
    node_id: int
    tokens: int


@register_strategy(
    maxima={
        "m": MAX_SAMPLES,
        "rounds": MAX_ROUNDS,
        "workspace_tokens": MAX_TOKENS,
        "top_k": MAX_WIDTH,
        "window": MAX_TOKENS,
        "top_logprobs": MAX_TOP_LOGPROBS,
        "draft_excerpt_tokens": MAX_TOKENS,
    },
    fan_out=lambda s: sum(s.schedule),
)
class PDR(Strategy):
    """Parallel-Distill-Refine over a schedule of draft counts.

    Args:
        m: drafts per round: a schedule such as ``(8, 4, 2)``, or one count used for ``rounds`` rounds.
        rounds: number of rounds when ``m`` is a single count (default 2); must match ``len(m)`` otherwise.
        workspace_tokens: the workspace bound in tokens (the summary's ``max_tokens``, or the total length of
            the top-k excerpts).
        distill: "summary" (an LLM call) or "topk" (the most confident drafts, no LLM call).
        top_k: drafts kept by the "topk" workspace.
        final: "refine" (distil the last round and sample one refined answer) or "vote" (majority vote over the
            last round's drafts).
        confidence: trace confidence ranking drafts for "topk".
        window: group-confidence window in tokens for "topk".
        top_logprobs: alternatives per token requested for "topk" confidence (2..20).
        draft_excerpt_tokens: in the summary request, cut each draft to its last this many tokens (None: whole
            drafts; set it when m drafts would not fit the model's context).
        distill_temperature: temperature of the summary call (None: the context's).
        workspace_prompt: how drafts see the workspace; must contain ``{question}`` and ``{workspace}``.
        distill_prompt: the summary request; must contain ``{drafts}``.
    """

    name = "pdr"

    def __init__(
        self,
        m: int | Sequence[int] = (8, 4, 2),
        *,
        rounds: int | None = None,
        workspace_tokens: int = 256,
        distill: Distill = "summary",
        top_k: int = 2,
        final: FinalMode = "refine",
        confidence: ConfidenceMetric = "lowest_group",
        window: int = 256,
        top_logprobs: int = 5,
        draft_excerpt_tokens: int | None = None,
        distill_temperature: float | None = None,
        workspace_prompt: str = DEFAULT_WORKSPACE_PROMPT,
        distill_prompt: str = DEFAULT_DISTILL_PROMPT,
    ) -> None:
        self.schedule = _schedule(m, rounds)
        if _bad_int(workspace_tokens, 1):
            raise ConfigError(f"pdr: workspace_tokens must be an integer >= 1, got {workspace_tokens!r}")
        if distill not in ("summary", "topk"):
            raise ConfigError(f"pdr: distill must be 'summary' or 'topk', got {distill!r}")
        if _bad_int(top_k, 1) or top_k > workspace_tokens:
            raise ConfigError(f"pdr: top_k must be an integer in 1..workspace_tokens, got {top_k!r}")
        if final not in ("refine", "vote"):
            raise ConfigError(f"pdr: final must be 'refine' or 'vote', got {final!r}")
        if _bad_int(window, 1) or _bad_int(top_logprobs, 2) or top_logprobs > 20:
            raise ConfigError("pdr: window must be >= 1 and top_logprobs in 2..20")
        if draft_excerpt_tokens is not None and _bad_int(draft_excerpt_tokens, 1):
            raise ConfigError(
                f"pdr: draft_excerpt_tokens must be an integer >= 1 or None, got {draft_excerpt_tokens!r}"
            )
        if distill_temperature is not None and distill_temperature < 0:
            raise ConfigError(f"pdr: distill_temperature must be >= 0, got {distill_temperature}")
        if "{question}" not in workspace_prompt or "{workspace}" not in workspace_prompt:
            raise ConfigError("pdr: workspace_prompt must contain '{question}' and '{workspace}'")
        if "{drafts}" not in distill_prompt:
            raise ConfigError("pdr: distill_prompt must contain '{drafts}'")
        self.workspace_tokens = workspace_tokens
        self.distill = distill
        self.top_k = top_k
        self.final = final
        self.confidence = confidence
        self.window = window
        self.top_logprobs = top_logprobs
        self.draft_excerpt_tokens = draft_excerpt_tokens
        self.distill_temperature = distill_temperature
        self.workspace_prompt = workspace_prompt
        self.distill_prompt = distill_prompt

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        decisions: list[dict[str, Any]] = []
        candidates: list[Candidate] = []
        latest: list[Candidate] = []  # answered drafts of the most recent round that had any
        workspace: _Workspace | None = None
        exhausted = False
        ready_to_refine = False
        topk = self.distill == "topk"
        draft_extra: dict[str, Any] = {"logprobs": self.top_logprobs} if topk else {}

        for round_no, m in enumerate(self.schedule):
            question = problem if workspace is None else self._conditioned(problem, workspace)
            traces, exhausted = await sample(ctx, question, tree, n=m, kind="draft", **draft_extra)
            for trace in traces:
                trace.node.parent = None if workspace is None else workspace.node_id
            round_candidates = candidates_of(traces, confidence=self.confidence if topk else None, window=self.window)
            candidates.extend(round_candidates)
            answered = [c for c in round_candidates if c.answer is not None]
            if answered:
                latest = answered
            decisions.append(
                {
                    "event": "round",
                    "round": round_no,
                    "drafts": m,
                    "finished": len(round_candidates),
                    "answers": [c.answer for c in round_candidates],
                    "workspace_tokens_in": 0 if workspace is None else workspace.tokens,
                }
            )
            if exhausted or not round_candidates:
                break
            if round_no == len(self.schedule) - 1 and self.final == "vote":
                break
            finished = [t for t in traces if t.finished]
            parent = None if workspace is None else workspace.node_id
            if topk:
                workspace = self._topk(finished, tree=tree, parent=parent, round_no=round_no, decisions=decisions)
            else:
                workspace, exhausted = await self._summarize(
                    ctx, problem, finished, tree=tree, parent=parent, round_no=round_no, decisions=decisions
                )
                if exhausted:
                    break
            ready_to_refine = round_no == len(self.schedule) - 1

        refined: Candidate | None = None
        if ready_to_refine and workspace is not None:
            question = self._conditioned(problem, workspace)
            (trace,), exhausted = await sample(ctx, question, tree, n=1, kind="refine")
            trace.node.parent = workspace.node_id
            if trace.finished:
                refined = candidates_of([trace])[0]
                candidates.append(refined)

        if refined is not None and refined.answer is not None:
            answer: str | None = refined.answer
            votes = {refined.answer: 1.0}
            source = "refine"
        else:
            votes = await cluster_votes([(c.answer, 1.0) for c in latest if c.answer is not None], ctx.grader)
            answer = pick_answer(votes)
            source = "vote"
        decisions.append({"event": "final", "mode": self.final, "source": source, "answer": answer})
        return Result(self.name, answer, candidates, votes, tree, ctx.usage(), exhausted, decisions)

    # -- workspace --------------------------------------------------------------------------------------------
    def _conditioned(self, problem: str, workspace: _Workspace) -> str:
        return _fill(self.workspace_prompt, {"question": problem, "workspace": workspace.text})

    async def _summarize(
        self,
        ctx: SearchContext,
        problem: str,
        drafts: list[SampledTrace],
        *,
        tree: TraceTree,
        parent: int | None,
        round_no: int,
        decisions: list[dict[str, Any]],
    ) -> tuple[_Workspace | None, bool]:
        """Distil the drafts with one LLM call whose ``max_tokens`` is the workspace bound."""
        shown = []
        for i, draft in enumerate(drafts, 1):
            text = draft.text.strip()
            if self.draft_excerpt_tokens is not None:
                text, _ = _tail(draft, self.draft_excerpt_tokens)
            shown.append(f"Solution {i}:\n{text}")
        votes = await cluster_votes([(d.node.answer or "none", 1.0) for d in drafts], ctx.grader)
        tally = ", ".join(f"{a} ({int(w)} of {len(drafts)})" for a, w in votes.items())
        user = _fill(
            self.distill_prompt,
            {
                "question": problem,
                "count": str(len(drafts)),
                "drafts": "\n\n".join(shown),
                "answers": tally,
                "limit": str(max(1, self.workspace_tokens * 3 // 4)),  # about 0.75 words per token
            },
        )
        messages: list[ChatMessage] = []
        if ctx.prompt.system:
            messages.append(ChatMessage("system", ctx.prompt.system))
        messages.append(ChatMessage("user", user))
        overrides: dict[str, Any] = {"messages": tuple(messages), "max_tokens": self.workspace_tokens}
        if self.distill_temperature is not None:
            overrides["temperature"] = self.distill_temperature
        (trace,), exhausted = await sample(ctx, problem, tree, n=1, kind="distill", **overrides)
        node = trace.node
        node.parent = parent
        node.answer = None  # a summary is not a solution; its numbers must not count as one
        node.scores["workspace_tokens"] = float(node.tokens)
        sources = [d.node.id for d in drafts]
        node.detail = f"summary of drafts {sources}"
        decisions.append(
            {
                "event": "workspace",
                "round": round_no,
                "mode": "summary",
                "tokens": node.tokens,
                "limit": self.workspace_tokens,
                "sources": sources,
                "truncated": trace.finish_reason == "length",
                "completed": trace.finished,
            }
        )
        text = trace.text.strip()
        if not trace.finished or not text:
            return None, exhausted
        return _Workspace(text, node.id, node.tokens), exhausted

    def _topk(
        self,
        drafts: list[SampledTrace],
        *,
        tree: TraceTree,
        parent: int | None,
        round_no: int,
        decisions: list[dict[str, Any]],
    ) -> _Workspace:
        """The most confident drafts, each cut to an equal share of the bound; no engine call."""
        key = f"confidence_{self.confidence}"

        def rank(trace: SampledTrace) -> tuple[bool, float]:
            value = trace.node.scores.get(key)
            return trace.node.answer is not None, -math.inf if value is None or math.isnan(value) else value

        chosen = sorted(drafts, key=rank, reverse=True)[: self.top_k]
        share = self.workspace_tokens // len(chosen)
        parts, used = [], 0
        for i, draft in enumerate(chosen, 1):
            excerpt, tokens = _tail(draft, share)
            used += tokens
            parts.append(f"Attempt {i} (answer: {draft.node.answer or 'none'}):\n{excerpt}")
        node = tree.open("distill", parent=parent)
        node.text = "\n\n".join(parts)
        node.scores["workspace_tokens"] = float(used)
        sources = [d.node.id for d in chosen]
        tree.close(node, "finished", detail=f"top-{len(chosen)} drafts by {key}: {sources}")
        decisions.append(
            {
                "event": "workspace",
                "round": round_no,
                "mode": "topk",
                "tokens": used,
                "limit": self.workspace_tokens,
                "sources": sources,
                "confidences": [d.node.scores.get(key) for d in chosen],
            }
        )
        return _Workspace(node.text, node.id, used)


def _tail(trace: SampledTrace, limit: int) -> tuple[str, int]:
    """The last ``limit`` tokens of a trace's text (a solution's conclusion is at its end) and their count.

    Token boundaries come from the trace's logprobs when it has one per token; otherwise the cut is estimated
    from the trace's average characters per token.
    """
    text, tokens = trace.text, trace.node.tokens
    if tokens <= limit:
        return text.strip(), tokens
    if len(trace.logprobs) == tokens:
        chars = sum(len(lp.token) for lp in trace.logprobs[-limit:])
    else:
        chars = math.ceil(len(text) * limit / tokens)
    return "..." + text[max(0, len(text) - chars) :].strip(), limit


def _bad_int(value: Any, low: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < low


def _schedule(m: int | Sequence[int], rounds: int | None) -> tuple[int, ...]:
    if rounds is not None and _bad_int(rounds, 1):
        raise ConfigError(f"pdr: rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(m, int) and not isinstance(m, bool):
        if m < 1:
            raise ConfigError(f"pdr: m must be >= 1, got {m}")
        return (m,) * (2 if rounds is None else rounds)
    if isinstance(m, (str, bytes)) or not isinstance(m, Sequence):
        raise ConfigError(f"pdr: m must be an integer or a sequence of integers, got {m!r}")
    schedule = tuple(m)
    if not schedule or any(_bad_int(x, 1) for x in schedule):
        raise ConfigError(f"pdr: m must be a non-empty list of integers >= 1, got {m!r}")
    if rounds is not None and rounds != len(schedule):
        raise ConfigError(f"pdr: rounds={rounds} does not match the schedule m={list(schedule)}")
    return schedule
