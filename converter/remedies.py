"""Lossless repairs, one per cause, as pure functions on tensors (no I/O, no file names).

`nvdiag fix` (converter/fix.py) decides which layer gets which remedy; here each remedy only transforms bytes and
says whether the transformation was exact. Every function leaves its input tensor untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reference_specs import formats
from reference_specs.formats import nvfp4

if TYPE_CHECKING:
    import torch

# ComfyUI's comfy_quant confs of the formats fix can recognise from tensors alone (the formats own them).
NVFP4_MARKER: dict[str, Any] = formats.get("nvfp4").marker_conf() or {}
FP8_MARKER: dict[str, Any] = formats.get("float8_e4m3fn").marker_conf() or {}

# The divisors D of the per-tensor scales ComfyUI reads, scale = amax / D: 448 * 6 for NVFP4 (weight_scale_2, and an
# NVFP4 layer's input_scale), 448 for FP8 E4M3. A reciprocal scale is D / amax.
NVFP4_DIVISOR = 2688.0
FP8_DIVISOR = 448.0
RECIPROCAL_DIVISORS = (NVFP4_DIVISOR, FP8_DIVISOR)
# How far around the float64 guess preimages are looked for: those of a float32 quotient lie within about 2 ulps of
# it (tests/test_fix_remedies.py checks that 16 finds no more than 4 does).
_SEARCH_ULPS = 4


@dataclass(frozen=True)
class Inverted:
    """A reconstructed per-tensor scale and whether it is provably the value the fault started from.
    ulps: 0 when exact, else the largest distance in float32 ulps from `value` to a scale the stored value can come
    from (-1 when it can come from none: not made by float32 arithmetic)."""

    value: torch.Tensor
    exact: bool
    note: str
    ulps: int = 0


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low-nibble-first FP4 bytes -> ComfyUI's order (even element in the high nibble); its own inverse."""
    import torch

    if packed.dtype != torch.uint8:
        raise ValueError(f"packed FP4 weight must be uint8, not {packed.dtype}")
    return nvfp4.swap_nibbles(packed)


def _float32_around(x: float, steps: int = _SEARCH_ULPS) -> torch.Tensor:
    """The positive finite float32 values within `steps` ulps of float32(x), ascending."""
    import torch

    bits = torch.tensor(x, dtype=torch.float32).reshape(1).view(torch.int32)
    near = (bits + torch.arange(-steps, steps + 1, dtype=torch.int32)).view(torch.float32)
    return near[torch.isfinite(near) & (near > 0)]


def reciprocal_origins(r: torch.Tensor, divisors: tuple[float, ...] = RECIPROCAL_DIVISORS,
                       steps: int = _SEARCH_ULPS) -> torch.Tensor:
    """Every float32 scale s that a stored reciprocal r (float32 0-d, positive) can have been made from, sorted:
    - r = float32(1 / s): an encoder inverted the scale it used (nvdiag's synthetic fault);
    - r = float32(D / amax) for a float32 amax, whose scale is s = float32(amax / D) (a global scale as compressed-
      tensors and ModelOpt-style exports store it), for each divisor D.
    Float32 arithmetic throughout; a quotient computed in float64 and then rounded to float32 has the same bits (a
    float64 holds more than twice float32's 24 bits, so the double rounding of a quotient is innocuous)."""
    import torch

    candidates = _float32_around(1.0 / float(r), steps)
    found = [candidates[(torch.ones((), dtype=torch.float32) / candidates) == r]]
    for d in divisors:
        divisor = torch.tensor(d, dtype=torch.float32)
        amax = _float32_around(d / float(r), steps)
        amax = amax[(divisor / amax) == r]
        found.append(amax / divisor)
    return torch.unique(torch.cat(found))


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float32 ulps (positive values: the int32 bit patterns are ordered like the values)."""
    import torch

    return (a.to(torch.float32).view(torch.int32).long() - b.to(torch.float32).view(torch.int32).long()).abs()


def invert_reciprocal_scale(stored: torch.Tensor, divisors: tuple[float, ...] = RECIPROCAL_DIVISORS) -> Inverted:
    """A per-tensor scale stored as the reciprocal (encode multiplier 1/s, e.g. 2688/amax) -> the decode
    multiplier s (amax/2688) ComfyUI wants, as float32 0-d.

    Exact means: every way the stored r can have been made (reciprocal_origins: 1/s, or D/amax for each divisor in
    `divisors`) leads back to this one float32 s, so whichever it was, s is bit for bit the scale the file should
    hold. Pass only the divisor of the layer's format when it is known (NVFP4_DIVISOR for weight_scale_2, FP8_DIVISOR
    for an FP8 weight_scale): fewer origins, more inversions proven exact. Otherwise the origin nearest 1/r is taken
    and the result is flagged not exact, with the number of ulps by which it may miss.
    """
    import torch

    r = stored.to(torch.float32).reshape(())
    if not bool(torch.isfinite(r)) or float(r) <= 0.0:
        raise ValueError(f"reciprocal scale {float(r)!r} is not a positive finite number")
    one_over = 1.0 / float(r)
    if not math.isfinite(float(torch.tensor(one_over, dtype=torch.float32))):
        raise ValueError(f"reciprocal scale {float(r)!r} has no finite float32 reciprocal")
    origins = reciprocal_origins(r, divisors)
    if origins.numel() == 1:
        return Inverted(origins[0].clone(), True, "exact: every way the stored reciprocal can be made gives this "
                                                  "float32 scale")
    if origins.numel() == 0:
        # Not produced by float32 arithmetic from a float32 scale or amax: the nearest value is the best.
        guess = torch.tensor(one_over, dtype=torch.float32)
        return Inverted(guess, False, "not exact: no float32 scale or amax gives the stored value; nearest to its "
                                      "reciprocal taken", -1)
    value = origins[torch.argmin((origins.double() - one_over).abs())].clone()
    ulps = int(_ulps_apart(origins, value).max())
    return Inverted(value, False, f"not exact: {origins.numel()} float32 scales give the stored value; the one "
                                  f"nearest its reciprocal taken, within {ulps} ulp of each", ulps)


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

    Each registered format says what proves it (Format.proves_marker): NVFP4, a U8 weight [R, C] + weight_scale of
    the swizzled shape for [R, 2C] + weight_scale_2; FP8, an F8_E4M3 weight + a single-element weight_scale.
    Anything else is ambiguous and left alone.
    """
    return formats.marker_proven(weight_dtype, roles, weight_shape, scale_shape)


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
