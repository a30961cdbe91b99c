"""Kept (unquantized) tensors at the precision their guide says, per tensor: a GGUF-guided preset writes every
tensor the GGUF holds as a float at that float type (city96 files keep biases F32 beside 16-bit weights), and an
FP16 source's 16-bit layers stay FP16 under the built-in presets unless --dtype-16 asks otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converter.from_gguf import preset_from_gguf
from converter.pipeline import convert
from converter.preset import dumps_preset, loads_preset
from inspect_tools.readers import open_checkpoint
from inspect_tools.synthetic import write_float, write_gguf

WAN = "wan2.2-ti2v-5b"
GGUF_FLOATS = ("F32", "F16", "BF16")


def dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def gguf_guided(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a city96-style Q4_0 GGUF of the scaled-down WAN, the F32 source converted with its preset)."""
    folder = tmp_path_factory.mktemp("gguf")
    gguf_path = write_gguf(folder / "ref-Q4_0.gguf", WAN)
    src = write_float(folder / "src.safetensors", WAN)
    out = folder / "out.safetensors"
    assert convert(src, out, preset_from_gguf(gguf_path)).written
    return gguf_path, out


def test_every_float_tensor_of_the_gguf_keeps_its_type(gguf_guided: tuple[Path, Path]) -> None:
    gguf_path, out = gguf_guided
    with open_checkpoint(gguf_path) as reader:
        floats = {info.name: info.dtype for info in reader if info.dtype in GGUF_FLOATS}
    written = dtypes(out)
    assert floats and {name: written[name] for name in floats} == floats
    # the case the rule is for: a 16-bit weight whose bias the GGUF holds at F32
    assert (floats["text_embedding.0.weight"], floats["text_embedding.0.bias"]) == ("F16", "F32")


def test_the_gguf_preset_says_it_with_a_bias_key_that_round_trips(tmp_path: Path, gguf_guided) -> None:
    preset = preset_from_gguf(gguf_guided[0])
    rule = next(r for r in preset.rules if r.name_matches("text_embedding.0"))
    assert (rule.format, rule.bias) == ("fp16", "f32") and "(bias f32)" in rule.describe()
    again = loads_preset(dumps_preset(preset).encode(), "again.toml")
    assert [(r.format, r.bias) for r in again.rules] == [(r.format, r.bias) for r in preset.rules]


def test_an_unknown_bias_format_is_refused() -> None:
    from inspect_tools.errors import UsageError

    with pytest.raises(UsageError, match="unknown bias format 'nvfp4'"):
        loads_preset(b'[[rules]]\nmatch = "*"\nformat = "keep"\nbias = "nvfp4"\n', "inline")


@pytest.fixture(scope="module")
def fp16_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_float(tmp_path_factory.mktemp("fp16") / "src.safetensors", WAN, dtype=torch.float16)


def test_an_fp16_source_stays_fp16_under_a_builtin_preset(fp16_src: Path, tmp_path: Path) -> None:
    result = convert(fp16_src, tmp_path / "out.safetensors", WAN)
    sixteen = [lp for lp in result.plan.layers if lp.action == "bf16"]
    assert sixteen  # the built-in WAN preset keeps its embeddings "bf16": 16-bit
    written = dtypes(tmp_path / "out.safetensors")
    assert {written[t.name] for lp in sixteen for t in lp.tensors} == {"F16"}


def test_dtype_16_still_asks_for_bf16(fp16_src: Path, tmp_path: Path) -> None:
    result = convert(fp16_src, tmp_path / "out.safetensors", WAN, dtype_16="bf16")
    written = dtypes(tmp_path / "out.safetensors")
    assert {written[t.name] for lp in result.plan.layers if lp.action == "bf16" for t in lp.tensors} == {"BF16"}


def test_a_users_preset_means_what_it_says(fp16_src: Path, tmp_path: Path) -> None:
    mine = loads_preset(b'[[rules]]\nmatch = "text_embedding.*"\nformat = "bf16"\n', "mine.toml")
    result = convert(fp16_src, tmp_path / "out.safetensors", mine)
    assert dtypes(tmp_path / "out.safetensors")["text_embedding.0.weight"] == "BF16"
    assert result.written


def test_preset_show_says_the_bias_precision(gguf_guided, tmp_path: Path, capsys) -> None:
    from inspect_tools.cli import main

    path = tmp_path / "g.toml"
    path.write_text(dumps_preset(preset_from_gguf(gguf_guided[0])))
    assert main(["preset", "show", str(path), "--format", "json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)["preset"]["rules"]
    assert any(r.get("bias") == "f32" and r["format"] == "fp16" for r in rows)
    assert main(["preset", "show", str(path)]) == 0
    assert "fp16 (bias f32)" in capsys.readouterr().out
