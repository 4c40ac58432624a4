"""The compute `Budget`: hard caps on tokens, calls, wall clock and estimated compute, shared by a whole run.

Everything that runs under one budget (strategies, DAG nodes, nested strategies) calls its engine through a
`BudgetedEngine` bound to that budget, or to a `Budget.child` of it. Every call is admitted, clipped, metered and,
when a cap is reached, aborted inside the engine, by the same object, so the caps hold for the run as a whole:

```python
budget = Budget(max_completion_tokens=20_000, max_calls=40, wall_clock_s=120)
engine = budget.bind(raw_engine)              # or BudgetedEngine(raw_engine, budget)
node_engine = budget.child("node-3").bind(raw_engine)   # its own Usage, charged to the run's as well
```

What is counted, and when (per call):

- **calls**: when the call is admitted, before the engine sees it. The call that would exceed ``max_calls``
  raises `BudgetExhausted` instead; ``max_calls`` never aborts running calls.
- **completion tokens** (and their FLOPs, KV-cache traffic and cost): when the engine delivers a `Delta`,
  synchronously, before the delta is handed to the consumer. A background task per call pulls deltas from the
  engine as soon as they are produced, so charging does not wait for a slow consumer.
- **prompt tokens** (and their FLOPs): as soon as the backend reports them, which is checked at each delivered
  delta (vLLM and the test engines report them before the first delta), otherwise when the call ends (e.g. an
  HTTP backend that sends usage last, or a call aborted before its first delta). The KV-cache traffic of
  completion tokens charged before the prompt length was known is corrected at that moment.
- **aborted tokens**: when a call ends without finishing (cancelled or closed by its consumer, or aborted by
  the budget), its completion tokens are added to ``aborted_tokens`` (they stay in ``completion_tokens``).
  Calls that fail with an engine error are not counted as aborted.

Admission: a call is refused (`BudgetExhausted`, the engine is not called) once any cap of its budget or of an
ancestor has been reached. Otherwise its per-sample ``max_tokens`` is clipped to what remains: for ``n``
samples, ``min(max_tokens, allowance // n)`` but at least 1, where ``allowance`` is the smallest remaining
completion-token or total-token allowance along the budget chain; with a cost cap, also to the most tokens per
sample the remaining cost could pay for (a lower-bound cost, since the prompt length is not known yet).
`Budget.clipped_calls` counts the calls clipped this way; a sample that then stops for "length" short of the
``max_tokens`` it asked for was cut by the budget, and strategies mark their result ``budget_exhausted`` even
when no cap was reached (n samples sharing what is left each get ``allowance // n``).

Exhaustion: a cap is *reached* when usage >= cap (calls, tokens, cost) or the deadline has passed. Reaching a
token, cost or wall-clock cap aborts, at once, every in-flight call under that budget (its descendants
included) that still has an unfinished sample: the call's engine task is cancelled, which closes the backend's
stream and so aborts the request inside the engine, and its consumer gets `BudgetExhausted` at its next read
(immediately if it is waiting), even if deltas are still buffered. A call whose samples have all delivered their
final delta is complete and is not aborted. The wall clock is enforced by a ``loop.call_later`` timer, armed
only while calls are in flight, that fires the abort at the deadline; nothing polls.

Guarantee (for every budget in a tree, and each of its caps). Charges are made synchronously as deltas arrive
and the caps are checked right after every charge; when a cap is crossed, every other affected call is cancelled
before any task runs again (a cancelled task never receives the delta it was about to get) and the crossing
call stops pulling, so no delta of an aborted call is received, let alone charged, after the crossing:

- ``usage.completion_tokens <= max_completion_tokens + d - 1``, where ``d`` is the token count of the one delta
  whose charge crossed the cap. With one token per delta (the test engines; vLLM while the loop keeps up with
  its output, since it merges steps into one delta only when they pile up) the cap is never exceeded at all.
  Tokens a backend computed but never delivered because of the abort are not counted (the engine's own usage
  hooks do not count them either).
- ``usage.total_tokens <= max_tokens + d - 1 + p + q``: as above, plus ``p``, the prompt charged in the crossing
  step (when that delta was its call's first), plus ``q``, the prompts of aborted calls whose backend had
  counted their prompt but that had not delivered a delta yet (charged when they end, because that compute was
  spent).
- ``usage.estimated_cost <= max_cost + c + r``: ``c`` is the cost charged in the crossing step (one delta, plus
  its call's prompt when charged in that step), ``r`` the prompt cost of aborted calls as in ``q``.
- ``usage.calls <= max_calls`` exactly.
- wall clock: no call is admitted after the deadline, and every in-flight call is aborted when the timer fires
  (the first loop iteration at or after the deadline); no delta is charged to an aborted call after that.

These bounds assume backends honour the `Engine` contract: nothing is yielded for a sample after its final
delta, and a cancelled stream yields nothing more.

Threading: all budget state changes happen on the event loop thread (admission, charging, timers); there are no
awaits between a check and its charge, so no locks are needed. Do not share a budget across event loops that
run at the same time; using it from one loop after another is fine. `Budget.start` may be called from
synchronous code.
"""

from __future__ import annotations

from .budget import Budget, BudgetedEngine, Remaining
from .cost import DEFAULT_MEMORY_WEIGHT, CostEstimate, CostModel
from .usage import Usage, UsageSnapshot

__all__ = [
    "DEFAULT_MEMORY_WEIGHT",
    "Budget",
    "BudgetedEngine",
    "CostEstimate",
    "CostModel",
    "Remaining",
    "Usage",
    "UsageSnapshot",
]
