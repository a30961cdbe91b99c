"""The safetensors dtype names: their bit width, the torch dtype they load as, and save_file's layout order."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SafetensorsDtype:
    name: str
    bits: int
    torch_name: str | None  # attribute of the torch module; None: no torch equivalent, loaded as raw uint8 bytes
    rank: int  # position in the safetensors Rust `Dtype` enum; save_file lays out higher ranks first

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype it loads as (None when this torch build has none). Resolved here, not in the table,
        so that parsing headers never imports torch."""
        if self.torch_name is None:
            return None
        import torch

        return getattr(torch, self.torch_name, None)


# Listed in the order of the safetensors (Rust crate) `Dtype` enum, which is what save_file sorts by
# (descending, then by name). Order checked against safetensors 0.8.0's serializer for every dtype it accepts;
# F6_E2M3/F6_E3M2 follow the enum in safetensors/src/tensor.rs (the Python binding cannot write them).
_TABLE: list[tuple[str, int, str | None]] = [
    ("BOOL", 8, "bool"),
    ("F4", 4, None),
    ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None),
    ("U8", 8, "uint8"),
    ("I8", 8, "int8"),
    ("F8_E5M2", 8, "float8_e5m2"),
    ("F8_E4M3", 8, "float8_e4m3fn"),
    ("F8_E8M0", 8, "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
    ("I16", 16, "int16"),
    ("U16", 16, "uint16"),
    ("F16", 16, "float16"),
    ("BF16", 16, "bfloat16"),
    ("I32", 32, "int32"),
    ("U32", 32, "uint32"),
    ("F32", 32, "float32"),
    ("C64", 64, "complex64"),
    ("F64", 64, "float64"),
    ("I64", 64, "int64"),
    ("U64", 64, "uint64"),
]

DTYPES: dict[str, SafetensorsDtype] = {
    name: SafetensorsDtype(name, bits, torch_name, rank) for rank, (name, bits, torch_name) in enumerate(_TABLE)
}


@cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {d.torch_dtype: d.name for d in DTYPES.values() if d.torch_dtype is not None}


def __getattr__(name: str) -> Any:
    # PEP 562: DTYPE_NAMES is keyed by torch dtypes, so it is built (and torch imported) on first use only
    if name == "DTYPE_NAMES":
        return _dtype_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def byte_length(dtype: SafetensorsDtype, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this dtype and shape occupies; None when sub-byte elements do not fill whole bytes."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * dtype.bits
    return None if bits % 8 else bits // 8


def dtype_name(tensor_dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; KeyError for dtypes safetensors cannot store."""
    return _dtype_names()[tensor_dtype]
