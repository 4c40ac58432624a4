"""Step scorers: aggregation, the generative judge's P(yes) from top logprobs, the vLLM PRM request/response path
(with fake clients and an httpx mock transport), and the scripted scorer."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import types
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.engine.types import Capabilities, ChatMessage, GenerationRequest, TokenLogprob
from branchwise.errors import (
    BudgetExhausted,
    ConfigError,
    EngineRequestError,
    EngineUnavailable,
    MissingDependencyError,
)
from branchwise.verifiers.step_scorers import (
    EmbeddedPoolingClient,
    GenerativeJudgeScorer,
    HTTPPoolingClient,
    JudgeTemplate,
    ScriptedStepScorer,
    VLLMRewardModelScorer,
    aggregate,
    yes_probability,
)

Tops = list[tuple[str, float]]


class TopLogprobEngine(FunctionEngine):
    """A fake whose first generated token has the top alternatives ``tops(request)`` (text, logprob)."""

    def __init__(self, tops: Callable[[GenerationRequest], Tops], *, logprobs: bool = True) -> None:
        self._tops = tops
        self._has_logprobs = logprobs
        super().__init__(lambda request: ScriptedResponse([tops(request)[0][0]]))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(logprobs=self._has_logprobs, max_top_logprobs=20 if self._has_logprobs else 0)

    def _logprobs(self, request: GenerationRequest, response: Any, sample: int, pos: int, piece: str) -> Any:  # type: ignore[override]
        if request.logprobs is None:
            return None
        top = tuple(self._tops(request))[: request.logprobs]
        return (TokenLogprob(1, piece, top[0][1], top),)


def _ln(p: float) -> float:
    return math.log(p)


# ---------------------------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------------------------
def test_aggregate_modes() -> None:
    scores = [0.5, 0.8, 0.4]
    assert aggregate(scores, "last") == 0.4
    assert aggregate(scores, "min") == 0.4
    assert aggregate(scores, "prod") == pytest.approx(0.16)
    assert aggregate(scores, "mean") == pytest.approx(1.7 / 3)
    assert aggregate([0.9, 0.2, 0.7], "last") == 0.7
    with pytest.raises(ConfigError):
        aggregate([], "min")
    with pytest.raises(ConfigError):
        aggregate([0.5], "median")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# generative judge
# ---------------------------------------------------------------------------------------------------------------
def test_yes_probability_normalises_over_all_variants() -> None:
    token = TokenLogprob(
        1,
        " Yes",
        _ln(0.5),
        ((" Yes", _ln(0.5)), ("yes", _ln(0.1)), ("No", _ln(0.2)), (" YES.", _ln(0.05)), ("Maybe", _ln(0.1))),
    )
    assert yes_probability(token) == pytest.approx(0.65 / 0.85)
    # Neither answer among the alternatives: the fallback.
    other = TokenLogprob(1, "The", _ln(0.6), (("The", _ln(0.6)), ("It", _ln(0.3))))
    assert yes_probability(other) == 0.5
    assert yes_probability(other, fallback=0.25) == 0.25
    assert yes_probability(None) == 0.5
    # The sampled token counts even when it is outside the alternatives.
    outside = TokenLogprob(1, "no", _ln(0.3), (("Yes", _ln(0.6)),))
    assert yes_probability(outside) == pytest.approx(0.6 / 0.9)


async def test_judge_scores_each_prefix_from_scripted_top_logprobs() -> None:
    # The judge likes steps mentioning "right": P(yes) 0.9 among yes/no, else 0.2.
    def tops(request: GenerationRequest) -> Tops:
        assert request.messages is not None
        latest = request.messages[-1].content.split("Latest step:\n")[1]
        if "right" in latest:
            return [(" Yes", _ln(0.6)), ("yes", _ln(0.12)), ("No", _ln(0.08)), ("Hmm", _ln(0.1))]
        return [("No", _ln(0.4)), (" no", _ln(0.4)), ("Yes", _ln(0.2))]

    engine = TopLogprobEngine(tops)
    judge = GenerativeJudgeScorer(engine)
    scores = await judge.score("What is 2+2?", ["a right step", "a wrong step", "right again"])
    assert scores == pytest.approx([0.9, 0.2, 0.9])
    assert len(engine.calls) == 3
    for request in engine.calls:
        assert request.max_tokens == 1
        assert request.logprobs == 20
        assert request.temperature == 0
        assert request.n == 1
        assert request.messages is not None and request.messages[-1].role == "user"
    # Each request judges one prefix: the earlier steps appear as context, the newest as the latest step.
    third = next(r for r in engine.calls if r.messages and "right again" in r.messages[-1].content)
    assert third.messages is not None
    text = third.messages[-1].content
    assert "a right step\n\na wrong step" in text and "What is 2+2?" in text
    assert await judge.score_last("What is 2+2?", ["a right step", "a wrong step"]) == pytest.approx(0.2)


async def test_judge_requests_run_concurrently() -> None:
    arrived = 0
    all_in = asyncio.Event()

    async def reply(request: GenerationRequest) -> ScriptedResponse:
        nonlocal arrived
        arrived += 1
        if arrived == 3:
            all_in.set()
        await all_in.wait()  # a sequential judge would never get the second request: the timeout fails it
        return ScriptedResponse(["Yes"])

    judge = GenerativeJudgeScorer(FunctionEngine(reply))
    async with asyncio.timeout(5):
        scores = await judge.score("p", ["s1", "s2", "s3"])
    assert scores == [1.0, 1.0, 1.0]  # only "Yes" among the alternatives


async def test_judge_falls_back_without_yes_or_no() -> None:
    engine = TopLogprobEngine(lambda r: [("The", _ln(0.7)), ("It", _ln(0.2))])
    assert await GenerativeJudgeScorer(engine).score_last("p", ["x"]) == 0.5
    assert await GenerativeJudgeScorer(engine, fallback=0.3).score_last("p", ["x"]) == 0.3


async def test_judge_template_substitutes_once_and_keeps_braces() -> None:
    template = JudgeTemplate(user="Q: {problem}\nBefore: {previous}\nNow: {step}", system="Be strict.")
    messages = template.messages("Is {step} a set?", ["first {previous}", "second"])
    assert messages[0] == ChatMessage("system", "Be strict.")
    assert messages[1].content == "Q: Is {step} a set?\nBefore: first {previous}\nNow: second"
    assert template.messages("p", ["only"])[1].content.endswith("Before: (none)\nNow: only")
    with pytest.raises(ConfigError):
        JudgeTemplate(user="no placeholder")


async def test_judge_bound_to_budget_charges_it_and_uses_the_policy_engine() -> None:
    engine = FunctionEngine(lambda r: "Yes")
    budget = Budget(max_calls=2)
    judge = GenerativeJudgeScorer().bind(engine, budget)  # no engine of its own: the policy's
    assert await judge.score_last("p", ["a"]) == 1.0
    assert await judge.score_last("p", ["b"]) == 1.0
    assert budget.usage.calls == 2
    with pytest.raises(BudgetExhausted):
        await judge.score_last("p", ["c"])
    assert len(engine.calls) == 2  # the refused call never reached the engine


async def test_judge_misuse_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no engine"):
        await GenerativeJudgeScorer().score_last("p", ["a"])
    with pytest.raises(ConfigError, match="logprobs"):
        GenerativeJudgeScorer(TopLogprobEngine(lambda r: [("x", 0.0)], logprobs=False))
    with pytest.raises(ConfigError):
        GenerativeJudgeScorer(top_logprobs=1)
    with pytest.raises(ConfigError):
        await GenerativeJudgeScorer(FunctionEngine(lambda r: "Yes")).score("p", [])
    with pytest.raises(ConfigError):
        await GenerativeJudgeScorer(FunctionEngine(lambda r: "Yes")).score("p", "a single string")


# ---------------------------------------------------------------------------------------------------------------
# scripted
# ---------------------------------------------------------------------------------------------------------------
async def test_scripted_scorer_table_and_functions() -> None:
    table = ScriptedStepScorer({"good": 0.9, "bad": 0.1}, default=0.4)
    assert await table.score("p", ["good ", "bad", "unknown"]) == [0.9, 0.1, 0.4]
    assert table.calls == [("good ",), ("good ", "bad"), ("good ", "bad", "unknown")]
    strict = ScriptedStepScorer({"good": 0.9}, default=None)
    with pytest.raises(ConfigError, match="no score"):
        await strict.score_last("p", ["other"])

    by_depth = ScriptedStepScorer(lambda problem, steps: 1.0 / len(steps))
    assert await by_depth.score("p", ["a", "b", "c", "d"]) == [1.0, 0.5, pytest.approx(1 / 3), 0.25]

    async def slow(problem: str, steps: tuple[str, ...]) -> float:
        await asyncio.sleep(0)
        return 0.7 if problem == "q" else 0.2

    assert await ScriptedStepScorer(slow).score_last("q", ["x"]) == 0.7
    with pytest.raises(ConfigError):
        await ScriptedStepScorer(lambda p, s: 1.5).score_last("p", ["x"])
    with pytest.raises(ConfigError):
        ScriptedStepScorer({"a": -0.1})
    with pytest.raises(ConfigError):
        ScriptedStepScorer(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# vLLM PRM
# ---------------------------------------------------------------------------------------------------------------
class FakePoolingClient:
    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows
        self.sent: list[tuple[ChatMessage, ...]] = []
        self.closed = False

    async def pool(self, messages: Sequence[ChatMessage]) -> list[list[float]]:
        self.sent.append(tuple(messages))
        return self.rows

    async def aclose(self) -> None:
        self.closed = True


async def test_prm_builds_the_step_tagged_chat_and_reads_positive_column() -> None:
    client = FakePoolingClient([[0.2, 0.8], [0.9, 0.1], [0.35, 0.65]])
    prm = VLLMRewardModelScorer(client)
    scores = await prm.score("Compute 3+4.", ["3 + 4 = 7 ", "So it is 8<extra_0>.", "\\boxed{7}"])
    assert scores == pytest.approx([0.8, 0.1, 0.65])
    (messages,) = client.sent
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert "\\boxed{}" in messages[0].content
    assert messages[1].content == "Compute 3+4."
    # Every step is followed by the tag; a tag inside a step is removed so the rows line up with the steps.
    assert messages[2].content == "3 + 4 = 7<extra_0>So it is 8.<extra_0>\\boxed{7}<extra_0>"
    assert await prm.score_last("Compute 3+4.", ["a", "b", "c"]) == pytest.approx(0.65)
    await prm.aclose()
    assert client.closed


async def test_prm_parses_logits_single_labels_and_rejects_mismatches() -> None:
    prm = VLLMRewardModelScorer(FakePoolingClient([]), system=None)
    logits = prm.parse([[0.0, 2.0], [1.0, -1.0]], 2)  # activation off: softmax applied here
    assert logits == pytest.approx([1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))])
    assert prm.parse([[0.7], [3.0]], 2) == pytest.approx([0.7, 1 / (1 + math.exp(-3.0))])
    with pytest.raises(EngineRequestError, match="2 step scores for 3 steps"):
        prm.parse([[0.1, 0.9], [0.5, 0.5]], 3)
    assert [m.role for m in prm.messages("p", ["s"])] == ["user", "assistant"]
    with pytest.raises(EngineRequestError, match="out of range"):
        VLLMRewardModelScorer(FakePoolingClient([]), positive_label=3).parse([[0.5, 0.5]], 1)


def test_prm_misuse_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PoolingClient"):
        VLLMRewardModelScorer(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        VLLMRewardModelScorer(FakePoolingClient([]), positive_label=-1)
    with pytest.raises(ConfigError):
        VLLMRewardModelScorer(FakePoolingClient([]), step_tag="")
    with pytest.raises(ConfigError, match="AsyncLLM"):
        EmbeddedPoolingClient(FunctionEngine(lambda r: "x"))  # a generative engine cannot pool
    with pytest.raises(ConfigError):
        HTTPPoolingClient("localhost:8000", "prm")


async def test_prm_over_http_sends_pooling_request_and_parses_response() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"id": "pool-1", "data": [{"index": 0, "object": "pooling", "data": [[0.3, 0.7], [0.6, 0.4]]}]}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        prm = VLLMRewardModelScorer.http("http://prm.local:8000/v1", "Qwen2.5-Math-PRM-7B", client=http)
        assert await prm.score("p", ["one", "two"]) == pytest.approx([0.7, 0.4])
        await prm.aclose()  # a caller's client is not closed
        assert not http.is_closed
    (request,) = seen
    assert str(request.url) == "http://prm.local:8000/pooling"
    body = json.loads(request.content)
    assert body["task"] == "token_classify"
    assert body["model"] == "Qwen2.5-Math-PRM-7B"
    assert body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "one<extra_0>two<extra_0>"}


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(404, text="Not Found"), ConfigError),
        (httpx.Response(400, json={"error": "bad"}), EngineRequestError),
        (httpx.Response(200, json={"unexpected": True}), EngineRequestError),
        (httpx.Response(200, json={"data": [{"data": [["x"]]}]}), EngineRequestError),
        (httpx.Response(200, text="not json"), EngineRequestError),
    ],
)
async def test_prm_http_errors(response: httpx.Response, error: type[Exception]) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: response)) as http:
        prm = VLLMRewardModelScorer.http("http://prm.local", "prm", client=http)
        with pytest.raises(error):
            await prm.score("p", ["one"])


async def test_prm_http_unreachable_is_engine_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        prm = VLLMRewardModelScorer.http("http://prm.local", "prm", client=http)
        with pytest.raises(EngineUnavailable):
            await prm.score("p", ["one"])


class _Tensor:
    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows

    def tolist(self) -> list[list[float]]:
        return self.rows


class _Output:
    def __init__(self, rows: list[list[float]], finished: bool) -> None:
        self.outputs = type("PoolingOutput", (), {"data": _Tensor(rows)})()
        self.finished = finished


class _Tokenizer:
    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize and not add_generation_prompt
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


class FakeAsyncLLM:
    """The slice of vLLM's AsyncLLM the embedded client uses."""

    def __init__(self, rows: list[list[float]], error: Exception | None = None) -> None:
        self.rows = rows
        self.error = error
        self.calls: list[tuple[Any, Any, dict[str, Any] | None]] = []

    def get_tokenizer(self) -> _Tokenizer:
        return _Tokenizer()

    async def encode(
        self, prompt: Any, params: Any, request_id: str, tokenization_kwargs: dict[str, Any] | None = None
    ) -> AsyncIterator[_Output]:
        self.calls.append((prompt, params, tokenization_kwargs))
        if self.error is not None:
            raise self.error
        yield _Output(self.rows, finished=True)


class _FakePoolingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_pooling_params(monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing vllm takes ~15 s; the real PoolingParams is checked in tests/integration/test_beam_real.py.
    fake = types.ModuleType("vllm.pooling_params")
    fake.PoolingParams = _FakePoolingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.pooling_params", fake)


@pytest.mark.usefixtures("fake_pooling_params")
async def test_prm_embedded_uses_encode_with_token_classify() -> None:
    llm = FakeAsyncLLM([[0.1, 0.9], [0.8, 0.2]])
    prm = VLLMRewardModelScorer.embedded(llm, step_tag_id=151651)
    assert await prm.score("p", ["a", "b"]) == pytest.approx([0.9, 0.2])
    ((prompt, params, tok_kwargs),) = llm.calls
    assert prompt["prompt"].endswith("<|assistant|>a<extra_0>b<extra_0><|end|>")
    assert params.task == "token_classify"
    assert params.step_tag_id == 151651
    assert tok_kwargs == {"add_special_tokens": False}


@pytest.mark.usefixtures("fake_pooling_params")
async def test_prm_embedded_on_a_generative_model_is_a_config_error() -> None:
    llm = FakeAsyncLLM([], error=ValueError("Unsupported task: 'token_classify' Supported tasks: []"))
    with pytest.raises(ConfigError, match="runner='pooling'"):
        await VLLMRewardModelScorer.embedded(llm).score("p", ["a"])


async def test_prm_embedded_without_vllm_is_a_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm.pooling_params", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match="vllm"):
        await VLLMRewardModelScorer.embedded(FakeAsyncLLM([[0.5, 0.5]])).score("p", ["a"])
