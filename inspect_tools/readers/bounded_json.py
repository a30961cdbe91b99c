"""json.loads for small JSON documents that come from a file (markers, metadata): nesting depth and integer length
bounded before and while parsing, so a hostile document fails with ValueError instead of RecursionError (CPython's
parser recurses once per level) or the int-string-conversion ValueError of a 4,300-digit number.
"""

from __future__ import annotations

import json
import re
from typing import Any

# No marker or metadata document nvdiag reads nests more than a few levels ({"layers": {name: {conf}}}); 64 leaves
# room for any legitimate extension and keeps every recursive consumer (json.dumps, our renderers) far from
# Python's recursion limit.
MAX_DEPTH = 64
# Marker values are small counts and flags; 40 digits is already beyond int128.
MAX_INT_DIGITS = 40

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth_exceeds(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the brackets of `raw` (outside strings) nest deeper than `limit`.

    Each round removes the innermost empty pairs, so `limit` rounds of C-speed replaces decide it: linear in the
    size times a constant, never one Python step per character. Unbalanced brackets count as deep; json.loads
    would reject them anyway."""
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not skeleton:
            return False
        shorter = skeleton.replace(b"[]", b"").replace(b"{}", b"")
        if shorter == skeleton:
            return True  # unbalanced or interleaved: not JSON
        skeleton = shorter
    return bool(skeleton)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def loads_bounded(raw: bytes | str) -> Any:
    """json.loads with MAX_DEPTH and MAX_INT_DIGITS; ValueError (json.JSONDecodeError included) when exceeded or
    invalid, UnicodeDecodeError for bytes that are not UTF-8."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    text = raw if isinstance(raw, str) else raw.decode("utf-8")
    if nesting_depth_exceeds(data):
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int)
    except RecursionError:  # a bracket hidden from the scan (cannot happen for valid JSON): same answer
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
