"""Registry of storage formats. Classification asks each registered format, in order, whether it claims a layer.

Order matters: specific quantized formats first, plain floats last. Register a new format by adding its class here.
"""

from __future__ import annotations

from typing import Any

from reference_specs.formats.base import Format, RoleSpec
from reference_specs.formats.compressed_tensors import NVFP4CompressedTensors
from reference_specs.formats.fp8 import FP8E4M3, FP8E5M2
from reference_specs.formats.gguf_types import GGUF_FORMATS
from reference_specs.formats.nvfp4 import NVFP4
from reference_specs.formats.plain import PLAIN_FORMATS
from reference_specs.formats.scaled_fp8 import ScaledFP8
from reference_specs.layer import Layer

# Claim order: GGUF types first (only they claim inside a GGUF file), then the quantized safetensors formats, most
# specific first (a comfy_quant marker beats a guess from dtypes), plain floats last.
FORMATS: list[type[Format]] = [
    *GGUF_FORMATS,
    NVFP4,
    NVFP4CompressedTensors,
    FP8E4M3,
    FP8E5M2,
    ScaledFP8,
    *PLAIN_FORMATS,
]


def register(fmt: type[Format]) -> type[Format]:
    if fmt not in FORMATS:
        FORMATS.append(fmt)
    return fmt


def get(slug: str) -> type[Format]:
    for fmt in FORMATS:
        if fmt.slug == slug:
            return fmt
    raise KeyError(f"unknown format {slug!r}; known: {', '.join(f.slug for f in FORMATS)}")


def by_comfy_format(name: str) -> type[Format] | None:
    return next((f for f in FORMATS if f.comfy_format == name), None)


def is_quantized(slug: str) -> bool:
    """Whether a format slug stores a lossy encoding; "unknown" and unregistered slugs count as not quantized."""
    fmt = next((f for f in FORMATS if f.slug == slug), None)
    return fmt is not None and fmt.quantized


def classify(layer: Layer, file_markers: dict[str, Any] | None = None) -> str:
    """The slug of the first registered format that claims `layer`, or "unknown".

    A claim that fails on a malformed layer (odd shapes, missing metadata) is treated as "not this format" so that
    one strange layer never stops the classification of a whole file.
    """
    markers = file_markers or {}
    for fmt in FORMATS:
        try:
            claimed = fmt.claims(layer, markers)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            claimed = False
        if claimed:
            return fmt.slug
    return "unknown"


__all__ = ["FORMATS", "Format", "RoleSpec", "by_comfy_format", "classify", "get", "is_quantized", "register"]
