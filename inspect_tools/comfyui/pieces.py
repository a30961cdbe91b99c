"""A model as pieces of consecutive transformer blocks, so that a 14B model runs through ComfyUI on a 24 GB machine.

ComfyUI on a CPU computes in FP32: a whole WAN A14B expert is 56 GB there. Verify therefore loads, when the model is
too big for the memory it may use, one piece at a time: every tensor outside the blocks (embeddings, time
projection, head) plus blocks [start, stop), renumbered from 0. ComfyUI detects such a state dict as the same model
with fewer layers (it counts the blocks). The piece's first block gets, instead of what the embeddings give it, the
output of the previous piece's last block, through ComfyUI's own block-replacement hook
(transformer_options["patches_replace"]["dit"][("double_block", i)], comfy/ldm/wan/model.py and
comfy/ldm/qwen_image/model.py): the same computation as the whole model, block by block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from reference_specs.layer import QUANT_METADATA_KEY
from reference_specs.models.base import BLOCK_KEY


@dataclass(frozen=True)
class Piece:
    start: int
    stop: int  # exclusive
    total: int  # blocks in the whole model

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.total

    def rename(self, key: str) -> str | None:
        """The key inside this piece (block index renumbered from 0), or None when the key is another piece's."""
        match = BLOCK_KEY.match(key)
        if match is None:
            return key
        index = int(match.group("index"))
        if not self.start <= index < self.stop:
            return None
        return _block_name(match, index - self.start)

    def restore(self, name: str) -> str:
        """A block, layer or key name inside the piece back to the whole model's name (the inverse of rename)."""
        match = BLOCK_KEY.match(name)
        if match is None:
            return name
        return _block_name(match, int(match.group("index")) + self.start)


def _block_name(match: re.Match[str], index: int) -> str:
    rest = match.group("rest")
    return f"{match.group('pre')}{match.group('list')}.{index}" + (f".{rest}" if rest is not None else "")


def count_blocks(keys: Iterable[str]) -> int:
    indices = {int(m.group("index")) for k in keys if (m := BLOCK_KEY.match(k))}
    return max(indices) + 1 if indices else 0


def split(total: int, per_piece: int) -> list[Piece]:
    """Consecutive pieces of at most per_piece blocks (one piece: the whole model)."""
    per_piece = max(1, min(per_piece, total)) if total else 1
    if total == 0:
        return [Piece(0, 0, 0)]
    return [Piece(start, min(start + per_piece, total), total) for start in range(0, total, per_piece)]


def blocks_at_once(global_params: int, block_params: int, total: int, budget_bytes: int,
                   bytes_per_param: int = 8) -> int:
    """How many blocks fit in the memory budget next to the global tensors (FP32 compute: 4 bytes per parameter
    for the model and as much again for the state dict it is loaded from). All of them when the model fits."""
    if block_params <= 0 or total == 0:
        return max(total, 1)
    room = budget_bytes // bytes_per_param - global_params
    return int(max(1, min(total, room // block_params)))


def piece_metadata(metadata: dict[str, str] | None, piece: Piece) -> dict[str, str] | None:
    """The header metadata with `_quantization_metadata` layer names renumbered for the piece (others dropped)."""
    if not metadata or QUANT_METADATA_KEY not in metadata or piece.whole:
        return metadata
    try:
        parsed = json.loads(metadata[QUANT_METADATA_KEY])
        layers = parsed["layers"]
        if not isinstance(layers, dict):
            return metadata
    except (ValueError, KeyError, TypeError):
        return metadata  # ComfyUI will say what it makes of it
    renamed: dict[str, Any] = {}
    for name, conf in layers.items():
        inside = piece.rename(f"{name}.weight")
        if inside is not None:
            renamed[inside[: -len(".weight")]] = conf
    out = dict(metadata)
    out[QUANT_METADATA_KEY] = json.dumps({**parsed, "layers": renamed})
    return out
