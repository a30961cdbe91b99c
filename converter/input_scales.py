"""Calibrated activation scales for `--input-scales FILE`: a JSON {layer: value} or another checkpoint's
`.input_scale` tensors. Validated before anything is written.

input_scale is the static per-tensor activation decode multiplier amax(|x|)/2688 that ComfyUI uses instead of its
dynamic per-call scale (comfyui-load-path.md, Q2): a wrong one clips activations, so only finite, positive values in
a plausible range, for layers that exist, are accepted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from inspect_tools.errors import InputError

# Activation amax of diffusion transformers spans roughly 1e-2 .. 1e5, i.e. amax/2688 from ~4e-6 to ~40; the bounds
# leave a decade of slack either way. Outside them the value is not an activation scale (a reciprocal, a raw amax).
PLAUSIBLE_MIN = 1e-7
PLAUSIBLE_MAX = 1e3


def _from_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"input scales are not readable JSON: {exc}", str(path)) from None
    if not isinstance(data, dict):
        raise InputError("input scales JSON must be an object {layer: value}", str(path))
    return data


def _from_checkpoint(path: Path) -> dict[str, Any]:
    from inspect_tools.layers import open_model

    with open_model(path) as model:
        out = {}
        for layer in model.layers.values():
            if layer.has("input_scale"):
                t = layer.load("input_scale").to("cpu").float().flatten()
                if t.numel() != 1:
                    raise InputError(f"{layer.name}.input_scale has {t.numel()} values, expected one", str(path))
                out[layer.native_name or layer.name] = float(t[0])
    if not out:
        raise InputError("no .input_scale tensors in this checkpoint", str(path))
    return out


def _strip_suffix(name: str) -> str:
    return name[: -len(".input_scale")] if name.endswith(".input_scale") else name


def load_input_scales(path: str | Path, known_layers: set[str], to_native=None) -> dict[str, float]:
    """FILE -> {native layer name: value}; InputError naming the file for anything invalid.

    known_layers: native names of the source's layers. to_native: maps a name given in the file (possibly
    diffusers-named or prefixed) to the native name.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("input scales file not found", str(path))
    # A sharded checkpoint (its *.index.json or its folder) is a checkpoint, not a {layer: value} JSON file.
    plain_json = path.is_file() and path.suffix.lower() == ".json" and not path.name.lower().endswith(".index.json")
    raw = _from_json(path) if plain_json else _from_checkpoint(path)
    scales: dict[str, float] = {}
    problems = []
    for name, value in raw.items():
        native = _strip_suffix(str(name))
        native = to_native(native) if to_native is not None else native
        if native not in known_layers:
            problems.append(f"{name}: no such layer in the source")
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{name}: {value!r} is not a number")
            continue
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            problems.append(f"{name}: {value} is not finite and positive")
        elif not PLAUSIBLE_MIN <= value <= PLAUSIBLE_MAX:
            problems.append(f"{name}: {value:g} is outside the plausible range [{PLAUSIBLE_MIN:g}, {PLAUSIBLE_MAX:g}] "
                            "of amax/2688 activation scales")
        else:
            scales[native] = value
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"invalid input scales: {shown}", str(path))
    return scales
