"""Registry of architecture profiles and detection across naming schemes and prefixes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from reference_specs.models.base import UNKNOWN, ArchitectureProfile, Detection
from reference_specs.models.flux import Flux1Dev
from reference_specs.models.qwen_image import QwenImage2512, QwenImageEdit2511, QwenImageLayered
from reference_specs.models.wan import Wan22I2VA14B, Wan22T2VA14B, Wan22TI2V5B

PROFILES: list[ArchitectureProfile] = [
    Wan22TI2V5B(),
    Wan22T2VA14B(),
    Wan22I2VA14B(),
    QwenImageLayered(),  # the 2512 key set plus time_text_embed.addition_t_embedding
    QwenImageEdit2511(),  # before 2512: the edit model is the 2512 key set plus a marker key
    QwenImage2512(),
    Flux1Dev(),
]

# ComfyUI's unet_prefix_from_state_dict candidates (comfyui-load-path.md Q5): the first three need more than five
# keys; "model." is its fallback. "diffusion_model." is a prefix some exporters write; tried like the others.
_COUNTED_PREFIXES = ("model.diffusion_model.", "model.model.", "net.", "diffusion_model.")
_FALLBACK_PREFIX = "model."
_MIN_PREFIXED_KEYS = 5


def find_prefix(keys: list[str]) -> str:
    """The diffusion-model key prefix of a checkpoint, "" when its keys are bare."""
    counts = dict.fromkeys(_COUNTED_PREFIXES, 0)
    fallback = 0
    for key in keys:
        for prefix in _COUNTED_PREFIXES:
            if key.startswith(prefix):
                counts[prefix] += 1
                break
        else:
            fallback += key.startswith(_FALLBACK_PREFIX)
    best = max(counts, key=counts.__getitem__)
    if counts[best] > _MIN_PREFIXED_KEYS or (counts[best] and counts[best] == len(keys)):
        return best
    # ComfyUI strips "model." only when it matched something; a bare file keeps its keys
    return _FALLBACK_PREFIX if fallback and fallback == len(keys) else ""


def _strip(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    if not prefix:
        return shapes
    # like ComfyUI's state_dict_prefix_replace(filter_keys=True): keys outside the prefix are dropped
    n = len(prefix)
    return {k[n:]: v for k, v in shapes.items() if k.startswith(prefix)}


def _detect_native(shapes: dict[str, tuple[int, ...]]) -> Detection | None:
    for profile in PROFILES:
        found = profile.detect(shapes)
        if found is not None:
            return found
    return None


def _detect_diffusers(shapes: dict[str, tuple[int, ...]]) -> Detection | None:
    mapped_by_map: dict[object, dict[str, tuple[int, ...]]] = {}
    for profile in PROFILES:
        key = type(profile).to_native  # profiles of one family share one map: rename once
        if key is ArchitectureProfile.to_native:
            continue
        if key not in mapped_by_map:
            if not any(profile.is_diffusers_name(k) for k in shapes):
                mapped_by_map[key] = {}
            else:
                mapped_by_map[key] = {profile.to_native(k): v for k, v in shapes.items()}
        mapped = mapped_by_map[key]
        found = profile.detect(mapped) if mapped else None
        if found is not None:
            return replace(found, naming="diffusers")
    return None


def _detect_unmapped(shapes: dict[str, tuple[int, ...]]) -> Detection | None:
    """Models recognized under diffusers names nvdiag cannot rename (diffusers Flux: fused q/k/v in BFL's)."""
    return next((found for p in PROFILES if (found := p.detect_diffusers_names(shapes)) is not None), None)


def detect(shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None = None) -> Detection:
    """Detect the architecture of a checkpoint from its tensor names and shapes (any prefix, native or diffusers
    names), and from the diffusers `config` (the transformer's config.json beside the weights) where the keys
    cannot tell variants apart. Returns UNKNOWN when no profile matches."""
    prefix = find_prefix(list(shapes))
    stripped = _strip(shapes, prefix)
    found = _detect_native(stripped) or _detect_diffusers(stripped) or _detect_unmapped(stripped)
    if found is None:
        return UNKNOWN
    found = replace(found, prefix=prefix)
    profile = get_profile(found.variant)
    told = profile.variant_from_config(found, config) if config and profile is not None else None
    if told is not None:
        other = get_profile(told[0])
        found = replace(other.detection(found.dims), naming=found.naming, prefix=prefix, config=told[1])
    return found


def config_conflict(detection: Detection, config: dict[str, Any]) -> str | None:
    """Why a diffusers config.json beside the weights cannot be theirs (another model class, other dims), or None."""
    profile = get_profile(detection.variant)
    return profile.config_conflict(detection, config) if profile is not None else None


def could_also_be(detection: Detection) -> tuple[str, ...]:
    """Variants other than detection.variant a file with the same keys may be, when nothing else is known."""
    profile = get_profile(detection.variant)
    return profile.could_also_be(detection) if profile is not None else ()


def get_profile(variant: str) -> ArchitectureProfile | None:
    return next((p for p in PROFILES if p.variant == variant), None)


def native_name(detection: Detection, key: str) -> str:
    """A file key -> its ComfyUI-native name (prefix stripped, diffusers renamed) under `detection`."""
    if detection.prefix and key.startswith(detection.prefix):
        key = key[len(detection.prefix):]
    profile = get_profile(detection.variant)
    return profile.to_native(key) if profile is not None else key


__all__ = [
    "PROFILES",
    "UNKNOWN",
    "ArchitectureProfile",
    "config_conflict",
    "could_also_be",
    "Detection",
    "detect",
    "find_prefix",
    "get_profile",
    "native_name",
]
