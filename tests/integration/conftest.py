"""Fixtures for integration tests on the real embedded vLLM engine (marker ``engine``).

One engine serves the whole session: starting vLLM costs tens of seconds on CPU.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from branchwise.engine.vllm_engine import VLLMEngine


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine() -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=2048, seed=0)
    await engine.start()
    yield engine
    await engine.aclose()
