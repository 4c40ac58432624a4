"""A user script with no ``if __name__ == "__main__":`` guard runs the embedded engine (vLLM spawns its workers,
which would re-run an unguarded script), here with ngram speculative decoding, which must still return logprobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(400)]

SCRIPT = textwrap.dedent(
    """
    import asyncio, json
    import branchwise as bw

    print("top-level code ran", flush=True)  # printed twice if a child process re-ran this script

    async def main():
        spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
        async with bw.create_engine("vllm", speculative_config=spec, max_model_len=1024) as engine:
            text = "red green blue red green blue red green blue red green blue"
            req = bw.GenerationRequest(prompt=text, max_tokens=24, temperature=0, logprobs=1)
            gen = await engine.generate(req)
            c = gen.completions[0]
            print("RESULT " + json.dumps({
                "text": c.text,
                "tokens": c.num_tokens,
                "logprobs": len(c.logprobs or ()),
                "finite": all(lp.logprob <= 0 for lp in c.logprobs or ()),
                "speculative": engine.engine_args.get("speculative_config"),
            }), flush=True)

    asyncio.run(main())
    """
)


def test_unguarded_script_with_ngram_speculative_decoding(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=380, env=env, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("top-level code ran") == 1
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["tokens"] >= 1
    assert result["logprobs"] == result["tokens"]
    assert result["finite"]
    assert result["speculative"]["method"] == "ngram"
    assert "red" in result["text"] or "green" in result["text"] or "blue" in result["text"]
