"""Architecture profiles: detection the way ComfyUI detects, at full size and scaled down, under every naming and
prefix; name maps; sensitive layers and roles. Shapes come from tensor_shapes() directly, no files needed."""

from __future__ import annotations

import time

import pytest

from inspect_tools.synthetic import small_dims
from reference_specs import models
from reference_specs.models import PROFILES, detect, get_profile, native_name

VARIANTS = [p.variant for p in PROFILES]
WAN_VARIANTS = [p.variant for p in PROFILES if p.family == "wan"]
PREFIXES = ["", "model.diffusion_model.", "model.model.", "net.", "diffusion_model."]


def shapes_of(variant: str, full: bool) -> dict[str, tuple[int, ...]]:
    profile = get_profile(variant)
    return profile.tensor_shapes(profile.full_dims if full else small_dims(profile.variant))


@pytest.mark.parametrize("full", [True, False], ids=["full", "scaled-down"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_native_names_detect_their_variant(variant: str, full: bool) -> None:
    found = detect(shapes_of(variant, full))
    assert (found.variant, found.naming, found.prefix) == (variant, "native", "")
    assert found.scaled_down is (not full)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefixed_keys_detect_and_report_the_prefix(variant: str, prefix: str) -> None:
    found = detect({prefix + k: v for k, v in shapes_of(variant, False).items()})
    assert (found.variant, found.prefix) == (variant, prefix)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("full", [True, False], ids=["full", "scaled-down"])
@pytest.mark.parametrize("variant", WAN_VARIANTS)
def test_diffusers_wan_names_detect_through_the_map(variant: str, full: bool, prefix: str) -> None:
    profile = get_profile(variant)
    shapes = {prefix + profile.to_diffusers(k): v for k, v in shapes_of(variant, full).items()}
    assert "head.modulation" not in shapes  # ComfyUI itself would fail here (no WAN diffusers converter)
    found = detect(shapes)
    assert (found.variant, found.naming, found.prefix) == (variant, "diffusers", prefix)


def test_dims_are_read_off_the_shapes() -> None:
    found = detect(shapes_of("wan2.2-i2v-a14b", True))
    assert found.dims | {"heads": 40} == get_profile("wan2.2-i2v-a14b").full_dims
    small = detect(get_profile("qwen-image-2512").tensor_shapes({"dim": 384, "blocks": 3, "text_dim": 320,
                                                                "in_channels": 64, "out_channels": 64})).dims
    assert (small["dim"], small["blocks"], small["text_dim"], small["in_channels"]) == (384, 3, 320, 64)
    flux = detect(shapes_of("flux1-dev", True)).dims
    assert (flux["double_blocks"], flux["single_blocks"], flux["dim"]) == (19, 38, 3072)


def test_variant_follows_in_and_out_dims_not_width() -> None:
    """A WAN of any width is TI2V 5B when out_dim is 48, I2V when in_dim is 36 (comfyui-load-path.md Q5)."""
    wan = get_profile("wan2.2-t2v-a14b")
    odd = {**small_dims(wan.variant), "dim": 384, "ffn": 768, "blocks": 3}
    assert detect(wan.tensor_shapes(odd)).variant == "wan2.2-t2v-a14b"
    assert detect(wan.tensor_shapes({**odd, "in_dim": 36})).variant == "wan2.2-i2v-a14b"
    assert detect(wan.tensor_shapes({**odd, "in_dim": 48, "out_dim": 48})).variant == "wan2.2-ti2v-5b"
    assert detect(wan.tensor_shapes({**odd, "out_dim": 24})) is models.UNKNOWN


def test_qwen_edit_marker_selects_2511() -> None:
    shapes = shapes_of("qwen-image-2512", False)
    assert detect(shapes).variant == "qwen-image-2512"
    assert detect({**shapes, "__index_timestep_zero__": (0,)}).variant == "qwen-image-edit-2511"


def test_gguf_without_patch_embedding_is_still_detected() -> None:
    """city96 leaves the 5-D patch_embedding out of GGUF files: in_dim is unknown, out_dim still decides."""
    for variant, expected in (("wan2.2-ti2v-5b", "wan2.2-ti2v-5b"), ("wan2.2-t2v-a14b", "wan2.2-t2v-a14b")):
        shapes = {k: v for k, v in shapes_of(variant, False).items() if not k.startswith("patch_embedding")}
        assert detect(shapes).variant == expected


def test_nvfp4_packed_shapes_still_detect() -> None:
    """Quantized block linears are stored packed [out, in/2]; detection reads only kept tensors."""
    shapes = dict(shapes_of("wan2.2-ti2v-5b", False))
    for key, shape in list(shapes.items()):
        if key.startswith("blocks.") and key.endswith(".weight") and len(shape) == 2:
            shapes[key] = (shape[0], shape[1] // 2)
            shapes[key[:-6] + "weight_scale"] = (shape[0], shape[1] // 16)
    found = detect(shapes)
    assert (found.variant, found.dims["ffn"]) == ("wan2.2-ti2v-5b", 512)


def test_unknown_keys_give_unknown() -> None:
    assert detect({"encoder.layers.0.weight": (4, 4), "lm_head.weight": (8, 4)}) is models.UNKNOWN
    assert detect({}) is models.UNKNOWN


def test_wan_name_map_examples() -> None:
    wan = get_profile("wan2.2-ti2v-5b")
    assert wan.to_native("blocks.0.attn1.to_q.weight_scale") == "blocks.0.self_attn.q.weight_scale"
    assert wan.to_native("blocks.3.attn1.to_out.0.comfy_quant") == "blocks.3.self_attn.o.comfy_quant"
    assert wan.to_native("blocks.1.ffn.net.0.proj.weight_scale_2") == "blocks.1.ffn.0.weight_scale_2"
    assert wan.to_native("blocks.1.scale_shift_table") == "blocks.1.modulation"
    assert wan.to_native("scale_shift_table") == "head.modulation"
    assert wan.to_native("proj_out.bias") == "head.head.bias"
    assert wan.to_native("condition_embedder.time_proj.input_scale") == "time_projection.1.input_scale"
    assert wan.to_native("blocks.0.attn2.add_k_proj.weight") == "blocks.0.cross_attn.k_img.weight"
    assert wan.to_diffusers("blocks.0.norm3.weight") == "blocks.0.norm2.weight"
    assert wan.is_diffusers_name("blocks.0.attn1.to_q.weight") and not wan.is_diffusers_name("blocks.0.ffn.0.weight")


@pytest.mark.parametrize("variant", VARIANTS)
def test_name_maps_round_trip_with_any_role(variant: str) -> None:
    profile = get_profile(variant)
    roles = ("", ".weight_scale", ".weight_scale_2", ".input_scale", ".comfy_quant")
    for key in shapes_of(variant, False):
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        for name in [key] + ([base + r for r in roles if r] if base else []):
            diffusers = profile.to_diffusers(name)
            assert profile.to_native(diffusers) == name
            assert profile.to_native(name) == name  # native names are fixed points
    if profile.family != "wan":
        assert all(profile.to_diffusers(k) == k for k in shapes_of(variant, False))


def test_native_name_strips_prefix_and_renames() -> None:
    wan = get_profile("wan2.2-ti2v-5b")
    native = wan.tensor_shapes(small_dims(wan.variant))
    shapes = {"model.diffusion_model." + wan.to_diffusers(k): v for k, v in native.items()}
    found = detect(shapes)
    assert native_name(found, "model.diffusion_model.blocks.0.attn1.to_k.weight") == "blocks.0.self_attn.k.weight"


@pytest.mark.parametrize(
    "variant, layer, why",
    [
        ("wan2.2-ti2v-5b", "patch_embedding", "patch embedding"),
        ("wan2.2-ti2v-5b", "text_embedding.0", "embedding"),
        ("wan2.2-ti2v-5b", "time_projection.1", "modulation"),
        ("wan2.2-ti2v-5b", "blocks.4.modulation", "modulation"),
        ("wan2.2-ti2v-5b", "head.head", "head"),
        ("wan2.2-ti2v-5b", "blocks.0.self_attn.norm_q", "norm"),
        ("wan2.2-ti2v-5b", "proj_out", "head"),  # diffusers names are understood too
        ("qwen-image-2512", "img_in", "embedding"),
        ("qwen-image-2512", "time_text_embed.timestep_embedder.linear_1", "embedding"),
        ("qwen-image-2512", "norm_out.linear", "modulation"),
        ("qwen-image-2512", "proj_out", "head"),
        ("qwen-image-2512", "transformer_blocks.0.img_mod.1", "modulation"),
        ("flux1-dev", "vector_in.in_layer", "detection-critical"),
        ("flux1-dev", "img_in", "detection-critical"),
        ("flux1-dev", "final_layer.linear", "head"),
    ],
)
def test_sensitive_layers_say_why(variant: str, layer: str, why: str) -> None:
    assert why in (get_profile(variant).sensitive(layer) or "")


@pytest.mark.parametrize(
    "variant, layer",
    [("wan2.2-t2v-a14b", "blocks.0.self_attn.q"), ("wan2.2-t2v-a14b", "blocks.2.ffn.2"),
     ("qwen-image-2512", "transformer_blocks.0.attn.to_q"), ("flux1-dev", "single_blocks.0.linear1")],
)
def test_block_linears_are_not_sensitive(variant: str, layer: str) -> None:
    assert get_profile(variant).sensitive(layer) is None


@pytest.mark.parametrize(
    "variant, layer, role",
    [
        ("wan2.2-ti2v-5b", "blocks.0.self_attn.q", "attn_q"),
        ("wan2.2-ti2v-5b", "blocks.0.cross_attn.o", "attn_out"),
        ("wan2.2-ti2v-5b", "blocks.0.ffn.0", "mlp_up"),
        ("wan2.2-ti2v-5b", "blocks.0.attn1.to_v", "attn_v"),
        ("wan2.2-ti2v-5b", "head.head", "head"),
        ("wan2.2-ti2v-5b", "blocks.0.norm3", "norm"),
        ("qwen-image-2512", "transformer_blocks.1.attn.add_k_proj", "attn_k"),
        ("qwen-image-2512", "transformer_blocks.1.txt_mlp.net.2", "mlp_down"),
        ("qwen-image-2512", "transformer_blocks.1.img_mod.1", "modulation"),
        ("flux1-dev", "double_blocks.0.img_attn.qkv", "attn_qkv"),
        ("flux1-dev", "double_blocks.0.txt_mlp.2", "mlp_down"),
        ("flux1-dev", "single_blocks.3.modulation.lin", "modulation"),
        ("flux1-dev", "txt_in", "embedding"),
    ],
)
def test_roles_for_cross_architecture_comparison(variant: str, layer: str, role: str) -> None:
    assert get_profile(variant).role_of(layer) == role


def test_detection_is_fast_on_a_14b_header() -> None:
    wan = get_profile("wan2.2-i2v-a14b")
    native = wan.tensor_shapes(wan.full_dims)
    diffusers = {"model.diffusion_model." + wan.to_diffusers(k): v for k, v in native.items()}
    start = time.perf_counter()
    for _ in range(5):
        detect(native)
        detect(diffusers)
    assert (time.perf_counter() - start) / 10 < 0.05


def test_every_profile_is_registered_once() -> None:
    assert len(set(VARIANTS)) == len(VARIANTS) == 7
    assert get_profile("no-such-model") is None
