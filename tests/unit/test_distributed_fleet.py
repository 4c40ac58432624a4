"""The scale-out path without Ray: one ``openai`` engine balanced over a fleet of OpenAI-compatible servers
(two in-test servers on 127.0.0.1, tests/fault_server.py), one of which dies in the middle of an evaluation."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fault_server import FaultServer, Received, reply

from branchwise.budget import Budget
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.pipelines import EvalSettings, evaluate_pipelines, pipeline_configs
from branchwise.evals.store import ResultsStore
from branchwise.orchestrator.spec import load_spec

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

PROBLEMS = 30
QUESTION = re.compile(r"Q(\d+) What is")


def answering(server: FaultServer, *, dies_at: int | None = None) -> Any:
    """A server that answers each problem right (twice its number), until its ``dies_at``-th completion request:
    that one and every later one lose their connection, and it stops accepting new connections."""
    served = {"completions": 0}

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if req.path.endswith("/models"):
            return await reply({"object": "list", "data": [{"id": "m", "max_model_len": 4096}]})(req, reader, writer)
        served["completions"] += 1
        if dies_at is not None and served["completions"] >= dies_at:
            assert server._server is not None
            server._server.close()  # the process is gone: no new connections
            return False  # and the request in flight loses its connection
        text = json.dumps(req.body)
        found = QUESTION.search(text)
        assert found, text
        content = f"The answer is {2 * int(found.group(1))}."
        n = int(req.body.get("n", 1))
        if req.path.endswith("/chat/completions"):
            choices = [
                {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                for i in range(n)
            ]
        else:
            choices = [{"index": i, "text": content, "finish_reason": "stop"} for i in range(n)]
        body = {"choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": 5 * n}}
        return await reply(body)(req, reader, writer)

    return behave


async def test_an_eval_over_a_fleet_survives_an_endpoint_that_dies_mid_run(
    fault_server: FaultServer, fault_server_b: FaultServer, tmp_path: Path
) -> None:
    fault_server.default = answering(fault_server, dies_at=6)
    fault_server_b.default = answering(fault_server_b)
    data = tmp_path / "data.jsonl"
    rows = [{"question": f"Q{i} What is {i}*2?", "answer": f"#### {2 * i}"} for i in range(1, PROBLEMS + 1)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = load_spec(
        yaml.safe_dump(
            {
                "name": "fleet",
                "engine": {
                    "backend": "openai",
                    "model": "m",
                    "base_url": [fault_server.url, fault_server_b.url],
                    "api_key_env": None,
                    "backoff_base_s": 0.01,
                    "first_byte_timeout_s": 5.0,
                },
                "thought": {"strategy": "self_consistency", "n": 2, "max_tokens": 32},
            }
        )
    )
    benchmark = load_benchmark("gsm8k", str(data), None)
    configs = pipeline_configs(spec, benchmark, [])
    with ResultsStore(tmp_path / "r.db") as store:
        (summary,) = await evaluate_pipelines(
            benchmark, configs, store, Budget(), EvalSettings(concurrency=4, hash_weights=False)
        )
        stored = store.rows()
    assert summary.configs[0].stored == PROBLEMS and summary.configs[0].errors == 0
    assert len(stored) == PROBLEMS and all(r.correct for r in stored)
    a = [r for r in fault_server.requests if r.path.endswith("completions")]
    b = [r for r in fault_server_b.requests if r.path.endswith("completions")]
    answered_by_a = 5  # the sixth request to it was the one it died with
    assert len(a) >= 6  # it took its share until it died (requests on open connections also failed)
    assert len(b) >= PROBLEMS - answered_by_a  # the survivor served the rest, including the retried ones
    assert sum(r.usage_int("calls") for r in stored) == PROBLEMS
