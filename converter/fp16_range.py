"""Kept layers that FP16 cannot hold: found before the header is written, so the plan can keep them at BF16.

A kept layer planned F16 (a preset's fp16, or --dtype-16 fp16) from an F32/BF16 source is cast value by value; any
value beyond 65504 becomes Inf, and one Inf in a norm, an embedding or the head turns ComfyUI's output into NaN.
The streaming writer needs every dtype up front, so the candidates' source values are scanned first: chunk by chunk
(rows read straight from the file, at most SCAN_CHUNK_BYTES at a time), only for tensors that are narrowed to F16,
which is nothing at all for the built-in presets without --dtype-16 fp16.

Decision (issue 22): such a layer is written at BF16, with a warning and a `kept_bf16` provenance entry, rather than
refused: BF16 has F32's range, so it holds every finite source value, at the same 2 bytes per value; ComfyUI casts
kept weights to its compute dtype when it runs them, as it does for every BF16 file. Refusing would leave the user
with no file for a source that is fine.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from converter.plan import F16_MAX, ConversionPlan, fp16_candidates, widen_to_bf16

SCAN_CHUNK_BYTES = 16 * 2**20


def source_abs_max(reader: Any, name: str) -> float:
    """max |value| of a source tensor, read in row chunks of at most SCAN_CHUNK_BYTES; nan if any value is NaN
    (the conversion refuses that source anyway, naming the layer)."""
    info = reader.tensors[name]
    if info.numel == 0:
        return 0.0
    if len(info.shape) == 0:
        return abs(float(reader.load_float(name)))
    rows = info.shape[0]
    step = max(1, SCAN_CHUNK_BYTES // max(1, info.nbytes // max(1, rows)))
    amax = 0.0
    for start in range(0, rows, step):
        chunk = reader.read_rows(name, start, start + step)
        if chunk.element_size() == 1:
            chunk = chunk.to(torch.float16)  # float8 has no aminmax on the CPU; widening is exact
        lo, hi = (float(v) for v in torch.aminmax(chunk))
        if math.isnan(lo) or math.isnan(hi):
            return math.nan
        amax = max(amax, -lo, hi)
    return amax


def keep_overflowing_at_bf16(plan: ConversionPlan, reader: Any) -> None:
    """Scan every kept tensor the plan narrows to F16 and widen the layers whose values do not fit to BF16."""
    for lp, tensor in fp16_candidates(plan):
        if lp.name in plan.widened:
            continue
        # an FP8 source tensor's values are its codes times its decode multiplier (converter/fp8_source.py)
        amax = source_abs_max(reader, tensor.source) * lp.decode.get(tensor.source, 1.0)
        if amax > F16_MAX:  # nan compares False: a NaN source is refused by the conversion, not widened
            widen_to_bf16(plan, lp, amax)
