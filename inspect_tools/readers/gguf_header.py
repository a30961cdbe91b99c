"""The GGUF header (key-values and tensor-info table) read by nvdiag itself, with limits, in one linear pass.

gguf-py's GGUFReader builds several numpy views per record, so a small file of many records costs ~200 MB of RAM
per MB and minutes (issue 22): the header is therefore parsed here with struct over a memory map, long arrays are
skipped instead of materialized, and every count is bounded before it is looped over. gguf-py stays the source of
the GGML type table and of dequantization.

Layout (GGUF spec, ggml docs/gguf.md): magic, version u32, tensor count u64, key-value count u64; key-values
(key string, value type u32, value); tensor infos (name string, n_dims u32, dims u64 each, type u32, offset u64
relative to the data section); padding to `general.alignment` (default 32); the data section. Strings are a u64
length and UTF-8 bytes. Little-endian only (big-endian files are refused by the version check).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

# Value type ids of the GGUF spec -> struct format of fixed-size scalars.
SCALAR_FORMATS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                                  10: "<Q", 11: "<q", 12: "<d"}
TYPE_NAMES: dict[int, str] = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
                              6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
                              12: "float64"}
STRING, ARRAY, UINT32 = 8, 9, 4
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# Limits. Real files: tens of key-values; tensor names up to GGML_MAX_NAME (64) bytes; at most 4 dims
# (GGML_MAX_DIMS); the longest arrays are tokenizer vocabularies and merges (~260k strings).
MAX_KV = 65_536
MAX_NAME_BYTES = 65_536
MAX_DIMS = 8
MAX_ARRAY_STRINGS = 2_000_000
MAX_ARRAY_DEPTH = 4
# Arrays longer than this (tokenizer vocabularies, merges) are summarized instead of copied into metadata.
MAX_METADATA_ARRAY = 64


class HeaderError(ValueError):
    """What is wrong with the header, in words for the user (the reader adds the file name)."""


@dataclass
class RawTensor:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # on-disk order: the fastest-varying dimension first
    offset: int  # relative to the data section


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[RawTensor] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0


class _Cursor:
    """Reads forward through a bytes-like buffer; every read is checked against its end."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"{what} at byte {self.pos} runs past the end of the file (truncated?)")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        length = self.unpack("<Q", f"{what} length")
        if limit is not None and length > limit:
            raise HeaderError(f"{what} at byte {self.pos - 8} is {length} bytes long (limit {limit})")
        self.need(length, what)
        data = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return data

    def string(self, what: str, limit: int | None = None) -> str:
        data = self.raw_string(what, limit)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderError(f"{what} at byte {self.pos - len(data)} is not UTF-8") from None

    def skip_string(self, what: str) -> None:
        length = self.unpack("<Q", f"{what} length")
        self.skip(length, what)


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in SCALAR_FORMATS:
        return cur.unpack(SCALAR_FORMATS[vtype], f"value of {key!r}")
    if vtype == STRING:
        return cur.string(f"value of {key!r}")
    if vtype == ARRAY:
        return _array(cur, key, depth)
    raise HeaderError(f"key {key!r} has unknown value type {vtype}")


def _array(cur: _Cursor, key: str, depth: int) -> Any:
    """The array's values when short; else skipped (in O(1) for fixed-size items) and summarized."""
    if depth >= MAX_ARRAY_DEPTH:
        raise HeaderError(f"key {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    item_type = cur.unpack("<I", f"array type of {key!r}")
    length = cur.unpack("<Q", f"array length of {key!r}")
    if item_type not in TYPE_NAMES:
        raise HeaderError(f"key {key!r}: array of unknown value type {item_type}")
    if length <= MAX_METADATA_ARRAY:
        return [_value(cur, item_type, key, depth + 1) for _ in range(length)]
    summary = f"<array of {length} {TYPE_NAMES[item_type]}>"
    if item_type in SCALAR_FORMATS:
        cur.skip(length * struct.calcsize(SCALAR_FORMATS[item_type]), f"array {key!r}")
        return summary
    # strings and nested arrays have no fixed size: walked one by one, so their number is bounded first (each
    # string takes at least its 8-byte length, so the file size bounds it too)
    if length > MAX_ARRAY_STRINGS or length * 8 > cur.size - cur.pos:
        raise HeaderError(f"key {key!r}: array of {length} {TYPE_NAMES[item_type]} items "
                          f"(limit {MAX_ARRAY_STRINGS}, and at most what the file size can hold)")
    if item_type == STRING:
        for _ in range(length):
            cur.skip_string(f"array {key!r}")
    else:
        for _ in range(length):
            _value(cur, item_type, key, depth + 1)
    return summary


def _tensor_info(cur: _Cursor, index: int) -> RawTensor:
    name = cur.string(f"name of tensor {index}", MAX_NAME_BYTES)
    n_dims = cur.unpack("<I", f"dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise HeaderError(f"tensor {name!r} has {n_dims} dimensions (GGML has at most 4)")
    cur.need(8 * n_dims, f"dimensions of tensor {name!r}")
    dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    ggml_type = cur.unpack("<I", f"type of tensor {name!r}")
    offset = cur.unpack("<Q", f"offset of tensor {name!r}")
    return RawTensor(name, ggml_type, tuple(dims), offset)


def parse_header(buf: Any, max_tensors: int) -> GGUFHeader:
    """Parse the header of a GGUF file held in `buf` (bytes or a memory map); HeaderError when it is malformed or
    beyond the limits."""
    cur = _Cursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise HeaderError(f"bad magic {bytes(buf[:4])!r}, expected b'GGUF'")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key-value count")
    if n_tensors > max_tensors:
        raise HeaderError(f"header lists {n_tensors} tensors, more than the {max_tensors} nvdiag reads "
                          "(real checkpoints hold a few thousand)")
    if n_kv > MAX_KV:
        raise HeaderError(f"header lists {n_kv} key-values, more than the {MAX_KV} nvdiag reads")
    header = GGUFHeader(version=version)
    for _ in range(n_kv):
        key = cur.string("key name", MAX_NAME_BYTES)
        vtype = cur.unpack("<I", f"value type of {key!r}")
        if key in header.metadata:
            raise HeaderError(f"key {key!r} appears twice")
        if key == ALIGNMENT_KEY and vtype != UINT32:
            raise HeaderError(f"{ALIGNMENT_KEY} has value type {TYPE_NAMES.get(vtype, vtype)}, not uint32")
        header.metadata[key] = _value(cur, vtype, key)
    alignment = header.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"{ALIGNMENT_KEY} is {alignment}, not a power of two")
    header.alignment = alignment
    names: set[str] = set()
    for index in range(n_tensors):
        info = _tensor_info(cur, index)
        if info.name in names:
            raise HeaderError(f"tensor {info.name!r} is listed twice")
        names.add(info.name)
        header.tensors.append(info)
    header.data_start = -(-cur.pos // alignment) * alignment
    return header
