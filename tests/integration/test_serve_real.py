"""`branchwise serve` on the real embedded engine: a `branchwise serve` process with two SmolLM2 pipelines (one
shared engine), driven by the official openai client (sync, async, streaming); a client that leaves mid-stream
has its engine requests aborted inside vLLM; SIGTERM with a run in flight stops the server cleanly."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_process import ServeProcess, serve_process

pytestmark = [pytest.mark.engine, pytest.mark.server, pytest.mark.timeout(600)]

ENGINE = (  # chunked prefill off: seeded requests need it on CPU; prefix caching off and one sequence at a time: a
    # cached prompt or another batch makeup changes the logits' last bits on some CPUs, and seeded samples drift apart
    "engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 2048, enable_prefix_caching: false, "
    "engine_args: {enable_chunked_prefill: false, max_num_seqs: 1}}"
)
SC = f"name: sc\n{ENGINE}\nthought: {{strategy: self_consistency, n: 4, temperature: 0.8, max_tokens: 96}}\n"
LONG = f"name: long\n{ENGINE}\nthought: {{strategy: self_consistency, n: 16, temperature: 1.3, max_tokens: 1800}}\n"
Q = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
COUNT = [{"role": "user", "content": "Write a very long story about a dragon and a city, at least 3000 words."}]
LOAD_S = 300.0  # loading the model on a busy 2-core machine


def specs(folder: Path) -> list[Path]:
    paths = [folder / "sc.yaml", folder / "long.yaml"]
    for path, text in zip(paths, (SC, LONG), strict=True):
        path.write_text(text)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pristine_env: dict[str, str]) -> Iterator[ServeProcess]:
    folder = tmp_path_factory.mktemp("serve-real")
    with serve_process(specs(folder), env=pristine_env, ready_timeout=LOAD_S) as served:
        yield served


def metrics(served: ServeProcess) -> dict[str, float]:
    text = httpx.get(served.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE) if not m[1].startswith("#")}


def engine_requests(served: ServeProcess) -> dict[str, float]:
    """The engine's requests by state (unfinished, running, waiting)."""
    out = {}
    for name, value in metrics(served).items():
        found = re.fullmatch(r'branchwise_engine_requests\{.*state="(\w+)"\}', name)
        if found:
            out[found[1]] = value
    return out


def test_the_sync_client_gets_an_answer_with_every_token_counted(server: ServeProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model="sc", messages=Q)  # type: ignore[arg-type]
    section = (reply.model_extra or {})["branchwise"]
    assert reply.choices[0].finish_reason in ("stop", "length") and section["strategy"] == "self_consistency"
    assert reply.usage is not None and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    trace = httpx.get(f"{server.base_url}/traces/{section['trace_id']}", timeout=30)
    assert trace.status_code == 200 and '"kind":"run_end"' in trace.text.replace(" ", "")
    assert sorted(m.id for m in client.models.list().data) == ["long", "sc"]
    gauges = [name for name in metrics(server) if name.startswith("branchwise_engine_kv_cache_usage{")]
    assert len(gauges) == 1  # the two pipelines name the same engine section: one engine


async def test_the_async_client_runs_concurrently_and_a_seed_reproduces_a_run(server: ServeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    replies = await asyncio.gather(
        *(client.chat.completions.create(model="sc", messages=Q, max_tokens=48) for _ in range(3))  # type: ignore[arg-type]
    )
    assert all(r.usage is not None and r.usage.completion_tokens > 0 for r in replies)
    seeded = [
        await client.chat.completions.create(model="sc", messages=Q, seed=seed, max_tokens=48)  # type: ignore[arg-type]
        for seed in (5, 5)
    ]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
    assert seeded[0].usage == seeded[1].usage
    await client.close()


def test_streaming_ends_with_the_answer_usage_and_done(server: ServeProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    chunks = list(
        client.chat.completions.create(
            model="sc",
            messages=Q,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_a_client_leaving_mid_stream_aborts_its_requests_inside_vllm(server: ServeProcess) -> None:
    before = metrics(server).get('branchwise_runs_total{model="long",outcome="disconnected"}', 0.0)
    body = {"model": "long", "messages": COUNT, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the stream, as a client leaving does
        next(lines)  # the role chunk: the run started
        deadline = time.monotonic() + 120
        while engine_requests(server).get("running", 0) < 1:  # vLLM is generating its samples
            assert time.monotonic() < deadline, (metrics(server), server.lines[-20:])
            time.sleep(0.5)
    deadline = time.monotonic() + 60
    while any(engine_requests(server).values()):  # unfinished, running and waiting all back to zero
        assert time.monotonic() < deadline, f"vLLM still holds requests: {engine_requests(server)}"
        time.sleep(0.5)
    runs = metrics(server)
    assert runs['branchwise_runs_total{model="long",outcome="disconnected"}'] == before + 1
    assert runs.get('branchwise_runs_total{model="long",outcome="ok"}', 0.0) == 0  # it never ran to its end


def test_sigterm_with_a_run_in_flight_stops_the_server(tmp_path: Path, pristine_env: dict[str, str]) -> None:
    with serve_process(specs(tmp_path), "--drain-timeout", "2", env=pristine_env, ready_timeout=LOAD_S) as served:
        body = {"model": "long", "messages": COUNT, "stream": True}
        with httpx.stream("POST", f"{served.base_url}/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            served.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert served.proc.wait(120) == 130, served.stderr()[-4000:]
    assert '"code":"server_shutting_down"' in rest[-2] and rest[-1] == "data: [DONE]"
    assert "1 run cancelled at shutdown" in served.stderr()
