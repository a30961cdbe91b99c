"""One way to pick a few of many, shared by every bounded check: `count` positions spread evenly over a sequence,
first and last included, in order.

Lint reads an evenly spread subset of layers when a file's scales or weights pass the read budget, roundtrip's
--sample and convert's gate check evenly spread layers, and the gate checks row tiles at the start, middle and end of
a layer. Spreading (rather than taking the first N) puts the first and the last blocks of a model in every sample,
where conversions most often go wrong (embeddings at one end, the head at the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def spread_indices(length: int, count: int) -> list[int]:
    """`count` indices of range(length) spread evenly, first and last included, ascending and distinct; all of them
    when count >= length. A count of 1 gives the first (callers that want the middle say so themselves)."""
    if count >= length:
        return list(range(length))
    step = (length - 1) / max(1, count - 1)
    return sorted({round(i * step) for i in range(count)})


def spread(items: Sequence[T], count: int) -> list[T]:
    """The items at spread_indices(len(items), count), in order."""
    return [items[i] for i in spread_indices(len(items), count)]
