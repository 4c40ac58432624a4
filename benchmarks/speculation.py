"""Token-level speculative decoding inside test-time scaling: does a draft model or n-gram lookup pay, and where?

The policy engine runs the workloads strategies create, once per speculation setting:

- ``greedy``: one greedy trace (a single answer);
- ``sc8``: self-consistency, one request of n=8 samples at T=0.7 (a wide batch);
- ``refine``: a long sequential generation continuing a solution (a refine / PDR round);
- ``judge``: four short judgements (4 tokens) over long prompts at once (a judge or verifier).

Settings: ``off`` (no speculation), ``ngram`` (prompt lookup, k=3) and ``draft-kK`` (the draft model proposing K
tokens). vLLM fixes speculation when an engine starts, so each setting is an engine of its own; settings are
loaded one at a time (memory), in rounds whose order alternates (A B C, C B A, ...), and every workload runs in
each round on the same prompts after one untimed warm-up. Figures per workload and setting: generated tokens/s
(median over rounds), its ratio to ``off`` in the same run, the acceptance rate of proposed tokens (vLLM's own
counters) and the engine processes' resident memory. The last column says which setting branchwise's rule picks
(`branchwise.orchestrator.build.speculation_pays`: speculation only when at most ``max_batch`` sequences decode
together) and how far it is from the best measured setting.

    python benchmarks/speculation.py [--quick] [--model qwen2.5-coder-1.5b-instruct]
        [--draft qwen2.5-coder-0.5b-instruct] [--ks 2,3,5] [--rounds 2]

On vLLM's CPU backend a speculating engine refuses sampled requests (it corrupts their tokens), so ``sc8`` is
reported as refused for every setting but ``off`` there.

``--quick``: SmolLM2-135M with n-gram only, short outputs (two rounds, as always). Prints a table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from _paired import alternating
from model_throughput import tree_rss_mb
from rich.console import Console
from rich.table import Table

from branchwise.engine import GenerationRequest
from branchwise.engine.types import ChatMessage
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.errors import EngineRequestError
from branchwise.orchestrator.build import speculation_pays
from branchwise.orchestrator.spec_models import DRAFT_MAX_BATCH

PROBLEM = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?"
)
SOLUTION = (
    "Janet's ducks lay 16 eggs per day. She eats 3 eggs for breakfast, so 16 - 3 = 13 eggs are left. She uses 4 "
    "eggs for muffins, so 13 - 4 = 9 eggs are left. She sells each egg for $2, so she makes 9 * 2 = 18 dollars. "
)


@dataclass(frozen=True)
class Workload:
    """A request shape a strategy sends, how many of them go at once, and the batch it makes."""

    name: str
    requests: tuple[GenerationRequest, ...]

    @property
    def batch(self) -> int:
        """Sequences decoding together."""
        return sum(r.n for r in self.requests)


def workloads(tokens: int) -> list[Workload]:
    ask = (ChatMessage("user", f"{PROBLEM}\n\nSolve it step by step, then finish with: The answer is <answer>."),)
    refine = (ChatMessage("user", f"{PROBLEM}\n\nHere is a draft solution:\n{SOLUTION * 3}\nRewrite it carefully."),)
    judge = tuple(
        GenerationRequest(
            messages=(ChatMessage("user", f"Problem:\n{PROBLEM}\n\nSolution:\n{SOLUTION * 4}\n\nIs step {i} correct? "
                                          "Answer Yes or No."),),
            max_tokens=4, temperature=0.0,
        )
        for i in range(1, 5)
    )  # fmt: skip
    return [
        Workload("greedy", (GenerationRequest(messages=ask, max_tokens=tokens, temperature=0.0),)),
        Workload("sc8", (GenerationRequest(messages=ask, n=8, max_tokens=tokens, temperature=0.7, seed=1),)),
        Workload("refine", (GenerationRequest(messages=refine, max_tokens=tokens * 2, temperature=0.0),)),
        Workload("judge", judge),
    ]


def settings(ks: list[int], draft: str | None) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {"off": None, "ngram": {"method": "ngram", "num_speculative_tokens": 3,
                                                                     "prompt_lookup_max": 4}}  # fmt: skip
    if draft:
        for k in ks:
            out[f"draft-k{k}"] = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    return out


async def run_workload(engine: VLLMEngine, work: Workload) -> tuple[int, float]:
    """Generated tokens and seconds for every request of ``work`` at once."""
    started = time.perf_counter()
    generations = await asyncio.gather(*(engine.generate(r) for r in work.requests))
    seconds = time.perf_counter() - started
    return sum(g.completion_tokens for g in generations), seconds


async def measure(model: str, speculative: dict[str, Any] | None, work: list[Workload]) -> dict[str, Any]:
    """One setting, one round: every workload after a warm-up; tok/s, acceptance and memory per workload."""
    out: dict[str, Any] = {}
    async with VLLMEngine(model, max_model_len=2048, seed=0, speculative_config=speculative) as engine:
        await engine.start()
        for w in work:
            try:
                await run_workload(engine, w)  # warm-up: same shapes, caches filled as in the timed run
            except EngineRequestError as err:  # sampled requests under speculation on vLLM's CPU backend
                out[w.name] = {"refused": str(err)}
                continue
            before = await engine.engine_state()
            tokens, seconds = await run_workload(engine, w)
            after = await engine.engine_state()
            proposed = after.spec_draft_tokens - before.spec_draft_tokens
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            out[w.name] = {
                "tokens": tokens,
                "seconds": seconds,
                "tok_s": tokens / seconds,
                "acceptance": accepted / proposed if proposed else None,
                "rss_mb": tree_rss_mb(os.getpid()),
            }
    return out


def summarize(rounds: list[dict[str, dict[str, Any]]], work: list[Workload], max_batch: int) -> dict[str, Any]:
    names = list(rounds[0])
    figures: dict[str, Any] = {}
    for w in work:
        row: dict[str, Any] = {"batch": w.batch}
        for name in names:
            runs = [r[name][w.name] for r in rounds]
            if any("refused" in x for x in runs):
                row[name] = {"refused": True}
                continue
            acceptance = [x["acceptance"] for x in runs if x["acceptance"] is not None]
            row[name] = {
                "tok_s": statistics.median(x["tok_s"] for x in runs),
                "acceptance": statistics.fmean(acceptance) if acceptance else None,
                "rss_mb": max(x["rss_mb"] for x in runs),
            }
        measured = [n for n in names if "refused" not in row[n]]
        base = row["off"]["tok_s"]
        for name in measured:
            row[name]["speedup"] = row[name]["tok_s"] / base
        best = max(measured, key=lambda n: row[n]["tok_s"])
        on = [n for n in measured if n != "off"]
        chosen = max(on, key=lambda n: row[n]["tok_s"]) if on and speculation_pays(w.batch, max_batch) else "off"
        row["best"], row["auto"] = best, chosen
        row["auto_vs_best"] = row[chosen]["tok_s"] / row[best]["tok_s"]
        figures[w.name] = row
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M, n-gram only, short outputs")
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft", default=None, help="draft model (default: the 0.5B for the 1.5B; none --quick)")
    parser.add_argument("--ks", default="2,3,5", help="draft tokens per step to compare")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per greedy / SC sample")
    parser.add_argument("--max-batch", type=int, default=DRAFT_MAX_BATCH, help="the rule's largest speculating batch")
    args = parser.parse_args()
    model = args.model or ("smollm2-135m-instruct" if args.quick else "qwen2.5-coder-1.5b-instruct")
    draft = args.draft or (None if args.quick else "qwen2.5-coder-0.5b-instruct")
    rounds = args.rounds or 2  # two rounds at least: the order alternates (A B, then B A)
    work = workloads(args.tokens or (32 if args.quick else 128))
    configs = settings([int(k) for k in args.ks.split(",")], draft)
    results: list[dict[str, dict[str, Any]]] = []
    for index in range(rounds):
        measured: dict[str, dict[str, Any]] = {}
        for name in alternating(list(configs), index):
            measured[name] = asyncio.run(measure(model, configs[name], work))
        results.append({name: measured[name] for name in configs})
    figures = summarize(results, work, args.max_batch)

    table = Table(title=f"speculative decoding, {model} (draft: {draft or 'none'}), median of {rounds} round(s)")
    for column in ("workload", "batch", "setting", "tok/s", "vs off", "acceptance", "RSS MB", "rule picks"):
        table.add_column(column)
    for w, row in figures.items():
        for name in configs:
            cell = row[name]
            if "refused" in cell:  # the engine refuses sampled requests under speculation here (vLLM CPU backend)
                table.add_row(w, str(row["batch"]), name, "refused", "", "corrupt output on CPU", "", "")
                continue
            accepted = f"{cell['acceptance']:.0%}" if cell["acceptance"] is not None else ""
            if name != "off" and cell["acceptance"] is None:
                accepted = "nothing proposed"
            pick = f"{row['auto']} ({row['auto_vs_best']:.2f} of best)" if name == "off" else ""
            table.add_row(w, str(row["batch"]), name, f"{cell['tok_s']:.1f}", f"{cell['speedup']:.2f}x", accepted,
                          f"{cell['rss_mb']:.0f}", pick)  # fmt: skip
    Console(width=160).print(table)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": model, "draft": draft, "rounds": rounds,
                      "max_batch": args.max_batch, "workloads": figures}))  # fmt: skip


if __name__ == "__main__":
    main()
