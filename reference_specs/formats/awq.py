"""AWQ W4A16 (4-bit weights, 16-bit activations), recognised and named, not decoded: ComfyUI's own comfy_quant
"awq_w4a16" and AutoAWQ's GEMM export (the `qweight` / `qzeros` / `scales` checkpoints on the Hub).

Facts:
- ComfyUI awq_w4a16 (Comfy-Org/comfy-kitchen comfy_kitchen/tensor/awq_w4a16.py, TensorCoreAWQW4A16Layout: "qweight
  (N, K // 2) int8 packed uint4, bits 0..3 -> column 2j, bits 4..7 -> column 2j+1; scale=wscales (K // G, N)
  bf16/fp16; wzeros (K // G, N) bf16/fp16; W[n, k] = (qweight[n, k] - 8) * wscales[k // G, n] + wzeros[k // G, n]",
  G default 64; state_dict_tensors "" / "_scale" / "_zeros"; Comfy-Org/ComfyUI comfy/ops.py at 0271a469 pops
  `.weight_scale` and `.weight_zeros`, raises "Missing AWQ W4A16 scale/zeros for layer ..." and reads `group_size`
  from the marker). Offline-quantized only ("requires offline calibration"): `.weight` I8 [out, in/2],
  `.weight_scale` and `.weight_zeros` [in/G, out].
- AutoAWQ GEMM (casper-hansen/AutoAWQ awq/modules/linear/gemm.py, WQLinear_GEMM): `.qweight` I32
  [in, out / (32 / w_bit)] (eight 4-bit codes per int32, in AWQ's interleaved order), `.qzeros` I32
  [in / group_size, out / 8], `.scales` F16 [in / group_size, out]; config.json `quantization_config`
  {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}. ComfyUI has no loader for it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from reference_specs.formats.base import RoleSpec
from reference_specs.formats.recognized import (
    FLOAT_SCALE_DTYPES,
    RecognizedFormat,
    marked,
    newer_comfyui,
    packed_int4_shape,
)
from reference_specs.layer import Layer


class AWQW4A16(RecognizedFormat):
    slug: ClassVar[str] = "awq_w4a16"
    comfy_format: ClassVar[str | None] = "awq_w4a16"
    producer: ClassVar[str] = "ComfyUI / comfy-kitchen AWQ W4A16 (uint4 codes, per-group float scales and zeros)"
    comfyui: ClassVar[str] = newer_comfyui("awq_w4a16", "; GEMV on 16-bit activations")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("I8", "U8"), description="uint4 codes, two per byte, low nibble first [out, in/2]"),
        "weight_scale": RoleSpec(FLOAT_SCALE_DTYPES, description="per-group scales [in/G, out], G = 64"),
        "weight_zeros": RoleSpec(FLOAT_SCALE_DTYPES, description="per-group zero points [in/G, out]"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return marked(layer, "awq_w4a16") or (
            layer.marker is None and layer.dtype("weight") in ("I8", "U8") and layer.has("weight_zeros"))

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        return packed_int4_shape(layer)


class AutoAWQ(RecognizedFormat):
    slug: ClassVar[str] = "awq-autoawq"
    comfyui_native: ClassVar[bool] = False
    producer: ClassVar[str] = "AutoAWQ GEMM export (qweight/qzeros int32, scales float16)"
    comfyui: ClassVar[str] = (
        "ComfyUI's loader reads none of qweight/qzeros/scales (comfy/ops.py reads .weight, .bias, .comfy_quant and "
        "the scales of QUANT_ALGOS): the layer has no .weight, so the model fails detection or loads without it; "
        "there is no ComfyUI loader for AutoAWQ checkpoints")
    signature: ClassVar[dict[str, RoleSpec]] = {
        "qweight": RoleSpec(("I32",), description="4-bit codes, eight per int32 [in, out/8]"),
        "qzeros": RoleSpec(("I32",), description="4-bit zero points, eight per int32 [in/G, out/8]"),
        "scales": RoleSpec(("F16", "BF16", "F32"), description="per-group scales [in/G, out]"),
        "bias": RoleSpec(FLOAT_SCALE_DTYPES, required=False),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return layer.dtype("qweight") == "I32" and layer.has("qzeros") and layer.has("scales")

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        qweight, scales = layer.shape("qweight"), layer.shape("scales")
        if qweight is None or scales is None or len(qweight) != 2 or len(scales) != 2:
            return qweight
        return (scales[1], qweight[0])
