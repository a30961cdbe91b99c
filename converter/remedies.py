"""Lossless repairs, one per cause, as pure functions on tensors (no I/O, no file names).

`nvdiag fix` (converter/fix.py) decides which layer gets which remedy; here each remedy only transforms bytes and
says whether the transformation was exact. Every function leaves its input tensor untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reference_specs.formats.nvfp4 import block_scale_shape, pad_to, swizzle

if TYPE_CHECKING:
    import torch

# ComfyUI's comfy_quant "format" values for the formats fix can recognise from tensors alone.
NVFP4_MARKER: dict[str, Any] = {"format": "nvfp4"}
FP8_MARKER: dict[str, Any] = {"format": "float8_e4m3fn"}

@dataclass(frozen=True)
class Inverted:
    """A reconstructed per-tensor scale and whether it is provably the value the fault started from."""

    value: torch.Tensor
    exact: bool
    note: str


def logical_dims(packed_shape: tuple[int, ...]) -> tuple[int, int]:
    """[rows, cols] of a packed NVFP4 weight -> the padded [out, in] it encodes (two codes per byte)."""
    rows, cols = packed_shape
    return rows, cols * 2


def reswizzle_block_scales(linear: torch.Tensor, packed_shape: tuple[int, ...]) -> torch.Tensor:
    """Row-major block scales -> the swizzled 128x4 tile layout ComfyUI decodes.

    The linear matrix may be stored padded [ru128(out), ru4(in/16)] or unpadded [out, in/16]; it is zero-padded to
    the swizzled shape first (comfy-kitchen pads with zeros before `to_blocked`, so padding is zero in a good file).
    The dtype (F8_E4M3 or U8) is kept; the bytes are moved as uint8 because indexing float8 is not supported on CPU.
    """
    import torch

    out_features, in_features = logical_dims(packed_shape)
    rows, cols = block_scale_shape(out_features, in_features)
    if linear.dim() != 2 or linear.shape[0] > rows or linear.shape[1] > cols:
        raise ValueError(f"block scales {tuple(linear.shape)} do not fit a [{rows}, {cols}] scale matrix")
    as_bytes = linear.contiguous().view(torch.uint8)
    return swizzle(pad_to(as_bytes, rows, cols)).view(linear.dtype)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low-nibble-first FP4 bytes -> ComfyUI's order (even element in the high nibble); its own inverse."""
    import torch

    if packed.dtype != torch.uint8:
        raise ValueError(f"packed FP4 weight must be uint8, not {packed.dtype}")
    return ((packed & 0x0F) << 4) | (packed >> 4)


def _float32_neighbours(x: torch.Tensor, steps: int = 2) -> list[torch.Tensor]:
    """x and the float32 values up to `steps` ulps either side (positive finite x)."""
    import torch

    bits = x.to(torch.float32).reshape(1).view(torch.int32)
    return [(bits + d).view(torch.float32).reshape(()) for d in range(-steps, steps + 1)]


def invert_reciprocal_scale(stored: torch.Tensor) -> Inverted:
    """A per-tensor scale stored as the reciprocal (encode multiplier 1/s, e.g. 2688/amax) -> the decode
    multiplier s (amax/2688) ComfyUI wants, as float32 0-d.

    The fault computes r = float32(1 / s) (inspect_tools/synthetic/checkpoints.py, fault "scale2-reciprocal").
    float32 division rounds, so 1/r may miss s by an ulp: every float32 candidate near 1/r whose own reciprocal
    rounds back to r is a preimage. One preimage: the inversion is exact. Several: the original cannot be told
    apart from its neighbours, the nearest to 1/r is taken and the result is flagged as not exact.
    """
    import torch

    r = stored.to(torch.float32).reshape(())
    if not bool(torch.isfinite(r)) or float(r) <= 0.0:
        raise ValueError(f"reciprocal scale {float(r)!r} is not a positive finite number")
    guess = (1.0 / r.to(torch.float64)).to(torch.float32)
    preimages = [c for c in _float32_neighbours(guess) if bool((1.0 / c) == r)]
    if len(preimages) == 1:
        return Inverted(preimages[0].clone(), True, "exact: the only float32 whose reciprocal is the stored value")
    if not preimages:
        # Not produced by float32 division (e.g. computed in float64 then rounded): the nearest value is the best.
        return Inverted(guess, False, "not exact: no float32 value has the stored reciprocal; nearest taken")
    return Inverted(
        guess, False, f"not exact: {len(preimages)} float32 values share the stored reciprocal; nearest taken"
    )


def cast_block_scale_to_fp8(scales: torch.Tensor) -> torch.Tensor | None:
    """F32/F16/BF16 block scales -> F8_E4M3 when every value survives the round trip bit for bit, else None."""
    import torch

    if scales.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"block scales of dtype {scales.dtype} are not a float type to cast")
    fp8 = scales.to(torch.float8_e4m3fn)
    back = fp8.to(scales.dtype)
    # compare bit patterns so -0.0 vs 0.0 and NaN count as differences
    same = torch.equal(back.contiguous().view(_int_of(scales.dtype)), scales.contiguous().view(_int_of(scales.dtype)))
    return fp8 if same else None


def _int_of(dtype: torch.dtype) -> torch.dtype:
    import torch

    return {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}[dtype]


def widen_scale_to_f32(scale: torch.Tensor) -> torch.Tensor:
    """weight_scale_2 stored F16/BF16 -> F32; every F16 and BF16 value is exactly representable in F32."""
    import torch

    if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scale of dtype {scale.dtype} cannot be widened losslessly to float32")
    return scale.to(torch.float32)


def marker_tensor(conf: dict[str, Any]) -> torch.Tensor:
    """A `.comfy_quant` tensor as ComfyUI writes it: uint8 bytes of the UTF-8 JSON of `conf`
    (comfyui-load-path.md Q1/Q2: json.dumps(conf).encode("utf-8"))."""
    import torch

    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def marker_for(weight_dtype: str, roles: set[str], weight_shape: tuple[int, ...],
               scale_shape: tuple[int, ...] | None) -> dict[str, Any] | None:
    """The comfy_quant conf a layer's tensors prove, or None when they do not prove one format.

    NVFP4: U8 weight [R, C] + weight_scale whose shape is the swizzled one for [R, 2C] + weight_scale_2.
    FP8: F8_E4M3 weight + a single-element weight_scale. Anything else is ambiguous and left alone.
    """
    if weight_dtype == "U8" and {"weight_scale", "weight_scale_2"} <= roles and len(weight_shape) == 2:
        expected = block_scale_shape(*logical_dims(weight_shape))
        return dict(NVFP4_MARKER) if scale_shape == expected else None
    if weight_dtype == "F8_E4M3" and "weight_scale" in roles and scale_shape is not None:
        numel = 1
        for d in scale_shape:
            numel *= d
        return dict(FP8_MARKER) if numel == 1 else None
    return None


def strip_or_add_prefix(names: list[str], layer_names: set[str]) -> dict[str, str] | None:
    """Metadata layer names the loader misses -> the file's names, when one consistent prefix change explains all.

    E.g. metadata "diffusion_model.blocks.0.ffn.0" for key "blocks.0.ffn.0" (prefix to strip), or "blocks.0.ffn.0"
    for key "net.blocks.0.ffn.0" (prefix to add). Returns None when no single prefix maps every name to a layer.
    """
    if not names:
        return {}
    candidates: set[tuple[str, str]] = set()
    first = names[0]
    for layer in layer_names:
        if first.endswith("." + layer):
            candidates.add(("strip", first[: -len(layer)]))
        if layer.endswith("." + first):
            candidates.add(("add", layer[: -len(first)]))
    for kind, prefix in sorted(candidates):
        mapping = {}
        for name in names:
            target = name[len(prefix):] if kind == "strip" and name.startswith(prefix) else (
                prefix + name if kind == "add" else None)
            if target is None or target not in layer_names:
                break
            mapping[name] = target
        else:
            return mapping
    return None
