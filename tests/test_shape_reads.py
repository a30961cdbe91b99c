"""Weights ComfyUI reads the model's dimensions from (comfy/model_detection.py) are never quantized into another
shape: no preset does it, lint reports a file that does (NV305), and convert's gate refuses a plan that would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converter import plan as plan_module
from converter.pipeline import convert
from converter.plan import build_plan
from converter.preset import LayerView, load_builtin, loads_preset, view_of
from inspect_tools.layers import open_model
from inspect_tools.lint import LintConfig, lint_paths
from inspect_tools.synthetic import write_float, write_fp8_comfy, write_header_only, write_nvfp4_mixed
from reference_specs.findings import Severity

VARIANTS = ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "qwen-image-2512", "qwen-image-edit-2511",
            "flux1-dev")
# A narrow Qwen Image: ComfyUI only reads in_channels and the depth, so width does not matter to these tests
QWEN_SMALL = {"dim": 256, "text_dim": 256, "blocks": 1, "heads": 2}
FLUX_IN_LAYERS = ("img_in", "txt_in", "vector_in.in_layer")


def comfyui_config(model_detection, entries: list[tuple[str, str, tuple[int, ...]]]) -> dict:
    """What ComfyUI configures from a header: detect_unet_config on meta tensors of the header's shapes."""
    state_dict = {name: torch.empty(shape, device="meta") for name, _, shape in entries}
    return model_detection.detect_unet_config(state_dict, "")


@pytest.mark.parametrize("preset", ["all", "smart"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_builds_the_same_model_from_the_converted_header(comfyui, tmp_path: Path, variant: str,
                                                                 preset: str) -> None:
    """At full width: the config ComfyUI reads off the planned output header is the one it reads off the source."""
    from comfy import model_detection

    src = write_header_only(tmp_path / "src.safetensors", variant, kind="bf16")
    with open_model(src) as model:
        plan = build_plan(model, load_builtin(preset))
        source = [(info.name, info.dtype, tuple(info.shape)) for info in model.reader]
    assert any(lp.quantized for lp in plan.layers)
    assert comfyui_config(model_detection, plan.entries) == comfyui_config(model_detection, source)


def test_all_keeps_the_weights_comfyui_reads_shapes_from() -> None:
    preset = load_builtin("all")
    qwen_in = LayerView("img_in", (3072, 64), shape_reads={1: "in_channels"})
    assert preset.decide(qwen_in).format == "keep"
    assert "ComfyUI reads in_channels" in preset.explain(qwen_in)[0][1]
    # FP8 keeps the shape: nothing ComfyUI reads changes
    fp8 = loads_preset(b'[[rules]]\nmatch = "*"\nformat = "fp8"\n', "inline")
    assert fp8.decide(qwen_in).format == "fp8"
    # WAN reads rows only (out_dim, ffn_dim): packing keeps rows that are a multiple of 16, and pads the others
    assert preset.decide(LayerView("head.head", (192, 3072), shape_reads={0: "out_dim"})).format == "nvfp4"
    assert preset.decide(LayerView("head.head", (8, 256), shape_reads={0: "out_dim"})).format == "keep"


@pytest.mark.parametrize("layer", FLUX_IN_LAYERS)
def test_lint_reports_a_flux_input_layer_packed_as_nvfp4(tmp_path: Path, layer: str) -> None:
    path = write_nvfp4_mixed(tmp_path / "flux.safetensors", "flux1-dev", selection=lambda name: name == layer)
    findings = lint_paths([path], LintConfig()).findings
    nv305 = [f for f in findings if f.rule == "NV305"]
    assert [f.layer for f in nv305] == [layer] and nv305[0].severity == Severity.ERROR
    assert nv305[0].cause == "wrong-shape"


def test_lint_accepts_the_same_layers_in_fp8(tmp_path: Path) -> None:
    path = write_fp8_comfy(tmp_path / "flux.safetensors", "flux1-dev", selection=lambda n: n in FLUX_IN_LAYERS)
    assert not [f for f in lint_paths([path], LintConfig()).findings if f.rule == "NV305"]


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_float(tmp_path_factory.mktemp("qwen") / "src.safetensors", "qwen-image-2512", dims=QWEN_SMALL)


def test_convert_all_on_qwen_keeps_img_in(qwen_src: Path, tmp_path: Path) -> None:
    result = convert(qwen_src, tmp_path / "out.safetensors", "all")
    assert result.written and not result.refused
    layers = {lp.name: lp for lp in result.plan.layers}
    assert layers["img_in"].action == "keep" and layers["txt_in"].quantized


def test_gate_refuses_a_plan_that_packs_img_in(qwen_src: Path, tmp_path: Path, monkeypatch) -> None:
    """Force the plan past the preset's eligibility check: the gate reads the written file back and refuses it."""
    monkeypatch.setattr(plan_module, "profile_view", lambda layer, profile: view_of(layer, profile.sensitive))
    out = tmp_path / "out.safetensors"
    result = convert(qwen_src, out, "all")
    assert {lp.name: lp.action for lp in result.plan.layers}["img_in"] == "nvfp4"
    assert result.refused and not out.exists()
    refused = [f for f in result.gate.findings if f.severity >= Severity.ERROR]
    assert [(f.rule, f.layer) for f in refused] == [("NV305", "img_in")]


def test_comfyui_loads_flux_converted_with_all(comfyui, tmp_path: Path) -> None:
    """ComfyUI reads hidden_size, in_channels, context_in_dim and vec_in_dim off these weights: it loads the file
    with them plain and the rest NVFP4. Full width (ComfyUI fixes 24 heads of 128), one block of each kind, BF16."""
    from inspect_tools.comfyui.loading import load
    from reference_specs.models import get_profile

    dims = {**get_profile("flux1-dev").full_dims, "double_blocks": 1, "single_blocks": 1}
    src = write_float(tmp_path / "flux.safetensors", "flux1-dev", dims=dims, dtype=torch.bfloat16)
    out = tmp_path / "out.safetensors"
    assert convert(src, out, "all").written
    report = load(comfyui, out).report
    assert report.loaded, report.error
    assert set(FLUX_IN_LAYERS) <= set(report.plain_layers)
    assert "double_blocks.0.img_attn.qkv" in report.quantized_layers
    assert (report.config["context_in_dim"], report.config["vec_in_dim"]) == (4096, 768)
