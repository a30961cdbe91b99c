"""The same input and options give byte-identical output: `convert` and `fix` run twice (in separate processes with
different hash seeds, different working folders, relative vs absolute paths and different OUT names) write the same
bytes, and their provenance carries no timestamp, host, user or absolute path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from inspect_tools.cli import main

CONSOLE_SCRIPT = Path(sys.executable).with_name("nvdiag")
# 2024-05-01, 2024-05-01T12:00, 12:00:00 or a 10-digit epoch: none of these belongs in provenance.
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}|\b1[6-9]\d{8}\b")


@pytest.fixture(scope="module")
def inputs(make_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("determinism")
    scales = folder / "scales.json"
    scales.write_text(json.dumps({"blocks.0.self_attn.q": 0.05, "blocks.1.ffn.0": 0.125}))
    return {
        "sharded": make_checkpoint("float", naming="diffusers", sharded=2, name="determinism_src"),
        "broken": make_checkpoint("nvfp4-mixed", faults=("scale-layout-linear",), name="determinism_broken"),
        "scales": scales,
    }


def run_twice(argv_for, tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    """Run `nvdiag` twice at once, each in its own process and folder with its own hash seed; the first gets
    absolute paths, the second paths relative to its folder; each must end with `exit_code`. Returns the two
    outputs."""
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-c",
                                                                     "from inspect_tools.launch import run; run()"]
    procs, outs = [], []
    for i, seed in enumerate(("1", "2")):
        cwd = tmp_path / f"run{i}"
        cwd.mkdir()
        out = cwd / f"out-{i}.safetensors"
        path = (lambda p: str(p)) if i == 0 else (lambda p, cwd=cwd: os.path.relpath(p, cwd))
        env = {**os.environ, "PYTHONHASHSEED": seed}
        procs.append(subprocess.Popen([*command, *argv_for(path, out.name)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == exit_code, stdout + stderr
    return outs[0], outs[1]


def assert_no_run_specific_provenance(path: Path, key: str) -> None:
    with safe_open(str(path), "pt") as f:
        text = f.metadata()[key]
    assert not TIMESTAMP.search(text), text
    assert str(Path.home()) not in text and "/tmp" not in text and os.uname().nodename not in text, text


def test_convert_twice_is_byte_identical(inputs, tmp_path: Path):
    a, b = run_twice(lambda p, out: ["convert", p(inputs["sharded"]), out, "--preset", "wan2.2-ti2v-5b",
                                     "--input-scales", p(inputs["scales"])], tmp_path)
    assert a.read_bytes() == b.read_bytes()
    assert_no_run_specific_provenance(a, "nvdiag")


def test_fix_twice_is_byte_identical(inputs, tmp_path: Path):
    # no --against: the layout repair is written but reported unverified (exit 1)
    a, b = run_twice(lambda p, out: ["fix", p(inputs["broken"]), out], tmp_path, exit_code=1)
    assert a.read_bytes() == b.read_bytes()
    with safe_open(str(a), "pt") as f:
        keys = [k for k in f.metadata() if "nvdiag" in k]
    assert keys
    for key in keys:
        assert_no_run_specific_provenance(a, key)


def test_preset_from_gguf_twice_is_identical(make_checkpoint, tmp_path: Path, capsys):
    gguf = make_checkpoint("gguf", qtype="Q4_0", name="determinism_q4_0")
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    assert main(["preset", "from-gguf", str(gguf), "-o", str(first), "--name", "same"]) == 0
    assert main(["preset", "from-gguf", str(gguf), "-o", str(second), "--name", "same"]) == 0
    capsys.readouterr()
    assert first.read_bytes() == second.read_bytes()
    assert not TIMESTAMP.search(first.read_text())
