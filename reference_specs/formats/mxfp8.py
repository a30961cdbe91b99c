"""MXFP8 as ComfyUI stores it (comfy_quant {"format": "mxfp8"}): recognised and named, not decoded.

Facts (Comfy-Org/comfy-kitchen comfy_kitchen/tensor/mxfp8.py, TensorCoreMXFP8Layout: "FP8 E4M3 data (no packing),
E8M0 block scales (pure power-of-2 exponents), block size of 32, auto-pads to 32x32 alignment"; state_dict_tensors
writes "" -> `.weight`, "_scale" -> `.weight_scale`. Comfy-Org/ComfyUI comfy/quant_ops.py at 0271a469: QUANT_ALGOS
["mxfp8"] = storage float8_e4m3fn, parameters {weight_scale, input_scale}, group_size 32, registered only when
comfy-kitchen has TensorCoreMXFP8Layout; comfy/ops.py _load_quantized_module views `.weight_scale` as
float8_e8m0fnu and raises "Missing MXFP8 block scales for layer ..." without it):
- `.weight` F8_E4M3 [ru32(out), ru32(in)];
- `.weight_scale` F8_E8M0 (or its bytes as U8): one power-of-two scale per 32 elements of a row;
- optional `.input_scale` F32 scalar, `.bias`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from reference_specs.formats.base import RoleSpec
from reference_specs.formats.recognized import FLOAT_SCALE_DTYPES, RecognizedFormat, marked, newer_comfyui
from reference_specs.layer import Layer

BLOCK = 32


class MXFP8(RecognizedFormat):
    slug: ClassVar[str] = "mxfp8"
    comfy_format: ClassVar[str | None] = "mxfp8"
    producer: ClassVar[str] = "ComfyUI / comfy-kitchen MXFP8 (E4M3 data, one E8M0 scale per 32 elements)"
    comfyui: ClassVar[str] = newer_comfyui(
        "mxfp8", ", with a comfy-kitchen that has TensorCoreMXFP8Layout; fast matmul on Blackwell, SM 10.0")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("F8_E4M3",), description="FP8 E4M3 values [ru32(out), ru32(in)]"),
        "weight_scale": RoleSpec(("F8_E8M0", "U8"), description="E8M0 block scales, one per 32 elements"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if marked(layer, "mxfp8"):
            return True
        # unmarked: FP8 values beside power-of-two block scales (ComfyUI's FP8 keeps one F32 scalar instead)
        return (layer.marker is None and layer.dtype("weight") == "F8_E4M3"
                and layer.dtype("weight_scale") in ("F8_E8M0", "U8") and len(layer.shape("weight") or ()) == 2)
