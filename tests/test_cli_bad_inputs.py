"""Every command that reads a checkpoint turns every broken or hostile input into exit 2 and one line on stderr
that names the file, prints no traceback, never unpickles anything and leaves nothing in the output folder.

Each case builds one entry of inspect_tools.synthetic.bad_inputs.BAD_INPUTS and passes it to one input slot of one
command (e.g. `diff`'s second path, `convert --input-scales`); the other slots get small valid files.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inspect_tools.cli import main
from inspect_tools.synthetic.bad_hand_written import BAD_INPUT_SCALES, BAD_PRESETS, WARNED_INPUT_SCALES
from inspect_tools.synthetic.bad_inputs import (
    BAD_INPUTS,
    MALFORMED_LAYERS,
    PICKLE_MARKER_NAME,
    UNSAFE_INPUTS,
    gguf_bytes,
    transplant,
)

# argv for one command with the bad path in one slot: (bad, good float source, good NVFP4 file, output folder).
Slot = Callable[[str, str, str, Path], list[str]]

SLOTS: dict[str, Slot] = {
    "inspect": lambda bad, f, q, out: ["inspect", bad],
    "lint": lambda bad, f, q, out: ["lint", bad],
    "diff-mine": lambda bad, f, q, out: ["diff", bad, q],
    "diff-ref": lambda bad, f, q, out: ["diff", q, bad],
    "roundtrip-path": lambda bad, f, q, out: ["roundtrip", bad, "--against", f, "--report", str(out / "r.html")],
    "roundtrip-against": lambda bad, f, q, out: ["roundtrip", q, "--against", bad, "--report", str(out / "r.html")],
    "preset-from-gguf": lambda bad, f, q, out: ["preset", "from-gguf", bad, "-o", str(out / "p.toml")],
    "preset-show-on": lambda bad, f, q, out: ["preset", "show", "smart", "--on", bad],
    "convert-src": lambda bad, f, q, out: ["convert", bad, str(out / "o.safetensors"), "--preset", "smart"],
    "convert-input-scales": lambda bad, f, q, out: ["convert", f, str(out / "o.safetensors"), "--preset", "smart",
                                                    "--input-scales", bad],
    "fix-broken": lambda bad, f, q, out: ["fix", bad, str(out / "o.safetensors")],
    "fix-against": lambda bad, f, q, out: ["fix", q, str(out / "o.safetensors"), "--against", bad],
}

# inspect and lint see every bad input; the other slots a representative subset plus every pickle-based one.
REPRESENTATIVE = ("truncated", "header_not_json", "offset_past_end", "index_parent_path", "gguf_truncated_data",
                  "directory_without_checkpoint", "missing_path", "empty_file", "gguf_tensor_past_end",
                  "shape_numel_overflow", "index_symlink_loop")
FULL_SLOTS = ("inspect", "lint")


def _cases() -> list[tuple[str, str]]:
    cases = []
    for slot in SLOTS:
        names = sorted(BAD_INPUTS) if slot in FULL_SLOTS else sorted(set(REPRESENTATIVE) | UNSAFE_INPUTS)
        cases += [(slot, name) for name in names]
    return cases


@pytest.fixture(scope="module")
def good(make_checkpoint) -> tuple[str, str]:
    """(float source, NVFP4 mixed file) of the same tiny WAN model."""
    return str(make_checkpoint("float", name="bad_inputs_float")), str(make_checkpoint("nvfp4-mixed",
                                                                                       name="bad_inputs_nvfp4"))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_clear_line(err: str, folder: Path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nvdiag: error: "), err
    assert "Traceback" not in err
    assert str(folder) in lines[0], f"the message does not name the file: {lines[0]}"


@pytest.mark.parametrize(("slot", "name"), _cases())
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, good, slot: str, name: str, capsys):
    folder = tmp_path / name
    bad = BAD_INPUTS[name](folder)
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    code, _, err = _run(SLOTS[slot](str(bad), *good, out), capsys)
    assert code == 2, err
    _assert_one_clear_line(err, folder)
    if name in UNSAFE_INPUTS:
        assert "weights_only=True" in err  # the message explains how to convert the file safely
    assert list(out.iterdir()) == [], "a failed command left a file in the output folder"
    assert not (folder / PICKLE_MARKER_NAME).exists()
    after = sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    assert after == before, "the input folder changed"


def test_every_command_slot_sees_every_pickle_based_input():
    for slot in SLOTS:
        assert UNSAFE_INPUTS <= {name for s, name in _cases() if s == slot}


# --- through a real process: what reaches the terminal -------------------------------------------------------------

CONSOLE_SCRIPT = Path(sys.executable).with_name("nvdiag")


def _terminal(argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-c",
                                                                     "from inspect_tools.launch import run; run()"]
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("NVDIAG_DEBUG", None)
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("slot", "name"), [("lint", "gguf_impossible_counts"), ("convert-src", "pickle_payload")])
def test_a_real_process_prints_one_line_and_no_traceback(tmp_path: Path, good, slot: str, name: str):
    folder = tmp_path / name
    bad = BAD_INPUTS[name](folder)
    out = tmp_path / "out"
    out.mkdir()
    done = _terminal(SLOTS[slot](str(bad), *good, out))
    assert done.returncode == 2, done.stderr
    _assert_one_clear_line(done.stderr, folder)
    assert list(out.iterdir()) == []
    assert not (folder / PICKLE_MARKER_NAME).exists()


# --- --debug ---------------------------------------------------------------------------------------------------------

def test_debug_adds_a_traceback_and_changes_nothing_else(tmp_path: Path, capsys):
    bad = BAD_INPUTS["truncated"](tmp_path / "truncated")
    plain_code, plain_out, plain_err = _run(["inspect", str(bad)], capsys)
    debug_code, debug_out, debug_err = _run(["--debug", "inspect", str(bad)], capsys)
    assert plain_code == debug_code == 2
    assert plain_out == debug_out
    assert "Traceback (most recent call last)" in debug_err and "InputError" in debug_err
    assert debug_err.strip().splitlines()[-1] == plain_err.strip()  # the same last line scripts can grep for
    # --debug anywhere on the line, and through a real process: the exit code stays 2
    done = _terminal(["inspect", str(bad), "--debug"])
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == plain_err.strip()


# --- a valid input of another kind is not mistaken for a bad one ------------------------------------------------

def test_input_scales_from_a_sharded_checkpoint_are_read_as_a_checkpoint(good, tmp_path: Path):
    """An index.json is a checkpoint, not a {layer: value} JSON file (it used to be parsed as the latter)."""
    import torch
    from safetensors import safe_open

    from converter.pipeline import convert
    from inspect_tools.synthetic.writers import write_sharded

    scales = {"blocks.0.self_attn.q.input_scale": torch.tensor(0.05), "blocks.1.ffn.0.input_scale": torch.tensor(0.25)}
    index = write_sharded(scales, tmp_path / "scales", 2)
    out = tmp_path / "out.safetensors"
    assert convert(good[0], out, "wan2.2-ti2v-5b", input_scales=index).written
    with safe_open(str(out), "pt") as f:
        assert float(f.get_tensor("blocks.0.self_attn.q.input_scale")) == pytest.approx(0.05)
        assert float(f.get_tensor("blocks.1.ffn.0.input_scale")) == 0.25


# --- files a user writes by hand: preset TOML and --input-scales JSON -------------------------------------------

HAND_WRITTEN = {**{name: "--preset" for name in BAD_PRESETS}, **{name: "--input-scales" for name in BAD_INPUT_SCALES}}


def _hand_written_argv(bad: Path, is_preset: bool, src: str, out: Path) -> list[str]:
    """convert with the bad file as the preset, or as the input scales of the smart preset."""
    preset = ["--preset", str(bad)] if is_preset else ["--preset", "smart", "--input-scales", str(bad)]
    return ["convert", src, str(out), *preset]


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_a_bad_hand_written_file_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, good, name: str, capsys):
    folder = tmp_path / name
    option = HAND_WRITTEN[name]
    bad = (BAD_PRESETS if option == "--preset" else BAD_INPUT_SCALES)[name](folder)
    out = tmp_path / "out"
    out.mkdir()
    argv = _hand_written_argv(bad, name in BAD_PRESETS, good[0], out / "o.safetensors")
    before = bad.read_bytes()
    started = time.monotonic()
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    _assert_one_clear_line(err, folder)
    assert "\x1b" not in err and "\x00" not in err  # what came from the file is escaped
    assert time.monotonic() - started < 10
    assert list(out.iterdir()) == []
    assert bad.read_bytes() == before


@pytest.mark.parametrize(("name", "message"), [
    ("preset_deep_array", "nested more than 32 levels deep"),
    ("preset_deep_inline_table", "nested more than 32 levels deep"),
    ("preset_min_dim_absurd", "min_dim must be an integer from 1 to 65536, not 1000000000000000"),
    ("preset_min_dim_negative", "from 1 to 65536, not -1024"),
    ("scales_deep_array", "nested too deeply"),
    ("scales_huge_integer", "an integer of 401 digits is too large for a scale"),
    ("scales_integer_past_str_limit", "an integer of 5001 digits"),
    ("scales_nan", "nan is not a finite positive number"),
    ("scales_zero", "0 is not a finite positive number"),
    ("scales_top_level_array", "must be an object {layer: value}, not an array"),
    ("scales_top_level_null", "must be an object {layer: value}, not null"),
    ("scales_unknown_layer", "'no.such.layer': no such layer in the source"),
    ("scales_many_unknown_layers", "and 99995 more"),
])
def test_what_the_line_says(tmp_path: Path, good, name: str, message: str, capsys):
    is_preset = name in BAD_PRESETS
    bad = (BAD_PRESETS if is_preset else BAD_INPUT_SCALES)[name](tmp_path / name)
    code, _, err = _run(_hand_written_argv(bad, is_preset, good[0], tmp_path / "o.safetensors"), capsys)
    assert code == 2 and message in err, err


def test_input_scales_without_any_scale_convert_with_a_warning(tmp_path: Path, good, capsys):
    scales = WARNED_INPUT_SCALES["scales_empty_object"](tmp_path / "empty")
    out = tmp_path / "o.safetensors"
    code, _, err = _run(["convert", good[0], str(out), "--preset", "smart", "--input-scales", str(scales)], capsys)
    assert code == 0, err
    assert f"warning: {scales}: holds no input scales; none was applied" in " ".join(err.split())
    assert out.exists()


def _deny_reading(monkeypatch, path: Path) -> None:
    """What a file with mode 000 does to a process that is not root: os.access says no (click consulted it) and
    opening it fails."""
    real_access, real_open = os.access, Path.open

    def access(target, mode, *args, **kwargs):
        return False if Path(target) == path and mode & os.R_OK else real_access(target, mode, *args, **kwargs)

    def open_(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(Path, "open", open_)


@pytest.mark.parametrize("slot", ["src", "--input-scales", "--preset"])
def test_an_unreadable_input_is_one_line_not_usage_text(tmp_path: Path, good, slot: str, capsys, monkeypatch):
    bad = tmp_path / "locked" / {"src": "src.safetensors", "--input-scales": "s.json", "--preset": "p.toml"}[slot]
    bad.parent.mkdir()
    bad.write_bytes(Path(good[0]).read_bytes() if slot == "src" else b"{}" if slot == "--input-scales" else b"")
    _deny_reading(monkeypatch, bad)
    out = tmp_path / "out"
    out.mkdir()
    argv = {"src": ["convert", str(bad), str(out / "o.safetensors"), "--preset", "smart"],
            "--input-scales": ["convert", good[0], str(out / "o.safetensors"), "--preset", "smart",
                               "--input-scales", str(bad)],
            "--preset": ["convert", good[0], str(out / "o.safetensors"), "--preset", str(bad)]}[slot]
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    _assert_one_clear_line(err, bad.parent)
    assert "Permission denied" in err and "Usage:" not in err
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_a_file_of_mode_000_is_one_line(tmp_path: Path, good):
    bad = tmp_path / "locked.safetensors"
    bad.write_bytes(Path(good[0]).read_bytes())
    bad.chmod(0)
    done = _terminal(["convert", str(bad), str(tmp_path / "o.safetensors"), "--preset", "smart"])
    assert done.returncode == 2, done.stderr
    _assert_one_clear_line(done.stderr, tmp_path)
# --- readable files with a malformed layer: a finding in lint, never decoded by roundtrip ----------------------------

@pytest.fixture(scope="module")
def malformed_models(good, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each MALFORMED_LAYERS layer put into the good NVFP4 model, in place of its own blocks.0.self_attn.q."""
    folder = tmp_path_factory.mktemp("malformed")
    return {name: transplant(Path(good[1]), build(folder / name), folder / f"whole_{name}")
            for name, (build, _) in MALFORMED_LAYERS.items()}


@pytest.mark.parametrize("name", sorted(MALFORMED_LAYERS))
def test_lint_names_the_cause_of_a_malformed_layer(malformed_models, name: str, capsys):
    code, out, err = _run(["lint", str(malformed_models[name]), "--format", "json"], capsys)
    assert code == 1, err
    causes = {(f["layer"], f["cause"]) for f in json.loads(out)["findings"]}
    expected = MALFORMED_LAYERS[name][1]
    assert any(cause == expected for _, cause in causes), causes


NVFP4_MALFORMED = sorted(n for n, (_, cause) in MALFORMED_LAYERS.items() if cause != "invalid-quant-marker")


@pytest.mark.parametrize("name", NVFP4_MALFORMED)
def test_roundtrip_reports_a_malformed_layer_as_unreadable(good, malformed_models, name: str, capsys):
    code, out, err = _run(["roundtrip", str(malformed_models[name]), "--against", good[0], "--layers",
                           "blocks.0.self_attn.*", "--format", "json"], capsys)
    assert code == 1, err
    doc = json.loads(out)
    (row,) = [r for r in doc["layers"] if r["layer"] == "blocks.0.self_attn.q"]
    assert row["status"] == "unreadable" and row["cause"] == MALFORMED_LAYERS[name][1], row
    assert [f["rule"] for f in doc["findings"] if f["layer"] == "blocks.0.self_attn.q"] == ["RT105"]
    assert doc["summary"]["unreadable"] == 1 and doc["summary"]["checked"] == 3  # the other three are measured


@pytest.mark.parametrize("name", NVFP4_MALFORMED)
def test_roundtrip_against_a_malformed_reference_exits_2_naming_it(good, malformed_models, name: str, capsys):
    code, _, err = _run(["roundtrip", good[1], "--against", str(malformed_models[name]), "--layers",
                         "blocks.0.self_attn.*"], capsys)
    assert code == 2, err
    _assert_one_clear_line(err, malformed_models[name].parent)
    assert "blocks.0.self_attn.q" in err and MALFORMED_LAYERS[name][1] in err


# --- what a file says reaches the terminal escaped --------------------------------------------------------------------

HOSTILE_NAMES = ["blocks.0.self_attn.q\x01x.weight", "blocks.0\nfake row.weight", "blocks.1.\x1b]0;title\x07.weight",
                 "blocks.2.\u202egnp.exe.weight", "blocks.3.[bold]x[/].weight"]


@pytest.fixture(scope="module")
def hostile_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tensor names and a metadata string holding escape, NUL, BEL, newline, a bidi override and rich markup."""
    value = b"evil\x1b[31mRED\x00nam"
    name_kv = [("general.name", 8, struct.pack("<Q", len(value)) + value)]
    tensors = [(n, 0, (32, 4), 512 * i) for i, n in enumerate(HOSTILE_NAMES)]
    path = tmp_path_factory.mktemp("hostile") / "hostile.gguf"
    path.write_bytes(gguf_bytes(tensors, bytes(512 * len(tensors)), kv=name_kv))
    return path


CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")


@pytest.mark.parametrize("argv", [["inspect"], ["lint"], ["diff", "SELF"]])
def test_control_characters_from_a_file_are_printed_as_escapes(hostile_gguf: Path, argv: list[str], capsys):
    argv = [a if a != "SELF" else str(hostile_gguf) for a in argv]
    code, out, err = _run([argv[0], str(hostile_gguf), *argv[1:]], capsys)
    assert code in (0, 1), err
    assert not CONTROL.search(out + err), repr(CONTROL.search(out + err))
    assert not any(line.lstrip("│ ").startswith("fake row") for line in out.splitlines())  # no forged table row
    if argv[0] == "inspect":
        assert "blocks.0\\nfake row" in out and "\\x1b]0;title\\x07" in out and "\\u202e" in out
        assert "[bold]x[/]" in out  # markup in a name is shown, not applied
        assert "evil\\x1b[31mRED\\x00nam" in out


def test_preset_from_gguf_keeps_names_with_control_characters(hostile_gguf: Path, tmp_path: Path, capsys):
    from converter.preset import load_preset

    out = tmp_path / "p.toml"
    code, _, err = _run(["preset", "from-gguf", str(hostile_gguf), "-o", str(out)], capsys)
    assert code == 0, err
    assert any("\x01" in (rule.regex or rule.match or "") for rule in load_preset(str(out)).rules)


def test_inspect_of_a_huge_header_shows_the_first_rows_and_says_so(tmp_path: Path, capsys):
    from inspect_tools.cli.output import TABLE_ROWS
    from inspect_tools.synthetic.bad_inputs import safetensors_bytes

    count = TABLE_ROWS + 500
    header = {f"t.{i}.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(count)}
    path = tmp_path / "many.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(4 * count)))
    code, out, _ = _run(["inspect", str(path)], capsys)
    assert code == 0
    assert sum(line.startswith("│ t.") for line in out.splitlines()) == TABLE_ROWS
    assert f"showing {TABLE_ROWS} of {count}" in out


def test_diff_values_goes_on_past_a_malformed_layer(good, malformed_models, capsys):
    """diff compares whole files: one layer that cannot be decoded, on either side, is one row, not a refusal."""
    for argv in ([good[1], str(malformed_models["nvfp4_weight_odd_shape"])],
                 [str(malformed_models["nvfp4_weight_odd_shape"]), good[1]]):
        code, out, err = _run(["diff", *argv, "--values", "--layers", "blocks.0.self_attn.*", "--format", "json"],
                              capsys)
        assert code == 1, err
        rows = {r["layer"]: r for r in json.loads(out)["values"]}
        assert rows["blocks.0.self_attn.q"]["status"] == "unreadable"
        assert rows["blocks.0.self_attn.k"]["status"] == "ok"
