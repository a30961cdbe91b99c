"""The architecture profiles against ComfyUI's own model classes, at full width: the key set and every shape a
profile says a model has is exactly the state_dict of the model ComfyUI builds from those keys
(comfy/model_detection.py -> supported_models -> comfy/ldm/*, instantiated on the meta device: no memory).
Diffusers-named Flux: the names are exactly those ComfyUI's flux_to_diffusers map converts from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.synthetic import save_safetensors, small_dims
from reference_specs.models import PROFILES, detect, get_profile

VARIANTS = [p.variant for p in PROFILES]
# The model ComfyUI builds for each target (supported_models class names, ComfyUI 0.8.0); WAN 2.2 I2V A14B has no
# CLIP branch, so ComfyUI configures it like T2V with in_dim 36
COMFY_CONFIG = {
    "wan2.2-ti2v-5b": "WAN22_T2V", "wan2.2-t2v-a14b": "WAN21_T2V", "wan2.2-i2v-a14b": "WAN21_T2V",
    "qwen-image-2512": "QwenImage", "qwen-image-edit-2511": "QwenImage", "qwen-image-layered": "QwenImage",
    "flux1-dev": "Flux",
}


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_profile_is_the_model_comfyui_builds(comfyui, variant: str) -> None:
    from comfy import model_detection

    profile = get_profile(variant)
    shapes = {k: tuple(v) for k, v in profile.tensor_shapes(profile.full_dims).items()}
    state_dict = meta_state_dict(shapes)
    config = model_detection.model_config_from_unet(state_dict, "")
    assert type(config).__name__ == COMFY_CONFIG[variant]
    model = config.get_model(state_dict, "", device="meta")
    built = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    assert built == shapes


def test_qwen_variants_get_their_reference_method(comfyui) -> None:
    from comfy import model_detection

    methods = {}
    for variant in ("qwen-image-2512", "qwen-image-edit-2511", "qwen-image-layered"):
        profile = get_profile(variant)
        config = model_detection.detect_unet_config(meta_state_dict(profile.tensor_shapes(profile.full_dims)), "")
        methods[variant] = config.get("default_ref_method")
    assert methods == {"qwen-image-2512": None, "qwen-image-edit-2511": "index_timestep_zero",
                       "qwen-image-layered": "negative_index"}


def test_diffusers_flux_names_are_the_ones_comfyui_maps(comfyui) -> None:
    from comfy import model_detection, utils

    flux = get_profile("flux1-dev")
    native = flux.tensor_shapes(flux.full_dims)
    config = model_detection.detect_unet_config(meta_state_dict(native), "")
    key_map = utils.flux_to_diffusers(config)
    mapped = {k for k in key_map if not k.startswith("controlnet_")}  # a ControlNet's input, not the model's
    diffusers = flux.diffusers_tensor_shapes(flux.full_dims)
    assert set(diffusers) == mapped
    targets = {(v if isinstance(v, str) else v[0]) for k, v in key_map.items() if k in mapped}
    assert targets == set(native)  # and they cover every BFL tensor (q/k/v fused into qkv and linear1)


def test_diffusers_flux_is_recognized_and_refused_by_convert(tmp_path: Path, capsys) -> None:
    flux = get_profile("flux1-dev")
    shapes = flux.diffusers_tensor_shapes(small_dims(flux.variant))
    found = detect(shapes)
    assert (found.family, found.variant, found.naming) == ("flux", "flux1-dev", "diffusers")
    assert found.dims["double_blocks"] == small_dims(flux.variant)["double_blocks"]
    src = save_safetensors({k: torch.zeros(v) for k, v in shapes.items()}, tmp_path / "flux_diffusers.safetensors")
    with open_model(src) as model:
        assert model.detection.naming == "diffusers"
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", "smart"]) == 2
    err = capsys.readouterr().err
    assert "FLUX.1-dev under diffusers names" in err and "BFL" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
