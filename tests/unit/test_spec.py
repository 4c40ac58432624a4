"""The pipeline spec: validation with YAML paths and lines, suggestions, overrides, env references, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from branchwise.errors import ConfigError
from branchwise.orchestrator.spec import PipelineSpec, SpecError, load_spec, resolve_env
from branchwise.orchestrator.spec_schema import pipeline_json_schema

BASE = "engine: {backend: test, default: 'The answer is 4.'}\n"


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(text)
    return info.value


def test_minimal_spec_and_defaults() -> None:
    spec = load_spec(BASE)
    assert spec.engines["policy"].backend == "test"
    assert spec.thought.strategy == "single"
    assert spec.planner is None
    assert spec.outputs.progress == "off"
    assert spec.runtime.concurrency == 8


def test_unknown_key_names_path_line_and_suggests() -> None:
    err = error_of(BASE + "thought:\n  strategy: self_consistency\n  nn: 4\n")
    assert err.path == "thought.nn"
    assert err.line == 4
    assert "Did you mean 'n'?" in str(err)
    assert "voting" in str(err)  # the allowed parameters are listed
    assert isinstance(err, ConfigError)


def test_top_level_typo() -> None:
    err = error_of(BASE + "budgt: {max_tokens: 10}\n")
    assert err.path == "budgt" and err.line == 2
    assert "Did you mean 'budget'?" in str(err)


def test_literal_lists_allowed_values_and_suggests() -> None:
    err = error_of("engine: {backend: vlm}\n")
    assert err.path == "engine.backend" and err.line == 1
    assert "Did you mean 'vllm'?" in str(err)
    assert "openai" in str(err) and "test" in str(err)


def test_unknown_strategy_suggests() -> None:
    err = error_of(BASE + "thought: {strategy: deep_conf}\n")
    assert err.path == "thought.strategy"
    assert "Did you mean 'deepconf'?" in str(err)
    assert "self_consistency" in str(err)


def test_strategy_parameter_types_and_constructor_checks() -> None:
    err = error_of(BASE + "thought: {strategy: self_consistency, n: many}\n")
    assert err.path == "thought.n" and "integer" in str(err)
    err = error_of(BASE + "thought: {strategy: deepconf, n: 4, warmup: 8}\n")
    assert err.path == "thought" and "warmup" in str(err)


def test_object_parameters_come_from_sections() -> None:
    err = error_of(BASE + "thought: {strategy: beam, scorer: foo}\n")
    assert "verifiers.step_scorer" in str(err)
    err = error_of(BASE + "thought: {strategy: best_of_n, scorer: verifier}\n")
    assert "verifiers.verifier" in str(err)
    spec = load_spec(
        BASE + "thought: {strategy: adaptive, probe: 2, stages: [4], escalate_to: {strategy: deepconf, n: 8}}\n"
    )
    assert spec.thought.params["escalate_to"]["strategy"] == "deepconf"
    err = error_of(BASE + "thought: {strategy: adaptive, escalate_to: {strategy: deepconf, nn: 8}}\n")
    assert err.path == "thought.escalate_to.nn"


def test_engine_backend_options_are_lifted_and_checked() -> None:
    spec = load_spec("engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024}\n")
    assert spec.engines["policy"].options == {"max_model_len": 1024}
    err = error_of("engine: {backend: vllm, enable_prefix_cashing: true}\n")
    assert "Did you mean 'enable_prefix_caching'?" in str(err)
    err = error_of("engine: {backend: vllm, replies: [a]}\n")
    assert "'test' backend" in str(err)


def test_roles_and_references() -> None:
    err = error_of(BASE + "verifiers: {step_scorer: {kind: generative_judge, engine: judge}}\n")
    assert err.path == "verifiers.step_scorer.engine" and "judge" in str(err)
    err = error_of("engines: {judge: {backend: test}}\n")
    assert "no policy engine" in str(err)
    err = error_of(BASE + "engines: {critic: {backend: test}}\n")
    assert "critic" in str(err) and "policy" in str(err)


def test_malformed_yaml_has_a_line() -> None:
    err = error_of(BASE + "thought: {strategy: single\n")
    assert err.line is not None and "malformed YAML" in str(err)


def test_tools_shorthand() -> None:
    spec = load_spec(BASE + "planner: {kind: llmcompiler}\ntools: [calculator, retrieve: {corpus: docs/}]\n")
    assert [(t.name, t.options) for t in spec.tools] == [("calculator", {}), ("retrieve", {"corpus": "docs/"})]


def test_with_overrides_parses_yaml_scalars_and_revalidates() -> None:
    spec = load_spec(BASE + "thought: {strategy: self_consistency, n: 4}\n")
    assert spec.with_overrides({"thought.n": "8"}).thought.params["n"] == 8
    assert spec.with_overrides({"budget.max_tokens": "500"}).budget.max_tokens == 500
    assert spec.with_overrides({"outputs.progress": "false"}).outputs.progress == "off"
    assert spec.with_overrides({"thought.voting": "confidence"}).thought.params["voting"] == "confidence"
    assert spec.thought.params["n"] == 4  # the original is unchanged
    with pytest.raises(SpecError, match="Did you mean 'n'"):
        spec.with_overrides({"thought.nn": "8"})
    with pytest.raises(SpecError, match="budgt"):
        spec.with_overrides({"budgt.max_tokens": "8"})
    with pytest.raises(SpecError, match="not a mapping"):
        spec.with_overrides({"thought.n.x": "8"})
    with pytest.raises(SpecError, match="integer"):
        spec.with_overrides({"thought.n": "eight"})


def test_env_references_resolve_at_build_and_stay_unresolved_in_records(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "engine: {backend: openai, model: m, base_url: 'http://x/v1', api_key: '${BW_TEST_KEY}'}\n"
    spec = load_spec(text)
    monkeypatch.setenv("BW_TEST_KEY", "sk-very-secret")
    assert spec.resolved().engines["policy"].api_key == "sk-very-secret"
    assert spec.raw()["engine"]["api_key"] == "${BW_TEST_KEY}"
    assert "sk-very-secret" not in json.dumps(spec.redacted())
    monkeypatch.delenv("BW_TEST_KEY")
    with pytest.raises(SpecError, match="BW_TEST_KEY") as info:
        spec.resolved()
    assert info.value.path == "engine.api_key" and info.value.line == 1
    assert resolve_env({"a": "${NOPE_X:-fallback}"}, environ={}) == {"a": "fallback"}


def test_literal_secrets_are_masked_in_records() -> None:
    spec = load_spec("engine: {backend: openai, model: m, api_key: sk-literal}\n")
    assert spec.redacted()["engine"]["api_key"] == "***"


def test_load_from_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "thought: {strategy: single, greedy: maybe}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:2:")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_json_schema_lists_strategies_and_forbids_extra_keys() -> None:
    schema = pipeline_json_schema()
    assert schema["additionalProperties"] is False
    thought = schema["$defs"]["ThoughtSpec"]
    assert "deepconf" in thought["properties"]["strategy"]["enum"]
    assert "beam" in thought["properties"]["strategy"]["enum"]
    assert schema["$defs"]["EngineSpec"]["additionalProperties"] is False
    assert set(schema["properties"]) >= {"engine", "engines", "planner", "tools", "thought", "budget", "outputs"}
    json.dumps(schema)


def test_spec_model_is_strict_python_side() -> None:
    with pytest.raises(ValueError, match="surprise"):
        PipelineSpec.model_validate({"engine": {"backend": "test"}, "surprise": 1})


def test_json_schema_accepts_every_example_and_rejects_typos_per_strategy() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = pipeline_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    examples = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(examples.glob("*.yaml")):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    engine = {"backend": "test"}
    bad = {"engine": engine, "thought": {"strategy": "self_consistency", "nn": 3}}
    assert any("'nn' was unexpected" in e.message for e in validator.iter_errors(bad))
    wrong_type = {"engine": engine, "thought": {"strategy": "deepconf", "n": "many"}}
    assert any("not of type 'integer'" in e.message for e in validator.iter_errors(wrong_type))
    other_strategy = {"engine": engine, "thought": {"strategy": "single", "warmup": 2}}  # a deepconf parameter
    assert list(validator.iter_errors(other_strategy))
    shorthands = {
        "engine": engine,
        "tools": ["calculator", {"retrieve": {"corpus": "d"}}],
        "outputs": {"progress": True},
    }
    assert not list(validator.iter_errors(shorthands))


def test_tools_are_checked_with_lines_and_suggestions() -> None:
    head = BASE + "planner: {kind: llmcompiler}\n"
    err = error_of(head + "tools:\n  - calculator\n  - retreive: {corpus: docs/}\n")
    assert err.path == "tools.1" and err.line == 5 and "Did you mean 'retrieve'?" in str(err)
    err = error_of(head + "tools:\n  - retrieve: {corpus: docs/, k: 3}\n")
    assert err.path == "tools.0.k" and err.line == 4
    err = error_of(head + "tools: [retrieve]\n")
    assert "needs a corpus" in str(err)
    err = error_of(BASE + "tools: [calculator]\n")
    assert "no planner" in str(err) and err.line == 2
    err = error_of(BASE + "planner: {kind: structured, max_stepz: 3}\n")
    assert err.path == "planner.max_stepz" and "Did you mean 'max_steps'?" in str(err)


def test_engine_override_reaches_a_policy_declared_under_engines() -> None:
    spec = load_spec("engines:\n  policy: {backend: vllm, model: smollm2-135m-instruct}\n")
    replaced = spec.with_overrides({"engine": {"backend": "test", "default": "x"}})
    assert replaced.engines["policy"].backend == "test"
    assert spec.with_overrides({"engine.model": "other"}).engines["policy"].model == "other"
