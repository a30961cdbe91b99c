"""What a termination signal does while nvdiag writes an output, and after it has published one.

While a temporary output file exists, every signal that would end the process without Python's cleanup (SIGTERM,
SIGHUP, SIGQUIT, SIGALRM, SIGUSR1, SIGUSR2) and Ctrl-C raise TerminateRequested in the main thread, so the writer's
`with` block unwinds and removes its temporary file. A signal that is ignored (nohup's SIGHUP, a background job's
SIGINT) stays ignored; a handler of the caller's own for one of the optional signals (a timeout's SIGALRM) stays in
place. SIGKILL cannot be caught: the writer names its temporaries so that the next run can recognise them.

Once an output is published the run is complete; what is left is printing its summary. Within `command_scope()`
(the CLI's main()) a signal arriving from then on is noted and reported instead of turning a complete run into a
signal exit. Library callers get no such shield: their own handlers are back as soon as the writer is done.

Torch-free: main() imports it for every command.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

# Ctrl-C and SIGTERM were always taken over while writing; the others only where their action is the default one.
ALWAYS_HANDLED = (signal.SIGTERM, signal.SIGINT)
OPTIONAL_HANDLED = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGQUIT", "SIGALRM", "SIGUSR1", "SIGUSR2")
                         if hasattr(signal, name))
CLEANUP_SIGNALS = ALWAYS_HANDLED + OPTIONAL_HANDLED

Handlers = dict[int, Any]


class TerminateRequested(BaseException):
    """Raised by our handler so the writer's `with` block unwinds and removes the temporary file. A BaseException, so
    no `except Exception` between here and the writer can swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _in_main_thread() -> bool:
    # Signal handlers can only be set from the main thread; elsewhere the caller's own handling applies.
    return threading.current_thread() is threading.main_thread()


def _takes_over(signum: int) -> bool:
    current = signal.getsignal(signum)
    if current is signal.SIG_IGN:
        return False
    return signum in ALWAYS_HANDLED or current in (signal.SIG_DFL, None)


def _replace(handler: Any) -> Handlers:
    """Set `handler` for every cleanup signal we may take over; the handlers it replaced, to restore."""
    if not _in_main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in CLEANUP_SIGNALS if _takes_over(signum)}


def restore(handlers: Handlers | None) -> None:
    for signum, handler in (handlers or {}).items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise TerminateRequested(signum)


# Writers open in the main thread now; the handlers they replaced, given back when the last one is done. Counted, so
# that writers opened and closed in any order (two outputs at once) restore what was there before the first.
_writing = 0
_saved: Handlers = {}


def writing_started() -> bool:
    """A writer created its temporary: from now on the cleanup signals raise TerminateRequested. False (nothing
    changed) outside the main thread; pass the result to writing_ended() or after_publish()."""
    global _writing, _saved
    if not _in_main_thread():
        return False
    if _writing == 0:
        _saved = _replace(_raise_terminate)
    _writing += 1
    return True


def writing_ended(started: bool) -> None:
    global _writing, _saved
    if not started:
        return
    _writing -= 1
    if _writing == 0:
        restore(_saved)
        _saved = {}


@contextmanager
def signals_held() -> Iterator[None]:
    """Block the cleanup signals for a few statements (main thread, POSIX); pending ones are delivered on exit."""
    if not hasattr(signal, "pthread_sigmask") or not _in_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _CommandScope:
    def __init__(self) -> None:
        self.replaced: Handlers = {}
        self.late: int | None = None
        self.published: Path | None = None

    def note(self, signum: int, frame: FrameType | None) -> None:
        if self.late is None:
            self.late = signum

    def shield(self, published: Path) -> None:
        self.published = published
        if not self.replaced:
            self.replaced = _replace(self.note)


_scope: _CommandScope | None = None


def after_publish(started: bool, published: Path) -> None:
    """The writer's last step, called with the signals held: its handlers go (if it was the last writer), and within
    a command scope a signal arriving from now on is noted instead of obeyed (the output is complete)."""
    writing_ended(started)
    if _writing == 0 and _scope is not None and _in_main_thread():
        _scope.shield(published)


@contextmanager
def command_scope() -> Iterator[None]:
    """One CLI command: after it, the shield (if an output was published) goes and a noted signal is reported."""
    global _scope
    scope = _scope = _CommandScope()
    try:
        yield
    finally:
        _scope = None
        restore(scope.replaced)
        if scope.late is not None:
            name = signal.Signals(scope.late).name
            print(f"nvdiag: {name} arrived after {scope.published} was published: the output is complete",
                  file=sys.stderr, flush=True)
