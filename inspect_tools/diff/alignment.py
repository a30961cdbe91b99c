"""Which layer of MINE goes with which layer of REF in `nvdiag diff`, and whether they can be compared by name.

The pairing itself is inspect_tools/align.py's (the one roundtrip uses); here the diff's rows are made of it: every
layer of either file once, matched pairs keyed by REF's ComfyUI-native name, in natural order, and the role a layer
plays when two different architectures are compared.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from inspect_tools.align import LayerPair, align_layers
from inspect_tools.layers import CheckpointModel
from reference_specs import models
from reference_specs.layer import Layer


def align_key(layer: Layer) -> str:
    """The name a layer is matched on: its ComfyUI-native name (prefix stripped, diffusers names mapped)."""
    return layer.native_name or layer.name


def align(mine: CheckpointModel, ref: CheckpointModel) -> list[LayerPair]:
    """Pair the layers of two checkpoints of the same architecture across prefixes and naming schemes (the same
    alignment roundtrip uses), in natural order; a layer one file lacks gets a row with the other side None."""
    alignment = align_layers(mine, ref)
    pairs = [LayerPair(mine=pair.mine, ref=pair.ref, key=align_key(pair.ref)) for pair in alignment.pairs]
    pairs.extend(LayerPair(mine=layer, ref=None, key=align_key(layer)) for layer in alignment.only_mine)
    pairs.extend(LayerPair(mine=None, ref=layer, key=align_key(layer)) for layer in alignment.only_ref)
    return sorted(pairs, key=lambda p: natural_key(p.key))


def natural_key(name: str) -> list[Any]:
    """'blocks.10.x' after 'blocks.2.x'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def same_architecture(mine: CheckpointModel, ref: CheckpointModel) -> bool:
    """Compare by name unless both architectures are known and belong to different families (WAN vs Flux)."""
    a, b = mine.detection.family, ref.detection.family
    return a == "unknown" or b == "unknown" or a == b


# Separate q/k/v projections (WAN, Qwen) and a fused qkv (Flux) do the same job: compared as one role.
ROLE_GROUPS = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv"}


def role_of(model: CheckpointModel, layer: Layer) -> str:
    """Cross-architecture role (attn_qkv, attn_out, mlp_up, mlp_down, modulation, embedding, head, norm) or
    'other'."""
    profile = models.get_profile(model.detection.variant)
    role = profile.role_of(align_key(layer)) if profile is not None else None
    return ROLE_GROUPS.get(role, role) if role else "other"


def sensitive_reason(model: CheckpointModel, layer: Layer) -> str | None:
    profile = models.get_profile(model.detection.variant)
    return profile.sensitive(align_key(layer)) if profile is not None else None


def same_dimensions(mine: CheckpointModel, ref: CheckpointModel) -> bool:
    """Shapes are only comparable layer by layer when both files are the same model size (a scaled-down fixture
    against a full-size reference differs everywhere, which is no finding)."""
    a, b = mine.detection.dims, ref.detection.dims
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def select_layers(layers: Iterable[Layer], pattern: str | None) -> list[Layer]:
    """The layers `--layers GLOB` keeps: matched on the file's name or the ComfyUI-native one."""
    return [
        layer
        for layer in layers
        if not pattern
        or fnmatch.fnmatchcase(layer.name, pattern)
        or fnmatch.fnmatchcase(align_key(layer), pattern)
    ]


def diff_pairs(mine: CheckpointModel, ref: CheckpointModel, mine_layers: list[Layer], ref_layers: list[Layer],
               by_name: bool) -> list[LayerPair]:
    """The rows of a diff over the selected layers: aligned by name (same architecture), else every layer on its own
    row (a cross-architecture diff compares by role, no layer has a partner)."""
    if by_name:
        keep_m, keep_r = {id(x) for x in mine_layers}, {id(x) for x in ref_layers}
        pairs = [
            LayerPair(mine=p.mine if id(p.mine) in keep_m else None, ref=p.ref if id(p.ref) in keep_r else None,
                      key=p.key)
            for p in align(mine, ref)
        ]
        return [p for p in pairs if p.mine is not None or p.ref is not None]
    pairs = [LayerPair(mine=x, ref=None, key=align_key(x)) for x in mine_layers]
    pairs += [LayerPair(mine=None, ref=x, key=align_key(x)) for x in ref_layers]
    return pairs
