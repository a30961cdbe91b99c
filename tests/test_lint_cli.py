"""`nvdiag lint` from the command line: exit codes, JSON, GitHub annotations, text at 80 columns, --explain,
--list, --select / --ignore and [tool.nvdiag] configuration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from inspect_tools.cli import main
from inspect_tools.synthetic import write_header_only
from reference_specs.rules import RULES

GITHUB_LINE = re.compile(r"^::(error|warning|notice) file=[^,:]+,title=NV\d{3} [a-z0-9-]+::\S.*$")


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WAN NVFP4 file without block scales on two layers (NV101, errors)."""
    from inspect_tools.synthetic import write_nvfp4_mixed

    return write_nvfp4_mixed(tmp_path_factory.mktemp("lint") / "broken.safetensors", "wan2.2-ti2v-5b",
                             faults=("missing-block-scale",), fault_layers=["blocks.0.self_attn.q", "blocks.1.ffn.2"])


@pytest.fixture(scope="module")
def warned(make_checkpoint) -> Path:
    """Only a warning: input_scale copied from weight_scale_2 on every layer (NV203)."""
    return make_checkpoint("nvfp4-mixed", faults=("weight-derived-input-scale",), name="lint_warned")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["lint", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_file_exits_0_with_a_pass_verdict(wan_nvfp4_mixed: Path, capsys) -> None:
    code, out, _ = run([str(wan_nvfp4_mixed)], capsys)
    assert code == 0 and out.strip().splitlines()[-1].startswith("PASS: 0 error(s), 0 warning(s), 0 info(s)")


def test_errors_exit_1_and_json_carries_rule_cause_and_evidence(broken: Path, capsys) -> None:
    code, out, _ = run([str(broken), "--format", "json"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert doc["version"] == 1
    assert doc["summary"] == {"errors": 2, "warnings": 0, "infos": 0, "layers": doc["summary"]["layers"]}
    assert doc["summary"]["layers"] > 20
    first = doc["findings"][0]
    assert set(first) == {"rule", "cause", "severity", "file", "layer", "message", "evidence"}
    assert (first["rule"], first["cause"], first["severity"]) == ("NV101", "missing-block-scale", "error")
    assert first["file"] == str(broken) and first["layer"] == "blocks.0.self_attn.q"
    assert "weight_scale_2" in first["evidence"]["roles"]


def test_json_is_strict_even_with_nan_evidence(make_checkpoint, capsys) -> None:
    path = make_checkpoint("nvfp4-mixed", faults=("non-finite-scale",), name="lint_nan")
    code, out, _ = run([str(path), "--format", "json"], capsys)
    assert code == 1
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert {f["rule"] for f in doc["findings"]} == {"NV202"} and doc["findings"][0]["evidence"]["nan"] == 1


def test_github_annotations_follow_the_workflow_command_syntax(broken: Path, warned: Path, capsys) -> None:
    code, out, _ = run([str(broken), str(warned), "--format", "github"], capsys)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 2 + 20 + 1  # one per finding, then lint's summary as a notice
    assert all(GITHUB_LINE.match(line) for line in lines[:-1]), lines[:3]
    assert lines[0].startswith(f"::error file={broken},title=NV101 missing-block-scale::blocks.0.self_attn.q: ")
    assert lines[-2].startswith("::warning ")
    assert lines[-1].startswith("::notice title=nvdiag lint::FAIL: 2 error(s), 20 warning(s)")


def test_fail_on_decides_what_fails(warned: Path, capsys) -> None:
    assert run([str(warned)], capsys)[0] == 0
    assert run([str(warned), "--fail-on", "warning"], capsys)[0] == 1
    assert run([str(warned), "--fail-on", "loud"], capsys)[0] == 2


def test_select_and_ignore(broken: Path, capsys) -> None:
    assert run([str(broken), "--ignore", "NV101"], capsys)[0] == 0
    assert run([str(broken), "--select", "NV2,NV3"], capsys)[0] == 0
    assert run([str(broken), "--select", "missing-block-scale"], capsys)[0] == 1
    code, _, err = run([str(broken), "--select", "NV999"], capsys)
    assert code == 2 and "'NV999' names no rule" in err


def test_pyproject_configuration_is_found_upward(broken: Path, warned: Path, tmp_path: Path, monkeypatch,
                                                 capsys) -> None:
    project = tmp_path / "project"
    (project / "sub" / "deeper").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[tool.nvdiag]\nignore = ["NV101"]\nfail-on = "warning"\n')
    (project / "sub" / "pyproject.toml").write_text('[project]\nname = "x"\n')  # no [tool.nvdiag]: passed over
    monkeypatch.chdir(project / "sub" / "deeper")
    assert run([str(broken)], capsys)[0] == 0  # NV101 ignored by the file
    assert run([str(warned)], capsys)[0] == 1  # fail-on warning from the file
    assert run([str(warned), "--fail-on", "error"], capsys)[0] == 0  # the command line wins
    (project / "pyproject.toml").write_text('[tool.nvdiag]\nselect = ["NV9"]\n')
    code, _, err = run([str(broken)], capsys)
    assert code == 2 and "pyproject.toml" in err


def test_explain_by_id_name_or_cause(capsys) -> None:
    code, out, _ = run(["--explain", "NV204"], capsys)
    assert code == 0 and "NV204 scale-layout-linear" in out and "[roundup(out,128)" in out and "nvdiag fix" in out
    code, out, _ = run(["--explain", "scale-layout-linear"], capsys)
    assert "NV204" in out and "NV205" in out
    code, out, _ = run(["--explain", "input-scale-implausible"], capsys)
    assert "dynamic" in out and "safe default" in out
    code, _, err = run(["--explain", "NV000"], capsys)
    assert code == 2 and "NV000" in err


def test_list_shows_every_rule(capsys) -> None:
    code, out, _ = run(["--list"], capsys)
    assert code == 0 and all(rule.id in out and rule.name in out for rule in RULES)


def test_text_output_fits_80_columns(broken: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run([str(broken)], capsys)
    prose = [line for line in out.splitlines() if not line.startswith("  nvdiag ")]  # commands are never broken
    assert code == 1 and max(len(line) for line in prose) <= 80
    assert f"  nvdiag roundtrip {broken} --against REF" in out.splitlines()
    assert "NV101" in out and "blocks.0.self_attn.q" in out and out.strip().splitlines()[-1].startswith("FAIL")


def test_many_findings_of_one_rule_are_collapsed_in_text(make_checkpoint, capsys) -> None:
    path = make_checkpoint("nvfp4-mixed", faults=("missing-tensor-scale",), name="lint_many")
    code, out, _ = run([str(path)], capsys)
    assert code == 1 and "12 more like this" in out and "20 error(s)" in out


def test_unreadable_missing_or_absent_input_exits_2(tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run([str(garbage)], capsys)
    assert code == 2 and "garbage.safetensors" in err and "Traceback" not in err
    assert run([str(tmp_path / "missing.safetensors")], capsys)[0] == 2
    assert run([], capsys)[0] == 2


def test_header_only_on_a_14b_sized_file_is_instant(tmp_path: Path, capsys) -> None:
    import time

    path = write_header_only(tmp_path / "a14b.safetensors", "wan2.2-t2v-a14b")
    start = time.perf_counter()
    code, out, _ = run([str(path), "--header-only", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["summary"]["layers"] > 600
    assert time.perf_counter() - start < 3.0


def _crash(model: object, ctx: object) -> list:
    raise IndexError("index 7 is out of bounds for dimension 0 with size 4")


def test_a_crashing_rule_is_an_internal_error_naming_the_rule_not_bad_input(wan_nvfp4_mixed: Path, monkeypatch,
                                                                           capsys) -> None:
    rule = next(r for r in RULES if r.id == "NV204")
    monkeypatch.setattr(rule, "check", _crash)
    for fmt in ("text", "json"):
        code, _, err = run([str(wan_nvfp4_mixed), "--format", fmt], capsys)
        assert code == 3  # neither 1 (findings) nor 2 (bad input): scripts can tell a bug apart
        line = err.strip()
        assert "\n" not in line and line.startswith("nvdiag: internal error: ")
        assert "rule NV204" in line and "crashed: IndexError: index 7" in line and "bug in nvdiag" in line
        assert "could not read" not in line and "Traceback" not in err


def test_a_crashing_rule_is_reported_by_the_engine_too(wan_nvfp4_mixed: Path, monkeypatch) -> None:
    from inspect_tools.errors import InputError, InternalError
    from inspect_tools.layers import open_model
    from inspect_tools.lint import lint_model

    monkeypatch.setattr(next(r for r in RULES if r.id == "NV101"), "check", _crash)
    with open_model(wan_nvfp4_mixed) as model, pytest.raises(InternalError) as caught:
        lint_model(model)
    assert not isinstance(caught.value, InputError) and isinstance(caught.value.__cause__, IndexError)


def test_a_truncated_file_is_still_unreadable_input(wan_nvfp4_mixed: Path, tmp_path: Path, capsys) -> None:
    truncated = tmp_path / "truncated.safetensors"
    data = wan_nvfp4_mixed.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run([str(truncated)], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and line.startswith("nvdiag: error: ") and "truncated.safetensors" in line
    assert "internal error" not in line and "Traceback" not in err


def test_a_file_truncated_while_rules_read_it_is_unreadable_input(wan_nvfp4_mixed: Path, tmp_path: Path) -> None:
    from inspect_tools.errors import InputError, InternalError
    from inspect_tools.layers import open_model
    from inspect_tools.lint import lint_model

    shrinking = tmp_path / "shrinking.safetensors"
    shrinking.write_bytes(wan_nvfp4_mixed.read_bytes())
    with open_model(shrinking) as model:
        with shrinking.open("r+b") as fh:  # the header was read; the tensor bytes go away before a rule reads them
            fh.truncate(4096)
        with pytest.raises(InputError) as caught:
            lint_model(model)
    assert not isinstance(caught.value, InternalError) and "truncated" in str(caught.value)
