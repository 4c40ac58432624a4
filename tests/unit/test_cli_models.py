"""`branchwise models list|pull` on the command line."""

from __future__ import annotations

import pytest

from branchwise.cli import main


def test_models_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out.replace("\n", "") or "smollm2-135m" in out
    assert "qwen2.5-coder" in out


def test_models_pull_unknown_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "pull", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'smollm2'" in err
    assert "Did you mean 'smollm2-135m-instruct'?" in err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 2  # argparse's own usage errors follow the exit-code table too
    assert "usage: branchwise models" in capsys.readouterr().err
