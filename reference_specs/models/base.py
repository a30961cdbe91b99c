"""What an architecture profile knows: key names, shapes as functions of the dimensions, detection, naming.

One profile per supported model variant, registered in models/__init__.py. Facts: shared/research/architectures.md
and comfyui-load-path.md (Q5: how ComfyUI detects the model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The block lists of the target families, in the order they run (WAN: blocks, Qwen Image: transformer_blocks);
# ComfyUI calls every one through the ("double_block", i) replacement hook (comfy/ldm: wan, qwen_image).
BLOCK_LISTS = ("blocks", "transformer_blocks")
# a key or module name inside a block ("blocks.3.ffn.0.weight"), or the block itself ("blocks.3")
BLOCK_KEY = re.compile(
    r"^(?P<pre>(?:.*\.)?)(?P<list>" + "|".join(BLOCK_LISTS) + r")\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")


@dataclass(frozen=True)
class Detection:
    """Result of matching a checkpoint's keys and shapes against the profiles.

    naming: "native" (ComfyUI names) or "diffusers"; prefix: the key prefix found ("", "model.diffusion_model.", ...).
    dims: the dimensions read off the shapes (dim, ffn, blocks, in_dim, out_dim, ...).
    """

    family: str  # "wan" | "qwen_image" | "flux" | "unknown"
    variant: str  # e.g. "wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "qwen-image-2512", ...
    naming: str = "native"
    prefix: str = ""
    dims: dict[str, int] = field(default_factory=dict)
    scaled_down: bool = False  # fewer blocks or narrower than the real model (synthetic fixtures)
    # what the diffusers config.json beside the weights decided, when the keys alone could not (e.g. "zero_cond_t")
    config: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "family": self.family,
            "variant": self.variant,
            "naming": self.naming,
            "prefix": self.prefix,
            "dims": dict(self.dims),
            "scaled_down": self.scaled_down,
        }
        if self.config:
            doc["config"] = self.config
        return doc


UNKNOWN = Detection(family="unknown", variant="unknown")


def module_name(name: str) -> str:
    """'x.weight' / 'x.bias' -> 'x': profiles answer questions about modules, callers may pass either."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def changed_reads(reads: dict[int, str], logical: tuple[int, ...], stored: tuple[int, ...]) -> dict[int, str]:
    """The axes ComfyUI reads (`reads`, from read_axes) whose stored size differs from the logical one: what
    ComfyUI would get wrong about the model if the weight were stored with shape `stored`."""
    return {axis: what for axis, what in reads.items()
            if axis < len(logical) and (axis >= len(stored) or stored[axis] != logical[axis])}


class ArchitectureProfile:
    """Base class. Subclasses fill in the class attributes and the methods below."""

    family: str
    variant: str
    display_name: str
    # Real dimensions of the published model (detection tells a scaled-down file by them; the scaled-down dims of
    # synthetic fixtures live with the factory, inspect_tools/synthetic/dims.py).
    full_dims: dict[str, int]

    # dims that make a model smaller than the real one (width, depth): any of them off full_dims = scaled down
    _size_dims: tuple[str, ...] = ()
    # Weights whose stored shape ComfyUI reads to build the model (comfy/model_detection.py, detect_unet_config):
    # module base name -> {axis of its .weight: what ComfyUI takes from it}. Quantizing such a weight into a format
    # that stores another shape (NVFP4 packs two values per byte: dim 1 halves, rows pad to 16) makes ComfyUI build
    # the wrong model ("mat1 and mat2 shapes cannot be multiplied"): presets never do it, lint reports it (NV305).
    shape_reads: ClassVar[dict[str, dict[int, str]]] = {}

    def detection(self, dims: dict[str, int]) -> Detection:
        """This profile's Detection for dims read off a file, flagged scaled_down when narrower or shallower."""
        scaled = any(dims.get(k) is not None and dims[k] != self.full_dims[k] for k in self._size_dims)
        return Detection(family=self.family, variant=self.variant, dims=dims, scaled_down=scaled)

    def detect(self, shapes: dict[str, tuple[int, ...]]) -> Detection | None:
        """shapes: ComfyUI-native names (prefix already stripped) -> shape. None when this profile does not match."""
        raise NotImplementedError

    def tensor_shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model (native names) with its shape for the given dims (scaled down or full)."""
        raise NotImplementedError

    def to_native(self, name: str) -> str:
        """diffusers (or native) key -> ComfyUI-native key. Identity where the native names are diffusers names."""
        return name

    def to_diffusers(self, name: str) -> str:
        return name

    def is_diffusers_name(self, name: str) -> bool:
        return False

    # Tensors without weights that ComfyUI detects the variant by (key presence only): name -> (dtype, shape) as
    # ComfyUI's own model registers them. A conversion writes them when the source lacks them (diffusers folders
    # carry the variant in config.json instead).
    marker_tensors: ClassVar[dict[str, tuple[str, tuple[int, ...]]]] = {}
    # 2-D weights that are lookup tables (nn.Embedding), not Linear layers: never quantized (ComfyUI's quantized
    # operations are Linear layers; an Embedding would load the packed bytes as its table)
    tables: ClassVar[tuple[str, ...]] = ()

    # Whether to_native maps every diffusers name of this model 1:1 (convert can write ComfyUI names from them)
    diffusers_convertible: ClassVar[bool] = True
    # The diffusers model class (config.json `_class_name`) and which config keys hold which of our dims
    diffusers_class: ClassVar[str] = ""
    config_dims: ClassVar[dict[str, str]] = {}

    def config_conflict(self, found: Detection, config: dict[str, Any]) -> str | None:
        """Why `config` (a diffusers config.json) cannot describe the weights detected as `found`, or None."""
        name = config.get("_class_name")
        if name != self.diffusers_class:
            return f"config.json describes a {name}, the weights are {self.display_name}"
        for key, dim in self.config_dims.items():
            value, have = config.get(key), found.dims.get(dim)
            if isinstance(value, int) and have is not None and value != have:
                return f"config.json says {key} {value}, the weights have {have}"
        return None

    def detect_diffusers_names(self, shapes: dict[str, tuple[int, ...]]) -> Detection | None:
        """Recognize this model under diffusers names that to_native cannot map (naming "diffusers"); None."""
        return None

    def variant_from_config(self, found: Detection, config: dict[str, Any]) -> tuple[str, str] | None:
        """(variant, why) when the diffusers config.json beside the weights (the transformer's config: ground truth
        for what the keys cannot show) names another variant of this family than the keys did; None otherwise."""
        return None

    def could_also_be(self, found: Detection) -> tuple[str, ...]:
        """Other variants a file with these keys may be, when nothing but the keys is known (no config.json)."""
        return ()

    def is_table(self, layer_name: str) -> bool:
        return module_name(self.to_native(layer_name)) in self.tables

    def read_axes(self, layer_name: str) -> dict[int, str]:
        """The axes of this layer's weight whose size ComfyUI reads (see shape_reads); {} for most layers."""
        return self.shape_reads.get(module_name(self.to_native(layer_name)), {})

    def sensitive(self, layer_name: str) -> str | None:
        """Why a layer (native base name) must stay high precision, or None. E.g. 'modulation', 'embedding'."""
        return None

    def role_of(self, layer_name: str) -> str | None:
        """Cross-architecture role of a layer: 'attn_q', 'attn_k', 'attn_v', 'attn_out', 'attn_qkv', 'mlp_up',
        'mlp_down', 'modulation', 'embedding', 'head', 'norm', or None."""
        return None
