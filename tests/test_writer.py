"""The streaming writer: byte-identical to safetensors' save_file, atomic on failure, Ctrl-C and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inspect_tools.errors import OutputError
from inspect_tools.readers import open_checkpoint
from inspect_tools.readers.safetensors_dtypes import dtype_name
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
