"""Registry of architecture profiles and detection across naming schemes and prefixes."""

from __future__ import annotations

from reference_specs.models.base import UNKNOWN, ArchitectureProfile, Detection

PROFILES: list[ArchitectureProfile] = []


def detect(shapes: dict[str, tuple[int, ...]]) -> Detection:
    """Detect the architecture of a checkpoint from its tensor names and shapes (any prefix, native or diffusers
    names). Returns UNKNOWN when no profile matches."""
    return UNKNOWN


def get_profile(variant: str) -> ArchitectureProfile | None:
    return next((p for p in PROFILES if p.variant == variant), None)


def native_name(detection: Detection, key: str) -> str:
    """A file key -> its ComfyUI-native name (prefix stripped, diffusers renamed) under `detection`."""
    if detection.prefix and key.startswith(detection.prefix):
        key = key[len(detection.prefix):]
    profile = get_profile(detection.variant)
    return profile.to_native(key) if profile is not None else key


__all__ = ["PROFILES", "UNKNOWN", "ArchitectureProfile", "Detection", "detect", "get_profile", "native_name"]
