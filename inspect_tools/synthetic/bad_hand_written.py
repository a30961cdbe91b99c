"""Broken and hostile versions of the files a user writes by hand, the companion of bad_inputs.BAD_INPUTS:

    BAD_PRESETS[name](folder)       -> a preset .toml for `convert --preset`  (exit 2, one line)
    BAD_INPUT_SCALES[name](folder)  -> a .json for `convert --input-scales`   (exit 2, one line)
    WARNED_INPUT_SCALES[name](folder) -> a .json that converts (exit 0) with a warning line

Each builder creates `folder` and returns the path to pass. Layer names are those of the synthetic WAN TI2V model
(`blocks.0.ffn.0`, ...), so a value is judged on its own and not refused for naming no layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Builder = Callable[[Path], Path]

LAYER = "blocks.0.ffn.0"  # a quantized linear of every synthetic WAN model
DEEP = 10_000


def _write(folder: Path, name: str, data: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _preset(text: str | bytes) -> Builder:
    return lambda folder: _write(folder, "preset.toml", text)


def _scales(text: str | bytes) -> Builder:
    return lambda folder: _write(folder, "scales.json", text)


def _rule(extra: str) -> str:
    return f'name = "bad"\n[[rules]]\nmatch = "blocks.*"\nformat = "nvfp4"\n{extra}\n'


BAD_PRESETS: dict[str, Builder] = {
    "preset_deep_array": _preset("rules = " + "[" * DEEP + "]" * DEEP + "\n"),
    "preset_deep_inline_table": _preset("x = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n"),
    "preset_deep_array_in_rule": _preset(_rule("reason = " + "[" * 3000 + "]" * 3000)),
    "preset_huge_integer": _preset(_rule("min_dim = 1" + "0" * 5000)),
    "preset_min_dim_absurd": _preset(_rule("min_dim = 1000000000000000")),
    "preset_min_dim_negative": _preset(_rule("min_dim = -1024")),
    "preset_min_dim_zero": _preset(_rule("min_dim = 0")),
    "preset_min_dim_float": _preset(_rule("min_dim = 1024.5")),
    "preset_min_dim_string": _preset(_rule('min_dim = "1024"')),
    "preset_divisible_by_absurd": _preset(_rule("divisible_by = 9223372036854775807")),
    "preset_too_many_rules": _preset('name = "many"\n' + "[[rules]]\nmatch = 'x'\nformat = 'keep'\n" * 10_001),
    "preset_not_utf8": _preset(b'name = "\xff\xfe"\n'),
    "preset_nul_byte": _preset(b'name = "a\x00b"\n'),
    "preset_rules_not_array": _preset('rules = "all"\n'),
    "preset_rule_not_table": _preset("rules = [1, 2]\n"),
    "preset_control_chars_in_key": _preset('"\\u001b[31mred\\n" = 1\n'),
    "preset_unclosed_brackets": _preset("[" * 100_000),
}

BAD_INPUT_SCALES: dict[str, Builder] = {
    "scales_deep_array": _scales("[" * DEEP + "]" * DEEP),
    "scales_deep_object": _scales('{"a":' * DEEP + "1" + "}" * DEEP),
    "scales_deep_value": _scales(f'{{"{LAYER}": ' + "[" * DEEP + "]" * DEEP + "}"),
    "scales_huge_integer": _scales(f'{{"{LAYER}": 1' + "0" * 400 + "}"),
    "scales_integer_past_str_limit": _scales(f'{{"{LAYER}": 1' + "0" * 5000 + "}"),
    "scales_huge_float": _scales(f'{{"{LAYER}": 1e999}}'),
    "scales_nan": _scales(f'{{"{LAYER}": NaN}}'),
    "scales_infinity": _scales(f'{{"{LAYER}": Infinity}}'),
    "scales_negative": _scales(f'{{"{LAYER}": -0.05}}'),
    "scales_zero": _scales(f'{{"{LAYER}": 0}}'),
    "scales_implausible": _scales(f'{{"{LAYER}": 2688.0}}'),
    "scales_bool": _scales(f'{{"{LAYER}": true}}'),
    "scales_string": _scales(f'{{"{LAYER}": "0.05"}}'),
    "scales_top_level_array": _scales("[0.05]"),
    "scales_top_level_number": _scales("0.05"),
    "scales_top_level_null": _scales("null"),
    "scales_unknown_layer": _scales('{"no.such.layer": 0.05}'),
    "scales_name_with_escapes": _scales('{"x\\n\\u001b[31m\\u0000": 0.05}'),
    "scales_many_unknown_layers": _scales("{" + ",".join(f'"nope.{i}": 0.05' for i in range(100_000)) + "}"),
    "scales_not_json": _scales("{blocks.0.ffn.0: 0.05}"),
    "scales_not_utf8": _scales(b'{"\xff": 0.05}'),
    "scales_empty_file": _scales(""),
}

WARNED_INPUT_SCALES: dict[str, Builder] = {
    "scales_empty_object": _scales("{}"),
}
