"""Pair the layers of two checkpoints of the same model, whatever their naming scheme, prefix or storage format.

Used by `nvdiag roundtrip` and `nvdiag diff`. A layer is matched by the first of its candidate keys that names
exactly one not-yet-matched layer of the other file: its ComfyUI-native name (from the architecture profiles),
its own name, then both with a known container prefix stripped and run through either file's profile. Layers
without a partner are listed, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from inspect_tools.layers import CheckpointModel
from reference_specs import models
from reference_specs.layer import Layer
from reference_specs.models import ArchitectureProfile

# Prefixes ComfyUI strips (comfyui-load-path.md, unet_prefix_from_state_dict) plus the ones diffusers and
# single-file exports put in front of transformer weights.
KNOWN_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "diffusion_model.",
    "model.model.",
    "transformer.",
    "model.",
    "net.",
)


@dataclass(frozen=True)
class LayerPair:
    """One layer of each file that hold the same module. key: the name they were matched on.

    align_layers only pairs layers both files have; `nvdiag diff` also lists a layer one file lacks, with the other
    side None (its rows cover both files)."""

    mine: Layer | None
    ref: Layer | None
    key: str

    @property
    def matched(self) -> bool:
        return self.mine is not None and self.ref is not None


@dataclass
class Alignment:
    pairs: list[LayerPair] = field(default_factory=list)
    only_mine: list[Layer] = field(default_factory=list)
    only_ref: list[Layer] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "pairs": len(self.pairs),
            "only_mine": [layer.name for layer in self.only_mine],
            "only_ref": [layer.name for layer in self.only_ref],
        }


def strip_known_prefix(name: str) -> str:
    for prefix in KNOWN_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def candidate_keys(layer: Layer, profiles: Iterable[ArchitectureProfile]) -> list[str]:
    """Names `layer` may be known by in the other file, most specific first, without duplicates."""
    keys = [layer.native_name or layer.name, layer.name]
    bare = strip_known_prefix(layer.name)
    keys.append(bare)
    for profile in profiles:
        # a file whose architecture was not detected still gets renamed by the other file's profile
        keys.append(profile.to_native(bare))
    return list(dict.fromkeys(k for k in keys if k))


def _profiles(*checkpoints: CheckpointModel) -> list[ArchitectureProfile]:
    found = (models.get_profile(c.detection.variant) for c in checkpoints)
    return [p for p in found if p is not None]


def align_layers(mine: CheckpointModel, ref: CheckpointModel) -> Alignment:
    """Pair every layer of `mine` with the layer of `ref` that holds the same module.

    Order of pairs and of the unmatched lists follows `mine` (resp. `ref`) file order.
    """
    profiles = _profiles(mine, ref)
    index: dict[str, list[Layer]] = {}
    for layer in ref.layers.values():
        for key in candidate_keys(layer, profiles):
            index.setdefault(key, []).append(layer)
    matched: set[str] = set()
    alignment = Alignment()
    for layer in mine.layers.values():
        pair = _match(layer, index, matched, profiles)
        if pair is None:
            alignment.only_mine.append(layer)
            continue
        matched.add(pair.ref.name)
        alignment.pairs.append(pair)
    alignment.only_ref = [layer for layer in ref.layers.values() if layer.name not in matched]
    return alignment


def _match(
    layer: Layer, index: dict[str, list[Layer]], matched: set[str], profiles: list[ArchitectureProfile]
) -> LayerPair | None:
    for key in candidate_keys(layer, profiles):
        free = [r for r in index.get(key, ()) if r.name not in matched]
        if len(free) == 1:
            return LayerPair(mine=layer, ref=free[0], key=key)
    return None
