"""Fast reads of whole tensors (the GPU conversion's source, roundtrip's read-ahead): every tensor is split into
large aligned chunks that a few threads read at once, straight into a pool buffer (pinned on the GPU conversion),
and the next tensors' chunks are queued before the current ones finish, so the disk always has several large
requests outstanding.

A chunk whose pages are all in the page cache (mincore) is copied from there with a plain pread; any other chunk is
read with O_DIRECT, which moves the bytes from the disk into the buffer with no page-cache copy and no readahead
guesswork. Where O_DIRECT or mincore is not available (another OS, a file system without direct I/O), chunks are
plain preads: the same bytes, only slower. The source files are only read, so a direct read and the page cache never
disagree (open(2): mixing is only a problem for pages that are being written). The first chunk that misses the page
cache tells a command's warmer (inspect_tools.readers.prefetch) that this reader has caught up with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from inspect_tools.errors import InputError
from inspect_tools.readers import prefetch
from inspect_tools.readers.base import fill, truncated
from inspect_tools.readers.warm_child import PAGE, map_file, resident, unmap

ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length aligned to the logical block size (<= 4096)
CHUNK_BYTES = 8 << 20  # one request; a multiple of ALIGN


class _SourceFile:
    """One source file: a buffered descriptor, a direct one (None where refused) and a mapping used only to ask the
    kernel which pages are cached (mincore never reads the file)."""

    def __init__(self, path: Path, direct: bool) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
        self.size = os.fstat(self.fd).st_size
        self.direct_fd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                pass  # e.g. a file system without direct I/O: plain reads
        self.map_addr: int | None = None
        if self.direct_fd is not None:
            self.map_addr = map_file(self.fd, 0, self.size)
        if self.map_addr is None and self.direct_fd is not None:
            os.close(self.direct_fd)  # without residency we cannot tell cached chunks apart: stay buffered
            self.direct_fd = None

    def cached(self, offset: int, length: int) -> bool:
        """Whether every page of [offset, offset + length) is in the page cache (True where we cannot tell)."""
        if self.map_addr is None:
            return True
        start = offset - offset % PAGE
        end = min(offset + length, self.size)
        if end <= start:
            return True
        return resident(self.map_addr + start, end - start) is not False

    def close(self) -> None:
        if self.map_addr is not None:
            unmap(self.map_addr, self.size)
            self.map_addr = None
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.direct_fd = None


def pop_best_fit(free: list[torch.Tensor], nbytes: int,
                 usable: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor | None:
    """The buffer pools' choice (converter.buffer_pool, inspect_tools.read_ahead): the smallest buffer in `free` that
    holds nbytes without wasting more than its own size (and that `usable` accepts), taken out of `free`; None when
    none does."""
    fitting = [i for i, b in enumerate(free) if nbytes <= b.numel() <= 2 * nbytes and (usable is None or usable(b))]
    if not fitting:
        return None
    # popped by index: list.remove would compare tensors elementwise
    return free.pop(min(fitting, key=lambda i: free[i].numel()))


class ChunkedReader:
    """Reads source tensors into pool buffers as chunks spread over `threads` threads. submit() returns at once with
    the tensor (a view of its buffer, valid once the futures are done), the buffer and the futures."""

    def __init__(self, reader: Any, pool: Any, threads: int, direct: bool = True,
                 chunk_bytes: int | None = None) -> None:
        self.reader = reader
        self.pool = pool
        self.direct = direct
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES
        self._files: dict[Path, _SourceFile] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max(1, threads), "nvdiag-chunk")
        self.direct_bytes = 0  # read with O_DIRECT (the rest came from the page cache)

    def _file(self, path: Path) -> _SourceFile:
        with self._lock:
            if path not in self._files:
                self._files[path] = _SourceFile(path, self.direct)
            return self._files[path]

    @staticmethod
    def slack(nbytes: int) -> int:
        """Bytes a tensor's buffer needs beyond the tensor: alignment of its start, its file offset and its end."""
        return nbytes + 3 * ALIGN

    def submit(self, info: Any, torch_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[Future]]:
        src = self._file(info.file)
        buf = self.pool.acquire(self.slack(info.nbytes))
        try:
            pad = -buf.data_ptr() % ALIGN
            file_start = info.offset - info.offset % ALIGN
            head = info.offset - file_start
            if (pad + head) % torch_dtype.itemsize:
                head, file_start = 0, info.offset  # a misaligned tensor: plain reads at an aligned place
            span = -(-(head + info.nbytes) // ALIGN) * ALIGN
            window = buf[pad: pad + span]
            view = memoryview(window.numpy())
            futures = [self._executor.submit(self._read_chunk, src, view[a: min(a + self.chunk_bytes, span)],
                                             file_start + a, head + info.nbytes - a)
                       for a in range(0, span, self.chunk_bytes)]
        except BaseException:
            self.pool.release(buf)
            raise
        tensor = window[head: head + info.nbytes].view(torch_dtype).reshape(info.shape)
        return tensor, buf, futures

    def _read_chunk(self, src: _SourceFile, view: memoryview, offset: int, needed: int) -> None:
        """Read one chunk; `needed` of its bytes belong to the tensor (the rest is alignment and may lie past the
        end of the file)."""
        needed = min(needed, len(view))
        aligned = offset % ALIGN == 0 and len(view) % ALIGN == 0
        if src.direct_fd is not None and aligned and not src.cached(offset, len(view)):
            prefetch.caught_up(src.path, offset)  # from here on the disk is ours alone
            try:
                got = fill(src.direct_fd, view, offset)
                with self._lock:
                    self.direct_bytes += got
            except OSError:
                got = fill(src.fd, view, offset)  # e.g. EINVAL: a block size above ALIGN
        else:
            got = fill(src.fd, view[:needed], offset)
        if got < needed:
            raise truncated(src.path)

    def close(self) -> None:
        self._executor.shutdown()
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
