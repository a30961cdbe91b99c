"""Registry of storage formats. Classification asks each registered format, in order, whether it claims a layer.

Order matters: specific quantized formats first, plain floats last. Register a new format by adding its class here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reference_specs.formats.awq import AWQW4A16, AutoAWQ
from reference_specs.formats.base import Format, RoleSpec
from reference_specs.formats.compressed_tensors import NVFP4CompressedTensors
from reference_specs.formats.convrot import ConvRotW4A4
from reference_specs.formats.fp8 import FP8E4M3, FP8E5M2
from reference_specs.formats.int8 import AsymW4A8, INT8Tensorwise
from reference_specs.formats.lightx2v import NVFP4LightX2V
from reference_specs.formats.modelopt import NVFP4ModelOpt
from reference_specs.formats.moe_experts import MoEExperts
from reference_specs.formats.mxfp8 import MXFP8
from reference_specs.formats.nvfp4 import NVFP4
from reference_specs.formats.plain import PLAIN_FORMATS
from reference_specs.formats.scaled_fp8 import ScaledFP8
from reference_specs.formats.svdquant import AWQNunchaku, SVDQuantInt4, SVDQuantNVFP4
from reference_specs.layer import Layer, register_roles

UNKNOWN = "unknown"

# Claim order: GGUF types first (only they claim inside a GGUF file), then the quantized safetensors formats, most
# specific first (a comfy_quant marker beats a guess from dtypes), plain floats last.
# The GGUF types are built from gguf-py's type table, whose import (~0.1 s) only GGUF work should pay: they join the
# front of the registry the first time a GGUF layer is classified or a slug is not found without them.
# `FORMATS` (module attribute) is always the complete list.
_formats: list[type[Format]] = [
    # recognised, not decoded (formats/recognized.py): an expert bank's marker carries num_experts whatever its
    # inner format, so it goes first; the others claim by their marker or by tensors no other format has
    MoEExperts,
    SVDQuantNVFP4,
    SVDQuantInt4,
    AWQNunchaku,
    AutoAWQ,
    MXFP8,
    INT8Tensorwise,
    ConvRotW4A4,
    AWQW4A16,
    AsymW4A8,
    NVFP4LightX2V,  # before NVFP4, whose unmarked claim (U8 weight + block scales) it narrows
    NVFP4ModelOpt,  # likewise, for an unmarked layer whose config.json says ModelOpt
    NVFP4,
    NVFP4CompressedTensors,
    FP8E4M3,
    FP8E5M2,
    ScaledFP8,
    *PLAIN_FORMATS,
]
_gguf_loaded = False
for _fmt in _formats:
    register_roles(list(_fmt.signature))
_slug_index: dict[tuple[int, int], dict[str, type[Format]]] = {}  # (id, length) of _formats -> slug -> format


def _all_formats() -> list[type[Format]]:
    global _formats, _gguf_loaded
    if not _gguf_loaded:
        from reference_specs.formats.gguf_types import GGUF_FORMATS

        # a new list, not an insertion: a thread iterating the old one is not disturbed
        _formats = [*GGUF_FORMATS, *(f for f in _formats if f not in GGUF_FORMATS)]
        _gguf_loaded = True
    return _formats


def __getattr__(name: str) -> Any:
    if name == "FORMATS":
        return _all_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _find(match: Callable[[type[Format]], bool]) -> type[Format] | None:
    """The first registered format that `match`es, looking into the GGUF types only when no other one does."""
    found = next((f for f in _formats if match(f)), None)
    if found is None and not _gguf_loaded:
        found = next((f for f in _all_formats() if match(f)), None)
    return found


def register(fmt: type[Format]) -> type[Format]:
    if fmt not in _formats:
        _formats.append(fmt)
        register_roles(list(fmt.signature))
    return fmt


def _by_slug(slug: str) -> type[Format] | None:
    """The format of a slug: a dict lookup, since every layer of a file asks (200k layers made the linear search
    of the registry seconds)."""
    key = (id(_formats), len(_formats))  # the registry is replaced (GGUF types joining) or appended to
    index = _slug_index.get(key)
    if index is None:
        _slug_index.clear()
        index = _slug_index[key] = {}
        for f in _formats:
            index.setdefault(f.slug, f)
    found = index.get(slug)
    if found is None and not _gguf_loaded:
        found = _find(lambda f: f.slug == slug)
    return found


def get(slug: str) -> type[Format]:
    fmt = _by_slug(slug)
    if fmt is None:
        raise KeyError(f"unknown format {slug!r}; known: {', '.join(f.slug for f in _all_formats())}")
    return fmt


def by_comfy_format(name: str) -> type[Format] | None:
    return _find(lambda f: f.comfy_format == name)


def marked_formats() -> list[type[Format]]:
    """The formats ComfyUI selects through a comfy_quant "format" (registry order; GGUF types have none)."""
    return [f for f in _formats if f.comfy_format is not None]


def marker_proven(weight_dtype: str, roles: set[str], weight_shape: tuple[int, ...],
                  scale_shape: tuple[int, ...] | None) -> dict[str, Any] | None:
    """The comfy_quant conf of the one format a layer's header proves (Format.proves_marker), or None."""
    for fmt in marked_formats():
        if fmt.proves_marker(weight_dtype, roles, weight_shape, scale_shape):
            return fmt.marker_conf()
    return None


def compute_paths() -> dict[str, tuple[str, str]]:
    """comfy_quant format -> (compute path with quantized activations, with full_precision_matrix_mult), for the
    formats whose Blackwell kernels are known (Format.compute_paths)."""
    return {f.comfy_format: f.compute_paths for f in marked_formats() if f.compute_paths and f.comfy_format}


def is_quantized(slug: str) -> bool:
    """Whether a format slug stores a lossy encoding; "unknown" and unregistered slugs count as not quantized."""
    fmt = None if slug == UNKNOWN else _by_slug(slug)
    return fmt is not None and fmt.quantized


def classify(layer: Layer, file_markers: dict[str, Any] | None = None) -> str:
    """The slug of the first registered format that claims `layer`, or "unknown".

    A claim that fails on a malformed layer (odd shapes, missing metadata) is treated as "not this format" so that
    one strange layer never stops the classification of a whole file.
    """
    markers = file_markers or {}
    candidates = _all_formats() if markers.get("container") == "gguf" else _formats
    for fmt in candidates:
        try:
            claimed = fmt.claims(layer, markers)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            claimed = False
        if claimed:
            return fmt.slug
    return UNKNOWN


__all__ = ["FORMATS", "Format", "RoleSpec", "by_comfy_format", "classify", "compute_paths", "get", "is_quantized",
           "marked_formats", "marker_proven", "register"]
