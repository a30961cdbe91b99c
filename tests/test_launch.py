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


@pytest.mark.parametrize("command", sorted(launch.VALUE_OPTIONS))
def test_the_options_that_take_a_value_are_the_commands_own(command: str):
    from inspect_tools.cli import app

    options = typer.main.get_command(app).commands[command].params
    takes_value = {name for p in options if p.param_type_name == "option" and not p.is_flag
                   for name in (*p.opts, *p.secondary_opts)}
    assert takes_value == launch.VALUE_OPTIONS[command]


@pytest.mark.parametrize(("args", "expected"), [
    (["roundtrip", "q.safetensors", "--against", "src/", "--device", "cuda"], ("q.safetensors", "src/", "cuda")),
    (["roundtrip", "--against=src/", "--format", "json", "q.safetensors", "--device=cuda:1"],
     ("q.safetensors", "src/", "cuda:1")),
    (["roundtrip", "q.safetensors", "--against", "src/"], None),  # the CPU: bound by its arithmetic
    (["roundtrip", "q.safetensors", "--against", "src/", "--sample", "4", "--device", "cuda"], None),
    (["roundtrip", "q.safetensors", "--against", "src/", "--layers", "blocks.0.*", "--device", "cuda"], None),
    (["roundtrip", "q.safetensors", "--device", "cuda"], None),  # no reference: the command reports that
    (["convert", "src/", "out", "--preset", "p", "--device", "cuda"], None),
])
def test_a_whole_gpu_roundtrip_names_its_inputs(args: list[str], expected):
    assert launch.whole_gpu_roundtrip(args) == expected


def test_the_conversion_finds_the_warmer_the_launcher_started(wan_float_sharded_diffusers):
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


def test_the_roundtrip_finds_the_warmer_the_launcher_started(wan_nvfp4_mixed, wan_float):
    from inspect_tools.layers import open_model
    from inspect_tools.read_ahead import roundtrip_key, warm_roundtrip, warm_roundtrip_paths

    key = roundtrip_key(str(wan_nvfp4_mixed), str(wan_float))
    warm_roundtrip_paths(str(wan_nvfp4_mixed), str(wan_float))
    try:
        first = prefetch.started_for(key)
        assert first is not None and first.ranges  # the quantized pairs' bytes
        with open_model(wan_nvfp4_mixed) as mine, open_model(wan_float) as ref:
            warm_roundtrip(mine, ref, key)  # what the command does
        assert prefetch.started_for(key) is first
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


# The console script's own path, in a process: when a warmer starts, what had been imported by then.
EARLY_RUN = """
import json, sys
from inspect_tools.readers import prefetch
seen = []
original = prefetch.start
def recording(*args, **kwargs):
    seen.append({"interface imported": "inspect_tools.cli" in sys.modules, "torch imported": "torch" in sys.modules})
    print(json.dumps(seen), file=sys.stderr, flush=True)  # the command may end with os._exit: no finally runs
    return original(*args, **kwargs)
prefetch.start = recording
from inspect_tools import launch
sys.argv = ["nvdiag", *sys.argv[1:]]
launch.run()
"""


@pytest.mark.parametrize("command", ["convert", "roundtrip"])
def test_the_console_script_starts_reading_before_the_interface_is_imported(command, wan_float, wan_nvfp4_mixed,
                                                                            tmp_path):
    args = {"convert": ["convert", str(wan_float), str(tmp_path / "out.safetensors"), "--preset", "wan2.2-ti2v-5b",
                        "--device", "cuda"],
            "roundtrip": ["roundtrip", str(wan_nvfp4_mixed), "--against", str(wan_float), "--device", "cuda"]}[command]
    done = subprocess.run([sys.executable, "-c", EARLY_RUN, *args], capture_output=True, text=True, timeout=120)
    seen = json.loads(next(line for line in reversed(done.stderr.splitlines()) if line.startswith("[")))
    # one warmer, started by the launcher before typer, the commands and torch; the command found it
    assert seen == [{"interface imported": False, "torch imported": False}]
