"""What every test-time-scaling strategy shares: the context it runs in, its result, and its trace tree.

A `Strategy` turns one problem into a `Result` using the engine, verifiers and budget in a `SearchContext`.
Every trace it opens is a node of a `TraceTree` that records how the trace ended (finished, pruned by which
rule and after how many tokens, cut by the budget), so a run can be inspected afterwards.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..budget import Budget, UsageSnapshot
from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest
from ..errors import ConfigError
from ..events import LiveRef, emit
from ..verifiers.extraction import AnswerExtractor
from ..verifiers.grading import BaseGrader, NumericGrader

__all__ = [
    "Candidate",
    "PromptTemplate",
    "Result",
    "SearchContext",
    "Strategy",
    "TraceNode",
    "TraceStatus",
    "TraceTree",
]

TraceStatus = Literal["running", "finished", "pruned", "budget", "error"]
_TREE_IDS = itertools.count(1)


@dataclass
class TraceNode:
    """One trace (a sample, a beam step, a draft...) in a strategy's search.

    Attributes:
        id: position in the tree.
        parent: the node it continues, if any.
        kind: what it is ("sample", "probe", "step", "draft", "refine", "verify", ...).
        status: "running", "finished", "pruned" (aborted by a strategy rule), "budget" (cut by the budget)
            or "error".
        tokens: completion tokens it generated (including those of an aborted trace).
        text: its generated text.
        answer: the answer extracted from it, if any.
        scores: named scores (confidence, verifier score, ...).
        finish_reason: the engine's finish reason.
        pruned_by: the rule that pruned it.
        detail: a human-readable note on the decision.
        live_confidence: the mean token logprob so far, while the trace streams with logprobs (what the live
            progress view shows for running traces; final confidences go to ``scores``).
    """

    id: int
    parent: int | None
    kind: str
    status: TraceStatus = "running"
    tokens: int = 0
    text: str = ""
    answer: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    pruned_by: str | None = None
    detail: str | None = None
    started_at: float = field(default_factory=time.perf_counter)
    ended_at: float | None = None
    live_confidence: float | None = None


class TraceTree:
    """All traces of one strategy run, in the order they were opened.

    Opening and closing a trace reports a ``trace_start`` / ``trace_end`` event to the current run's event sink
    (`branchwise.events`), tagged with the tree's process-unique ``uid``.
    """

    def __init__(self) -> None:
        self._nodes: list[TraceNode] = []
        self.uid = next(_TREE_IDS)

    def open(self, kind: str, *, parent: int | None = None) -> TraceNode:
        """Start a trace."""
        if parent is not None and not 0 <= parent < len(self._nodes):
            raise ConfigError(f"parent trace {parent} does not exist")
        node = TraceNode(id=len(self._nodes), parent=parent, kind=kind)
        self._nodes.append(node)
        emit("trace_start", {"tree": self.uid, "trace": node.id, "parent": parent, "kind": kind, "node": LiveRef(node)})
        return node

    def close(
        self, node: TraceNode, status: TraceStatus, *, rule: str | None = None, detail: str | None = None
    ) -> None:
        """End a trace with ``status`` (``rule`` names the pruning rule for "pruned")."""
        node.status = status
        node.pruned_by = rule
        node.detail = detail
        node.ended_at = time.perf_counter()
        emit(
            "trace_end",
            {
                "tree": self.uid,
                "trace": node.id,
                "kind": node.kind,
                "status": status,
                "tokens": node.tokens,
                "answer": node.answer,
                "scores": dict(node.scores),
                "finish_reason": node.finish_reason,
                "rule": rule,
                "detail": detail,
                "seconds": node.ended_at - node.started_at,
            },
        )

    @property
    def nodes(self) -> list[TraceNode]:
        return list(self._nodes)

    def pruned(self) -> list[TraceNode]:
        """Traces aborted by a strategy rule."""
        return [n for n in self._nodes if n.status == "pruned"]

    def __len__(self) -> int:
        return len(self._nodes)


@dataclass(frozen=True)
class Candidate:
    """A finished trace's final answer, as considered for the result.

    Attributes:
        answer: the extracted answer (None when none could be extracted).
        text: the full generated text.
        trace_id: its node in the trace tree.
        tokens: completion tokens it took.
        confidence: its trace confidence, when computed.
        score: its verifier score, when computed.
    """

    answer: str | None
    text: str
    trace_id: int
    tokens: int
    confidence: float | None = None
    score: float | None = None


@dataclass
class Result:
    """What a strategy returns.

    Attributes:
        strategy: the strategy's name.
        answer: the chosen answer (None if no trace produced one).
        candidates: every finished trace's answer with its scores.
        votes: total weight per answer cluster (the representative answer is the key).
        trace: the trace tree.
        usage: what the run cost.
        budget_exhausted: a budget cap stopped the run early, or clipped a sample short of the tokens it asked
            for (see `Budget.clipped_calls`); the answer is the best one so far.
        decisions: strategy decisions worth recording (thresholds, escalations, prune events).
    """

    strategy: str
    answer: str | None
    candidates: list[Candidate]
    votes: dict[str, float]
    trace: TraceTree
    usage: UsageSnapshot
    budget_exhausted: bool = False
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pruned(self) -> int:
        """Number of traces a strategy rule aborted."""
        return len(self.trace.pruned())


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem becomes chat messages.

    Attributes:
        user: the user turn; ``{question}`` is replaced by the problem.
        system: an optional system turn.
    """

    user: str = "{question}\n\nSolve it step by step, then finish with: The answer is <answer>."
    system: str | None = None

    def __post_init__(self) -> None:
        if "{question}" not in self.user:
            raise ConfigError("PromptTemplate.user must contain '{question}'")

    def messages(self, question: str) -> tuple[ChatMessage, ...]:
        turns = [ChatMessage("user", self.user.replace("{question}", question))]
        if self.system:
            turns.insert(0, ChatMessage("system", self.system))
        return tuple(turns)


@dataclass
class SearchContext:
    """What a strategy runs with.

    Attributes:
        engine: the policy model's engine.
        budget: the budget every engine call is charged to (a fresh unlimited one meters when None).
        extractor: pulls final answers out of traces.
        grader: decides which answers are the same (clustering for votes).
        prompt: turns the problem into messages.
        temperature, top_p, max_tokens: sampling defaults for the strategy's traces.
    """

    engine: Engine
    budget: Budget | None = None
    extractor: AnswerExtractor = field(default_factory=AnswerExtractor)
    grader: BaseGrader = field(default_factory=NumericGrader)
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = Budget()
        self._bound: Engine = self.budget.bind(self.engine)

    @property
    def llm(self) -> Engine:
        """The engine as strategies must use it: every call clipped and charged by the budget."""
        return self._bound

    def use_llm(self, engine: Engine) -> None:
        """Draw this context's traces from ``engine`` instead, which must charge this context's budget itself
        (e.g. `branchwise.search.spec_reason.SpeculativeEngine`, built over budgeted engines). ``engine`` (the
        policy, which judges and verifiers use) is unchanged. Used on a copy of a context."""
        self._bound = engine

    def request(self, question: str, **overrides: Any) -> GenerationRequest:
        """A sampling request for ``question`` with this context's defaults, overridable per call."""
        fields: dict[str, Any] = {
            "messages": self.prompt.messages(question),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        fields.update(overrides)
        return GenerationRequest(**fields)

    def usage(self) -> UsageSnapshot:
        assert self.budget is not None
        return self.budget.usage.snapshot()


class Strategy(ABC):
    """A test-time-scaling algorithm over the `Engine` interface."""

    name: ClassVar[str]

    @abstractmethod
    async def run(self, problem: str, ctx: SearchContext) -> Result:
        """Solve ``problem``; never raises `BudgetExhausted` (the result is marked instead)."""

    def describe(self) -> Mapping[str, Any]:
        """The strategy's parameters, for records and reports."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
