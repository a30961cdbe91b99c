"""`nvdiag inspect` says what every layer of every kind of checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspect_tools.cli import main
from inspect_tools.synthetic import city96_type, default_selection, shapes_for
from reference_specs.layer import FILE_MARKER_KEYS, split_key

WAN = "wan2.2-ti2v-5b"


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert main(["inspect", str(path), "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def formats_by_layer(doc: dict) -> dict[str, str]:
    return {layer.get("native_name", layer["name"]): layer["format"] for layer in doc["layers"]}


def expected_mixed(variant: str, quantized_slug: str) -> dict[str, str]:
    """Layers the factory quantizes get `quantized_slug`; every other layer stays plain FP32. File-level markers
    (the Qwen edit's __index_timestep_zero__) are not layers."""
    chosen = set(default_selection(variant))
    bases = {split_key(key)[0] for key in shapes_for(variant) if key not in FILE_MARKER_KEYS}
    return {base: quantized_slug if base in chosen else "f32" for base in bases}


def test_plain_fp32_file_is_all_f32_and_detected(wan_float: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = inspect_json(wan_float, capsys)
    assert doc["version"] == 1
    assert doc["architecture"]["family"] == "wan" and doc["architecture"]["variant"] == WAN
    assert set(formats_by_layer(doc).values()) == {"f32"}


@pytest.mark.parametrize(
    ("kind", "variant", "slug"),
    [
        ("nvfp4-mixed", WAN, "nvfp4"),
        ("nvfp4-mixed", "qwen-image-2512", "nvfp4"),
        ("nvfp4-mixed", "qwen-image-edit-2511", "nvfp4"),
        ("nvfp4-mixed", "flux1-dev", "nvfp4"),
        ("nvfp4-mixed", "wan2.2-t2v-a14b", "nvfp4"),
        ("nvfp4-mixed", "wan2.2-i2v-a14b", "nvfp4"),
        ("fp8-comfy", WAN, "float8_e4m3fn"),
        ("scaled-fp8", WAN, "scaled_fp8"),
    ],
)
def test_every_layer_of_a_mixed_file_is_classified(
    make_checkpoint, capsys: pytest.CaptureFixture[str], kind: str, variant: str, slug: str
) -> None:
    doc = inspect_json(make_checkpoint(kind, variant), capsys)
    assert doc["architecture"]["variant"] == variant
    assert formats_by_layer(doc) == expected_mixed(variant, slug)


def test_nvfp4_layers_show_logical_shape_and_their_aux_tensors(
    wan_nvfp4_mixed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = inspect_json(wan_nvfp4_mixed, capsys, "--layers", "blocks.0.ffn.0")
    (layer,) = doc["layers"]
    out_f, in_f = layer["logical_shape"]
    assert layer["tensors"]["weight"] == {"dtype": "U8", "shape": [out_f, in_f // 2]}
    assert layer["tensors"]["weight_scale"]["dtype"] == "F8_E4M3"
    assert layer["tensors"]["weight_scale_2"] == {"dtype": "F32", "shape": []}
    assert layer["marker"]["conf"]["format"] == "nvfp4"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_K_M"])
def test_gguf_layers_carry_their_ggml_type(make_checkpoint, capsys: pytest.CaptureFixture[str], qtype: str) -> None:
    doc = inspect_json(make_checkpoint("gguf", qtype=qtype), capsys)
    assert doc["container"] == "gguf"
    shapes = shapes_for(WAN)
    for layer in doc["layers"]:
        role = "weight" if "weight" in layer["tensors"] else next(iter(layer["tensors"]))
        key = layer["name"] if role == "value" else f"{layer['name']}.{role}"
        assert layer["format"] == city96_type("wan", key, shapes[key], qtype), key


def test_sharded_diffusers_source_maps_to_native_names(
    wan_float_sharded_diffusers: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = inspect_json(wan_float_sharded_diffusers.parent, capsys)  # the folder works as well as the index
    assert doc["container"] == "sharded"
    assert doc["architecture"]["naming"] == "diffusers"
    by_native = formats_by_layer(doc)
    assert by_native.keys() == expected_mixed(WAN, "f32").keys()
    assert "blocks.0.attn1.to_q" in {layer["name"] for layer in doc["layers"]}


def test_text_view_fits_80_columns(wan_nvfp4_mixed: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["inspect", str(wan_nvfp4_mixed)]) == 0
    out = capsys.readouterr().out
    assert "wan2.2-ti2v-5b" in out and "nvfp4" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_a_corrupt_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 7)
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err

