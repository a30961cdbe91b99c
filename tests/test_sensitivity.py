"""`nvdiag sensitivity` and `nvdiag calibrate` with ComfyUI itself: the layers given activation outliers (the model's
function unchanged) are the ones ranked at risk, and calibrated input scales go through convert into ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspect_tools.cli import main
from inspect_tools.comfyui.sensitivity import RISKY, sensitivity
from inspect_tools.layers import open_model
from inspect_tools.synthetic import add_activation_outliers, float_state_dict, save_safetensors

VARIANT = "wan2.2-ti2v-5b"
SENSITIVE = "blocks.0.self_attn.o"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """WAN TI2V (ComfyUI's dims) whose blocks.0.self_attn.o sees 4 input channels 50x larger than the rest."""
    state = float_state_dict(VARIANT)
    add_activation_outliers(state, SENSITIVE, gain=50.0)
    return save_safetensors(state, tmp_path_factory.mktemp("sensitivity") / "outliers.safetensors", {})


@pytest.fixture(scope="module")
def result(comfyui, source):
    with open_model(source) as model:
        return sensitivity(comfyui, model, steps=2, prompts=2)


def test_the_layer_with_activation_outliers_is_ranked_first(result):
    first = result.layers[0]
    assert first.layer == SENSITIVE and first.risk > RISKY
    # its weights quantize as well as any other layer's: it is the activations that do not survive 4 bits
    assert first.w4a16 < 2 * sorted(layer.w4a16 for layer in result.layers)[len(result.layers) // 2]
    assert first.fp8 < first.w4a16  # FP8 (8-bit activations with a calibrated scale) keeps it


def test_the_report_lists_every_quantizable_layer_and_no_sensitive_one(result):
    names = {layer.layer for layer in result.layers}
    assert len(names) == 20  # q k v o of both attentions and the two FFN linears, in 2 blocks
    assert not any(n.startswith(("head", "time_", "text_", "patch_")) for n in names)
    doc = result.to_json()
    assert doc["kind"] == "nvdiag-sensitivity" and doc["architecture"] == VARIANT
    assert doc["layers"][0]["layer"] == SENSITIVE and doc["layers"][0]["risk"] > RISKY


def test_block_by_block_measures_the_same(comfyui, source, result):
    with open_model(source) as model:
        by_block = sensitivity(comfyui, model, steps=2, prompts=2, blocks_at_once=1)
    assert by_block.pieces == 2
    mine = {layer.layer: layer for layer in by_block.layers}
    for layer in result.layers:
        assert mine[layer.layer].w4a4_dynamic == pytest.approx(layer.w4a4_dynamic, rel=1e-4)
        assert mine[layer.layer].act_amax == pytest.approx(layer.act_amax, rel=1e-5)


def test_sensitivity_command_writes_the_report(comfyui, source, tmp_path, capsys):
    report = tmp_path / "sensitivity.json"
    code = main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--steps", "1", "--prompts", "1",
                 "-o", str(report)])
    out = capsys.readouterr().out
    assert code == 0 and "1 layer(s) at risk under W4A4" in out and SENSITIVE in out
    assert json.loads(report.read_text())["layers"][0]["layer"] == SENSITIVE
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "-o", str(report)]) == 2  # no --force


def test_calibrated_input_scales_reach_comfyui_through_convert(comfyui, source, tmp_path, capsys):
    scales = tmp_path / "input_scales.json"
    assert main(["calibrate", str(source), "-o", str(scales), "--comfyui", str(comfyui.root), "--steps", "2"]) == 0
    values = json.loads(scales.read_text())
    assert len(values) == 20 and all(v > 0 for v in values.values())
    out = tmp_path / "calibrated.safetensors"
    assert main(["convert", str(source), str(out), "--preset", VARIANT, "--input-scales", str(scales)]) == 0
    from inspect_tools.comfyui.loading import load

    loaded = load(comfyui, out)
    try:
        module = dict(loaded.patcher.model.diffusion_model.named_modules())[SENSITIVE]
        assert float(module.input_scale) == pytest.approx(values[SENSITIVE], rel=1e-6)  # ComfyUI holds it
    finally:
        loaded.release(comfyui)


def test_a_calibrated_static_scale_is_no_worse_on_blackwell_than_a_weight_derived_one(comfyui, source, tmp_path):
    """What verify --compute w4a4 says of the calibrated file: within the baseline (dynamic) error, where a
    weight-derived input_scale (a known bad practice) is far above it."""
    scales = tmp_path / "input_scales.json"
    assert main(["calibrate", str(source), "-o", str(scales), "--comfyui", str(comfyui.root)]) == 0
    out = tmp_path / "calibrated.safetensors"
    assert main(["convert", str(source), str(out), "--preset", VARIANT, "--input-scales", str(scales)]) == 0
    from inspect_tools.comfyui.verify import FAR, verify

    with open_model(out) as mine, open_model(source) as ref:
        result = verify(comfyui, mine, ref, compute=("w4a16", "w4a4"), steps=2)
    assert result.paths[1].ratio < FAR
