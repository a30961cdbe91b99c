"""Starting the CUDA driver's context before torch is imported.

A `--device cuda` command in a fresh process waits for torch's import (1.3-1.8 s on the H200 hosts) and then for
CUDA's start: cuInit and the device's primary context, 0.22-0.35 s more after the import in probes there. Neither
needs the other: the driver can start, through ctypes and libcuda alone, while torch is still being imported (a
ctypes call releases the GIL), and torch's runtime then adopts the primary context that already exists (the CUDA
runtime API uses the device's primary context: CUDA Programming Guide, "Interoperability between Runtime and Driver
APIs"). Probed on an H200 host, four fresh processes each, interleaved: torch imported at 1.39-1.80 s and its first
CUDA tensor 0.22-0.35 s later; with the driver started first, the first CUDA tensor 0.01-0.02 s after the import.

Only a head start: any failure (no libcuda, no device, an error code) is ignored, and torch's own start reports
what is wrong where the command can say so. The module imports neither torch nor anything heavy.
"""

from __future__ import annotations

import ctypes
import threading

LIBCUDA = "libcuda.so.1"  # the driver library's soname on Linux (the only platform the GPU path runs on)

_started: threading.Thread | None = None


def _retain_primary_context(ordinal: int) -> None:
    try:
        lib = ctypes.CDLL(LIBCUDA)
        if lib.cuInit(0) != 0:
            return
        device = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return
        # retained, never released: torch retains the same context, which lives until the process ends
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctypes.c_void_p()), device)
    except (OSError, AttributeError):
        pass


def start(ordinal: int = 0) -> None:
    """Start the driver and device `ordinal`'s primary context in the background (torch's "cuda" is device 0 of the
    visible ones, which the driver numbers the same way); once per process. Not a daemon thread: a normal exit waits
    for it (a few hundred milliseconds at most) instead of ending the interpreter around a thread inside a C call."""
    global _started
    if _started is None:
        _started = threading.Thread(target=_retain_primary_context, args=(ordinal,), name="nvdiag-cuda-driver")
        _started.start()


def start_for(device: str) -> None:
    """start() for a command's --device: "cuda" is device 0, "cuda:N" device N; anything else (the CPU, or a
    spelling the command itself will refuse) starts nothing."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        start(int(index or 0))


def join() -> None:
    if _started is not None:
        _started.join()
