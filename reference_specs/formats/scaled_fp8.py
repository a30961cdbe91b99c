"""Legacy "fp8_scaled" files (Kijai / Comfy-Org repackages), before comfy_quant existed.

Facts (shared/research/peers.md, "Kijai / Comfy legacy fp8_scaled" and comfy/utils.py convert_old_quants):
- a file-level marker tensor `scaled_fp8` (empty, shape (0) or (2); its dtype names the FP8 variant, a float32
  marker meaning E4M3); ComfyUI only honours it when the header has no `_quantization_metadata`.
- per layer: `.weight` F8 [out, in], `.scale_weight` F32 scalar (decode multiplier: W = fp8 * scale_weight),
  optional `.scale_input` (dropped by ComfyUI when it equals 1.0), optional `.bias`.
- ComfyUI renames the scales on load and treats the layer as comfy_quant "float8_e4m3fn"; the arithmetic is the
  same per-tensor FP8 as formats/fp8.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format, RoleSpec
from reference_specs.formats.fp8 import F8_DTYPE_NAMES, as_fp8, dequantize_fp8, fp8_per_tensor_scale, quantize_fp8
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

MARKER_KEY = "scaled_fp8"


class ScaledFP8(Format):
    slug: ClassVar[str] = "scaled_fp8"
    comfy_format: ClassVar[str | None] = None  # no comfy_quant marker: ComfyUI converts it to float8_e4m3fn on load
    typical_rel_error: ClassVar[float] = 0.04
    tensor_scale_role: ClassVar[str | None] = "scale_weight"
    convert_source: ClassVar[bool] = True
    scale_divisor: ClassVar[float | None] = 448.0
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("F8_E4M3", "F8_E5M2"), description="FP8 values, [out, in]"),
        "scale_weight": RoleSpec(("F32",), scalar=True, description="per-tensor decode multiplier amax/448"),
        "scale_input": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
    }

    def __init__(self, fp8_dtype: torch.dtype | None = None) -> None:
        import torch

        self.fp8_dtype = torch.float8_e4m3fn if fp8_dtype is None else fp8_dtype

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        # The per-layer scale_weight is what makes a layer legacy-scaled, whether or not the file-level marker
        # survived (some tools drop or rename it; ComfyUI-WanVideoWrapper also keys on scale_weight alone).
        if layer.marker is not None and layer.marker.get("format") not in (None, "float8_e4m3fn", "float8_e5m2"):
            return False
        return layer.has("scale_weight") and layer.dtype("weight") in F8_DTYPE_NAMES

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        import torch

        scale = fp8_per_tensor_scale(weight, self.fp8_dtype) if scale is None else scale.to(torch.float32)
        scale = scale.reshape(())
        return {"weight": quantize_fp8(weight, scale, self.fp8_dtype), "scale_weight": scale}

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        weight = tensors["weight"]
        fp8 = as_fp8(weight, self.fp8_dtype)
        return dequantize_fp8(fp8, tensors["scale_weight"]).reshape(shape)
