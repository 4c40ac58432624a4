"""OpenAIEngine against a real ``vllm serve`` (vLLM's OpenAI-compatible server) with the default offline model.

One server is started for the module (tens of seconds on CPU) and stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from branchwise.engine import CallUsage, GenerationRequest, StructuredOutput
from branchwise.engine.base import assemble
from branchwise.engine.openai_engine import OpenAIEngine
from branchwise.errors import EngineRequestError

pytestmark = [pytest.mark.server, pytest.mark.engine, pytest.mark.timeout(700)]

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
# Starting takes 20-60 s on an idle machine; several minutes when other engines share the 2 cores.
START_DEADLINE_S = 600.0
# Each started server's log, by API root: a failing test shows its tail.
_SERVER_LOGS: dict[str, Path] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, pristine_env: dict[str, str]) -> Iterator[str]:
    """Start ``vllm serve`` on a free local port; yield its API root (``http://127.0.0.1:PORT/v1``)."""
    from branchwise.engine.models import pull

    model_path = pull(MODEL)
    port = _free_port()
    log_path: Path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**pristine_env, "VLLM_CPU_KVCACHE_SPACE": "2"}
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--served-model-name",
        MODEL,
        # One worker inside the engine-core process: spawning a separate worker costs a minute on a busy CPU.
        "--distributed-executor-backend",
        "uni",
    ]
    base = f"http://127.0.0.1:{port}/v1"
    _SERVER_LOGS[base] = log_path
    with log_path.open("wb") as log:
        # Own session: the server's engine-core child can be stopped with it if it does not exit on its own.
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"vllm serve exited with {proc.returncode}:\n{_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{base}/models").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer within {START_DEADLINE_S} s:\n{_tail(log_path)}")
                time.sleep(0.5)  # an external process starting up: nothing to wait on but its socket
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _running_requests(base: str) -> float:
    """``vllm:num_requests_running`` from the server's Prometheus endpoint (summed over engines)."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        text = (await client.get(base.removesuffix("/v1") + "/metrics")).text
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running")
    ]
    assert values, "vllm:num_requests_running missing from /metrics"
    return sum(values)


async def _poll_running(base: str, until: Callable[[float], bool], seconds: float) -> float:
    """Poll the running-requests gauge every 0.2 s until ``until`` holds or ``seconds`` pass; the last value."""
    deadline = time.monotonic() + seconds
    running = await _running_requests(base)
    while not until(running) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        running = await _running_requests(base)
    return running


async def test_start_reads_the_served_model(vllm_server: str) -> None:
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None) as engine:
        await engine.start()
        assert engine.capabilities.max_model_len == 2048


async def test_completion_n2_with_logprobs(vllm_server: str) -> None:
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None) as engine:
        usages: list[CallUsage] = []
        engine.add_usage_hook(lambda r, u: usages.append(u))
        gen = await engine.generate(
            GenerationRequest(prompt="The capital of France is", n=2, temperature=0.8, max_tokens=12, logprobs=2)
        )
    assert [c.index for c in gen.completions] == [0, 1]
    for c in gen.completions:
        assert c.num_tokens >= 1 and all(t >= 0 for t in c.token_ids)  # real ids from the server
        assert c.finish_reason in ("stop", "length")
        assert c.logprobs is not None and len(c.logprobs) == c.num_tokens
        for tid, lp in zip(c.token_ids, c.logprobs, strict=True):
            assert lp.token_id == tid and lp.logprob <= 0.0
            assert 1 <= len(lp.top) <= 2
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            assert lp.logprob <= lp.top[0][1] + 1e-6
    assert gen.prompt_tokens == usages[0].prompt_tokens > 3
    assert usages[0].completion_tokens == sum(c.num_tokens for c in gen.completions)


async def test_chat_completion(vllm_server: str) -> None:
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None) as engine:
        gen = await engine.generate(GenerationRequest(messages=QUESTION, temperature=0.0, max_tokens=30))
    c = gen.completions[0]
    assert c.text.strip() and c.num_tokens >= 1 and all(t >= 0 for t in c.token_ids)
    assert gen.prompt_tokens > 10  # the chat template wraps the question


async def test_stream_reassembles_to_generate(vllm_server: str) -> None:
    req = GenerationRequest(messages=QUESTION, temperature=0.0, max_tokens=40, logprobs=0)
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None) as engine:
        usages: list[CallUsage] = []
        engine.add_usage_hook(lambda r, u: usages.append(u))
        deltas = [d async for d in engine.stream(req)]
        gen = await engine.generate(req)
    (streamed,) = assemble(1, deltas)
    whole = gen.completions[0]
    assert len(deltas) > 3  # it really streamed in increments
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert streamed.text == whole.text and streamed.token_ids == whole.token_ids  # greedy: same tokens
    assert streamed.finish_reason == whole.finish_reason
    assert usages[0].prompt_tokens == gen.prompt_tokens and usages[0].completion_tokens == whole.num_tokens


async def test_structured_choice_and_json_schema(vllm_server: str) -> None:
    # Bounded fields only: with an unbounded integer the small model once ran digits up to max_tokens.
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
            "is_capital": {"type": "boolean"},
        },
        "required": ["city", "country", "is_capital"],
        "additionalProperties": False,
    }
    prompt = [{"role": "user", "content": "As JSON: the largest city of Japan, its country, and is it the capital?"}]
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None) as engine:
        choice = await engine.generate(
            GenerationRequest(
                messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
                n=3,
                temperature=1.0,
                max_tokens=5,
                structured=StructuredOutput(choices=("yes", "no")),
            )
        )
        as_json = await engine.generate(
            GenerationRequest(
                messages=prompt, temperature=0.0, max_tokens=120, structured=StructuredOutput(json_schema=schema)
            )
        )
    assert all(c.text in ("yes", "no") for c in choice.completions)
    data = json.loads(as_json.text)
    assert set(schema["required"]) <= set(data)
    assert isinstance(data["city"], str) and len(data["city"]) <= 20 and isinstance(data["is_capital"], bool)


async def test_rejected_request_is_typed(vllm_server: str) -> None:
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None, max_retries=0) as engine:
        with pytest.raises(EngineRequestError) as info:
            await engine.generate(GenerationRequest(prompt="hi " * 3000, max_tokens=8))
    assert info.value.status_code == 400
    assert "2048" in str(info.value)  # the server's own message (context length) is passed on


async def test_cancelling_the_stream_aborts_the_request_on_the_server(vllm_server: str) -> None:
    req = GenerationRequest(prompt="Count: 1, 2, 3,", max_tokens=1500, ignore_eos=True, temperature=0.5)
    # The test is about the abort, not about a slow server: a CI machine shared with other jobs once paused this
    # stream for over 30 s (the default idle limit), so the limit here is longer than the whole request.
    async with OpenAIEngine(MODEL, vllm_server, api_key_env=None, idle_timeout_s=300.0) as engine:
        usages: list[CallUsage] = []
        engine.add_usage_hook(lambda r, u: usages.append(u))
        got_some = asyncio.Event()

        async def consume() -> None:
            count = 0
            async for _ in engine.stream(req):
                count += 1
                if count == 5:
                    got_some.set()

        task = asyncio.create_task(consume())
        waiter = asyncio.create_task(got_some.wait())
        await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # a failure of the stream itself shows here
        assert got_some.is_set(), f"no 5 tokens within 60 s; server log:\n{_tail(_SERVER_LOGS[vllm_server])}"
        # The gauge is the server's view and may lag the first tokens: wait until it shows the request.
        running_before = await _poll_running(vllm_server, until=lambda running: running >= 1, seconds=10.0)
        if task.done():
            task.result()
            pytest.fail("the 1500-token stream ended before it was cancelled")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert running_before >= 1
    assert usages[0].aborted and 5 <= usages[0].completion_tokens < 1500
    # The metric is the server's view, updated after its next engine step: poll it for a while. Without the
    # abort the request would keep running for the ~1 minute its 1500 tokens take.
    running = await _poll_running(vllm_server, until=lambda running: running == 0, seconds=15.0)
    assert running == 0, f"the server still runs the request; its log:\n{_tail(_SERVER_LOGS[vllm_server])}"
