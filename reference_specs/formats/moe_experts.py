"""MoE expert banks as ComfyUI stores them: E experts' weights in one tensor with a leading expert dimension and
per-expert scales. Recognised and named, not decoded.

Facts (Comfy-Org/ComfyUI comfy/ops.py at 0271a469, mixed_precision_ops MoEExperts: "State-dict layout matches
mixed_precision_ops.Linear with a leading expert dim: `.weight` quant data (storage_t), leading dim = E;
`.weight_scale` block / per-tensor scale; `.weight_scale_2` [E] or scalar (NVFP4 only); `.bias` [E, out_features];
`.comfy_quant` json -> {"format": "...", "num_experts": E}. Without comfy_quant the weight loads as a plain
compute_dtype 3D Parameter [E, out, in]"; per-row int8 / W4A8 banks are stored flat as [E * out, in]). The inner
format is the marker's (nvfp4, float8_e4m3fn, mxfp8, int8_tensorwise, ...): nvdiag names the bank and its inner
format, and checks neither the per-expert scales nor the codes. ComfyUI 618b803 (the oracle snapshot) has no expert
bank op at all.
"""

from __future__ import annotations

from typing import Any, ClassVar

from reference_specs.formats.base import RoleSpec
from reference_specs.formats.recognized import FLOAT_SCALE_DTYPES, RecognizedFormat
from reference_specs.layer import Layer

QUANTIZED_DTYPES = ("U8", "I8", "F8_E4M3", "F8_E5M2")
SCALE_ROLES = ("weight_scale", "weight_scale_2")
# inner formats that store two 4-bit codes per byte along `in`
PACKED_FORMATS = frozenset({"nvfp4", "convrot_w4a4", "awq_w4a16", "asym_w4a8_int8"})


def inner_format(layer: Layer) -> str:
    """The format of each expert's matrix: the marker's, else what the weight dtype suggests."""
    if isinstance(layer.marker, dict) and isinstance(layer.marker.get("format"), str):
        return layer.marker["format"]
    return {"U8": "nvfp4", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}.get(
        layer.dtype("weight") or "", "unmarked")


def experts(layer: Layer) -> int | None:
    """E, from the marker's num_experts or the weight's leading dimension."""
    if isinstance(layer.marker, dict) and isinstance(layer.marker.get("num_experts"), int):
        return layer.marker["num_experts"]
    shape = layer.shape("weight")
    return shape[0] if shape is not None and len(shape) == 3 else None


class MoEExperts(RecognizedFormat):
    slug: ClassVar[str] = "moe-experts"
    producer: ClassVar[str] = "ComfyUI MoE expert bank (leading expert dimension, per-expert scales)"
    comfyui: ClassVar[str] = (
        "ComfyUI loads expert banks through MixedPrecisionOps.MoEExperts (comfy/ops.py 0271a469) when the marker "
        "carries num_experts; 618b803 has no expert bank op, and an unmarked bank loads as plain [E, out, in] values")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(QUANTIZED_DTYPES, description="E experts' quantized weights, leading dim E"),
        "weight_scale": RoleSpec(("F32", "F8_E4M3", "F8_E8M0", "U8", "BF16", "F16"),
                                 description="per-expert scale [E] or block scales [E, ...]"),
        "weight_scale_2": RoleSpec(("F32",), required=False, description="NVFP4 per-expert tensor scale [E] or one"),
        "input_scale": RoleSpec(("F32",), required=False, description="static activation scale"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False, description="[E, out]"),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if isinstance(layer.marker, dict) and "num_experts" in layer.marker:
            return True
        shape = layer.shape("weight")
        if layer.marker is not None or shape is None or len(shape) != 3:
            return False
        if layer.dtype("weight") not in QUANTIZED_DTYPES:
            return False
        # unmarked: a 3-D quantized bank whose scales have one entry (or one block) per expert
        return any((layer.shape(role) or (0,))[:1] == shape[:1] for role in SCALE_ROLES if layer.has(role))

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        shape = layer.shape("weight")
        if shape is None or len(shape) != 3:
            return shape
        fmt = inner_format(layer)
        return (shape[0], shape[1], shape[2] * 2) if fmt in PACKED_FORMATS else tuple(shape)
