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

from converter.hand_written import MAX_INPUT_SCALES_BYTES, read_bounded
from inspect_tools.errors import InputError

# Activation amax of diffusion transformers spans roughly 1e-2 .. 1e5, i.e. amax/2688 from ~4e-6 to ~40; the bounds
# leave a decade of slack either way. Outside them the value is not an activation scale (a reciprocal, a raw amax).
PLAUSIBLE_MIN = 1e-7
PLAUSIBLE_MAX = 1e3


# No activation scale needs more digits than this; int() refuses thousands of digits (ValueError) and float() of a
# big int overflows (OverflowError), so longer integer literals are read as floats: inf past 1e308, refused below.
_MAX_INT_DIGITS = 30


class _LongInt(float):
    """An integer literal too long to be a scale, kept as its float value (inf past 1e308) and its digit count."""

    digits: int

    def __new__(cls, text: str) -> _LongInt:
        value = super().__new__(cls, text)  # float(str) never overflows: it rounds to inf
        value.digits = len(text.lstrip("-"))
        return value

    def __format__(self, spec: str) -> str:
        return f"an integer of {self.digits} digits"


def _json_int(text: str) -> int | float:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _LongInt(text)


def _from_json(path: Path) -> dict[str, Any]:
    raw = read_bounded(path, MAX_INPUT_SCALES_BYTES, "input scales file")
    try:
        data = json.loads(raw.decode("utf-8"), parse_int=_json_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"input scales are not readable JSON: {exc}", str(path)) from None
    except RecursionError:  # json's C decoder stops at the interpreter's recursion limit, in linear time
        raise InputError("input scales are not readable JSON: nested too deeply (an object {layer: value} is "
                         "one level)", str(path)) from None
    if not isinstance(data, dict):
        kind = ("null" if data is None else "a boolean" if isinstance(data, bool) else "an array"
                if isinstance(data, list) else "a string" if isinstance(data, str) else "a number")
        raise InputError(f"input scales JSON must be an object {{layer: value}}, not {kind}", str(path))
    return data


def _shown(value: Any, limit: int = 60) -> str:
    """A name or value from the file as one short line: repr escapes newlines and control characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _checked_value(value: Any) -> float | str:
    """A value from the file as the scale it gives, or why it is not an activation scale."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{_shown(value, 30)} is not a number"
    if isinstance(value, _LongInt) or (type(value) is int and abs(value) > 1e308):  # float() would overflow
        described = format(value) if isinstance(value, _LongInt) else _shown(value, 30)
        return f"{described} is " + ("too large for a scale" if value > 0 else "not a positive number")
    scale = float(value)
    if not math.isfinite(scale) or scale <= 0:
        return f"{value:g} is not a finite positive number"
    if not PLAUSIBLE_MIN <= scale <= PLAUSIBLE_MAX:
        return (f"{value:g} is outside the plausible range [{PLAUSIBLE_MIN:g}, {PLAUSIBLE_MAX:g}] "
                "of amax/2688 activation scales")
    return scale


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
        checked = _checked_value(value) if native in known_layers else "no such layer in the source"
        if isinstance(checked, str):
            problems.append(f"{_shown(name)}: {checked}")
        else:
            scales[native] = checked
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"invalid input scales: {shown}", str(path))
    return scales
