"""Classification of hand-built Layers: every slug, claim order, and Layer.is_quantized through the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspect_tools.readers.base import TensorInfo
from reference_specs import formats
from reference_specs.layer import Layer

SAFETENSORS = {"container": "safetensors", "scaled_fp8": None}
GGUF = {"container": "gguf", "scaled_fp8": None}
LEGACY = {"container": "safetensors", "scaled_fp8": TensorInfo("scaled_fp8", "F8_E4M3", (0,), 0, Path("x"), 0)}


def layer(name: str, marker: dict | None = None, **tensors: tuple[str, tuple[int, ...]]) -> Layer:
    infos = {
        role: TensorInfo(f"{name}.{role}", dtype, shape, 0, Path("x"), 0) for role, (dtype, shape) in tensors.items()
    }
    return Layer(name=name, tensors=infos, marker=marker)


NVFP4_TENSORS = {"weight": ("U8", (64, 32)), "weight_scale": ("F8_E4M3", (128, 4)), "weight_scale_2": ("F32", ())}
FP8_TENSORS = {"weight": ("F8_E4M3", (64, 64)), "weight_scale": ("F32", ())}

EXAMPLES = [
    ("nvfp4", layer("a", {"format": "nvfp4"}, **NVFP4_TENSORS), SAFETENSORS),
    ("nvfp4", layer("a", **NVFP4_TENSORS), SAFETENSORS),  # unmarked, recognised by its tensors
    ("float8_e4m3fn", layer("b", {"format": "float8_e4m3fn"}, **FP8_TENSORS), SAFETENSORS),
    ("float8_e4m3fn", layer("b", **FP8_TENSORS, input_scale=("F32", ()), bias=("BF16", (64,))), SAFETENSORS),
    ("float8_e5m2", layer("c", weight=("F8_E5M2", (64, 64)), weight_scale=("F32", ())), SAFETENSORS),
    ("float8_e5m2", layer("c", {"format": "float8_e5m2"}, weight=("F8_E5M2", (8, 8)), weight_scale=("F32", (1,))),
     SAFETENSORS),
    ("scaled_fp8", layer("d", weight=("F8_E4M3", (64, 64)), scale_weight=("F32", ())), LEGACY),
    ("scaled_fp8", layer("d", weight=("F8_E4M3", (64, 64)), scale_weight=("F32", (1,)), scale_input=("F32", ())),
     SAFETENSORS),  # the file-level marker was lost: scale_weight alone still says legacy
    # LightX2V (issue 16): NVFP4 codes beside alpha / input_global_scale and no weight_scale_2
    ("nvfp4-lightx2v", layer("f", weight=("U8", (128, 32)), weight_scale=("F8_E4M3", (128, 4)),
                             input_global_scale=("F32", ()), alpha=("F32", ())), SAFETENSORS),
    # ModelOpt (issue 16): ComfyUI's roles, told apart only by the config.json beside the weights
    ("nvfp4-modelopt", layer("g", **NVFP4_TENSORS),
     {**SAFETENSORS, "config": {"_class_name": "WanTransformer3DModel",
                                "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}}),
    ("nvfp4-compressed-tensors",
     layer("e", weight_packed=("U8", (64, 32)), weight_scale=("F8_E4M3", (64, 4)), weight_global_scale=("F32", (1,))),
     SAFETENSORS),
    ("Q4_0", layer("f", weight=("Q4_0", (64, 64)), bias=("F32", (64,))), GGUF),
    ("Q5_K", layer("f", weight=("Q5_K", (64, 256))), GGUF),
    ("F16", layer("f", weight=("F16", (64, 64))), GGUF),
    ("BF16", layer("f", weight=("BF16", (64, 64))), GGUF),
    ("F32", layer("blocks.0.modulation", value=("F32", (1, 6, 64))), GGUF),
    ("f32", layer("g", weight=("F32", (64, 64)), bias=("F32", (64,))), SAFETENSORS),
    ("f16", layer("g", weight=("F16", (64, 64))), SAFETENSORS),
    ("bf16", layer("norm", weight=("BF16", (64,)), bias=("BF16", (64,))), SAFETENSORS),
    ("f64", layer("g", weight=("F64", (4, 4))), SAFETENSORS),
    ("f32", layer("blocks.0.modulation", value=("F32", (1, 6, 64))), SAFETENSORS),
    ("bf16", layer("head.only_bias", bias=("BF16", (64,))), SAFETENSORS),
    ("f8_e4m3", layer("h", weight=("F8_E4M3", (64, 64))), SAFETENSORS),  # a plain unscaled cast
    ("f8_e5m2", layer("h", weight=("F8_E5M2", (64, 64)), bias=("BF16", (64,))), SAFETENSORS),
    # recognised, not decoded (issue 16; reference_specs/formats/recognized.py): by marker, or by tensors of their own
    ("mxfp8", layer("i", {"format": "mxfp8"}, weight=("F8_E4M3", (64, 64)), weight_scale=("U8", (64, 2))),
     SAFETENSORS),
    ("mxfp8", layer("i", weight=("F8_E4M3", (64, 64)), weight_scale=("F8_E8M0", (128, 4))), SAFETENSORS),
    ("int8_tensorwise", layer("i", {"format": "int8_tensorwise"}, weight=("I8", (64, 64)), weight_scale=("F32", ())),
     SAFETENSORS),
    ("int8_tensorwise", layer("i", weight=("I8", (64, 64)), weight_scale=("F32", (64, 1))), SAFETENSORS),
    ("asym_w4a8_int8", layer("i", {"format": "asym_w4a8_int8"}, weight=("I8", (64, 32)),
                             weight_s_rel=("F8_E4M3", (64, 4)), weight_s_channel=("F32", (64,))), SAFETENSORS),
    ("convrot_w4a4", layer("i", {"format": "convrot_w4a4", "convrot_groupsize": 256}, weight=("I8", (64, 128)),
                           weight_scale=("BF16", (4, 64))), SAFETENSORS),
    ("convrot_w4a4", layer("i", weight=("I8", (64, 128)), weight_scale=("BF16", (4, 64))), SAFETENSORS),
    ("awq_w4a16", layer("i", {"format": "awq_w4a16"}, weight=("I8", (64, 128)), weight_scale=("BF16", (4, 64)),
                        weight_zeros=("BF16", (4, 64))), SAFETENSORS),
    ("moe-experts", layer("i", {"format": "nvfp4", "num_experts": 4}, weight=("U8", (4, 64, 32)),
                          weight_scale=("F8_E4M3", (4, 128, 4)), weight_scale_2=("F32", (4,))), SAFETENSORS),
    ("moe-experts", layer("i", weight=("F8_E4M3", (4, 64, 64)), weight_scale=("F32", (4,))), SAFETENSORS),
    ("svdquant-int4", layer("i", qweight=("I8", (64, 128)), wscales=("BF16", (4, 64)), smooth_factor=("BF16", (256,)),
                            proj_down=("BF16", (256, 16)), proj_up=("BF16", (64, 16)), bias=("BF16", (64,))),
     SAFETENSORS),
    ("svdquant-nvfp4", layer("i", qweight=("I8", (64, 128)), wscales=("F8_E4M3", (16, 64)),
                             smooth_factor=("BF16", (256,)), proj_down=("BF16", (256, 16)),
                             proj_up=("BF16", (64, 16)), wtscale=("F32", ())), SAFETENSORS),
    ("awq-nunchaku", layer("i", qweight=("I32", (16, 128)), wscales=("BF16", (4, 64)), wzeros=("BF16", (4, 64))),
     SAFETENSORS),
    ("awq-autoawq", layer("i", qweight=("I32", (256, 8)), qzeros=("I32", (2, 8)), scales=("F16", (2, 64))),
     SAFETENSORS),
    ("unknown", layer("j", weight=("I8", (64, 64)), scale_weight=("F32", ())), SAFETENSORS),
]


@pytest.mark.parametrize(("slug", "example", "markers"), EXAMPLES, ids=[f"{i}-{e[0]}" for i, e in enumerate(EXAMPLES)])
def test_classify(slug: str, example: Layer, markers: dict) -> None:
    assert formats.classify(example, markers) == slug


def test_every_registered_safetensors_slug_has_an_example() -> None:
    covered = {slug for slug, _, _ in EXAMPLES}
    safetensors_slugs = {f.slug for f in formats.FORMATS if not f.slug.isupper()}
    assert safetensors_slugs <= covered


def test_a_marker_wins_over_tensor_guesses() -> None:
    # FP8 tensors but a comfy_quant saying nvfp4: the marker decides (lint then reports the wrong dtypes).
    assert formats.classify(layer("k", {"format": "nvfp4"}, **FP8_TENSORS), SAFETENSORS) == "nvfp4"


def test_a_claim_that_trips_on_a_malformed_layer_does_not_stop_classification() -> None:
    odd = layer("l", weight=("F32", (64, 64)))
    odd.marker = "not a dict"  # type: ignore[assignment]  # a broken reader result, not a conf
    assert formats.classify(odd, SAFETENSORS) == "f32"


@pytest.mark.parametrize(
    ("slug", "quantized"),
    [("nvfp4", True), ("float8_e4m3fn", True), ("scaled_fp8", True), ("nvfp4-compressed-tensors", True),
     ("Q4_0", True), ("Q6_K", True), ("F16", False), ("BF16", False), ("F32", False), ("f32", False),
     ("bf16", False), ("f8_e4m3", True), ("unknown", False), ("not-a-format", False)],
)
def test_layer_is_quantized_asks_the_registry(slug: str, quantized: bool) -> None:
    assert Layer(name="x", format=slug).is_quantized is quantized


def test_get_and_describe() -> None:
    assert formats.get("float8_e4m3fn").describe().startswith("weight F8_E4M3 + weight_scale F32 scalar")
    assert formats.by_comfy_format("float8_e5m2") is formats.get("float8_e5m2")
    with pytest.raises(KeyError):
        formats.get("nope")
