"""ComfyUI's integer formats (recognised and named, not decoded): INT8 tensorwise and the int4 W4A8 of
comfy_quant "asym_w4a8_int8".

Facts (Comfy-Org/ComfyUI comfy/quant_ops.py and comfy/ops.py at 0271a469; Comfy-Org/comfy-kitchen
comfy_kitchen/tensor/int8.py, TensorWiseINT8Layout "(from dxqb/OneTrainer): Weights: single scale per tensor;
Activations: per-row scales (dynamic quantization)", state_dict_tensors "" -> `.weight`, "_scale" -> `.weight_scale`):
- int8_tensorwise: `.weight` I8 [out, in]; `.weight_scale` one float (a per-row [out] or [out, 1] scale is read by
  the same layout in forks and by ComfyUI's MoE banks); marker options `convrot` / `convrot_groupsize` (a
  Hadamard-rotated weight). ComfyUI raises "Missing INT8 weight scale for layer ..." without the scale.
- asym_w4a8_int8: `.weight` I8 [out, in/2] (two int4 codes per byte), `.weight_s_rel` F8_E4M3 per-group scales
  (group_size, default 16), `.weight_s_channel` F32 per-channel scales, optional `.weight_codebook` (Lloyd-Max).
Neither is in the QUANT_ALGOS of 618b803 (the oracle snapshot): a marked layer stops that loader with KeyError.
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

_PATH = "; weight-only matmul path, quantize_input False"


class INT8Tensorwise(RecognizedFormat):
    slug: ClassVar[str] = "int8_tensorwise"
    comfy_format: ClassVar[str | None] = "int8_tensorwise"
    producer: ClassVar[str] = "ComfyUI / comfy-kitchen INT8 tensorwise (OneTrainer's scheme; convert_to_quant --int8)"
    comfyui: ClassVar[str] = newer_comfyui("int8_tensorwise", _PATH)
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("I8",), description="int8 values [out, in]"),
        "weight_scale": RoleSpec(FLOAT_SCALE_DTYPES, description="decode multiplier: one per tensor (or per row)"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if marked(layer, "int8_tensorwise"):
            return True
        # unmarked (e.g. LightX2V's int8 WAN files): int8 values beside a float scale per tensor or per row; NVFP4's
        # block scales are FP8, never float, so this never takes an NVFP4 layer
        shape = layer.shape("weight")
        return (layer.marker is None and layer.dtype("weight") == "I8" and shape is not None and len(shape) == 2
                and layer.dtype("weight_scale") in FLOAT_SCALE_DTYPES and numel(layer, "weight_scale") in (1, shape[0]))


class AsymW4A8(RecognizedFormat):
    slug: ClassVar[str] = "asym_w4a8_int8"
    comfy_format: ClassVar[str | None] = "asym_w4a8_int8"
    producer: ClassVar[str] = "ComfyUI / comfy-kitchen W4A8 (int4 weights with FP8 group and F32 channel scales)"
    comfyui: ClassVar[str] = newer_comfyui("asym_w4a8_int8", _PATH)
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("I8",), description="int4 codes, two per byte [out, in/2]"),
        "weight_s_rel": RoleSpec(("F8_E4M3", "U8"), description="per-group scales (group_size, default 16)"),
        "weight_s_channel": RoleSpec(("F32",), required=False, description="per-output-channel scales"),
        "weight_codebook": RoleSpec(FLOAT_SCALE_DTYPES, required=False, description="Lloyd-Max codebook"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return marked(layer, "asym_w4a8_int8") or (layer.marker is None and layer.has("weight_s_rel"))

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        return packed_int4_shape(layer)
