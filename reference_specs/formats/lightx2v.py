"""LightX2V's NVFP4 (the WAN checkpoints published as lightx2v/Wan-NVFP4): NVFP4 codes and block scales in NVIDIA's
own kernel layout, with the per-tensor scales of LightX2V's runtime instead of ComfyUI's. ComfyUI refuses it.

Facts (issue 16; ModelTC/LightX2V tools/convert/quant/quant.py, QuantWeightNVFP4: `weight_global_scale = 2688 /
max|W|` of the BF16 weight, then lightx2v_kernel's scaled_nvfp4_quant(W, weight_global_scale), whose documented
outputs are a uint8 [m, n/2] weight and float8_e4m3fn scales of [ru128(m), ru4(n/16)]; shared/research/peers.md):
- `.weight` U8 [out, in/2]: E2M1 codes, NVIDIA's order, the even element in the LOW nibble;
- `.weight_scale` F8_E4M3 [ru128(out), ru4(in/16)]: block scales, already in the swizzled 128x4 tile layout;
- `.input_global_scale` F32 scalar: 2688 / act_absmax (an encode multiplier, calibrated on activations);
- `.alpha` F32 scalar: 1 / (input_global_scale * weight_global_scale), the GEMM's output multiplier;
- no `.comfy_quant`, no `_quantization_metadata`.
So the weight decodes as e2m1(code) * fp8(block scale) / weight_global_scale, and 1 / weight_global_scale =
alpha * input_global_scale. ComfyUI's reply (Comfy-Org/ComfyUI#11640, on lightx2v/Wan-NVFP4): "Lightx format is not
supported and will most likely never will be"; without a marker its loader takes the U8 bytes as a plain weight.

The rewrite into ComfyUI's NVFP4 (`nvdiag fix`) moves no code and no block scale: nibbles swapped, weight_scale_2 =
alpha * input_global_scale (the decode multiplier), input_scale = 1 / input_global_scale (act_absmax / 2688, the
activation decode scale ComfyUI uses on Blackwell), alpha and input_global_scale dropped, markers added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import NativeTensor, RoleSpec
from reference_specs.formats.nvfp4 import NVFP4, PackedCodes, block_scale_shape, same, swap_nibbles
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

# The roles only LightX2V writes: a layer carrying them beside NVFP4 codes is this format.
SCALAR_ROLES = ("input_global_scale", "alpha")


def _scalar(value: torch.Tensor, name: str) -> torch.Tensor:
    import torch

    if value.numel() != 1:
        raise ValueError(f"{name} has {value.numel()} elements, LightX2V stores one")
    scalar = value.to(torch.float32).reshape(())
    if not bool(torch.isfinite(scalar)) or float(scalar) <= 0:
        raise ValueError(f"{name} is {float(scalar)!r}, not a positive finite scale")
    return scalar


def native_scales(alpha: torch.Tensor, input_global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_scale_2, input_scale) of the ComfyUI-native layer, float32 0-d: alpha * input_global_scale (=
    1 / weight_global_scale, the weight's decode multiplier) and 1 / input_global_scale (act_absmax / 2688)."""
    igs = _scalar(input_global_scale, "input_global_scale")
    return _scalar(alpha, "alpha") * igs, 1.0 / igs


class NVFP4LightX2V(PackedCodes):
    slug: ClassVar[str] = "nvfp4-lightx2v"
    comfy_format: ClassVar[str | None] = None  # no marker: ComfyUI does not select it
    native_slug: ClassVar[str | None] = "nvfp4"
    typical_rel_error: ClassVar[float] = NVFP4.typical_rel_error
    block_scale_role: ClassVar[str | None] = "weight_scale"
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("U8",), description="E2M1 codes, two per byte, even element in the LOW nibble"),
        "weight_scale": RoleSpec(("F8_E4M3",), description="FP8 E4M3 block scales, swizzled 128x4 tiles"),
        "input_global_scale": RoleSpec(("F32",), scalar=True, description="activation encode multiplier 2688/amax"),
        "alpha": RoleSpec(("F32",), scalar=True, description="1/(input_global_scale*weight_global_scale)"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        # NVFP4 codes with LightX2V's scalars and none of ComfyUI's: a marked layer is the marker's format
        return (layer.marker is None and layer.dtype("weight") in ("U8", "I8") and layer.has("weight_scale")
                and any(layer.has(role) for role in SCALAR_ROLES) and not layer.has("weight_scale_2"))

    @classmethod
    def native_tensors(cls, layer: Layer) -> dict[str, NativeTensor]:
        problem = cls.decode_problem(layer)
        if problem is not None:
            raise ValueError(problem[1])
        weight = layer.shape("weight") or ()
        if layer.shape("weight_scale") != block_scale_shape(weight[0], weight[1] * 2):
            raise ValueError(f"block scales {list(layer.shape('weight_scale') or ())} are not the swizzled shape")
        scale_2, input_scale = native_scales(layer.load("alpha"), layer.load("input_global_scale"))
        out: dict[str, NativeTensor] = {
            "weight": ("weight", swap_nibbles, None),
            "weight_scale": ("weight_scale", same, None),
            "weight_scale_2": (None, scale_2, None),
            "input_scale": (None, input_scale, None),
        }
        if layer.has("bias"):
            out["bias"] = ("bias", same, None)
        return out

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        scale_2, _ = native_scales(tensors["alpha"], tensors["input_global_scale"])
        native = {"weight": swap_nibbles(tensors["weight"]), "weight_scale": tensors["weight_scale"],
                  "weight_scale_2": scale_2}
        return NVFP4().dequantize(native, shape)
