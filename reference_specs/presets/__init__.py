"""The built-in presets of `nvdiag convert`, as data: one TOML file per preset beside this module (package data,
installed with the wheel). converter/preset.py parses and validates them like any user preset; here they are only
listed and read.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

SUFFIX = ".toml"


def _folder() -> Traversable:
    return resources.files(__name__)


def names() -> list[str]:
    """The built-in preset names, sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().iterdir() if p.name.endswith(SUFFIX))


def read(name: str) -> bytes | None:
    """The TOML bytes of built-in preset `name`, None when there is no such preset."""
    path = _folder() / f"{name}{SUFFIX}"
    return path.read_bytes() if path.is_file() else None
