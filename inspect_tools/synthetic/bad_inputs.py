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


def _shape_overflow(folder: Path, shape: list[int]) -> Path:
    header = _mutated_header(a__bias={"dtype": "F32", "shape": shape, "data_offsets": [32, 32]})
    return _write_header(folder, header, data=bytes(32))


def shape_numel_overflow(folder: Path) -> Path:
    """Zero bytes, yet 2**124 elements once the zero dimension is left out: torch's strides overflow on it."""
    return _shape_overflow(folder, [0, 2**62, 2**62])


def shape_dim_2_64(folder: Path) -> Path:
    return _shape_overflow(folder, [0, 2**64])


def shape_dim_2_70(folder: Path) -> Path:
    return _shape_overflow(folder, [2**70, 0])


def too_many_tensors(folder: Path) -> Path:
    """One more (empty) tensor than nvdiag reads in one checkpoint."""
    from inspect_tools.readers.base import MAX_TENSORS

    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(MAX_TENSORS + 1))
    return _write_header(folder, ("{" + entries + "}").encode(), data=b"")


def metadata_not_strings(folder: Path) -> Path:
    header = two_tensor_header()
    header["__metadata__"] = {"format": 1}
    return _write_header(folder, header)


# --- readable files whose layers are malformed: lint flags them, roundtrip must not decode them -----------------

# The layer they hold has the name and (when well-formed) the shape of a layer of the synthetic WAN models
# (inspect_tools.synthetic), so that roundtrip pairs it with that model's layer.
LAYER = "blocks.0.self_attn.q"
NVFP4_MARKER = b'{"format": "nvfp4"}'


def _packed_file(folder: Path, tensors: list[tuple[str, str, list[int], bytes]], metadata: dict | None = None) -> Path:
    """A safetensors file from (name, dtype, shape, bytes) laid out one after the other, names sorted."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, dtype, shape, raw in sorted(tensors):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return _write_header(folder, header, data)


def nvfp4_layer(folder: Path, weight: tuple[str, list[int]] = ("U8", [256, 128]),
                scale: tuple[str, list[int]] = ("F8_E4M3", [256, 16]), marker: bytes | None = NVFP4_MARKER,
                metadata: dict | None = None) -> Path:
    """One NVFP4 layer (`LAYER`) whose packed weight and block scale have the given dtype and shape; zero codes,
    block scales 1.0, weight_scale_2 1.0. The defaults are a well-formed 256x256 layer."""
    from inspect_tools.readers.safetensors_dtypes import DTYPES, byte_length

    def zeros(dtype: str, shape: list[int], fill: int = 0) -> bytes:
        return bytes([fill]) * (byte_length(DTYPES[dtype], tuple(shape)) or 0)

    tensors = [
        (f"{LAYER}.weight", weight[0], weight[1], zeros(*weight)),
        (f"{LAYER}.weight_scale", scale[0], scale[1], zeros(*scale, fill=0x38)),  # 0x38 is 1.0 in E4M3
        (f"{LAYER}.weight_scale_2", "F32", [], struct.pack("<f", 1.0)),
    ]
    if marker is not None:
        tensors.append((f"{LAYER}.comfy_quant", "U8", [len(marker)], marker))
    return _packed_file(folder, tensors, metadata)


def nvfp4_weight_0d(folder: Path) -> Path:
    return nvfp4_layer(folder, weight=("U8", []))


def nvfp4_weight_1d(folder: Path) -> Path:
    return nvfp4_layer(folder, weight=("U8", [256 * 128]))


def nvfp4_weight_f4(folder: Path) -> Path:
    return nvfp4_layer(folder, weight=("F4", [256, 256]))


def nvfp4_weight_f6(folder: Path) -> Path:
    return nvfp4_layer(folder, weight=("F6_E2M3", [256, 256]))


def nvfp4_weight_f32(folder: Path) -> Path:
    """An F32 weight marked nvfp4: the marker says packed codes, the dtype says plain floats."""
    return nvfp4_layer(folder, weight=("F32", [256, 256]))


def nvfp4_weight_odd_shape(folder: Path) -> Path:
    return nvfp4_layer(folder, weight=("U8", [17, 8]), scale=("F8_E4M3", [128, 4]))


def nvfp4_scale_wrong_shape(folder: Path) -> Path:
    return nvfp4_layer(folder, scale=("F8_E4M3", [3, 5]))


def nvfp4_scale_1d(folder: Path) -> Path:
    return nvfp4_layer(folder, scale=("F8_E4M3", [256 * 16]))


def marker_nested_deep(folder: Path) -> Path:
    """A comfy_quant marker nested 10,000 levels deep (CPython's json recurses once per level)."""
    return nvfp4_layer(folder, marker=b'{"format": "nvfp4", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")


def marker_format_list(folder: Path) -> Path:
    return nvfp4_layer(folder, marker=b'{"format": ["nvfp4"]}')


def metadata_nested_deep(folder: Path) -> Path:
    deep = '{"format_version": "1.0", "layers": ' + "[" * 10_000 + "]" * 10_000 + "}"
    return nvfp4_layer(folder, marker=None, metadata={"_quantization_metadata": deep})


def metadata_huge_integer(folder: Path) -> Path:
    """A 4,400-digit integer: beyond Python's default int-string conversion limit (4,300 digits)."""
    text = '{"format_version": ' + "9" * 4400 + ', "layers": {"' + LAYER + '": {"format": "nvfp4"}}}'
    return nvfp4_layer(folder, marker=None, metadata={"_quantization_metadata": text})


def metadata_format_object(folder: Path) -> Path:
    text = json.dumps({"format_version": "1.0", "layers": {LAYER: {"format": {"name": "nvfp4"}}}})
    return nvfp4_layer(folder, marker=None, metadata={"_quantization_metadata": text})


def transplant(source: Path, malformed: Path, target: Path) -> Path:
    """`source` (a valid single-file checkpoint) with every tensor of `malformed` (one of MALFORMED_LAYERS' files)
    put in, replacing the tensors of the same layer: the malformed layer inside a whole model."""
    def entries(path: Path) -> tuple[dict, list[tuple[str, str, list[int], bytes]]]:
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        data = raw[8 + length:]
        metadata = header.pop("__metadata__", None) or {}
        return metadata, [(n, e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]])
                          for n, e in header.items()]

    metadata, tensors = entries(source)
    extra_metadata, replacements = entries(malformed)
    layers = {name.rsplit(".", 1)[0] for name, *_ in replacements}
    kept = [t for t in tensors if t[0].rsplit(".", 1)[0] not in layers]
    return _packed_file(target, kept + replacements, {**metadata, **extra_metadata})


# Files that open (they are readable containers) but hold a layer lint must flag, with the cause it must name.
MALFORMED_LAYERS: dict[str, tuple[Builder, str]] = {
    "nvfp4_weight_0d": (nvfp4_weight_0d, "wrong-shape"),
    "nvfp4_weight_1d": (nvfp4_weight_1d, "wrong-shape"),
    "nvfp4_weight_f4": (nvfp4_weight_f4, "wrong-dtype"),
    "nvfp4_weight_f6": (nvfp4_weight_f6, "wrong-dtype"),
    "nvfp4_weight_f32": (nvfp4_weight_f32, "wrong-dtype"),
    "nvfp4_weight_odd_shape": (nvfp4_weight_odd_shape, "wrong-shape"),
    "nvfp4_scale_wrong_shape": (nvfp4_scale_wrong_shape, "wrong-shape"),
    "nvfp4_scale_1d": (nvfp4_scale_1d, "wrong-shape"),
    "marker_nested_deep": (marker_nested_deep, "invalid-quant-marker"),
    "marker_format_list": (marker_format_list, "invalid-quant-marker"),
    "metadata_nested_deep": (metadata_nested_deep, "invalid-quant-marker"),
    "metadata_huge_integer": (metadata_huge_integer, "invalid-quant-marker"),
    "metadata_format_object": (metadata_format_object, "invalid-quant-marker"),
}


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


def index_symlink_loop(folder: Path) -> Path:
    """A shard that is a symlink to itself: resolving it loops."""
    index = _write_index(folder, {"a": "model.safetensors"})
    os.symlink("model.safetensors", folder / "model.safetensors")
    return index


# --- GGUF -------------------------------------------------------------------------------------------------------------

def _gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(tensors: list[tuple[str | bytes, int, tuple[int, ...], int]], data: bytes,
               kv: list[tuple[str, int, bytes]] | None = None, tensor_count: int | None = None,
               alignment: int = 32) -> bytes:
    """A GGUF v3 file from tensor infos (name, GGML type id, on-disk dims, offset in the data section), the data
    section and raw key-values (key, value type id, encoded value), written byte by byte so any field can lie.
    `tensor_count` overrides the count the header declares."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else tensor_count, len(kv or []))
    for key, vtype, value in kv or []:
        head += _gguf_string(key) + struct.pack("<I", vtype) + value
    for name, ggml_type, dims, offset in tensors:
        head += _gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
    head += bytes(-len(head) % alignment)
    return head + data


def gguf_tensor_past_end(folder: Path) -> Path:
    """The last tensor (Q6_K, 210 bytes per 256 elements) claims two rows where the file holds one."""
    tensors = [("blocks.0.weight", 0, (32, 4), 0), ("blocks.1.weight", 14, (256, 2), 512)]
    return _write(folder / "model.gguf", gguf_bytes(tensors, bytes(512 + 210 + 14)))


def gguf_offset_2_64(folder: Path) -> Path:
    """A tensor offset of 2**64 - 1: past any file, and past numpy's int64 arithmetic."""
    tensors = [("blocks.0.weight", 0, (32, 4), 0), ("blocks.1.weight", 0, (32, 4), 2**64 - 1)]
    return _write(folder / "model.gguf", gguf_bytes(tensors, bytes(1024)))


def gguf_fewer_tensors_listed(folder: Path) -> Path:
    """The header's tensor count says 1 where the table holds 2: the second tensor's data belongs to no tensor."""
    return _patched_gguf(folder, 8, struct.pack("<Q", 1))


def gguf_too_many_tensors(folder: Path) -> Path:
    """More tensor infos than any checkpoint holds, each the smallest record possible (issue 17: 2M names made
    gguf-py take minutes and gigabytes)."""
    from inspect_tools.readers.base import MAX_TENSORS

    record = _gguf_string(b"") + struct.pack("<IIQ", 0, 0, 0)
    count = MAX_TENSORS + 1
    return _write(folder / "model.gguf", gguf_bytes([], record * count, tensor_count=count, alignment=1))


def gguf_huge_string_array(folder: Path) -> Path:
    """A key-value array that claims 2**40 strings in a file of a few bytes."""
    kv = [("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**40))]
    return _write(folder / "model.gguf", gguf_bytes([], bytes(64), kv=kv))


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
    "gguf_tensor_past_end": gguf_tensor_past_end,
    "gguf_offset_2_64": gguf_offset_2_64,
    "gguf_fewer_tensors_listed": gguf_fewer_tensors_listed,
    "gguf_too_many_tensors": gguf_too_many_tensors,
    "gguf_huge_string_array": gguf_huge_string_array,
    "shape_numel_overflow": shape_numel_overflow,
    "shape_dim_2_64": shape_dim_2_64,
    "shape_dim_2_70": shape_dim_2_70,
    "too_many_tensors": too_many_tensors,
    "index_symlink_loop": index_symlink_loop,
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
