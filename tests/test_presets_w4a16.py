"""W4A16 layers: a preset marks activation-sensitive layers `nvfp4-w4a16` (or `full_precision_matrix_mult = true`),
and convert writes `{"format": "nvfp4", "full_precision_matrix_mult": true}` for them, in the `.comfy_quant` tensor
and in `_quantization_metadata` alike, while every other layer keeps the plain marker it always had.

Expected markers below come from the presets written in this file (and ComfyUI's own spelling of the conf), never
from the converter's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from converter import pipeline
from converter.pipeline import convert
from converter.preset import builtin_names, dumps_preset, load_builtin, loads_preset
from inspect_tools.cli import main
from inspect_tools.errors import UsageError
from inspect_tools.synthetic import default_selection, write_float

WAN = "wan2.2-ti2v-5b"
PLAIN = {"format": "nvfp4"}
W4A16 = {"format": "nvfp4", "full_precision_matrix_mult": True}
W8A16 = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
# ComfyUI writes a layer's conf with json.dumps (comfy/ops.py state_dict): these are the exact marker bytes
W4A16_BYTES = b'{"format": "nvfp4", "full_precision_matrix_mult": true}'
PLAIN_BYTES = b'{"format": "nvfp4"}'

# The WAN selection, with the FFN down projections and the cross-attention keys multiplied in full precision: the
# first by the decision's name, the second by the flag on an nvfp4 rule (two spellings of the same decision).
W4A16_PRESET = """\
name = "wan-w4a16-example"
default = "keep"

[[rules]]
match = "*modulation"
format = "f32"

[[rules]]
match = "*"
ndim = 1
format = "f32"

[[rules]]
regex = '^blocks\\.\\d+\\.ffn\\.2$'
format = "nvfp4-w4a16"
reason = "FFN down projection: activation outliers (example)"

[[rules]]
regex = '^blocks\\.\\d+\\.cross_attn\\.k$'
format = "nvfp4"
full_precision_matrix_mult = true

[[rules]]
regex = '^blocks\\.\\d+\\.(self_attn|cross_attn|ffn)\\.'
format = "nvfp4"
"""
FULL_PRECISION_LAYERS = {"blocks.0.ffn.2", "blocks.1.ffn.2", "blocks.0.cross_attn.k", "blocks.1.cross_attn.k"}


def read_markers(path: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    """({layer: raw .comfy_quant bytes}, {layer: _quantization_metadata conf}) of a written file."""
    with safe_open(str(path), "pt") as f:
        tensors = {key[: -len(".comfy_quant")]: f.get_tensor(key).numpy().tobytes()
                   for key in f.keys() if key.endswith(".comfy_quant")}
        metadata = json.loads(f.metadata()["_quantization_metadata"])
    assert metadata["format_version"] == "1.0"
    return tensors, metadata["layers"]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_float(tmp_path_factory.mktemp("w4a16") / "wan.safetensors", WAN)


@pytest.fixture(scope="module")
def converted(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the file converted with W4A16_PRESET, the file converted with the same selection all plain nvfp4)."""
    folder = tmp_path_factory.mktemp("w4a16-out")
    preset = folder / "w4a16.toml"
    preset.write_text(W4A16_PRESET)
    plain = folder / "plain.toml"
    plain.write_text(W4A16_PRESET.replace('format = "nvfp4-w4a16"', 'format = "nvfp4"')
                     .replace("full_precision_matrix_mult = true\n", ""))
    out, out_plain = folder / "w4a16.safetensors", folder / "plain.safetensors"
    for target, chosen in ((out, preset), (out_plain, plain)):
        result = convert(src, target, str(chosen))
        assert result.written, [f.message for f in result.gate.findings]
    return out, out_plain


def test_w4a16_layers_are_marked_in_the_tensor_and_the_metadata_alike(converted) -> None:
    out, _ = converted
    tensors, metadata = read_markers(out)
    assert set(tensors) == set(metadata) == set(default_selection(WAN))
    for layer in default_selection(WAN):
        expected = W4A16 if layer in FULL_PRECISION_LAYERS else PLAIN
        assert json.loads(tensors[layer]) == expected, layer
        assert metadata[layer] == expected, layer
    assert tensors["blocks.0.ffn.2"] == W4A16_BYTES  # spelled as ComfyUI spells it
    assert tensors["blocks.0.self_attn.q"] == PLAIN_BYTES  # plain layers: exactly the marker they always had


def test_w4a16_changes_the_marker_only_not_the_weights(converted) -> None:
    out, out_plain = converted
    with safe_open(str(out), "pt") as a, safe_open(str(out_plain), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            if not key.endswith(".comfy_quant"):
                assert a.get_tensor(key).equal(b.get_tensor(key)), key
    tensors, metadata = read_markers(out_plain)
    assert all(json.loads(raw) == PLAIN for raw in tensors.values())
    assert all(conf == PLAIN for conf in metadata.values())


def test_fp8_rules_take_the_flag_too(src: Path, tmp_path: Path) -> None:
    preset = tmp_path / "fp8.toml"
    preset.write_text('[[rules]]\nmatch = "blocks.*.ffn.0"\nformat = "fp8"\nfull_precision_matrix_mult = true\n'
                      '[[rules]]\nmatch = "blocks.*.ffn.2"\nformat = "fp8"\n')
    out = tmp_path / "fp8.safetensors"
    assert convert(src, out, str(preset)).written
    tensors, metadata = read_markers(out)
    assert json.loads(tensors["blocks.0.ffn.0"]) == metadata["blocks.0.ffn.0"] == W8A16
    assert json.loads(tensors["blocks.1.ffn.2"]) == metadata["blocks.1.ffn.2"] == {"format": "float8_e4m3fn"}


# ------------------------------------------------------------------------------------------------ the gate

def test_gate_refuses_a_marker_that_lost_its_flag(src: Path, tmp_path: Path, monkeypatch) -> None:
    """A plain marker is a valid marker (lint passes it), but ComfyUI would run that layer W4A4 on Blackwell."""
    preset = tmp_path / "w4a16.toml"
    preset.write_text(W4A16_PRESET)
    # the plain conf, padded to the planned size (JSON allows trailing blanks): only the flag is missing
    monkeypatch.setattr(pipeline, "comfy_quant_bytes",
                        lambda action: PLAIN_BYTES.ljust(len(W4A16_BYTES)) if action == "nvfp4-w4a16" else PLAIN_BYTES)
    out = tmp_path / "out.safetensors"
    result = convert(src, out, str(preset))
    assert result.refused and not out.exists()
    flagged = {f.layer for f in result.gate.findings if f.rule == "CONVERT-MARKER"}
    assert flagged == FULL_PRECISION_LAYERS
    assert all(f.cause == "invalid-quant-marker" for f in result.gate.findings if f.rule == "CONVERT-MARKER")


def test_gate_refuses_metadata_that_disagrees_with_the_tensor_markers(src: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    preset = tmp_path / "w4a16.toml"
    preset.write_text(W4A16_PRESET)
    layers = {name: PLAIN for name in default_selection(WAN)}
    monkeypatch.setattr(pipeline, "quantization_metadata",
                        lambda plan: json.dumps({"format_version": "1.0", "layers": layers}))
    out = tmp_path / "out.safetensors"
    result = convert(src, out, str(preset))
    assert result.refused and not out.exists()
    messages = [f.message for f in result.gate.findings if f.rule == "CONVERT-MARKER"]
    assert len(messages) == len(FULL_PRECISION_LAYERS)
    assert all("_quantization_metadata says" in m for m in messages)


# ------------------------------------------------------------------------------------------------ show / plan

def test_preset_show_explain_and_dry_run_show_the_decision(src: Path, tmp_path: Path, capsys) -> None:
    preset = tmp_path / "w4a16.toml"
    preset.write_text(W4A16_PRESET)
    assert main(["preset", "show", str(preset), "--format", "json"]) == 0
    rules = json.loads(capsys.readouterr().out)["preset"]["rules"]
    assert [r["format"] for r in rules] == ["f32", "f32", "nvfp4-w4a16", "nvfp4-w4a16", "nvfp4"]
    assert rules[3]["marker"] == W4A16 and rules[4]["marker"] == PLAIN and rules[0]["marker"] is None

    assert main(["preset", "explain", str(preset), "blocks.1.cross_attn.k", "--on", str(src)]) == 0
    assert "=> nvfp4-w4a16 by rule 4" in capsys.readouterr().out
    assert main(["preset", "explain", str(preset), "blocks.1.cross_attn.k", "--on", str(src), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "nvfp4-w4a16" and doc["rule"] == 4 and doc["marker"] == W4A16

    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", str(preset), "--dry-run", "--format", "json"]) == 0
    rows = {r["layer"]: r for r in json.loads(capsys.readouterr().out)["plan"]}
    assert rows["blocks.0.ffn.2"]["decision"] == "nvfp4-w4a16" and rows["blocks.0.ffn.2"]["marker"] == W4A16
    assert rows["blocks.0.ffn.2"]["format"] == "nvfp4"  # the same tensors on disk
    assert rows["blocks.0.ffn.0"]["decision"] == "nvfp4" and rows["blocks.0.ffn.0"]["marker"] == PLAIN
    assert rows["head.head"]["marker"] is None
    assert main(["convert", str(src), str(out), "--preset", str(preset), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "nvfp4-w4a16 4" in text  # the layer counts keep W4A16 apart
    assert not out.exists()


def test_an_input_scale_for_a_w4a16_layer_is_not_written(src: Path, tmp_path: Path) -> None:
    """ComfyUI never quantizes a full-precision layer's input: a stored scale there would mean nothing."""
    preset = tmp_path / "w4a16.toml"
    preset.write_text(W4A16_PRESET)
    scales = tmp_path / "scales.json"
    scales.write_text(json.dumps({"blocks.0.ffn.2": 0.05, "blocks.0.ffn.0": 0.125}))
    out = tmp_path / "out.safetensors"
    result = convert(src, out, str(preset), input_scales=scales)
    assert result.written
    assert any("blocks.0.ffn.2" in w and "nvfp4-w4a16" in w for w in result.plan.warnings)
    with safe_open(str(out), "pt") as f:
        assert "blocks.0.ffn.2.input_scale" not in f.keys()
        assert float(f.get_tensor("blocks.0.ffn.0.input_scale")) == 0.125


# ------------------------------------------------------------------------------------------------ the vocabulary

def test_the_flag_is_another_spelling_of_the_decision() -> None:
    flagged = loads_preset(b'[[rules]]\nmatch = "*"\nformat = "nvfp4"\nfull_precision_matrix_mult = true\n', "t")
    named = loads_preset(b'[[rules]]\nmatch = "*"\nformat = "nvfp4-w4a16"\n', "t")
    assert flagged.rules == named.rules and named.rules[0].format == "nvfp4-w4a16"
    off = loads_preset(b'[[rules]]\nmatch = "*"\nformat = "nvfp4"\nfull_precision_matrix_mult = false\n', "t")
    assert off.rules[0].format == "nvfp4"
    assert loads_preset(dumps_preset(flagged).encode(), "t").rules == flagged.rules


@pytest.mark.parametrize("rule, message", [
    ('format = "keep"\nfull_precision_matrix_mult = true', "applies only to quantizing rules"),
    ('format = "nvfp4"\nfull_precision_matrix_mult = "yes"', "must be true or false"),
    ('format = "nvfp4-w4a16"\nfull_precision_matrix_mult = false', "means full_precision_matrix_mult = true"),
    ('format = "nvfp4-w4a4"', "unknown format"),
])
def test_contradictory_or_unknown_w4a16_rules_are_usage_errors(rule: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        loads_preset(f'[[rules]]\nmatch = "*"\n{rule}\n'.encode(), "t")


def test_the_default_cannot_be_w4a16() -> None:
    with pytest.raises(UsageError, match="default must be"):
        loads_preset(b'default = "nvfp4-w4a16"\n', "t")


def test_builtin_presets_choose_w4a4_and_say_so() -> None:
    """No built-in names a layer class for W4A16 (no source does); each says what it does on Blackwell."""
    for name in builtin_names():
        preset = load_builtin(name)
        quantizing = [r for r in preset.rules if r.format.startswith(("nvfp4", "fp8"))]
        assert quantizing, name
        assert all(r.format == "nvfp4" for r in quantizing), name
        assert all("W4A4 on Blackwell" in r.reason for r in quantizing), name
