"""Building a pipeline's parts from a resolved spec: engines by role, verifier components, planner, tools, strategy.

The components a strategy may declare (`branchwise.search.registry.Component`) are built here from the
``verifiers`` section, by kind, and handed to whichever strategy asks for them; nothing here knows one strategy
from another.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, get_args

from ..budget import Budget
from ..engine import create_engine
from ..engine.base import Engine
from ..engine.testing import FunctionEngine, ScriptedResponse, render_prompt
from ..engine.testing import Reply as ScriptedReply
from ..engine.types import GenerationRequest
from ..engine.vllm_engine import split_cpu_cores
from ..errors import ConfigError, EngineRequestError, SpecError
from ..executors.tools import ToolRegistry, default_tools
from ..planners import get_planner
from ..planners.base import Planner
from ..search.base import Candidate, Strategy
from ..search.registry import strategy_info
from ..verifiers.extraction import AnswerExtractor
from ..verifiers.genrm import GenerativeVerifier
from ..verifiers.grading import BaseGrader, get_grader
from ..verifiers.redundancy import AnswerRedundancy, EmbeddingRedundancy, LexicalRedundancy, RedundancyJudge
from ..verifiers.step_scorers import GenerativeJudgeScorer, ScriptedStepScorer, StepScorer, VLLMRewardModelScorer
from .spec import PipelineSpec
from .spec_models import EngineRole, EngineSpec, ReplySpec, RuntimeSpec, StepScorerSpec, VerifierSpec
from .spec_strategy import Where, assemble_strategy

__all__ = [
    "ENGINE_ROLES",
    "Closeable",
    "Components",
    "build_components",
    "build_engine",
    "build_engines",
    "close_soon",
    "run_budget",
    "speculation_pays",
]

ENGINE_ROLES: tuple[str, ...] = get_args(EngineRole)
"""Roles served by an `Engine`; ``draft`` configures the policy engine and ``embedder`` the embedding judge."""

run_budget: ContextVar[Budget | None] = ContextVar("branchwise_run_budget", default=None)
"""The budget of the pipeline run this code runs in (set by `Pipeline.run`; a verifier component charges it)."""

VerifierScore = Callable[[str, Candidate], Awaitable[float]]


class Closeable(Protocol):
    """Something a pipeline closes with itself (a built engine, a scorer with a client)."""

    async def aclose(self) -> None: ...


@dataclass
class Components:
    """What a spec's verifiers, planner and tools sections build, and what the pipeline must close."""

    extractor: AnswerExtractor | None = None
    grader: BaseGrader | None = None
    step_scorer: StepScorer | None = None
    redundancy_judge: RedundancyJudge | None = None
    verifier: VerifierScore | None = None
    speculator: Engine | None = None
    planner: Planner | None = None
    tools: ToolRegistry | None = None
    closeables: list[Closeable] = field(default_factory=list)

    def by_kind(self) -> dict[str, Any]:
        """The components strategies may declare (`branchwise.search.registry.ComponentKind`), by kind."""
        return {
            "step_scorer": self.step_scorer,
            "redundancy_judge": self.redundancy_judge,
            "verifier": self.verifier,
            "speculator": self.speculator,
        }

    def strategy(self, spec: PipelineSpec) -> Strategy:
        """The spec's strategy, its object parameters filled with these components.

        Raises:
            SpecError: the thought section is invalid (checked when the spec was loaded, so not expected here).
        """
        where = Where(spec.lines, spec.source)
        return assemble_strategy(spec.thought, ("thought",), spec.verifiers, where, self.by_kind(), roles=spec.engines)


# -- engines -----------------------------------------------------------------------------------------------------
def build_engines(spec: PipelineSpec, *, skip: Collection[str] = ()) -> dict[str, Engine]:
    """The engines of a resolved spec's engine roles, except those in ``skip`` (given ready by the caller).

    A ``draft`` role becomes the policy engine's ``speculative_config``. Several embedded vLLM engines on a CPU
    get disjoint cores (`split_cpu_cores`, the policy the largest share) unless a spec sets ``cpu_cores``. If one
    engine fails to build, those already built are closed.
    """
    engines: dict[str, Engine] = {}
    draft = spec.engines.get("draft")
    if draft is not None and not speculation_pays(_fan_out(spec), draft.max_batch):
        draft = None
    cores = _cpu_cores(spec, skip)
    try:
        for role, engine_spec in spec.engines.items():
            if role not in ENGINE_ROLES or role in skip:
                continue
            options = dict(engine_spec.options)
            if role in cores:
                options["cpu_cores"] = cores[role]
            if role == "policy" and draft is not None:
                options["speculative_config"] = draft.speculative_config()
            engines[role] = build_engine(engine_spec.model_copy(update={"options": options}), runtime=spec.runtime)
    except BaseException:
        close_soon(engines.values())
        raise
    return engines


def speculation_pays(batch: int, max_batch: int | None) -> bool:
    """The rule for token-level speculation (the ``draft`` role): on only while at most ``max_batch`` sequences
    decode together (None: always). A proposal costs a verification pass of the policy over every sequence of the
    batch, so speculation that speeds one sequence up can slow a wide batch down (measured in
    ``benchmarks/speculation.py``). vLLM fixes speculation when an engine starts, so the batch is the pipeline's
    thought fan-out (self-consistency's n, a beam's width x expansions), known when the engines are built."""
    return max_batch is None or batch <= max_batch


def _fan_out(spec: PipelineSpec) -> int:
    """Sequences the spec's thought strategy decodes together when nothing stops it early."""
    where = Where(spec.lines, spec.source)
    strategy = assemble_strategy(spec.thought, ("thought",), spec.verifiers, where, roles=spec.engines)
    info = strategy_info(strategy.name)
    return info.fan_out(strategy) if info.fan_out is not None else 1


def _cpu_cores(spec: PipelineSpec, skip: Collection[str]) -> dict[str, str]:
    """Cores for each embedded vLLM engine to build, when there are several, none sets its own and this is a CPU."""
    roles = [r for r, e in spec.engines.items() if r in ENGINE_ROLES and r not in skip and e.backend == "vllm"]
    if len(roles) < 2 or any("cpu_cores" in spec.engines[r].options for r in roles):
        return {}
    roles.sort(key=lambda r: r != "policy")
    split = split_cpu_cores(len(roles))
    return dict(zip(roles, split, strict=True)) if split else {}


def build_engine(spec: EngineSpec, *, runtime: RuntimeSpec | None = None) -> Engine:
    """An engine from its spec (``test`` specs become a scripted `FunctionEngine`)."""
    if spec.backend == "test":
        return _scripted_engine(spec)
    options = dict(spec.options)
    if spec.backend == "vllm":
        if runtime is not None:
            for key in ("seed", "dtype", "max_num_seqs"):
                if getattr(runtime, key) is not None:
                    options.setdefault(key, getattr(runtime, key))
        if spec.model:
            options["model"] = spec.model
    else:
        options["model"] = spec.model
        if spec.base_url is not None:
            options["base_url"] = spec.base_url
        if spec.api_key is not None:
            options["api_key"] = spec.api_key
    try:
        return create_engine(spec.backend, **options)
    except TypeError as err:
        raise ConfigError(f"invalid {spec.backend} engine option: {err}") from None


def close_soon(engines: Collection[Engine]) -> None:
    """Schedule closing ``engines`` built for a pipeline whose build then failed (building is synchronous, so
    this cannot await). Without a running loop none of them was started, and there is nothing to release."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for engine in engines:
        task = loop.create_task(engine.aclose(), name=f"branchwise-close-{engine.backend}")
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)


_CLOSING: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks


def _scripted_engine(spec: EngineSpec) -> Engine:
    queue = deque(_scripted_reply(r) for r in spec.replies)
    rules = [(re.compile(r.when), _scripted_reply(r.reply)) for r in spec.rules]
    default = _scripted_reply(spec.default) if spec.default is not None else None

    def reply(request: GenerationRequest) -> ScriptedReply:
        prompt = render_prompt(request)
        for pattern, answer in rules:
            if pattern.search(prompt):
                return answer
        if queue:
            return queue.popleft()
        if default is not None:
            return default
        raise EngineRequestError("scripted engine: no rule matched, the reply queue is empty and there is no default")

    return FunctionEngine(reply, model=spec.model or "scripted", token_delay=spec.token_delay)


def _scripted_reply(reply: str | list[str] | ReplySpec) -> ScriptedReply:
    if not isinstance(reply, ReplySpec):
        return reply
    logprobs: float | tuple[tuple[float, ...], ...] = reply.logprobs if isinstance(reply.logprobs, float) else (
        tuple(tuple(x) for x in reply.logprobs)
    )  # fmt: skip
    return ScriptedResponse(
        tuple(reply.texts), logprobs=logprobs, finish_reason=reply.finish_reason, token_delay=reply.token_delay
    )


# -- components ---------------------------------------------------------------------------------------------------
def build_components(spec: PipelineSpec, engines: Mapping[str, Engine], base: Path | None) -> Components:
    """The extractor, grader, step scorer, redundancy judge, verifier, speculator, planner and tools of a resolved
    spec.

    Args:
        spec: the resolved spec.
        engines: its engines by role.
        base: the spec file's folder (relative corpus paths are tried there first).
    """
    out = Components()
    v = spec.verifiers
    if v.extractor is not None:
        out.extractor = AnswerExtractor(v.extractor)
    out.grader = get_grader(v.grader.kind, **v.grader.options)
    out.speculator = engines.get("speculator")
    if v.step_scorer is not None:
        out.step_scorer = _step_scorer(v.step_scorer, engines)
        out.closeables.append(out.step_scorer)
    if v.redundancy is not None:
        out.redundancy_judge = _redundancy_judge(spec, out)
    if v.verifier is not None:
        engine = engines[v.verifier.engine] if v.verifier.engine else engines.get("judge", engines["policy"])
        out.verifier = _verifier_score(engine, v.verifier)
    if spec.planner is not None:
        try:
            out.planner = get_planner(spec.planner.kind, **spec.planner.options)
        except TypeError as err:
            raise ConfigError(f"invalid planner option for {spec.planner.kind!r}: {err}") from None
        out.tools = _tools(spec, base)
    return out


def _step_scorer(s: StepScorerSpec, engines: Mapping[str, Engine]) -> StepScorer:
    if s.kind == "generative_judge":
        engine = engines[s.engine] if s.engine is not None else engines.get("judge")
        return GenerativeJudgeScorer(engine, top_logprobs=s.top_logprobs, fallback=s.fallback)
    if s.kind == "scripted":
        return ScriptedStepScorer(dict(s.scores), default=s.default)
    if s.base_url is None or s.model is None:  # the spec model requires both for "prm"
        raise ConfigError("a 'prm' step scorer needs base_url and model")
    return VLLMRewardModelScorer.http(s.base_url, s.model)


def _redundancy_judge(spec: PipelineSpec, built: Components) -> RedundancyJudge:
    r = spec.verifiers.redundancy
    assert r is not None
    options = dict(r.options)
    if r.threshold is not None:
        options["threshold"] = r.threshold
    try:
        if r.kind == "answer":
            options.setdefault("grader", built.grader)
            if built.extractor is not None:
                options.setdefault("extractor", built.extractor)
            return AnswerRedundancy(**options)
        if r.kind == "lexical":
            return LexicalRedundancy(**options)
        embedder = spec.engines.get("embedder")
        if embedder is not None:
            options.setdefault("model", embedder.model)
            options.update(embedder.options)
        return EmbeddingRedundancy(**options)
    except TypeError as err:
        raise ConfigError(f"invalid {r.kind} redundancy option: {err}") from None


def _verifier_score(engine: Engine, vspec: VerifierSpec) -> VerifierScore:
    """A generative verifier as a strategy's scorer, charged to the budget of the run it scores in."""
    GenerativeVerifier(engine, k=vspec.k, temperature=vspec.temperature, max_tokens=vspec.max_tokens)  # validate

    async def score(problem: str, candidate: Candidate) -> float:
        verifier = GenerativeVerifier(
            engine, k=vspec.k, temperature=vspec.temperature, max_tokens=vspec.max_tokens, budget=run_budget.get()
        )
        return float(await verifier(problem, candidate))

    return score


def _tools(spec: PipelineSpec, base: Path | None) -> ToolRegistry:
    """The listed tools (names and options were checked when the spec was loaded)."""
    names = [t.name for t in spec.tools]
    corpus = None
    for i, tool in enumerate(spec.tools):
        if tool.name == "retrieve":
            corpus = _resolve_path(str(tool.options["corpus"]), base)
            if not Path(corpus).exists():
                raise SpecError(
                    f"corpus {corpus!r} does not exist (relative paths are tried next to the YAML file, then in "
                    "the working directory)",
                    path=f"tools.{i}.corpus",
                    line=spec.line_of(f"tools.{i}.retrieve.corpus"),
                    source=spec.source,
                )
    everything = default_tools(corpus=corpus, enable_http="http_get" in names)
    return ToolRegistry([everything.get(n) for n in names])


def _resolve_path(value: str, base: Path | None) -> str:
    path = Path(value)
    if not path.is_absolute() and base is not None and (base / path).exists():
        return str(base / path)
    return str(path)
