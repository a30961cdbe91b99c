"""Reading block scales for value rules: only scale tensors are read, never packed weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reference_specs.formats.nvfp4 import unswizzle
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

BLOCK_SCALE_DTYPES = ("F8_E4M3", "U8")


def load_block_scales(layer: Layer) -> torch.Tensor | None:
    """An NVFP4 layer's `.weight_scale` as float32 in its stored 2-D shape, or None when it cannot be one
    (absent, wrong dtype or rank: other rules report those)."""
    import torch

    if layer.dtype("weight_scale") not in BLOCK_SCALE_DTYPES or len(layer.shape("weight_scale") or ()) != 2:
        return None
    raw = layer.load("weight_scale")
    if raw.dtype == torch.uint8:
        raw = raw.view(torch.float8_e4m3fn)
    return raw.to(torch.float32)


def as_swizzled(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """The [rows, cols] logical scales when `stored` is in the cuBLAS 128x4 tile layout; None if it cannot be."""
    r, c = stored.shape
    if r % 128 or c % 4 or rows > r or cols > c:
        return None
    return unswizzle(stored)[:rows, :cols]


def as_linear(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """The [rows, cols] logical scales when `stored` is row-major (padded or not); None if it cannot be."""
    r, c = stored.shape
    if rows > r or cols > c:
        return None
    return stored[:rows, :cols]
