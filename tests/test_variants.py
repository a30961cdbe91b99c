"""Variants the keys alone cannot tell apart, told by the diffusers config.json beside the weights, and a preset
written for another variant refused. Qwen Image Edit 2511 in diffusers form has exactly the 2512 tensors; only its
transformer config says `"zero_cond_t": true`, and ComfyUI needs `__index_timestep_zero__` in the file to run it as
2511 (comfy/model_detection.py: default_ref_method "index_timestep_zero"). Qwen Image Layered has one more tensor,
time_text_embed.addition_t_embedding.weight (ComfyUI: use_additional_t_cond, ref method "negative_index")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converter.pipeline import convert
from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.synthetic import comfyui_dims, small_dims, transformer_config, write_transformer_folder
from reference_specs.models import detect, get_profile

QWEN_SMALL = {"dim": 256, "text_dim": 256, "blocks": 1, "heads": 2}
EDIT_MARKER = "__index_timestep_zero__"
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"


def comfyui_config(path: Path) -> dict:
    """What ComfyUI's detect_unet_config reads off a written file's header (meta tensors of its shapes)."""
    from comfy import model_detection

    with safe_open(str(path), "pt") as f:
        state_dict = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    return model_detection.detect_unet_config(state_dict, "")


@pytest.fixture(scope="module")
def qwen_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    return {variant: write_transformer_folder(root / variant / "transformer", variant, QWEN_SMALL)
            for variant in ("qwen-image-2512", "qwen-image-edit-2511", "qwen-image-layered")}


@pytest.mark.parametrize("variant", ["qwen-image-2512", "qwen-image-edit-2511", "qwen-image-layered"])
def test_a_diffusers_folder_is_detected_as_its_config_says(qwen_folders: dict[str, Path], variant: str) -> None:
    with open_model(qwen_folders[variant]) as model:
        assert model.detection.variant == variant
        assert model.detection.naming == "native"  # Qwen Image's diffusers names are ComfyUI's


def test_zero_cond_t_is_the_only_difference_and_it_is_named() -> None:
    profile = get_profile("qwen-image-2512")
    shapes = profile.tensor_shapes(small_dims(profile.variant))
    assert detect(shapes).variant == "qwen-image-2512"
    found = detect(shapes, transformer_config("qwen-image-edit-2511"))
    assert (found.variant, found.config) == ("qwen-image-edit-2511", "config.json: zero_cond_t true")
    assert detect(shapes, {**transformer_config("qwen-image-edit-2511"), "zero_cond_t": False}).variant == \
        "qwen-image-2512"
    # a config never invents a tensor: Layered needs its key, whatever use_additional_t_cond says
    assert detect(shapes, transformer_config("qwen-image-layered")).variant == "qwen-image-2512"


def test_layered_is_not_2512_even_with_the_edit_marker() -> None:
    profile = get_profile("qwen-image-2512")
    shapes = {**profile.tensor_shapes(small_dims(profile.variant)), LAYERED_KEY: (2, 3072)}
    assert detect(shapes).variant == "qwen-image-layered"
    assert detect({**shapes, EDIT_MARKER: (0,)}).variant == "qwen-image-layered"  # ComfyUI: Layered's ref method


def test_converted_edit_2511_carries_the_marker_comfyui_detects(comfyui, qwen_folders: dict[str, Path],
                                                                tmp_path: Path) -> None:
    out = tmp_path / "edit.safetensors"
    result = convert(qwen_folders["qwen-image-edit-2511"], out, "qwen-image-edit-2511")
    assert result.written and not result.plan.warnings
    with safe_open(str(out), "pt") as f:
        marker = f.get_tensor(EDIT_MARKER)
        provenance = json.loads(f.metadata()["nvdiag"])
    assert marker.dtype == torch.float32 and marker.shape == (0,)  # as ComfyUI's model registers it
    assert provenance["architecture"] == "qwen-image-edit-2511"
    assert comfyui_config(out)["default_ref_method"] == "index_timestep_zero"
    with open_model(out) as model:
        assert model.detection.variant == "qwen-image-edit-2511"


def test_converted_2512_has_no_marker(comfyui, qwen_folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t2i.safetensors"
    assert convert(qwen_folders["qwen-image-2512"], out, "qwen-image-2512").written
    with safe_open(str(out), "pt") as f:
        assert EDIT_MARKER not in f.keys()
    assert "default_ref_method" not in comfyui_config(out)


@pytest.mark.parametrize(("variant", "preset"), [
    ("qwen-image-edit-2511", "qwen-image-2512"),
    ("qwen-image-2512", "qwen-image-edit-2511"),
    ("qwen-image-layered", "qwen-image-2512"),
])
def test_a_preset_for_another_variant_is_refused(qwen_folders: dict[str, Path], tmp_path: Path, capsys,
                                                 variant: str, preset: str) -> None:
    out = tmp_path / "out.safetensors"
    code = main(["convert", str(qwen_folders[variant]), str(out), "--preset", preset])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"preset {preset} is for {preset}, this checkpoint is {variant}" in err
    assert len(err.strip().splitlines()) == 1


def test_layered_converts_with_its_lookup_table_kept(comfyui, qwen_folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "layered.safetensors"
    result = convert(qwen_folders["qwen-image-layered"], out, "all")
    assert result.written
    table = next(lp for lp in result.plan.layers if lp.name == "time_text_embed.addition_t_embedding")
    assert table.action == "keep"  # an nn.Embedding: ComfyUI would load packed bytes as its table
    config = comfyui_config(out)
    assert config["use_additional_t_cond"] and config["default_ref_method"] == "negative_index"


def test_without_config_a_diffusers_qwen_folder_warns_that_2511_looks_the_same(tmp_path: Path) -> None:
    folder = write_transformer_folder(tmp_path / "transformer", "qwen-image-2512", QWEN_SMALL)
    (folder / "config.json").unlink()
    result = convert(folder, tmp_path / "out.safetensors", "qwen-image-2512", dry_run=True)
    assert any("qwen-image-edit-2511 has the same tensors" in w for w in result.plan.warnings)


@pytest.mark.parametrize(("text", "message"), [
    (b'{"_class_name": "QwenImageTransformer2DModel", "zero_cond_t": tr', "not valid JSON"),
    (b"[1, 2]", "not the object a model config is"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[" * 100 + b"]" * 100, "nested deeper"),
    (b" " * (1 << 20) + b"{}", "larger than 1024 KiB"),
])
def test_an_unreadable_config_is_one_line_exit_2(tmp_path: Path, capsys, text: bytes, message: str) -> None:
    folder = write_transformer_folder(tmp_path / "transformer", "qwen-image-2512", QWEN_SMALL)
    (folder / "config.json").write_bytes(text)
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "config.json" in err and len(err.strip().splitlines()) == 1


def test_a_config_of_something_else_is_ignored(tmp_path: Path) -> None:
    folder = write_transformer_folder(tmp_path / "transformer", "qwen-image-2512", QWEN_SMALL,
                                      config={"model_type": "qwen2_5_vl", "zero_cond_t": True})
    with open_model(folder) as model:
        assert model.detection.variant == "qwen-image-2512" and model.file_markers["config"] is None


def test_a_gguf_preset_fits_the_variants_the_gguf_cannot_tell_apart(qwen_folders: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """city96's GGUF files hold no zero-element tensor (so no 2511 marker) and no config.json: a preset made from
    one fits 2512 and Edit 2511, and converts the Edit 2511 folder (which gets its marker from config.json)."""
    from converter.from_gguf import preset_from_gguf
    from inspect_tools.synthetic import write_gguf

    gguf_path = write_gguf(tmp_path / "edit-Q4_0.gguf", "qwen-image-edit-2511", dims=QWEN_SMALL)
    preset = preset_from_gguf(gguf_path)
    assert preset.architectures == ("qwen-image-2512", "qwen-image-edit-2511")
    out = tmp_path / "edit.safetensors"
    assert convert(qwen_folders["qwen-image-edit-2511"], out, preset).written
    with safe_open(str(out), "pt") as f:
        assert EDIT_MARKER in f.keys()


@pytest.mark.parametrize(("config", "message"), [
    ({"_class_name": "WanTransformer3DModel", "in_channels": 64}, "describes a WanTransformer3DModel, the weights are "
                                                                   "Qwen Image 2512"),
    ({**transformer_config("qwen-image-edit-2511", QWEN_SMALL), "num_layers": 60}, "says num_layers 60, the weights "
                                                                                   "have 1"),
])
def test_a_config_that_is_not_these_weights_is_refused(tmp_path: Path, capsys, config: dict, message: str) -> None:
    """The variant is read off the config only when it is the weights' own: another class or other dims refuse."""
    folder = write_transformer_folder(tmp_path / "transformer", "qwen-image-2512", QWEN_SMALL, config=config)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_inspect_says_the_variant_came_from_the_config(qwen_folders: dict[str, Path], capsys) -> None:
    assert main(["inspect", str(qwen_folders["qwen-image-edit-2511"])]) == 0
    assert "qwen-image-edit-2511" in capsys.readouterr().out
    assert main(["inspect", str(qwen_folders["qwen-image-edit-2511"]), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["config"] == "config.json: zero_cond_t true"


# Full-width loads cost ~20 s each: the other two variants are loaded in ComfyUI at full width by test_verify (2512,
# 2511) and detected here from their converted headers; Layered, loaded nowhere else, is loaded here.
@pytest.mark.parametrize(("variant", "preset", "method"), [
    ("qwen-image-layered", "all", "negative_index"),  # `all` keeps img_in: ComfyUI reads in_channels off it
])
def test_comfyui_loads_the_converted_variant_as_itself(comfyui, tmp_path: Path, variant: str, preset: str,
                                                       method: str | None) -> None:
    """End to end in ComfyUI's own loader: ComfyUI builds Qwen Image at its real width (it reads only in_channels and
    the depth), so this source is full width, one block deep, BF16."""
    from inspect_tools.comfyui.loading import load

    folder = write_transformer_folder(tmp_path / "transformer", variant, comfyui_dims(variant), dtype=torch.bfloat16)
    out = tmp_path / "out.safetensors"
    assert convert(folder, out, preset).written
    folder_files = list(folder.iterdir())
    for path in folder_files:  # room on a small disk: ComfyUI needs only the converted file
        path.unlink()
    loaded = load(comfyui, out)
    report = loaded.report
    assert report.loaded, report.error
    assert report.config.get("default_ref_method") == method
    assert report.quantized.get("nvfp4") and not report.left_over
    assert "img_in" in report.plain_layers and "txt_in" in report.quantized_layers or preset != "all"
