"""What a format is: a fixed set of named tensors (its signature) and matching quantize / dequantize.

Adding a format = one module with one subclass, registered in formats/__init__.py. Callers (layer classification,
lint, roundtrip, convert, diff) only ever go through the registry, so they never change when a format is added.
"""

from __future__ import annotations

import math
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


# Source dtypes by safetensors name, for callers that know a weight only by its header (the gate). Anything else
# (GGUF block types) is dequantized to float32 before it is encoded, so it divides in float32.
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def source_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype a weight of this dtype (torch, or a safetensors name) is encoded in: non-float -> float32."""
    import torch

    if isinstance(dtype, str):
        return getattr(torch, _FLOAT_DTYPES.get(dtype, "float32"))
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


@dataclass(frozen=True)
class RoleSpec:
    """One tensor of a format's signature. dtypes: safetensors dtype names accepted, preferred first."""

    dtypes: tuple[str, ...]
    required: bool = True
    scalar: bool = False  # 0-d (or a single element) expected
    description: str = ""


# The cause a missing role of a quantized layer is catalogued under (reference_specs/causes.py).
MISSING_ROLE_CAUSES = {"weight_scale": "missing-block-scale", "weight_scale_2": "missing-tensor-scale"}


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

    @classmethod
    def decode_problem(cls, layer: Layer) -> tuple[str, str] | None:
        """(cause slug, reason) when the stored tensors cannot be decoded as this format, judged from the header
        alone; None when dequantize can run. The base checks what every format needs: its required roles and
        single-element scalars. Formats add their own shape rules (the ones lint reports)."""
        for role, spec in cls.signature.items():
            shape = layer.shape(role)
            if shape is None:
                if spec.required:
                    return MISSING_ROLE_CAUSES.get(role, "wrong-shape"), f"no {role} tensor"
                continue
            if spec.scalar and math.prod(shape) != 1:
                return "wrong-shape", f"{role} has shape {list(shape)}, a scalar has one element"
        return None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float weight [out, in] -> role -> tensor, exactly as written to a ComfyUI file."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """role -> stored tensor -> float32 weight of `shape` (padding cropped)."""
        raise NotImplementedError

    @classmethod
    def error_ceiling(cls, weight: torch.Tensor, scale: torch.Tensor) -> float | None:
        """The largest relative error ||decode(encode(W)) - W|| / ||W|| that ANY correct encoding of `weight` with
        this per-tensor `scale` can have, derived from the format's number grid alone (no encoder involved); None
        when the format states no such bound. A decode above it is wrong whatever any baseline says."""
        return None

    @classmethod
    def describe(cls) -> str:
        """'weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar' for diff and explanations."""
        parts = []
        for role, spec in cls.signature.items():
            s = f"{role} {spec.dtypes[0]}" + (" scalar" if spec.scalar else "")
            parts.append(s if spec.required else f"[{s}]")
        return " + ".join(parts)
