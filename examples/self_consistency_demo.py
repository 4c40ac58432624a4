"""Self-consistency on built-in arithmetic word problems, on the embedded vLLM engine (what `make demo` runs).

Each problem is sampled N times in one engine request (the prompt's KV cache is shared), the final answers are
extracted and the most common one wins. Problems run concurrently, so vLLM batches all their samples.

    python examples/self_consistency_demo.py [--model smollm2-135m-instruct] [--problems 6] [--n 8]

The default model (SmolLM2-135M) is tiny and mostly wrong on these: the demo shows the mechanics (sampling,
voting, token accounting). `--model qwen2.5-coder-0.5b-instruct` gets many more right.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from rich.console import Console
from rich.table import Table

import branchwise as bw
from branchwise.evals.arithmetic import ArithmeticProblem
from branchwise.verifiers import AnswerExtractor, normalize_number

PROMPT = "Solve this problem step by step, then finish with: The answer is <number>.\n\n{question}"


async def solve(engine: bw.Engine, problem: ArithmeticProblem, n: int, extractor: AnswerExtractor) -> dict[str, object]:
    request = bw.GenerationRequest(
        messages=[{"role": "user", "content": PROMPT.format(question=problem.question)}],
        n=n,
        temperature=0.7,
        max_tokens=256,
    )
    generation = await engine.generate(request)
    # Normalised numbers vote together: "1,000", "1000" and "1000.0" are one answer.
    answers = [normalize_number(a) or a if (a := extractor.extract(c.text)) else None for c in generation.completions]
    votes = Counter(a for a in answers if a is not None)
    majority, count = votes.most_common(1)[0] if votes else (None, 0)
    return {
        "problem": problem,
        "majority": majority,
        "votes": count,
        "answers": answers,
        "correct": majority == problem.answer,
        "tokens": generation.usage.completion_tokens,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--seed", type=int, default=0, help="problem generator seed")
    args = parser.parse_args()

    console = Console()
    problems = bw.arithmetic_problems(args.problems, seed=args.seed, levels=(1, 2))
    extractor = AnswerExtractor()
    async with bw.create_engine("vllm", model=args.model) as engine:
        with console.status(f"starting vLLM with {args.model} ..."):
            await engine.start()
        started = time.perf_counter()
        with console.status(f"sampling {args.n} answers for each of {len(problems)} problems ..."):
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(solve(engine, p, args.n, extractor)) for p in problems]
        elapsed = time.perf_counter() - started
    rows = [t.result() for t in tasks]

    for row in rows:
        problem = row["problem"]
        assert isinstance(problem, ArithmeticProblem)
        mark = "[green]right[/]" if row["correct"] else "[red]wrong[/]"
        console.print(f"[bold]{problem.id}[/] {problem.question}")
        console.print(f"   gold {problem.answer}  majority {row['majority']}  ({row['votes']}/{args.n} votes)  {mark}")

    table = Table(title=f"self-consistency@{args.n} with {args.model}")
    for column in ("problem", "level", "gold", "majority", "votes", "samples right", "tokens"):
        table.add_column(column, justify="right" if column != "problem" else "left")
    for row in rows:
        problem = row["problem"]
        assert isinstance(problem, ArithmeticProblem)
        answers = row["answers"]
        assert isinstance(answers, list)
        right = sum(a == problem.answer for a in answers)
        table.add_row(
            problem.id, str(problem.level), problem.answer, str(row["majority"]), str(row["votes"]),
            f"{right}/{args.n}", str(row["tokens"]),
        )  # fmt: skip
    console.print(table)
    tokens = sum(int(str(r["tokens"])) for r in rows)
    accuracy = sum(bool(r["correct"]) for r in rows) / len(rows)
    console.print(
        f"majority-vote accuracy {accuracy:.0%} | {tokens} completion tokens in {elapsed:.1f} s "
        f"({tokens / elapsed:.0f} tok/s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
