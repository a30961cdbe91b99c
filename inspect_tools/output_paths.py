"""Where a command may write: checked before any long work, and without torch, so that a command can check its
output paths before it imports torch (and keep reading its input meanwhile: inspect_tools.readers.prefetch)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from inspect_tools.errors import OutputError


def check_output_path(out: str | Path, inputs: Iterable[str | Path]) -> Path:
    """OUT as an absolute path, refusing an OUT that is (or links to, or is a hard link of) one of the inputs,
    that is a folder, or whose folder does not exist."""
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputError("output folder does not exist", str(out.parent))
    if out.is_dir():
        raise OutputError("output path is a folder, a file name is needed", str(out))
    resolved = out.resolve()
    for item in inputs:
        source = Path(item)
        if resolved == source.resolve() or (out.exists() and source.exists() and os.path.samefile(out, source)):
            raise OutputError(f"output would overwrite the input {source}", str(out))
    return resolved
