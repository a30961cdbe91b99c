"""What a format is: a fixed set of named tensors (its signature) and matching quantize / dequantize.

Adding a format = one module with one subclass, registered in formats/__init__.py. Callers (layer classification,
lint, roundtrip, convert, diff) only ever go through the registry, so they never change when a format is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch


class TorchDtype:
    """A class attribute that names a torch dtype and resolves it on access.

    Formats are declared (and layers classified) from headers alone; resolving dtypes only when a codec runs keeps
    header-only commands from importing torch (about a second of start-up).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


@dataclass(frozen=True)
class RoleSpec:
    """One tensor of a format's signature. dtypes: safetensors dtype names accepted, preferred first."""

    dtypes: tuple[str, ...]
    required: bool = True
    scalar: bool = False  # 0-d (or a single element) expected
    description: str = ""


class Format:
    """Base class of every storage format of a Linear weight.

    slug: the stable name used in output (`nvfp4`, `float8_e4m3fn`, `scaled_fp8`, `Q4_0`, `f32`, ...).
    comfy_format: the value of comfy_quant's "format" that selects it in ComfyUI, if any.
    signature: role -> RoleSpec, the tensors a layer of this format carries.
    """

    slug: ClassVar[str]
    comfy_format: ClassVar[str | None] = None
    signature: ClassVar[dict[str, RoleSpec]] = {}
    quantized: ClassVar[bool] = True
    # Expected relative Frobenius error of quantize->dequantize on well-behaved weights (a loose upper bound
    # used when no measured baseline is available).
    typical_rel_error: ClassVar[float] = 0.0

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        """True when `layer` (as stored) is of this format. Called in registry order; first claim wins."""
        raise NotImplementedError

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        """The unquantized weight shape [out, in] that the stored tensors imply (padding makes it a bound)."""
        return layer.shape("weight")

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float weight [out, in] -> role -> tensor, exactly as written to a ComfyUI file."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """role -> stored tensor -> float32 weight of `shape` (padding cropped)."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        """'weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar' for diff and explanations."""
        parts = []
        for role, spec in cls.signature.items():
            s = f"{role} {spec.dtypes[0]}" + (" scalar" if spec.scalar else "")
            parts.append(s if spec.required else f"[{s}]")
        return " + ".join(parts)
