"""Broken and hostile inputs, one builder per class, so every command can be tested against all of them:

    for name, build in BAD_INPUTS.items():
        path = build(tmp_path / name)   # the builder creates that folder and returns the path to pass to a command
        ... expect exit code 2 (InputError, or UnsafeFormatError for the names in UNSAFE_INPUTS)

Files are written byte by byte here (not with safetensors/gguf writers where the point is an invalid file), tiny, and
deterministic. The pickle payload, if it were ever unpickled, would create `PICKLE_MARKER_NAME` beside itself;
tests assert that file never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Builder = Callable[[Path], Path]

PICKLE_MARKER_NAME = "PICKLE_PAYLOAD_EXECUTED"


# --- valid building blocks ------------------------------------------------------------------------------------------

def safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw bytes to allow non-JSON) and its data section.
    `length` overrides the declared header length (to build lying files)."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def two_tensor_header() -> dict:
    """A valid header: a.weight F32 [2, 4] at [0, 32], a.bias F32 [4] at [32, 48]."""
    return {
        "__metadata__": {"format": "pt"},
        "a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
    }


def valid_safetensors_bytes() -> bytes:
    return safetensors_bytes(two_tensor_header(), np.arange(12, dtype=np.float32).tobytes())


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _write_header(folder: Path, header: dict | bytes, data: bytes = bytes(48), length: int | None = None) -> Path:
    return _write(folder / "model.safetensors", safetensors_bytes(header, data, length))


def _mutated_header(**changes: dict) -> dict:
    header = two_tensor_header()
    for name, entry in changes.items():
        header[name.replace("__", ".")] = entry
    return header


def write_valid_gguf(path: Path) -> Path:
    """A small valid GGUF (v3): one F32 [4, 32] tensor and one Q4_0 [4, 32] tensor, a string key-value."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_string("general.name", "nvdiag bad-input base")
    values = np.linspace(-1, 1, 128, dtype=np.float32).reshape(4, 32)
    writer.add_tensor("blocks.0.weight", values)
    packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("blocks.1.weight", packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_index(folder: Path, weight_map: object, shards: dict[str, bytes] | None = None,
                 raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (shards or {}).items():
        _write(folder / name, data)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_bytes(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    return index


def _shard(names: list[str]) -> bytes:
    header = {n: {"dtype": "F32", "shape": [2], "data_offsets": [8 * i, 8 * i + 8]} for i, n in enumerate(names)}
    return safetensors_bytes(header, bytes(8 * len(names)))


# --- safetensors ------------------------------------------------------------------------------------------------------

def empty_file(folder: Path) -> Path:
    return _write(folder / "model.safetensors", b"")


def truncated(folder: Path) -> Path:
    data = valid_safetensors_bytes()
    return _write(folder / "model.safetensors", data[: len(data) - 20])


def header_length_past_end(folder: Path) -> Path:
    return _write_header(folder, two_tensor_header(), length=4096)


def header_length_over_bound(folder: Path) -> Path:
    return _write_header(folder, two_tensor_header(), length=200_000_000)


def header_not_json(folder: Path) -> Path:
    return _write_header(folder, b'{"a.weight": {"dtype": "F32", "shape": [2, 4], ')


def header_not_object(folder: Path) -> Path:
    return _write_header(folder, b'[1, 2, 3]')


def unknown_dtype(folder: Path) -> Path:
    return _write_header(folder, _mutated_header(a__bias={"dtype": "F128", "shape": [4], "data_offsets": [32, 48]}))


def shape_bytes_mismatch(folder: Path) -> Path:
    return _write_header(folder, _mutated_header(a__bias={"dtype": "F32", "shape": [5], "data_offsets": [32, 48]}))


def offset_past_end(folder: Path) -> Path:
    header = _mutated_header(a__bias={"dtype": "F32", "shape": [4], "data_offsets": [32, 48]})
    return _write_header(folder, header, data=bytes(40))


def overlapping_offsets(folder: Path) -> Path:
    header = _mutated_header(a__bias={"dtype": "F32", "shape": [4], "data_offsets": [16, 32]})
    return _write_header(folder, header, data=bytes(32))


def offsets_with_gap(folder: Path) -> Path:
    """Unused bytes between two tensors: safetensors requires the data section to be packed."""
    header = _mutated_header(a__bias={"dtype": "F32", "shape": [4], "data_offsets": [40, 56]})
    return _write_header(folder, header, data=bytes(56))


def offsets_reversed(folder: Path) -> Path:
    header = _mutated_header(a__bias={"dtype": "F32", "shape": [4], "data_offsets": [48, 32]})
    return _write_header(folder, header)


def negative_shape(folder: Path) -> Path:
    return _write_header(folder, _mutated_header(a__bias={"dtype": "F32", "shape": [-4], "data_offsets": [32, 48]}))


def duplicate_tensor_name(folder: Path) -> Path:
    """The same name twice in the header JSON: json.loads would silently keep the last one."""
    raw = (b'{"a.weight":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]},'
           b'"a.weight":{"dtype":"F32","shape":[4],"data_offsets":[32,48]}}')
    return _write_header(folder, raw)


def header_not_utf8(folder: Path) -> Path:
    return _write_header(folder, b'{"a.w\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', data=bytes(4))


def metadata_not_strings(folder: Path) -> Path:
    header = two_tensor_header()
    header["__metadata__"] = {"format": 1}
    return _write_header(folder, header)


# --- sharded ----------------------------------------------------------------------------------------------------------

def duplicate_across_shards(folder: Path) -> Path:
    shards = {"model-00001-of-00002.safetensors": _shard(["a", "b"]),
              "model-00002-of-00002.safetensors": _shard(["b", "c"])}
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors"}
    return _write_index(folder, weight_map, shards)


def index_not_json(folder: Path) -> Path:
    return _write_index(folder, None, raw=b'{"weight_map": {"a": ')


def index_without_weight_map(folder: Path) -> Path:
    return _write_index(folder, None, {"model.safetensors": _shard(["a"])}, raw=b'{"metadata": {"total_size": 8}}')


def index_missing_shard(folder: Path) -> Path:
    return _write_index(folder, {"a": "model-00001-of-00001.safetensors"})


def index_parent_path(folder: Path) -> Path:
    _write(folder / "outside.safetensors", _shard(["a"]))
    return _write_index(folder / "ckpt", {"a": "../outside.safetensors"})


def index_absolute_path(folder: Path) -> Path:
    outside = _write(folder / "outside.safetensors", _shard(["a"]))
    return _write_index(folder / "ckpt", {"a": str(outside.resolve())})


def index_pickle_shard(folder: Path) -> Path:
    """An index whose shard is a pickle (a .bin, as transformers' pytorch_model.bin.index.json has): refused before
    it is unpickled, like a pickle named on the command line."""
    shard = pickle.dumps(_CreatesFileWhenUnpickled(folder / PICKLE_MARKER_NAME), protocol=2)
    return _write_index(folder, {"a": "pytorch_model-00001-of-00001.bin"},
                        {"pytorch_model-00001-of-00001.bin": shard})


def index_shard_truncated(folder: Path) -> Path:
    shard = _shard(["a", "b"])
    return _write_index(folder, {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"},
                        {"model-00001-of-00001.safetensors": shard[:-5]})


def index_weight_map_not_object(folder: Path) -> Path:
    return _write_index(folder, ["model-00001-of-00001.safetensors"],
                        {"model-00001-of-00001.safetensors": _shard(["a"])})


def index_symlink_escape(folder: Path) -> Path:
    outside = _write(folder / "outside.safetensors", _shard(["a"]))
    index = _write_index(folder / "ckpt", {"a": "model.safetensors"})
    os.symlink(outside.resolve(), folder / "ckpt" / "model.safetensors")
    return index


# --- GGUF -------------------------------------------------------------------------------------------------------------

def _patched_gguf(folder: Path, offset: int, patch: bytes) -> Path:
    path = write_valid_gguf(folder / "model.gguf")
    data = bytearray(path.read_bytes())
    data[offset:offset + len(patch)] = patch
    return _write(path, bytes(data))


def gguf_bad_magic(folder: Path) -> Path:
    return _patched_gguf(folder, 0, b"GGUX")


def gguf_unsupported_version(folder: Path) -> Path:
    return _patched_gguf(folder, 4, struct.pack("<I", 7))


def gguf_impossible_counts(folder: Path) -> Path:
    return _patched_gguf(folder, 8, struct.pack("<Q", 2**40))


def gguf_only_magic(folder: Path) -> Path:
    return _write(folder / "model.gguf", b"GGUF")


def gguf_huge_string_length(folder: Path) -> Path:
    """The first key's name length (right after magic, version and the two counts) claims 2**62 bytes."""
    return _patched_gguf(folder, 24, struct.pack("<Q", 2**62))


def gguf_truncated_data(folder: Path) -> Path:
    path = write_valid_gguf(folder / "model.gguf")
    data = path.read_bytes()
    return _write(path, data[: len(data) - 40])


# --- paths and pickles ------------------------------------------------------------------------------------------------

def directory_without_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("not a checkpoint\n")
    return folder


def missing_path(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "does-not-exist.safetensors"


def broken_symlink(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "model.safetensors"
    os.symlink(folder / "gone.safetensors", link)
    return link


def named_pipe(folder: Path) -> Path:
    """A FIFO named like a checkpoint: opening it for reading would block forever, so it must be refused unread."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    os.mkfifo(path)
    return path


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"): harmless, but proof that the file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def pickle_payload(folder: Path) -> Path:
    """A protocol-2 pickle disguised with a .safetensors name, so only the content check can catch it."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(_CreatesFileWhenUnpickled(folder / PICKLE_MARKER_NAME), protocol=2)
    return _write(folder / "model.safetensors", payload)


def pickle_ckpt(folder: Path) -> Path:
    """The same payload with a pickle extension, at protocol 4 (starts with a FRAME opcode)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(_CreatesFileWhenUnpickled(folder / PICKLE_MARKER_NAME), protocol=4)
    return _write(folder / "model.ckpt", payload)


def torch_zip_pt(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    torch.save({"a.weight": torch.zeros(2, 2)}, path)
    return path


def torch_zip_renamed(folder: Path) -> Path:
    path = torch_zip_pt(folder)
    return path.rename(folder / "model.safetensors")


BAD_INPUTS: dict[str, Builder] = {
    "empty_file": empty_file,
    "truncated": truncated,
    "header_length_past_end": header_length_past_end,
    "header_length_over_bound": header_length_over_bound,
    "header_not_json": header_not_json,
    "header_not_object": header_not_object,
    "unknown_dtype": unknown_dtype,
    "shape_bytes_mismatch": shape_bytes_mismatch,
    "offset_past_end": offset_past_end,
    "overlapping_offsets": overlapping_offsets,
    "metadata_not_strings": metadata_not_strings,
    "offsets_with_gap": offsets_with_gap,
    "offsets_reversed": offsets_reversed,
    "negative_shape": negative_shape,
    "duplicate_tensor_name": duplicate_tensor_name,
    "header_not_utf8": header_not_utf8,
    "duplicate_across_shards": duplicate_across_shards,
    "index_not_json": index_not_json,
    "index_without_weight_map": index_without_weight_map,
    "index_missing_shard": index_missing_shard,
    "index_parent_path": index_parent_path,
    "index_absolute_path": index_absolute_path,
    "index_symlink_escape": index_symlink_escape,
    "index_pickle_shard": index_pickle_shard,
    "index_shard_truncated": index_shard_truncated,
    "index_weight_map_not_object": index_weight_map_not_object,
    "gguf_bad_magic": gguf_bad_magic,
    "gguf_unsupported_version": gguf_unsupported_version,
    "gguf_impossible_counts": gguf_impossible_counts,
    "gguf_truncated_data": gguf_truncated_data,
    "gguf_only_magic": gguf_only_magic,
    "gguf_huge_string_length": gguf_huge_string_length,
    "directory_without_checkpoint": directory_without_checkpoint,
    "missing_path": missing_path,
    "broken_symlink": broken_symlink,
    "named_pipe": named_pipe,
    "pickle_payload": pickle_payload,
    "pickle_ckpt": pickle_ckpt,
    "torch_zip_pt": torch_zip_pt,
    "torch_zip_renamed": torch_zip_renamed,
}

# Refused as pickles (UnsafeFormatError, a subclass of InputError); every other entry gives a plain InputError.
UNSAFE_INPUTS: frozenset[str] = frozenset({"pickle_payload", "pickle_ckpt", "torch_zip_pt", "torch_zip_renamed",
                                           "index_pickle_shard"})
