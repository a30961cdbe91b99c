"""What a fresh process pays for on its first GPU work, started in the background while the command still reads
headers and plans: the CUDA context and the pinned-memory allocator (a few hundred milliseconds), then the command's
kernels, run once on a tiny tensor (CUDA loads each kernel on its first launch). A command starts one where it
knows its device, and joins it before it ends (no daemon thread may be left inside a CUDA call at exit)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class CudaWarmUp:
    """Start the context on `device` now, then run `kernels(device)` once (errors are ignored: the command's own
    call raises them where they can be reported)."""

    def __init__(self, device: str | torch.device, kernels: Callable[[torch.device], None] | None = None) -> None:
        self.device = torch.device(device)
        self._kernels = kernels
        self.context = threading.Thread(target=self._start_context, name="nvdiag-cuda-init", daemon=True)
        self.kernels = threading.Thread(target=self._run_kernels, name="nvdiag-cuda-kernels", daemon=True)
        self.context.start()

    def _start_context(self) -> None:
        try:
            torch.empty(1, device=self.device)
            torch.empty(1, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            return
        if self._kernels is not None:
            self.kernels.start()

    def _run_kernels(self) -> None:
        try:
            self._kernels(self.device)
        except (RuntimeError, ValueError):
            pass

    def context_ready(self) -> bool:
        return not self.context.is_alive()

    def wait_context(self) -> None:
        self.context.join()

    def join(self) -> None:
        """Before the process may end: no daemon thread left inside a CUDA call."""
        self.context.join()
        if self.kernels.ident is not None:
            self.kernels.join()
