"""Keeping freed memory in the process for the next allocation, for commands that allocate a fresh buffer per tensor.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, rising up to 32 MiB as large blocks are
freed) with a fresh mapping, and returns it to the system when freed: the next layer's buffer of the same size is
zero-filled and page-faulted in again, page by page. roundtrip reads each tensor into a new buffer and decodes
each layer into a new tensor, so on the 2-core development machine a CPU roundtrip of the 2.23 GB benchmark source
took 760-800 K minor page faults and 2.8-3.3 s of system time; with the thresholds raised, 300-365 K faults and
1.7-1.8 s (three runs each, `/usr/bin/time`), at 5-20% more peak RSS (freed blocks are kept, not returned).
A conversion does not need it: its source buffers come from a pool (converter/buffer_pool.py).
"""

from __future__ import annotations

import ctypes

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_KEPT = 1 << 30  # blocks up to this size come from the heap, and freed ones stay there for reuse


def keep_freed_memory(largest: int = LARGEST_KEPT) -> bool:
    """Ask glibc to serve blocks up to `largest` bytes from its heap and to keep what is freed there (up to twice
    that at the heap's top) instead of unmapping it. True where that took effect; False elsewhere (another C
    library, or no mallopt), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, largest)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * largest - 1))
