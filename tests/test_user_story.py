"""The user's story end to end (issue 20): a noisy NVFP4 file and the references a ComfyUI user has. No command may
say PASS on a file that renders noise without saying why, and every hint is a command that works as printed."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from inspect_tools.cli import main


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_printed(line: str, capsys) -> tuple[int, str, str]:
    """Run a command line exactly as nvdiag printed it (shell quoting, comments dropped)."""
    argv = shlex.split(line, comments=True)
    assert argv[0] == "nvdiag"
    return run(argv[1:], capsys)


@pytest.fixture(scope="module")
def noisy(make_checkpoint) -> Path:
    return make_checkpoint("nvfp4-mixed", faults=("scale-layout-linear",), name="story_linear")


@pytest.fixture(scope="module")
def swapped_nibbles(make_checkpoint) -> Path:
    return make_checkpoint("nvfp4-mixed", faults=("nibble-order",), name="story_nibbles")


@pytest.fixture(scope="module")
def stale(make_checkpoint) -> Path:
    return make_checkpoint("nvfp4-mixed", faults=("stale-scale",), name="story_stale")


@pytest.fixture(scope="module")
def transposed(make_checkpoint) -> Path:
    return make_checkpoint("nvfp4-mixed", faults=("transposed-weight",), name="story_transposed")


# --- 1. diff against a reference with values compares them by default -----------------------------------------


@pytest.mark.parametrize("reference", ["wan_gguf_q4_0", "wan_fp8_comfy"])
def test_diff_finds_linear_layout_against_gguf_and_fp8_by_default(noisy, reference, request, capsys) -> None:
    ref = request.getfixturevalue(reference)
    code, out, _ = run(["diff", str(noisy), str(ref), "--layers", "blocks.0.*", "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["values_skipped"] is None
    assert {f["cause"] for f in doc["findings"] if f["severity"] == "error"} == {"scale-layout-linear"}


def test_diff_without_values_says_so_loudly(noisy, wan_gguf_q4_0, capsys) -> None:
    code, out, _ = run(["diff", str(noisy), str(wan_gguf_q4_0), "--no-values"], capsys)
    lines = out.splitlines()
    assert code == 0 and "Dequantized values NOT compared (--no-values)" in out
    assert f"  nvdiag roundtrip {noisy} --against {wan_gguf_q4_0}" in lines
    assert lines[-1].startswith("PASS") and lines[-1].endswith("(headers only)")


# --- 2. lint says what it cannot see without a reference ------------------------------------------------------


@pytest.mark.parametrize("fixture", ["swapped_nibbles", "stale", "transposed"])
def test_lint_passes_value_faults_but_names_what_it_did_not_check(fixture, request, capsys) -> None:
    path = request.getfixturevalue(fixture)
    code, out, _ = run(["lint", str(path)], capsys)
    assert code == 0 and "not checked: nibble order, stale scales, transposed square layers" in out
    assert f"  nvdiag roundtrip {path} --against REF" in out.splitlines()
    code, out, _ = run(["lint", str(path), "--format", "json"], capsys)
    assert json.loads(out)["not_checked"]["command"] == f"nvdiag roundtrip {path} --against REF"


def test_lint_of_a_float_file_has_nothing_left_unchecked(wan_float, capsys) -> None:
    code, out, _ = run(["lint", str(wan_float), "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["not_checked"] is None


# --- 3. every hint works as printed -------------------------------------------------------------------------


def test_roundtrip_hint_for_nibble_order_is_a_fix_that_works(swapped_nibbles, wan_float, tmp_path, capsys,
                                                              monkeypatch) -> None:
    mine = tmp_path / swapped_nibbles.name
    mine.write_bytes(swapped_nibbles.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["roundtrip", mine.name, "--against", str(wan_float)], capsys)
    hint = out.splitlines()[-1].removeprefix("next: ")
    fixed = mine.name.removesuffix(".safetensors") + "_fixed.safetensors"  # the session may have named the file
    assert code == 1 and hint == f"nvdiag fix {mine.name} {fixed} --against {wan_float}"
    code, out, _ = run_printed(hint, capsys)  # fix's gate roundtrips the repaired file against the source too
    assert code == 0 and "repaired nibble-order (20)" in out and (tmp_path / fixed).exists()


def test_fix_without_reference_says_how_to_find_value_level_causes(swapped_nibbles, tmp_path, capsys) -> None:
    out_path = tmp_path / "fixed.safetensors"
    code, out, _ = run(["fix", str(swapped_nibbles), str(out_path)], capsys)
    assert code == 0 and not out_path.exists()
    assert f"nvdiag fix {swapped_nibbles} {out_path} --against SRC" in out


@pytest.mark.parametrize("fixture", ["transposed", "stale"])
def test_roundtrip_hint_for_unrepairable_causes_is_a_conversion_that_works(fixture, wan_float, request, tmp_path,
                                                                            capsys, monkeypatch) -> None:
    path = request.getfixturevalue(fixture)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["roundtrip", str(path), "--against", str(wan_float), "--layers", "blocks.0.*", "--format",
                        "json"], capsys)
    hint = json.loads(out)["summary"]["next"]
    out_name = path.name.removesuffix(".safetensors") + "_nvdiag.safetensors"
    assert code == 1 and hint == f"nvdiag convert {wan_float} {path.parent / out_name} --preset wan2.2-ti2v-5b"
    if fixture == "stale":  # one conversion is enough to show the command runs as printed
        code, out, _ = run_printed(hint, capsys)
        assert code == 0 and (path.parent / out_name).exists()
        (path.parent / out_name).unlink()


def test_roundtrip_against_a_lossy_reference_names_the_missing_source(stale, wan_gguf_q4_0, capsys) -> None:
    code, out, _ = run(["roundtrip", str(stale), "--against", str(wan_gguf_q4_0), "--layers", "blocks.0.ffn.*",
                        "--format", "json"], capsys)
    hint = json.loads(out)["summary"]["next"]
    assert hint.startswith("nvdiag convert SOURCE ") and "# SOURCE: the FP32/FP16/BF16 checkpoint" in hint


# --- 4. messages without blanks -------------------------------------------------------------------------------


def test_transposed_verdict_keeps_its_brackets(transposed, wan_float, capsys) -> None:
    code, out, _ = run(["roundtrip", str(transposed), "--against", str(wan_float), "--layers", "blocks.0.*"], capsys)
    assert "weights are stored transposed ([in, out])" in " ".join(out.split())
    assert " ;" not in out and "  (" not in out


# --- 5. usage errors that used to exit 0 ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "diff", "roundtrip"])
@pytest.mark.parametrize("glob", ["nothing.*", "["])
def test_layers_glob_matching_nothing_or_invalid_is_one_line_exit_2(command, glob, wan_nvfp4_mixed, wan_float,
                                                                     capsys) -> None:
    argv = {"inspect": ["inspect", str(wan_nvfp4_mixed)], "diff": ["diff", str(wan_nvfp4_mixed), str(wan_float)],
            "roundtrip": ["roundtrip", str(wan_nvfp4_mixed), "--against", str(wan_float)]}[command]
    code, out, err = run([*argv, "--layers", glob], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and f"--layers {glob!r}" in err


def test_swapped_roundtrip_arguments_are_named(wan_nvfp4_mixed, wan_float, capsys) -> None:
    code, _, err = run(["roundtrip", str(wan_float), "--against", str(wan_nvfp4_mixed)], capsys)
    assert code == 2 and "did you swap PATH and --against?" in err
    assert f"nvdiag roundtrip {wan_nvfp4_mixed} --against {wan_float}" in err


# --- 8. lint and fix agree on severities ----------------------------------------------------------------------


def test_lint_and_fix_agree_that_a_quantized_sensitive_layer_is_an_error(make_checkpoint, tmp_path, capsys) -> None:
    path = make_checkpoint("nvfp4-mixed", faults=("sensitive-layer-quantized",), name="story_sensitive")
    code, out, _ = run(["lint", str(path), "--format", "json"], capsys)
    lint_severities = {f["severity"] for f in json.loads(out)["findings"] if f["rule"] == "NV301"}
    code_fix, out, _ = run(["fix", str(path), str(tmp_path / "o.safetensors"), "--format", "json"], capsys)
    fix_severities = {f["severity"] for f in json.loads(out)["findings"] if f["rule"] == "NV301"}
    assert (code, code_fix) == (1, 1) and lint_severities == fix_severities == {"error"}


# --- 9. configuration -----------------------------------------------------------------------------------------


def test_config_typo_is_an_error_with_a_suggestion(wan_nvfp4_mixed, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.nvdiag]\nselct = ["NV1"]\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["lint", str(wan_nvfp4_mixed)], capsys)
    assert code == 2 and "unknown key 'selct' (did you mean 'select'?)" in err and "pyproject.toml" in err


def test_command_line_select_beats_config_ignore_and_the_config_is_named(make_checkpoint, tmp_path, monkeypatch,
                                                                         capsys) -> None:
    path = make_checkpoint("nvfp4-mixed", faults=("sensitive-layer-quantized",), name="story_sensitive")
    (tmp_path / "pyproject.toml").write_text('[tool.nvdiag]\nignore = ["NV301"]\n')
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["lint", str(path)], capsys)
    assert code == 0 and f"config: [tool.nvdiag] in {tmp_path / 'pyproject.toml'}" in out
    code, out, _ = run(["lint", str(path), "--select", "NV301", "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 1 and {f["rule"] for f in doc["findings"]} == {"NV301"}
    assert doc["config"] == str(tmp_path / "pyproject.toml")


# --- 12, 13. outputs and error lines that say what to do ------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "fix"])
def test_an_output_named_gguf_is_refused(command, wan_float, wan_nvfp4_mixed, tmp_path, capsys) -> None:
    out = tmp_path / "out.gguf"
    argv = (["convert", str(wan_float), str(out), "--preset", "smart"] if command == "convert"
            else ["fix", str(wan_nvfp4_mixed), str(out)])
    code, _, err = run(argv, capsys)
    assert code == 2 and not out.exists()
    assert "nvdiag writes safetensors only, not .gguf: name the output out.safetensors" in err


def test_safetensors_named_gguf_says_what_it_is(wan_nvfp4_mixed, tmp_path, capsys) -> None:
    named = tmp_path / "model.gguf"
    named.write_bytes(wan_nvfp4_mixed.read_bytes())
    code, _, err = run(["inspect", str(named)], capsys)
    assert code == 2 and err.rstrip().endswith("this is a safetensors file: give it a .safetensors name")


@pytest.mark.parametrize(("content", "said"), [
    (b"hello world, this is not a checkpoint", "this is a text file (it starts with 'hello world, this is not')"),
    (b"<!DOCTYPE html><html><body>rate limited</body></html>", "this is an HTML page, not a checkpoint"),
])
def test_junk_under_a_checkpoint_name_says_what_it_is(content, said, tmp_path, capsys) -> None:
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(content)
    code, _, err = run(["lint", str(junk)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and said in err


def test_convert_of_an_already_quantized_file_says_what_to_do(wan_nvfp4_mixed, tmp_path, capsys) -> None:
    code, _, err = run(["convert", str(wan_nvfp4_mixed), str(tmp_path / "o.safetensors"), "--preset", "smart"], capsys)
    assert code == 2 and "already quantized (nvfp4 layers)" in err and "nvdiag fix" in err


@pytest.mark.parametrize("argv", [["preset", "show", "wan2.2-ti2v5b"], ["convert", "a", "b.safetensors", "--preset",
                                                                        "wan2.2-ti2v5b"]])
def test_preset_typo_suggests_the_name(argv, capsys) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2 and "(did you mean 'wan2.2-ti2v-5b'?)" in err
