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
- **prompt tokens** (and their FLOPs): *reserved* when the call is admitted, before the engine sees it, from
  `Engine.count_prompt_tokens` (exact for vLLM once its tokenizer is loaded and for the test engines; for other
  backends an over-estimate, `engine.base.estimate_prompt_tokens`). A reservation counts as spent for the caps
  and for `remaining`. It is replaced by the real count as soon as the backend reports it, which is checked at
  each delivered delta (vLLM and the test engines report it before the first delta), otherwise when the call
  ends (e.g. an HTTP backend that sends usage last); a call whose backend never reports it is charged nothing and
  its reservation is released. Completion tokens charged before the real count was known had their KV-cache
  traffic computed with the reserved length; it is corrected at that moment.
- **aborted tokens**: when a call ends without finishing (cancelled or closed by its consumer, or aborted by
  the budget), its completion tokens are added to ``aborted_tokens`` (they stay in ``completion_tokens``).
  Calls that fail with an engine error are not counted as aborted.

Admission: a call is refused (`BudgetExhausted`, the engine is not called) once any cap of its budget or of an
ancestor has been reached, and when its prompt would reach a token or cost cap by itself (no room left for one
token). Such a refusal marks the budget exhausted but does not abort the calls in flight: they may still finish
in what is left. Otherwise the prompt is reserved and the per-sample ``max_tokens`` clipped to what remains: for
``n`` samples, ``min(max_tokens, allowance // n)`` but at least 1, where ``allowance`` is the smallest remaining
completion-token allowance, or total-token allowance less this prompt, along the budget chain; with a cost cap,
also to the most tokens per sample the remaining cost (less the prompt's) could pay for after this prompt.
`Budget.clipped_calls` counts the calls clipped this way; a sample that then stops for "length" short of the
``max_tokens`` it asked for was cut by the budget, and strategies mark their result ``budget_exhausted`` even
when no cap was reached (n samples sharing what is left each get ``allowance // n``).

Exhaustion: a cap is *reached* when usage >= cap (calls, tokens, cost; for total tokens and cost, usage plus the
reservations of the calls in flight) or the deadline has passed. Reaching a token, cost or wall-clock cap
aborts, at once, every in-flight call under that budget (its descendants included) that still has an unfinished
sample: the call's engine task is cancelled, which closes the backend's
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
- ``usage.total_tokens <= max_tokens + d - 1 + e``, however many calls are in flight: ``d`` as above, and ``e``
  the prompt tokens the engine's counts missed, the sum over calls of ``max(0, real - counted)``. Every prompt is
  reserved before its call starts, so prompts charged later (with the first delta, or when an aborted call ends)
  were already counted when the cap was checked. ``e`` is 0 with vLLM and the test engines (exact counts) and
  with the default over-estimate, which only a chat template adding more tokens than its allowance
  (`engine.base.CHAT_TEMPLATE_ALLOWANCE`) can beat. With one token per delta and exact counts, the cap is never
  exceeded.
- ``usage.estimated_cost <= max_cost + c + e_c``: ``c`` is the cost charged in the crossing step (one delta; with
  a prompt reported in that step, the KV-traffic correction of its call's earlier tokens when the prompt was
  longer than counted), ``e_c`` the prompt cost the counts missed, as in ``e``.
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

from .budget import Budget, BudgetedEngine
from .cost import DEFAULT_MEMORY_WEIGHT, CostEstimate, CostModel
from .usage import Remaining, Usage, UsageSnapshot

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
