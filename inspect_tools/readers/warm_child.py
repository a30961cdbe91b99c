"""The warmer's own process (inspect_tools.readers.prefetch): reads byte ranges of files, in order, a piece at a time,
so that the kernel holds them in its page cache when the command reads them, and reports how far it got.

It runs as a separate interpreter (`python -I -S warm_child.py`) because a reading thread inside the command shares
the command's GIL: traced cold conversions of a 4.36 GB source on an H200 host found such a thread, and torch's
import beside it, both slowed (see prefetch.py). Standard library only, so it starts in milliseconds.

Protocol: one JSON document on stdin, {"ranges": [[path, offset, length], ...], "piece": bytes, "limit": bytes};
after each piece one line on stdout with the bytes read so far. It ends at the end of the ranges, at the limit, at
the first read error or short file (the command's own reads report those), or when nobody reads its progress any
more (its parent is gone).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


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
                got = 0
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
