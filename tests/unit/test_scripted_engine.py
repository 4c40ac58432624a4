"""The shipped fakes behave like a backend where the layers above can tell, and the Engine base meters calls."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from branchwise.engine import CallUsage, GenerationRequest
from branchwise.engine.base import CHAT_TEMPLATE_ALLOWANCE, estimate_prompt_tokens
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse, tokenize


def _req(**kw: object) -> GenerationRequest:
    kw.setdefault("prompt", "What is 2 + 2?")
    return GenerationRequest(**kw)  # type: ignore[arg-type]


async def test_generate_n_samples_with_logprobs() -> None:
    engine = ScriptedEngine([ScriptedResponse(["The answer is 4.", "It is 5"], logprobs=[[-0.5], [-1.0, -2.0]])])
    gen = await engine.generate(_req(n=3, logprobs=2))
    assert [c.text for c in gen.completions] == ["The answer is 4.", "It is 5", "The answer is 4."]
    first = gen.completions[0]
    assert first.num_tokens == len(tokenize("The answer is 4.")) == 4
    assert first.logprobs is not None and all(lp.logprob == -0.5 for lp in first.logprobs)
    assert [lp.logprob for lp in gen.completions[1].logprobs or ()] == [-1.0, -2.0, -2.0]
    assert len(first.logprobs[0].top) == 2
    assert gen.usage.completion_tokens == gen.completion_tokens == 4 + 3 + 4
    assert gen.usage.prompt_tokens == gen.prompt_tokens == len(tokenize("What is 2 + 2?"))
    assert gen.usage.num_samples == 3
    engine.assert_complete()


async def test_stream_reassembles_to_generate() -> None:
    text = "Step one. Step two.\nThe answer is 42."
    engine = ScriptedEngine([text, text])
    pieces: dict[int, list[str]] = {}
    finishes = {}
    async for delta in engine.stream(_req(n=2)):
        pieces.setdefault(delta.index, []).append(delta.text)
        if delta.finish_reason:
            finishes[delta.index] = delta.finish_reason
    gen = await engine.generate(_req(n=2))
    assert {i: "".join(p) for i, p in pieces.items()} == {0: text, 1: text}
    assert [c.text for c in gen.completions] == [text, text]
    assert finishes == {0: "stop", 1: "stop"}


async def test_max_tokens_and_stop_strings() -> None:
    engine = ScriptedEngine(default="one two three four five")
    cut = await engine.generate(_req(max_tokens=2))
    assert cut.text == "one two"
    assert cut.completions[0].finish_reason == "length"
    stopped = await engine.generate(_req(stop=[" four"]))
    assert stopped.text == "one two three"
    assert stopped.completions[0].finish_reason == "stop"
    assert stopped.completions[0].stop_reason == " four"
    # The stop string is reported on the stream's last delta only; the end of the text reports none.
    deltas = [d async for d in engine.stream(_req(stop=[" four"]))]
    assert [d.stop_reason for d in deltas] == [None, None, " four"]
    assert (await engine.generate(_req())).completions[0].stop_reason is None


async def test_function_engine_sees_request() -> None:
    async def reply(request: GenerationRequest) -> str:
        return f"n={request.n} t={request.temperature}"

    engine = FunctionEngine(reply)
    gen = await engine.generate(_req(n=1, temperature=0.3))
    assert gen.text == "n=1 t=0.3"
    assert engine.calls[0].temperature == 0.3


async def test_error_reply_is_raised_and_metered() -> None:
    usages: list[CallUsage] = []
    engine = ScriptedEngine([RuntimeError("backend down")])
    engine.add_usage_hook(lambda req, usage: usages.append(usage))
    with pytest.raises(RuntimeError, match="backend down"):
        await engine.generate(_req())
    assert len(usages) == 1 and usages[0].error == "RuntimeError" and not usages[0].aborted


async def test_usage_hook_reports_every_call_and_can_be_removed() -> None:
    usages: list[CallUsage] = []
    engine = ScriptedEngine(default="a b c")
    remove = engine.add_usage_hook(lambda req, usage: usages.append(usage))
    await engine.generate(_req())
    async for _ in engine.stream(_req(n=2)):
        pass
    remove()
    await engine.generate(_req())
    assert [u.completion_tokens for u in usages] == [3, 6]
    assert all(u.ttft_s is not None and u.latency_s >= u.ttft_s for u in usages)
    assert all(u.prompt_tokens > 0 and not u.aborted for u in usages)


async def test_broken_hook_does_not_break_generation(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(default="ok")

    def broken(req: GenerationRequest, usage: CallUsage) -> None:
        raise ValueError("observer bug")

    engine.add_usage_hook(broken)
    assert (await engine.generate(_req())).text == "ok"
    assert "usage hook" in caplog.text


async def test_cancelling_consumer_aborts_stream_and_reports_partial_usage() -> None:
    usages: list[CallUsage] = []
    engine = ScriptedEngine(default=" ".join(["tok"] * 1000), token_delay=0.001)
    engine.add_usage_hook(lambda req, usage: usages.append(usage))
    got_some = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in engine.stream(_req(max_tokens=1000)):
            count += 1
            if count == 5:
                got_some.set()

    task = asyncio.create_task(consume())
    await got_some.wait()
    assert engine.active == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert engine.active == 0 and engine.aborted == 1
    assert len(usages) == 1 and usages[0].aborted and 5 <= usages[0].completion_tokens < 1000


async def test_closing_stream_early_aborts() -> None:
    engine = ScriptedEngine(default="a b c d e f g h")
    stream = engine.stream(_req())
    async with contextlib.aclosing(stream):
        async for delta in stream:
            assert delta.text == "a"
            break
    assert engine.active == 0 and engine.aborted == 1


async def test_assert_complete_flags_unused_replies() -> None:
    engine = ScriptedEngine(["one", "two"])
    await engine.generate(_req())
    with pytest.raises(AssertionError, match="1 scripted replies"):
        engine.assert_complete()
    with pytest.raises(AssertionError, match="exhausted"):
        await ScriptedEngine([]).generate(_req())


async def test_chat_requests_render() -> None:
    engine = ScriptedEngine(["hello"])
    gen = await engine.generate(GenerationRequest(messages=[{"role": "user", "content": "hi there"}]))
    assert gen.prompt_tokens == len(tokenize("<user> hi there"))


async def test_closed_engine_refuses() -> None:
    async with ScriptedEngine(default="x") as engine:
        await engine.generate(_req())
    with pytest.raises(Exception, match="closed"):
        await engine.generate(_req())


async def test_prompt_tokens_are_known_before_the_call_and_match_what_it_reports() -> None:
    engine = ScriptedEngine(default="ok")
    for request in (
        GenerationRequest(prompt="Tom has 3 boxes of 12 eggs."),
        GenerationRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]),
    ):
        before = engine.count_prompt_tokens(request)
        assert before == (await engine.generate(request)).prompt_tokens


@pytest.mark.parametrize(
    "text", ["What is 2+2?", "naïve café — 東京 🚀", "x" * 500, "A train goes 60 mph for 3 hours. How far?"]
)
def test_the_default_prompt_estimate_bounds_a_byte_level_tokenizer(text: str) -> None:
    # Engines that cannot count reserve estimate_prompt_tokens; a byte-level BPE token covers at least one byte.
    chat = GenerationRequest(messages=[{"role": "user", "content": text}])
    raw = GenerationRequest(prompt=text)
    assert estimate_prompt_tokens(raw) >= len(text.encode()) + 1  # + BOS
    assert estimate_prompt_tokens(chat) >= len(text.encode()) + sum(CHAT_TEMPLATE_ALLOWANCE)  # room for a template
    assert ScriptedEngine().count_prompt_tokens(chat) <= estimate_prompt_tokens(chat)


async def test_prompt_logprobs_come_back_from_generate_through_a_budget() -> None:
    from branchwise.budget import Budget

    engine = ScriptedEngine(default="4", prompt_logprob=lambda token: -2.0 if "2" in token else -0.5)
    assert engine.capabilities.prompt_logprobs
    plain = await engine.generate(_req())
    assert plain.prompt_logprobs is None  # only when asked
    for source in (engine, Budget().bind(engine)):
        generation = await source.generate(_req(prompt_logprobs=0))
        assert generation.prompt_logprobs is not None
        first, *rest = generation.prompt_logprobs
        assert first is None  # the first token has no context
        assert [(t.token, t.logprob) for t in rest if t is not None] == [
            (" is", -0.5),
            (" 2", -2.0),
            (" +", -0.5),
            (" 2?", -2.0),
        ]
        # Only the last positions, as a backend reading the rest from its prefix cache returns them.
        tail = await source.generate(_req(prompt_logprobs=0, prompt_logprobs_last=2))
        assert tail.prompt_logprobs is not None and len(tail.prompt_logprobs) == len(generation.prompt_logprobs)
        assert tail.prompt_logprobs[:-2] == (None,) * 3 and tail.prompt_logprobs[-2:] == tuple(rest[-2:])
