"""Step scorers: how good is each step of a partial solution (process reward).

One interface, `StepScorer`: ``await scorer.score(problem, steps)`` returns a score in [0, 1] for every step
prefix (the score of step i given ``steps[:i + 1]``), and `aggregate` folds a path's step scores into one
number ("last", "min", "prod" or "mean"). Step-level searches (`branchwise.search.beam`, `branchwise.search.dvts`)
use `StepScorer.score_last`, which scores only the newest step of a prefix.

Backends:

- `GenerativeJudgeScorer`: any chat model judges the latest step; the score is P("yes") from the top
  logprobs of its one-token answer. Runs on every engine with logprobs, the small CPU models included.
- `VLLMRewardModelScorer`: a real process reward model served by vLLM as a pooling model, such as
  Qwen2.5-Math-PRM-7B, which reads the solution with a step tag (``<extra_0>``) after every step and returns
  a probability that each step is correct. It talks to vLLM through a `PoolingClient`: `EmbeddedPoolingClient`
  (an in-process ``AsyncLLM`` started with ``runner="pooling"``) or `HTTPPoolingClient` (the ``/pooling`` route
  of ``vllm serve <prm> --runner pooling``); in `verifiers.prm`. Serving a 7B PRM needs a GPU; here only the
  request building and response parsing are exercised, against fake clients.
- `ScriptedStepScorer`: scores from a table or a function, for tests.

The interface and `aggregate` live in `verifiers.step_base`; this module gathers every scorer.

A scorer that calls an engine is bound to the run's budget by the strategy that uses it (`StepScorer.bind`),
so judge calls are clipped, metered and stopped by the same `Budget` as the policy's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from ..budget import Budget
from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest, TokenLogprob
from ..errors import ConfigError
from .prm import QWEN_PRM_SYSTEM, EmbeddedPoolingClient, HTTPPoolingClient, PoolingClient, VLLMRewardModelScorer
from .step_base import AGGREGATES, Aggregate, StepScorer, aggregate, check_score, check_steps

__all__ = [
    "AGGREGATES",
    "DEFAULT_JUDGE_USER",
    "QWEN_PRM_SYSTEM",
    "Aggregate",
    "EmbeddedPoolingClient",
    "GenerativeJudgeScorer",
    "HTTPPoolingClient",
    "JudgeTemplate",
    "PoolingClient",
    "ScriptedStepScorer",
    "StepScorer",
    "VLLMRewardModelScorer",
    "aggregate",
    "yes_probability",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Generative judge
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_JUDGE_USER = (
    "You are checking a step-by-step solution to a math problem.\n\n"
    "Problem:\n{problem}\n\n"
    "Previous steps:\n{previous}\n\n"
    "Latest step:\n{step}\n\n"
    "Is the latest step correct? Answer Yes or No."
)
_PLACEHOLDER = re.compile(r"\{(problem|previous|step)\}")


@dataclass(frozen=True)
class JudgeTemplate:
    """How the judge is asked about one step prefix.

    Attributes:
        user: the user turn; ``{problem}``, ``{previous}`` (earlier steps) and ``{step}`` (the latest step) are
            filled in. Placeholders are substituted in one pass, so braces in the problem text are safe.
        system: an optional system turn.
        step_separator: joins the earlier steps in ``{previous}``.
        no_previous: ``{previous}`` when the latest step is the first.
    """

    user: str = DEFAULT_JUDGE_USER
    system: str | None = None
    step_separator: str = "\n\n"
    no_previous: str = "(none)"

    def __post_init__(self) -> None:
        if "{step}" not in self.user:
            raise ConfigError("JudgeTemplate.user must contain '{step}'")

    def messages(self, problem: str, steps: Sequence[str]) -> tuple[ChatMessage, ...]:
        """The chat asking whether ``steps[-1]`` is correct."""
        steps = check_steps(steps)
        values = {
            "problem": problem,
            "previous": self.step_separator.join(steps[:-1]) or self.no_previous,
            "step": steps[-1],
        }
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)
        turns = [ChatMessage("user", user)]
        if self.system:
            turns.insert(0, ChatMessage("system", self.system))
        return tuple(turns)


def _label(token: str) -> str:
    # Tokenizers render a leading space as "Ġ" or "▁" in some decodings; answers may carry punctuation.
    return token.strip().lstrip("Ġ▁").strip(" .,:;!\"'*").lower()


def yes_probability(
    token: TokenLogprob | None,
    *,
    yes: Sequence[str] = ("yes",),
    no: Sequence[str] = ("no",),
    fallback: float = 0.5,
) -> float:
    """P(yes) among the yes/no answers at one position, from its top logprobs.

    Every variant of an answer among the alternatives counts (" Yes", "yes", "YES", "Yes." all read as
    "yes"): ``sum(exp(lp) for yes variants) / sum(exp(lp) for yes and no variants)``. The sampled token counts
    too when it is not among the alternatives.

    Args:
        token: the first generated token's logprobs (with top alternatives), or None.
        yes: normalised spellings of "yes" (lower case, no spaces or punctuation).
        no: normalised spellings of "no".
        fallback: the score when neither answer appears.
    """
    if token is None:
        return fallback
    seen: dict[str, float] = {}
    for text, lp in token.top:
        seen.setdefault(text, lp)
    seen.setdefault(token.token, token.logprob)
    yes_set, no_set = {y.lower() for y in yes}, {n.lower() for n in no}
    p_yes = p_no = 0.0
    for text, lp in seen.items():
        if not math.isfinite(lp):
            continue
        label = _label(text)
        if label in yes_set:
            p_yes += math.exp(lp)
        elif label in no_set:
            p_no += math.exp(lp)
    if p_yes + p_no <= 0.0:
        return fallback
    return p_yes / (p_yes + p_no)


class GenerativeJudgeScorer(StepScorer):
    """A chat model judges each step: score = P("yes") to "is the latest step correct?".

    One request per step prefix (all prefixes concurrently), greedy, one generated token, top-20 logprobs;
    the probability mass of the yes and no variants among the alternatives is normalised (`yes_probability`).

    Args:
        engine: the judge's engine; None judges with the policy engine of the strategy that binds it.
        template: how the question is put.
        top_logprobs: alternatives read at the answer position (2..20).
        yes: normalised spellings counted as "yes".
        no: normalised spellings counted as "no".
        fallback: the score when neither answer is among the alternatives.

    Raises:
        ConfigError: bad parameters, or an engine without top logprobs.
    """

    name = "generative_judge"

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        template: JudgeTemplate | None = None,
        top_logprobs: int = 20,
        yes: Sequence[str] = ("yes",),
        no: Sequence[str] = ("no",),
        fallback: float = 0.5,
    ) -> None:
        if not 2 <= top_logprobs <= 20:
            raise ConfigError(f"GenerativeJudgeScorer: top_logprobs must be in 2..20, got {top_logprobs}")
        if not 0.0 <= fallback <= 1.0:
            raise ConfigError(f"GenerativeJudgeScorer: fallback must be in [0, 1], got {fallback}")
        if isinstance(yes, str) or isinstance(no, str) or not yes or not no:
            raise ConfigError("GenerativeJudgeScorer: yes and no must be non-empty lists of spellings")
        if engine is not None:
            _check_judge_engine(engine)
        self.engine = engine
        self.template = template or JudgeTemplate()
        self.top_logprobs = top_logprobs
        self.yes = tuple(yes)
        self.no = tuple(no)
        self.fallback = fallback

    def bind(self, engine: Engine, budget: Budget | None) -> GenerativeJudgeScorer:
        judge = self.engine if self.engine is not None else engine
        bound = budget.bind(judge) if budget is not None else judge
        return GenerativeJudgeScorer(
            bound,
            template=self.template,
            top_logprobs=self.top_logprobs,
            yes=self.yes,
            no=self.no,
            fallback=self.fallback,
        )

    def request(self, problem: str, steps: Sequence[str]) -> GenerationRequest:
        """The judge request for the newest step of ``steps``."""
        return GenerationRequest(
            messages=self.template.messages(problem, steps),
            n=1,
            temperature=0.0,
            max_tokens=1,
            logprobs=self.top_logprobs,
        )

    async def score_last(self, problem: str, steps: Sequence[str]) -> float:
        engine = self.engine
        if engine is None:
            raise ConfigError(
                "GenerativeJudgeScorer has no engine: pass engine=, or use it in a strategy, which binds the "
                "policy engine"
            )
        generation = await engine.generate(self.request(problem, check_steps(steps)))
        logprobs = generation.completions[0].logprobs if generation.completions else None
        first = logprobs[0] if logprobs else None
        if first is None:
            logger.debug("judge returned no token for a step; scoring it %s", self.fallback)
        return yes_probability(first, yes=self.yes, no=self.no, fallback=self.fallback)

    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        steps = check_steps(steps)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.score_last(problem, steps[: i + 1])) for i in range(len(steps))]
        return [t.result() for t in tasks]

    def __repr__(self) -> str:
        return f"GenerativeJudgeScorer(engine={self.engine!r}, top_logprobs={self.top_logprobs})"


def _check_judge_engine(engine: Engine) -> None:
    if not isinstance(engine, Engine):
        raise ConfigError(f"GenerativeJudgeScorer: engine must be an Engine, got {type(engine).__name__}")
    caps = engine.capabilities
    if not caps.logprobs or caps.max_top_logprobs < 2:
        raise ConfigError(
            f"GenerativeJudgeScorer needs top logprobs, which the {engine.backend!r} engine does not return"
        )
    if not caps.chat:
        raise ConfigError(f"GenerativeJudgeScorer needs a chat model; the {engine.backend!r} engine has none")


# ---------------------------------------------------------------------------------------------------------------
# Scripted
# ---------------------------------------------------------------------------------------------------------------
ScoreFn = Callable[[str, tuple[str, ...]], float | Awaitable[float]]


class ScriptedStepScorer(StepScorer):
    """Scores from a table or a function, for tests.

    Args:
        source: a mapping from a step's text (stripped) to its score, or a function
            ``fn(problem, steps) -> score`` (sync or async) scoring the newest step of the prefix ``steps``.
        default: the score of a step missing from the table; None makes a missing step an error.

    Attributes:
        calls: every prefix scored, in order.
    """

    name = "scripted"

    def __init__(self, source: Mapping[str, float] | ScoreFn, *, default: float | None = 0.5) -> None:
        if not isinstance(source, Mapping) and not callable(source):
            raise ConfigError("ScriptedStepScorer needs a mapping of step text to score, or a function")
        if default is not None:
            check_score(default, "ScriptedStepScorer default")
        if isinstance(source, Mapping):
            for key, value in source.items():
                check_score(value, f"ScriptedStepScorer table entry {key!r}")
        self._source = source
        self.default = default
        self.calls: list[tuple[str, ...]] = []

    async def score_last(self, problem: str, steps: Sequence[str]) -> float:
        prefix = check_steps(steps)
        self.calls.append(prefix)
        source = self._source
        if isinstance(source, Mapping):
            key = prefix[-1].strip()
            if key in source:
                return float(source[key])
            if self.default is None:
                raise ConfigError(f"ScriptedStepScorer has no score for step {key!r}")
            return self.default
        value = source(problem, prefix)
        if inspect.isawaitable(value):
            value = await value
        return check_score(value, "ScriptedStepScorer function")

    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        steps = check_steps(steps)
        return [await self.score_last(problem, steps[: i + 1]) for i in range(len(steps))]
