"""Reading a conversion's source: each planned layer's source tensors, straight into pool buffers.

On the CPU path a SourceStream preads whole tensors (several threads over slices of a large one, where asked), and
streams large kept tensors through one small buffer instead (stream_kept). On the GPU path a layer's reads are queued
as chunks (inspect_tools.readers.chunked) and completed later, so the disk always has the next requests. Either way a
layer comes out as a Job: its source tensors and the buffers to give back once they are written.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converter.buffer_pool import BufferPool
from converter.encode import TORCH_DTYPE, cast, finite_check
from converter.fp8_source import dequantize
from converter.plan import ConversionPlan, LayerPlan
from inspect_tools.errors import InputError
from inspect_tools.readers.base import read_range
from inspect_tools.readers.chunked import ChunkedReader
from inspect_tools.readers.safetensors_dtypes import DTYPES

# Kept (cast, never quantized) source tensors above this size are not read whole: the encoding thread streams them
# through one small buffer, STREAM_CHUNK_BYTES at a time (read, NaN/Inf check, cast, write at their place). Only a
# quantized weight needs its whole tensor (its per-tensor amax), so the pool is sized by those. A 14B WAN's
# time_projection (629 MB of FP32, kept at 16-bit) then never occupies a whole-tensor buffer.
STREAM_MIN_BYTES = 32 << 20
STREAM_CHUNK_BYTES = 8 << 20
# GPU path: tensors above this size are read by several threads at once (a CPU conversion keeps one reader: its
# cores are busy encoding).
PARALLEL_READ_BYTES = 16 << 20


class SourceStream:
    """Source tensors read straight into pool buffers (readers.base.read_range: the reader validated every header
    and offset, read_range keeps each read within its tensor). pread releases the GIL, so reading overlaps the
    encoder. Containers whose bytes are not plain tensors (GGUF, sub-byte dtypes) go through the reader itself."""

    def __init__(self, reader: Any, pool: BufferPool, read_threads: int = 1) -> None:
        self.reader = reader
        self.pool = pool
        self._fds: dict[tuple[int, Path], int] = {}
        self._fds_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(read_threads, "nvdiag-pread") if read_threads > 1 else None
        self.read_threads = read_threads
        self._chunk: torch.Tensor | None = None  # stream_kept's buffer (used by the encoding thread only)

    def _raw(self, info: Any) -> bool:
        spec = DTYPES.get(info.dtype)
        return self.reader.kind in ("safetensors", "sharded") and spec is not None and spec.torch_dtype is not None

    def _fd(self, path: Path) -> int:
        """This thread's descriptor of `path`: the kernel keeps readahead state per open file, so each reading
        thread, reading its own slices in order, gets its own readahead."""
        key = (threading.get_ident(), path)
        with self._fds_lock:
            if key not in self._fds:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
                self._fds[key] = fd
            return self._fds[key]

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tensor as stored, the pool buffer holding it, to release once it is written; None if not pooled)."""
        info = self.reader.tensors[key]
        if not self._raw(info) or info.nbytes == 0:
            return self.reader.load(key), None
        buf = self.pool.acquire(info.nbytes)
        try:
            data = buf[: info.nbytes]
            self._read(info, memoryview(data.numpy()))
        except BaseException:
            self.pool.release(buf)
            raise
        return data.view(DTYPES[info.dtype].torch_dtype).reshape(info.shape), buf

    def streamed(self, lp: LayerPlan) -> dict[str, Any]:
        """The layer's source tensors to stream in chunks rather than read whole (source key -> its TensorInfo):
        plain tensors above STREAM_MIN_BYTES that are only cast into one planned output, never a quantized weight."""
        weight = lp.source.tensors["weight"].name if lp.quantized and lp.source is not None else None
        uses: dict[str, list[Any]] = {}
        for t in lp.tensors:
            if t.source is not None:
                uses.setdefault(t.source, []).append(t)
        out: dict[str, Any] = {}
        for key, planned in uses.items():
            info = self.reader.tensors.get(key)
            if (key != weight and len(planned) == 1 and planned[0].dtype in TORCH_DTYPE and info is not None
                    and self._raw(info) and info.nbytes >= STREAM_MIN_BYTES):
                out[key] = info
        return out

    def pooled_bytes(self, lp: LayerPlan) -> int:
        """Bytes of the layer's source tensors that are read whole into pool buffers."""
        if lp.source is None:
            return 0
        streamed = self.streamed(lp)
        return sum(t.nbytes for t in lp.source.tensors.values() if t.name not in streamed)

    def stream_kept(self, lp: LayerPlan, key: str, writer: Any, write: bool) -> int:
        """Stream source tensor `key` of `lp` (one of streamed(lp)) into its planned output, chunk by chunk through
        one STREAM_CHUNK_BYTES buffer: pread, dequantize (an FP8 source tensor, lp.decode), NaN/Inf check, cast,
        write_part at its place. Returns the count of NaN/Inf values, all of them: once one is found (or with
        write=False) chunks are only checked, not written."""
        info = self.reader.tensors[key]
        planned = next(t for t in lp.tensors if t.source == key)
        source_dtype = DTYPES[info.dtype].torch_dtype
        itemsize = source_dtype.itemsize
        out_itemsize = TORCH_DTYPE[planned.dtype].itemsize
        step = max(1, STREAM_CHUNK_BYTES // itemsize)
        numel = info.nbytes // itemsize
        if self._chunk is None or self._chunk.numel() < step * itemsize:
            self._chunk = torch.empty(step * itemsize, dtype=torch.uint8)
        bad = 0
        for start in range(0, numel, step):
            count = min(step, numel - start)
            raw = self._chunk[: count * itemsize]
            self._read_part(info, memoryview(raw.numpy()), start * itemsize)
            values = raw.view(source_dtype)
            if key in lp.decode:  # elementwise too: each chunk decodes to exactly its part of the whole
                values = dequantize(values, lp.decode[key])
            bad += finite_check(values)[0]
            if write and not bad:  # elementwise cast: each chunk gives exactly the bytes of the whole tensor's cast
                writer.write_part(planned.name, start * out_itemsize, cast(values, planned.dtype, reuse=True))
        return bad

    def will_need(self, lp: LayerPlan) -> None:
        """Ask the kernel to start reading the next layer's bytes now (POSIX_FADV_WILLNEED): on a cold cache the
        disk then has that read queued while this one completes, instead of idling between two preads."""
        if not hasattr(os, "posix_fadvise"):
            return
        for t in lp.tensors:
            info = self.reader.tensors.get(t.source) if t.source is not None else None
            if info is not None and self._raw(info) and info.nbytes:
                try:
                    os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return  # only a hint

    def _read(self, info: Any, view: memoryview) -> None:
        """One pread, or on the GPU path (where one thread's copies out of the page cache cannot keep up with the
        GPU) several concurrent ones over slices of the tensor."""
        if self._executor is None or len(view) < PARALLEL_READ_BYTES:
            self._read_part(info, view, 0)
            return
        step = -(-len(view) // self.read_threads)
        parts = [(start, min(len(view), start + step)) for start in range(0, len(view), step)]
        futures = [self._executor.submit(self._read_part, info, view[a:b], a) for a, b in parts]
        for future in futures:
            future.result()

    def _read_part(self, info: Any, view: memoryview, start: int) -> None:
        read_range(self._fd(info.file), info, view, start)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class Job:
    """One planned layer's source tensors (by source key) and the pool buffers holding them, to give back once the
    outputs made from them are written."""

    plan: LayerPlan
    src: dict[str, torch.Tensor]
    buffers: list[torch.Tensor]
    streamed: dict[str, Any] = field(default_factory=dict)  # source key -> info: for the encoder to stream_kept()


def read_order(plan: ConversionPlan, reader: Any) -> list[LayerPlan]:
    """The planned layers in the order their source bytes lie in the files: sequential reads keep the kernel's
    readahead working on a cold cache. The output does not depend on it: every tensor has its own place."""
    def position(lp: LayerPlan) -> tuple[str, int]:
        infos = [reader.tensors[t.source] for t in lp.tensors if t.source is not None and t.source in reader.tensors]
        if not infos:
            return "", -1
        first = min(infos, key=lambda i: (str(i.file), i.offset))
        return str(first.file), first.offset

    return sorted(plan.layers, key=position)


def read_job(lp: LayerPlan, stream: SourceStream) -> Job:
    job = Job(lp, {}, [], stream.streamed(lp))
    try:
        for t in lp.tensors:
            if t.source is not None and t.source not in job.src and t.source not in job.streamed:
                job.src[t.source], buf = stream.load(t.source)
                if buf is not None:
                    job.buffers.append(buf)
    except BaseException:
        for buf in job.buffers:
            stream.pool.release(buf)
        raise
    return job


def submit_job(lp: LayerPlan, stream: SourceStream, chunks: ChunkedReader) -> tuple[Job, list[Future]]:
    """GPU path: queue the chunk reads of a layer's source tensors; (the job, its reads) to wait for."""
    job, futures = Job(lp, {}, [], stream.streamed(lp)), []
    try:
        for t in lp.tensors:
            if t.source is None or t.source in job.src or t.source in job.streamed:
                continue
            info = stream.reader.tensors[t.source]
            if stream._raw(info) and info.nbytes:
                job.src[t.source], buf, reads = chunks.submit(info, DTYPES[info.dtype].torch_dtype)
                job.buffers.append(buf)
                futures += reads
            else:
                job.src[t.source] = stream.load(t.source)[0]
    except BaseException:
        complete_job(job, futures, stream.pool, failed=True)
        raise
    return job, futures


def complete_job(job: Job, futures: list[Future], pool: BufferPool, failed: bool = False) -> Job:
    """Wait for a submitted layer's reads; on any failure its buffers go back (after every read into them ended)."""
    wait(futures)
    error = next((f.exception() for f in futures if f.exception() is not None), None)
    if failed or error is not None:
        for buf in job.buffers:
            pool.release(buf)
        job.buffers.clear()
        if error is not None:
            raise error
    return job
