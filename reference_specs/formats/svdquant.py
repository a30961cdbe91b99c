"""Nunchaku's layouts (SVDQuant W4A4 and AWQ W4A16), recognised and named, not decoded.

Facts (nunchaku-tech/nunchaku nunchaku/models/linear.py):
- SVDQW4A4Linear ("SVDQuant W4A4 quantized linear layer", precision 'int4' or 'nvfp4'): `.qweight` int8
  (out, in // 2) packed 4-bit codes; `.wscales` (in // group_size, out), bfloat16/float16 for int4 (group 64),
  float8_e4m3fn for nvfp4 (group 16); `.smooth_factor` and `.smooth_factor_orig` (in,); `.proj_down` (in, rank) and
  `.proj_up` (out, rank), the low-rank branch in 16-bit; for nvfp4 also `.wcscales` (out,) and the scalar
  `.wtscale`; `.bias` (out,).
- AWQW4A16Linear: `.qweight` int32 (out // 4, in // 2); `.wscales` and `.wzeros` (in // group_size, out) in 16-bit,
  group 64 (the modulation layers of Nunchaku's Flux / Qwen-Image checkpoints).
ComfyUI's own loader reads none of these names: the ComfyUI-nunchaku custom nodes load these files.
"""

from __future__ import annotations

from typing import Any, ClassVar

from reference_specs.formats.base import RoleSpec
from reference_specs.formats.recognized import FLOAT_SCALE_DTYPES, RecognizedFormat, packed_int4_shape
from reference_specs.layer import Layer

_COMFYUI = ("ComfyUI's loader reads none of qweight/wscales/{extra} (comfy/ops.py reads .weight, .bias, .comfy_quant "
            "and the scales of QUANT_ALGOS): the layer has no .weight, so the model fails detection or loads "
            "without it; these files load through the ComfyUI-nunchaku custom nodes")
LOW_RANK_ROLES = ("proj_down", "proj_up", "smooth_factor")


class SVDQuantInt4(RecognizedFormat):
    slug: ClassVar[str] = "svdquant-int4"
    comfyui_native: ClassVar[bool] = False
    producer: ClassVar[str] = "Nunchaku SVDQuant W4A4, int4 (4-bit codes + 16-bit low-rank branch and smoothing)"
    comfyui: ClassVar[str] = _COMFYUI.format(extra="proj_down/proj_up/smooth_factor")
    scale_dtypes: ClassVar[tuple[str, ...]] = ("BF16", "F16")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "qweight": RoleSpec(("I8", "U8"), description="4-bit codes, two per byte [out, in/2]"),
        "wscales": RoleSpec(("BF16", "F16"), description="per-group scales [in/64, out]"),
        "smooth_factor": RoleSpec(("BF16", "F16", "F32"), description="input smoothing [in]"),
        "smooth_factor_orig": RoleSpec(("BF16", "F16", "F32"), required=False, description="unused copy [in]"),
        "proj_down": RoleSpec(("BF16", "F16", "F32"), description="low-rank down projection [in, rank]"),
        "proj_up": RoleSpec(("BF16", "F16", "F32"), description="low-rank up projection [out, rank]"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return (layer.dtype("qweight") in ("I8", "U8") and layer.dtype("wscales") in cls.scale_dtypes
                and any(layer.has(role) for role in LOW_RANK_ROLES))

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        return packed_int4_shape(layer, "qweight")


class SVDQuantNVFP4(SVDQuantInt4):
    slug: ClassVar[str] = "svdquant-nvfp4"
    producer: ClassVar[str] = "Nunchaku SVDQuant W4A4, NVFP4 (FP4 codes + FP8 group scales + 16-bit low-rank branch)"
    scale_dtypes: ClassVar[tuple[str, ...]] = ("F8_E4M3", "U8")
    signature: ClassVar[dict[str, RoleSpec]] = {
        **SVDQuantInt4.signature,
        "wscales": RoleSpec(("F8_E4M3", "U8"), description="FP8 E4M3 per-group scales [in/16, out]"),
        "wcscales": RoleSpec(("BF16", "F16", "F32", "F8_E4M3"), required=False, description="per-channel [out]"),
        "wtscale": RoleSpec(("F32", "BF16", "F16"), required=False, scalar=True, description="per-tensor scale"),
    }


class AWQNunchaku(RecognizedFormat):
    slug: ClassVar[str] = "awq-nunchaku"
    comfyui_native: ClassVar[bool] = False
    producer: ClassVar[str] = "Nunchaku AWQ W4A16 (int32-packed 4-bit codes, 16-bit group scales and zeros)"
    comfyui: ClassVar[str] = _COMFYUI.format(extra="wzeros")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "qweight": RoleSpec(("I32",), description="4-bit codes packed in int32 [out/4, in/2]"),
        "wscales": RoleSpec(("BF16", "F16"), description="per-group scales [in/64, out]"),
        "wzeros": RoleSpec(("BF16", "F16"), description="per-group zero points [in/64, out]"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return layer.has("qweight") and layer.has("wzeros")

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        qweight, wscales = layer.shape("qweight"), layer.shape("wscales")
        if qweight is None or wscales is None or len(qweight) != 2 or len(wscales) != 2:
            return qweight
        return (wscales[1], qweight[1] * 2)
