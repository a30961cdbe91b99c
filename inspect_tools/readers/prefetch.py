"""Reading a command's input while the command is still starting: importing torch with CUDA, starting the CUDA
context and planning take seconds in a fresh process, during which the disk would otherwise sit idle.

A Warmer reads the byte ranges the command will read, in the order it will read them, into the page cache. It does so
in a child process (warm_child.py, its own interpreter, started in milliseconds before torch is imported), because a
thread of the command shares the command's GIL: in traced cold conversions of a 4.36 GB source on an H200 host, a
warming thread had read only 0.3 GB after 0.8-0.9 s while torch was imported beside it. The command's own reader
(inspect_tools.readers.chunked) then finds those pages cached and copies them from memory. Where it reaches a chunk the
warmer has not read yet, it waits for the warmer to read it (`wait_for`) rather than reading the disk itself, so the
two never compete for the disk: in traced cold conversions of a 17.3 GB source on an H200 host the warmer read
1.8-2.4 GB/s (one reader, 64 MB preads, the kernel's readahead), the command's own O_DIRECT chunks 1.3-1.8 GB/s once
it had taken the disk over. The command reads for itself only what the warmer will not read: bytes past its limit,
pages evicted since it read them, or everything once it ended, failed or stalled. Reading ahead only moves reads
earlier: the bytes a command sees are the file's either way.

Bounded: at most half the memory the kernel reports available is read ahead (the page cache gives it back under
pressure anyway). Any failure only ends the warming: the command's own reads report unreadable files.
"""

from __future__ import annotations

import bisect
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

# One pread of the warmer, and how often it reports its progress. One reader at a time: measured alone, 16 MB reads,
# on a cold 4.3 GB source (H200 host, virtio disk, `cat` 1.7 GB/s), 1 thread read 1.98 GB/s (the kernel's sequential
# readahead does the queueing), 4 threads 1.68, 8 threads 1.81.
READ_BYTES = 64 << 20
FALLBACK_LIMIT_BYTES = 8 << 30  # read-ahead cap where the available memory cannot be read
CHILD = Path(__file__).with_name("warm_child.py")
PAGE = 4096  # readers.chunked.ALIGN: the granularity of its direct reads, and a page
# A reader waiting for the warmer gives up (and reads for itself) when the warmer reported nothing for this long: one
# 64 MB piece takes 0.03 s at 2 GB/s, 0.5 s even at 130 MB/s.
STALL_S = 2.0
POLL_S = 0.05  # longest sleep between two looks at the progress while waiting (a progress line wakes it sooner)


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
    """(path, offset, length) ranges in the given order, each joined to the one before it where they touch or
    overlap (then the part already covered is not read twice)."""
    out: list[tuple[Path, int, int]] = []
    for path, offset, length in ranges:
        if length <= 0:
            continue
        if out and out[-1][0] == path and out[-1][1] <= offset <= out[-1][1] + out[-1][2]:
            start = out[-1][1]
            out[-1] = (path, start, max(out[-1][2], offset + length - start))
        else:
            out.append((path, offset, length))
    return out


class Warmer:
    """Reads `ranges` (path, offset, length), in order, into the page cache in a child process (warm_child.py), a
    READ_BYTES piece at a time, up to `limit` bytes or until stopped. No child is started where there is nothing to
    read, or where it cannot be (then the command simply reads for itself)."""

    def __init__(self, ranges: Iterable[tuple[Path, int, int]], limit: int | None = None) -> None:
        # each range from the start of its first page: a reader's aligned chunk starts there (readers.chunked)
        self.ranges = merged((p, o - o % PAGE, n + o % PAGE) for p, o, n in ranges)
        if limit is None:
            available = available_bytes()
            limit = available // 2 if available is not None else FALLBACK_LIMIT_BYTES
        self.limit = limit
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # the pieces, in order: (range index, offset in the range, length), and the bytes up to the end of each
        self._pieces = [(i, start, min(READ_BYTES, length - start)) for i, (_, _, length) in enumerate(self.ranges)
                        for start in range(0, length, READ_BYTES)]
        self._ends: list[int] = []
        for _, _, length in self._pieces:
            self._ends.append((self._ends[-1] if self._ends else 0) + length)
        # where each range starts in the warmer's order, and how far the child reads (it reads a piece whenever it
        # has read less than the limit)
        self._starts: list[int] = []
        total = 0
        for _, _, length in self.ranges:
            self._starts.append(total)
            total += length
        past_limit = bisect.bisect_left(self._ends, self.limit)
        self._reach = self._ends[min(past_limit, len(self._ends) - 1)] if self._ends and self.limit > 0 else 0
        self._done = 0  # bytes the child reported read
        self._unparsed = b""
        # per file: range offsets (sorted) -> (end, order index), to place a reader's position in the warmer's order
        self._index: dict[Path, list[tuple[int, int, int]]] = {}
        for i, (path, offset, length) in enumerate(self.ranges):
            self._index.setdefault(path, []).append((offset, offset + length, i))
        for spans in self._index.values():
            spans.sort()
        self.proc: subprocess.Popen | None = None
        if self._pieces and self.limit > 0 and sys.executable:
            self._start_child()

    def _start_child(self) -> None:
        job = {"ranges": [(str(p), o, n) for p, o, n in self.ranges], "piece": READ_BYTES, "limit": self.limit}
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", str(CHILD)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            os.set_blocking(self.proc.stdout.fileno(), False)
            with self.proc.stdin:
                self.proc.stdin.write(json.dumps(job).encode())
        except (OSError, ValueError):  # no child (or it died at once): only the head start is lost
            self.stop()

    @property
    def done_bytes(self) -> int:
        """Bytes the child has read so far (from the progress lines it has written)."""
        return self._read_progress()

    def _read_progress(self) -> int:
        """Take the progress lines the child has written since the last call (without waiting for more)."""
        with self._lock:
            if self.proc is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
                try:
                    while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
                        self._unparsed += chunk
                except (BlockingIOError, OSError):
                    pass
                lines = self._unparsed.split(b"\n")
                self._unparsed = lines.pop()
                if lines:
                    self._done = int(lines[-1])
            return self._done

    def _position(self, path: Path, offset: int, length: int) -> int | None:
        """How many bytes the warmer must have read, in its order, to have read [offset, offset + length) of `path`
        (the part inside its ranges); None where `offset` lies in none of them."""
        spans = self._index.get(Path(path))
        if not spans:
            return None
        k = bisect.bisect_right(spans, (offset, float("inf"), 0)) - 1
        if k < 0 or offset >= spans[k][1]:
            return None
        start, end, order = spans[k]
        return self._starts[order] + min(offset + length, end) - start

    def wait_for(self, path: Path, offset: int, length: int) -> bool:
        """Wait until the warmer has read [offset, offset + length) of `path`: True once it has (the pages are then
        cached unless evicted since). False at once where it never will (outside its ranges, past its limit, no
        child, stopped), or as soon as its child ends short of it or reports nothing for STALL_S (then it is
        stopped): the caller reads for itself."""
        target = self._position(path, offset, length)
        if target is None or target > self._reach or self.proc is None:
            return False
        last, progressed_at = -1, time.monotonic()
        while not self._stop.is_set():
            done = self._read_progress()
            if done >= target:
                return True
            if self.proc.poll() is not None:  # ended: its last lines may still be unread
                return self._read_progress() >= target
            now = time.monotonic()
            if done != last:
                last, progressed_at = done, now
            elif now - progressed_at > STALL_S:
                self.stop(wait=False)
                return False
            try:
                select.select([self.proc.stdout], [], [], POLL_S)
            except (ValueError, OSError):  # its pipe was closed by stop() meanwhile
                return False
        return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def join(self) -> None:
        """Wait until the child has read everything it will read."""
        if self.proc is not None:
            self.proc.wait()

    def stop(self, wait: bool = True) -> None:
        """End the warming now (the child only reads: killing it loses nothing); wait: also reap it."""
        self._stop.set()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
        if wait:
            proc.wait()
            self._read_progress()  # the last lines, before the pipe is closed
            with self._lock:
                if proc.stdout is not None:
                    proc.stdout.close()


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


def wait_for(path: Path, offset: int, length: int) -> bool:
    """Whether this process's warmer (if any) has read, or has now read after a wait, these bytes (Warmer.wait_for)."""
    warmer = _active
    return warmer is not None and warmer.wait_for(path, offset, length)


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
