"""The draft (speculative decoding) and embedder (embedding redundancy judge) roles of a pipeline spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.orchestrator.pipeline import Pipeline, build_engines
from branchwise.orchestrator.spec import SpecError, load_spec
from branchwise.verifiers.redundancy import EmbeddingRedundancy

VLLM_POLICY = "engines:\n  policy: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024}\n"


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(text)
    return info.value


def test_draft_model_becomes_the_policy_speculative_config() -> None:
    spec = load_spec(VLLM_POLICY + "  draft: {model: smollm2-135m-instruct, num_speculative_tokens: 2}\n")
    engines = build_engines(spec.resolved())
    assert set(engines) == {"policy"}  # the draft is not an engine of its own
    policy = engines["policy"]
    assert isinstance(policy, VLLMEngine) and not policy.started
    assert policy._options["speculative_config"] == {
        "method": "draft_model",
        "num_speculative_tokens": 2,
        "model": "smollm2-135m-instruct",  # resolved (pulled) by the engine when it starts
    }
    assert policy._options["max_model_len"] == 1024


def test_ngram_draft_needs_no_model() -> None:
    spec = load_spec(VLLM_POLICY + "  draft: {method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 3}\n")
    config = build_engines(spec.resolved())["policy"]._options["speculative_config"]  # type: ignore[attr-defined]
    assert config == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        (VLLM_POLICY + "  draft: {num_speculative_tokens: 2}\n", "engines.draft", "needs 'model'"),
        (VLLM_POLICY + "  draft: {method: ngram, model: x}\n", "engines.draft.model", "takes no model"),
        (VLLM_POLICY + "  draft: {backend: openai, model: x}\n", "engines.draft", "must be 'vllm'"),
        (
            "engines:\n  policy: {backend: test, default: hi}\n  draft: {model: smollm2-135m-instruct}\n",
            "engines.draft",
            "needs a vllm policy",
        ),
        (
            VLLM_POLICY.replace("max_model_len: 1024", "speculative_config: {method: ngram}")
            + "  draft: {method: ngram}\n",
            "engines.draft",
            "once",
        ),
        (
            VLLM_POLICY + "  judge: {backend: test, num_speculative_tokens: 2}\n",
            "engines.judge.num_speculative_tokens",
            "only applies to the draft role",
        ),
        (VLLM_POLICY + "  embedder: {backend: vllm}\n", "engines.embedder.backend", "backend: transformers"),
        (VLLM_POLICY + "  judge: {backend: transformers}\n", "engines.judge.backend", "only serves the embedder"),
        (VLLM_POLICY + "  embedder: {backend: transformers}\n", "engines.embedder", "nothing uses it"),
    ],
)
def test_role_mistakes_name_the_yaml_path_and_line(text: str, path: str, words: str) -> None:
    err = error_of(text)
    assert err.path == path
    assert words in str(err)
    assert err.line is not None and err.line >= 2


def test_step_scorer_cannot_name_a_non_engine_role() -> None:
    err = error_of(VLLM_POLICY + "  draft: {method: ngram}\nverifiers: {step_scorer: {engine: draft}}\n")
    assert err.path == "verifiers.step_scorer.engine"


def test_embedder_model_reaches_the_embedding_judge(tmp_path: Path) -> None:
    text = (
        "engines:\n  policy: {backend: test, default: 'The answer is 4.'}\n"
        f"  embedder: {{backend: transformers, model: '{tmp_path}', max_length: 64}}\n"
        "thought: {strategy: prune, n: 2}\n"
        "verifiers: {redundancy: {kind: embedding, threshold: 0.8}}\n"
    )
    pipeline = Pipeline.from_yaml(text)
    judge = pipeline.strategy.judge  # type: ignore[attr-defined]
    assert isinstance(judge, EmbeddingRedundancy)
    assert (judge.model, judge.max_length, judge.threshold) == (str(tmp_path), 64, 0.8)
    # Without an embedder the packaged model is used.
    default = Pipeline.from_yaml(
        text.replace(f"  embedder: {{backend: transformers, model: '{tmp_path}', max_length: 64}}\n", "")
    )
    assert default.strategy.judge.model is None  # type: ignore[attr-defined]


def test_embedder_options_are_checked() -> None:
    err = error_of(
        VLLM_POLICY + "  embedder: {backend: transformers, max_len: 3}\nverifiers: {redundancy: {kind: embedding}}\n"
    )
    assert "max_length" in str(err)


def test_embedding_judge_rejects_a_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a local model folder"):
        EmbeddingRedundancy(model=str(tmp_path / "nope"))
