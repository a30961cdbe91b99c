"""The console script starts a GPU conversion's reads before the command-line interface is imported, and only for
that: which argument is the source has to be read right from the raw arguments, with the convert command's options
as the command itself defines them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from inspect_tools import launch
from inspect_tools.readers import prefetch


@pytest.mark.parametrize(("args", "source"), [
    (["convert", "src/", "out.safetensors", "--preset", "wan2.2-ti2v-5b", "--device", "cuda"], "src/"),
    (["convert", "--device", "cuda", "--preset", "p.toml", "src/", "out.safetensors"], "src/"),
    (["convert", "-p", "high.toml", "-p", "low.toml", "--device=cuda", "--force", "a/", "b.safetensors"], "a/"),
    (["convert", "-pwan2.2-ti2v-5b", "--gate-sample", "4", "--verify", "x.safetensors", "y", "--device", "cuda"],
     "x.safetensors"),
    (["convert", "--preset", "p", "--device", "cuda", "--", "-odd-name/", "out"], "-odd-name/"),
    (["convert", "--input-scales", "scales.json", "--comfyui", "/opt/ComfyUI", "s/", "o", "--device", "cuda"], "s/"),
])
def test_a_gpu_conversion_names_its_source(args: list[str], source: str):
    assert launch.gpu_conversion_source(args) == source


@pytest.mark.parametrize("args", [
    ["convert", "src/", "out.safetensors", "--preset", "p"],  # the CPU, convert's default
    ["convert", "src/", "out.safetensors", "--preset", "p", "--device", "cpu"],
    ["convert", "src/", "out.safetensors", "--preset", "p", "--device", "cuda", "--dry-run"],
    ["convert", "--help", "--device", "cuda"],
    ["convert", "--preset", "p", "--device", "cuda"],  # no source: the command reports that
    ["roundtrip", "a.safetensors", "--against", "b/", "--device", "cuda"],
    ["--version"],
    [],
])
def test_anything_else_starts_nothing(args: list[str]):
    assert launch.gpu_conversion_source(args) is None


def test_the_options_that_take_a_value_are_converts_own():
    from inspect_tools.cli import app

    convert = typer.main.get_command(app).commands["convert"]
    takes_value = {name for p in convert.params if p.param_type_name == "option" and not p.is_flag
                   for name in (*p.opts, *p.secondary_opts)}
    assert takes_value == launch.CONVERT_VALUE_OPTIONS


def test_the_command_finds_the_warmer_the_launcher_started(wan_float_sharded_diffusers):
    first = prefetch.warm_checkpoint(wan_float_sharded_diffusers)
    try:
        assert first is not None
        assert prefetch.warm_checkpoint(str(wan_float_sharded_diffusers)) is first  # not a second reader
    finally:
        prefetch.stop()
    again = prefetch.warm_checkpoint(wan_float_sharded_diffusers)  # a later command starts its own
    try:
        assert again is not None and again is not first
    finally:
        prefetch.stop()


def test_a_gpu_conversion_without_a_gpu_is_still_one_line_and_exit_2(wan_float, tmp_path):
    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-c", "from inspect_tools.launch import run; run()", "convert",
                           str(wan_float), str(out), "--preset", "wan2.2-ti2v-5b", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "cuda" in done.stderr.lower()
    assert not out.exists()


# The console script's own path, in a process: when the source starts streaming, what had been imported.
EARLY_RUN = """
import json, sys
from inspect_tools.readers import prefetch
seen = []
original = prefetch.warm_checkpoint
def recording(path):
    seen.append({"interface imported": "inspect_tools.cli" in sys.modules, "torch imported": "torch" in sys.modules})
    print(json.dumps(seen), file=sys.stderr, flush=True)  # the command ends with os._exit: no finally runs
    return original(path)
prefetch.warm_checkpoint = recording
from inspect_tools import launch
sys.argv = ["nvdiag", *sys.argv[1:]]
launch.run()
"""


def test_the_console_script_starts_reading_before_the_interface_is_imported(wan_float, tmp_path):
    done = subprocess.run([sys.executable, "-c", EARLY_RUN, "convert", str(wan_float),
                           str(tmp_path / "out.safetensors"), "--preset", "wan2.2-ti2v-5b", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    seen = json.loads(next(line for line in reversed(done.stderr.splitlines()) if line.startswith("[")))
    # first by the launcher, before typer and the commands; then by the command, which gets the same warmer back
    assert seen[0] == {"interface imported": False, "torch imported": False}
    assert len(seen) == 2 and seen[1]["interface imported"]
