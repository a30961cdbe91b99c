"""The temporary file an output is written to before it is published, and what a later run does with one that a
killed run left behind.

A temporary lives beside OUT (a rename is atomic only within one file system) and is named

    .<OUT name>.<pid>-<host tag>-<random>.nvdiag-tmp

hidden, recognisably nvdiag's and OUT's, and saying which process on which machine wrote it. The host tag hashes the
host name and the boot id, so a PID is only ever compared with the processes of the machine and boot that wrote it.
A long OUT name is shortened (its start plus a hash of all of it) so the whole name fits NAME_MAX: a legal
240-character OUT must not fail because its temporary name is longer than the file system allows.

SIGKILL, a power loss or an OOM kill leave the temporary (a full-size file). The next run writing the same OUT removes
it when it can prove it stale - written on this host in this boot by a process that no longer exists - and otherwise
says what the file is and that it may be removed; it never touches a temporary of a process that is still running.

Publishing without --force links the finished temporary to OUT (os.link fails if OUT exists), so of two runs writing
the same new OUT at once exactly one publishes and the other is refused; os.replace would let both "succeed", the
last one silently replacing the first. Where the file system has no hard links, an exclusively created placeholder
(O_EXCL) claims OUT and the rename replaces it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

from inspect_tools.errors import OutputError

TEMP_SUFFIX = ".nvdiag-tmp"
DEFAULT_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
HOST_TAG_LEN = 6
# A live process's temporary is not mentioned while it is being written; untouched this long, its PID may belong to
# another program by now, so the file is named as a possible leftover (never removed).
QUIET_AFTER_S = 600
_OURS = re.compile(r"(?P<pid>\d{1,7})-(?P<host>[0-9a-f]{" + str(HOST_TAG_LEN) + r"})-[0-9a-f]{8}"
                   + re.escape(TEMP_SUFFIX))
# nvdiag before this naming used tempfile.mkstemp: 8 characters of [a-z0-9_], no owner to check
_MKSTEMP = re.compile(r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# os.link failures that mean "this file system has no hard links", not "OUT exists" or "no permission"
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def host_tag() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{boot}".encode()).hexdigest()[:HOST_TAG_LEN]


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NAME_MAX


def temp_stem(out: Path) -> str:
    """The OUT part of its temporaries' names: the name itself, or its start and a hash when the whole temporary name
    would pass NAME_MAX. Deterministic, so a later run finds the temporaries of the same OUT."""
    name = out.name
    budget = _name_max(out.parent) - len(f"..{'9' * 7}-{'f' * HOST_TAG_LEN}-{'f' * 8}{TEMP_SUFFIX}")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= budget:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    start = raw[: budget - len(digest) - 1].decode("utf-8", "ignore")  # cut on a character boundary
    return f"{start}~{digest}"


def create_temporary(out: Path) -> tuple[int, Path]:
    """A new, empty temporary beside `out` (mode 0600 until published), opened for writing: (fd, path).
    OutputError naming OUT when its folder does not let us create a file (read-only, no permission, full)."""
    stem, tag, pid = temp_stem(out), host_tag(), os.getpid()
    for _ in range(100):
        path = out.parent / f".{stem}.{pid}-{tag}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), path
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create a file in {out.parent}: {exc.strerror or exc}", str(out)) from None
    raise OutputError(f"cannot create a temporary file in {out.parent}: every name tried exists", str(out))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user
        return True
    return True


def _classify(rest: str, tag: str) -> tuple[bool | None, str]:
    """(stale, what it is) for a temporary of OUT whose name ends in `rest`; stale is None for the temporary of a
    process that is running now."""
    ours = _OURS.fullmatch(rest)
    if ours is None:
        return False, "a temporary file of an nvdiag run"
    pid = int(ours["pid"])
    if ours["host"] != tag:
        return False, f"a temporary file of nvdiag process {pid} on another machine or before a reboot"
    if pid == os.getpid() or pid < 1 or _alive(pid):
        return None, f"the temporary file of nvdiag process {pid}, still running (or its PID reused)"
    return True, f"a temporary file of nvdiag process {pid}, which no longer exists"


def _recently_written(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < QUIET_AFTER_S
    except OSError:
        return True  # gone meanwhile: its writer finished


def leftovers(out: Path) -> list[Path]:
    """Temporaries of `out` (either naming) in its folder."""
    prefix = f".{temp_stem(out)}."
    try:
        names = [entry.name for entry in os.scandir(out.parent)]
    except OSError:
        return []
    return sorted(out.parent / n for n in names if n.startswith(prefix) and n.endswith(TEMP_SUFFIX)
                  and (_OURS.fullmatch(n[len(prefix):]) or _MKSTEMP.fullmatch(n[len(prefix):])))


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove `out`'s provably stale temporaries (one line each on stderr) and name the others; the removed paths.
    Never raises: a leftover that cannot be removed is reported, and the run goes on."""
    tag, removed = host_tag(), []
    prefix_len = len(f".{temp_stem(out)}.")
    for path in leftovers(out):
        stale, what = _classify(path.name[prefix_len:], tag)
        if stale is None and _recently_written(path):
            continue  # another run writing OUT right now: publishing decides between us, nothing to tell
        if stale:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                _say(f"{path} is {what}, left by a killed run; it could not be removed ({exc.strerror or exc}): "
                     "remove it by hand")
                continue
            removed.append(path)
            _say(f"removed {path}: {what}, left by a killed run")
        else:
            _say(f"{path} is {what}; if no nvdiag is writing {out.name} now it was left by a killed run and may be "
                 "removed")
    return removed


def _say(line: str) -> None:
    print(f"nvdiag: note: {line}", file=sys.stderr, flush=True)


def publish(temp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temporary to `out`: replace what is there when `overwrite`, else only if `out` does not exist
    (OutputError if it does: another process published it after this run checked). The temporary is gone after a
    successful call; on OutputError it is left for the caller's cleanup."""
    try:
        if overwrite:
            os.replace(temp, out)
            return
        try:
            os.link(temp, out)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            _claim_and_replace(temp, out)
            return
    except FileExistsError:
        raise OutputError("was created by another process while this run wrote it; pass --force to overwrite it",
                          str(out)) from None
    except OSError as exc:
        raise OutputError(f"cannot publish: {exc.strerror or exc}", str(out)) from None
    try:  # OUT is published: the second name of the file goes; should that fail, the next run reports it
        temp.unlink()
    except OSError:
        pass


def _claim_and_replace(temp: Path, out: Path) -> None:
    # FileExistsError from here is the same refusal as from os.link
    os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.replace(temp, out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
