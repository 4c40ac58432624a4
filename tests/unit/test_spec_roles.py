"""The draft (speculative decoding), speculator (step-level speculation) and embedder (embedding redundancy judge)
roles of a pipeline spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.errors import ConfigError
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


@pytest.mark.parametrize(("cores", "expected"), [({0, 1}, ["1", "0"]), ({0, 1, 2, 3, 4}, ["2-4", "0-1"]), ({5}, None)])
def test_two_embedded_engines_on_a_cpu_get_disjoint_cores_the_policy_the_larger_share(
    monkeypatch: pytest.MonkeyPatch, cores: set[int], expected: list[str] | None
) -> None:
    from branchwise.engine import vllm_engine

    monkeypatch.setattr(vllm_engine, "_on_cpu", lambda: True)
    monkeypatch.setattr(vllm_engine.os, "sched_getaffinity", lambda pid: cores)
    assert vllm_engine.split_cpu_cores(2) == expected
    assert vllm_engine.split_cpu_cores(1) is None
    spec = load_spec(
        "engines:\n"
        "  speculator: {backend: vllm, model: qwen2.5-coder-0.5b-instruct}\n"
        "  policy: {backend: vllm, model: qwen2.5-coder-1.5b-instruct}\n"
        "thought: {strategy: spec_reason}\n"
    )
    engines = build_engines(spec.resolved())
    assert isinstance(engines["policy"], VLLMEngine) and isinstance(engines["speculator"], VLLMEngine)
    bound = [engines["policy"].cpu_cores, engines["speculator"].cpu_cores]
    assert bound == (expected or [None, None])
    # A spec that binds its engines itself is left alone.
    spec = load_spec(
        "engines:\n"
        "  policy: {backend: vllm, cpu_cores: '0-1'}\n"
        "  speculator: {backend: vllm, cpu_cores: '0-1'}\n"
        "thought: {strategy: spec_reason}\n"
    )
    assert [e.cpu_cores for e in build_engines(spec.resolved()).values()] == ["0-1", "0-1"]  # type: ignore[attr-defined]


def test_an_engines_cores_reach_vllm_only_while_its_core_process_starts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from branchwise.engine import vllm_engine

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert VLLMEngine(cpu_cores="1")._cpu_environment(on_cpu=True) == {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert VLLMEngine(cpu_cores="1")._cpu_environment(on_cpu=False) == {}
    with vllm_engine._environment({"VLLM_CPU_OMP_THREADS_BIND": "1"}):
        assert vllm_engine.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_engine.os.environ
    with pytest.raises(ConfigError, match="cpu_cores"):
        VLLMEngine(cpu_cores="one")
    # Two engines left to vLLM's automatic binding in one process: the second is warned about.
    first, second = VLLMEngine(), VLLMEngine()
    assert first._cpu_environment(on_cpu=True) == {}
    first._llm = object()  # type: ignore[assignment]
    try:
        with caplog.at_level("WARNING", logger="branchwise.engine.vllm_engine"):
            assert second._cpu_environment(on_cpu=True) == {}
        assert "without cpu_cores" in caplog.text
    finally:
        first._llm = None


@pytest.mark.parametrize(("n", "speculates"), [(2, True), (4, True), (8, False)])
def test_a_draft_with_max_batch_speculates_only_for_narrow_strategies(n: int, speculates: bool) -> None:
    spec = load_spec(
        VLLM_POLICY + "  draft: {method: ngram, max_batch: 4}\n" + f"thought: {{strategy: self_consistency, n: {n}}}\n"
    )
    policy = build_engines(spec.resolved())["policy"]
    assert isinstance(policy, VLLMEngine)
    config = policy._options["speculative_config"]
    assert (config is not None) is speculates
    if config is not None:
        assert "max_batch" not in config  # branchwise's rule, not a vLLM field


def test_by_default_a_draft_speculates_for_one_sequence_only_and_null_means_always() -> None:
    def speculative_config(draft: str, n: int) -> object:
        spec = load_spec(VLLM_POLICY + draft + f"thought: {{strategy: self_consistency, n: {n}}}\n")
        policy = build_engines(spec.resolved())["policy"]
        assert isinstance(policy, VLLMEngine)
        return policy._options["speculative_config"]

    assert speculative_config("  draft: {method: ngram}\n", 1) is not None
    assert speculative_config("  draft: {method: ngram}\n", 2) is None
    assert speculative_config("  draft: {method: ngram, max_batch: null}\n", 64) is not None
    err = error_of(VLLM_POLICY.replace("max_model_len: 1024", "max_model_len: 1024, max_batch: 2"))
    assert err.path == "engines.policy.max_batch" and "draft role" in str(err)
