"""Bounds on the files a user writes by hand (a preset TOML, an `--input-scales` JSON), checked before a parser sees
them: a size limit, read without trusting the size the folder reports, and for TOML a nesting-depth limit.

Python's tomllib is a recursive pure-Python parser: an array nested a few thousand levels deep ends in RecursionError
deep inside it. A preset needs two levels (`[[rules]]` tables holding strings, numbers and booleans), so a cheap scan
that counts brackets outside strings and comments refuses anything past MAX_TOML_DEPTH with a message saying so.
json's C decoder counts its own depth and raises RecursionError at the interpreter's recursion limit, in time linear
in the input, so the JSON side only needs that error turned into one line (input_scales.py does).
"""

from __future__ import annotations

import re
from pathlib import Path

from inspect_tools.safety import read_at_most

# A preset is a few kilobytes (the built-ins are under 3 KB; `preset from-gguf` writes one rule per block-generalized
# layer name: tens of kilobytes for a 14B model). 1 MiB is far past any real preset; tomllib, pure Python, takes
# about a second per MiB.
MAX_PRESET_BYTES = 2**20
# {layer: value} for every linear of the largest supported model is well under 1 MB; 16 MiB leaves room for names
# written with long prefixes and pretty-printing while bounding what json.loads holds in memory.
MAX_INPUT_SCALES_BYTES = 16 * 2**20
# [[rules]] is depth 2, an inline array of strings inside a table depth 3; 32 leaves room for any sane hand-written
# file and stays far below the parser's recursion limit.
MAX_TOML_DEPTH = 32

# What the TOML depth scan stops at: a bracket, the start of a string or a comment.
_TOML_TOKEN = re.compile(r"""[\[\]{}#"']""")
_BASIC_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')  # one line; an escape skips the next character
_LITERAL_STRING = re.compile(r"'[^'\n]*'")


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the hand-written `what` at `path`, refused (InputError naming the file) past `limit`."""
    size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
    return read_at_most(path, limit, f"the {what} is larger than {size}; a hand-written {what} is far smaller", what)


def toml_nesting_depth(text: str, stop_at: int = MAX_TOML_DEPTH + 1) -> int:
    """The deepest nesting of [ ] and { } outside strings and comments, counted up to `stop_at`.

    Linear in the text: it stops at the first string it cannot close (an unterminated string; tomllib reports it),
    so no string start is ever scanned twice. Table headers ([rules], [[rules]]) count as the brackets they are:
    depth 2 at most, far below any limit that matters."""
    depth = deepest = 0
    pos = 0
    while deepest < stop_at:
        token = _TOML_TOKEN.search(text, pos)
        if token is None:
            break
        char, pos = token.group(), token.start()
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            pos += 1
        elif char in "]}":
            depth = max(0, depth - 1)
            pos += 1
        elif char == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end + 1
        else:
            end = _string_end(text, pos, char)
            if end < 0:
                break
            pos = end
    return deepest


def _string_end(text: str, pos: int, quote: str) -> int:
    """Position just past the string starting at `pos`, or -1 when it is not closed."""
    if text.startswith(quote * 3, pos):
        if quote == "'":  # multi-line literal: no escapes
            end = text.find("'''", pos + 3)
            return -1 if end < 0 else end + 3
        return _multiline_basic_end(text, pos + 3)
    match = (_BASIC_STRING if quote == '"' else _LITERAL_STRING).match(text, pos)
    return match.end() if match else -1


def _multiline_basic_end(text: str, pos: int) -> int:
    """Past the closing \"\"\" of a multi-line basic string whose content starts at `pos` (a backslash escapes the
    next character), or -1."""
    escaped = re.compile(r'\\.|"""', re.DOTALL)
    for match in escaped.finditer(text, pos):
        if match.group() == '"""':
            return match.end()
    return -1
