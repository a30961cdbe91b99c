"""The Layer model every command works on: a base name, its tensors by role, and a detected format.

Pure data. inspect_tools builds these from files and injects a `load` callable so that rules and codecs can read
tensor values lazily without reference_specs doing any I/O itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # header-only commands never load tensors: importing torch (~1 s) is left to the code that does
    import torch

# The header metadata entry ComfyUI reads per-layer quantization confs from (comfy/utils.py convert_old_quants).
QUANT_METADATA_KEY = "_quantization_metadata"

# Suffixes that name a tensor's role inside its layer. Longest first so "weight_scale_2" wins over "weight".
ROLE_SUFFIXES: tuple[str, ...] = (
    "weight_scale_2",
    "weight_global_scale",
    "input_global_scale",
    "pre_quant_scale",
    "weight_packed",
    "weight_scale",
    "input_scale",
    "scale_weight",
    "scale_input",
    "comfy_quant",
    "weight",
    "bias",
)

_ROLES = set(ROLE_SUFFIXES)


def register_roles(roles: tuple[str, ...] | list[str]) -> None:
    """Add the role names of a registered format's signature (reference_specs.formats registers every format's), so
    that a format with a tensor name of its own (LightX2V's `.alpha`) is one module: its keys group into its layers."""
    _ROLES.update(roles)


# File-level marker tensors (not layers): legacy scaled_fp8 and the Qwen edit 2511 marker.
FILE_MARKER_KEYS: tuple[str, ...] = ("scaled_fp8", "__index_timestep_zero__")


def split_key(key: str) -> tuple[str, str]:
    """'blocks.0.ffn.0.weight_scale' -> ('blocks.0.ffn.0', 'weight_scale'); a bare parameter such as
    'blocks.0.modulation' is its own layer with role 'value'."""
    _registry()  # the formats' own role names join _ROLES when the registry is first imported
    base, dot, last = key.rpartition(".")
    if dot and last in _ROLES:  # a role is one whole dotted component, so the last one decides
        return base, last
    return key, "value"


@cache
def _registry() -> Any:
    """reference_specs.formats, imported on first use (it imports this module); cached because every layer of a
    file asks, and a function-level import costs microseconds each time."""
    from reference_specs import formats

    return formats


class TensorMeta(Protocol):
    """What a Layer needs to know about one tensor (inspect_tools.readers.TensorInfo satisfies it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Layer:
    """One module's tensors as stored in a file.

    name: the file's own base name (prefix and naming scheme untouched).
    native_name: the ComfyUI-native name after prefix stripping and diffusers renaming, when known.
    marker: the decoded comfy_quant conf ({"format": "nvfp4", ...}) from the per-layer tensor or from the header's
      `_quantization_metadata`; None when the layer has neither. marker_error says why a marker could not be read.
    """

    name: str
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    format: str = "unknown"
    native_name: str | None = None
    marker: dict[str, Any] | None = None
    marker_source: str | None = None  # "tensor" | "metadata" | "both"
    marker_error: str | None = None
    loader: Callable[[str], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def has(self, role: str) -> bool:
        return role in self.tensors

    def dtype(self, role: str) -> str | None:
        t = self.tensors.get(role)
        return t.dtype if t is not None else None

    def shape(self, role: str) -> tuple[int, ...] | None:
        t = self.tensors.get(role)
        return tuple(t.shape) if t is not None else None

    def load(self, role: str) -> torch.Tensor:
        """The stored tensor of `role` (raw dtype). Reads bytes on demand through the injected loader."""
        if self.loader is None or role not in self.tensors:
            raise KeyError(f"{self.name}: no tensor for role {role!r}")
        return self.loader(self.tensors[role].name)

    @property
    def is_quantized(self) -> bool:
        """What the format registry says about this layer's format (lossy encodings such as nvfp4, fp8, Q4_0)."""
        return _registry().is_quantized(self.format)
