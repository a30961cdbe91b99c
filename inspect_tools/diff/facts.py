"""What one layer of a diff is, in the words the diff's rows and tables use: its aux-tensor signature, how it is
stored (quantized, f32, 16-bit), its logical shape, and what differs between the two sides of a row."""

from __future__ import annotations

from typing import Any

from reference_specs import formats
from reference_specs.layer import Layer
from reference_specs.rules.compute_markers import compute_path

# Roles that carry no information about the format's signature (a bias is optional in every format).
SIGNATURE_SKIP = ("bias",)
# Order of roles in a signature string, so "weight U8 + weight_scale F8_E4M3 + ..." reads the same on both sides.
ROLE_ORDER = (
    "weight",
    "weight_packed",
    "value",
    "weight_scale",
    "weight_scale_2",
    "weight_global_scale",
    "scale_weight",
    "input_scale",
    "input_global_scale",
    "scale_input",
    "pre_quant_scale",
    "comfy_quant",
)
FLOAT32_DTYPES = ("F32", "F64")
FLOAT16_DTYPES = ("F16", "BF16")


def shape_text(shape: tuple[int, ...]) -> str:
    if len(shape) == 0:
        return "scalar"
    return "[" + ",".join(str(d) for d in shape) + "]"


def tensor_signature(layer: Layer) -> str:
    """'weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar + comfy_quant': the aux-tensor signature of one
    layer (bias left out; 0-d tensors are 'scalar', one-element 1-d ones '[1]')."""
    roles = [r for r in ROLE_ORDER if r in layer.tensors] + sorted(
        r for r in layer.tensors if r not in ROLE_ORDER and r not in SIGNATURE_SKIP
    )
    parts = []
    for role in roles:
        if role == "comfy_quant":
            parts.append("comfy_quant")
            continue
        info = layer.tensors[role]
        shape = tuple(info.shape)
        suffix = " scalar" if len(shape) == 0 else (" [1]" if shape == (1,) else "")
        parts.append(f"{role} {info.dtype}{suffix}")
    if layer.marker_source == "metadata":
        parts.append("metadata marker")
    return " + ".join(parts)


def main_dtype(layer: Layer) -> str | None:
    for role in ("weight", "weight_packed", "qweight", "value"):
        if role in layer.tensors:
            return layer.tensors[role].dtype
    return next(iter(layer.tensors.values())).dtype if layer.tensors else None


def precision_class(layer: Layer) -> str:
    """How a layer is stored, coarsely: 'quantized', 'f32', '16-bit' or the dtype itself."""
    if layer.is_quantized and layer.format != "unknown":
        return "quantized"
    dtype = main_dtype(layer) or "?"
    if dtype in FLOAT32_DTYPES:
        return "f32"
    if dtype in FLOAT16_DTYPES:
        return "16-bit"
    if dtype in ("U8", "I8", "F8_E4M3", "F8_E5M2") and layer.format == "unknown":
        return "quantized"  # stored in a low-precision container even if no format claims it
    return dtype


def logical_shape(layer: Layer) -> tuple[int, ...] | None:
    """The unquantized weight shape the stored tensors imply (NVFP4: padded bound)."""
    try:
        fmt = formats.get(layer.format)
    except KeyError:
        fmt = None
    shape = fmt.logical_shape(layer) if fmt is not None else None
    if shape is None:
        shape = layer.shape("weight") or layer.shape("value")
    return tuple(shape) if shape is not None else None


def layer_row(layer: Layer | None, file_markers: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One side of a paired JSON row; `compute` needs the side's file_markers (which marker ComfyUI loads)."""
    if layer is None:
        return None
    shape = logical_shape(layer)
    return {
        "name": layer.name,
        "format": layer.format,
        "precision": precision_class(layer),
        "compute": compute_path(layer, file_markers or {}),
        "logical_shape": list(shape) if shape is not None else None,
        "signature": tensor_signature(layer),
        "tensors": {role: {"dtype": t.dtype, "shape": list(t.shape)} for role, t in layer.tensors.items()},
    }


def storage_text(layer: Layer) -> str:
    """'nvfp4 128x256': a layer's format and logical shape, one cell of the 'layers that differ' table."""
    shape = logical_shape(layer)
    return f"{layer.format} " + ("x".join(str(d) for d in shape) if shape else "?")


def difference(mine: Layer | None, ref: Layer | None) -> str:
    """'' when both sides store the layer the same way; else what differs, in a few words."""
    if mine is None or ref is None:
        return "only in " + ("REF" if mine is None else "MINE")
    parts = []
    if mine.format.lower() != ref.format.lower():  # GGUF's "F32" is safetensors' "f32"
        parts.append("format")
    only_m = sorted(set(mine.tensors) - set(ref.tensors))
    only_r = sorted(set(ref.tensors) - set(mine.tensors))
    if only_m:
        parts.append("MINE +" + ",".join(only_m))
    if only_r:
        parts.append("REF +" + ",".join(only_r))
    if mine.format.lower() == ref.format.lower():
        dtypes = [r for r in sorted(set(mine.tensors) & set(ref.tensors)) if mine.dtype(r) != ref.dtype(r)]
        if dtypes:
            parts.append("dtype of " + ",".join(dtypes))
    return "; ".join(parts)
