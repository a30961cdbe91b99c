"""Produce the output tensors of one planned layer from its source tensors.

Quantizing goes through ENCODERS (action -> function), a module-level table on purpose: tests swap in a broken
encoder there to prove the gate refuses what it writes. The NVFP4 encoder is the fast chunked one from
reference_specs/formats/fast_encode.py when it exists, else the reference codec: both are bit-identical to
comfy-kitchen's quantizer for the same per-tensor scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reference_specs.formats.nvfp4 import F4_E2M1_MAX, F8_E4M3_MAX, NVFP4

TORCH_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}

Encoder = Callable[[torch.Tensor, str], dict[str, torch.Tensor]]


def _fast_encoder():
    try:
        from reference_specs.formats import fast_encode
    except ImportError:
        return None
    return fast_encode


def _safe_scale_2(weight: torch.Tensor) -> torch.Tensor | None:
    """None (the encoder's own amax/2688) unless the weight is all zero: then amax/2688 would be 0 and every block
    scale NaN. Any positive scale decodes zeros exactly; 1/2688 is what an amax of 1 would give."""
    if bool((weight != 0).any()):
        return None
    return torch.tensor(1.0 / (F8_E4M3_MAX * F4_E2M1_MAX), dtype=torch.float32)


def encode_nvfp4(weight: torch.Tensor, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Float weight [out, in] (any float dtype; FP32 is never rounded first) -> weight, weight_scale, weight_scale_2."""
    fast = _fast_encoder()
    if fast is not None:
        out = fast.encode_nvfp4(weight, device=device)
    else:
        out = NVFP4().quantize(weight.to(device), scale_2=_safe_scale_2(weight))
    out = {role: t.to("cpu") for role, t in out.items()}
    out["weight_scale"] = out["weight_scale"].view(torch.float8_e4m3fn) if out["weight_scale"].dtype == torch.uint8 \
        else out["weight_scale"]
    out["weight_scale_2"] = out["weight_scale_2"].to(torch.float32).reshape(())
    return out


def encode_fp8(weight: torch.Tensor, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Float weight -> F8_E4M3 weight + F32 0-d weight_scale (ComfyUI comfy_quant float8_e4m3fn)."""
    fast = _fast_encoder()
    if fast is not None and hasattr(fast, "encode_fp8"):
        out = fast.encode_fp8(weight, device=device)
    else:
        from reference_specs import formats

        out = formats.get("float8_e4m3fn")().quantize(weight.to(device))
    out = {role: t.to("cpu") for role, t in out.items()}
    out["weight_scale"] = out["weight_scale"].to(torch.float32).reshape(())
    return out


ENCODERS: dict[str, Encoder] = {"nvfp4": encode_nvfp4, "fp8": encode_fp8}


def encode(action: str, weight: torch.Tensor, device: str = "cpu") -> dict[str, torch.Tensor]:
    return ENCODERS[action](weight, device)


def cast(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """A kept tensor at its planned dtype (no copy when it already is)."""
    target = TORCH_DTYPE[dtype]
    return tensor if tensor.dtype == target else tensor.to(target)


def non_finite(tensor: torch.Tensor) -> int:
    """Count of NaN/Inf values (0 for non-float tensors)."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return 0
    return int((~torch.isfinite(tensor)).sum())
