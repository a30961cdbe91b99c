"""Float state dicts of every profile, scaled down by default, and the default NVFP4 layer selection."""

from __future__ import annotations

from collections.abc import Callable

import torch

from inspect_tools.synthetic.dims import small_dims
from inspect_tools.synthetic.values import tensor_value
from reference_specs.models import PROFILES as _PROFILES
from reference_specs.models import ArchitectureProfile, get_profile

BLOCK_PREFIXES = ("blocks.", "transformer_blocks.", "double_blocks.", "single_blocks.")
VARIANTS = tuple(p.variant for p in _PROFILES)


def profile_for(variant: str) -> ArchitectureProfile:
    profile = get_profile(variant)
    if profile is None:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return profile


def shapes_for(variant: str, dims: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Native key -> shape; dims default to the fixture's scaled-down dims (synthetic/dims.py), partial dims
    override them."""
    profile = profile_for(variant)
    return profile.tensor_shapes({**small_dims(variant), **(dims or {})})


def rename(profile: ArchitectureProfile, key: str, naming: str) -> str:
    if naming == "native":
        return key
    if naming == "diffusers":
        return profile.to_diffusers(key)
    raise ValueError(f"naming must be 'native' or 'diffusers', not {naming!r}")


def float_state_dict(
    variant: str,
    dims: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    naming: str = "native",
    seed: int = 0,
    statistic: str = "structured",
) -> dict[str, torch.Tensor]:
    """Every tensor of `variant` with realistic values; keys in `naming` ("native" or "diffusers"); `statistic`:
    the weight statistic of the linears (values.STATISTICS)."""
    profile = profile_for(variant)
    return {
        rename(profile, key, naming): tensor_value(key, shape, seed, statistic).to(dtype)
        for key, shape in shapes_for(variant, dims).items()
    }


def is_block_linear(key: str, shape: tuple[int, ...]) -> bool:
    return key.endswith(".weight") and len(shape) == 2 and key.startswith(BLOCK_PREFIXES)


def default_selection(variant: str, dims: dict[str, int] | None = None) -> list[str]:
    """Native base names a mixed file quantizes: the 2-D linears inside the blocks that GGUF Q4_0 would quantize,
    minus what the profile calls sensitive (embeddings, head, modulation and norms stay high precision)."""
    profile = profile_for(variant)
    return [
        key[: -len(".weight")]
        for key, shape in shapes_for(variant, dims).items()
        if is_block_linear(key, shape) and profile.sensitive(key[: -len(".weight")]) is None
    ]


def selected(
    variant: str, dims: dict[str, int] | None, selection: Callable[[str], bool] | None
) -> list[str]:
    """The layers to quantize: default_selection, or every 2-D linear weight the callable accepts."""
    if selection is None:
        return default_selection(variant, dims)
    return [
        key[: -len(".weight")]
        for key, shape in shapes_for(variant, dims).items()
        if key.endswith(".weight") and len(shape) == 2 and selection(key[: -len(".weight")])
    ]


# Which layer's output rows are a layer's input channels (native names, per block): scaling those rows up by g and
# the consumer's input columns down by g leaves the model's function as it was (attention output is linear in v)
# while the consumer's activations get outlier channels, as SmoothQuant describes trained transformers (Xiao et al.
# 2023: activation outliers in a few channels, weights without them). For Qwen's joint attention both streams' v
# feed the same attention output.
OUTLIER_PRODUCERS = {
    "self_attn.o": ("self_attn.v",),
    "cross_attn.o": ("cross_attn.v",),
    "attn.to_out.0": ("attn.to_v", "attn.add_v_proj"),
    "attn.to_add_out": ("attn.to_v", "attn.add_v_proj"),
}


def add_activation_outliers(state_dict: dict[str, torch.Tensor], consumer: str, gain: float = 50.0,
                            channels: int = 4, seed: int = 0) -> list[int]:
    """Give `consumer` (a native base name such as blocks.0.self_attn.o) activation outliers: `channels` of its input
    channels `gain` times larger, the model's output unchanged. Returns the channels chosen."""
    block, _, leaf = consumer.partition(".")
    index, _, rest = leaf.partition(".")
    producers = OUTLIER_PRODUCERS.get(rest)
    if producers is None:
        raise ValueError(f"no producer known for {consumer!r}; known: {', '.join(OUTLIER_PRODUCERS)}")
    weight = state_dict[f"{consumer}.weight"]
    # channels among the consumer's ordinary columns (column norm between its quartiles): once divided by the gain,
    # their products with the outlier activations are of ordinary size, as in a trained model where the outlier
    # channels do not dominate the layer's output (a column that was already an outlier would make them dominate)
    norms = weight.norm(dim=0)
    low, high = torch.quantile(norms, 0.25), torch.quantile(norms, 0.75)
    ordinary = torch.nonzero((norms >= low) & (norms <= high)).flatten()
    order = torch.randperm(ordinary.numel(), generator=torch.Generator().manual_seed(seed))
    picked = ordinary[order[:channels]]
    for producer in producers:
        base = f"{block}.{index}.{producer}"
        state_dict[f"{base}.weight"][picked] *= gain
        if f"{base}.bias" in state_dict:
            state_dict[f"{base}.bias"][picked] *= gain
    weight[:, picked] /= gain
    return sorted(int(c) for c in picked)
