"""`spec_reason`: step-level speculative reasoning (SpecReason, Pan et al. 2025).

A small draft model writes each reasoning step; the policy only judges it. A step ends at a delimiter (a blank line
by default, sent as a stop string) or at ``step_tokens``. The policy scores the drafted step in one short request:

- ``score: judge``: P("yes") to "is the latest step correct?" (`GenerativeJudgeScorer` on the policy by default,
  or the pipeline's ``verifiers.step_scorer``), one generated token;
- ``score: logprob``: the policy's own mean token logprob of the step (prompt logprobs of the step appended to
  the solution so far, no generated token), mapped to [0, 1] as exp(mean logprob), the policy's geometric-mean
  token probability; needs an engine that returns prompt logprobs (the embedded vLLM engine does).

A step scored at or above ``threshold`` is kept as drafted; otherwise the policy regenerates that step itself
(from the same prefix). So every step of a trace was either accepted or written by the policy, and the final
answer always comes from a policy-accepted trace. A trace ends when a step ends the generation (end of sequence,
or another of the request's stop strings), when its text states a final answer (a boxed answer, ``####``,
"the answer is ..."), when both models have nothing to add, at ``max_steps`` or at the request's ``max_tokens``.
A request whose own stop strings include the delimiter gets one step (how a step-level search such as ``beam``
asks for the next step, so it can run on speculative steps too).

`SpeculativeEngine` does this behind the ordinary `Engine` interface: a request for ``n`` samples streams ``n``
speculative traces (concurrently), so every sampling strategy runs on it unchanged. The `SpecReason` strategy
(``strategy: spec_reason``) wraps another strategy (``samples``, default `Single`) and hands it a context whose
traces come from a `SpeculativeEngine`: ``{strategy: spec_reason, samples: {strategy: self_consistency, n: 8}}``
is self-consistency over eight speculative traces. Its draft engine is the pipeline's ``speculator`` engine role.

Accounting: every model call goes through the run's budget (the draft's steps, the policy's judgements and
regenerated steps, each with its prompt re-sent); the speculative engine itself charges nothing and reports no
``engine_call`` of its own, so nothing is counted twice. Each step's decision (drafted tokens, score, kept or
regenerated) is a ``spec_step`` record in the result's ``decisions`` (and so in a recorded trace), followed by one
``spec_reason`` summary (steps, acceptance rate, tokens of each model).

Draft and policy must share a tokenizer only for the token counts a strategy sees to be comparable (the
Qwen2.5-Coder 0.5B and 1.5B models do); the texts are exchanged as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import math
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine.base import CallMeter, Engine
from ..engine.types import CallUsage, Capabilities, ChatMessage, Delta, FinishReason, GenerationRequest
from ..errors import ConfigError
from ..verifiers.extraction import AnswerExtractor
from ..verifiers.step_scorers import GenerativeJudgeScorer, StepScorer
from .base import Result, SearchContext, Strategy
from .beam import has_final_answer, step_end
from .registry import MAX_DEPTH, MAX_TOKENS, Component, NestedStrategy, register_strategy, strategy_info
from .single import Single

__all__ = ["ScoreMode", "SpecReason", "SpecStats", "SpeculativeEngine", "StepDecision"]

ScoreMode = Literal["judge", "logprob"]
Verdict = Literal["accepted", "regenerated", "policy"]
_CALLS = itertools.count(1)


@dataclass(frozen=True)
class StepDecision:
    """What happened to one step of one speculative trace.

    Attributes:
        call: the speculative engine call (one per request), unique in the process.
        sample: the trace's sample index in that call.
        step: the step's position in the trace (0-based).
        draft_tokens: tokens the draft model generated for it.
        score: the policy's score of the drafted step (None when there was nothing to score).
        verdict: "accepted" (kept as drafted), "regenerated" (scored below the threshold, the policy wrote it) or
            "policy" (the draft had nothing to add, the policy wrote the step).
        policy_tokens: tokens the policy generated for it (0 when accepted).
    """

    call: int
    sample: int
    step: int
    draft_tokens: int
    score: float | None
    verdict: Verdict
    policy_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"event": "spec_step", **self.__dict__}


@dataclass
class SpecStats:
    """Totals over the steps a `SpeculativeEngine` decided."""

    steps: int = 0
    accepted: int = 0
    draft_tokens: int = 0
    policy_tokens: int = 0
    decisions: list[StepDecision] = field(default_factory=list)

    def add(self, decision: StepDecision) -> None:
        self.decisions.append(decision)
        self.steps += 1
        self.accepted += decision.verdict == "accepted"
        self.draft_tokens += decision.draft_tokens
        self.policy_tokens += decision.policy_tokens

    @property
    def acceptance(self) -> float:
        """Share of drafted steps kept (NaN before any step)."""
        return self.accepted / self.steps if self.steps else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "event": "spec_reason",
            "steps": self.steps,
            "accepted": self.accepted,
            "acceptance": self.acceptance,
            "draft_tokens": self.draft_tokens,
            "policy_tokens": self.policy_tokens,
        }


@dataclass
class _Step:
    """One generated step: its deltas (re-indexed for the outer stream), text, tokens and why it stopped."""

    deltas: list[Delta] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    finish: FinishReason | None = None
    stop: str | int | None = None


class _Ended:
    """The queue item a trace task puts when it is done (``error`` when it failed)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class SpeculativeEngine(Engine):
    """Streams speculative traces: the draft writes each step, the policy judges it and rewrites rejected ones.

    Args:
        policy: the policy engine (bound to the run's budget by the caller).
        draft: the draft engine (bound likewise).
        scorer: scores a drafted step in ``score="judge"`` mode (bound likewise; default: a
            `GenerativeJudgeScorer` on ``policy``).
        score: "judge" or "logprob" (see the module docstring).
        threshold: a drafted step scored at or above it is kept.
        delimiter: what ends a step (sent as a stop string).
        step_tokens: token cap per step.
        max_steps: most steps per trace.
        extractor: recognises a final answer, which ends a trace.

    Raises:
        ConfigError: bad parameters, or ``score="logprob"`` with a policy that returns no prompt logprobs.
    """

    backend = "spec_reason"

    def __init__(
        self,
        policy: Engine,
        draft: Engine,
        scorer: StepScorer | None = None,
        *,
        score: ScoreMode = "judge",
        threshold: float = 0.5,
        delimiter: str = "\n\n",
        step_tokens: int = 128,
        max_steps: int = 32,
        extractor: AnswerExtractor | None = None,
    ) -> None:
        super().__init__(model=f"{draft.model} -> {policy.model}")
        _check_parameters(score, threshold, delimiter, step_tokens, max_steps)
        if score == "logprob" and not policy.capabilities.prompt_logprobs:
            raise ConfigError(
                f"spec_reason: score 'logprob' needs prompt logprobs, which the {policy.backend!r} policy engine "
                "does not return; use score 'judge'"
            )
        self.policy, self.draft = policy, draft
        if score == "judge" and scorer is None:
            scorer = GenerativeJudgeScorer(policy)
        self.scorer = scorer
        self.score, self.threshold, self.delimiter = score, threshold, delimiter
        self.step_tokens, self.max_steps = step_tokens, max_steps
        self.extractor = extractor or AnswerExtractor()
        self.stats = SpecStats()

    @property
    def capabilities(self) -> Capabilities:
        caps = self.policy.capabilities
        return Capabilities(
            logprobs=caps.logprobs and self.draft.capabilities.logprobs,
            max_top_logprobs=min(caps.max_top_logprobs, self.draft.capabilities.max_top_logprobs),
            chat=caps.chat,
            per_request_seed=caps.per_request_seed,
            max_model_len=caps.max_model_len,
        )

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.policy.count_prompt_tokens(request)

    def _emit(self, request: GenerationRequest, usage: CallUsage) -> None:
        # The draft and policy calls report (and are charged) themselves; reporting this call too would count
        # its tokens twice. Usage hooks still see it.
        self._call_hooks(request, usage)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        if request.structured is not None:
            raise ConfigError("spec_reason cannot constrain the output (structured output): steps are free text")
        call = next(_CALLS)
        queue: asyncio.Queue[Delta | _Ended] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._trace(call, i, request, queue), name=f"branchwise-spec-{call}-{i}")
            for i in range(request.n)
        ]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if isinstance(item, _Ended):
                    running -= 1
                    if item.error is not None:
                        raise item.error
                    continue
                yield item
        finally:
            # Closing this stream (a strategy pruning, the budget, cancellation) aborts every step in flight.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _trace(self, call: int, index: int, request: GenerationRequest, queue: asyncio.Queue[Any]) -> None:
        try:
            await self._steps(call, index, request, queue)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # handed to the consumer, which raises it
            queue.put_nowait(_Ended(err))
        else:
            queue.put_nowait(_Ended(None))

    async def _steps(self, call: int, index: int, request: GenerationRequest, queue: asyncio.Queue[Any]) -> None:
        problem = _problem_of(request)
        steps: list[str] = []
        text, produced = "", 0
        finish: FinishReason = "length"  # unless a step ends the trace first
        stop: str | int | None = None
        for number in range(self.max_steps):
            left = request.max_tokens - produced
            if left <= 0:
                break
            step_request = self._step_request(request, text, left, index, number)
            drafted = await self._run_step(self.draft, step_request, index)
            score: float | None = None
            if drafted.text.strip():
                score = await self._score(problem, request, text, steps, drafted)
            if score is not None and score >= self.threshold:
                verdict: Verdict = "accepted"
                step, policy_tokens = drafted, 0
                for delta in step.deltas:
                    queue.put_nowait(delta)
            else:
                verdict = "policy" if score is None else "regenerated"
                step = await self._run_step(self.policy, step_request, index, queue)
                policy_tokens = step.tokens
            decision = StepDecision(call, index, number, drafted.tokens, score, verdict, policy_tokens)
            self.stats.add(decision)
            produced += step.tokens
            end = step_end(step.finish, step.stop, self.delimiter)
            if end == "incomplete":  # aborted or failed without an exception: not expected from an engine
                finish, stop = "abort", None
                break
            if not step.text.strip() and end != "length":
                finish, stop = "stop", step.stop if end == "eos" else None
                break  # neither model has anything to add
            steps.append(step.text)
            text += step.text
            if end == "eos":
                finish, stop = "stop", step.stop
                break
            if has_final_answer(self.extractor, text):
                finish, stop = "stop", None
                break
            if end == "delimiter" and self.delimiter in request.stop:
                finish, stop = "stop", self.delimiter  # the caller asked for one step (e.g. a beam search)
                break
            if step.tokens >= left:
                break  # the trace's max_tokens
            if end == "delimiter":
                text += self.delimiter
                queue.put_nowait(Delta(index, self.delimiter))
        queue.put_nowait(Delta(index, "", finish_reason=finish, stop_reason=stop))

    def _step_request(
        self, request: GenerationRequest, text: str, left: int, index: int, number: int
    ) -> GenerationRequest:
        """The request for the next step of a trace whose text so far is ``text``."""
        fields: dict[str, Any] = {
            "n": 1,
            "stop": (self.delimiter, *(s for s in request.stop if s != self.delimiter)),
            "max_tokens": min(self.step_tokens, left),
        }
        if request.seed is not None:  # reproducible, and different for every sample and step
            fields["seed"] = request.seed + index * self.max_steps + number
        return request.replace(**fields, **_continued(request, text))

    async def _run_step(
        self, engine: Engine, request: GenerationRequest, index: int, queue: asyncio.Queue[Any] | None = None
    ) -> _Step:
        """Run one step request on ``engine``; with ``queue``, its deltas go out as they arrive."""
        step = _Step()
        pieces: list[str] = []
        async with contextlib.aclosing(engine.stream(request)) as deltas:
            async for delta in deltas:
                pieces.append(delta.text)
                step.tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    step.finish, step.stop = delta.finish_reason, delta.stop_reason
                out = Delta(index, delta.text, delta.token_ids, delta.logprobs)
                if not out.text and not out.token_ids:
                    continue
                if queue is None:
                    step.deltas.append(out)
                else:
                    queue.put_nowait(out)
        step.text = "".join(pieces)
        return step

    async def _score(
        self, problem: str, request: GenerationRequest, text: str, steps: list[str], drafted: _Step
    ) -> float:
        if self.scorer is not None:
            return await self.scorer.score_last(problem, [*steps, drafted.text])
        # The step appended to the solution so far, as a prompt whose last tokens are the step: the policy's
        # logprobs of those tokens, without generating anything of its own.
        # Only the step's positions are needed, so the policy reads the solution so far from its prefix cache.
        scoring = request.replace(
            n=1, max_tokens=1, temperature=0.0, logprobs=None, stop=(), prompt_logprobs=0,
            prompt_logprobs_last=max(drafted.tokens, 1), **_continued(request, text + drafted.text),
        )  # fmt: skip
        generation = await self.policy.generate(scoring)
        tail = [t.logprob for t in (generation.prompt_logprobs or ())[-max(drafted.tokens, 1) :] if t is not None]
        if not tail:
            return 0.0
        return math.exp(sum(tail) / len(tail))


def _continued(request: GenerationRequest, text: str) -> dict[str, Any]:
    """The fields that make ``request`` continue its own output ``text`` (an open assistant turn, or the prompt)."""
    if not text:
        return {}
    if request.prompt is not None:
        return {"prompt": request.prompt + text}
    messages = tuple(request.messages or ())
    if request.continue_final_message and messages:  # the request already continues an assistant turn
        last = messages[-1]
        return {"messages": (*messages[:-1], ChatMessage(last.role, last.content + text))}
    return {"messages": (*messages, ChatMessage("assistant", text)), "continue_final_message": True}


def _problem_of(request: GenerationRequest) -> str:
    """The problem a judge is asked about: the last user turn (or the raw prompt)."""
    if request.prompt is not None:
        return request.prompt
    users = [m.content for m in request.messages or () if m.role == "user"]
    return users[-1] if users else ""


def _check_parameters(score: str, threshold: float, delimiter: str, step_tokens: int, max_steps: int) -> None:
    if score not in ("judge", "logprob"):
        raise ConfigError(f"spec_reason: score must be 'judge' or 'logprob', got {score!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"spec_reason: threshold must be in [0, 1], got {threshold!r}")
    if not isinstance(delimiter, str) or not delimiter:
        raise ConfigError("spec_reason: delimiter must be a non-empty string")
    for name, value in (("step_tokens", step_tokens), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"spec_reason: {name} must be an integer >= 1, got {value!r}")


def _fan_out(strategy: SpecReason) -> int:
    inner = strategy.samples
    try:
        info = strategy_info(inner.name)
    except ConfigError:
        return 1
    return info.fan_out(inner) if info.cls is type(inner) and info.fan_out is not None else 1


@register_strategy(
    maxima={"step_tokens": MAX_TOKENS, "max_steps": MAX_DEPTH},
    sources={
        "draft": Component("speculator", required=True),
        "scorer": Component("step_scorer"),
        "samples": NestedStrategy(),
    },
    fan_out=_fan_out,
)
class SpecReason(Strategy):
    """Speculative reasoning: ``samples`` runs on traces whose steps the draft writes and the policy judges.

    Args:
        draft: the draft model's engine (in YAML: the ``speculator`` engine role).
        scorer: judges drafted steps in ``score: judge`` mode (in YAML: ``verifiers.step_scorer`` when declared);
            None: the policy judges (`GenerativeJudgeScorer`, P("yes")).
        samples: the strategy run on speculative traces (default: one trace, `Single`).
        score: "judge" (P("yes") of a judge prompt) or "logprob" (the policy's mean token logprob of the step).
        threshold: a drafted step scored at or above it is kept; below it the policy regenerates the step.
        delimiter: what ends a step (sent as a stop string).
        step_tokens: token cap per step.
        max_steps: most steps per trace.

    Raises:
        ConfigError: bad parameters.
    """

    name = "spec_reason"

    def __init__(
        self,
        draft: Engine | None = None,
        *,
        scorer: StepScorer | None = None,
        samples: Strategy | None = None,
        score: ScoreMode = "judge",
        threshold: float = 0.5,
        delimiter: str = "\n\n",
        step_tokens: int = 128,
        max_steps: int = 32,
    ) -> None:
        _check_parameters(score, threshold, delimiter, step_tokens, max_steps)
        if draft is not None and not isinstance(draft, Engine):
            raise ConfigError(f"spec_reason: draft must be an Engine, got {type(draft).__name__}")
        if scorer is not None and not isinstance(scorer, StepScorer):
            raise ConfigError(f"spec_reason: scorer must be a StepScorer, got {type(scorer).__name__}")
        if samples is not None and not isinstance(samples, Strategy):
            raise ConfigError(f"spec_reason: samples must be a Strategy, got {type(samples).__name__}")
        if isinstance(samples, SpecReason):
            raise ConfigError("spec_reason: samples cannot be spec_reason again")
        self.draft, self.scorer = draft, scorer
        self.samples: Strategy = samples if samples is not None else Single()
        self.score, self.threshold, self.delimiter = score, threshold, delimiter
        self.step_tokens, self.max_steps = step_tokens, max_steps

    def describe(self) -> Mapping[str, Any]:
        out = {k: v for k, v in super().describe().items() if k not in ("draft", "scorer", "samples")}
        out["draft"] = self.draft.model if self.draft is not None else None
        out["samples"] = {"strategy": self.samples.name, **self.samples.describe()}
        return out

    def engine(self, ctx: SearchContext) -> SpeculativeEngine:
        """The speculative engine for a run in ``ctx``: the policy, draft and judge all charged to its budget."""
        if self.draft is None:
            raise ConfigError(
                "spec_reason needs a draft model: declare it as the 'speculator' engine role in YAML, or pass draft="
            )
        assert ctx.budget is not None
        judge = self.scorer or GenerativeJudgeScorer()
        return SpeculativeEngine(
            ctx.llm,
            ctx.budget.bind(self.draft),
            judge.bind(ctx.engine, ctx.budget) if self.score == "judge" else None,
            score=self.score,
            threshold=self.threshold,
            delimiter=self.delimiter,
            step_tokens=self.step_tokens,
            max_steps=self.max_steps,
            extractor=ctx.extractor,
        )

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        engine = self.engine(ctx)
        inner = copy.copy(ctx)
        inner.use_llm(engine)
        result = await self.samples.run(problem, inner)
        result.strategy = self.name
        result.decisions.extend(d.to_dict() for d in engine.stats.decisions)
        result.decisions.append(engine.stats.summary())
        return result
