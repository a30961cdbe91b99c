"""Streaming stages of a conversion: read ahead, encode, write behind.

A reader thread preads the next layers' source tensors into reused buffers (pinned ones on the GPU path, filled by
chunked parallel reads), the calling thread checks and encodes them, a writer thread pwrites the outputs. Bounded
queues and the buffer pool's byte budget keep the memory in flight at a few of the largest layers, whatever the
model size. converter/pipeline.py composes these stages into `convert`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converter.encode import TORCH_DTYPE, cast, finite_check
from converter.gpu_io import ChunkedReader, PinnedArena
from converter.plan import ConversionPlan, LayerPlan
from inspect_tools.errors import InputError
from inspect_tools.readers.base import read_range
from inspect_tools.readers.safetensors_dtypes import DTYPES

# Tensors below this size are allocated fresh: pooling them saves nothing measurable.
POOL_MIN_BYTES = 1 << 20
# Source bytes in flight stay under this many times the largest layer (and a floor for models of tiny layers): one
# layer read ahead while one is encoded (an encoded layer's buffer returns at once, a kept one's once written), the
# same bound whatever the number of layers. A 14B model's largest layer is 283 MB of FP32.
POOL_LAYERS = 2
POOL_FLOOR_BYTES = 64 << 20
# ...but two copies of a very large layer are not worth the overlap: above this cap one such layer is in flight at a
# time. A 14B WAN's time_projection is 629 MB of FP32; with the cap its conversion stays near 1 GB of RSS, while
# layers up to half the cap (the 283 MB FFN weights) still read ahead.
POOL_CAP_BYTES = 640 << 20
# A CPU conversion streams its large kept tensors (STREAM_MIN_BYTES), so the pool holds quantized weights only, and
# its cores, not the reads, are the bottleneck: there one 14B FFN weight (283 MB) is in flight at a time, smaller
# layers still read ahead. Measured on the 14B-width source (2 cores, warm cache, 3 runs): 640 MB cap 6.1-6.6 s at
# 1.09-1.11 GB peak RSS, 320 MB cap 5.7-6.4 s at 0.79-0.80 GB. The GPU path, bound by its reads, keeps POOL_CAP_BYTES.
CPU_POOL_CAP_BYTES = 320 << 20
QUEUE_DEPTH = 2  # layers waiting between two stages
# Kept (cast, never quantized) source tensors above this size are not read whole: the encoding thread streams them
# through one small buffer, STREAM_CHUNK_BYTES at a time (read, NaN/Inf check, cast, write at their place). Only a
# quantized weight needs its whole tensor (its per-tensor amax), so the pool is sized by those. A 14B WAN's
# time_projection (629 MB of FP32, kept at 16-bit) then never occupies a whole-tensor buffer.
STREAM_MIN_BYTES = 32 << 20
STREAM_CHUNK_BYTES = 8 << 20
# GPU path: tensors above this size are read by several threads at once (a CPU conversion keeps one reader: its
# cores are busy encoding).
PARALLEL_READ_BYTES = 16 << 20
# GPU path: threads reading chunks (gpu_io.ChunkedReader), each with one request outstanding: the disk's queue depth.
# Measured on an H200 host (16 cores, virtio disk, 4.34 GB source): O_DIRECT alone reads 2.1-2.2 GB/s with 2-4
# threads of 8 MB (cat: 1.7-1.9 GB/s); 8 or 16 threads are slower (1.6-1.7). In-process cold conversion reached
# 0.80-0.87x of cat with 4 threads, 0.75-0.79x with buffered chunks; 2/8 threads and 16 MB chunks were within noise.
GPU_READ_THREADS = 4
GPU_DIRECT_IO = True  # chunks not in the page cache are read with O_DIRECT (gpu_io)
GPU_PIN_BUFFERS = True  # pinned pool buffers (fast asynchronous host-to-device copies) once CUDA is up
# GPU path: the pool's pinned buffers are slices of one block locked in the background once CUDA is up
# (gpu_io.PinnedArena), and the encoder's kernels run once on a tiny tensor meanwhile, so a fresh process does not
# pay for pinning and kernel loading in the stream. Measured in fresh processes (H200 host, 4.34 GB source,
# interleaved, 3 cold runs each): cold convert 3.87 s -> 3.59 s (arena), 3.62 s (kernels), 3.67 s (both);
# peak RSS 1152 -> 1090 MB.
GPU_PIN_ARENA = True
GPU_WARM_KERNELS = True
WRITEBACK_BYTES = 64 << 20  # output written between two background write-back requests
_POLL_S = 0.05  # how often a blocked stage looks whether the run was stopped


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start write-out of dirty pages, do not wait


def start_writeback(fd: int) -> None:
    """Start asynchronous write-out of a file's dirty pages. Linux sync_file_range(SYNC_FILE_RANGE_WRITE) keeps the
    pages cached (the gate reads them back); elsewhere POSIX_FADV_DONTNEED, which also starts write-out on Linux
    (mm/fadvise.c) but drops what is already clean; where neither exists, nothing (the fsync does it all)."""
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0:
        return
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class _Stopped(Exception):
    """Another stage failed or the run was interrupted: this one ends quietly."""


_END = object()  # the end of a stage's stream


@dataclass
class _Failure:
    error: BaseException


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

    def _reuse(self, nbytes: int) -> torch.Tensor | None:
        """The smallest free buffer that holds nbytes without wasting more than its own size."""
        fitting = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes]
        if not fitting:
            return None
        # popped by index: list.remove would compare tensors elementwise
        return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 buffer of at least nbytes; waits while the budget is spent (a single tensor larger than the
        whole budget still gets one when nothing else is in use)."""
        with self._cond:
            while True:
                if self._stopped:
                    raise _Stopped()
                buf = self._reuse(nbytes) if nbytes >= POOL_MIN_BYTES else None
                if buf is None and (self.in_use + nbytes <= self.budget or self.in_use == 0):
                    while self._free and self.in_use + nbytes + sum(b.numel() for b in self._free) > self.budget:
                        self._free.pop(0)
                    buf = self._allocate(nbytes)
                if buf is not None:
                    self.in_use += buf.numel()
                    self.peak = max(self.peak, self.in_use)
                    return buf
                self._cond.wait(_POLL_S)

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
        one STREAM_CHUNK_BYTES buffer: pread, NaN/Inf check, cast, write_part at its place. Returns the count of
        NaN/Inf values, all of them: once one is found (or with write=False) chunks are only checked, not written."""
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
class _Job:
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


def read_job(lp: LayerPlan, stream: SourceStream) -> _Job:
    job = _Job(lp, {}, [], stream.streamed(lp))
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


def submit_job(lp: LayerPlan, stream: SourceStream, chunks: ChunkedReader) -> tuple[_Job, list[Future]]:
    """GPU path: queue the chunk reads of a layer's source tensors; (the job, its reads) to wait for."""
    job, futures = _Job(lp, {}, [], stream.streamed(lp)), []
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


def complete_job(job: _Job, futures: list[Future], pool: BufferPool, failed: bool = False) -> _Job:
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


class Stages:
    """read -> (caller encodes) -> write, as three overlapping stages: a reader thread fills pool buffers with the
    next layers' sources, the caller's thread checks and encodes, a writer thread pwrites the outputs and returns
    the buffers. Queues of QUEUE_DEPTH layers and the pool's byte budget bound the memory in flight.
    threaded=False runs the same steps inline, in order (same bytes; used by tests and for debugging)."""

    def __init__(self, reader: Any, plan: ConversionPlan, writer: Any, pinned: bool = False,
                 threaded: bool = True, after_write: Callable[[str], None] | None = None,
                 pin_ready: Callable[[], bool] | None = None,
                 pin_after: Callable[[], None] | None = None) -> None:
        self.stream = SourceStream(reader, None, 1)  # its pool is set below, sized by what it reads whole
        largest = max((self.stream.pooled_bytes(lp) for lp in plan.layers), default=0)
        # on the GPU path each tensor's buffer has room for alignment (gpu_io.ChunkedReader.slack)
        slack = (1 << 20) if pinned else 0
        cap = POOL_CAP_BYTES if pinned else CPU_POOL_CAP_BYTES
        budget = max(largest, min(POOL_LAYERS * largest, cap), POOL_FLOOR_BYTES)
        self.pool = BufferPool(budget + slack, pinned and GPU_PIN_BUFFERS, pin_ready)
        if self.pool.pinned and GPU_PIN_ARENA and pin_after is not None:
            self.pool.start_arena(pin_after)
        self.stream.pool = self.pool
        self.chunks = ChunkedReader(reader, self.pool, GPU_READ_THREADS, GPU_DIRECT_IO) if pinned else None
        self._pending: queue.Queue = queue.Queue(QUEUE_DEPTH)  # GPU path: layers whose chunks are being read
        self.plan = plan
        self.order = read_order(plan, reader)
        self.writer = writer
        self.after_write = after_write  # called in the writer thread with a layer's name once it is in the file
        self.threaded = threaded
        self._stop = threading.Event()
        self._read_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._write_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._write_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._unflushed = 0
        self._out_fd: int | None = None
        # seconds each stage spent working (not waiting): what shows the bottleneck
        self.busy = {"read": 0.0, "write": 0.0, "check": 0.0}

    def __enter__(self) -> Stages:
        if self.threaded:
            self._threads = [threading.Thread(target=self._read_all, name="nvdiag-read", daemon=True),
                             threading.Thread(target=self._write_all, name="nvdiag-write", daemon=True)]
            if self.chunks is not None:
                self._threads.insert(1, threading.Thread(target=self._complete_all, name="nvdiag-complete",
                                                         daemon=True))
            for thread in self._threads:
                thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.pool.stop()
        for thread in self._threads:
            thread.join()
        if self.chunks is not None:
            self.chunks.close()
        self.stream.close()
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None

    # queues that give up when the run stops, so no stage can wait forever on one that has ended
    def _put(self, q: queue.Queue, item: object) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped()

    def _get(self, q: queue.Queue) -> object:
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        raise _Stopped()

    def _read_all(self) -> None:
        # GPU path: queue each layer's chunk reads and hand them to _complete_all without waiting for them, so
        # the next layer's requests are already queued when this one's complete (no idle disk between layers)
        target = self._read_q if self.chunks is None else self._pending
        try:
            for i, lp in enumerate(self.order):
                if self.chunks is None:
                    self._put(target, self._timed_read(lp, self.order[i + 1: i + 2]))
                else:
                    self._put(target, submit_job(lp, self.stream, self.chunks))
            self._put(target, _END)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self._hand_over(exc)

    def _hand_over(self, exc: BaseException) -> None:
        """Pass a reading thread's failure to the encoding thread, unless the run was stopped meanwhile."""
        try:
            self._put(self._read_q, _Failure(exc))
        except _Stopped:
            pass

    def _complete_all(self) -> None:
        """GPU path: wait for each layer's chunks, in order, and pass the layer on to the encoder."""
        try:
            while (item := self._get(self._pending)) is not _END:
                if isinstance(item, _Failure):
                    self._put(self._read_q, item)
                    return
                started = time.perf_counter()
                job = complete_job(*item, self.pool)
                self.busy["read"] += time.perf_counter() - started
                self._put(self._read_q, job)
            self._put(self._read_q, _END)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self._hand_over(exc)

    def _write_all(self) -> None:
        try:
            while (item := self._get(self._write_q)) is not _END:
                self._write(*item)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by write()/finish()
            self._write_error = exc
            self._stop.set()
            self.pool.stop()

    def _timed_read(self, lp: LayerPlan, following: list[LayerPlan]) -> _Job:
        started = time.perf_counter()
        for nxt in following:
            self.stream.will_need(nxt)
        job = read_job(lp, self.stream)
        self.busy["read"] += time.perf_counter() - started
        return job

    def _write(self, name: str, outputs: dict[str, torch.Tensor], buffers: list[torch.Tensor]) -> None:
        started = time.perf_counter()
        self._write_unclocked(outputs, buffers)
        self.busy["write"] += time.perf_counter() - started
        if self.after_write is not None:
            started = time.perf_counter()
            self.after_write(name)
            self.busy["check"] += time.perf_counter() - started

    def _write_unclocked(self, outputs: dict[str, torch.Tensor], buffers: list[torch.Tensor]) -> None:
        for name, tensor in outputs.items():
            self.writer.write(name, tensor)
            self._unflushed += tensor.numel() * tensor.element_size()
        self.release(buffers)
        if self._unflushed >= WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Have the kernel start writing the temporary file's dirty pages now, in the background, so the final fsync
        finds little left to do (a machine with a lot of RAM would otherwise hold the whole output until then)."""
        self._unflushed = 0
        if self.writer.temp_path is None:
            return
        try:
            if self._out_fd is None:
                self._out_fd = os.open(self.writer.temp_path, os.O_RDONLY)
            start_writeback(self._out_fd)
        except OSError:
            pass  # only a hint: the fsync at commit still makes the file durable

    def jobs(self) -> Iterator[_Job]:
        """Every planned layer with its source tensors, in plan order."""
        if not self.threaded:
            for i, lp in enumerate(self.order):
                if self.chunks is None:
                    yield self._timed_read(lp, self.order[i + 1: i + 2])
                else:
                    yield complete_job(*submit_job(lp, self.stream, self.chunks), self.pool)
            return
        while True:
            try:
                item = self._get(self._read_q)
            except _Stopped:
                self._raise_write_error()
                raise
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def write(self, name: str, outputs: dict[str, torch.Tensor], buffers: list[torch.Tensor]) -> None:
        """Hand layer `name`'s outputs to the writer; its source buffers return to the pool once they are written."""
        if not self.threaded:
            self._write(name, outputs, buffers)
            return
        self._raise_write_error()
        try:
            self._put(self._write_q, (name, outputs, buffers))
        except _Stopped:
            self._raise_write_error()
            raise

    def stream_kept(self, job: _Job, write: bool = True) -> int:
        """In the encoding thread: stream the job's large kept tensors into the output (see SourceStream.stream_kept)
        while the writer thread writes earlier layers; the count of NaN/Inf values they hold."""
        bad = 0
        for key in job.streamed:
            bad += self.stream.stream_kept(job.plan, key, self.writer, write and not bad)
        return bad

    def release(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            self.pool.release(buf)

    def finish(self) -> None:
        """Wait until everything handed to write() is in the file."""
        if not self.threaded:
            return
        self._put(self._write_q, _END)
        self._threads[-1].join()
        self._raise_write_error()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            raise self._write_error
