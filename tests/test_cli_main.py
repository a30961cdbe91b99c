"""The `nvdiag` entry point: every failure the user can cause or meet is one line and a stable exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# A process that runs one nvdiag command the way the `nvdiag` script does, with an exit handler, a record of an
# early os._exit (the teardown skipped), and optionally a thread still at work when the command returns.
EXITING = """
import atexit, os, sys, threading, time
marker = sys.argv.pop(1)
mode = sys.argv.pop(1)
atexit.register(lambda: open(marker + ".exit-handler", "w").close())
real_exit = os._exit

def early_exit(code):
    open(marker + ".early-exit", "w").close()
    real_exit(code)

os._exit = early_exit

def late():
    time.sleep(0.5)
    open(marker + ".thread", "w").close()

import inspect_tools.cli as cli
command = cli.main

def command_then_thread(*args):
    code = command(*args)
    if mode == "thread":  # still at work when the command has returned
        threading.Thread(target=late).start()
    return code

cli.main = command_then_thread
cli.run()
"""


@pytest.mark.parametrize("mode", ["plain", "thread"])
def test_a_command_that_imported_torch_skips_only_the_teardown(wan_nvfp4_mixed, tmp_path, mode) -> None:
    script, marker = tmp_path / "nvdiag_process.py", tmp_path / "marker"
    script.write_text(EXITING)
    done = subprocess.run([sys.executable, str(script), str(marker), mode, "lint", str(wan_nvfp4_mixed),
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["errors"] == 0  # the whole document reached the pipe
    assert Path(f"{marker}.exit-handler").exists()  # exit handlers (finalizers, logging) still run
    if mode == "thread":  # a thread still at work: a normal exit, which waits for it
        assert Path(f"{marker}.thread").exists() and not Path(f"{marker}.early-exit").exists()
    else:
        assert Path(f"{marker}.early-exit").exists()  # the interpreter's teardown was skipped
