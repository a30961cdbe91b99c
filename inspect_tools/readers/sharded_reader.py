"""A sharded checkpoint: `*.safetensors.index.json` whose `weight_map` maps each tensor name to a shard file."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from inspect_tools.errors import InputError
from inspect_tools.readers.base import MAX_TENSORS, CheckpointReader, TensorInfo, too_many_tensors
from inspect_tools.readers.safetensors_reader import SafetensorsReader
from inspect_tools.safety import check_input_file

if TYPE_CHECKING:
    import torch

# index.json files list names and shard files only; a few MB is already huge. Bounded so a hostile file cannot
# make us read gigabytes of JSON.
MAX_INDEX_BYTES = 64 * 1024 * 1024


def _fail(path: Path, message: str) -> InputError:
    return InputError(f"invalid index.json: {message}", str(path))


def read_index(path: Path) -> dict[str, Any]:
    """The parsed index object: JSON, an object, with a `weight_map` of str -> str and an optional metadata object."""
    check_input_file(path)
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise _fail(path, f"{size} bytes, larger than the {MAX_INDEX_BYTES}-byte limit")
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
    except UnicodeDecodeError:
        raise _fail(path, "not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(index, dict):
        raise _fail(path, f"top level is a JSON {type(index).__name__}, not an object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _fail(path, "no `weight_map` object")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise _fail(path, "`weight_map` values must be shard file names (strings)")
    metadata = index.get("metadata", {})
    if metadata is not None and not isinstance(metadata, dict):
        raise _fail(path, "`metadata` must be an object")
    return index


def resolve_shard(index_path: Path, shard: str) -> Path:
    """The shard file for a weight_map entry, which must stay inside the index's folder (symlinks included)."""
    if not shard or "\x00" in shard:
        raise _fail(index_path, f"empty or invalid shard path {shard!r}")
    for flavour in (PurePosixPath(shard), PureWindowsPath(shard)):
        if flavour.is_absolute() or flavour.drive or flavour.root:
            raise _fail(index_path, f"shard path {shard!r} is absolute; shards must sit beside the index")
        if ".." in flavour.parts:
            raise _fail(index_path, f"shard path {shard!r} leaves the index's folder")
    candidate = index_path.parent / shard
    try:
        folder = index_path.parent.resolve()
        resolved = candidate.resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError("Symlink loop ..."), later OSError ELOOP
        raise _fail(index_path, f"shard path {shard!r} is a symlink loop") from None
    if not resolved.is_relative_to(folder):
        raise _fail(index_path, f"shard path {shard!r} resolves to {resolved}, outside the index's folder")
    if not candidate.exists():
        raise _fail(index_path, f"shard {shard!r} does not exist")
    return candidate


class ShardedReader(CheckpointReader):
    """Every shard of an index.json opened as a SafetensorsReader; tensors merged under one namespace."""

    def __init__(self, index_path: Path) -> None:
        index = read_index(index_path)
        weight_map: dict[str, str] = index["weight_map"]
        if len(weight_map) > MAX_TENSORS:
            raise _fail(index_path, f"weight_map {too_many_tensors(len(weight_map))}")
        self._shards: dict[Path, SafetensorsReader] = {}
        self._owner: dict[str, SafetensorsReader] = {}
        try:
            # resolved once per shard file, not per tensor: a weight_map lists every tensor of a huge model
            resolved = {shard: resolve_shard(index_path, shard) for shard in dict.fromkeys(weight_map.values())}
            shard_paths = {name: resolved[shard] for name, shard in weight_map.items()}
            for shard_path in dict.fromkeys(shard_paths.values()):
                check_input_file(shard_path)
                self._shards[shard_path] = SafetensorsReader(shard_path)
            tensors = self._merge(index_path)
            self._check_weight_map(index_path, shard_paths)
        except BaseException:
            self.close()
            raise
        metadata: dict[str, Any] = {}
        for reader in self._shards.values():
            metadata.update(reader.metadata)
        metadata.update(index.get("metadata") or {})  # the index describes the whole checkpoint: it wins
        super().__init__(path=index_path, kind="sharded", metadata=metadata, tensors=tensors)

    def _merge(self, index_path: Path) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        total = sum(len(reader.tensors) for reader in self._shards.values())
        if total > MAX_TENSORS:
            raise _fail(index_path, f"the shards together {too_many_tensors(total)}")
        for reader in self._shards.values():
            for info in reader:
                if info.name in tensors:
                    raise _fail(index_path, f"tensor {info.name!r} is in two shards: "
                                            f"{tensors[info.name].file.name} and {info.file.name}")
                tensors[info.name] = info
                self._owner[info.name] = reader
        return tensors

    def _check_weight_map(self, index_path: Path, shard_paths: dict[str, Path]) -> None:
        for name, shard_path in shard_paths.items():
            if name not in self._shards[shard_path]:
                raise _fail(index_path, f"tensor {name!r} is not in its shard {shard_path.name}")

    def _reader(self, name: str) -> SafetensorsReader:
        try:
            return self._owner[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    def load(self, name: str) -> torch.Tensor:
        return self._reader(name).load(name)

    def load_float(self, name: str) -> torch.Tensor:
        return self._reader(name).load_float(name)

    def read_into(self, name: str, view: memoryview, start: int = 0) -> None:
        self._reader(name).read_into(name, view, start)

    def read_rows(self, name: str, start: int, stop: int, as_float: bool = False) -> torch.Tensor:
        return self._reader(name).read_rows(name, start, stop, as_float)

    def offer(self, name: str, tensor: torch.Tensor) -> bool:
        return name in self._owner and self._owner[name].offer(name, tensor)

    def forget(self, name: str) -> None:
        if name in self._owner:
            self._owner[name].forget(name)

    def read_bytes(self, name: str) -> bytes:
        return self._reader(name).read_bytes(name)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()
