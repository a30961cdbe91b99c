"""The safetensors dtype names: their bit width, the torch dtype they load as, and save_file's layout order."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SafetensorsDtype:
    name: str
    bits: int
    torch_dtype: torch.dtype | None  # None: no torch equivalent, loaded as raw uint8 bytes
    rank: int  # position in the safetensors Rust `Dtype` enum; save_file lays out higher ranks first


def _torch(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


# Listed in the order of the safetensors (Rust crate) `Dtype` enum, which is what save_file sorts by
# (descending, then by name). Order checked against safetensors 0.8.0's serializer for every dtype it accepts;
# F6_E2M3/F6_E3M2 follow the enum in safetensors/src/tensor.rs (the Python binding cannot write them).
_TABLE: list[tuple[str, int, torch.dtype | None]] = [
    ("BOOL", 8, torch.bool),
    ("F4", 4, None),
    ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None),
    ("U8", 8, torch.uint8),
    ("I8", 8, torch.int8),
    ("F8_E5M2", 8, torch.float8_e5m2),
    ("F8_E4M3", 8, torch.float8_e4m3fn),
    ("F8_E8M0", 8, _torch("float8_e8m0fnu")),
    ("F8_E4M3FNUZ", 8, _torch("float8_e4m3fnuz")),
    ("F8_E5M2FNUZ", 8, _torch("float8_e5m2fnuz")),
    ("I16", 16, torch.int16),
    ("U16", 16, _torch("uint16")),
    ("F16", 16, torch.float16),
    ("BF16", 16, torch.bfloat16),
    ("I32", 32, torch.int32),
    ("U32", 32, _torch("uint32")),
    ("F32", 32, torch.float32),
    ("C64", 64, torch.complex64),
    ("F64", 64, torch.float64),
    ("I64", 64, torch.int64),
    ("U64", 64, _torch("uint64")),
]

DTYPES: dict[str, SafetensorsDtype] = {
    name: SafetensorsDtype(name, bits, tdtype, rank) for rank, (name, bits, tdtype) in enumerate(_TABLE)
}
DTYPE_NAMES: dict[torch.dtype, str] = {d.torch_dtype: d.name for d in DTYPES.values() if d.torch_dtype is not None}


def byte_length(dtype: SafetensorsDtype, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this dtype and shape occupies; None when sub-byte elements do not fill whole bytes."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * dtype.bits
    return None if bits % 8 else bits // 8


def dtype_name(tensor_dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; KeyError for dtypes safetensors cannot store."""
    return DTYPE_NAMES[tensor_dtype]
