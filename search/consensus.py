"""`consensus`: self-consistency that stops sampling once the vote is decided.

Up to ``n`` traces are drawn in requests of ``batch`` samples (one request of ``n`` by default: all traces start
together and the prompt is sent once). Each time a trace finishes, its answer joins the vote and a stopping rule
looks at the votes: once it fires, the samples still running are cancelled inside the engine and no further
request is sent. The answer is the vote's leader, so the run answers as self-consistency over all ``n`` would
have, whenever the rule is exact.

Stopping rules:

- ``threshold=1.0`` (the default): stop when the leading answer *cannot lose*: its lead over the runner-up is
  larger than the number of samples not yet counted, so no way the remaining votes could fall overturns it. The
  answer is then exactly self-consistency@n's (on the same samples), at fewer tokens.
- ``threshold < 1``: also stop when the leader *wins with posterior probability >= threshold*. The votes are
  modelled as draws from a categorical distribution over the answers seen so far plus one bucket for answers
  not seen yet, with a symmetric Dirichlet(``prior``) prior; the probability that the leader still strictly
  leads after the remaining votes is estimated from the posterior predictive (a Dirichlet-multinomial) by
  Monte Carlo with a seed derived from the votes, so the same votes always give the same decision.

``min_votes`` answers are needed before the posterior rule may fire (the exact rule needs no minimum). Samples
without an extractable answer count as spent, not as votes. Every check is recorded in the result's decisions.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import random
from typing import Any

from ..errors import BudgetExhausted, ConfigError
from .base import Candidate, Result, SearchContext, Strategy, TraceTree
from .registry import MAX_SAMPLES, register_strategy
from .sampling import SampledTrace, candidates_of, close_finished, cluster_votes, pick_answer

__all__ = ["Consensus", "win_probability"]

_DRAWS = 2000
"""Monte Carlo draws per posterior check: the estimate's standard error is below 0.011 at any probability."""


def win_probability(counts: list[float], remaining: int, *, prior: float = 1.0, seed: int = 0) -> float:
    """Probability that the answer with ``counts[0]`` votes still strictly leads after ``remaining`` more votes.

    ``counts`` lists the current votes per answer, the leader first. Future votes fall on the seen answers or on
    one bucket of unseen answers (which starts at zero votes), with probabilities drawn from the Dirichlet
    posterior ``counts + prior`` (``prior`` for the unseen bucket). A tie at the end counts as a loss.

    Returns:
        1.0 when the lead exceeds ``remaining`` (no outcome can overturn it), else a Monte Carlo estimate.
    """
    if not counts:
        return 0.0
    leader, rivals = counts[0], [*counts[1:], 0.0]
    if leader - max(rivals) > remaining:
        return 1.0
    if remaining == 0:
        return 0.0
    rng = random.Random(seed)
    alphas = [c + prior for c in counts] + [prior]
    wins = 0
    for _ in range(_DRAWS):
        weights = [rng.gammavariate(a, 1.0) for a in alphas]
        cumulative = list(itertools.accumulate(weights))
        final = [*counts, 0.0]
        for _ in range(remaining):
            final[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])] += 1
        if final[0] > max(final[1:]):
            wins += 1
    return wins / _DRAWS


@register_strategy(maxima={"n": MAX_SAMPLES, "batch": MAX_SAMPLES, "min_votes": MAX_SAMPLES}, fan_out=lambda s: s.n)
class Consensus(Strategy):
    """Self-consistency that cancels the remaining samples once the vote is decided.

    Args:
        n: the most samples drawn (self-consistency@n's budget).
        batch: samples per engine request (the prompt is sent once per request); None: all n in one request.
        threshold: stop when the leader wins with at least this posterior probability; 1.0: only when it
            cannot lose.
        prior: the symmetric Dirichlet prior of the posterior rule (per answer, and for unseen answers).
        min_votes: answers needed before the posterior rule may stop the run.
    """

    name = "consensus"

    def __init__(
        self,
        n: int = 16,
        *,
        batch: int | None = None,
        threshold: float = 1.0,
        prior: float = 1.0,
        min_votes: int = 3,
    ) -> None:
        if n < 1 or (batch is not None and batch < 1) or min_votes < 1:
            raise ConfigError(f"consensus: n, batch and min_votes must be >= 1, got {n}, {batch}, {min_votes}")
        if not 0.5 < threshold <= 1.0:
            raise ConfigError(f"consensus: threshold must be in (0.5, 1], got {threshold}")
        if prior <= 0:
            raise ConfigError(f"consensus: prior must be > 0, got {prior}")
        self.n, self.batch, self.threshold, self.prior, self.min_votes = n, batch, threshold, prior, min_votes

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        state = _Vote(self, ctx)
        exhausted = False
        drawn = 0
        while drawn < self.n and not state.decided and not exhausted:
            size = min(self.batch or self.n, self.n - drawn)
            exhausted = await self._request(problem, ctx, tree, state, size=size, drawn=drawn)
            drawn += size
        return Result(
            self.name, pick_answer(state.votes), state.candidates, state.votes, tree, ctx.usage(), exhausted,
            state.decisions,
        )  # fmt: skip

    async def _request(
        self, problem: str, ctx: SearchContext, tree: TraceTree, state: _Vote, *, size: int, drawn: int
    ) -> bool:
        """Stream one request of ``size`` samples, voting as each finishes; True when the budget stopped it."""
        request = ctx.request(problem, n=size)
        traces = [SampledTrace(tree.open("sample")) for _ in range(size)]
        pieces: list[list[str]] = [[] for _ in range(size)]
        exhausted = False
        try:
            async with contextlib.aclosing(ctx.llm.stream(request)) as deltas:
                async for delta in deltas:
                    pieces[delta.index].append(delta.text)
                    trace = traces[delta.index]
                    trace.take(delta)
                    if delta.finish_reason is None:
                        continue
                    trace.text = trace.node.text = "".join(pieces[delta.index])
                    trace.node.finish_reason = trace.finish_reason
                    close_finished(ctx, request, trace, tree)
                    exhausted = exhausted or trace.clipped
                    if await state.add(trace, spent=drawn + sum(t.finish_reason is not None for t in traces)):
                        break  # leaving the block closes the stream: the engine aborts the other samples
        except BudgetExhausted:
            exhausted = True
        for trace, parts in zip(traces, pieces, strict=True):
            if trace.finish_reason is None:
                trace.text = trace.node.text = "".join(parts)
                detail = f"cancelled after {trace.node.tokens} tokens"
                if state.decided:
                    tree.close(trace.node, "pruned", rule="consensus_decided", detail=detail)
                else:
                    tree.close(trace.node, "budget", detail=detail)
        return exhausted


class _Vote:
    """The running vote of one `Consensus` run and its stopping rule."""

    def __init__(self, strategy: Consensus, ctx: SearchContext) -> None:
        self.strategy, self.ctx = strategy, ctx
        self.candidates: list[Candidate] = []
        self.votes: dict[str, float] = {}
        self.decisions: list[dict[str, Any]] = []
        self.decided = False

    async def add(self, trace: SampledTrace, *, spent: int) -> bool:
        """Count a finished trace; True once the vote is decided (the caller cancels the rest)."""
        # Kept in sample order, not finishing order, so a final tie goes where self-consistency's goes.
        for candidate in candidates_of([trace]):
            bisect.insort(self.candidates, candidate, key=lambda c: c.trace_id)
        if trace.node.answer is None:
            return False
        ballots = [(c.answer, 1.0) for c in self.candidates if c.answer is not None]
        self.votes = await cluster_votes(ballots, self.ctx.grader)
        remaining = self.strategy.n - spent
        leader = pick_answer(self.votes)
        counts = sorted(self.votes.values(), reverse=True)
        if leader is not None:  # the leader first (ties: pick_answer's choice)
            counts.remove(self.votes[leader])
            counts.insert(0, self.votes[leader])
        probability = self._probability(counts, remaining, len(ballots))
        decision = {"samples": spent, "votes": len(ballots), "leader": leader, "p_win": round(probability, 4)}
        if remaining == 0:
            decision["action"] = "done"
        elif probability >= self.strategy.threshold:
            self.decided = True
            decision["action"] = "stop"
        else:
            decision["action"] = "continue"
        self.decisions.append(decision)
        return self.decided

    def _probability(self, counts: list[float], remaining: int, votes: int) -> float:
        if counts[0] - max([*counts[1:], 0.0]) > remaining:
            return 1.0
        if self.strategy.threshold >= 1.0 or votes < self.strategy.min_votes:
            return 0.0
        seed = int.from_bytes(hashlib.sha256(repr((counts, remaining)).encode()).digest()[:8], "big")
        return win_probability(counts, remaining, prior=self.strategy.prior, seed=seed)
