"""The bounded pool of host buffers a conversion reads its source tensors into.

Buffers are reused, pinned on the GPU path (optionally slices of one block locked up front, gpu_io.PinnedArena), and
handed out within a byte budget: acquire() waits while the budget is spent, which is what bounds a conversion's memory
whatever the model size. converter/stages.py sizes the budget and stops the pool when the run ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from converter.gpu_io import PinnedArena
from inspect_tools.readers.chunked import pop_best_fit

# Tensors below this size are allocated fresh: pooling them saves nothing measurable.
POOL_MIN_BYTES = 1 << 20
POLL_S = 0.05  # how often a blocked stage (or a waiting acquire) looks whether the run was stopped


class Stopped(Exception):
    """Another stage failed or the run was interrupted: this one ends quietly."""


class BufferPool:
    """Host buffers for source tensors. Reused, so a tensor read costs no page faults or zero-filling (bytearray and
    fresh large allocations pay both); pinned on the GPU path, so host-to-device copies are asynchronous and run at
    full speed (gpu-notes.md: 54 GB/s pinned vs 8-9 GB/s pageable); and bounded: acquire() waits while `budget`
    bytes are handed out, which is what bounds peak memory whatever the model size."""

    def __init__(self, budget: int, pinned: bool = False, pin_ready: Callable[[], bool] | None = None) -> None:
        self.budget = budget
        self.pinned = pinned
        # pinned: whether pinning is possible yet (the CUDA context is up); until then buffers are pageable, so
        # reading starts at once, and they are dropped on release, so the pool becomes pinned
        self._pin_ready = pin_ready or (lambda: True)
        self._pageable: set[int] = set()
        self.in_use = 0
        self.peak = 0
        self._free: list[torch.Tensor] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._arena: PinnedArena | None = None
        self._arena_thread: threading.Thread | None = None

    def start_arena(self, after: Callable[[], None]) -> None:
        """Lock one block of `budget` bytes in the background, once after() returns (the CUDA context is up); until
        then buffers are pageable. Pinned allocations serve whatever the block cannot hold."""
        def lock() -> None:
            after()
            arena = PinnedArena.allocate(self.budget)
            with self._cond:
                if self._stopped and arena is not None:
                    arena.close()
                else:
                    self._arena = arena

        self._arena_thread = threading.Thread(target=lock, name="nvdiag-pin", daemon=True)
        self._arena_thread.start()

    def _pinning(self) -> bool:
        return self._pin_ready() and (self._arena_thread is None or not self._arena_thread.is_alive())

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.pinned and self._arena is not None and (buf := self._arena.take(nbytes)) is not None:
            return buf
        if self.pinned and self._pinning():
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.pinned:
            self._pageable.add(buf.data_ptr())
        return buf

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 buffer of at least nbytes; waits while the budget is spent (a single tensor larger than the
        whole budget still gets one when nothing else is in use)."""
        with self._cond:
            while True:
                if self._stopped:
                    raise Stopped()
                buf = pop_best_fit(self._free, nbytes) if nbytes >= POOL_MIN_BYTES else None
                if buf is None and (self.in_use + nbytes <= self.budget or self.in_use == 0):
                    while self._free and self.in_use + nbytes + sum(b.numel() for b in self._free) > self.budget:
                        self._free.pop(0)
                    buf = self._allocate(nbytes)
                if buf is not None:
                    self.in_use += buf.numel()
                    self.peak = max(self.peak, self.in_use)
                    return buf
                self._cond.wait(POLL_S)

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self.in_use -= buf.numel()
            if self._arena is not None and self._arena.owns(buf):
                self._arena.give(buf)
                self._cond.notify_all()
                return
            early = buf.data_ptr() in self._pageable and self._pinning()
            if early:
                self._pageable.discard(buf.data_ptr())
            if buf.numel() >= POOL_MIN_BYTES and not early:
                self._free.append(buf)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._free.clear()
            self._cond.notify_all()
        if self._arena_thread is not None:
            self._arena_thread.join()
        if self._arena is not None:
            self._arena.close()
