"""`--format text|json|github` holds on every command but demo: json is one document with "version", github is
workflow commands only (one per finding, then the command's summary as a notice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_preset_from_sensitivity import MEASURED, report, write_report

from inspect_tools.cli import main


@pytest.fixture(scope="module")
def files(wan_nvfp4_mixed, wan_float, wan_gguf_q4_0, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("formats")
    return {"nvfp4": str(wan_nvfp4_mixed), "float": str(wan_float), "gguf": str(wan_gguf_q4_0),
            "report": str(write_report(folder / "sensitivity.json", report(MEASURED))), "dir": str(folder)}


# Each command in a quick form (few layers, dry runs): what is tested is the output contract, not the engine.
COMMANDS = {
    "inspect": lambda f: ["inspect", f["nvfp4"], "--layers", "blocks.0.*"],
    "lint": lambda f: ["lint", f["nvfp4"]],
    "lint --list": lambda f: ["lint", "--list"],
    "lint --explain": lambda f: ["lint", "--explain", "NV204"],
    "diff": lambda f: ["diff", f["nvfp4"], f["gguf"], "--layers", "blocks.0.ffn.*"],
    "roundtrip": lambda f: ["roundtrip", f["nvfp4"], "--against", f["float"], "--layers", "blocks.0.ffn.0"],
    "fix": lambda f: ["fix", f["nvfp4"], f["dir"] + "/fixed.safetensors", "--dry-run"],
    "convert": lambda f: ["convert", f["float"], f["dir"] + "/out.safetensors", "--preset", "smart", "--dry-run"],
    "preset list": lambda f: ["preset", "list"],
    "preset show": lambda f: ["preset", "show", "smart"],
    "preset explain": lambda f: ["preset", "explain", "smart", "blocks.0.ffn.0"],
    "preset from-gguf": lambda f: ["preset", "from-gguf", f["gguf"], "-o", f["dir"] + "/g.toml", "--force"],
    "preset from-sensitivity": lambda f: ["preset", "from-sensitivity", f["report"]],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_json_is_one_versioned_document(command, files, capsys) -> None:
    code = main([*COMMANDS[command](files), "--format", "json"])
    out = capsys.readouterr().out
    assert code in (0, 1) and json.loads(out)["version"] == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_github_is_workflow_commands_only(command, files, capsys) -> None:
    code = main([*COMMANDS[command](files), "--format", "github"])
    lines = capsys.readouterr().out.splitlines()
    assert code in (0, 1) and lines
    assert all(line.startswith(("::notice ", "::warning ", "::error ")) for line in lines), lines[:3]


def test_lint_list_json_says_which_rules_are_enabled(capsys) -> None:
    assert main(["lint", "--list", "--ignore", "NV3", "--format", "json"]) == 0
    rules = {r["id"]: r["enabled"] for r in json.loads(capsys.readouterr().out)["rules"]}
    assert rules["NV101"] is True and rules["NV301"] is False


def test_lint_list_text_has_the_enabled_column(capsys) -> None:
    assert main(["lint", "--list", "--ignore", "NV301"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if " id " in line or "┃id" in line)
    assert " on " in header and "on: enabled by --select / --ignore / [tool.nvdiag]" in out
    row = next(line for line in out.splitlines() if "NV301" in line)
    assert " no " in row


def test_lint_explain_json_carries_the_long_text(capsys) -> None:
    assert main(["lint", "--explain", "NV204", "--format", "json"]) == 0
    (rule,) = json.loads(capsys.readouterr().out)["rules"]
    assert rule["id"] == "NV204" and "swizzled" in rule["explanation"]


@pytest.mark.parametrize("command", ["verify", "sensitivity", "calibrate"])
def test_comfyui_commands_offer_all_three_formats(command, capsys, monkeypatch) -> None:
    # they need ComfyUI and minutes to run (tests/test_verify.py, test_sensitivity.py run them); the option is here
    monkeypatch.setenv("COLUMNS", "200")
    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--format" in help_text and "github (workflow annotations)" in help_text


def test_readme_promise_every_command_but_demo_takes_format(capsys, monkeypatch) -> None:
    from inspect_tools.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    names = [c.name for c in app.registered_commands if c.name != "demo"]
    for name in names:
        assert main([name, "--help"]) == 0
        assert "--format" in capsys.readouterr().out, name
    for sub in ("list", "show", "explain", "from-gguf", "from-sensitivity"):
        assert main(["preset", sub, "--help"]) == 0
        assert "--format" in capsys.readouterr().out, sub


def test_files_the_commands_wrote_are_where_they_said(files) -> None:
    assert Path(files["dir"], "g.toml").exists() and not Path(files["dir"], "out.safetensors").exists()
