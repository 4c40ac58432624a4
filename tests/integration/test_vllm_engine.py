"""VLLMEngine on the real embedded vLLM with the default offline model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time

import psutil
import pytest

from branchwise.engine import CallUsage, GenerationRequest, StructuredOutput
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.errors import ConfigError, EngineRequestError, EngineUnavailable

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

QUESTION = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]


async def test_n_samples_with_logprobs(vllm_engine: VLLMEngine) -> None:
    req = GenerationRequest(messages=QUESTION, n=4, temperature=0.8, max_tokens=24, logprobs=3)
    gen = await vllm_engine.generate(req)
    assert [c.index for c in gen.completions] == [0, 1, 2, 3]
    for c in gen.completions:
        assert c.num_tokens >= 1
        assert c.finish_reason in ("stop", "length")
        assert c.logprobs is not None
        assert len(c.logprobs) == c.num_tokens
        for tok_id, lp in zip(c.token_ids, c.logprobs, strict=True):
            assert lp.token_id == tok_id
            assert lp.logprob <= 0.0
            assert 1 <= len(lp.top) <= 3
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            # the sampled token is either among the top-3 or less likely than all of them
            assert lp.logprob <= lp.top[0][1] + 1e-6
    assert gen.prompt_tokens == gen.usage.prompt_tokens > 10
    assert gen.usage.completion_tokens == sum(c.num_tokens for c in gen.completions)
    assert gen.usage.ttft_s is not None
    assert 0 < gen.usage.ttft_s <= gen.usage.latency_s


async def test_n_samples_are_one_vllm_request(vllm_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = vllm_engine._llm
    assert llm is not None
    calls: list[int] = []
    original = llm.generate

    def counting(prompt, params, request_id, **kw):  # type: ignore[no-untyped-def]
        calls.append(params.n)
        return original(prompt, params, request_id, **kw)

    monkeypatch.setattr(llm, "generate", counting)
    gen = await vllm_engine.generate(GenerationRequest(prompt="Once upon a time", n=6, max_tokens=8))
    assert len(gen.completions) == 6
    assert calls == [6]


async def test_stream_reassembles_to_generate(vllm_engine: VLLMEngine) -> None:
    req = GenerationRequest(messages=QUESTION, temperature=0.0, max_tokens=40, logprobs=0)
    pieces: list[str] = []
    ids: list[int] = []
    finish = None
    async for delta in vllm_engine.stream(req):
        assert delta.index == 0
        pieces.append(delta.text)
        ids.extend(delta.token_ids)
        assert delta.logprobs is not None
        assert len(delta.logprobs) == len(delta.token_ids)
        finish = delta.finish_reason or finish
    gen = await vllm_engine.generate(req)
    c = gen.completions[0]  # greedy: the stream and the one-shot call agree token for token
    assert "".join(pieces) == c.text
    assert tuple(ids) == c.token_ids
    assert finish == c.finish_reason
    assert len(pieces) > 3  # it really streamed in increments


async def test_stream_interleaves_n_samples(vllm_engine: VLLMEngine) -> None:
    req = GenerationRequest(messages=QUESTION, n=3, temperature=0.9, max_tokens=30)
    texts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finished: set[int] = set()
    async for delta in vllm_engine.stream(req):
        assert delta.index not in finished  # nothing arrives for a sample after its last delta
        texts[delta.index].append(delta.text)
        if delta.finish_reason:
            finished.add(delta.index)
    assert finished == {0, 1, 2}
    assert all(len(parts) > 1 for parts in texts.values())


async def test_cancelling_stream_consumer_aborts_in_vllm(vllm_engine: VLLMEngine) -> None:
    usages: list[CallUsage] = []
    remove = vllm_engine.add_usage_hook(lambda req, usage: usages.append(usage))
    req = GenerationRequest(prompt="Count to a million:", n=4, max_tokens=1500, ignore_eos=True)
    progressing = asyncio.Event()

    async def consume() -> None:
        seen = 0
        async for delta in vllm_engine.stream(req):
            seen += len(delta.token_ids)
            if seen >= 20:
                progressing.set()

    task = asyncio.create_task(consume())
    await progressing.wait()
    busy = await vllm_engine.engine_state()
    assert busy.unfinished_requests >= 1
    assert busy.core_has_work
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    idle = await vllm_engine.wait_idle(timeout=30)
    remove()
    assert idle.idle
    assert idle.num_running == 0
    assert idle.num_waiting == 0
    assert len(usages) == 1
    assert usages[0].aborted
    assert 20 <= usages[0].completion_tokens < 4 * 1500


async def test_closing_stream_early_aborts_in_vllm(vllm_engine: VLLMEngine) -> None:
    req = GenerationRequest(prompt="List every prime number:", max_tokens=1500, ignore_eos=True)
    stream = vllm_engine.stream(req)
    async with contextlib.aclosing(stream):
        async for delta in stream:
            if delta.token_ids:
                break
    idle = await vllm_engine.wait_idle(timeout=30)
    assert idle.idle


async def test_cancelling_generate_task_aborts(vllm_engine: VLLMEngine) -> None:
    req = GenerationRequest(prompt="Write a long story:", n=2, max_tokens=1500, ignore_eos=True)
    task = asyncio.create_task(vllm_engine.generate(req))
    # vLLM offers no event for "request admitted": poll its own request count.
    while (await vllm_engine.engine_state()).unfinished_requests == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (await vllm_engine.wait_idle(timeout=30)).idle


# Every field is bounded: with an unbounded integer the small model once ran digits up to max_tokens.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 99_999_999},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def city_request(n: int) -> GenerationRequest:
    # Seeded: with free whitespace this model now and then loops on blank lines until the token cap.
    return GenerationRequest(
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        n=n,
        max_tokens=200,
        temperature=0.7,
        seed=7,
        structured=StructuredOutput(json_schema=CITY_SCHEMA),
    )


def check_city(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "population"}
    assert isinstance(value["city"], str) and len(value["city"]) <= 20
    assert isinstance(value["population"], int) and 0 <= value["population"] <= 99_999_999


async def test_structured_json_schema(vllm_engine: VLLMEngine) -> None:
    gen = await vllm_engine.generate(city_request(2))
    for c in gen.completions:
        assert c.finish_reason == "stop", c.text  # the grammar closed the object before the token cap
        check_city(c.text)


async def test_compact_json_engine_lays_json_out_on_one_line(vllm_engine: VLLMEngine) -> None:
    # The shared engine (free whitespace) lays most of these objects out over several lines.
    spread = await vllm_engine.generate(city_request(6))
    assert any("\n" in c.text for c in spread.completions)
    async with VLLMEngine("smollm2-135m-instruct", max_model_len=1024, seed=0, compact_json=True) as engine:
        gen = await engine.generate(city_request(6))
    for c in gen.completions:
        assert c.finish_reason == "stop", c.text
        # No free whitespace: no newline (a raw one cannot sit inside a JSON string), no space after the brace.
        assert "\n" not in c.text and c.text.startswith('{"'), c.text
        check_city(c.text)


async def test_structured_choices_and_regex(vllm_engine: VLLMEngine) -> None:
    choice = await vllm_engine.generate(
        GenerationRequest(
            messages=[{"role": "user", "content": "Is water wet?"}],
            n=3,
            max_tokens=5,
            structured=StructuredOutput(choices=("yes", "no")),
        )
    )
    assert all(c.text in ("yes", "no") for c in choice.completions)
    regex = await vllm_engine.generate(
        GenerationRequest(
            messages=[{"role": "user", "content": "Give a date."}],
            max_tokens=20,
            structured=StructuredOutput(regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
        )
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.text)


async def test_chat_template_rendering(vllm_engine: VLLMEngine) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    rendered = vllm_engine.render(GenerationRequest(messages=messages))
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in rendered
    assert "<|im_start|>user\nName a colour.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    partial = [*messages, {"role": "assistant", "content": "The colour is"}]
    cont = vllm_engine.render(GenerationRequest(messages=partial, continue_final_message=True))
    assert cont.endswith("<|im_start|>assistant\nThe colour is")
    gen = await vllm_engine.generate(
        GenerationRequest(messages=partial, continue_final_message=True, max_tokens=5, temperature=0)
    )
    assert gen.completions[0].num_tokens >= 1
    # the continuation's prompt is the prefix: its token count is what vLLM saw
    assert gen.prompt_tokens == vllm_engine.count_tokens(cont)


async def test_stop_strings_and_max_tokens(vllm_engine: VLLMEngine) -> None:
    gen = await vllm_engine.generate(
        GenerationRequest(prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=["8"])
    )
    c = gen.completions[0]
    assert "8" not in c.text
    assert c.finish_reason == "stop"
    short = await vllm_engine.generate(GenerationRequest(prompt="1, 2, 3,", max_tokens=3, ignore_eos=True))
    assert short.completions[0].num_tokens == 3
    assert short.completions[0].finish_reason == "length"


async def test_per_request_seed_reproducible(vllm_engine: VLLMEngine) -> None:
    req = GenerationRequest(prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=1234)
    first = await vllm_engine.generate(req)
    second = await vllm_engine.generate(req)
    assert first.text == second.text


async def test_prefix_cache_hit_for_shared_prompt(vllm_engine: VLLMEngine) -> None:
    prefix = "Here is a long shared context. " * 40
    before = await vllm_engine.engine_state()
    await vllm_engine.generate(GenerationRequest(prompt=prefix + "First question?", max_tokens=2))
    await vllm_engine.generate(GenerationRequest(prompt=prefix + "Second question?", max_tokens=2))
    after = await vllm_engine.wait_idle()
    assert after.prefix_cache_hits > before.prefix_cache_hits


async def test_prompt_logprobs_of_an_appended_step_read_the_rest_from_the_prefix_cache(
    vllm_engine: VLLMEngine,
) -> None:
    context = "Here is a long shared context about apples and pears. " * 30
    step = " So she has 12 apples left, and 7 pears."
    seen = await vllm_engine.generate(GenerationRequest(prompt=context, max_tokens=1, temperature=0.0))
    whole = GenerationRequest(prompt=context + step, max_tokens=1, temperature=0.0, prompt_logprobs=0)
    full = await vllm_engine.generate(whole)  # every position: vLLM skips its cache for prompt logprobs
    k = full.prompt_tokens - seen.prompt_tokens
    assert full.prompt_logprobs is not None and all(t is not None for t in full.prompt_logprobs[1:])
    tail = await vllm_engine.generate(whole.replace(prompt_logprobs_last=k))
    assert tail.prompt_logprobs is not None and len(tail.prompt_logprobs) == full.prompt_tokens
    assert tail.prompt_logprobs[1] is None  # the context came from the cache: no logprobs for it
    assert tail.usage.prompt_tokens == full.prompt_tokens  # one prefill, counted once
    got = [t.logprob for t in tail.prompt_logprobs[-k:] if t is not None]
    want = [t.logprob for t in full.prompt_logprobs[-k:] if t is not None]
    assert len(got) == len(want) == k
    # A cached prefix changes the logits' last bits on some CPUs (see branchwise.engine.seeding).
    assert got == pytest.approx(want, abs=0.05)
    # A tail the cache also holds (this very prompt again, every position wanted): the prompt is run again
    # without the cache, and both runs are counted.
    again = await vllm_engine.generate(whole.replace(prompt_logprobs_last=full.prompt_tokens - 1))
    assert again.prompt_logprobs is not None and all(t is not None for t in again.prompt_logprobs[1:])
    assert again.usage.prompt_tokens == 2 * full.prompt_tokens
    assert [t.logprob for t in again.prompt_logprobs[1:] if t is not None] == pytest.approx(
        [t.logprob for t in full.prompt_logprobs[1:] if t is not None], abs=0.05
    )


async def test_prompt_too_long_is_typed_error(vllm_engine: VLLMEngine) -> None:
    with pytest.raises(EngineRequestError):
        await vllm_engine.generate(GenerationRequest(prompt="word " * 5000, max_tokens=4))
    assert (await vllm_engine.wait_idle()).idle


async def test_bad_structured_outputs_config_is_a_config_error() -> None:
    engine = VLLMEngine(engine_args={"structured_outputs_config": {"no_such_field": 1}})
    with pytest.raises(ConfigError, match="invalid vLLM engine argument"):
        await engine.start()
    assert not engine.started


def _load_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("branchwise-vllm-start")]


def _engine_children() -> set[int]:
    """This process's child processes, less multiprocessing's resource tracker (started once, kept)."""
    children = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            alive = child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            if alive and not any("resource_tracker" in part for part in child.cmdline()):
                children.add(child.pid)
    return children


async def test_cancelled_start_returns_at_once_and_a_later_start_joins_the_load() -> None:
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=1024, seed=0)
    task = asyncio.create_task(engine.start())
    await asyncio.sleep(1.0)  # the load takes 10 s or more
    cancelled_at = time.perf_counter()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert time.perf_counter() - cancelled_at < 1.0  # Ctrl-C does not wait for the weights
    assert not engine.started
    (load,) = _load_threads()  # the load goes on in the background
    try:
        await engine.start()  # joins the load in flight instead of starting a second one
        assert engine.started and all(t is load for t in _load_threads())
        gen = await engine.generate(GenerationRequest(prompt="The sky is", max_tokens=4))
        assert gen.completions[0].num_tokens >= 1
    finally:
        await engine.aclose()


async def test_closing_while_loading_shuts_the_loaded_engine_down() -> None:
    before = _engine_children()
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=1024, seed=0)
    task = asyncio.create_task(engine.start())
    await asyncio.sleep(1.0)
    (load,) = _load_threads()
    await engine.aclose()  # returns without waiting for the load
    assert load.is_alive()
    with pytest.raises(EngineUnavailable, match="closed while it was starting"):
        await task
    await asyncio.to_thread(load.join, 300)
    assert not load.is_alive() and not engine.started
    for _ in range(50):  # vLLM reaps its engine core process within its own shutdown; allow a little slack
        if not _engine_children() - before:
            break
        await asyncio.sleep(0.2)
    assert not _engine_children() - before
    with pytest.raises(EngineUnavailable, match="closed"):
        await engine.start()
