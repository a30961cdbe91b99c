"""FP8 with one per-tensor scale, as ComfyUI's comfy_quant stores it (formats "float8_e4m3fn" and "float8_e5m2").

Facts (shared/research/comfyui-load-path.md, Q2 and Misc; comfy-kitchen tensor/fp8.py, backends/eager/quantization.py):
- `.weight` F8_E4M3 (or F8_E5M2) [out, in], no padding.
- `.weight_scale` F32 0-d: the decode multiplier, default amax(|W|) / fp8_max (448 for E4M3, 57344 for E5M2), as
  ComfyUI computes it (comfy_fp8_scale: in float32, with a reciprocal clamp for F16 sources).
- optional `.input_scale` F32 0-d (absent: ComfyUI uses 1.0 for activations), optional `.bias`.
- quantize = clamp(W * (1 / scale), -fp8_max, fp8_max) cast to FP8 (round to nearest even); the multiplication by the
  reciprocal (not a division) is what comfy-kitchen does, so it is what bit-identity requires.
- decoded weight = fp8(weight) * weight_scale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format, RoleSpec, TorchDtype, source_dtype
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


def comfy_fp8_scale(amax: torch.Tensor | float, source: torch.dtype | str,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The FP8 weight scale ComfyUI computes for a weight of dtype `source` with this amax, float32 0-d; may be 0.

    ComfyUI replaces comfy-kitchen's FP8 layout with its own (comfy/quant_ops.py, _TensorCoreFP8LayoutBase.quantize,
    scale="recalculate"): amax widened to float32, divided by fp8_max in float32 (not in the source dtype, as
    comfy-kitchen's own TensorCoreFP8Layout does); then, for a source other than FP32 or BF16 (F16, F64), the scale
    becomes 1 / clamp(1 / scale, finfo(source).min, finfo(source).max) in float32, so the reciprocal the encoder
    multiplies by (cast to the source dtype) stays finite: an F16 weight with amax < 448/65504 gets about 1/65504.
    The same torch operations run here on the CPU. source: torch dtype or safetensors name (non-float -> float32).
    dtype: the FP8 dtype, float8_e4m3fn when None.
    """
    import torch

    dtype = torch.float8_e4m3fn if dtype is None else dtype
    amax = amax if isinstance(amax, torch.Tensor) else torch.tensor(float(amax), dtype=torch.float64)
    scale = amax.detach().to("cpu", torch.float32).reshape(()) / fp8_max(dtype)
    src = source_dtype(source)
    if src not in (torch.float32, torch.bfloat16):
        info = torch.finfo(src)
        scale = 1.0 / torch.clamp(1.0 / scale, min=info.min, max=info.max)
    return scale


def fp8_encoding_scale(amax: torch.Tensor | float, source: torch.dtype | str,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """The FP8 weight_scale nvdiag writes: ComfyUI's (comfy_fp8_scale) bit for bit wherever it is positive; 1.0 for
    an all-zero FP32/BF16 weight, where ComfyUI's 0 makes its encoder compute 0 * (1/0) = NaN for every element (1.0
    is finite and positive, and the weight still decodes to exact zeros). What the gate expects the scale to be."""
    import torch

    scale = comfy_fp8_scale(amax, source, dtype)
    return scale if scale > 0 else torch.ones((), dtype=torch.float32)


def fp8_per_tensor_scale(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The FP8 scale nvdiag encodes this weight with (fp8_encoding_scale of its amax and dtype), float32 0-d.
    dtype: the FP8 dtype, float8_e4m3fn when None."""
    import torch

    amax = weight.abs().amax() if weight.numel() else torch.zeros((), dtype=weight.dtype)
    return fp8_encoding_scale(amax, weight.dtype, dtype)


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
    return math.prod(shape) == 1


class _ComfyFP8(Format):
    """Shared body of the two comfy_quant FP8 formats; subclasses only name their FP8 dtype."""

    convert_source: ClassVar[bool] = True

    torch_dtype: ClassVar[torch.dtype]
    stored_dtype: ClassVar[str]
    quantized: ClassVar[bool] = True
    tensor_scale_role: ClassVar[str | None] = "weight_scale"
    compute_paths: ClassVar[tuple[str, str] | None] = ("W8A8", "W8A16")

    @classmethod
    def stored_tensors(cls, out_features: int, in_features: int) -> list[tuple[str, str, tuple[int, ...]]]:
        return [("weight", cls.stored_dtype, (out_features, in_features)), ("weight_scale", "F32", ())]

    @classmethod
    def default_scale(cls, amax: float, source: str) -> torch.Tensor:
        return fp8_encoding_scale(amax, source, cls.torch_dtype)

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
    scale_divisor: ClassVar[float | None] = 448.0
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("F8_E4M3",), description="FP8 E4M3 values, [out, in]"),
        "weight_scale": RoleSpec(("F32",), scalar=True, description="per-tensor decode multiplier amax/448"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
        "comfy_quant": RoleSpec(("U8",), required=False, description='UTF-8 JSON {"format": "float8_e4m3fn"}'),
    }

    @classmethod
    def proves_marker(cls, weight_dtype: str, roles: set[str], weight_shape: tuple[int, ...],
                      scale_shape: tuple[int, ...] | None) -> bool:
        """F8_E4M3 weight + a single-element weight_scale. (E5M2 files are not seen unmarked: not claimed.)"""
        return weight_dtype == cls.stored_dtype and "weight_scale" in roles and scale_shape is not None \
            and math.prod(scale_shape) == 1


class FP8E5M2(_ComfyFP8):
    slug: ClassVar[str] = "float8_e5m2"
    comfy_format: ClassVar[str | None] = "float8_e5m2"
    torch_dtype = TorchDtype("float8_e5m2")
    stored_dtype: ClassVar[str] = "F8_E5M2"
    typical_rel_error: ClassVar[float] = 0.08
    scale_divisor: ClassVar[float | None] = 57344.0
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("F8_E5M2",), description="FP8 E5M2 values, [out, in]"),
        "weight_scale": RoleSpec(("F32",), scalar=True, description="per-tensor decode multiplier amax/57344"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
        "comfy_quant": RoleSpec(("U8",), required=False, description='UTF-8 JSON {"format": "float8_e5m2"}'),
    }
