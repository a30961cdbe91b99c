"""Typed errors for bad input. The CLI turns every one of them into one line on stderr and exit code 2; the one
exception is InternalError (a bug in nvdiag, exit 3), kept apart so that a crash never reads as the user's fault."""

from __future__ import annotations


class NvdiagError(Exception):
    """Base of every error nvdiag reports to the user without a traceback."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InputError(NvdiagError):
    """An input file or folder is missing, unreadable, malformed, truncated or hostile."""


class UnsafeFormatError(InputError):
    """A pickle-based checkpoint: refused before a single byte is unpickled."""


class UsageError(NvdiagError):
    """Options that contradict each other or name things that do not exist."""


class OutputError(NvdiagError):
    """The output cannot be written (would overwrite an input, no disk space, folder missing)."""


class InternalError(NvdiagError):
    """A bug in nvdiag found while running (a lint rule that crashed on a file that was read without error): exit 3,
    never 2, so that scripts and users do not take it for bad input, with a request to report it."""

    exit_code = 3
