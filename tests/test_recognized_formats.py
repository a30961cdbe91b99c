"""Quantized formats nvdiag recognises but does not decode (issue 16): ComfyUI's newer comfy_quant formats (MXFP8,
INT8 tensorwise, ConvRot W4A4, AWQ W4A16, MoE expert banks) and other runtimes' layouts (Nunchaku SVDQuant W4A4
and AWQ W4A16, AutoAWQ GEMM). inspect names each, lint explains it (NV113 / NV114) and diff pairs it with the same
layer of a 16-bit file; no layer of these files is "unknown". The files are built from the public descriptions of
the layouts (inspect_tools/synthetic/recognized.py); the expected shapes are the layer's [out, in] by construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.synthetic.recognized import (
    BUILDERS,
    EXPERTS,
    IN,
    OUT,
    int8_tensorwise_tensors,
    write_recognized,
)
from inspect_tools.synthetic.writers import save_safetensors
from reference_specs.rules import get_rule

NEWER = ("NV113", "newer-comfyui-format")
THIRD_PARTY = ("NV114", "third-party-layout")
# format -> (the quantized layer's name, its [out, in] (an expert bank: [E, out, in]), lint's rule and cause)
CASES = {
    "mxfp8": ("blocks.0.attn.q", [OUT, IN], NEWER),
    "int8_tensorwise": ("blocks.0.attn.q", [OUT, IN], NEWER),
    "convrot_w4a4": ("blocks.0.attn.q", [OUT, IN], NEWER),
    "awq_w4a16": ("blocks.0.attn.q", [OUT, IN], NEWER),
    "moe-experts": ("blocks.0.moe.experts", [EXPERTS, OUT, IN], NEWER),
    "svdquant-int4": ("transformer_blocks.0.attn.to_qkv", [OUT, IN], THIRD_PARTY),
    "svdquant-nvfp4": ("transformer_blocks.0.attn.to_qkv", [OUT, IN], THIRD_PARTY),
    "awq-nunchaku": ("transformer_blocks.0.img_mod.1", [OUT, IN], THIRD_PARTY),
    "awq-autoawq": ("model.layers.0.self_attn.q_proj", [OUT, IN], THIRD_PARTY),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("recognized")
    return {fmt: write_recognized(folder / f"{fmt}.safetensors", fmt) for fmt in CASES}


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", str(path), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", list(CASES))
def test_inspect_names_the_format_and_leaves_no_layer_unknown(files, capsys, fmt: str) -> None:
    name, logical, _ = CASES[fmt]
    doc = inspect_json(files[fmt], capsys)
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert layers[name]["format"] == fmt
    assert layers[name]["logical_shape"] == logical
    assert layers["blocks.0.norm"]["format"] == "bf16"
    assert all(layer["format"] != "unknown" for layer in doc["layers"])
    assert main(["inspect", str(files[fmt])]) == 0
    assert fmt in capsys.readouterr().out  # the text view's format column


@pytest.mark.parametrize("fmt", list(CASES))
def test_lint_explains_each_layer_with_one_finding(files, fmt: str) -> None:
    name, _, (rule, cause) = CASES[fmt]
    with open_model(files[fmt]) as model:
        findings = [f for f in lint_model(model) if f.layer == name]
    assert [(f.rule, f.cause) for f in findings] == [(rule, cause)], [f.message for f in findings]
    assert fmt in findings[0].message and findings[0].evidence["format"] == fmt


def test_the_explanations_say_what_comfyui_does() -> None:
    newer = get_rule("NV113").explanation
    # the oracle snapshot's QUANT_ALGOS has only FP8 and NVFP4: a marker naming another format is a KeyError there
    assert "618b803" in newer and "KeyError" in newer and "0271a469" in newer
    assert "ComfyUI-nunchaku" in get_rule("NV114").explanation


def test_lint_cli_json_exit_codes_follow_severity(files, capsys) -> None:
    # a newer ComfyUI format is a warning (it loads in a ComfyUI new enough); another runtime's layout an error
    assert main(["lint", str(files["mxfp8"]), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {(f["rule"], f["severity"]) for f in doc["findings"] if f["layer"]} == {("NV113", "warning")}
    assert main(["lint", str(files["svdquant-int4"]), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert ("NV114", "error") in {(f["rule"], f["severity"]) for f in doc["findings"]}


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "svdquant-int4", "awq-autoawq"])
def test_diff_pairs_the_layer_with_a_16bit_one_and_names_its_format(files, tmp_path, capsys, fmt: str) -> None:
    name, logical, _ = CASES[fmt]
    ref = save_safetensors({f"{name}.weight": torch.zeros(logical, dtype=torch.bfloat16),
                            "blocks.0.norm.weight": torch.ones(IN, dtype=torch.bfloat16)}, tmp_path / "ref.safetensors")
    main(["diff", str(files[fmt]), str(ref), "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    row = next(r for r in doc["layers"] if (r["mine"] or {}).get("name") == name)
    assert row["ref"] is not None and row["ref"]["name"] == name
    assert row["mine"]["format"] == fmt and row["ref"]["format"] == "bf16"
    assert row["mine"]["logical_shape"] == row["ref"]["logical_shape"] == logical


def test_an_unmarked_int8_file_is_int8_and_needs_its_marker(tmp_path) -> None:
    # LightX2V's int8 WAN files: int8 weights beside a per-row float scale, no comfy_quant
    tensors = int8_tensorwise_tensors()
    del tensors["blocks.0.attn.q.comfy_quant"]
    tensors["blocks.0.attn.q.weight_scale"] = torch.full((OUT, 1), 1e-4)
    path = save_safetensors(tensors, tmp_path / "int8_unmarked.safetensors")
    with open_model(path) as model:
        assert model.layers["blocks.0.attn.q"].format == "int8_tensorwise"
        rules = {f.rule for f in lint_model(model) if f.layer == "blocks.0.attn.q"}
    assert rules == {"NV103", "NV113"}  # ComfyUI loads the int8 bytes as a plain weight without the marker


@pytest.mark.parametrize("fmt", ["mxfp8", "int8_tensorwise", "convrot_w4a4", "awq_w4a16"])
def test_comfyui_refuses_a_marked_layer_exactly_when_its_quant_algos_lacks_the_format(comfyui, fmt: str) -> None:
    # what NV113 says, asked of the ComfyUI at hand: its Linear loader looks the marker's format up in QUANT_ALGOS
    import sys

    ops = sys.modules["comfy.ops"]
    name = CASES[fmt][0]
    state = {key[len(name) + 1:]: value for key, value in BUILDERS[fmt]().items() if key.startswith(name + ".")}
    linear = ops.mixed_precision_ops({}, torch.bfloat16).Linear(IN, OUT, bias=False)
    if fmt in comfyui.quant_ops.QUANT_ALGOS:
        linear.load_state_dict(state, strict=False)  # a ComfyUI new enough loads it
        return
    with pytest.raises(KeyError, match=fmt):
        linear.load_state_dict(state, strict=False)


@pytest.mark.parametrize("fmt", ["mxfp8", "svdquant-int4"])
def test_roundtrip_says_it_does_not_decode_them_instead_of_measuring_garbage(files, tmp_path, capsys, fmt) -> None:
    name, logical, _ = CASES[fmt]
    ref = save_safetensors({f"{name}.weight": torch.randn(logical).to(torch.bfloat16),
                            "blocks.0.norm.weight": torch.ones(IN, dtype=torch.bfloat16)}, tmp_path / "ref.safetensors")
    assert main(["roundtrip", str(files[fmt]), "--against", str(ref)]) == 2
    err = capsys.readouterr().err
    assert fmt in err and "does not decode" in err and "Traceback" not in err
