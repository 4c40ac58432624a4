"""Fixtures for integration tests on the real embedded vLLM engine (marker ``engine``).

One engine serves the whole session: starting vLLM costs tens of seconds on CPU.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from branchwise.engine.vllm_engine import VLLMEngine

# The environment before any engine ran in this process: starting vLLM in-process rewrites os.environ
# (LD_PRELOAD, LD_LIBRARY_PATH, LOCAL_WORLD_SIZE, VLLM_WORKER_MULTIPROC_METHOD, ...), which a server started by a
# later test should not inherit.
_PRISTINE_ENV = dict(os.environ)


@pytest.fixture(scope="session")
def pristine_env() -> dict[str, str]:
    """A copy of the environment as it was before any in-process engine started, for child processes."""
    return dict(_PRISTINE_ENV)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine() -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=2048, seed=0)
    await engine.start()
    yield engine
    await engine.aclose()
