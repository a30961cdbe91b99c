"""Streaming, atomic safetensors output: the header is fixed up front, tensors are written one at a time into a
temporary file beside the target, and only a committed file is renamed into place.

Layout matches safetensors.torch.save_file byte for byte (checked by tests against safetensors 0.8):
- tensors are laid out sorted by dtype rank (the safetensors `Dtype` enum) descending, then by name ascending;
- the header is compact JSON (no spaces, non-ASCII kept as UTF-8) with `__metadata__` first when metadata is given
  (even when empty), padded with spaces so the data starts at a multiple of 8 bytes.
save_file writes metadata keys in hash order (it differs run to run); we sort them so output is deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from inspect_tools.errors import OutputError
from inspect_tools.interrupts import (
    CLEANUP_SIGNALS,  # noqa: F401 - re-exported: the signals a writer turns into a clean exit
    TerminateRequested,
    after_publish,
    signals_held,
    writing_ended,
    writing_started,
)
from inspect_tools.output_paths import check_output_path  # noqa: F401 - re-exported: writers check OUT
from inspect_tools.readers.safetensors_dtypes import DTYPE_NAMES, DTYPES, byte_length
from inspect_tools.temporaries import (
    TEMP_SUFFIX,  # noqa: F401 - re-exported for callers and tests that look for temporaries
    create_temporary,
    publish,
    sweep_leftovers,
)

HEADER_ALIGNMENT = 8
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
SIGINT_EXIT_CODE = 128 + signal.SIGINT  # ... and by Ctrl-C


Entry = tuple[str, str, Sequence[int]]  # (name, safetensors dtype name, shape)


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any threads write files.
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file; mkstemp's 0o600 is too private


def plan_order(entries: Iterable[Entry]) -> list[Entry]:
    """Entries in the order save_file lays them out: dtype rank descending, then name (code point order, which is
    UTF-8 byte order, as Rust's String comparison)."""
    return sorted(entries, key=lambda e: (-DTYPES[e[1]].rank, e[0]))


def _check_entries(entries: Sequence[Entry]) -> None:
    seen: set[str] = set()
    for name, dtype, shape in entries:
        if name in seen:
            raise ValueError(f"tensor {name!r} planned twice")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by the safetensors header")
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
        if byte_length(DTYPES[dtype], tuple(shape)) is None:
            raise ValueError(f"tensor {name!r}: {dtype} shape {list(shape)} does not fill whole bytes")
        seen.add(name)


def build_header(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """(8-byte length + padded JSON header, absolute data offset of each tensor) for entries already in plan order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"metadata must map str to str; offending keys: {bad[:5]}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    relative: dict[str, int] = {}
    position = 0
    for name, dtype, shape in entries:
        nbytes = byte_length(DTYPES[dtype], tuple(shape)) or 0
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [position, position + nbytes]}
        relative[name] = position
        position += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    data_start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: data_start + off for name, off in relative.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian storage bytes without an extra copy when it is already contiguous on CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class _BackgroundSync:
    """fsync of a file on a thread of its own (fsync releases the GIL), on a duplicate of the writer's descriptor
    that the thread closes itself: the writer may close or delete its file meanwhile without waiting for the disk."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="nvdiag-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self._fd)

    def wait(self) -> None:
        """Until the fsync has ended; its error, if any, raised here."""
        self._thread.join()
        if self.error is not None:
            raise self.error


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not every platform lets a folder be opened, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int, out: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:  # a full disk or quota names no path of its own: name OUT, which is what the user gave
        raise _write_failed(exc, out) from None


def _write_failed(exc: OSError, out: Path) -> OutputError:
    return OutputError(f"{exc.strerror or exc} while writing it; nothing was published", str(out))


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, atomically.

    with SafetensorsWriter(out, [(name, "F32", [4, 8]), ...], {"k": "v"}) as w:
        for name in w.order:
            w.write(name, tensor_for(name))
        w.commit()

    Tensors may be written in any order (each lands at its precomputed offset); `order` is the sequential one.
    Leaving the block without commit() - by an exception, Ctrl-C, SIGTERM (or any signal of
    interrupts.CLEANUP_SIGNALS) or simply returning - removes the temporary file and leaves an existing `path`
    untouched. overwrite=False publishes only if `path` still does not exist when the file is complete (another
    process may have written it meanwhile): OutputError otherwise. Opening notices temporaries that an earlier run
    killed outright (SIGKILL, power loss) left beside `path` (temporaries.sweep_leftovers).
    """

    def __init__(self, path: str | Path, entries: Iterable[Entry], metadata: Mapping[str, str] | None = None,
                 check_space: bool = True, overwrite: bool = True) -> None:
        self.path = Path(path)
        planned = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in entries]
        _check_entries(planned)
        self.entries = plan_order(planned)
        self._header, self._offsets = build_header(self.entries, metadata)
        self._specs = {name: (dtype, shape) for name, dtype, shape in self.entries}
        self.total_bytes = len(self._header) + sum(
            byte_length(DTYPES[dtype], shape) or 0 for _, dtype, shape in self.entries)
        self._check_space = check_space
        self.overwrite = overwrite
        self._written: set[str] = set()
        # tensors written in parts (write_part): name -> byte ranges within it written or being written. The lock
        # guards this bookkeeping: a converter's encoding thread and its writer thread may both write.
        self._parts: dict[str, list[tuple[int, int]]] = {}
        self._part_bytes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.temp_path: Path | None = None
        self.committed = False
        self._handling_signals = False  # whether open() took the cleanup signals over (main thread)
        self._sync: _BackgroundSync | None = None  # sync_early()'s fsync, which commit() waits for

    @property
    def order(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    def __enter__(self) -> SafetensorsWriter:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.abort()
        if isinstance(exc, TerminateRequested):
            # The temporary file is gone: say so in one line and end with the code a shell expects for the signal.
            name = signal.Signals(exc.signum).name
            print(f"nvdiag: interrupted by {name}: {self.path} was not written (temporary file removed)",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + exc.signum) from None

    def open(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            raise OutputError("output folder does not exist", str(folder))
        sweep_leftovers(self.path)  # before the space check: a killed run's leftover may be what fills the disk
        if self._check_space:
            ensure_free_space(folder, self.total_bytes)
        self._handling_signals = writing_started()
        try:  # __exit__ does not run when __enter__ fails: clean up here
            # A signal between creating the file and remembering its name would leak it: hold signals for those
            # steps (a held signal is delivered, and our handler runs, right after).
            with signals_held():
                self._fd, self.temp_path = create_temporary(self.path)
            _pwrite_all(self._fd, memoryview(self._header), 0, self.path)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._check_writable()
        if name not in self._specs:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        with self._lock:
            if name in self._written or name in self._parts:
                raise ValueError(f"tensor {name!r} written twice")
        dtype, shape = self._specs[name]
        got_dtype = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        if got_dtype != dtype:
            raise ValueError(f"tensor {name!r}: planned {dtype}, got {got_dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: planned shape {list(shape)}, got {list(tensor.shape)}")
        data = tensor_bytes(tensor)
        expected = byte_length(DTYPES[dtype], shape)
        if len(data) != expected:
            raise ValueError(f"tensor {name!r}: {len(data)} bytes, planned {expected}")
        _pwrite_all(self._fd, data, self._offsets[name], self.path)
        with self._lock:
            self._written.add(name)

    def write_part(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Write `data` (of the tensor's planned dtype, any shape) at byte `byte_offset` within tensor `name`, so a
        tensor too large to hold whole can be written piece by piece. It counts as written once its parts cover all
        of its bytes; commit() refuses the file while any byte range is unwritten. Parts may not overlap."""
        self._check_writable()
        if name not in self._specs:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        dtype, shape = self._specs[name]
        got_dtype = DTYPE_NAMES.get(data.dtype, str(data.dtype))
        if got_dtype != dtype:
            raise ValueError(f"tensor {name!r}: planned {dtype}, got {got_dtype}")
        raw = tensor_bytes(data)
        expected = byte_length(DTYPES[dtype], shape) or 0
        end = byte_offset + len(raw)
        if byte_offset < 0 or end > expected:
            raise ValueError(f"tensor {name!r}: part [{byte_offset}, {end}) is outside its {expected} bytes")
        with self._lock:
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            parts = self._parts.setdefault(name, [])
            if any(start < end and byte_offset < stop for start, stop in parts):
                raise ValueError(f"tensor {name!r}: part [{byte_offset}, {end}) overlaps one already written")
            parts.append((byte_offset, end))
        _pwrite_all(self._fd, raw, self._offsets[name] + byte_offset, self.path)
        with self._lock:  # counted once written: a tensor is complete only when all of its bytes are in the file
            self._part_bytes[name] = self._part_bytes.get(name, 0) + len(raw)
            if self._part_bytes[name] == expected:
                self._written.add(name)
                del self._parts[name], self._part_bytes[name]

    def _check_writable(self) -> None:
        if self._fd is None:
            raise RuntimeError("SafetensorsWriter is not open (use it as a context manager)")
        if self._sync is not None:
            raise RuntimeError("SafetensorsWriter: written after sync_early()")

    def sync_early(self) -> None:
        """Start commit()'s fsync now, in the background, once every tensor is written: checks of the finished
        temporary file (convert's gate reads it) then overlap with the disk's write-out instead of preceding it.
        Writing afterwards is refused; a failed fsync is reported by commit(), and abort() does not wait for it."""
        if self._fd is None:
            raise RuntimeError("SafetensorsWriter is not open")
        if self._sync is None:
            self._sync = _BackgroundSync(os.dup(self._fd))

    def commit(self) -> Path:
        """fsync, publish (rename, or link when not overwriting), fsync the folder. Every planned tensor must have
        been written."""
        if self._fd is None or self.temp_path is None:
            raise RuntimeError("SafetensorsWriter is not open")
        missing = [name for name in self.order if name not in self._written]
        if missing:
            raise OutputError(f"{len(missing)} planned tensors were never written (first: {missing[0]!r})",
                              str(self.path))
        try:
            # a network or delayed-allocation file system may report a full disk only now
            if self._sync is not None:
                self._sync.wait()
            else:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.chmod(self.temp_path, FILE_MODE)
        except OSError as exc:
            raise _write_failed(exc, self.path) from None
        # Held from publishing until the writer has forgotten its temporary: a signal in between would otherwise
        # report a complete output as "not written" (and exit by the signal).
        with signals_held():
            publish(self.temp_path, self.path, overwrite=self.overwrite)
            self.temp_path = None
            self.committed = True
            after_publish(self._handling_signals, self.path)
            self._handling_signals = False
        _fsync_folder(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (if any); an existing target is never touched."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.temp_path is not None:
            self.temp_path.unlink(missing_ok=True)
            self.temp_path = None
        writing_ended(self._handling_signals)
        self._handling_signals = False


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def ensure_free_space(folder: str | Path, nbytes: int) -> None:
    """OutputError naming both numbers when `folder`'s file system has less than `nbytes` free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise OutputError(f"cannot check free space: {exc.strerror or exc}", str(folder)) from None
    if free < nbytes:
        raise OutputError(f"not enough free space: the output needs {nbytes} bytes ({_gib(nbytes)}), "
                          f"{free} bytes ({_gib(free)}) are free", str(folder))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError("output folder does not exist", str(path.parent))
    fd, name = create_temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(name, FILE_MODE)
        os.replace(name, path)
    except OSError as exc:
        name.unlink(missing_ok=True)
        raise _write_failed(exc, path) from None
    except BaseException:
        name.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path
