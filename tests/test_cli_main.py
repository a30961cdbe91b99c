"""The `nvdiag` entry point: every failure the user can cause or meet is one line and a stable exit code."""

from __future__ import annotations

import pytest

from inspect_tools.cli import main


def test_an_environment_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", "/proc/nvdiag-cannot-be-made"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nvdiag: error: /proc/nvdiag-cannot-be-made") and len(err.splitlines()) == 1


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("inspect", "diff", "lint", "roundtrip", "convert", "fix", "demo"):
        assert main([command, "--help"]) == 0
        assert f"nvdiag {command}" in capsys.readouterr().out, command
