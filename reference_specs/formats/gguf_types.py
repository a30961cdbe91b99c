"""The tensor types of GGUF files (city96 ComfyUI-GGUF), one format per GGML type, slug = the GGML type name.

Facts: gguf-py (`gguf/quants.py`, `gguf/constants.py` GGML_QUANT_SIZES) defines each type's block size and bytes per
block and implements quantize/dequantize for most types (the K-quants and I-quants are dequantize-only there).
GGUF stores dimensions fastest-first (ne0 = in_features); gguf-py arrays and nvdiag's TensorInfo shapes are both
in safetensors order ([out, in]), and a quantized row is the last axis, so blocks run along in_features.
Raw data moves as uint8 bytes of shape [rows, bytes_per_row], the way readers return GGUF tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from reference_specs.formats.base import Format, RoleSpec
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

# Types that are plain numbers, handled with a numpy view (gguf-py only handles F32/F16 among them).
NUMPY_TYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
UNQUANTIZED = frozenset(NUMPY_TYPES) | {"BF16"}
MAIN_ROLES = ("weight", "value", "bias")
# Rough quantize->dequantize relative errors on Gaussian-like weights, for the loose default bound only.
TYPICAL_ERRORS = {"Q8_0": 0.008, "Q6_K": 0.015, "Q5_0": 0.05, "Q5_1": 0.045, "Q5_K": 0.02, "Q4_0": 0.1,
                  "Q4_1": 0.08, "Q4_K": 0.04, "Q3_K": 0.09, "Q2_K": 0.2, "BF16": 4e-3, "F16": 5e-4}


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Any stored tensor -> its raw bytes as a numpy uint8 array (no copy when already contiguous uint8)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.dtype != torch.uint8:
        t = t.reshape(-1).view(torch.uint8)
    return t.numpy().reshape(-1)


def rows_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if len(shape) > 1 else 1


class GGUFType(Format):
    """One GGML tensor type. quantize: float weight -> raw blocks (uint8 [rows, bytes_per_row]);
    dequantize: raw blocks -> float32 of the logical shape."""

    ggml_type: ClassVar[GGMLQuantizationType]

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if file_markers.get("container") != "gguf":
            return False
        role = next((r for r in MAIN_ROLES if layer.has(r)), next(iter(layer.tensors), None))
        return role is not None and layer.dtype(role) == cls.slug

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        role = next((r for r in MAIN_ROLES if layer.has(r)), None)
        return layer.shape(role) if role is not None else None

    @classmethod
    def byte_shape(cls, shape: tuple[int, ...]) -> tuple[int, int]:
        """[rows, bytes_per_row] of the raw data of a tensor of logical `shape`."""
        block_size, type_size = GGML_QUANT_SIZES[cls.ggml_type]
        row = shape[-1] if shape else 1
        if row % block_size:
            raise ValueError(f"{cls.slug}: a row of {row} values is not a multiple of the block size {block_size}")
        return rows_of(tuple(shape)), row // block_size * type_size

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        data = weight.detach().cpu().to(torch.float32).numpy()
        rows, row_bytes = self.byte_shape(tuple(data.shape))
        data = data.reshape(rows, data.shape[-1] if data.ndim else 1)
        if self.slug in NUMPY_TYPES:
            raw = np.ascontiguousarray(data.astype(NUMPY_TYPES[self.slug])).view(np.uint8)
        else:
            try:
                raw = gguf_quants.quantize(data, self.ggml_type)
            except NotImplementedError:
                raise NotImplementedError(f"gguf-py cannot quantize {self.slug} (dequantize only)") from None
            raw = np.ascontiguousarray(raw).view(np.uint8)
        return {"weight": torch.from_numpy(raw.reshape(rows, row_bytes).copy())}

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        stored = next((tensors[r] for r in MAIN_ROLES if r in tensors), None)
        if stored is None:
            stored = next(iter(tensors.values()))
        rows, row_bytes = self.byte_shape(tuple(shape))
        raw = as_bytes(stored)
        if raw.size != rows * row_bytes:
            raise ValueError(f"{self.slug}: {raw.size} bytes stored, shape {list(shape)} needs {rows * row_bytes}")
        raw = raw.reshape(rows, row_bytes)
        if self.slug in NUMPY_TYPES:
            values = raw.view(NUMPY_TYPES[self.slug]).astype(np.float32)
        else:
            values = gguf_quants.dequantize(raw, self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _gguf_format(qtype: GGMLQuantizationType) -> type[GGUFType]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return type(
        f"GGUF_{qtype.name}",
        (GGUFType,),
        {
            "__doc__": f"GGML {qtype.name}: {type_size} bytes per block of {block_size} values.",
            "slug": qtype.name,
            "ggml_type": qtype,
            "quantized": qtype.name not in UNQUANTIZED,
            "typical_rel_error": TYPICAL_ERRORS.get(qtype.name, 0.0 if qtype.name in UNQUANTIZED else 0.1),
            "signature": {"weight": RoleSpec((qtype.name,), description=f"GGML {qtype.name} blocks")},
        },
    )


# One class per GGML type gguf-py knows, so that a GGUF layer's slug is its type name (Q4_0, Q5_K, F16, ...).
GGUF_FORMATS: list[type[GGUFType]] = [
    _gguf_format(qtype) for qtype in GGMLQuantizationType if qtype in GGML_QUANT_SIZES
]
