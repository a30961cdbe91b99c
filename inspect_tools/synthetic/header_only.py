"""Full-size safetensors files whose data is a sparse hole: a real header (e.g. a 14B model's) with correct
offsets, for timing header-only commands. Only the tiny comfy_quant marker bytes are real data."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from inspect_tools.synthetic.mixed import QUANT_METADATA_KEY
from inspect_tools.synthetic.state_dicts import default_selection, profile_for, rename
from reference_specs.formats.nvfp4 import block_scale_shape, packed_shape

ITEM_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "F8_E4M3": 1}
KINDS = ("nvfp4-mixed", "f32", "bf16")
NVFP4_MARKER = json.dumps({"format": "nvfp4"}).encode("utf-8")


def _entries(variant: str, kind: str, dims: dict[str, int]) -> list[tuple[str, str, tuple[int, ...], bytes | None]]:
    """(native key, dtype, shape, real bytes or None) for every tensor of the file."""
    profile = profile_for(variant)
    shapes = profile.tensor_shapes(dims)
    if kind in ("f32", "bf16"):
        return [(k, kind.upper(), s, None) for k, s in shapes.items()]
    quantized = set(default_selection(variant, dims))
    entries: list[tuple[str, str, tuple[int, ...], bytes | None]] = []
    for key, shape in shapes.items():
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if base in quantized:
            out_f, in_f = shape
            entries += [
                (key, "U8", packed_shape(out_f, in_f), None),
                (base + ".weight_scale", "F8_E4M3", block_scale_shape(out_f, in_f), None),
                (base + ".weight_scale_2", "F32", (), None),
                (base + ".comfy_quant", "U8", (len(NVFP4_MARKER),), NVFP4_MARKER),
            ]
        else:
            entries.append((key, "BF16", shape, None))  # published mixed files keep the rest in BF16
    return entries


def write_header_only(
    path: str | Path, variant: str, kind: str = "nvfp4-mixed", dims: dict[str, int] | None = None,
    naming: str = "native",
) -> Path:
    """A `kind` file of `variant` at full size (dims default to the profile's full_dims); data left as a hole."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    profile = profile_for(variant)
    entries = _entries(variant, kind, {**profile.full_dims, **(dims or {})})
    header: dict[str, object] = {}
    real: list[tuple[int, bytes]] = []
    offset = 0
    layers = {}
    for key, dtype, shape, data in entries:
        size = ITEM_SIZE[dtype]
        for d in shape:
            size *= d
        name = rename(profile, key, naming)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        if data is not None:
            real.append((offset, data))
            layers[name[: -len(".comfy_quant")]] = {"format": "nvfp4"}
        offset += size
    if layers:
        header["__metadata__"] = {QUANT_METADATA_KEY: json.dumps({"format_version": "1.0", "layers": layers})}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-aligned, as safetensors writers do
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        start = fh.tell()
        for at, data in real:
            fh.seek(start + at)
            fh.write(data)
    os.truncate(tmp, start + offset)
    os.replace(tmp, path)
    return path
