"""Reading a command's input while the command is still starting: importing torch with CUDA, starting the CUDA
context and planning take seconds in a fresh process, during which the disk would otherwise sit idle.

A Warmer reads the byte ranges the command will read, in the order it will read them, into the page cache. It does so
in a child process (warm_child.py, its own interpreter, started in milliseconds before torch is imported), because a
thread of the command shares the command's GIL: in traced cold conversions of a 4.36 GB source on an H200 host, a
warming thread had read only 0.3 GB after 0.8-0.9 s while torch was imported beside it. The command's own reader
(inspect_tools.readers.chunked) then finds those pages cached and copies them from memory, and tells the warmer when
it has caught up (`caught_up`): the warmer then ends, and the command reads the disk itself, so the two never compete
for it. Reading ahead only moves reads earlier: the bytes a command sees are the file's either way.

Bounded: at most half the memory the kernel reports available is read ahead (the page cache gives it back under
pressure anyway). Any failure only ends the warming: the command's own reads report unreadable files.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

# One pread of the warmer, and how often it reports its progress. One reader at a time: measured alone, 16 MB reads,
# on a cold 4.3 GB source (H200 host, virtio disk, `cat` 1.7 GB/s), 1 thread read 1.98 GB/s (the kernel's sequential
# readahead does the queueing), 4 threads 1.68, 8 threads 1.81.
READ_BYTES = 64 << 20
FALLBACK_LIMIT_BYTES = 8 << 30  # read-ahead cap where the available memory cannot be read
CHILD = Path(__file__).with_name("warm_child.py")


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
    """Reads `ranges` (path, offset, length), in order, into the page cache in a child process (warm_child.py), a
    READ_BYTES piece at a time, up to `limit` bytes or until stopped. No child is started where there is nothing to
    read, or where it cannot be (then the command simply reads for itself)."""

    def __init__(self, ranges: Iterable[tuple[Path, int, int]], limit: int | None = None) -> None:
        self.ranges = merged(ranges)
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
        self._done = 0  # bytes the child reported read
        self._unparsed = b""
        # per file: range offsets (sorted) -> (end, order index), to place a reader's position in the warmer's order
        self._index: dict[Path, list[tuple[int, int, int]]] = {}
        for i, (path, offset, length) in enumerate(self.ranges):
            self._index.setdefault(path, []).append((offset, offset + length, i))
        for spans in self._index.values():
            spans.sort()
        self.proc: subprocess.Popen | None = None
        self.key: object = None  # what these ranges are the reads of (prefetch.start, started_for)
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

    def _frontier(self) -> tuple[int, int] | None:
        """(range index, offset in it) of the first piece not read yet, None once every piece is read."""
        first = bisect.bisect_right(self._ends, self.done_bytes)
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


def start(ranges: Iterable[tuple[Path, int, int]], limit: int | None = None, *, key: object = None) -> Warmer:
    """Start warming `ranges` for this process's command (replacing any warmer started before). key: what the
    ranges are the reads of (started_for finds the warmer by it)."""
    global _active
    stop()
    warmer = Warmer(ranges, limit)
    warmer.key = key
    with _active_lock:
        _active = warmer
    return warmer


def started_for(key: object) -> Warmer | None:
    """The warmer started for `key`, whatever it has read since; None if this process's warmer is another one or
    none. inspect_tools.launch starts a command's warmer before the command-line interface is imported, then the
    command asks here before it starts one itself, so its reads never meet a second warmer on the disk."""
    with _active_lock:
        return _active if _active is not None and key is not None and _active.key == key else None


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
    safetensors checkpoint. Once per checkpoint (started_for): the warmer already started for it is returned."""
    from inspect_tools.errors import NvdiagError
    from inspect_tools.readers import open_checkpoint

    key = ("checkpoint", os.path.realpath(path))
    if (warmer := started_for(key)) is not None:
        return warmer
    try:
        with open_checkpoint(path) as reader:
            if reader.kind not in ("safetensors", "sharded"):
                return None
            return start(tensor_ranges(reader.tensors.values()), key=key)
    except (NvdiagError, OSError):
        return None
