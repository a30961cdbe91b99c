"""A single .safetensors file: header parsed and validated up front, tensor bytes read on demand with pread."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inspect_tools.errors import InputError
from inspect_tools.readers.base import (
    MAX_TENSORS,
    CheckpointReader,
    TensorInfo,
    read_range,
    row_span,
    too_many_tensors,
)
from inspect_tools.readers.safetensors_dtypes import DTYPES, byte_length

if TYPE_CHECKING:
    import torch

# The safetensors library refuses headers above 100 MB (MAX_HEADER_SIZE in safetensors/src/tensor.rs); so do we,
# which also bounds the memory a hostile header length can make us allocate.
MAX_HEADER_BYTES = 100_000_000
HEADER_LEN_BYTES = 8
INT64_MAX = 2**63 - 1
METADATA_KEY = "__metadata__"


def _fail(path: Path, message: str) -> InputError:
    return InputError(f"invalid safetensors file: {message}", str(path))


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook that refuses duplicate keys (json.loads would silently keep the last one)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: only then look for the culprit (one C-speed dict() per object otherwise)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header_bytes(path: Path, fh: Any, file_size: int) -> bytes:
    """The raw JSON header, after checking its declared length against the file and the 100 MB bound."""
    if file_size < HEADER_LEN_BYTES:
        raise _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", fh.read(HEADER_LEN_BYTES))
    if length > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if HEADER_LEN_BYTES + length > file_size:
        raise _fail(path, f"header length {length} runs past the end of the {file_size}-byte file")
    raw = fh.read(length)
    if len(raw) != length:
        raise _fail(path, "file shrank while reading the header")
    return raw


def decode_header(path: Path, raw: bytes) -> dict[str, Any]:
    # counted before parsing: every tensor entry has a "data_offsets" key, and json.loads of a header of a million
    # entries alone costs a gigabyte
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise _fail(path, f"header {too_many_tensors(entries)}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
    except UnicodeDecodeError:
        raise _fail(path, "header is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")
    return header


def parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(path, f"{METADATA_KEY} must be an object of string values")
    return dict(value)


def _numel_overflows(shape: list[int]) -> bool:
    """Whether the product of the nonzero dimensions exceeds int64: a [0, 2**62, 2**62] tensor holds no bytes, yet
    torch's stride arithmetic, C consumers and any reshape overflow on it."""
    product = 1
    for dim in shape:
        if dim:
            product *= dim
            if product > INT64_MAX:
                return True
    return False


def _short_shape(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry -> TensorInfo with an absolute offset; checks dtype, shape and byte length."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {name!r} entry must have exactly dtype, shape and data_offsets")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {str(dtype_name)[:40]!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(path, f"tensor {name!r} shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _fail(path, f"tensor {name!r} data_offsets must be two non-negative integers")
    if _numel_overflows(shape):
        raise _fail(path, f"tensor {name!r} shape {_short_shape(shape)}: the element count (zero dimensions "
                          "left out) does not fit a 64-bit integer")
    begin, end = offsets
    if end < begin:
        raise _fail(path, f"tensor {name!r} data_offsets [{begin}, {end}] end before they begin")
    expected = byte_length(DTYPES[dtype_name], tuple(shape))
    if expected is None:
        raise _fail(path, f"tensor {name!r}: {dtype_name} shape {shape} does not fill whole bytes")
    if expected != end - begin:
        raise _fail(path, f"tensor {name!r}: {dtype_name} shape {shape} needs {expected} bytes, "
                          f"data_offsets hold {end - begin}")
    return TensorInfo(name, dtype_name, tuple(shape), end - begin, path, data_start + begin)


def check_layout(path: Path, tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    """The data section must be covered exactly: no overlap, no gap, nothing past or after the end.

    Same rule as the safetensors library (Metadata::validate), so what we accept ComfyUI can also load."""
    position = data_start
    for info in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if info.offset < position:
            raise _fail(path, f"tensor {info.name!r} overlaps the tensor before it")
        if info.offset > position:
            raise _fail(path, f"{info.offset - position} unused bytes before tensor {info.name!r}")
        position = info.offset + info.nbytes
        if position > file_size:
            raise _fail(path, f"tensor {info.name!r} data runs past the end of the file (truncated?)")
    if position != file_size:
        raise _fail(path, f"{file_size - position} bytes after the last tensor")


def parse_safetensors(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Read and validate the header of `path`; InputError (naming the file) on any violation."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as fh:
            raw = read_header_bytes(path, fh, file_size)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
    header = decode_header(path, raw)
    data_start = HEADER_LEN_BYTES + len(raw)
    metadata = parse_metadata(path, header.pop(METADATA_KEY, None))
    tensors = [parse_entry(path, name, entry, data_start) for name, entry in header.items()]
    check_layout(path, tensors, data_start, file_size)
    return metadata, {t.name: t for t in tensors}


def bytes_to_tensor(buf: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw little-endian bytes -> tensor of the safetensors dtype; sub-byte and unknown-to-torch dtypes stay uint8."""
    import torch

    target = DTYPES[dtype].torch_dtype
    if not buf:
        return torch.empty(shape if target is not None else (0,), dtype=target or torch.uint8)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    if target is None:
        return raw
    return raw.view(target).reshape(shape)


class SafetensorsReader(CheckpointReader):
    """One .safetensors file; the file is opened read-only and kept open until close()."""

    def __init__(self, path: Path) -> None:
        metadata, tensors = parse_safetensors(path)
        super().__init__(path=path, kind="safetensors", metadata=dict(metadata), tensors=tensors)
        self._fh: Any = None
        self._fh_lock = threading.Lock()  # the gate reads rows from the writer thread while the reader thread loads
        self._offered: dict[str, torch.Tensor] = {}  # read ahead, handed out once by load()

    def _handle(self) -> Any:
        with self._fh_lock:
            if self._fh is None:
                try:
                    self._fh = self.path.open("rb")
                except OSError as exc:
                    raise InputError(f"cannot read: {exc.strerror or exc}", str(self.path)) from None
            return self._fh

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    def load(self, name: str) -> torch.Tensor:
        info = self._info(name)
        if (ahead := self._offered.pop(name, None)) is not None:
            return ahead
        buf = bytearray(info.nbytes)  # memory bounded by the tensor
        self.read_into(name, memoryview(buf))
        return bytes_to_tensor(buf, info.dtype, info.shape)

    def read_into(self, name: str, view: memoryview, start: int = 0) -> None:
        read_range(self._handle().fileno(), self._info(name), view, start)

    def read_rows(self, name: str, start: int, stop: int, as_float: bool = False) -> torch.Tensor:
        import torch

        info = self._info(name)
        target = DTYPES[info.dtype].torch_dtype
        if target is None or not info.shape:  # sub-byte and 0-d tensors: whole, then sliced
            return super().read_rows(name, start, stop, as_float)
        start, stop = row_span(info, start, stop)
        row_bytes = info.nbytes // max(1, info.shape[0])
        out = torch.empty((stop - start, *info.shape[1:]), dtype=target)
        self.read_into(name, memoryview(out.view(torch.uint8).reshape(-1).numpy()), start * row_bytes)
        return out.to(torch.float32) if as_float else out

    def offer(self, name: str, tensor: torch.Tensor) -> bool:
        info = self._info(name)
        if tuple(tensor.shape) != tuple(info.shape) or DTYPES[info.dtype].torch_dtype != tensor.dtype:
            return False
        self._offered[name] = tensor
        return True

    def forget(self, name: str) -> None:
        self._offered.pop(name, None)

    def read_bytes(self, name: str) -> bytes:
        buf = bytearray(self._info(name).nbytes)
        self.read_into(name, memoryview(buf))
        return bytes(buf)

    def load_float(self, name: str) -> torch.Tensor:
        import torch

        info = self._info(name)
        if DTYPES[info.dtype].torch_dtype is None or info.dtype == "C64":
            raise InputError(f"tensor {name!r} is {info.dtype}, which has no float32 form", str(self.path))
        return self.load(name).to(torch.float32)

    def close(self) -> None:
        self._offered.clear()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
