"""Reading a command's input while the command is still starting: importing torch with CUDA, starting the CUDA
context and planning take seconds in a fresh process, during which the disk would otherwise sit idle.

A Warmer thread reads the byte ranges the command will read, in the order it will read them, into the page cache
(plain preads into one scratch buffer; no torch, so it can start before torch is imported). The command's own
reader (inspect_tools.readers.chunked) then finds those pages cached and copies them from memory, and tells the
warmer when it has caught up (`caught_up`): from there on the command reads the disk itself, so the two never
compete for it. Reading ahead only moves reads earlier: the bytes a command sees are the file's either way.

Bounded: at most half the memory the kernel reports available is read ahead (the page cache gives it back under
pressure anyway). Any failure only ends the warming: the command's own reads report unreadable files.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from inspect_tools.readers.base import fill

# One pread of the warmer: long, so that waiting for the GIL between two (torch's import holds it meanwhile) leaves
# the disk idle for a small part of the time (reasoned, not measured apart: the THREADS figures are 16 MB reads).
READ_BYTES = 64 << 20
FALLBACK_LIMIT_BYTES = 8 << 30  # read-ahead cap where the available memory cannot be read
# Threads reading, each one request at a time. Measured alone, 16 MB reads, on a cold 4.3 GB source (H200 host,
# virtio disk, `cat` 1.7 GB/s): 1 thread 1.98 GB/s (the kernel's sequential readahead does the queueing), 4 threads
# 1.68, 8 threads 1.81.
THREADS = 1


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def merged(ranges: Iterable[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    """(path, offset, length) ranges in the given order, each joined to the one before it where they touch."""
    out: list[tuple[Path, int, int]] = []
    for path, offset, length in ranges:
        if length <= 0:
            continue
        if out and out[-1][0] == path and out[-1][1] + out[-1][2] == offset:
            out[-1] = (path, out[-1][1], out[-1][2] + length)
        else:
            out.append((path, offset, length))
    return out


class Warmer:
    """Reads `ranges` (path, offset, length), in order, into the page cache with `threads` daemon threads (each takes
    the next READ_BYTES piece: several requests outstanding, as the GPU conversion's own reader keeps), up to
    `limit` bytes or until stopped."""

    def __init__(self, ranges: Iterable[tuple[Path, int, int]], limit: int | None = None,
                 threads: int = THREADS) -> None:
        self.ranges = merged(ranges)
        if limit is None:
            available = available_bytes()
            limit = available // 2 if available is not None else FALLBACK_LIMIT_BYTES
        self.limit = limit
        self.done_bytes = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # the pieces, in order: (range index, offset in the range, length)
        self._pieces = [(i, start, min(READ_BYTES, length - start)) for i, (_, _, length) in enumerate(self.ranges)
                        for start in range(0, length, READ_BYTES)]
        self._next = 0  # the first piece no thread has taken
        self._reading: set[int] = set()  # pieces taken, not read yet
        # per file: range offsets (sorted) -> (end, order index), to place a reader's position in the warmer's order
        self._index: dict[Path, list[tuple[int, int, int]]] = {}
        for i, (path, offset, length) in enumerate(self.ranges):
            self._index.setdefault(path, []).append((offset, offset + length, i))
        for spans in self._index.values():
            spans.sort()
        self._fds: dict[Path, int] = {}
        self._running = max(1, threads)  # the last thread to end closes the descriptors
        self.threads = [threading.Thread(target=self._run, name="nvdiag-warm", daemon=True)
                        for _ in range(max(1, threads))]
        for thread in self.threads:
            thread.start()

    def _take(self, done: int | None) -> int | None:
        """Mark piece `done` read and take the next one (None: nothing left, the limit reached, or stopped)."""
        with self._lock:
            if done is not None:
                self._reading.discard(done)
                self.done_bytes += self._pieces[done][2]
            if self._stop.is_set() or self._next >= len(self._pieces) or self.done_bytes >= self.limit:
                return None
            k = self._next
            self._next += 1
            self._reading.add(k)
            return k

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def _run(self) -> None:
        scratch = bytearray(READ_BYTES)
        view = memoryview(scratch)
        k = self._take(None)
        try:
            while k is not None:
                index, start, length = self._pieces[k]
                path, offset, _ = self.ranges[index]
                fill(self._fd(path), view[:length], offset + start)
                k = self._take(k)
        except OSError:
            self._stop.set()  # only a head start: the command's own reads report what is wrong with the file
        finally:
            with self._lock:
                self._running -= 1
                fds, self._fds = (self._fds, {}) if self._running == 0 else ({}, self._fds)
            for fd in fds.values():
                os.close(fd)

    def _frontier(self) -> tuple[int, int] | None:
        """(range index, offset in it) of the first piece not read yet, None once every piece is taken and read."""
        with self._lock:
            first = min(self._reading, default=self._next)
        if first >= len(self._pieces):
            return None
        index, start, _ = self._pieces[first]
        return index, start

    def caught_up(self, path: Path, offset: int) -> None:
        """A reader found (path, offset) not cached: if the warmer has not passed it yet, the reader has caught up
        with it, and the warmer stops (a byte it already passed was evicted or skipped: warming goes on)."""
        spans = self._index.get(Path(path))
        if not spans or self._stop.is_set():
            return
        k = bisect.bisect_right(spans, (offset, float("inf"), 0)) - 1
        if k < 0 or offset >= spans[k][1]:
            return
        start, _, order = spans[k]
        frontier = self._frontier()
        if frontier is not None and (order, offset - start) >= frontier:
            self.stop(wait=False)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            for thread in self.threads:
                if thread is not threading.current_thread():
                    thread.join()


_active: Warmer | None = None
_active_lock = threading.Lock()


def start(ranges: Iterable[tuple[Path, int, int]], limit: int | None = None) -> Warmer:
    """Start warming `ranges` for this process's command (replacing any warmer started before)."""
    global _active
    stop()
    warmer = Warmer(ranges, limit)
    with _active_lock:
        _active = warmer
    return warmer


def caught_up(path: Path, offset: int) -> None:
    """Tell this process's warmer, if any, that a reader missed the page cache at (path, offset)."""
    warmer = _active
    if warmer is not None:
        warmer.caught_up(path, offset)


def stop() -> None:
    """Stop this process's warmer, if any (at the end of a command, or when its reads no longer need one)."""
    global _active
    with _active_lock:
        warmer, _active = _active, None
    if warmer is not None:
        warmer.stop()


def tensor_ranges(infos: Iterable[object]) -> list[tuple[Path, int, int]]:
    """(file, offset, nbytes) of TensorInfos, in file order: how a conversion reads its source."""
    return sorted(((Path(t.file), t.offset, t.nbytes) for t in infos), key=lambda r: (str(r[0]), r[1]))


def warm_checkpoint(path: str | Path) -> Warmer | None:
    """Start warming every tensor of the checkpoint at `path` in file order (a conversion reads all of them, in that
    order: converter.source_stream.read_order); None where it cannot be opened (the command reports why) or is no
    safetensors checkpoint."""
    from inspect_tools.errors import NvdiagError
    from inspect_tools.readers import open_checkpoint

    try:
        with open_checkpoint(path) as reader:
            if reader.kind not in ("safetensors", "sharded"):
                return None
            return start(tensor_ranges(reader.tensors.values()))
    except (NvdiagError, OSError):
        return None
