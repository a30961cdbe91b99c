"""roundtrip's reads, ahead of its measurements: while one layer pair is decoded and measured, the next pairs'
tensors are read (inspect_tools.readers.chunked: large chunks, several threads, O_DIRECT past the page cache) and
handed to the readers (CheckpointReader.offer), so the measurement's own load() returns them without touching the
disk. Only the time of the reads changes: the bytes are the file's, and a read that fails is not offered (the
measurement's own load then reads again and reports the problem).

Bounded: the tensors of pairs in flight (read, or being read, and not measured yet) stay under READ_AHEAD_BYTES,
except that the pair being measured and the next one are always read, however large.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inspect_tools.layers import CheckpointModel
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

    from inspect_tools.align import LayerPair
    from inspect_tools.readers.base import CheckpointReader, TensorInfo

# Roles a decoder never needs (the same as inspect_tools.roundtrip.UNUSED_ROLES; a test checks they agree).
UNUSED_ROLES = ("bias", "comfy_quant")
READ_AHEAD_BYTES = 768 << 20
READ_THREADS = 4  # requests outstanding: as the GPU conversion (converter.stages.GPU_READ_THREADS)
PIN_ON_CUDA = True  # pinned read-ahead buffers when the measurement runs on the GPU (_FreshBuffers)


def layer_reads(layer: Layer, model: CheckpointModel, weight_only: bool = False) -> list[TensorInfo]:
    """The stored tensors of `layer` that a roundtrip loads: every role a decoder uses, or only the weight (a plain
    float reference)."""
    roles = ["weight"] if weight_only else [r for r in layer.tensors if r not in UNUSED_ROLES]
    infos = (model.reader.tensors.get(layer.tensors[r].name) for r in roles if r in layer.tensors)
    return [i for i in infos if i is not None]


def pair_reads(pair: LayerPair, mine: CheckpointModel,
               ref: CheckpointModel) -> list[tuple[CheckpointModel, TensorInfo]]:
    """What checking `pair` reads: REF's weight (every decoder role where REF is quantized), then PATH's roles."""
    ref_plain = not pair.ref.is_quantized or ref.kind == "gguf"
    return ([(ref, i) for i in layer_reads(pair.ref, ref, weight_only=ref_plain)]
            + [(mine, i) for i in layer_reads(pair.mine, mine)])


def quantized_pairs(mine: CheckpointModel, ref: CheckpointModel) -> list[LayerPair]:
    """The pairs a roundtrip without --layers/--sample checks, in its order (roundtrip.select_pairs), from the
    headers alone: what can be read before torch is imported."""
    from inspect_tools.align import align_layers

    return [p for p in align_layers(mine, ref).pairs if p.mine.is_quantized and p.mine.has("weight")]


def warm_ranges(pairs: Iterable[LayerPair], mine: CheckpointModel,
                ref: CheckpointModel) -> list[tuple[Path, int, int]]:
    """(file, offset, nbytes) of what checking `pairs` reads, in that order (for inspect_tools.readers.prefetch)."""
    return [(Path(info.file), info.offset, info.nbytes)
            for pair in pairs for model, info in pair_reads(pair, mine, ref) if model.kind != "gguf"]


class _FreshBuffers:
    """The chunked reader's pool for roundtrip: a new buffer per tensor, given to the reader that loads it. Pinned
    for a measurement on the GPU: the tensor's copy to the device then runs at the bus's speed instead of through a
    pageable staging copy (torch's pinned allocator keeps freed blocks for reuse, so sizes seen once cost nothing
    more)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned

    def acquire(self, nbytes: int) -> torch.Tensor:
        import torch

        if self.pinned:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # memory that cannot be locked: the same bytes, copied more slowly
                self.pinned = False
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        pass


class ReadAhead:
    """Reads the tensors of `pairs` ahead of their measurement. Call before(i) ahead of checking pair i (it waits
    for pair i's reads and offers them to the readers) and after(i) once it is checked (unused tensors are dropped
    and further pairs are queued)."""

    def __init__(self, pairs: list[LayerPair], mine: CheckpointModel, ref: CheckpointModel, pinned: bool = False,
                 budget: int = READ_AHEAD_BYTES, threads: int = READ_THREADS) -> None:
        from inspect_tools.readers.chunked import ChunkedReader

        self.reads = [[(m.reader, info) for m, info in pair_reads(p, mine, ref) if self._readable(m, info)]
                      for p in pairs]
        self.budget = budget
        self.chunks = ChunkedReader(None, _FreshBuffers(pinned and PIN_ON_CUDA), threads)
        self._pending: dict[int, list[tuple[CheckpointReader, TensorInfo, Any, list]]] = {}
        self._next = 0  # the first pair not queued yet
        self._in_flight = 0  # bytes of the queued pairs not yet checked

    @staticmethod
    def _readable(model: CheckpointModel, info: TensorInfo) -> bool:
        from inspect_tools.readers.safetensors_dtypes import DTYPES

        spec = DTYPES.get(info.dtype)
        return (model.kind in ("safetensors", "sharded") and info.nbytes > 0 and spec is not None
                and spec.torch_dtype is not None)

    def _size(self, i: int) -> int:
        return sum(info.nbytes for _, info in self.reads[i])

    def _queue(self, upto: int) -> None:
        """Queue pairs in order while the budget allows, and always pairs up to `upto` (inclusive)."""
        from inspect_tools.readers.safetensors_dtypes import DTYPES

        while self._next < len(self.reads) and (self._next <= upto or
                                                self._in_flight + self._size(self._next) <= self.budget):
            i = self._next
            self._pending[i] = []
            for reader, info in self.reads[i]:
                tensor, _, futures = self.chunks.submit(info, DTYPES[info.dtype].torch_dtype)
                self._pending[i].append((reader, info, tensor, futures))
            self._in_flight += self._size(i)
            self._next += 1

    def before(self, i: int) -> None:
        self._queue(i + 1)
        for reader, info, tensor, futures in self._pending.get(i, []):
            if all(f.exception() is None for f in futures):  # exception() waits for the read
                reader.offer(info.name, tensor)

    def after(self, i: int) -> None:
        for reader, info, _, _ in self._pending.pop(i, []):
            reader.forget(info.name)
        self._in_flight -= self._size(i)
        self._queue(i + 1)

    def close(self) -> None:
        """Wait for the reads still queued and drop whatever was not loaded."""
        self.chunks.close()
        for entries in self._pending.values():
            for reader, info, _, _ in entries:
                reader.forget(info.name)
        self._pending.clear()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ahead(pairs: list[LayerPair], mine: CheckpointModel, ref: CheckpointModel,
               device: Any = "cpu") -> Iterator[LayerPair]:
    """`pairs`, in order, each yielded once its tensors are read and offered to the readers; the next pairs are
    read meanwhile (into pinned memory when `device` is a GPU). Closing the iteration early (an error while
    checking) waits for the reads in flight."""
    with ReadAhead(pairs, mine, ref, pinned=str(device).startswith("cuda")) as ahead:
        for i, pair in enumerate(pairs):
            ahead.before(i)
            yield pair
            ahead.after(i)
