"""NVFP4 as vLLM's compressed-tensors / llm-compressor writes it ("nvfp4-pack-quantized").

Facts (shared/research/peers.md, "vllm-project/compressed-tensors"; compressed_tensors fp4_quantized.py):
- `.weight_packed` U8 [out, in/2]: E2M1 codes, the even-indexed element in the LOW nibble (the opposite of ComfyUI).
- `.weight_scale` F8_E4M3 [out, in/16]: block scales in plain row-major (linear) layout, not swizzled.
- `.weight_global_scale` F32 (one element): the RECIPROCAL convention, 448*6/amax, i.e. 1 / ComfyUI's weight_scale_2.
- optional `.input_global_scale` F32, same reciprocal convention for activations.
ComfyUI cannot load this layout; nvdiag reads it to diagnose and convert it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format, RoleSpec
from reference_specs.formats.nvfp4 import (
    BLOCK,
    F4_E2M1_MAX,
    F8_E4M3_MAX,
    e2m1_decode,
    encode_blocks,
    pack_nibbles,
    pad_to,
    roundup,
    unpack_nibbles,
)
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

# ComfyUI's weight_scale_2 = amax / GLOBAL_RANGE; compressed-tensors' weight_global_scale = GLOBAL_RANGE / amax.
GLOBAL_RANGE = F8_E4M3_MAX * F4_E2M1_MAX


def global_scale(weight: torch.Tensor) -> torch.Tensor:
    """448*6 / amax(|W|) as float32 of shape [1]; an all-zero weight gets 1.0 (it decodes to zeros anyway)."""
    import torch

    amax = weight.abs().amax().to(torch.float32) if weight.numel() else torch.zeros((), dtype=torch.float32)
    scale = torch.where(amax > 0, GLOBAL_RANGE / amax, torch.ones_like(amax))
    return scale.reshape(1)


class NVFP4CompressedTensors(Format):
    slug: ClassVar[str] = "nvfp4-compressed-tensors"
    typical_rel_error: ClassVar[float] = 0.12
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight_packed": RoleSpec(("U8",), description="E2M1 codes, two per byte, even element in the low nibble"),
        "weight_scale": RoleSpec(("F8_E4M3",), description="FP8 E4M3 block scales, linear [out, in/16]"),
        "weight_global_scale": RoleSpec(("F32",), scalar=True, description="reciprocal per-tensor scale 2688/amax"),
        "input_global_scale": RoleSpec(("F32",), required=False, scalar=True, description="2688/activation amax"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return layer.has("weight_packed") and (layer.has("weight_global_scale") or layer.has("weight_scale"))

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        shape = layer.shape("weight_packed")
        return (shape[0], shape[1] * 2) if shape is not None and len(shape) == 2 else shape

    def quantize(
        self, weight: torch.Tensor, weight_global_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """[out, in] float -> compressed-tensors tensors. Columns are zero-padded to a multiple of 16; rows are not."""
        import torch

        out_f, in_f = weight.shape
        gscale = global_scale(weight) if weight_global_scale is None else weight_global_scale.to(torch.float32)
        # Encode with the decode multiplier a consumer derives from the stored global scale (1 / global), so the
        # stored block scales agree with what compressed-tensors readers compute.
        scale_2 = (1.0 / gscale).reshape(())
        codes, scales = encode_blocks(pad_to(weight, out_f, roundup(in_f, BLOCK)), scale_2)
        return {
            "weight_packed": pack_nibbles(codes, high_first=False),
            "weight_scale": scales,
            "weight_global_scale": gscale.reshape(1),
        }

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        packed = tensors["weight_packed"]
        codes = unpack_nibbles(packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed, high_first=False)
        scales = tensors["weight_scale"]
        scales = (scales.view(torch.float8_e4m3fn) if scales.dtype == torch.uint8 else scales).to(torch.float32)
        rows, cols = codes.shape
        scale_2 = 1.0 / tensors["weight_global_scale"].to(torch.float32).reshape(())
        total = (scale_2 * scales[:rows, : cols // BLOCK]).unsqueeze(-1)
        weight = (e2m1_decode(codes).reshape(rows, cols // BLOCK, BLOCK) * total).reshape(rows, cols)
        return weight[: shape[0], : shape[1]]
