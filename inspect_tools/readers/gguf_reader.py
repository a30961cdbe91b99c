"""A .gguf file, parsed by gguf-py after our own checks of the fixed header, so hostile counts never reach it."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inspect_tools.errors import InputError
from inspect_tools.readers.base import CheckpointReader, TensorInfo

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
# Arrays longer than this (tokenizer vocabularies, merges) are summarized instead of copied into metadata.
MAX_METADATA_ARRAY = 64

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


def plain_value(field: Any) -> Any:
    """A gguf-py ReaderField -> str / int / float / bool / list; long arrays become a one-line summary."""
    from gguf import GGUFValueType

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        length = len(field.data)
        if length > MAX_METADATA_ARRAY:
            return f"<array of {length} {types[-1].name.lower()}>"
        return field.contents()
    return field.contents()


def read_metadata(reader: Any) -> dict[str, Any]:
    # gguf-py adds GGUF.version / GGUF.tensor_count / GGUF.kv_count pseudo-fields; they are not key-values.
    return {name: plain_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def tensor_infos(path: Path, reader: Any, file_size: int) -> dict[str, TensorInfo]:
    """TensorInfo per tensor, shapes in safetensors order, each data range checked against the file."""
    from gguf import GGML_QUANT_SIZES

    infos: dict[str, TensorInfo] = {}
    for tensor in reader.tensors:
        dims = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF stores the fastest dimension first
        block_size, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        numel = 1
        for d in dims:
            numel *= d
        if numel % block_size:
            raise _fail(path, f"tensor {tensor.name!r}: {numel} elements is not a whole number of "
                              f"{tensor.tensor_type.name} blocks")
        nbytes = numel // block_size * type_size
        offset = int(tensor.data_offset)
        if offset + nbytes > file_size:
            raise _fail(path, f"tensor {tensor.name!r} data runs past the end of the file (truncated?)")
        infos[tensor.name] = TensorInfo(tensor.name, tensor.tensor_type.name, dims, nbytes, path, offset)
    return infos


def check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    end = 0
    for info in sorted(infos.values(), key=lambda t: t.offset):
        if info.offset < end:
            raise _fail(path, f"tensor {info.name!r} overlaps the tensor before it")
        end = info.offset + info.nbytes


class GGUFFileReader(CheckpointReader):
    """A GGUF file. Tensor bytes are views into gguf-py's read-only memory map, copied only when loaded."""

    def __init__(self, path: Path) -> None:
        check_fixed_header(path)
        try:
            from gguf import GGUFReader

            self._gguf = GGUFReader(path, "r")
            file_size = path.stat().st_size
            tensors = tensor_infos(path, self._gguf, file_size)
            check_no_overlap(path, tensors)
            metadata = read_metadata(self._gguf)
        except InputError:
            raise
        except Exception as exc:  # gguf-py raises ValueError, KeyError, IndexError... on malformed files
            detail = str(exc).splitlines()[0][:160] if str(exc) else "no detail"
            raise _fail(path, f"truncated or corrupt ({type(exc).__name__} from gguf-py: {detail})") from None
        super().__init__(path=path, kind="gguf", metadata=metadata, tensors=tensors)

    def _raw(self, name: str) -> np.ndarray:
        import numpy as np

        if name not in self.tensors:
            raise KeyError(f"{name!r} is not a tensor of {self.path}")
        info = self.tensors[name]
        return np.array(self._gguf.data[info.offset:info.offset + info.nbytes], dtype=np.uint8, copy=True)

    def load(self, name: str) -> torch.Tensor:
        import torch

        info = self.tensors.get(name)
        raw = torch.from_numpy(self._raw(name))
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
        raw = self._raw(name)
        plain = plain_torch_dtype(info.dtype)
        if plain is not None:
            return torch.from_numpy(raw).view(plain).reshape(info.shape).to(torch.float32)
        try:
            values = dequantize(raw, GGMLQuantizationType[info.dtype])
        except NotImplementedError:
            raise InputError(f"tensor {name!r}: gguf-py cannot dequantize {info.dtype}", str(self.path)) from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)

    def read_bytes(self, name: str) -> bytes:
        return self._raw(name).tobytes()

    def close(self) -> None:
        gguf = getattr(self, "_gguf", None)
        if gguf is not None:
            # Dropping the memory map is what releases the file; gguf-py has no close().
            self._gguf = None
