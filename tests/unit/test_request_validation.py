"""Every invalid GenerationRequest field fails at construction with a typed error naming the field."""

from __future__ import annotations

import pytest

from branchwise.engine import ChatMessage, GenerationRequest, StructuredOutput
from branchwise.errors import ConfigError, RequestValidationError


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "text": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, "continue_final_message"),
        ({"prompt": "a", "continue_final_message": True}, "continue_final_message"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 2.0}, "n"),
        ({"prompt": "a", "n": True}, "n"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "temperature": 0, "n": 2}, "n"),
        ({"prompt": "a", "top_p": 0.0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_k": 0}, "top_k"),
        ({"prompt": "a", "min_p": 2}, "min_p"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "10"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 5, "min_tokens": 6}, "min_tokens"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "logprobs": -1}, "logprobs"),
        ({"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "a", "prompt_logprobs": 1.5}, "prompt_logprobs"),
        ({"prompt": "a", "prompt_logprobs": 0, "prompt_logprobs_last": 0}, "prompt_logprobs_last"),
        ({"prompt": "a", "prompt_logprobs_last": 3}, "prompt_logprobs_last"),  # without prompt_logprobs
        ({"prompt": "a", "structured": {"regex": "a+"}}, "structured"),
        ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_bad_request_fields_raise_typed_error(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        GenerationRequest(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ConfigError)  # a usage error, catchable as ValueError too
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "structured"),
        ({"regex": "a", "choices": ["a"]}, "structured"),
        ({"regex": "(unclosed"}, "structured.regex"),
        ({"choices": []}, "structured.choices"),
        ({"choices": "yes"}, "structured.choices"),
        ({"choices": ["yes", ""]}, "structured.choices"),
        ({"json_schema": ["not", "a", "mapping"]}, "structured.json_schema"),
        ({"json_schema": {"x": object()}}, "structured.json_schema"),
    ],
)
def test_bad_structured_output(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        StructuredOutput(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_valid_request_normalises_sequences() -> None:
    req = GenerationRequest(
        messages=[{"role": "system", "content": "be brief"}, ChatMessage("user", "hi")],
        stop="\n\n",
        structured=StructuredOutput(choices=["yes", "no"]),
    )
    assert req.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
    assert req.stop == ("\n\n",)
    assert req.structured is not None and req.structured.choices == ("yes", "no")
    assert req.structured.kind == "choices"


def test_replace_revalidates() -> None:
    req = GenerationRequest(prompt="x", max_tokens=10)
    assert req.replace(max_tokens=3).max_tokens == 3
    with pytest.raises(RequestValidationError, match="max_tokens"):
        req.replace(max_tokens=0)


def test_requests_are_immutable() -> None:
    req = GenerationRequest(prompt="x")
    with pytest.raises(AttributeError):
        req.n = 3  # type: ignore[misc]
