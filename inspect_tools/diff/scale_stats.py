"""Scale distributions per side of a diff: exact for per-layer scalars, log2-binned for the millions of NVFP4 block
scales (counted per FP8 byte value), so medians and histograms of two files can be set side by side."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from inspect_tools.diff.facts import precision_class
from reference_specs.layer import Layer

# The value of each of the 256 FP8 E4M3 bytes (0x7F / 0xFF are NaN).
FP8_VALUES: list[float] = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float().tolist()


@dataclass


class ScaleStats:
    """Distribution of one kind of scale on one side: exact for per-layer scalars, log2-binned for block scales."""

    count: int = 0
    zeros: int = 0
    non_finite: int = 0
    negative: int = 0
    min: float = math.inf
    max: float = -math.inf
    log2_bins: Counter[int] = field(default_factory=Counter)
    values: list[float] = field(default_factory=list)  # per-layer scalars only

    def add(self, t: torch.Tensor, keep_values: bool) -> None:
        if t.dtype == torch.float8_e4m3fn and not keep_values:
            self._add_fp8(t)
            return
        v = t.detach().to(torch.float32).flatten()
        finite = torch.isfinite(v)
        self.non_finite += int((~finite).sum())
        v = v[finite]
        self.zeros += int((v == 0).sum())
        self.negative += int((v < 0).sum())
        v = v[v > 0]
        if v.numel() == 0:
            return
        self.count += v.numel()
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        bins, counts = torch.unique(torch.floor(torch.log2(v)).to(torch.int64), return_counts=True)
        for b, c in zip(bins.tolist(), counts.tolist(), strict=True):
            self.log2_bins[b] += c
        if keep_values:
            self.values.extend(v.tolist())

    def _add_fp8(self, t: torch.Tensor) -> None:
        """FP8 block scales have 256 possible values: count the bytes, then account each value once (millions of
        block scales per layer cost one bincount)."""
        counts = torch.bincount(t.contiguous().view(torch.uint8).flatten().to(torch.int64), minlength=256).tolist()
        for value, n in zip(FP8_VALUES, counts, strict=True):
            if not n:
                continue
            if not math.isfinite(value):
                self.non_finite += n
            elif value == 0:
                self.zeros += n
            elif value < 0:
                self.negative += n
            else:
                self.count += n
                self.min, self.max = min(self.min, value), max(self.max, value)
                self.log2_bins[math.floor(math.log2(value))] += n

    @property
    def median(self) -> float | None:
        if self.values:
            return statistics.median(self.values)
        if not self.count:
            return None
        half, seen = self.count / 2, 0
        for b in sorted(self.log2_bins):
            seen += self.log2_bins[b]
            if seen >= half:
                return 2.0 ** (b + 0.5)
        return None

    def decades(self) -> Counter[int]:
        """Counts per power of ten (from the log2 bins), for the text histogram."""
        out: Counter[int] = Counter()
        for b, c in self.log2_bins.items():
            out[math.floor(b * math.log10(2))] += c
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "zeros": self.zeros,
            "non_finite": self.non_finite,
            "negative": self.negative,
            "min": self.min if self.count else None,
            "median": self.median,
            "max": self.max if self.count else None,
            "decades": {f"1e{k}": v for k, v in sorted(self.decades().items())},
        }


def scale_kind(layer: Layer, role: str) -> str | None:
    """Which distribution a scale tensor belongs to: NVFP4 block scales are not comparable with FP8 per-tensor
    scales, so they are kept apart."""
    if role == "weight_scale":
        return "block_scale" if layer.format == "nvfp4" else "weight_scale"
    if role == "scale_weight":
        return "weight_scale"
    if role in ("weight_scale_2", "input_scale"):
        return role
    if role == "scale_input":
        return "input_scale"
    return None


def scale_distributions(layers: Iterable[Layer]) -> dict[str, ScaleStats]:
    """Read every scale tensor of the quantized layers, one at a time, into per-kind distributions."""
    stats: dict[str, ScaleStats] = {}
    for layer in layers:
        if precision_class(layer) != "quantized":
            continue
        for role in ("weight_scale", "weight_scale_2", "input_scale", "scale_weight", "scale_input"):
            kind = scale_kind(layer, role) if layer.has(role) else None
            if kind is None:
                continue
            try:
                t = layer.load(role)
            except Exception:  # noqa: BLE001 - unreadable bytes are the readers' and lint's business
                continue
            if t.dtype == torch.uint8 and kind == "block_scale":
                t = t.view(torch.float8_e4m3fn)
            stats.setdefault(kind, ScaleStats()).add(t, keep_values=kind != "block_scale")
    return stats
