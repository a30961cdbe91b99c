"""Registry of storage formats. Classification asks each registered format, in order, whether it claims a layer.

Order matters: specific quantized formats first, plain floats last. Register a new format by adding its class here.
"""

from __future__ import annotations

from typing import Any

from reference_specs.formats.base import Format, RoleSpec
from reference_specs.formats.nvfp4 import NVFP4
from reference_specs.layer import Layer

FORMATS: list[type[Format]] = [NVFP4]


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


def classify(layer: Layer, file_markers: dict[str, Any]) -> str:
    """The slug of the first registered format that claims `layer`, or "unknown"."""
    for fmt in FORMATS:
        if fmt.claims(layer, file_markers):
            return fmt.slug
    return "unknown"


__all__ = ["FORMATS", "Format", "RoleSpec", "by_comfy_format", "classify", "get", "register"]
