"""Open any checkpoint a ComfyUI user has: single or sharded safetensors, GGUF. Pickle formats are refused."""

from __future__ import annotations

from pathlib import Path

from inspect_tools.readers.base import CheckpointReader, TensorInfo


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open `path` lazily: a .safetensors file, a *.safetensors.index.json, a folder holding one, or a .gguf.
    Raises inspect_tools.errors.InputError (one clear message) for anything missing, malformed or unsafe."""
    raise NotImplementedError


__all__ = ["CheckpointReader", "TensorInfo", "open_checkpoint"]
