"""ConvRot W4A4 as ComfyUI stores it (comfy_quant {"format": "convrot_w4a4"}): recognised and named, not decoded.

Facts (Comfy-Org/comfy-kitchen comfy_kitchen/tensor/convrot_w4a4.py, TensorCoreConvRotW4A4Layout: "offline
regular-Hadamard weight rotation, online regular-Hadamard activation rotation, symmetric int4 quantization, and
int4 MMA with per-group scales"; state_dict_tensors "" -> `.weight`, "_scale" -> `.weight_scale`. Comfy-Org/ComfyUI
comfy/ops.py at 0271a469: QUANT_ALGOS["convrot_w4a4"] storage int8, parameters {weight_scale}; the loader raises
"Missing ConvRot W4A4 weight scale for layer ..." without the scale, reads `convrot_groupsize` (default 256) and
`linear_dtype` ("int4" or "int8") from the marker, quant group size 64):
- `.weight` I8 [out, in/2]: signed int4 codes of the rotated weight, two per byte;
- `.weight_scale` float [in/64, out]: one scale per 64 inputs per output (kitchen's SVDQuant int4 convention).
"""

from __future__ import annotations

from typing import Any, ClassVar

from reference_specs.formats.base import RoleSpec
from reference_specs.formats.recognized import (
    FLOAT_SCALE_DTYPES,
    RecognizedFormat,
    marked,
    newer_comfyui,
    numel,
    packed_int4_shape,
)
from reference_specs.layer import Layer

GROUP = 64


class ConvRotW4A4(RecognizedFormat):
    slug: ClassVar[str] = "convrot_w4a4"
    comfy_format: ClassVar[str | None] = "convrot_w4a4"
    producer: ClassVar[str] = "ComfyUI / comfy-kitchen ConvRot W4A4 (Hadamard-rotated int4, per-64 group scales)"
    comfyui: ClassVar[str] = newer_comfyui("convrot_w4a4", "; int4 tensor-core GEMM, SM 7.5+")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("I8",), description="signed int4 codes of the rotated weight, two per byte [out, in/2]"),
        "weight_scale": RoleSpec(FLOAT_SCALE_DTYPES, description="per-group scales [in/64, out]"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if marked(layer, "convrot_w4a4"):
            return True
        # unmarked: packed int4 beside float group scales and no zero points (AWQ W4A16 has them)
        logical = packed_int4_shape(layer)
        return (layer.marker is None and layer.dtype("weight") == "I8" and logical is not None and len(logical) == 2
                and not layer.has("weight_zeros") and layer.dtype("weight_scale") in FLOAT_SCALE_DTYPES
                and len(layer.shape("weight_scale") or ()) == 2
                and numel(layer, "weight_scale") == logical[0] * (logical[1] // GROUP))

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        return packed_int4_shape(layer)
