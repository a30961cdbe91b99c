"""Synthetic tensor values with the statistics of trained diffusion transformers, deterministic by seed and name.

Why structured values: quantization error, outlier handling and scale choices only show up on weights that look
like real ones: per-input-channel magnitude spread (log-normal), a few outlier input columns (x10-x50), a mild
per-row scale, small biases, norm weights around 1 and modulation parameters of the size of 1/sqrt(dim).
Each tensor has its own generator seeded from (seed, native name), so a tensor's values do not depend on which
other tensors are generated, on the order, or on the naming scheme it is written under.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch

OUTLIER_GAIN = (10.0, 50.0)
COLUMN_SPREAD = 0.5  # sigma of the log-normal per-input-channel magnitude
ROW_SPREAD = 0.1  # sigma of the log-normal per-output-row scale


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def linear_weight(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    out_f, in_f = shape
    base = torch.randn(shape, generator=gen) / in_f**0.5
    columns = torch.exp(COLUMN_SPREAD * torch.randn(in_f, generator=gen))
    n_outliers = max(1, in_f // 64)
    picked = torch.randperm(in_f, generator=gen)[:n_outliers]
    low, high = OUTLIER_GAIN
    columns[picked] *= low + (high - low) * torch.rand(n_outliers, generator=gen)
    rows = torch.exp(ROW_SPREAD * torch.randn(out_f, generator=gen))
    return base * columns * rows.unsqueeze(1)


def _student_t(shape: tuple[int, int], gen: torch.Generator, dof: int) -> torch.Tensor:
    chi2 = (torch.randn((dof, *shape), generator=gen) ** 2).sum(0)
    return torch.randn(shape, generator=gen) / torch.sqrt(chi2 / dof)


def _column_outliers(shape: tuple[int, int], gen: torch.Generator, gain: float) -> torch.Tensor:
    out_f, in_f = shape
    columns = torch.ones(in_f)
    columns[torch.randperm(in_f, generator=gen)[: max(1, in_f // 100)]] = gain
    return torch.randn(shape, generator=gen) / in_f**0.5 * columns


def _per_head(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """128-row heads with their own log-normal gain and Student-t(4) tails (attention projections)."""
    out_f, in_f = shape
    heads = -(-out_f // 128)
    gains = torch.exp(torch.randn(heads, generator=gen)).repeat_interleave(128)[:out_f]
    return _student_t(shape, gen, 4) / in_f**0.5 * gains.unsqueeze(1)


def _equal_scales(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Every value +-c: every 16-element block has the same amax, so every block scale is the same byte."""
    signs = torch.randint(0, 2, shape, generator=gen).to(torch.float32) * 2 - 1
    return signs / shape[1] ** 0.5


# Weight statistics of the fixture family: a diagnosis tuned to one generator is not a diagnosis. "structured" is the
# trained-transformer look above; the others are what other models and initialisations give.
STATISTICS: dict[str, Callable[[tuple[int, int], torch.Generator], torch.Tensor]] = {
    "structured": linear_weight,
    "gaussian": lambda shape, gen: torch.randn(shape, generator=gen) / shape[1] ** 0.5,
    "uniform": lambda shape, gen: (torch.rand(shape, generator=gen) * 2 - 1) / shape[1] ** 0.5,  # kaiming-uniform
    "student-t": lambda shape, gen: _student_t(shape, gen, 3) / shape[1] ** 0.5,
    "per-head": _per_head,
    "weak-outliers": lambda shape, gen: _column_outliers(shape, gen, 3.0),
    "strong-outliers": lambda shape, gen: _column_outliers(shape, gen, 100.0),
    "equal-scales": _equal_scales,
}


def unit_gain(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rescaled so that the layer keeps the RMS of an isotropic input (squared Frobenius norm = out_f).

    The statistics above set a layer's shape of values (what quantization sees: the spread inside a block, the
    outlier columns) and leave its overall size as it falls: the structured one multiplies an isotropic input's RMS
    by about 4.7 per linear (E[column^2] ~ 22). The small fixtures run in float32 on the CPU, where that only makes
    the model sensitive (which the compute-policy fixtures rely on); a real-width WAN block built from them reached a
    residual RMS of 6,000 and a maximum of 4e4 after one block, and ComfyUI's fp16 compute on a GPU overflowed where
    real checkpoints stay in range. Writers of real-width models for GPU runs (benchmarks/verify.py) apply this.
    Relative quantization errors do not depend on the factor (block and tensor scales follow the values)."""
    norm = torch.linalg.vector_norm(weight.double())
    if norm == 0:
        return weight
    return (weight.double() * (weight.shape[0] ** 0.5 / norm)).to(weight.dtype)


def tensor_value(name: str, shape: tuple[int, ...], seed: int = 0, statistic: str = "structured") -> torch.Tensor:
    """float32 values for the tensor `name` (a native key) of `shape`; `statistic` (a STATISTICS key) shapes the
    2-D linear weights."""
    gen = generator(seed, name)
    if len(shape) == 2 and name.endswith(".weight"):
        return STATISTICS[statistic]((shape[0], shape[1]), gen)
    if any(d == 0 for d in shape):  # marker keys such as __index_timestep_zero__
        return torch.zeros(shape)
    if len(shape) == 1:
        if name.endswith(".bias"):
            return 0.01 * torch.randn(shape, generator=gen)
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)  # norm weights / scales
    if len(shape) == 3:  # WAN modulation parameters [1, k, dim], initialised as randn / sqrt(dim)
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / fan_in**0.5  # convolutions (patch embedding)
