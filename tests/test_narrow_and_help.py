"""What a user sees in a narrow terminal, in piped --help and from --version (issue 20, items 6 and 14)."""

from __future__ import annotations

import re

import pytest

from inspect_tools.cli import main
from inspect_tools.cli.roundtrip_cmd import EPILOG


def test_narrow_roundtrip_keeps_every_layer_name_and_cause_whole(make_checkpoint, wan_float, monkeypatch,
                                                                 capsys) -> None:
    stale = make_checkpoint("nvfp4-mixed", faults=("stale-scale",), name="story_stale")
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["roundtrip", str(stale), "--against", str(wan_float), "--layers", "blocks.*.cross_attn.*"]) == 1
    lines = capsys.readouterr().out.splitlines()
    names = [f"blocks.{b}.cross_attn.{p}" for b in (0, 1) for p in "qkvo"]
    for name in names:
        i = lines.index(name)  # the name alone on its line, never split
        assert lines[i + 1].startswith("  stale-scale; ")  # and the cause first below it
    assert max(len(line) for line in lines if not line.startswith("next: ")) <= 60


def test_narrow_inspect_never_splits_a_layer_name(wan_nvfp4_mixed, monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["inspect", str(wan_nvfp4_mixed), "--layers", "blocks.0.*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "blocks.0.cross_attn.norm_k" in lines and "blocks.0.self_attn.q" in lines


def test_wide_roundtrip_is_a_table_with_its_columns_explained(make_checkpoint, wan_float, monkeypatch,
                                                              capsys) -> None:
    stale = make_checkpoint("nvfp4-mixed", faults=("stale-scale",), name="story_stale")
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["roundtrip", str(stale), "--against", str(wan_float), "--layers", "blocks.0.ffn.0"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"blocks\.0\.ffn\.0 +nvfp4 +[\d.]+ +[\d.]+ +[\d.]+ +-?[\d.]+ +stale-scale", out)
    assert "x: error / expected" in " ".join(out.split())


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert re.fullmatch(r"nvdiag \S+\n", capsys.readouterr().out)


def test_piped_help_keeps_each_example_on_one_line(monkeypatch, capsys) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    assert main(["roundtrip", "--help"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    for example in (line.strip() for line in EPILOG.splitlines() if line.strip().startswith("nvdiag ")):
        assert example in lines


@pytest.mark.parametrize("fault", ["scale-layout-linear"])
def test_lint_names_a_real_rule_to_explain(fault, make_checkpoint, capsys) -> None:
    path = make_checkpoint("nvfp4-mixed", faults=(fault,), name="story_linear")
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert "--explain ID" not in out and "nvdiag lint --explain NV204:" in out
