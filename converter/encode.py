"""Produce the output tensors of one planned layer from its source tensors.

Quantizing goes through ENCODERS (action -> function), a module-level table on purpose: tests swap in a broken
encoder there to prove the gate refuses what it writes. The encoders are the fast chunked ones from
reference_specs/formats/fast_encode.py, bit-identical to the reference codecs and to what ComfyUI writes when it
quantizes the same tensor in the source's own dtype (FP32, BF16 or F16: the per-tensor scale is rounded the way
ComfyUI rounds it for that dtype), on the CPU and on CUDA alike; see README, "What bit-identical means".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from reference_specs.formats import fast_encode, fp8, nvfp4

TORCH_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}

# (weight, device, amax: its max |w| or None) -> the layer's tensors by role
Encoder = Callable[[torch.Tensor, str, float | None], dict[str, torch.Tensor]]


def encode_nvfp4(weight: torch.Tensor, device: str = "cpu", amax: float | None = None) -> dict[str, torch.Tensor]:
    """Float weight [out, in] (any float dtype, never rounded to another first: its dtype decides how weight_scale_2
    rounds, as in ComfyUI) -> weight, weight_scale, weight_scale_2, on the CPU. `weight` may already live on `device`
    (the GPU path stages it there). amax: its max |w|, where the caller measured it already (finite_check): the same
    scale as the encoder's own pass over the weight would give (nvfp4.encoding_scale_from_amax of that value)."""
    scale = None if amax is None else nvfp4.encoding_scale_from_amax(amax, weight.dtype)
    out = fast_encode.encode_nvfp4(weight, scale, device=device)
    out["weight_scale_2"] = out["weight_scale_2"].to(torch.float32).reshape(())
    return out


def encode_fp8(weight: torch.Tensor, device: str = "cpu", amax: float | None = None) -> dict[str, torch.Tensor]:
    """Float weight -> F8_E4M3 weight + F32 0-d weight_scale (ComfyUI comfy_quant float8_e4m3fn), on the CPU; amax
    as for encode_nvfp4."""
    scale = None if amax is None else fp8.fp8_encoding_scale(amax, weight.dtype, torch.float8_e4m3fn)
    out = fast_encode.encode_fp8(weight, scale, device=device)
    out["weight_scale"] = out["weight_scale"].to(torch.float32).reshape(())
    return out


ENCODERS: dict[str, Encoder] = {"nvfp4": encode_nvfp4, "fp8": encode_fp8}


def encode(action: str, weight: torch.Tensor, device: str = "cpu",
           amax: float | None = None) -> dict[str, torch.Tensor]:
    return ENCODERS[action](weight, device, amax)


# Elements narrowed per step by narrow_in_place: a 4 MB temporary instead of a second full-size tensor.
NARROW_CHUNK = 1 << 20


def cast(tensor: torch.Tensor, dtype: str, reuse: bool = False) -> torch.Tensor:
    """A kept tensor at its planned dtype (no copy when it already is). reuse=True: the caller owns `tensor`'s
    storage (a pool buffer of this layer), so a narrowing cast (FP32 -> BF16/F16) is written into it in place."""
    target = TORCH_DTYPE[dtype]
    if tensor.dtype == target:
        return tensor
    if reuse and target.itemsize < tensor.element_size() and tensor.is_contiguous() and tensor.device.type == "cpu":
        return narrow_in_place(tensor, target)
    return tensor.to(target)


def narrow_in_place(tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """Cast to a smaller dtype inside the tensor's own storage, front to back in chunks: chunk k's output lands on
    bytes of elements before the end of chunk k, all already converted, so nothing unread is overwritten. A kept
    FP32 layer of a 14B model (time_projection: 629 MB) then needs no second, 315 MB buffer. Same values as .to():
    each element is rounded the same way."""
    flat = tensor.reshape(-1)
    out = flat.view(torch.uint8)[: flat.numel() * target.itemsize].view(target)
    for start in range(0, flat.numel(), NARROW_CHUNK):
        piece = flat[start: start + NARROW_CHUNK].to(target)
        out[start: start + NARROW_CHUNK].copy_(piece)
    return out.view(tensor.shape)


def finite_check(tensor: torch.Tensor) -> tuple[int, float]:
    """(count of NaN/Inf values, max |value|) of a tensor; (0, 0.0) for non-float or empty tensors.

    The common all-finite case costs one reduction pass: min and max are finite exactly when every value is (NaN
    propagates through aminmax, an Inf is an extreme), measured ~30x cheaper than isfinite().all(), which writes a
    full-size bool temporary; the same pass gives the amax the gate checks weight_scale_2 against. Only a tensor
    that fails pays for the exact count."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0, 0.0
    if tensor.element_size() == 1:  # float8 has neither aminmax nor isfinite on the CPU; widening is exact
        tensor = tensor.to(torch.float16)
    lo, hi = torch.stack(torch.aminmax(tensor)).tolist()  # one wait for the device, not one per value
    if math.isfinite(lo) and math.isfinite(hi):
        return 0, max(abs(lo), abs(hi))  # not max(-lo, hi): for an all-zero tensor that is -0.0
    return int((~torch.isfinite(tensor)).sum()), math.nan


def non_finite(tensor: torch.Tensor) -> int:
    """Count of NaN/Inf values (0 for non-float tensors)."""
    return finite_check(tensor)[0]
