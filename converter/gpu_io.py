"""The GPU conversion's pinned source buffers. Its chunked reads live in inspect_tools.readers.chunked, shared with
roundtrip's read-ahead."""

from __future__ import annotations

import bisect

import torch

from inspect_tools.readers.chunked import ALIGN


class PinnedArena:
    """One page-locked block carved into aligned slices: the GPU path's source buffers come from it, so a fresh
    process pays for pinning once, up front (in the background), instead of a cudaHostAlloc per new tensor size
    (torch's caching host allocator rounds every request up to a power of two and keeps each size it has seen:
    many sizes, many fresh allocations, and up to twice the memory).

    The block is ordinary memory registered with cudaHostRegister, so exactly `nbytes` are locked. take() is
    first-fit over a sorted list of holes; give() merges a returned slice with its neighbours."""

    def __init__(self, base: torch.Tensor, registered: bool) -> None:
        self._base = base
        self._registered = registered
        self._start = base.data_ptr()
        self._holes: list[tuple[int, int]] = [(0, base.numel())]  # (offset, length), sorted, never adjacent
        self._taken: dict[int, int] = {}  # offset -> length

    @classmethod
    def allocate(cls, nbytes: int) -> PinnedArena | None:
        """An arena of nbytes (rounded up to ALIGN), or None where memory cannot be locked (the pool then falls
        back to torch's pinned allocations)."""
        nbytes = -(-nbytes // ALIGN) * ALIGN
        try:
            base = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            base = base[-base.data_ptr() % ALIGN:][:nbytes]
            # cudaHostRegisterDefault (0); torch exposes the runtime call (torch.cuda.cudart)
            if int(torch.cuda.cudart().cudaHostRegister(base.data_ptr(), nbytes, 0)) == 0:
                return cls(base, registered=True)
            return cls(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), registered=False)
        except (RuntimeError, AttributeError):
            return None

    def owns(self, buf: torch.Tensor) -> bool:
        return 0 <= buf.data_ptr() - self._start < self._base.numel()

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A slice of at least nbytes starting on an ALIGN boundary, or None when no hole is large enough."""
        size = -(-nbytes // ALIGN) * ALIGN
        for i, (offset, length) in enumerate(self._holes):
            if length >= size:
                if length == size:
                    del self._holes[i]
                else:
                    self._holes[i] = (offset + size, length - size)
                self._taken[offset] = size
                return self._base[offset: offset + size]
        return None

    def give(self, buf: torch.Tensor) -> None:
        offset = buf.data_ptr() - self._start
        size = self._taken.pop(offset)
        holes = self._holes
        i = bisect.bisect(holes, (offset, 0))
        if i < len(holes) and offset + size == holes[i][0]:  # merge with the hole after
            size += holes.pop(i)[1]
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] == offset:  # and with the one before
            offset, size = holes[i - 1][0], holes[i - 1][1] + size
            del holes[i - 1]
            i -= 1
        holes.insert(i, (offset, size))

    def close(self) -> None:
        """Unlock the block (after the device finished any copy from it); slices still referenced stay valid
        memory, only no longer pinned."""
        if self._registered:
            self._registered = False
            try:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaHostUnregister(self._start)
            except RuntimeError:
                pass
