"""NVIDIA ModelOpt's Hugging Face NVFP4 export (e.g. nvidia/Wan2.2-T2V-A14B-Diffusers-NVFP4): ComfyUI's tensor names
and scale conventions, but NVIDIA's byte layout, diffusers key names and no marker.

Facts (issue 16; shared/research/peers.md, "NVIDIA Model-Optimizer diffusers example" and the compressed-tensors
contrast; NVIDIA/Model-Optimizer examples/diffusers/README.md):
- `.weight` U8 [out, in/2]: E2M1 codes with the even element in the LOW nibble (ModelOpt's NVFP4QTensor packing, as
  torchao and compressed-tensors; sglang PR #22574 made nibble swapping configurable for these exports);
- `.weight_scale` F8_E4M3 [out, in/16]: block scales ROW-MAJOR (the default export; the 128x4 swizzle is opt-in,
  `--extra-param enable_swizzle_layout=true`);
- `.weight_scale_2` F32 scalar: the decode multiplier, amax/2688, or amax/(6*256) with ModelOpt's "four over six"
  block scaling (blocks scaled to 4 or 6, so block scales stay below 448): decoded the same way, so nvdiag decodes
  and judges the values (roundtrip) and never lints the constant;
- `.input_scale` F32 scalar (amax_x/2688, calibrated), optional `.pre_quant_scale` (AWQ smoothing, which ComfyUI
  applies too), `.bias`;
- the transformer's config.json carries `quantization_config` with `quant_method: "modelopt"` (diffusers'
  NVIDIAModelOptConfig, huggingface/diffusers docs/source/en/quantization/modelopt.md); no comfy_quant marker.
Only that config tells these bytes from a ComfyUI file that lost its markers, so only with it are they claimed;
a renamed single file without it is judged by roundtrip's re-readings (nibble-order + scale-layout-linear).

The rewrite into ComfyUI's NVFP4 (`nvdiag fix`): nibbles swapped, block scales zero-padded and swizzled, every scale
kept as it is, markers added; `nvdiag fix` renames the diffusers keys in the same run (NV302).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import NativeTensor, RoleSpec
from reference_specs.formats.nvfp4 import (
    BLOCK,
    NVFP4,
    PackedCodes,
    block_scale_shape,
    decode_packed,
    reswizzle_block_scales,
    same,
    swap_nibbles,
)
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

QUANT_METHOD = "modelopt"
# roles ComfyUI reads as they are (comfy/ops.py: input_scale, pre_quant_scale; bias)
KEPT_ROLES = ("weight_scale_2", "input_scale", "pre_quant_scale", "bias")


def from_modelopt(config: dict[str, Any] | None) -> bool:
    """Whether a transformer config.json says ModelOpt quantized these weights."""
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return False
    producer = quant.get("producer")
    name = producer.get("name") if isinstance(producer, dict) else None
    return QUANT_METHOD in (str(quant.get("quant_method", "")).lower(), str(name or "").lower())


class NVFP4ModelOpt(PackedCodes):
    slug: ClassVar[str] = "nvfp4-modelopt"
    comfy_format: ClassVar[str | None] = None
    native_slug: ClassVar[str | None] = "nvfp4"
    typical_rel_error: ClassVar[float] = NVFP4.typical_rel_error
    tensor_scale_role: ClassVar[str | None] = "weight_scale_2"
    block_scale_role: ClassVar[str | None] = "weight_scale"
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("U8",), description="E2M1 codes, two per byte, even element in the LOW nibble"),
        "weight_scale": RoleSpec(("F8_E4M3",), description="FP8 E4M3 block scales, row-major [out, in/16]"),
        "weight_scale_2": RoleSpec(("F32",), scalar=True, description="decode multiplier amax/2688 (or amax/1536)"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "pre_quant_scale": RoleSpec(("F32", "BF16", "F16"), required=False, description="AWQ input smoothing"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return (layer.marker is None and from_modelopt(file_markers.get("config"))
                and layer.dtype("weight") in ("U8", "I8") and layer.has("weight_scale")
                and layer.has("weight_scale_2"))

    @classmethod
    def native_tensors(cls, layer: Layer) -> dict[str, NativeTensor]:
        problem = cls.decode_problem(layer)
        if problem is not None:
            raise ValueError(problem[1])
        packed = tuple(layer.shape("weight") or ())
        target = block_scale_shape(packed[0], packed[1] * 2)
        out: dict[str, NativeTensor] = {
            "weight": ("weight", swap_nibbles, None),
            "weight_scale": ("weight_scale", lambda t, shape=packed: reswizzle_block_scales(t, shape), target),
        }
        out.update({role: (role, same, None) for role in KEPT_ROLES if layer.has(role)})
        return out

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        packed = tensors["weight"].view(torch.uint8)
        rows, cols = packed.shape[0], packed.shape[1] * 2
        scales = tensors["weight_scale"]
        scales = (scales.view(torch.float8_e4m3fn) if scales.dtype == torch.uint8 else scales).to(torch.float32)
        scale_2 = tensors["weight_scale_2"].to(torch.float32).reshape(())
        # per-tensor times block scale first, then the code value: ComfyUI's order of float32 roundings
        total = (scale_2 * scales[:rows, : cols // BLOCK]).unsqueeze(-1)
        weight = decode_packed(packed, high_first=False).reshape(rows, cols // BLOCK, BLOCK).mul_(total)
        return weight.reshape(rows, cols)[: shape[0], : shape[1]]
