"""The warmer's own process (inspect_tools.readers.prefetch): reads byte ranges of files, in order, a piece at a time,
so that the kernel holds them in its page cache when the command reads them, and reports how far it got.

It runs as a separate interpreter (`python -I -S warm_child.py`) because a reading thread inside the command shares
the command's GIL: traced cold conversions of a 4.36 GB source on an H200 host found such a thread, and torch's
import beside it, both slowed (see prefetch.py). Standard library only, so it starts in milliseconds.

Pieces already in the page cache (mincore) are not read again: on a warm cache, reading them would only copy
memory, a core's work beside the command's (on the 2-core development machine a roundtrip's warmer copied its 2.4 GB
while the checks ran).

Protocol: one JSON document on stdin, {"ranges": [[path, offset, length], ...], "piece": bytes, "limit": bytes};
after each piece one line on stdout with the bytes read so far. It ends at the end of the ranges, at the limit, at
the first read error or short file (the command's own reads report those), or when nobody reads its progress any
more (its parent is gone).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from collections.abc import Callable

PAGE = mmap.PAGESIZE
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore: bit 0 of each byte says the page is resident


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):  # no C library to ask, or no mincore in it
        return None


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


# The page-cache questions below are shared with the command's own reader (readers/chunked.py); they live here
# because this module may import nothing but the standard library.
def map_file(fd: int, start: int, length: int) -> int | None:
    """The address of a read-only mapping of the file's bytes [start, start + length) (start a multiple of PAGE),
    made only to ask mincore about them: mapping reads nothing. None where no mapping can be made."""
    if _LIBC is None or length <= 0:
        return None
    address = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    return None if address in (None, _MAP_FAILED) else address


def unmap(address: int, length: int) -> None:
    _LIBC.munmap(address, length)


def resident(address: int, length: int) -> bool | None:
    """Whether every page of `length` mapped bytes at `address` is in the page cache; None where mincore fails."""
    pages = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
    if _LIBC.mincore(address, length, pages) != 0:
        return None
    return b"\x00" not in bytes(pages).translate(_LOW_BIT)


def cached(fd: int, offset: int, size: int) -> bool:
    """Whether every page of the file's bytes [offset, offset + size) is in the page cache already: then reading them
    would only copy memory. False where it cannot tell."""
    if size <= 0 or offset + size > os.fstat(fd).st_size:  # past the end: the read reports it
        return False
    start = offset - offset % PAGE
    length = offset + size - start
    address = map_file(fd, start, length)
    if address is None:
        return False
    try:
        return bool(resident(address, length))
    finally:
        unmap(address, length)


def warm(ranges: list[tuple[str, int, int]], piece: int, limit: int, report: Callable[[int], None]) -> int:
    """Read `ranges` in order in pieces of `piece` bytes until `limit` bytes are read; report(bytes so far) after each
    piece; the bytes read."""
    view = memoryview(bytearray(piece))
    fds: dict[str, int] = {}
    done = 0
    try:
        for path, offset, length in ranges:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            for start in range(0, length, piece):
                if done >= limit:
                    return done
                size = min(piece, length - start)
                got = size if cached(fds[path], offset + start, size) else 0  # a warm cache is not copied again
                while got < size:
                    n = os.preadv(fds[path], [view[got:size]], offset + start + got)
                    if n == 0:
                        return done  # shorter than the header says
                    got += n
                done += size
                report(done)
    finally:
        for fd in fds.values():
            os.close(fd)
    return done


def main() -> int:
    def report(done: int) -> None:
        sys.stdout.write(f"{done}\n")
        sys.stdout.flush()

    try:
        job = json.load(sys.stdin)
        warm([(str(p), int(o), int(n)) for p, o, n in job["ranges"]], int(job["piece"]), int(job["limit"]), report)
    except (OSError, ValueError, KeyError, TypeError):  # a parent that is gone is a BrokenPipeError (OSError)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
