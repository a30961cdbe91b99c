"""Streaming stages of a conversion: read ahead, encode, write behind.

A reader thread preads the next layers' source tensors into reused buffers (converter/source_stream.py, into
converter/buffer_pool.py's buffers: pinned ones on the GPU path, filled by chunked parallel reads), the calling
thread checks and encodes them, a writer thread pwrites the outputs. Bounded queues and the buffer pool's byte
budget keep the memory in flight at a few of the largest layers, whatever the model size. converter/pipeline.py
composes these stages into `convert`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from converter.buffer_pool import POLL_S, BufferPool, Stopped
from converter.plan import ConversionPlan, LayerPlan
from converter.source_stream import Job, SourceStream, complete_job, read_job, read_order, submit_job
from inspect_tools.readers.chunked import ChunkedReader

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
# GPU path: threads reading chunks (readers.chunked.ChunkedReader), each with one request outstanding: the disk's
# queue depth. Measured on an H200 host (16 cores, virtio disk, 4.34 GB source): O_DIRECT alone reads 2.1-2.2 GB/s
# with 2-4 threads of 8 MB (cat: 1.7-1.9 GB/s); 8 or 16 threads are slower (1.6-1.7). In-process cold conversion
# reached 0.80-0.87x of cat with 4 threads, 0.75-0.79x with buffered chunks; 2/8 threads and 16 MB chunks were within
# noise.
GPU_READ_THREADS = 4
GPU_DIRECT_IO = True  # chunks not in the page cache are read with O_DIRECT (readers.chunked)
GPU_PIN_BUFFERS = True  # pinned pool buffers (fast asynchronous host-to-device copies) once CUDA is up
# GPU path: the pool's pinned buffers are slices of one block locked in the background once CUDA is up
# (gpu_io.PinnedArena), and the encoder's kernels run once on a tiny tensor meanwhile, so a fresh process does not
# pay for pinning and kernel loading in the stream. Measured in fresh processes (H200 host, 4.34 GB source,
# interleaved, 3 cold runs each): cold convert 3.87 s -> 3.59 s (arena), 3.62 s (kernels), 3.67 s (both);
# peak RSS 1152 -> 1090 MB.
GPU_PIN_ARENA = True
GPU_WARM_KERNELS = True
WRITEBACK_BYTES = 64 << 20  # output written between two background write-back requests


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


_END = object()  # the end of a stage's stream


@dataclass
class _Failure:
    error: BaseException


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
        # on the GPU path each tensor's buffer has room for alignment (readers.chunked.ChunkedReader.slack)
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
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue
        raise Stopped()

    def _get(self, q: queue.Queue) -> object:
        while not self._stop.is_set():
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                continue
        raise Stopped()

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
        except Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self._hand_over(exc)

    def _hand_over(self, exc: BaseException) -> None:
        """Pass a reading thread's failure to the encoding thread, unless the run was stopped meanwhile."""
        try:
            self._put(self._read_q, _Failure(exc))
        except Stopped:
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
        except Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self._hand_over(exc)

    def _write_all(self) -> None:
        try:
            while (item := self._get(self._write_q)) is not _END:
                self._write(*item)
        except Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by write()/finish()
            self._write_error = exc
            self._stop.set()
            self.pool.stop()

    def _timed_read(self, lp: LayerPlan, following: list[LayerPlan]) -> Job:
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

    def jobs(self) -> Iterator[Job]:
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
            except Stopped:
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
        except Stopped:
            self._raise_write_error()
            raise

    def stream_kept(self, job: Job, write: bool = True) -> int:
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
