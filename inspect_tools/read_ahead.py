"""roundtrip's reads, ahead of its measurements: while one layer pair is decoded and measured, the next pairs'
tensors are read (inspect_tools.readers.chunked: large chunks, several threads, O_DIRECT past the page cache) and
handed to the readers (CheckpointReader.offer), so the measurement's own load() returns them without touching the
disk. Only the time of the reads changes: the bytes are the file's, and a read that fails is not offered (the
measurement's own load then reads again and reports the problem).

Bounded: the tensors of pairs in flight (read, or being read, and not measured yet) stay under READ_AHEAD_BYTES,
except that the pair being measured and the next one are always read, however large. Their buffers are reused once
a pair is measured and nothing references them any more (_ReadBuffers), so most reads land in memory that is
already mapped; at most READ_AHEAD_BYTES of free buffers are kept beside those in flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inspect_tools.layers import CheckpointModel
from inspect_tools.readers import prefetch
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

    from inspect_tools.align import LayerPair
    from inspect_tools.readers.base import CheckpointReader, TensorInfo

# Roles a decoder never needs (the same as inspect_tools.roundtrip.UNUSED_ROLES; a test checks they agree).
UNUSED_ROLES = ("bias", "comfy_quant")
READ_AHEAD_BYTES = 768 << 20
READ_THREADS = 4  # requests outstanding: as the GPU conversion (converter.stages.GPU_READ_THREADS)
PIN_ON_CUDA = True  # pinned read-ahead buffers when the measurement runs on the GPU (_ReadBuffers)
POOL_MIN_BYTES = 1 << 20  # smaller read-ahead buffers are not kept for reuse (as converter.buffer_pool)


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


def roundtrip_key(path: str | Path, against: str | Path) -> tuple[str, str, str]:
    """What a whole roundtrip of `path` against `against` warms, as prefetch keys it."""
    return "roundtrip", os.path.realpath(path), os.path.realpath(against)


def warm_roundtrip(mine: CheckpointModel, ref: CheckpointModel, key: tuple[str, str, str]) -> None:
    """Start warming what a whole roundtrip of mine against ref reads, unless a warmer was started for it already
    (inspect_tools.launch, before the command-line interface was imported)."""
    if prefetch.started_for(key) is None:
        prefetch.start(warm_ranges(quantized_pairs(mine, ref), mine, ref), key=key)


def warm_roundtrip_paths(path: str, against: str) -> None:
    """warm_roundtrip from the two paths alone; nothing where either cannot be opened (the command reports why)."""
    from inspect_tools.errors import NvdiagError
    from inspect_tools.layers import open_model

    try:
        with open_model(path) as mine, open_model(against) as ref:
            warm_roundtrip(mine, ref, roundtrip_key(path, against))
    except (NvdiagError, OSError):
        pass


def _storage_holders(t: torch.Tensor) -> int | None:
    """How many references t's storage has: one per tensor that shares it (t itself, every view, a numpy array of
    it), plus one for the Python storage object this asks through. None where this torch does not say (a private
    API). That Python object is one per storage, so a bare storage object kept elsewhere with no tensor over it is
    not told apart: nothing a roundtrip runs keeps one (it works with tensors and their views)."""
    import torch

    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, TypeError):
        return None


class _ReadBuffers:
    """The chunked reader's pool for roundtrip: a buffer per tensor, given to the reader that loads it, and given
    back here once its pair is measured (release). A buffer given back is handed out again only when nothing else
    references its storage: the measurement may still hold a view of it (a local of the caller's loop), and a view
    must never see its bytes overwritten. Reuse matters because a fresh large allocation is a fresh mapping (glibc
    maps anything above its mmap threshold, at most 32 MB), every page of which faults and is zero-filled: a CPU
    roundtrip of a 2.2 GB source took ~770 K page faults with a new buffer per tensor, ~575 K with this pool.

    Bounded: free buffers are dropped (oldest first) while they exceed `keep` bytes, so the pool holds at most what
    is in flight plus `keep` (in that roundtrip the free buffers peaked at ~100 MB: a released pair's buffers are
    mostly taken by the next pair queued). Buffers under POOL_MIN_BYTES are not kept (malloc's heap reuses those
    already). Called from one thread only (ReadAhead's).

    Pinned for a measurement on the GPU: the tensor's copy to the device then runs at the bus's speed instead of
    through a pageable staging copy. Pinned buffers are not kept: torch's pinned allocator keeps freed blocks for
    reuse itself, and it also waits for asynchronous copies from them, which a reference count does not show."""

    def __init__(self, pinned: bool, keep: int) -> None:
        import torch

        self.pinned = pinned
        self.keep = keep
        self.in_use = 0  # bytes handed out and not given back
        self.reused = 0  # buffers handed out again (what the pool saved)
        self._free: list[torch.Tensor] = []
        # the count of a buffer only the pool holds, as this torch counts it (None: reuse cannot be made safe)
        self._alone = _storage_holders(torch.empty(1, dtype=torch.uint8))
        self.reusing = self._alone is not None and not pinned

    def acquire(self, nbytes: int) -> torch.Tensor:
        buf = self._reuse(nbytes)
        if buf is None:
            buf = self._allocate(nbytes)
        else:
            self.reused += 1
        self.in_use += buf.numel()
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """`buf` is no longer the pool's caller's: kept for reuse, once nothing references it any more."""
        self.in_use -= buf.numel()
        if self.reusing and buf.numel() >= POOL_MIN_BYTES:
            self._free.append(buf)
        self._trim()

    def clear(self) -> None:
        """Keep nothing from now on (nothing more will be acquired)."""
        self.keep = 0
        self._free.clear()

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() for b in self._free)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        import torch

        if self.pinned:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # memory that cannot be locked: the same bytes, copied more slowly
                self.pinned = False
        return torch.empty(nbytes, dtype=torch.uint8)

    def _reuse(self, nbytes: int) -> torch.Tensor | None:
        """The best-fitting free buffer that nothing else references (chunked.pop_best_fit)."""
        from inspect_tools.readers.chunked import pop_best_fit

        if nbytes < POOL_MIN_BYTES:
            return None
        return pop_best_fit(self._free, nbytes, lambda b: _storage_holders(b) == self._alone)

    def _trim(self) -> None:
        while self._free and self.free_bytes > self.keep:
            self._free.pop(0)


class ReadAhead:
    """Reads the tensors of `pairs` ahead of their measurement. Call before(i) ahead of checking pair i (it waits
    for pair i's reads and offers them to the readers) and after(i) once it is checked (unused tensors are dropped
    and further pairs are queued)."""

    def __init__(self, pairs: list[LayerPair], mine: CheckpointModel, ref: CheckpointModel, pinned: bool = False,
                 budget: int | None = None, threads: int = READ_THREADS) -> None:
        from inspect_tools.readers.chunked import ChunkedReader

        self.reads = [[(m.reader, info) for m, info in pair_reads(p, mine, ref) if self._readable(m, info)]
                      for p in pairs]
        self.budget = READ_AHEAD_BYTES if budget is None else budget
        self.buffers = _ReadBuffers(pinned and PIN_ON_CUDA, keep=self.budget)
        self.chunks = ChunkedReader(None, self.buffers, threads)
        # per queued pair: (reader, info, tensor, its buffer, the buffer's read futures)
        self._pending: dict[int, list[tuple[CheckpointReader, TensorInfo, Any, Any, list]]] = {}
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
                tensor, buf, futures = self.chunks.submit(info, DTYPES[info.dtype].torch_dtype)
                self._pending[i].append((reader, info, tensor, buf, futures))
            self._in_flight += self._size(i)
            self._next += 1
        if self._next == len(self.reads):
            self.buffers.clear()  # every read is queued: a buffer given back now would only wait for the end

    def before(self, i: int) -> None:
        self._queue(i + 1)
        for reader, info, tensor, _, futures in self._pending.get(i, []):
            if all(f.exception() is None for f in futures):  # exception() waits for the read
                reader.offer(info.name, tensor)

    def after(self, i: int) -> None:
        entries = self._pending.pop(i, [])
        for reader, info, _, _, _ in entries:
            reader.forget(info.name)
        buffers = [buf for _, _, _, buf, _ in entries]
        del entries  # its tensors are views of the buffers: the pool reuses a buffer only once nothing views it
        while buffers:  # popped: no reference left here for _queue's allocations to find (pinned ones included)
            self.buffers.release(buffers.pop())
        self._in_flight -= self._size(i)
        self._queue(i + 1)

    def close(self) -> None:
        """Wait for the reads still queued and drop whatever was not loaded."""
        self.chunks.close()
        for entries in self._pending.values():
            for reader, info, _, _, _ in entries:
                reader.forget(info.name)
        self._pending.clear()
        self.buffers.clear()

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
