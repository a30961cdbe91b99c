"""FP8 with one per-tensor scale, as ComfyUI's comfy_quant stores it (formats "float8_e4m3fn" and "float8_e5m2").

Facts (shared/research/comfyui-load-path.md, Q2 and Misc; comfy-kitchen tensor/fp8.py, backends/eager/quantization.py):
- `.weight` F8_E4M3 (or F8_E5M2) [out, in], no padding.
- `.weight_scale` F32 0-d: the decode multiplier, default amax(|W|) / fp8_max (448 for E4M3, 57344 for E5M2).
- optional `.input_scale` F32 0-d (absent: ComfyUI uses 1.0 for activations), optional `.bias`.
- quantize = clamp(W * (1 / scale), -fp8_max, fp8_max) cast to FP8 (round to nearest even); the multiplication by the
  reciprocal (not a division) is what comfy-kitchen does, so it is what bit-identity requires.
- decoded weight = fp8(weight) * weight_scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format, RoleSpec, TorchDtype
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> torch dtype name; F8_DTYPES (the torch dtypes) is built from it on first use.
F8_DTYPE_NAMES: dict[str, str] = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def __getattr__(name: str) -> Any:
    # PEP 562: F8_DTYPES holds torch dtypes, so it exists only once someone asks for it (torch is not loaded before)
    if name == "F8_DTYPES":
        import torch

        return {stored: getattr(torch, dtype) for stored, dtype in F8_DTYPE_NAMES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fp8_max(dtype: torch.dtype) -> float:
    import torch

    return float(torch.finfo(dtype).max)


def fp8_per_tensor_scale(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """amax(|W|) / fp8_max as a float32 0-d tensor.

    An all-zero weight would give 0, and comfy-kitchen's 1/0 then turns every element into NaN; 1.0 is used instead:
    it is finite and positive (no non-finite-scale finding) and the weight still decodes to exact zeros.
    dtype: the FP8 dtype, float8_e4m3fn when None.
    """
    import torch

    dtype = torch.float8_e4m3fn if dtype is None else dtype
    amax = weight.abs().amax().to(torch.float32) if weight.numel() else torch.zeros((), dtype=torch.float32)
    scale = (amax / fp8_max(dtype)).reshape(())
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-tensor FP8 encoding, step for step as comfy-kitchen's quantize_per_tensor_fp8 (in the input's dtype);
    dtype float8_e4m3fn when None."""
    import torch

    dtype = torch.float8_e4m3fn if dtype is None else dtype
    limit = fp8_max(dtype)
    reciprocal = (1.0 / scale.to(torch.float32)).to(weight.dtype)
    scaled = weight * reciprocal
    return torch.clamp(scaled, -limit, limit, out=scaled).to(dtype)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    import torch

    return weight.to(torch.float32) * scale.to(torch.float32)


def as_fp8(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored FP8 tensor; raw bytes (uint8) are reinterpreted, the way ComfyUI views them."""
    import torch

    return tensor.view(dtype) if tensor.dtype == torch.uint8 else tensor


def is_scalar(layer: Layer, role: str) -> bool:
    shape = layer.shape(role)
    if shape is None:
        return False
    n = 1
    for d in shape:
        n *= d
    return n == 1


class _ComfyFP8(Format):
    """Shared body of the two comfy_quant FP8 formats; subclasses only name their FP8 dtype."""

    torch_dtype: ClassVar[torch.dtype]
    stored_dtype: ClassVar[str]
    quantized: ClassVar[bool] = True

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if layer.marker is not None:
            return layer.marker.get("format") == cls.comfy_format
        # Unmarked: an FP8 weight beside one per-tensor weight_scale (block-scaled FP8 variants carry a matrix).
        return layer.dtype("weight") == cls.stored_dtype and is_scalar(layer, "weight_scale")

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        import torch

        scale = fp8_per_tensor_scale(weight, self.torch_dtype) if scale is None else scale.to(torch.float32)
        scale = scale.reshape(())
        return {"weight": quantize_fp8(weight, scale, self.torch_dtype), "weight_scale": scale}

    @classmethod
    def error_ceiling(cls, weight: torch.Tensor, scale: torch.Tensor) -> float | None:
        """Bound from the FP8 grid alone: rounding y = x/scale to the nearest FP8 value errs by at most half an
        ulp, 2^-(m+1) |y| for normal y (m mantissa bits) and half the subnormal spacing below; beyond fp8_max y is
        clamped. comfy-kitchen multiplies by 1/scale in the weight's own dtype (BF16 keeps 8 bits), which adds up
        to 2^-7 |x|; that slack is granted to every source dtype."""
        import torch

        info = torch.finfo(cls.torch_dtype)
        x = weight.to(torch.float32).abs()
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
        if norm == 0.0:
            return 0.0
        s = float(scale.to(torch.float32).reshape(()))
        half_ulp = info.eps / 2
        rounding = torch.clamp(x * half_ulp * (1 + 2.0**-7), min=info.smallest_normal * half_ulp * s)
        bound = torch.maximum(rounding + x * 2.0**-7, x - info.max * s)
        return float(torch.linalg.vector_norm(bound, dtype=torch.float64)) / norm * (1 + 1e-6)

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        weight = dequantize_fp8(as_fp8(tensors["weight"], self.torch_dtype), tensors["weight_scale"])
        return weight.reshape(shape)


class FP8E4M3(_ComfyFP8):
    slug: ClassVar[str] = "float8_e4m3fn"
    comfy_format: ClassVar[str | None] = "float8_e4m3fn"
    torch_dtype = TorchDtype("float8_e4m3fn")
    stored_dtype: ClassVar[str] = "F8_E4M3"
    typical_rel_error: ClassVar[float] = 0.04
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("F8_E4M3",), description="FP8 E4M3 values, [out, in]"),
        "weight_scale": RoleSpec(("F32",), scalar=True, description="per-tensor decode multiplier amax/448"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
        "comfy_quant": RoleSpec(("U8",), required=False, description='UTF-8 JSON {"format": "float8_e4m3fn"}'),
    }


class FP8E5M2(_ComfyFP8):
    slug: ClassVar[str] = "float8_e5m2"
    comfy_format: ClassVar[str | None] = "float8_e5m2"
    torch_dtype = TorchDtype("float8_e5m2")
    stored_dtype: ClassVar[str] = "F8_E5M2"
    typical_rel_error: ClassVar[float] = 0.08
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("F8_E5M2",), description="FP8 E5M2 values, [out, in]"),
        "weight_scale": RoleSpec(("F32",), scalar=True, description="per-tensor decode multiplier amax/57344"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
        "comfy_quant": RoleSpec(("U8",), required=False, description='UTF-8 JSON {"format": "float8_e5m2"}'),
    }
