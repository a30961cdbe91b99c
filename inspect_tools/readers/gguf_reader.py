"""A .gguf file: header parsed by nvdiag (gguf_header.py, bounded), data memory-mapped, dequantized by gguf-py."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from inspect_tools.errors import InputError
from inspect_tools.readers.base import MAX_TENSORS, CheckpointReader, TensorInfo
from inspect_tools.readers.gguf_header import GGUFHeader, HeaderError, parse_header

if TYPE_CHECKING:
    import numpy as np
    import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
FIXED_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, key-value count
# Smallest possible on-disk records (GGUF spec): a tensor info is name length u64 + n_dims u32 + type u32 +
# offset u64 (24 bytes, empty name, 0 dims); a key-value is key length u64 + value type u32 + a 1-byte value.
MIN_TENSOR_INFO_BYTES = 24
MIN_KV_BYTES = 13
INT64_MAX = 2**63 - 1

# GGML types that load as plain torch tensors (by torch dtype name: torch is imported only to load values);
# everything else is returned as raw uint8 blocks.
PLAIN_TORCH_TYPES: dict[str, str] = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
}


def plain_torch_dtype(ggml_type: str) -> torch.dtype | None:
    """The torch dtype a plain GGML type loads as; None for quantized types."""
    name = PLAIN_TORCH_TYPES.get(ggml_type)
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _fail(path: Path, message: str) -> InputError:
    return InputError(f"invalid GGUF file: {message}", str(path))


def check_fixed_header(path: Path) -> None:
    """Magic, version and counts that the file size can hold, before gguf-py loops over them."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            raw = fh.read(FIXED_HEADER.size)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
    if len(raw) < 4 or raw[:4] != GGUF_MAGIC:
        raise _fail(path, f"bad magic {raw[:4]!r}, expected {GGUF_MAGIC!r}")
    if len(raw) < FIXED_HEADER.size:
        raise _fail(path, f"file is {size} bytes, too short for the GGUF header")
    _, version, n_tensors, n_kv = FIXED_HEADER.unpack(raw)
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise _fail(path, f"unsupported version {version}{hint}; versions 2 and 3 are read")
    needed = FIXED_HEADER.size + n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES
    if needed > size:
        raise _fail(path, f"header claims {n_tensors} tensors and {n_kv} key-values, "
                          f"impossible in a {size}-byte file")


def tensor_infos(path: Path, header: GGUFHeader, file_size: int) -> dict[str, TensorInfo]:
    """TensorInfo per tensor, shapes in safetensors order, each data range checked against the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    infos: dict[str, TensorInfo] = {}
    for raw in header.tensors:
        name = raw.name
        try:
            qtype = GGMLQuantizationType(raw.ggml_type)
        except ValueError:
            raise _fail(path, f"tensor {name!r} has unknown GGML type {raw.ggml_type}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        numel = 1
        for d in raw.dims:
            numel *= d
        if numel_overflows(raw.dims):
            raise _fail(path, f"tensor {name!r}: dimensions {list(raw.dims)[:8]} hold more elements than a "
                              "64-bit integer counts")
        if numel % block_size or (raw.dims and raw.dims[0] % block_size):
            raise _fail(path, f"tensor {name!r}: rows of {raw.dims[0] if raw.dims else 1} elements are not whole "
                              f"{qtype.name} blocks of {block_size}")
        nbytes = numel // block_size * type_size
        offset = header.data_start + raw.offset
        if offset + nbytes > file_size:
            raise _fail(path, f"tensor {name!r} data (offset {raw.offset}, {nbytes} bytes) runs past the end of "
                              f"the {file_size}-byte file (truncated?)")
        dims = tuple(reversed(raw.dims))  # GGUF stores the fastest dimension first
        infos[name] = TensorInfo(name, qtype.name, dims, nbytes, path, offset)
    return infos


def numel_overflows(dims: tuple[int, ...]) -> bool:
    product = 1
    for d in dims:
        if d:
            product *= d
    return product > INT64_MAX


def check_layout(path: Path, infos: dict[str, TensorInfo], data_start: int, alignment: int, file_size: int) -> None:
    """No overlap, and no data that no tensor uses. Writers (gguf-py, llama.cpp) put the tensors one after the
    other, each padded to the alignment, and llama.cpp refuses any other offset ("tensor ... has offset X, expected
    Y", ggml/src/gguf.cpp gguf_init_from_file_impl). Unused bytes beyond one padding mean the tensor table lost
    entries (a header listing fewer tensors than the file holds): refused like a truncated file, since the tensors
    that are listed are then read from the wrong place as well."""
    position = end = data_start  # the previous tensor's padded end, and its last byte + 1
    previous = None
    for info in sorted(infos.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset < end:
            raise _fail(path, f"tensor {info.name!r} overlaps the tensor before it ({previous!r})")
        if info.offset - position >= alignment:
            where = f"after tensor {previous!r}" if previous else "at the start of the data section"
            raise _fail(path, f"{info.offset - position} bytes {where} belong to no tensor: the header lists fewer "
                              "tensors than the file holds")
        end = info.offset + info.nbytes
        position = max(position, -(-end // alignment) * alignment)
        previous = info.name
    if file_size - position >= alignment:
        raise _fail(path, f"{file_size - position} bytes after the last tensor belong to no tensor: the header "
                          "lists fewer tensors than the file holds")


class GGUFFileReader(CheckpointReader):
    """A GGUF file. Tensor bytes are read from a read-only memory map, copied only when loaded."""

    def __init__(self, path: Path) -> None:
        check_fixed_header(path)
        try:
            with path.open("rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", str(path)) from None
        try:
            header = parse_header(self._map, MAX_TENSORS)
            tensors = tensor_infos(path, header, len(self._map))
            check_layout(path, tensors, header.data_start, header.alignment, len(self._map))
        except HeaderError as exc:
            self.close()
            raise _fail(path, str(exc)) from None
        except BaseException:
            self.close()
            raise
        super().__init__(path=path, kind="gguf", metadata=header.metadata, tensors=tensors)

    def _raw(self, name: str) -> np.ndarray:
        import numpy as np

        if name not in self.tensors:
            raise KeyError(f"{name!r} is not a tensor of {self.path}")
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset).copy()

    def _raw_tensor(self, name: str) -> torch.Tensor:
        """The stored bytes as a uint8 tensor that can be viewed as a wider dtype."""
        import torch

        raw = torch.from_numpy(self._raw(name))
        # an empty numpy buffer arrives with stride 0, which view() as a wider dtype refuses
        return raw if raw.numel() else torch.empty(0, dtype=torch.uint8)

    def load(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        raw = self._raw_tensor(name)
        plain = plain_torch_dtype(info.dtype)
        if plain is not None:
            return raw.view(plain).reshape(info.shape)
        if not info.shape or info.numel == 0:
            return raw
        rows = info.numel // info.shape[-1]
        return raw.reshape(*info.shape[:-1], info.nbytes // rows)  # one row of quant blocks per last dimension

    def load_float(self, name: str) -> torch.Tensor:
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors.get(name)
        plain = plain_torch_dtype(info.dtype)
        if plain is not None:
            return self._raw_tensor(name).view(plain).reshape(info.shape).to(torch.float32)
        if info.numel == 0:  # gguf-py's dequantize cannot reshape an empty array: there is nothing to decode
            return torch.zeros(info.shape, dtype=torch.float32)
        try:
            values = dequantize(self._raw(name), GGMLQuantizationType[info.dtype])
        except NotImplementedError:
            raise InputError(f"tensor {name!r}: gguf-py cannot dequantize {info.dtype}", str(self.path)) from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)

    def read_bytes(self, name: str) -> bytes:
        return self._raw(name).tobytes()

    def close(self) -> None:
        mapped = getattr(self, "_map", None)
        if mapped is not None:
            self._map = None
            try:
                mapped.close()
            except BufferError:  # a numpy view still exported: the map is released when that view goes
                pass
