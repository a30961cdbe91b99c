"""Synthetic tensor values with the statistics of trained diffusion transformers, deterministic by seed and name.

Why structured values: quantization error, outlier handling and scale choices only show up on weights that look
like real ones: per-input-channel magnitude spread (log-normal), a few outlier input columns (x10-x50), a mild
per-row scale, small biases, norm weights around 1 and modulation parameters of the size of 1/sqrt(dim).
Each tensor has its own generator seeded from (seed, native name), so a tensor's values do not depend on which
other tensors are generated, on the order, or on the naming scheme it is written under.
"""

from __future__ import annotations

import zlib

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


def tensor_value(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """float32 values for the tensor `name` (a native key) of `shape`."""
    gen = generator(seed, name)
    if len(shape) == 2 and name.endswith(".weight"):
        return linear_weight((shape[0], shape[1]), gen)
    if any(d == 0 for d in shape):  # marker keys such as __index_timestep_zero__
        return torch.zeros(shape)
    if len(shape) == 1:
        if name.endswith(".bias"):
            return 0.01 * torch.randn(shape, generator=gen)
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)  # norm weights / scales
    if len(shape) == 3:  # WAN modulation parameters [1, k, dim], initialised as randn / sqrt(dim)
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in**0.5  # convolutions (patch embedding)
