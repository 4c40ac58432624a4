"""Search strategies, reviewed survivors of the 2026-12-04 mutation run (`make mutation`, BENCHMARKS.md).

No survivor of the search modules was a gap in the tests. The test here guards the premise that makes four of
them equivalent (``stream_trace`` testing ``finish_reason not in ("stop", "length")`` next to an error): a trace
stops reading at the delta that carries its finish reason, so an engine error can only come after it from closing
the stream, and closing a stream of ``ctx.llm`` (the budget-bound engine) does not raise one. Whatever the
engine does on close, a trace whose last delta arrived is finished with its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from branchwise.engine import CallMeter, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.errors import EngineStreamBroken
from branchwise.search import SearchContext, TraceTree
from branchwise.search.sampling import SampledTrace, stream_trace

pytestmark = pytest.mark.timeout(60)

Q = "What is 6 x 7?"
LONG = "Six sevens are forty-two, so the answer is clear. The answer is 42."


class BreaksOnClose(FunctionEngine):
    """Answers like `FunctionEngine`; with ``linger`` its stream stays open after the last delta. Closing or
    cancelling the stream before it ends raises `EngineStreamBroken` (a connection reset during the abort)."""

    def __init__(self, reply: ScriptedResponse, *, linger: bool) -> None:
        super().__init__(lambda request: reply)
        self.linger = linger

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            try:
                async for delta in deltas:
                    yield delta
                if self.linger:
                    await asyncio.sleep(30)
            except (GeneratorExit, asyncio.CancelledError):
                raise EngineStreamBroken("reset while closing") from None


@pytest.mark.parametrize("linger", [False, True])
@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_a_trace_whose_last_delta_arrived_is_finished_whatever_closing_its_stream_does(
    finish: str, linger: bool
) -> None:
    reply = ScriptedResponse([LONG], finish_reason=finish)  # type: ignore[arg-type]
    ctx, tree = SearchContext(engine=BreaksOnClose(reply, linger=linger)), TraceTree()
    trace = await stream_trace(ctx, ctx.request(Q, n=1), SampledTrace(tree.open("s")), tree, lambda t, d: None)
    assert (trace.node.status, trace.node.finish_reason, trace.node.answer) == ("finished", finish, "42")
    assert trace.text == trace.node.text == LONG
    assert trace.error is None  # the budget-bound engine does not pass an error raised after the consumer left
