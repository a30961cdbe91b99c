"""What the commands tell a user to do next: --layers globs checked before any work, and follow-up commands
spelled with the user's own paths, so that every hint can be pasted and run as printed."""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable
from pathlib import Path

from inspect_tools.errors import UsageError

# Causes `nvdiag fix` repairs once a roundtrip against a reference has found them (converter/fix.py FIXABLE).
FIXABLE_BY_VALUES = ("scale-layout-linear", "nibble-order", "scale2-reciprocal")
PLAIN_FLOAT = {"f32", "f16", "bf16", "fp32", "fp16", "float32", "float16", "bfloat16"}


def check_glob(pattern: str | None, option: str = "--layers") -> None:
    """A glob fnmatch would silently read as a literal (an unclosed '[') is a usage error, not an empty result."""
    if pattern is None:
        return
    if not pattern.strip():
        raise UsageError(f"{option}: empty pattern (give a glob such as 'blocks.0.*')")
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            # fnmatch: a ']' right after '[' or '[!' is a literal member of the set, not its end
            start = i + 1 + (pattern[i + 1:i + 2] == "!")
            if pattern.find("]", start + 1) < 0:
                raise UsageError(f"{option} {pattern!r}: '[' at position {i + 1} is never closed by ']' "
                                 "(write '[[]' for a literal '[')")
            i = pattern.find("]", start + 1)
        i += 1


def no_match(pattern: str, path: str | Path, names: Iterable[str], what: str = "layer") -> UsageError:
    """The error for a --layers glob that selects nothing: say so, with a few names it could have matched."""
    names = list(names)
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3) or names[:3]
    shown = f" (names look like: {', '.join(close)})" if close else ""
    return UsageError(f"--layers {pattern!r} matches no {what} of {Path(path).name}{shown}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for a near miss, '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def command(*argv: str | Path) -> str:
    """An nvdiag command line a shell runs as printed (paths with spaces quoted)."""
    return shlex.join(["nvdiag", *(str(a) for a in argv)])


def free_name(path: str | Path, suffix: str) -> Path:
    """'model.safetensors' -> 'model_fixed.safetensors' beside it, numbered when that exists already (a hint must
    not lead into fix's or convert's refusal to overwrite)."""
    path = Path(path)
    base = path.name.removesuffix(".safetensors").removesuffix(".index.json").removesuffix(".gguf")
    folder = path.parent  # a sharded source's folder or index: the new file goes beside it
    for n in range(1, 100):
        candidate = folder / f"{base}_{suffix}{'' if n == 1 else n}.safetensors"
        if not candidate.exists():
            return candidate
    return folder / f"{base}_{suffix}.safetensors"


def display(path: str | Path) -> str:
    """A path as the user can type it from where they are: relative when below the working directory."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def relative_like(new: Path, given: str | Path) -> str:
    """`new` (a file beside `given`) spelled the way the user spelled `given`: relative stays relative."""
    return str(new) if Path(given).is_absolute() else display(new)


def roundtrip_next(causes: Iterable[str], path: str | Path, ref: str | Path, ref_is_float: bool,
                   preset: str) -> str | None:
    """The command that repairs what a roundtrip found: `nvdiag fix` with the reference when every cause has a
    lossless remedy (fix needs the reference to see value-level causes), else a conversion from the float
    source (REF itself when it is one)."""
    causes = set(causes)
    if not causes:
        return None
    if causes <= set(FIXABLE_BY_VALUES):
        return command("fix", path, relative_like(free_name(path, "fixed"), path), "--against", ref)
    source = str(ref) if ref_is_float else "SOURCE"
    line = command("convert", source, relative_like(free_name(path, "nvdiag"), path), "--preset", preset)
    if not ref_is_float:
        line += "    # SOURCE: the FP32/FP16/BF16 checkpoint PATH was made from"
    return line


SAFETENSORS_HEADER_LIMIT = 100_000_000  # the same bound the safetensors reader applies


def container_hint(path: str | Path) -> str | None:
    """What a file that failed to open really is, from its first bytes, when that is not what its name says:
    a safetensors file named .gguf, a GGUF file named .safetensors, an HTML page or text saved under a checkpoint's
    name. None when the bytes agree with the name (the reader's own message is then the whole story)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    kind = _sniff(head)
    named = "gguf" if path.suffix.lower() == ".gguf" else "safetensors" if path.suffix.lower() in (
        ".safetensors", ".sft") else None
    if kind == named or named is None and kind in ("gguf", "safetensors"):
        return None
    if path.suffix.lower() == ".json":
        return None  # an index.json is text by design: the reader's message says what is wrong with it
    if kind == "gguf":
        return "this is a GGUF file: give it a .gguf name"
    if kind == "safetensors":
        return "this is a safetensors file: give it a .safetensors name"
    if kind == "html":
        return "this is an HTML page, not a checkpoint (a failed download?): download the file again"
    if kind == "text":
        shown = head[:24].decode("utf-8", "replace").splitlines()[0] if head.strip() else ""
        return f"this is a text file (it starts with {shown!r}), not a checkpoint: check the path or download again"
    return "neither a safetensors nor a GGUF file (a truncated download or another format?): check the path"


def _sniff(head: bytes) -> str:
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{":
        return "safetensors"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "html"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "text" if text.isprintable() or all(c.isprintable() or c.isspace() for c in text) else "binary"


# Suffixes of other containers: a file nvdiag writes under one of them would be safetensors under a lying name.
OTHER_CONTAINERS = (".gguf", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".onnx")


def check_safetensors_out(out: str | Path) -> None:
    """nvdiag writes safetensors only: refuse an OUT named like another container before any work is done."""
    out = Path(out)
    if out.suffix.lower() in OTHER_CONTAINERS:
        raise UsageError(f"nvdiag writes safetensors only, not {out.suffix}: name the output "
                         f"{out.with_suffix('.safetensors').name}", str(out))
