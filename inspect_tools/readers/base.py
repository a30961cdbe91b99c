"""One lazy interface over every checkpoint container: safetensors (single or sharded) and GGUF."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


# Tensors one checkpoint (a file, or all shards of an index) may hold. Real checkpoints hold far fewer: diffusion
# models 1-3k, the largest LLM index we know (DeepSeek-V3, 671B) about 91k. Past this, header work would take
# minutes and gigabytes for a file that is almost certainly hostile or broken; refused with one line instead.
MAX_TENSORS = 300_000


def too_many_tensors(count: int) -> str:
    """The refusal message for a checkpoint of `count` tensors (> MAX_TENSORS)."""
    return f"holds {count} tensors, more than the {MAX_TENSORS} nvdiag reads (real checkpoints hold a few thousand)"


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
