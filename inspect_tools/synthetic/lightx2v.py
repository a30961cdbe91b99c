"""Synthetic LightX2V NVFP4 files (issue 16), built from the public description of that layout, not from nvdiag's
encoders: a test that fixes them then proves nvdiag reads a file someone else made.

What LightX2V writes per quantized linear (reference_specs/formats/lightx2v.py has the sources):
- weight_global_scale = 2688 / max|W| computed on the BF16 weight, in BF16 (ModelTC/LightX2V tools/convert/quant/
  quant.py: `(2688.0 / torch.max(torch.abs(w))).to(torch.float32)` with w in bfloat16);
- block scales and codes as NVIDIA's NVFP4 quantization kernel computes them (lightx2v_kernel scaled_nvfp4_quant,
  derived from the vLLM/TensorRT-LLM cvt_fp16_to_fp4 kernel): per 16 elements, SF = fp8(global * amax_block / 6);
  the elements are multiplied by 1 / (SF * (1 / global)), saturated to +-6 and rounded to the nearest E2M1 value
  (ties to even, PTX cvt.rn.satfinite.e2m1x2); two codes per byte, the first element in the LOW nibble;
- block scales in the 128x4 tile layout of cuBLAS' block-scaled GEMMs, [ru128(out), ru4(in/16)];
- `.input_global_scale` = 2688 / act_absmax and `.alpha` = 1 / (input_global_scale * weight_global_scale), F32;
- every other tensor as in the source; no `.comfy_quant`, no header metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from inspect_tools.synthetic.state_dicts import float_state_dict, selected
from inspect_tools.synthetic.writers import save_safetensors

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of code 0..7 (OCP MX spec, FP4 E2M1)
# The codes searched in this order: argmin returns the FIRST minimum, so an exact tie goes to the even code.
_EVEN_FIRST = (0, 2, 4, 6, 1, 3, 5, 7)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 values -> 4-bit codes (sign in bit 3), nearest E2M1 magnitude with ties to even, saturated at 6."""
    order = torch.tensor(_EVEN_FIRST)
    grid = torch.tensor([E2M1_GRID[c] for c in _EVEN_FIRST])
    magnitude = x.abs().clamp(max=6.0)
    nearest = torch.argmin((magnitude.unsqueeze(-1) - grid).abs(), dim=-1)
    return order[nearest].to(torch.uint8) | (torch.signbit(x).to(torch.uint8) << 3)


def tile_layout(scales: torch.Tensor) -> torch.Tensor:
    """[R, C] block scales (R % 128 == 0, C % 4 == 0) -> cuBLAS' 128x4 tile layout, as the reshape of the cuBLAS
    docs ("1D block scaling factors layout"): tiles row-major, inside a tile row 32*i + j at j*16 + i*4 + column."""
    rows, cols = scales.shape
    tiles = scales.reshape(rows // 128, 128, cols // 4, 4).permute(0, 2, 1, 3)  # [tile row, tile col, 128, 4]
    inner = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)  # row 32*i + j -> [j, i, column]
    return inner.reshape(rows, cols)


def quantize_lightx2v(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float [out, in] weight (out % 16 == 0, in % 16 == 0) -> LightX2V's weight, weight_scale and its
    weight_global_scale (kept for the caller's alpha)."""
    w = weight.to(torch.bfloat16)
    global_scale = (2688.0 / torch.max(torch.abs(w))).to(torch.float32)
    out_f, in_f = w.shape
    blocks = w.to(torch.float32).reshape(out_f, in_f // 16, 16)
    sf = (global_scale * (blocks.abs().amax(-1) / 6.0)).to(torch.float8_e4m3fn)
    sf32 = sf.to(torch.float32)
    multiplier = torch.where(sf32 != 0, 1.0 / (sf32 * (1.0 / global_scale)), torch.zeros_like(sf32))
    codes = round_e2m1((blocks * multiplier.unsqueeze(-1)).reshape(out_f, in_f))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # first element low
    rows, cols = -(-out_f // 128) * 128, -(-(in_f // 16) // 4) * 4
    padded = torch.zeros((rows, cols), dtype=torch.uint8)
    padded[:out_f, : in_f // 16] = sf.view(torch.uint8)
    return {"weight": packed, "weight_scale": tile_layout(padded).view(torch.float8_e4m3fn),
            "weight_global_scale": global_scale}


def lightx2v_state_dict(source: dict[str, torch.Tensor], layers: list[str],
                        act_absmax: Callable[[int], float] | None = None) -> dict[str, torch.Tensor]:
    """`source` with each of `layers` (base names) stored as LightX2V stores it. act_absmax(i): the calibrated
    activation amax of the i-th layer (default: a spread of plausible values)."""
    absmax = act_absmax or (lambda i: 3.0 + 1.5 * (i % 5))
    out = dict(source)
    for i, base in enumerate(layers):
        q = quantize_lightx2v(source[f"{base}.weight"])
        input_global_scale = torch.tensor(2688.0 / absmax(i), dtype=torch.float32)
        out[f"{base}.weight"] = q["weight"]
        out[f"{base}.weight_scale"] = q["weight_scale"]
        out[f"{base}.input_global_scale"] = input_global_scale
        out[f"{base}.alpha"] = 1.0 / (input_global_scale * q["weight_global_scale"])
    return out


def write_lightx2v_nvfp4(path: str | Path, variant: str, dims: dict[str, int] | None = None,
                         dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         selection: Callable[[str], bool] | None = None,
                         layers: list[str] | None = None) -> Path:
    """A LightX2V NVFP4 file of the synthetic `variant` (the float source write_float writes with the same
    arguments): the layers a mixed file quantizes (or `selection`, or exactly `layers`) in LightX2V's layout."""
    source = float_state_dict(variant, dims, dtype, "native", seed)
    chosen = layers if layers is not None else selected(variant, dims, selection)
    return save_safetensors(lightx2v_state_dict(source, chosen), path)
