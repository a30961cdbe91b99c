"""Text that comes from a file, made safe to print on a terminal: one function every text renderer uses.

Tensor names, metadata keys and values and GGUF strings are chosen by whoever wrote the file. Printed as they are,
an escape byte can recolour or rewrite the terminal, a NUL or a backspace can hide text, a newline can draw a fake
table row, a bidi override can reorder what is shown, and `[...]` is rich markup. `shown` makes each of those
visible as an escape sequence instead. JSON output needs none of this: json.dumps escapes control characters.
"""

from __future__ import annotations

import re

from rich.markup import escape

# C0 controls (newline and tab included: one cell, one line), DEL, C1 controls, and the invisible format
# characters that move or hide text: zero-width marks, line/paragraph separators, bidi embeddings, overrides and
# isolates, the byte-order mark.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain_shown(value: object) -> str:
    """`value` as text with control and invisible format characters written as escapes (for plain printing)."""
    return _UNSAFE.sub(_escaped, str(value))


def shown(value: object) -> str:
    """`value` as text safe inside rich markup: control characters escaped, and `[` escaped so that a name such as
    'a[bold]' is printed as it is, not as a style."""
    return escape(plain_shown(value))
