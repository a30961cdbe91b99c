"""Open any checkpoint a ComfyUI user has: single or sharded safetensors, GGUF. Pickle formats are refused."""

from __future__ import annotations

from pathlib import Path

from inspect_tools.errors import InputError
from inspect_tools.readers.base import CheckpointReader, TensorInfo
from inspect_tools.readers.gguf_reader import GGUF_MAGIC, GGUFFileReader
from inspect_tools.readers.safetensors_reader import SafetensorsReader
from inspect_tools.readers.sharded_reader import ShardedReader
from inspect_tools.safety import check_input_file, require_existing

INDEX_SUFFIX = ".index.json"


def find_in_folder(folder: Path) -> Path:
    """The checkpoint a folder stands for: its only *.index.json, else its only *.safetensors file."""
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise InputError(f"cannot list folder: {exc.strerror or exc}", str(folder)) from None
    indexes = [p for p in entries if p.name.endswith(INDEX_SUFFIX)]
    singles = [p for p in entries if p.suffix == ".safetensors"]
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise InputError(f"folder holds {len(indexes)} index.json files ({_listing(indexes)}); name one of them",
                         str(folder))
    if len(singles) == 1:
        return singles[0]
    if len(singles) > 1:
        raise InputError(f"folder holds {len(singles)} .safetensors files and no index.json ({_listing(singles)}); "
                         "name one of them", str(folder))
    found = _listing(entries) if entries else "nothing"
    subfolders = [name for name in ("transformer", "transformer_2") if (folder / name).is_dir()]
    if subfolders:  # a diffusers pipeline folder: its diffusion model lives in transformer/ (+ transformer_2/)
        raise InputError(f"a diffusers model folder: name its {'/ or '.join(subfolders)}/ (nvdiag convert takes the "
                         "whole folder and converts each transformer)", str(folder))
    raise InputError(f"folder holds no *.index.json and no .safetensors file (found: {found})", str(folder))


def _listing(paths: list[Path], limit: int = 6) -> str:
    names = [p.name for p in paths[:limit]]
    return ", ".join(names) + (f", ... {len(paths) - limit} more" if len(paths) > limit else "")


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open `path` lazily: a .safetensors file, a *.safetensors.index.json, a folder holding one, or a .gguf.
    Raises inspect_tools.errors.InputError (one clear message) for anything missing, malformed or unsafe."""
    path = Path(path)
    require_existing(path)
    if path.is_dir():
        path = find_in_folder(path)
    head = check_input_file(path)  # missing, empty, folder, pickle: refused before parsing
    name = path.name.lower()
    if name.endswith(".json"):
        return ShardedReader(path)
    if path.suffix.lower() == ".gguf" or head.startswith(GGUF_MAGIC):
        return GGUFFileReader(path)
    if path.suffix.lower() == ".safetensors" or head[8:9] == b"{":
        return SafetensorsReader(path)
    raise InputError("not a checkpoint nvdiag can read (expected .safetensors, *.safetensors.index.json or .gguf)",
                     str(path))


__all__ = ["CheckpointReader", "TensorInfo", "open_checkpoint", "find_in_folder"]
