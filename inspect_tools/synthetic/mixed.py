"""A mixed-precision checkpoint being assembled: which layers are quantized, with which codec, under which names.

Everything is kept in ComfyUI-native names until `finish`, so faults and options act on one vocabulary and the
naming scheme, the key prefix and the quantization markers are applied last, exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from inspect_tools.synthetic.state_dicts import rename
from reference_specs.formats.base import Format
from reference_specs.layer import QUANT_METADATA_KEY
from reference_specs.models import ArchitectureProfile

MARKER_MODES = ("tensor", "metadata", "both", "none")


def marker_tensor(conf: dict[str, Any]) -> torch.Tensor:
    """comfy_quant as ComfyUI reads it: the UTF-8 bytes of the JSON conf in a uint8 tensor."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


@dataclass
class MixedPlan:
    """source: native key -> float tensor at source precision; tensors: native key -> tensor as written.
    quantized: native base names stored in `codec`; targets: the layers per-layer faults act on."""

    profile: ArchitectureProfile
    source: dict[str, torch.Tensor]
    codec: Format
    conf: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    markers: str = "tensor"
    naming: str = "native"
    prefix: str = ""
    metadata_prefix: str | None = None  # prefix of the _quantization_metadata names; None: the file's own prefix
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tensors:
            self.tensors = dict(self.source)

    def quantize(self, base: str, weight: torch.Tensor | None = None) -> None:
        """Store layer `base` in the codec, from its source weight (or from `weight`, e.g. a transposed one)."""
        source = self.source[base + ".weight"] if weight is None else weight
        for role, tensor in self.codec.quantize(source.to(torch.float32)).items():
            self.tensors[f"{base}.{role}"] = tensor.contiguous()
        if base not in self.quantized:
            self.quantized.append(base)

    def key(self, native_key: str) -> str:
        return self.prefix + rename(self.profile, native_key, self.naming)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(file key -> tensor, header metadata) with naming, prefix and markers applied."""
        if self.markers not in MARKER_MODES:
            raise ValueError(f"markers must be one of {MARKER_MODES}, not {self.markers!r}")
        out = {self.key(k): v.contiguous() for k, v in self.tensors.items()}
        if self.markers in ("tensor", "both"):
            for base in self.quantized:
                out[self.key(base + ".comfy_quant")] = marker_tensor(self.conf)
        metadata = dict(self.extra_metadata)
        if self.markers in ("metadata", "both"):
            meta_prefix = self.prefix if self.metadata_prefix is None else self.metadata_prefix
            layers = {meta_prefix + rename(self.profile, base, self.naming): self.conf for base in self.quantized}
            metadata[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers})
        return out, metadata
