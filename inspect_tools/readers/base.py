"""One lazy interface over every checkpoint container: safetensors (single or sharded) and GGUF."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inspect_tools.errors import InputError

if TYPE_CHECKING:
    import torch


# Tensors one checkpoint (a file, or all shards of an index) may hold. Real checkpoints hold far fewer: diffusion
# models 1-3k, the largest LLM index we know (DeepSeek-V3, 671B) about 91k. Past this, header work would take
# minutes and gigabytes for a file that is almost certainly hostile or broken; refused with one line instead.
MAX_TENSORS = 300_000


def too_many_tensors(count: int) -> str:
    """The refusal message for a checkpoint of `count` tensors (> MAX_TENSORS)."""
    return f"holds {count} tensors, more than the {MAX_TENSORS} nvdiag reads (real checkpoints hold a few thousand)"


def fill(fd: int, view: memoryview, offset: int) -> int:
    """Read from `offset` of descriptor `fd` into the flat byte buffer `view` until it is full or the file ends;
    the count of bytes read. The one pread loop of every reader: preadv keeps no seek state (threads may share a
    descriptor), releases the GIL, and reads straight into the caller's buffer (no copy)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def truncated(path: Path) -> InputError:
    """A file that ended before the bytes its header places in it (changed or truncated while open)."""
    return InputError("file is shorter than its header says (changed or truncated while open)", str(path))


def read_range(fd: int, info: TensorInfo, view: memoryview, start: int = 0) -> None:
    """Bytes [start, start + len(view)) of tensor `info`, as stored, into the flat byte buffer `view`, from `fd` (a
    descriptor of info.file). The range must lie within the tensor; the tensor's place in the file was checked when
    the header was parsed, so no read strays outside the data the header declares, whatever the file says."""
    if start < 0 or start + len(view) > info.nbytes:
        raise ValueError(f"bytes [{start}, {start + len(view)}) lie outside tensor {info.name!r} "
                         f"({info.nbytes} bytes)")
    if fill(fd, view, info.offset + start) < len(view):
        raise truncated(info.file)


def row_span(info: TensorInfo, start: int, stop: int) -> tuple[int, int]:
    """Rows [start, stop) of `info` clamped to the rows it has, as a slice would be; a negative start (which a slice
    would count from the end) is refused."""
    if start < 0:
        raise ValueError(f"row {start} of tensor {info.name!r}: rows start at 0")
    stop = min(stop, info.shape[0] if info.shape else 0)
    return min(start, stop), stop


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; no tensor bytes are read to build it.

    dtype: the container's own type name: safetensors names ("F32", "BF16", "U8", "F8_E4M3", ...) for
    safetensors files, GGML type names ("F32", "F16", "Q4_0", "Q5_K", ...) for GGUF files.
    shape: the logical shape in safetensors order ([out, in] for a Linear weight); GGUF shapes are reversed
    from their on-disk order so both containers agree.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int  # absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointReader(ABC):
    """A checkpoint opened for lazy reading. Header parsed and validated once; tensor bytes on demand."""

    path: Path
    kind: str = ""  # "safetensors" | "sharded" | "gguf"
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """Every file this checkpoint reads from (shards included): used to refuse overwriting an input."""
        return sorted({t.file for t in self.tensors.values()} | {self.path})

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """The tensor as stored: safetensors dtype preserved (F8_E4M3 -> torch.float8_e4m3fn, U8 -> uint8);
        GGUF quantized types come back as their raw uint8 blocks."""

    @abstractmethod
    def load_float(self, name: str) -> torch.Tensor:
        """The tensor as float32 in its logical shape; GGUF quantized types are dequantized through gguf-py.
        Does not interpret nvdiag formats (NVFP4 etc.): that is reference_specs.formats' job."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """The tensor's stored bytes, as they are in the file. For tiny tensors read without torch (comfy_quant
        markers while a model is built from headers)."""

    def read_into(self, name: str, view: memoryview, start: int = 0) -> None:
        """Bytes [start, start + len(view)) of tensor `name`, as stored, into the caller's flat byte buffer `view`
        (no copy beyond the read itself). Only containers that store tensors as plain arrays (safetensors) have
        byte ranges to read; the others raise NotImplementedError."""
        raise NotImplementedError(f"{self.kind} tensors have no byte ranges to read")

    def read_rows(self, name: str, start: int, stop: int, as_float: bool = False) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (stop past its last row means up to it), as stored, or as float32
        like load_float. Safetensors readers read only those rows' bytes (rows are contiguous); here the tensor is
        loaded whole and sliced (GGUF blocks are not row-addressable)."""
        start, stop = row_span(self.tensors[name], start, stop)
        full = self.load_float(name) if as_float else self.load(name)
        return full[start:stop]

    def offer(self, name: str, tensor: torch.Tensor) -> bool:
        """Take `name`'s stored tensor, read ahead by someone else (inspect_tools.read_ahead): the next load(name)
        returns it instead of reading the file again. False where this reader does not take one (GGUF)."""
        return False

    def forget(self, name: str) -> None:  # noqa: B027 - optional hook
        """Drop a tensor offered but not loaded."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
