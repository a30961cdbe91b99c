"""Outputs are never lost: OUT may not be an input (directly, through a symlink or hard link, or as a shard or the
index of a sharded input), an existing OUT survives every failed overwrite, a full disk is refused before writing,
and SIGTERM / Ctrl-C sent to a real `nvdiag convert` mid-write leave the old OUT and no temporary file."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors.torch import save_file

from inspect_tools.cli import main
from inspect_tools.interrupts import CLEANUP_SIGNALS
from inspect_tools.synthetic import float_state_dict
from inspect_tools.writer import TEMP_SUFFIX

WAN = "wan2.2-ti2v-5b"
OLD = b"previous good output"


@pytest.fixture(scope="module")
def files(make_checkpoint) -> dict[str, Path]:
    return {
        "float": make_checkpoint("float", name="interrupts_float"),
        "sharded": make_checkpoint("float", sharded=2, name="interrupts_sharded"),
        "nvfp4": make_checkpoint("nvfp4-mixed", name="interrupts_nvfp4"),
        "broken": make_checkpoint("nvfp4-mixed", faults=("wrong-dtype",), name="interrupts_broken"),
        "gguf": make_checkpoint("gguf", qtype="Q4_0", name="interrupts_q4_0"),
    }


def digests(paths: list[Path]) -> dict[str, str]:
    """Every given file (a sharded checkpoint: every file of its folder) by content: inputs must come out of every
    test unchanged."""
    found = [q for p in paths for q in (sorted(p.parent.iterdir()) if p.name.endswith(".json") else [p])]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def no_temporaries(*folders: Path) -> bool:
    return not any(p.name.endswith((TEMP_SUFFIX, ".tmp")) for f in folders for p in f.iterdir())


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvdiag: error: ") and "Traceback" not in err, err
    return lines[0]


# --- OUT may not be an input -----------------------------------------------------------------------------------------

# What OUT points at, built in tmp_path from the input it must not overwrite.
Alias = namedtuple("Alias", "name make")
ALIASES = [
    Alias("itself", lambda target, tmp: target),
    Alias("symlink", lambda target, tmp: _link(tmp / "link.safetensors", target, os.symlink)),
    Alias("hard link", lambda target, tmp: _link(tmp / "hard.safetensors", target, os.link)),
    Alias("relative path", lambda target, tmp: Path(os.path.relpath(target))),
]


def _link(path: Path, target: Path, how) -> Path:
    how(target, path)
    return path


def _shard(sharded_index: Path) -> Path:
    return sorted(sharded_index.parent.glob("*.safetensors"))[0]


# command -> (argv with OUT, the input file OUT aliases)
COMMANDS = {
    "convert": lambda f, out: (["convert", str(f["float"]), str(out), "--preset", "smart", "--force"], f["float"]),
    "convert shard": lambda f, out: (["convert", str(f["sharded"]), str(out), "--preset", "smart", "--force"],
                                     _shard(f["sharded"])),
    "convert index": lambda f, out: (["convert", str(f["sharded"]), str(out), "--preset", "smart", "--force"],
                                     f["sharded"]),
    "fix": lambda f, out: (["fix", str(f["broken"]), str(out), "--force"], f["broken"]),
    "fix against": lambda f, out: (["fix", str(f["broken"]), str(out), "--against", str(f["float"]), "--force"],
                                   f["float"]),
    "preset from-gguf": lambda f, out: (["preset", "from-gguf", str(f["gguf"]), "-o", str(out), "--force"], f["gguf"]),
    "roundtrip report": lambda f, out: (["roundtrip", str(f["nvfp4"]), "--against", str(f["float"]),
                                         "--report", str(out)], f["nvfp4"]),
    "roundtrip report against": lambda f, out: (["roundtrip", str(f["nvfp4"]), "--against", str(f["sharded"]),
                                                 "--report", str(out)], _shard(f["sharded"])),
}


@pytest.mark.parametrize("alias", ALIASES, ids=lambda a: a.name)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_may_not_be_an_input(files, tmp_path: Path, command: str, alias: Alias, capsys,
                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, target = COMMANDS[command](files, tmp_path / "unused")
    out = alias.make(target, tmp_path)
    argv, _ = COMMANDS[command](files, out)
    before = digests(list(files.values()))
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "overwrite" in line and "input" in line, line
    assert digests(list(files.values())) == before
    assert no_temporaries(tmp_path, target.parent)


# --- an existing OUT survives a failed overwrite --------------------------------------------------------------------

def _nan_source(folder: Path) -> Path:
    tensors = float_state_dict(WAN)
    tensors["blocks.0.ffn.0.weight"][1, 2] = float("nan")
    path = folder / "nan.safetensors"
    save_file(tensors, str(path))
    return path


def _truncated(path: Path, folder: Path) -> Path:
    data = path.read_bytes()
    bad = folder / f"truncated{path.suffix}"
    bad.write_bytes(data[: len(data) // 2])
    return bad


FAILED_OVERWRITES = {
    # name -> argv given the files, a scratch folder and OUT; (expected exit code)
    "convert nan source": (lambda f, tmp, out: ["convert", str(_nan_source(tmp)), str(out), "-p", "smart", "--force"],
                           1),
    "convert truncated source": (lambda f, tmp, out: ["convert", str(_truncated(f["float"], tmp)), str(out),
                                                      "-p", "smart", "--force"], 2),
    "convert bad input scales": (lambda f, tmp, out: ["convert", str(f["float"]), str(out), "-p", "smart", "--force",
                                                      "--input-scales", str(_truncated(f["nvfp4"], tmp))], 2),
    "fix truncated": (lambda f, tmp, out: ["fix", str(_truncated(f["broken"], tmp)), str(out), "--force"], 2),
    "preset from-gguf truncated": (lambda f, tmp, out: ["preset", "from-gguf", str(_truncated(f["gguf"], tmp)),
                                                        "-o", str(out), "--force"], 2),
    "roundtrip report truncated": (lambda f, tmp, out: ["roundtrip", str(f["nvfp4"]), "--against",
                                                        str(_truncated(f["float"], tmp)), "--report", str(out)], 2),
}


@pytest.mark.parametrize("case", sorted(FAILED_OVERWRITES))
def test_existing_out_survives_a_failed_overwrite(files, tmp_path: Path, case: str, capsys):
    scratch, outdir = tmp_path / "in", tmp_path / "out"
    scratch.mkdir()
    outdir.mkdir()
    out = outdir / "out.safetensors"
    out.write_bytes(OLD)
    build, code = FAILED_OVERWRITES[case]
    assert main(build(files, scratch, out)) == code
    capsys.readouterr()
    assert out.read_bytes() == OLD
    assert [p.name for p in outdir.iterdir()] == ["out.safetensors"]


# --- disk space ------------------------------------------------------------------------------------------------------

def _tiny_disk(monkeypatch, free: int = 1000) -> None:
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


@pytest.mark.parametrize("command", ["convert", "fix"])
def test_not_enough_disk_space_is_refused_before_writing(files, tmp_path: Path, command: str, capsys, monkeypatch):
    _tiny_disk(monkeypatch)
    out = tmp_path / "out.safetensors"
    argv = (["convert", str(files["float"]), str(out), "--preset", "smart"] if command == "convert"
            else ["fix", str(files["broken"]), str(out)])
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not enough free space" in line and "1000 bytes" in line and str(tmp_path) in line, line
    assert list(tmp_path.iterdir()) == []


# --- signals sent to a real process mid-write ----------------------------------------------------------------------

WRITE_DELAY_S = 0.05
# `nvdiag` in a fresh interpreter whose writer sleeps after each tensor write, so the tiny source takes seconds to
# write and the signal lands mid-write (the delay is the test's: the product has no hook for it).
SLOW_NVDIAG = f"""
import time
from inspect_tools.cli import run
from inspect_tools.writer import SafetensorsWriter

write = SafetensorsWriter.write

def slow_write(self, name, tensor):
    write(self, name, tensor)
    time.sleep({WRITE_DELAY_S})

SafetensorsWriter.write = slow_write
run()
"""


def _default_signals() -> None:
    """What a process started from an interactive shell has (pytest may itself run under nohup, ignoring SIGHUP)."""
    for signum in CLEANUP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SLOW_NVDIAG, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _start_convert(src: Path, out: Path, force: bool = True) -> subprocess.Popen[str]:
    return _start(["convert", str(src), str(out), "--preset", "smart", *(["--force"] if force else [])])


def _wait_for_temporary(folder: Path, proc: subprocess.Popen[str], timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("convert never started writing")


@pytest.mark.parametrize(("command", "signum"), [
    *[("convert", s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM,
                               signal.SIGUSR1)],
    ("fix", signal.SIGTERM), ("fix", signal.SIGHUP),
], ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_signal_mid_write_keeps_old_out_and_leaves_no_temporary(files, tmp_path: Path, command: str, signum: int):
    out = tmp_path / "out.safetensors"
    out.write_bytes(OLD)
    source = files["float"] if command == "convert" else files["broken"]
    before = digests([source])
    proc = (_start_convert(source, out) if command == "convert"
            else _start(["fix", str(source), str(out), "--force"]))
    temp = _wait_for_temporary(tmp_path, proc)
    time.sleep(0.1)  # a few tensors in
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert signal.Signals(signum).name in lines[0] and str(out) in lines[0]
    assert not temp.exists()
    assert out.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert digests([source]) == before


def test_ctrl_c_outside_the_writer_exits_130_with_one_line(files, monkeypatch, capsys):
    """typer turns KeyboardInterrupt into a silent exit 130; main() still says what happened."""
    import inspect_tools.cli.inspect_cmd as inspect_cmd

    def interrupted(*args, **kwargs):
        # raise_signal, not os.kill: a process-directed signal may land on a helper thread left by an earlier test
        signal.raise_signal(signal.SIGINT)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGINT was not delivered")

    monkeypatch.setattr(inspect_cmd, "open_model", interrupted)
    # as in a terminal: a shell starts background jobs (`pytest &`, some CI runners) with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["inspect", str(files["nvfp4"])]) == 130
    finally:
        after = signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip() == "nvdiag: interrupted"
    assert after is signal.default_int_handler  # main() put the handler back



# --- what SIGKILL leaves, concurrent writers, late signals, full disks, refused folders, long names -----------------

def test_after_kill_9_the_next_run_removes_the_leftover_and_says_so(files, tmp_path: Path, capsys):
    out = tmp_path / "out.safetensors"
    proc = _start_convert(files["float"], out)
    temp = _wait_for_temporary(tmp_path, proc)
    proc.kill()  # SIGKILL: no handler runs, the temporary stays
    proc.communicate(timeout=60)
    assert temp.exists() and f".{proc.pid}-" in temp.name
    assert main(["convert", str(files["float"]), str(out), "--preset", "smart"]) == 0
    err = capsys.readouterr().err
    assert f"nvdiag: note: removed {temp}: a temporary file of nvdiag process {proc.pid}, which no longer exists, " \
           "left by a killed run" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_two_converts_to_the_same_new_out_publish_exactly_once(files, tmp_path: Path):
    out = tmp_path / "out.safetensors"
    procs = [_start_convert(files["float"], out, force=False) for _ in range(2)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert one_error_line(loser) == f"nvdiag: error: {out}: was created by another process while this run wrote " \
                                    "it; pass --force to overwrite it"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize("command", ["convert", "fix"])
def test_a_signal_just_after_publishing_keeps_a_complete_run_successful(files, tmp_path: Path, command: str,
                                                                       capsys, monkeypatch):
    from inspect_tools.writer import SafetensorsWriter

    publish = SafetensorsWriter.commit

    def commit_then_terminated(self):
        path = publish(self)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` or a supervisor may send at that moment
        return path

    monkeypatch.setattr(SafetensorsWriter, "commit", commit_then_terminated)
    out = tmp_path / "out.safetensors"
    argv = (["convert", str(files["float"]), str(out), "--preset", "smart"] if command == "convert"
            else ["fix", str(files["broken"]), str(out)])
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == f"nvdiag: SIGTERM arrived after {out} was published: the " \
                                                    "output is complete"
    assert "was not written" not in captured.err
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


@pytest.mark.parametrize("command", ["convert", "fix"])
def test_a_full_disk_is_one_line_naming_out_and_leaves_nothing(files, tmp_path: Path, command: str, capsys,
                                                              monkeypatch):
    real_pwrite = os.pwrite
    written = []

    def disk_fills_up(fd, data, offset):
        if written:  # the header fits; the first tensor does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_fills_up)
    out = tmp_path / "out.safetensors"
    argv = (["convert", str(files["float"]), str(out), "--preset", "smart"] if command == "convert"
            else ["fix", str(files["broken"]), str(out)])
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"nvdiag: error: {out}: No space left on device while writing it; nothing was published"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["convert", "fix"])
def test_a_folder_that_refuses_new_files_is_one_line(files, tmp_path: Path, command: str, capsys, monkeypatch):
    """What a read-only folder does (simulated: root may write into a folder of mode 0555)."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "out.safetensors"
    argv = (["convert", str(files["float"]), str(out), "--preset", "smart"] if command == "convert"
            else ["fix", str(files["broken"]), str(out)])
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"nvdiag: error: {out}: cannot create a file in {tmp_path}: Read-only file system"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0555")
def test_a_read_only_folder_is_one_line(files, tmp_path: Path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["convert", str(files["float"]), str(folder / "out.safetensors"), "--preset", "smart"]) == 2
        assert "Permission denied" in one_error_line(capsys.readouterr().err)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_a_legal_240_character_out_name_is_written(files, tmp_path: Path, capsys):
    out = tmp_path / ("n" * 228 + ".safetensors")
    assert len(out.name) == 240
    assert main(["convert", str(files["float"]), str(out), "--preset", "smart"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert "File name too long" not in capsys.readouterr().err
