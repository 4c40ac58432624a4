"""VLLMEngine's constructor options, as they reach vLLM's engine arguments (no engine is started)."""

from __future__ import annotations

from branchwise.engine.vllm_engine import VLLMEngine


def test_compact_json_option_reaches_the_engine_config() -> None:
    assert "structured_outputs_config" not in VLLMEngine().engine_args  # vLLM's own default
    compact = VLLMEngine(compact_json=True).engine_args["structured_outputs_config"]
    assert compact == {"backend": "guidance", "disable_any_whitespace": True, "disable_additional_properties": True}
    own = {"structured_outputs_config": {"backend": "xgrammar"}}
    assert VLLMEngine(compact_json=True, engine_args=own).engine_args["structured_outputs_config"] == {
        **compact,
        "backend": "xgrammar",
    }
    assert VLLMEngine(engine_args=own).engine_args["structured_outputs_config"] == {"backend": "xgrammar"}
