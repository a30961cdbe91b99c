"""Checks made before any byte of an input is interpreted: the path exists, is a non-empty file, and is not a pickle.

nvdiag never unpickles anything. Pickle checkpoints are refused by name and by content so that a renamed `.pt`
gets the same clear explanation instead of a confusing parse error.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from inspect_tools.errors import InputError, UnsafeFormatError

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"})

# How many leading bytes identify a container; enough for the pickle, zip and safetensors checks below.
SNIFF_BYTES = 16

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # the PROTO opcode that opens every protocol 2+ pickle
PICKLE_OPCODE_BYTES = frozenset(op.code.encode("latin-1")[0] for op in pickletools.opcodes)

CONVERT_ADVICE = (
    "nvdiag never unpickles files because unpickling can run arbitrary code. Convert it on a trusted machine: "
    "sd = torch.load(path, map_location='cpu', weights_only=True); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')"
)


def require_existing(path: Path) -> None:
    """InputError unless `path` exists (a file or a folder)."""
    if not path.exists():
        kind = "broken symbolic link" if path.is_symlink() else "no such file or folder"
        raise InputError(kind, str(path))


def require_file(path: Path) -> None:
    """InputError unless `path` is an existing, non-empty regular file."""
    require_existing(path)
    if path.is_dir():
        raise InputError("is a folder, a checkpoint file is needed here", str(path))
    if not path.is_file():
        raise InputError("is not a regular file", str(path))
    if path.stat().st_size == 0:
        raise InputError("file is empty (0 bytes)", str(path))


def read_head(path: Path, size: int = SNIFF_BYTES) -> bytes:
    """The first `size` bytes of a file (fewer if it is shorter); InputError if it cannot be read."""
    try:
        with path.open("rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None


def looks_like_pickle(head: bytes) -> bool:
    """A protocol 2-5 pickle: PROTO opcode, a protocol number, then another opcode.

    A safetensors file whose header is 0x0280..0x0580 bytes long also starts with 0x80 0x02..0x05, but its third
    byte is 0x00 (not an opcode) for headers under 64 KiB and its ninth byte is always '{'; both are checked."""
    if len(head) < 3 or head[0] != PICKLE_PROTO or not 2 <= head[1] <= 5:
        return False
    if head[2] not in PICKLE_OPCODE_BYTES:
        return False
    return head[8:9] != b"{"


def is_torch_zip(path: Path) -> bool:
    """torch.save's zip format: a zip archive holding `<archive>/data.pkl` (the pickled object graph)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def refuse_pickle(path: Path, head: bytes | None = None) -> None:
    """UnsafeFormatError if `path` is a pickle-based checkpoint by its name or by its first bytes.

    Only the first bytes and (for zips) the archive's table of contents are read; nothing is unpickled."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(f"pickle-based checkpoint ({path.suffix}) refused. {CONVERT_ADVICE}", str(path))
    head = read_head(path) if head is None else head
    if looks_like_pickle(head):
        raise UnsafeFormatError(f"file content is a Python pickle, refused. {CONVERT_ADVICE}", str(path))
    if head.startswith(ZIP_MAGIC) and is_torch_zip(path):
        raise UnsafeFormatError(f"file is a torch.save zip (pickle inside), refused. {CONVERT_ADVICE}", str(path))


def check_input_file(path: Path) -> bytes:
    """Every check a single input file gets before parsing; returns its first bytes for format sniffing."""
    require_file(path)
    head = read_head(path)
    refuse_pickle(path, head)
    return head


def read_at_most(path: Path, limit: int, too_large: str, what: str = "") -> bytes:
    """The bytes of a small file the user hands over (a preset, a report, a config), refused with InputError naming
    the file past `limit` bytes (`too_large` says why). Reads at most limit + 1 bytes, so a file that grows while
    read, or a device that reports size 0, cannot make it hold more. what: named in the read-error line."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read{' the ' + what if what else ''}: {exc.strerror or exc}", str(path)) from None
    if len(data) > limit:
        raise InputError(too_large, str(path))
    return data
