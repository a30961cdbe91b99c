"""Unquantized safetensors tensors: f32, f16, bf16, f64, and unscaled FP8 casts.

Every layer gets a format, not only Linear weights: a norm (weight/bias only) or a bare parameter (role "value",
e.g. WAN's `blocks.N.modulation`) is classified by the dtype of its main tensor. GGUF files are left to
formats/gguf_types.py, whose slugs are the GGML type names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format, RoleSpec, TorchDtype
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

# Roles that make a layer something other than a plain float tensor.
SCALE_ROLES = (
    "weight_scale",
    "weight_scale_2",
    "scale_weight",
    "weight_global_scale",
    "weight_packed",
)
MAIN_ROLES = ("weight", "value", "bias")


def main_role(layer: Layer) -> str | None:
    """The tensor whose dtype decides the layer's plain format: weight, else the bare value, else bias."""
    return next((role for role in MAIN_ROLES if layer.has(role)), next(iter(layer.tensors), None))


class _Plain(Format):
    """A tensor kept at a float dtype: quantize is a cast, dequantize a cast to float32."""

    stored_dtype: ClassVar[str]
    torch_dtype: ClassVar[torch.dtype]
    quantized: ClassVar[bool] = False

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if file_markers.get("container") == "gguf" or any(layer.has(role) for role in SCALE_ROLES):
            return False
        role = main_role(layer)
        return role is not None and layer.dtype(role) == cls.stored_dtype

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        role = main_role(layer)
        return layer.shape(role) if role is not None else None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": weight.to(self.torch_dtype)}

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        tensor = tensors.get("weight", tensors.get("value"))
        if tensor is None:
            tensor = next(iter(tensors.values()))
        return tensor.to(torch.float32).reshape(shape)


def _signature(stored: str) -> dict[str, RoleSpec]:
    return {
        "weight": RoleSpec((stored,), description=f"{stored} values"),
        "bias": RoleSpec(("F32", "BF16", "F16", stored), required=False),
    }


class F32(_Plain):
    slug: ClassVar[str] = "f32"
    stored_dtype: ClassVar[str] = "F32"
    torch_dtype = TorchDtype("float32")
    signature: ClassVar[dict[str, RoleSpec]] = _signature("F32")


class F16(_Plain):
    slug: ClassVar[str] = "f16"
    stored_dtype: ClassVar[str] = "F16"
    torch_dtype = TorchDtype("float16")
    typical_rel_error: ClassVar[float] = 5e-4
    signature: ClassVar[dict[str, RoleSpec]] = _signature("F16")


class BF16(_Plain):
    slug: ClassVar[str] = "bf16"
    stored_dtype: ClassVar[str] = "BF16"
    torch_dtype = TorchDtype("bfloat16")
    typical_rel_error: ClassVar[float] = 4e-3
    signature: ClassVar[dict[str, RoleSpec]] = _signature("BF16")


class F64(_Plain):
    slug: ClassVar[str] = "f64"
    stored_dtype: ClassVar[str] = "F64"
    torch_dtype = TorchDtype("float64")
    signature: ClassVar[dict[str, RoleSpec]] = _signature("F64")


class F8E4M3Plain(_Plain):
    """An FP8 weight with no scale at all (e.g. *_fp8_e4m3fn.safetensors casts): ComfyUI loads it as a plain fp8
    weight. Lossy, hence quantized; encoding is a saturating cast."""

    slug: ClassVar[str] = "f8_e4m3"
    stored_dtype: ClassVar[str] = "F8_E4M3"
    torch_dtype = TorchDtype("float8_e4m3fn")
    quantized: ClassVar[bool] = True
    convert_source: ClassVar[bool] = True
    typical_rel_error: ClassVar[float] = 0.04
    signature: ClassVar[dict[str, RoleSpec]] = _signature("F8_E4M3")

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        limit = float(torch.finfo(self.torch_dtype).max)  # float8_e4m3fn has no Inf: out-of-range would be NaN
        return {"weight": weight.clamp(-limit, limit).to(self.torch_dtype)}


class F8E5M2Plain(F8E4M3Plain):
    slug: ClassVar[str] = "f8_e5m2"
    stored_dtype: ClassVar[str] = "F8_E5M2"
    torch_dtype = TorchDtype("float8_e5m2")
    typical_rel_error: ClassVar[float] = 0.08
    signature: ClassVar[dict[str, RoleSpec]] = _signature("F8_E5M2")


PLAIN_FORMATS: list[type[Format]] = [F32, F16, BF16, F64, F8E4M3Plain, F8E5M2Plain]
