"""FP8 sources for convert: layers stored as FP8 are dequantized to float32, then planned and quantized as float.

Many community models exist only in FP8 (issue 16): ComfyUI's comfy_quant float8_e4m3fn / float8_e5m2 (weight_scale),
the legacy Kijai / Comfy-Org "fp8_scaled" files (scale_weight) and the plain FP8 casts without any scale
(Kijai's *_fp8_e4m3fn files; ComfyUI loads them as plain weights, scale 1). Each decodes as fp8 value x per-tensor
scale (reference_specs/formats/fp8.py, dequantize_fp8, as ComfyUI decodes to float32). The FP8 value converts to
float32 exactly; the product with the float32 scale is rounded once (4 x 24 significant bits need up to 28): it is
the float32 nearest the exact decoded value, within 2^-24 relative, some 2^20 times below the FP8 rounding already
in it. A product beyond float32's range would be Inf, which the stream's NaN/Inf check refuses. So a dequantized
layer is a float32 source like any other; the output says that the source was already lossy (the FP8 rounding is in
those values) and in how many layers.

NVFP4 (or any other 4-bit) sources stay refused: quantizing 4-bit values again to 4 bits is not something to offer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from inspect_tools.errors import InputError
from reference_specs import formats
from reference_specs.formats.fp8 import F8_DTYPE_NAMES
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

# Roles of an FP8 source layer that are read but not carried into the output: the scale is folded into the
# dequantized weight; a static input scale of the FP8 layer is an FP8 activation scale, not NVFP4's (see
# dropped_input_scales); the marker says FP8.
CONSUMED_ROLES = ("weight_scale", "scale_weight", "input_scale", "scale_input", "comfy_quant")
INPUT_SCALE_ROLES = ("input_scale", "scale_input")
# The dtype a dequantized tensor is planned from (and kept at, where the preset keeps source precision).
DECODED_DTYPE = "F32"


def is_fp8_source(layer: Layer) -> bool:
    """Whether convert dequantizes this layer: its format says so (Format.convert_source: a per-tensor scale, the
    format's tensor_scale_role, or none at all, the plain casts at scale 1)."""
    try:
        return formats.get(layer.format).convert_source
    except KeyError:
        return False


def decode_scales(layer: Layer, path: str) -> dict[str, float]:
    """Source key -> decode multiplier of every FP8 tensor of an FP8-source layer (read now: scalars, a few bytes
    each). A scaled format's weight gets its stored per-tensor scale; the plain casts' FP8 tensors get 1.0. A scale
    that is not one finite positive number is refused (exit 2): no exact dequantization exists for it."""
    fmt = formats.get(layer.format)
    role = fmt.tensor_scale_role
    if role is None:  # plain FP8 casts: every FP8 tensor of the layer (weight, a bare value, a bias) decodes as is
        return {t.name: 1.0 for t in layer.tensors.values() if t.dtype in F8_DTYPE_NAMES}
    info = layer.tensors.get(role)
    if info is None or math.prod(info.shape) != 1:
        raise InputError(f"FP8 layer {layer.name} has no single-element {role}: it cannot be dequantized", path)
    scale = float(layer.load(role).reshape(-1)[0])
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"FP8 layer {layer.name}: {role} is {scale}, not a finite positive scale; it cannot be "
                         "dequantized (repair or re-export the source)", path)
    return {layer.tensors["weight"].name: scale}


def dropped_input_scales(layers: list[Layer]) -> int:
    """FP8-source layers with a static input scale, which the output leaves out: it scales activations into FP8's
    range (amax/448, or 1.0 where a tool wrote a placeholder), and without one ComfyUI computes activation scales
    dynamically, which is always safe (shared/DESIGN.md, input-scale-implausible)."""
    return sum(1 for layer in layers if is_fp8_source(layer) and any(layer.has(r) for r in INPUT_SCALE_ROLES))


def dequantize(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """FP8 values (as stored) -> float32 x scale: the formats' own decode (dequantize_fp8), one float32 rounding."""
    import torch

    from reference_specs.formats.fp8 import dequantize_fp8

    return dequantize_fp8(tensor, torch.tensor(scale, dtype=torch.float32, device=tensor.device))


def decode_sources(decode: dict[str, float], src: dict[str, Any]) -> dict[str, Any]:
    """A layer's loaded source tensors with its FP8 ones dequantized (the others as they are)."""
    if not decode:
        return src
    return {key: dequantize(t, decode[key]) if key in decode else t for key, t in src.items()}


def lossy_note(counts: dict[str, int]) -> str:
    """The line convert prints (text and JSON) when it dequantized FP8 layers."""
    total = sum(counts.values())
    per = ", ".join(f"{n} {slug}" for slug, n in sorted(counts.items()))
    return (f"source already lossy: {total} FP8 layer{'s' if total != 1 else ''} ({per}) dequantized "
            "(FP8 value x scale, in float32) and quantized from there; the output carries the FP8 rounding as well "
            "as its own (convert from the original float model where one exists)")
