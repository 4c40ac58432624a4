"""VLLMEngine's constructor options, as they reach vLLM's engine arguments (no engine is started)."""

from __future__ import annotations

from branchwise.engine.vllm_engine import VLLMEngine


def test_json_whitespace_option_reaches_the_engine_config() -> None:
    compact = VLLMEngine().engine_args["structured_outputs_config"]
    assert compact["disable_any_whitespace"] is True and compact["backend"] == "guidance"
    assert VLLMEngine(json_whitespace=True).engine_args["structured_outputs_config"] == {}  # vLLM's own default
    own = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": False}}
    assert VLLMEngine(engine_args=own).engine_args["structured_outputs_config"] == {
        **compact,
        **own["structured_outputs_config"],
    }
