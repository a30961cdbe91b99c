"""The streaming writer: byte-identical to safetensors' save_file, atomic on failure, Ctrl-C and SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inspect_tools.errors import OutputError
from inspect_tools.interrupts import CLEANUP_SIGNALS, command_scope
from inspect_tools.readers import open_checkpoint
from inspect_tools.readers.safetensors_dtypes import dtype_name
from inspect_tools.temporaries import TEMP_SUFFIX, host_tag, leftovers
from inspect_tools.writer import (
    SafetensorsWriter,
    atomic_write_text,
    check_output_path,
    ensure_free_space,
    plan_order,
)


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Names and dtypes chosen so that save_file's ordering (dtype, then name) and padding both matter."""
    torch.manual_seed(0)
    return {
        "blocks.1.weight": torch.randint(0, 255, (8, 4), dtype=torch.uint8),
        "blocks.1.weight_scale": torch.randn(8, 1).to(torch.float8_e4m3fn),
        "blocks.1.weight_scale_2": torch.tensor(0.01),
        "blocks.0.weight": torch.randn(4, 8),
        "blocks.0.bias": torch.randn(4).bfloat16(),
        "blocks.10.norm": torch.randn(3).half(),
        "scaled_fp8": torch.zeros(0, dtype=torch.float8_e5m2),
        "steps": torch.arange(3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "pos": torch.randn(2, dtype=torch.float64),
        "idx": torch.arange(5, dtype=torch.int32),
        "ünïcode.name": torch.ones(1),
    }


def entries_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int]]]:
    return [(name, dtype_name(t.dtype), list(t.shape)) for name, t in tensors.items()]


def write_all(path: Path, tensors: dict[str, torch.Tensor], metadata=None, order=None) -> Path:
    with SafetensorsWriter(path, entries_of(tensors), metadata) as writer:
        for name in order or writer.order:
            writer.write(name, tensors[name])
        return writer.commit()


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"note": 'é "quoted"\n\x01/'}])
def test_bytes_equal_save_file(tmp_path: Path, metadata):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_all(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_many_metadata_keys_equal_save_file_up_to_its_hash_order(tmp_path: Path):
    # save_file writes metadata keys in Rust HashMap order (varies run to run); ours are sorted, so compare parsed.
    tensors = mixed_tensors()
    metadata = {k: str(i) for i, k in enumerate("qwertyuiop")}
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_all(tmp_path / "ours.safetensors", tensors, metadata)
    ref, ours = (tmp_path / "reference.safetensors").read_bytes(), (tmp_path / "ours.safetensors").read_bytes()
    length = struct.unpack("<Q", ref[:8])[0]
    assert ours[:8] == ref[:8] and ours[8 + length:] == ref[8 + length:]
    assert json.loads(ours[8:8 + length]) == json.loads(ref[8:8 + length])
    assert list(json.loads(ours[8:8 + length])["__metadata__"]) == sorted(metadata)


def test_tensors_can_arrive_in_any_order(tmp_path: Path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors")
    write_all(tmp_path / "ours.safetensors", tensors, order=list(tensors))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_plan_order_sorts_like_save_file():
    entries = [("b", "F32", [1]), ("a", "U8", [1]), ("c", "F32", [1]), ("d", "F64", [1])]
    assert [e[0] for e in plan_order(entries)] == ["d", "b", "c", "a"]


def test_written_file_reads_back(tmp_path: Path):
    tensors = mixed_tensors()
    path = write_all(tmp_path / "out.safetensors", tensors, {"k": "v"})
    reader = open_checkpoint(path)
    assert reader.metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert torch.equal(reader.load(name).to(torch.float64), tensor.to(torch.float64))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 8, dtype=torch.float16), "planned F32, got F16"),
    (torch.zeros(8, 4), "planned shape"),
])
def test_write_checks_dtype_and_shape(tmp_path: Path, bad, message):
    with SafetensorsWriter(tmp_path / "out.safetensors", [("w", "F32", [4, 8])]) as writer:
        with pytest.raises(ValueError, match=message):
            writer.write("w", bad)


def test_commit_refuses_a_partial_file(tmp_path: Path):
    with SafetensorsWriter(tmp_path / "out.safetensors", [("a", "F32", [1]), ("b", "F32", [1])]) as writer:
        writer.write("a", torch.ones(1))
        with pytest.raises(OutputError, match="never written"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_write_keeps_existing_target_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous good output")
    tensors = mixed_tensors()
    with pytest.raises(RuntimeError, match="encoder failed"):
        with SafetensorsWriter(target, entries_of(tensors)) as writer:
            writer.write(writer.order[0], tensors[writer.order[0]])
            raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"previous good output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_leaving_without_commit_publishes_nothing(tmp_path: Path):
    with SafetensorsWriter(tmp_path / "out.safetensors", [("a", "F32", [1])]) as writer:
        writer.write("a", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


SIGTERM_SCRIPT = """
import sys, time, torch
from pathlib import Path
from inspect_tools.writer import SafetensorsWriter
target = Path(sys.argv[1])
with SafetensorsWriter(target, [("a", "F32", [4]), ("b", "F32", [4])]) as writer:
    writer.write("a", torch.ones(4))
    print(writer.temp_path, flush=True)
    time.sleep(60)
    writer.write("b", torch.ones(4))
    writer.commit()
"""


def test_sigterm_mid_write_removes_temp_and_keeps_target(tmp_path: Path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous good output")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    temp = Path(proc.stdout.readline().strip())
    assert temp.exists() and temp.parent == tmp_path
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=30)[1]
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert not temp.exists()
    assert target.read_bytes() == b"previous good output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_check_output_path_refuses_inputs_also_through_links(tmp_path: Path):
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(source)
    os.link(source, tmp_path / "hard.safetensors")
    for out in ("in.safetensors", "link.safetensors", "hard.safetensors"):
        with pytest.raises(OutputError, match="overwrite the input"):
            check_output_path(tmp_path / out, [source])
    assert check_output_path(tmp_path / "new.safetensors", [source]) == (tmp_path / "new.safetensors").resolve()


def test_check_output_path_refuses_a_shard_of_a_sharded_input(tmp_path: Path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": torch.ones(1)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    reader = open_checkpoint(folder)
    with pytest.raises(OutputError):
        check_output_path(folder / "model-00001-of-00001.safetensors", reader.files)


def test_check_output_path_needs_an_existing_folder(tmp_path: Path):
    with pytest.raises(OutputError, match="folder does not exist"):
        check_output_path(tmp_path / "missing" / "out.safetensors", [])


def test_ensure_free_space_names_the_numbers(tmp_path: Path):
    ensure_free_space(tmp_path, 1)
    with pytest.raises(OutputError, match=r"needs 1125899906842624 bytes \(1048576.00 GiB\)"):
        ensure_free_space(tmp_path, 2**50)


def test_writer_checks_space_before_creating_anything(tmp_path: Path):
    with pytest.raises(OutputError, match="not enough free space"):
        with SafetensorsWriter(tmp_path / "out.safetensors", [("w", "U8", [2**50])]):
            pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_replaces_whole_file(tmp_path: Path):
    path = tmp_path / "report.json"
    path.write_text("old")
    atomic_write_text(path, '{"new": true}\n')
    assert path.read_text() == '{"new": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_output_is_deterministic(tmp_path: Path):
    tensors = mixed_tensors()
    metadata = {"b": "2", "a": "1", "c": "3"}
    first = write_all(tmp_path / "one.safetensors", tensors, metadata).read_bytes()
    time.sleep(0.01)
    second = write_all(tmp_path / "two.safetensors", tensors, dict(reversed(metadata.items()))).read_bytes()
    assert first == second


def test_a_tensor_written_in_parts_gives_the_same_bytes(tmp_path: Path):
    tensors = mixed_tensors()
    reference = write_all(tmp_path / "reference.safetensors", tensors)
    big = tensors["blocks.0.weight"].reshape(-1)  # 32 F32 values, written as parts of 5 values, last one first
    with SafetensorsWriter(tmp_path / "parts.safetensors", entries_of(tensors)) as writer:
        for name in writer.order:
            if name != "blocks.0.weight":
                writer.write(name, tensors[name])
        for start in reversed(range(0, big.numel(), 5)):
            writer.write_part("blocks.0.weight", start * 4, big[start:start + 5])
        out = writer.commit()
    assert out.read_bytes() == reference.read_bytes()


def test_commit_refuses_a_tensor_with_an_unwritten_part(tmp_path: Path):
    with SafetensorsWriter(tmp_path / "out.safetensors", [("w", "F32", [8])]) as writer:
        writer.write_part("w", 0, torch.ones(4))
        with pytest.raises(OutputError, match="never written"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("offset, part, message", [
    (8, torch.ones(4), "overlaps"),
    (16, torch.ones(5), "outside"),
    (16, torch.ones(4, dtype=torch.float16), "planned F32, got F16"),
])
def test_write_part_refuses_overlaps_overruns_and_wrong_dtypes(tmp_path: Path, offset, part, message):
    with SafetensorsWriter(tmp_path / "out.safetensors", [("w", "F32", [8])]) as writer:
        writer.write_part("w", 0, torch.ones(4))
        with pytest.raises(ValueError, match=message):
            writer.write_part("w", offset, part)
        with pytest.raises(ValueError, match="written twice"):
            writer.write("w", torch.ones(8))


# --- temporaries: names, leftovers of killed runs, publishing ------------------------------------------------------

def one_tensor(path: Path, value: float = 1.0, **options) -> SafetensorsWriter:
    writer = SafetensorsWriter(path, [("a", "F32", [4])], **options)
    writer.open()
    writer.write("a", torch.full((4,), value))
    return writer


def test_the_temporary_says_whose_it_is(tmp_path: Path):
    writer = one_tensor(tmp_path / "out.safetensors")
    try:
        assert re.fullmatch(rf"\.out\.safetensors\.{os.getpid()}-{host_tag()}-[0-9a-f]{{8}}\.nvdiag-tmp",
                            writer.temp_path.name)
        assert writer.temp_path.stat().st_mode & 0o777 == 0o600  # private until published
    finally:
        writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["o" * 228 + ".safetensors", "é" * 119 + ".safetensors"],
                         ids=["240 ASCII characters", "250 bytes of UTF-8"])
def test_a_long_legal_output_name_works(tmp_path: Path, name: str):
    out = tmp_path / name
    assert len(out.name.encode()) <= 255
    writer = one_tensor(out)
    assert len(writer.temp_path.name.encode()) <= 255
    assert writer.temp_path.name.endswith(TEMP_SUFFIX) and writer.temp_path.name.startswith("." + name[:100])
    writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert leftovers(out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(out: Path, pid: int, tag: str | None = None, age_s: float = 0) -> Path:
    path = out.parent / f".{out.name}.{pid}-{tag or host_tag()}-0123abcd{TEMP_SUFFIX}"
    path.write_bytes(b"half a model")
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_killed_runs_temporary_is_removed_by_the_next_run(tmp_path: Path, capsys):
    out = tmp_path / "out.safetensors"
    left = _leftover(out, _dead_pid())
    one_tensor(out).commit()
    assert not left.exists()
    err = capsys.readouterr().err
    assert f"nvdiag: note: removed {left}: a temporary file of nvdiag process" in err and "no longer exists" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_a_running_process_temporary_is_never_removed(tmp_path: Path, capsys):
    out = tmp_path / "out.safetensors"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fresh = _leftover(out, sleeper.pid)
        one_tensor(out).commit()
        assert fresh.exists()
        assert capsys.readouterr().err == ""  # another run writing OUT now: publishing decides, nothing to say
        fresh.unlink()
        stale_looking = _leftover(out, sleeper.pid, age_s=3600)  # untouched for an hour: its PID may be reused
        one_tensor(out).commit()
        assert stale_looking.exists()
        err = capsys.readouterr().err
        assert f"{stale_looking} is the temporary file of nvdiag process {sleeper.pid}, still running" in err
        assert "may be removed" in err
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("kind", ["another host", "older nvdiag"])
def test_a_temporary_that_cannot_be_proved_stale_is_named_not_removed(tmp_path: Path, kind: str, capsys):
    out = tmp_path / "out.safetensors"
    left = (_leftover(out, _dead_pid(), tag="000000") if kind == "another host"
            else tmp_path / f".out.safetensors.ab_9xyz0{TEMP_SUFFIX}")  # tempfile.mkstemp's naming
    left.write_bytes(b"x")
    one_tensor(out).commit()
    assert left.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"nvdiag: note: {left} is a temporary file of ") and "may be removed" in err


def test_temporaries_of_another_output_are_not_touched(tmp_path: Path, capsys):
    other = _leftover(tmp_path / "out.safetensors.bak", _dead_pid())
    one_tensor(tmp_path / "out.safetensors").commit()
    assert other.exists() and capsys.readouterr().err == ""


def test_without_overwrite_an_output_created_meanwhile_is_not_replaced(tmp_path: Path):
    out = tmp_path / "out.safetensors"
    first, second = one_tensor(out, 1.0, overwrite=False), one_tensor(out, 2.0, overwrite=False)
    first.commit()
    published = out.read_bytes()
    with pytest.raises(OutputError, match="created by another process while this run wrote it; pass --force"):
        second.commit()
    second.abort()
    assert out.read_bytes() == published
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize("exists", [False, True])
def test_without_hard_links_an_exclusive_placeholder_claims_the_output(tmp_path: Path, monkeypatch, exists: bool):
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out.safetensors"
    if exists:
        out.write_bytes(b"someone else's")
    writer = one_tensor(out, overwrite=False)
    if exists:
        with pytest.raises(OutputError, match="created by another process"):
            writer.commit()
        writer.abort()
        assert out.read_bytes() == b"someone else's"
    else:
        writer.commit()
        assert torch.equal(load_file(str(out))["a"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize("failing", ["header", "tensor", "fsync", "early fsync"])
def test_a_full_disk_names_the_output_and_leaves_no_temporary(tmp_path: Path, monkeypatch, failing: str):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(out, [("a", "F32", [4])])
    sigterm = signal.getsignal(signal.SIGTERM)
    if failing == "header":
        monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError) as caught:
        with writer:
            if failing == "tensor":
                monkeypatch.setattr(os, "pwrite", full)
            writer.write("a", torch.ones(4))
            monkeypatch.setattr(os, "fsync", full)
            if failing == "early fsync":  # the background fsync's error is the commit's
                writer.sync_early()
            writer.commit()
    assert str(caught.value) == f"{out}: No space left on device while writing it; nothing was published"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is sigterm  # a failed open gives the signals back too


def test_a_folder_that_refuses_new_files_is_one_error_naming_the_output(tmp_path: Path, monkeypatch):
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OutputError) as caught:
        one_tensor(out)
    assert str(caught.value) == f"{out}: cannot create a file in {tmp_path}: Permission denied"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0555")
def test_a_read_only_folder_is_one_error_naming_the_output(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot create a file in .*: Permission denied"):
            one_tensor(folder / "out.safetensors")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# --- signals -----------------------------------------------------------------------------------------------------

def _default_signals() -> None:
    """What a process started from an interactive shell has (pytest may run under nohup, which ignores SIGHUP)."""
    for signum in CLEANUP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2],
                         ids=lambda s: signal.Signals(s).name)
def test_every_terminating_signal_removes_the_temporary(tmp_path: Path, signum: int):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous good output")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    temp = Path(proc.stdout.readline().strip())
    assert temp.exists()
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=30)[1]
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip() == f"nvdiag: interrupted by {signal.Signals(signum).name}: {target} was not written " \
                             "(temporary file removed)"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert target.read_bytes() == b"previous good output"


def test_ignored_signals_and_callers_own_handlers_are_respected(tmp_path: Path):
    def alarm(signum, frame):
        pass

    old = {s: signal.getsignal(s) for s in CLEANUP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: the user asked to survive a hang-up
        signal.signal(signal.SIGALRM, alarm)  # e.g. a timeout of the caller's
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        writer = one_tensor(tmp_path / "out.safetensors")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGALRM) is alarm
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)  # taken over: it would kill silently
        writer.commit()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # given back once published (no command scope)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def test_a_signal_right_after_publishing_does_not_fail_a_complete_run(tmp_path: Path, capsys):
    out = tmp_path / "out.safetensors"
    with command_scope():
        writer = one_tensor(out)
        writer.commit()
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not obeyed: the output is complete
        time.sleep(0.05)
        assert out.exists()
    assert capsys.readouterr().err.strip() == f"nvdiag: SIGTERM arrived after {out} was published: the output is " \
                                              "complete"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # the shield ends with the command


def test_sync_early_starts_the_commits_fsync_and_seals_the_file(tmp_path: Path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(threading.current_thread().name), real_fsync(fd)))
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, [("a", "F32", [4])]) as writer:
        writer.write("a", torch.ones(4))
        writer.sync_early()
        assert load_file(str(writer.temp_path))["a"].tolist() == [1.0] * 4  # the finished file can be checked
        with pytest.raises(RuntimeError, match="after sync_early"):
            writer.write_part("a", 0, torch.zeros(1))
        writer.commit()
    assert synced[0] == "nvdiag-fsync"  # the file's fsync ran in the background; only the folder's in commit()
    assert "nvdiag-fsync" not in synced[1:]
    assert torch.equal(load_file(str(out))["a"], torch.ones(4))


def test_aborting_after_sync_early_removes_the_temporary_without_waiting_for_the_disk(tmp_path: Path, monkeypatch):
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, [("a", "F32", [4])]) as writer:
        writer.write("a", torch.ones(4))
        writer.sync_early()
    release.set()
    assert list(tmp_path.iterdir()) == []
