"""`branchwise serve` without a server: request parsing, messages to query, loading pipelines with shared engines,
per-request variants and their limits, admission (slots, queue, per-key), Prometheus text."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from branchwise.budget import UsageSnapshot
from branchwise.errors import ConfigError, SpecError
from branchwise.serve import Admission, APIError, Draining, Metrics, Overloaded, PipelineSet, ServerLimits, query_of
from branchwise.serve.metrics import EngineGauges
from branchwise.serve.protocol import Message, parse_chat_request

SC = """\
name: sc
engine: {backend: test, default: ["The answer is 42.", "The answer is 42.", "The answer is 41."]}
thought: {strategy: self_consistency, n: 3, prompt: {user: "Q: {question}", system: "Be brief."}}
"""


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "sc", "messages": [{"role": "user", "content": "What is 6 x 7?"}], **fields}


def refused(body: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_chat_request(body)
    return caught.value


@pytest.fixture
def pipelines(tmp_path: Path) -> PipelineSet:
    (tmp_path / "sc.yaml").write_text(SC)
    return PipelineSet.load([tmp_path / "sc.yaml"], ServerLimits(max_tokens=1000, max_samples=16))


# -- requests ------------------------------------------------------------------------------------------------------
def test_a_plain_request_parses_and_unknown_fields_are_named() -> None:
    request = parse_chat_request(chat(temperature=0.2, stream=True, user="u1"))
    assert request.model == "sc" and request.temperature == 0.2 and request.stream
    err = refused(chat(temprature=0.2))
    assert (err.status, err.param, err.code) == (400, "temprature", "unknown_parameter")
    assert "Did you mean 'temperature'?" in err.message
    err = refused(chat(branchwise={"overides": {}}))
    assert err.param == "branchwise.overides" and "Did you mean 'overrides'?" in err.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"seed": -1}, "seed"),
        ({"branchwise": {"seed": 2**32}}, "branchwise.seed"),
        ({"seed": 1, "branchwise": {"seed": 2}}, "seed"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ],
)
def test_fields_a_pipeline_cannot_honour_are_refused_naming_them(fields: dict[str, Any], param: str) -> None:
    err = refused(chat(**fields))
    assert err.status == 400 and err.param is not None and err.param.startswith(param), err.body()
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_a_seed_is_the_runs_from_either_field() -> None:
    assert parse_chat_request(chat(seed=7)).run_seed == 7
    assert parse_chat_request(chat(branchwise={"seed": 7})).run_seed == 7
    assert parse_chat_request(chat(seed=7, branchwise={"seed": 7})).run_seed == 7
    assert parse_chat_request(chat()).run_seed is None


def test_a_body_that_is_not_an_object_is_refused() -> None:
    assert refused([1, 2]).status == 400


def test_the_query_is_the_last_user_turn_after_a_transcript_and_system_turns_apart() -> None:
    def messages(*turns: tuple[str, Any]) -> list[Message]:
        return [Message.model_validate({"role": r, "content": c}) for r, c in turns]

    single = query_of(messages(("user", "What is 6 x 7?")), max_chars=100)
    assert single.text == "What is 6 x 7?" and single.system is None
    parts = query_of(
        messages(("user", [{"type": "text", "text": "6 x "}, {"type": "text", "text": "7?"}])), max_chars=99
    )
    assert parts.text == "6 x 7?"
    chat_ = query_of(
        messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("developer", "Use digits."),
                 ("user", "What is 6 x 7?")),
        max_chars=1000,
    )  # fmt: skip
    assert chat_.text == "user: Hi\nassistant: Hello!\nuser: What is 6 x 7?"
    assert chat_.system == "Be brief.\n\nUse digits."
    for bad, param in (
        (messages(("user", "q"), ("assistant", "a")), "messages"),
        (messages(("user", "  ")), "messages[0].content"),
        (messages(("user", "x" * 101)), "messages"),
    ):
        with pytest.raises(APIError) as caught:
            query_of(bad, max_chars=100)
        assert caught.value.param == param
    with pytest.raises(APIError, match="more than this server's limit of 100") as caught:
        query_of(messages(("user", "x" * 101)), max_chars=100)
    assert caught.value.code == "query_too_long"


# -- loading pipelines ---------------------------------------------------------------------------------------------
def test_pipelines_are_named_by_spec_or_stem_and_identical_engine_sections_share_one_engine(tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "sc.yaml").write_text(SC)
    (folder / "single.yml").write_text(SC.replace("name: sc\n", "").replace("self_consistency, n: 3", "single"))
    (folder / "notes.txt").write_text("not a pipeline")
    other = tmp_path / "other.yaml"
    other.write_text(SC.replace("name: sc", "name: other").replace("41.", "40."))
    loaded = PipelineSet.load([folder, other], ServerLimits())
    assert list(loaded.served) == ["sc", "single", "other"]
    assert len(loaded.engines) == 2  # sc and single share their engine section; other's differs
    assert loaded.served["sc"].engines["policy"] is loaded.served["single"].engines["policy"]
    assert loaded.served["other"].engines["policy"] is not loaded.served["sc"].engines["policy"]
    spec = loaded.served["sc"].spec
    assert spec.outputs.progress == "off" and spec.outputs.trace is None
    assert spec.budget.max_tokens == ServerLimits().max_run_tokens  # the server's cap fills an unset one
    assert spec.budget.wall_clock_s == ServerLimits().max_run_seconds


def test_loading_refuses_duplicates_missing_paths_and_specs_over_the_limits(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SC)
    (tmp_path / "b.yaml").write_text(SC)
    with pytest.raises(ConfigError, match="two pipelines are named 'sc'"):
        PipelineSet.load([tmp_path / "a.yaml", tmp_path / "b.yaml"], ServerLimits())
    with pytest.raises(ConfigError, match="does not exist"):
        PipelineSet.load([tmp_path / "missing.yaml"], ServerLimits())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no pipeline"):
        PipelineSet.load([tmp_path / "empty"], ServerLimits())
    with pytest.raises(SpecError, match=r"a.yaml:3: invalid pipeline spec at 'thought': self_consistency starts 3"):
        PipelineSet.load([tmp_path / "a.yaml"], ServerLimits(max_samples=2))
    (tmp_path / "c.yaml").write_text(SC.replace("name: sc", "name: c\nbudget: {max_tokens: 500000}"))
    with pytest.raises(SpecError, match=r"budget\.max_tokens.*at most this server's limit of 200000"):
        PipelineSet.load([tmp_path / "c.yaml"], ServerLimits())


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_runs"):
        ServerLimits(max_concurrent_runs=0)
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        ServerLimits(drain_timeout_s=-1)
    assert ServerLimits(max_queued=0).max_queued == 0


# -- variants ------------------------------------------------------------------------------------------------------
async def test_a_request_without_overrides_runs_the_pipeline_as_loaded(pipelines: PipelineSet) -> None:
    served = pipelines.get("sc")
    request = parse_chat_request(chat())
    lease = await pipelines.lease(served, request, query_of(request.messages, max_chars=100))
    assert lease.pipeline is served.pipeline
    await lease.release()


async def test_sampling_fields_system_turns_and_overrides_become_a_reused_variant(pipelines: PipelineSet) -> None:
    served = pipelines.get("sc")
    body = chat(
        temperature=0.3,
        max_tokens=5000,  # clipped to the server's 1000
        messages=[{"role": "system", "content": "Use digits."}, {"role": "user", "content": "6 x 7?"}],
        branchwise={"overrides": {"thought.n": 5, "thought.prompt.user": "Q: {question}"}, "budget": {"max_calls": 3}},
    )
    request = parse_chat_request(body)
    query = query_of(request.messages, max_chars=1000)
    overrides, params = pipelines.overrides(served, request, query)
    assert overrides["thought.max_tokens"] == 1000 and params["thought.max_tokens"] == "max_tokens"
    assert overrides["thought.prompt"] == {"user": "Q: {question}", "system": "Be brief.\n\nUse digits."}
    assert overrides["budget.max_calls"] == 3 and overrides["thought.n"] == 5
    lease = await pipelines.lease(served, request, query)
    pipeline = lease.pipeline
    assert pipeline is not served.pipeline and pipeline.strategy.n == 5  # type: ignore[attr-defined]
    assert pipeline.settings.temperature == 0.3 and pipeline.settings.max_tokens == 1000
    assert pipeline.prompt.system == "Be brief.\n\nUse digits." and pipeline.caps["max_calls"] == 3
    assert pipeline.engine is served.pipeline.engine  # the same engine
    again = await pipelines.lease(served, request, query)
    assert again.pipeline is pipeline  # built once, reused
    result = await pipeline.run(query.text)
    assert result.answer == "42" and result.usage.calls == 1
    await lease.release()
    await again.release()


@pytest.mark.parametrize(
    ("branchwise", "param", "code"),
    [
        ({"overrides": {"thought.nn": 5}}, "branchwise.overrides.thought.nn", "invalid_override"),
        ({"overrides": {"thought.n": "five"}}, "branchwise.overrides.thought.n", "invalid_override"),
        ({"overrides": {"engine.model": "other"}}, "branchwise.overrides.engine.model", "override_not_allowed"),
        ({"overrides": {"outputs.trace": "/tmp/x"}}, "branchwise.overrides.outputs.trace", "override_not_allowed"),
        ({"overrides": {"thought.n": 17}}, "branchwise.overrides.thought.n", "over_limit"),
        ({"overrides": {"thought.max_tokens": 1001}}, "branchwise.overrides.thought.max_tokens", "over_limit"),
        ({"budget": {"max_tokens": 10**9}}, "branchwise.budget.max_tokens", "over_limit"),
        ({"budget": {"max_tokens": None}}, "branchwise.budget.max_tokens", "over_limit"),
        ({"budget": {"max_tokns": 5}}, "branchwise.budget.max_tokns", "invalid_override"),
        ({"overrides": {"thought.prompt.system": "${HOME}"}}, "branchwise.overrides.thought.prompt.system", None),
    ],
)
async def test_bad_overrides_are_refused_naming_the_field(
    pipelines: PipelineSet, branchwise: dict[str, Any], param: str, code: str | None
) -> None:
    request = parse_chat_request(chat(branchwise=branchwise))
    with pytest.raises(APIError) as caught:
        await pipelines.lease(pipelines.get("sc"), request, query_of(request.messages, max_chars=100))
    err = caught.value
    assert (err.status, err.param, err.code) == (400, param, code), err.message
    if param.endswith("thought.nn"):
        assert "Did you mean 'n'?" in err.message


def test_an_unknown_model_is_404_with_the_closest_name(pipelines: PipelineSet) -> None:
    with pytest.raises(APIError, match="Did you mean 'sc'") as caught:
        pipelines.get("scc")
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, "model_not_found", "model")


async def test_evicted_variants_are_closed_once_their_last_run_ends(
    pipelines: PipelineSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("branchwise.serve.pipelines.VARIANT_CACHE", 1)
    served = pipelines.get("sc")

    async def lease(temperature: float) -> Any:
        request = parse_chat_request(chat(temperature=temperature))
        return await pipelines.lease(served, request, query_of(request.messages, max_chars=100))

    first = await lease(0.1)
    second = await lease(0.2)  # evicts the first, which is still in use
    assert not first.pipeline._closed
    await first.release()
    assert first.pipeline._closed
    await second.release()
    assert not second.pipeline._closed  # cached
    await pipelines.aclose()
    assert second.pipeline._closed and served.pipeline._closed


# -- admission -----------------------------------------------------------------------------------------------------
async def test_admission_runs_queues_refuses_and_hands_slots_over_in_order() -> None:
    admission = Admission(ServerLimits(max_concurrent_runs=1, max_queued=2, max_runs_per_key=2))
    first = await admission.acquire("a")
    second = asyncio.create_task(admission.acquire("b"))
    third = asyncio.create_task(admission.acquire("c"))
    await asyncio.sleep(0)
    assert admission.running == 1 and admission.queued == 2
    with pytest.raises(Overloaded) as caught:
        await admission.acquire("d")
    assert caught.value.reason == "queue_full" and caught.value.retry_after >= 1
    admission.release(first, run_seconds=2.0)
    ticket = await second
    assert not third.done() and admission.running == 1 and ticket.waited > 0
    third.cancel()  # a client that leaves the queue
    await asyncio.gather(third, return_exceptions=True)
    assert admission.queued == 0
    admission.release(ticket)
    admission.release(ticket)  # idempotent
    assert admission.running == 0


async def test_a_free_slot_is_taken_without_waiting_and_a_busy_server_says_to_queue() -> None:
    admission = Admission(ServerLimits(max_concurrent_runs=1, max_queued=1, max_runs_per_key=1))
    held = admission.try_acquire("a")
    assert held is not None and held.waited == 0.0 and admission.running == 1
    assert admission.try_acquire("b") is None and admission.queued == 0  # the caller queues with `acquire`
    with pytest.raises(Overloaded) as caught:
        admission.try_acquire("a")
    assert caught.value.reason == "key_limit"
    waiting = asyncio.create_task(admission.acquire("b"))
    await asyncio.sleep(0)
    admission.release(held)
    assert admission.try_acquire("c") is None  # the freed slot went to the request in line, not to a newcomer
    admission.release(await waiting)
    admission.drain()
    with pytest.raises(Draining):
        admission.try_acquire("c")
    assert admission.running == 0


async def test_admission_limits_each_key_and_refuses_everyone_once_draining() -> None:
    admission = Admission(ServerLimits(max_concurrent_runs=1, max_queued=5, max_runs_per_key=1))
    held = await admission.acquire("a")
    with pytest.raises(Overloaded) as caught:
        await admission.acquire("a")
    assert caught.value.reason == "key_limit"
    waiting = asyncio.create_task(admission.acquire("b"))
    await asyncio.sleep(0)
    admission.drain()
    with pytest.raises(Draining):
        await waiting
    with pytest.raises(Draining):
        await admission.acquire("c")
    admission.release(held)
    assert admission.running == 0


async def test_a_slot_granted_to_a_request_cancelled_at_that_moment_is_passed_on() -> None:
    admission = Admission(ServerLimits(max_concurrent_runs=1, max_queued=5))
    held = await admission.acquire("a")
    leaving = asyncio.create_task(admission.acquire("b"))
    staying = asyncio.create_task(admission.acquire("c"))
    await asyncio.sleep(0)
    admission.release(held)  # hands the slot to "b"...
    leaving.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(leaving, return_exceptions=True)
    ticket = await staying
    assert admission.running == 1
    admission.release(ticket)
    assert admission.running == 0


# -- metrics -------------------------------------------------------------------------------------------------------
def test_metrics_render_prometheus_text() -> None:
    metrics = Metrics(in_flight=lambda: 2, queued=lambda: 1)
    metrics.request("sc", 200)
    metrics.request("sc", 429)
    metrics.rejection("queue_full")
    metrics.run("sc", "ok", UsageSnapshot(prompt_tokens=10, completion_tokens=5, aborted_tokens=1), 0.3, exhausted=True)
    metrics.waited(0.0)
    engine = EngineGauges((("engine", "0"), ("model", "m")), unfinished=3, running=2, waiting=1, kv_cache_usage=0.25)
    assert "branchwise_engine" not in metrics.render()  # no engine reports its state: no engine gauges
    text = metrics.render([engine])
    assert 'branchwise_engine_requests{engine="0",model="m",state="unfinished"} 3' in text
    assert 'branchwise_engine_requests{engine="0",model="m",state="waiting"} 1' in text
    assert 'branchwise_engine_kv_cache_usage{engine="0",model="m"} 0.25' in text
    assert 'branchwise_requests_total{model="sc",status="429"} 1' in text
    assert "branchwise_runs_in_flight 2" in text and "branchwise_queue_depth 1" in text
    assert 'branchwise_tokens_total{model="sc",kind="prompt"} 10' in text
    assert 'branchwise_budget_exhausted_total{model="sc"} 1' in text
    assert 'branchwise_run_seconds_bucket{model="sc",le="0.25"} 0' in text
    assert 'branchwise_run_seconds_bucket{model="sc",le="0.5"} 1' in text
    assert 'branchwise_run_seconds_bucket{model="sc",le="+Inf"} 1' in text
    assert 'branchwise_run_seconds_count{model="sc"} 1' in text
    assert 'branchwise_rejected_total{reason="queue_full"} 1' in text
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
