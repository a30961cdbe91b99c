"""nvdiag writes the bytes ComfyUI itself would write, for FP32, BF16 and F16 sources alike.

ComfyUI quantizes a weight to NVFP4 with comfy-kitchen's TensorCoreNVFP4Layout.quantize, which divides amax by 2688 in
the weight's own dtype (a BF16 source gets a BF16-rounded weight_scale_2), and to FP8 with its own
TensorCoreFP8E4M3Layout.quantize (comfy/quant_ops.py: amax/448 in float32, a reciprocal clamp for F16). Those two are
the oracles here, called on the same tensor as nvdiag; the only deviations are the scales comfy-kitchen would make 0
(an all-zero weight, an F16 weight whose amax/2688 underflows F16), where its own encoder writes NaN or zeros.
"""

from __future__ import annotations

import math
from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch
from comfy_kitchen.tensor import TensorCoreNVFP4Layout
from safetensors import safe_open

from converter.pipeline import convert
from inspect_tools.synthetic import float_state_dict, write_float
from reference_specs.formats.fast_encode import encode_fp8, encode_nvfp4
from reference_specs.formats.fp8 import FP8E4M3
from reference_specs.formats.nvfp4 import NVFP4

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed)) * 0.02


def kaiming_uniform(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    bound = 1.0 / math.sqrt(cols)  # nn.Linear's default initialisation
    return (torch.rand(rows, cols, generator=_gen(seed)) * 2 - 1) * bound


def student_t(rows: int, cols: int, seed: int = 2, df: int = 3) -> torch.Tensor:
    """Heavy tails: a normal over sqrt(chi2(df)/df)."""
    g = _gen(seed)
    chi2 = torch.randn(df, rows, cols, generator=g).square().sum(0)
    return torch.randn(rows, cols, generator=g) / torch.sqrt(chi2 / df) * 0.01


def row_gains(rows: int, cols: int, seed: int = 3) -> torch.Tensor:
    """Per-output-row gains spread over about two decades (per-head structure)."""
    g = _gen(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g)) * 0.02


def small_values(rows: int, cols: int, seed: int = 4) -> torch.Tensor:
    """amax about 1e-3: in F16 the NVFP4 scale (about 4e-7) is subnormal, and the FP8 reciprocal passes 65504."""
    return torch.randn(rows, cols, generator=_gen(seed)) * 2e-4


STATISTICS = {
    "gaussian": gaussian(64, 256),
    "kaiming-uniform": kaiming_uniform(48, 320),
    "student-t": student_t(64, 192),
    "row-gains": row_gains(128, 128),
    "small-values": small_values(32, 96),
    "padded-130x200": gaussian(130, 200, seed=5),  # neither rows nor columns a multiple of 16 or 128
    "padded-17x33": student_t(17, 33, seed=6),
}


def comfy_nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ComfyUI stores for this weight: QuantizedTensor.from_float(weight, "TensorCoreNVFP4Layout") keeps
    qdata, params.block_scale and params.scale as .weight, .weight_scale and .weight_scale_2."""
    qdata, params = TensorCoreNVFP4Layout.quantize(weight)
    return {"weight": qdata, "weight_scale": params.block_scale, "weight_scale_2": params.scale}


def assert_same_nvfp4(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str = "") -> None:
    assert torch.equal(ours["weight"], theirs["weight"]), what
    assert torch.equal(ours["weight_scale"].view(torch.uint8), theirs["weight_scale"].view(torch.uint8)), what
    assert ours["weight_scale_2"].dtype == torch.float32 and ours["weight_scale_2"].shape == ()
    assert torch.equal(ours["weight_scale_2"], theirs["weight_scale_2"].reshape(())), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats", STATISTICS)
def test_nvfp4_bytes_equal_comfy_kitchens(stats: str, dtype: str) -> None:
    weight = STATISTICS[stats].to(DTYPES[dtype])
    theirs = comfy_nvfp4(weight)
    assert_same_nvfp4(encode_nvfp4(weight), theirs)
    assert_same_nvfp4(encode_nvfp4(weight, chunk_rows=7), theirs)
    assert_same_nvfp4(NVFP4().quantize(weight), theirs)


def test_a_bf16_scale_is_rounded_to_bf16_not_float32() -> None:
    # the point of the convention: for most BF16 layers the float32 quotient is not what ComfyUI stores
    differ = 0
    for seed in range(20):
        weight = gaussian(32, 64, seed=100 + seed).to(torch.bfloat16)
        scale = encode_nvfp4(weight)["weight_scale_2"]
        assert torch.equal(scale, comfy_nvfp4(weight)["weight_scale_2"])
        assert float(scale) == float(torch.tensor(float(scale)).to(torch.bfloat16))  # a BF16 value
        differ += float(scale) != float(weight.abs().amax().float() / 2688.0)
    assert differ > 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_all_zero_weight_gets_scale_one_where_comfy_kitchen_makes_nan(dtype: str) -> None:
    weight = torch.zeros(20, 40, dtype=DTYPES[dtype])
    theirs = comfy_nvfp4(weight)
    assert float(theirs["weight_scale_2"]) == 0.0 and theirs["weight_scale"].float().isnan().any()
    ours = encode_nvfp4(weight)
    assert float(ours["weight_scale_2"]) == 1.0
    qdata, blocked = ck.quantize_nvfp4(weight, ours["weight_scale_2"], pad_16x=True)
    assert_same_nvfp4(ours, {"weight": qdata, "weight_scale": blocked, "weight_scale_2": torch.tensor(1.0)})
    assert_same_nvfp4(NVFP4().quantize(weight), ours)


def test_nvfp4_f16_weight_whose_scale_underflows_f16_keeps_its_values() -> None:
    # amax 5e-5: amax/2688 = 1.9e-8 is below F16's smallest subnormal (2^-24 = 6e-8), so comfy-kitchen's scale is 0
    # and every element encodes to 0; nvdiag divides in float32 there and keeps the weight
    weight = (gaussian(16, 64) * (5e-5 / float(gaussian(16, 64).abs().amax()))).to(torch.float16)
    theirs = comfy_nvfp4(weight)
    assert float(theirs["weight_scale_2"]) == 0.0
    ours = encode_nvfp4(weight)
    assert torch.equal(ours["weight_scale_2"], weight.abs().amax().float() / 2688.0)
    qdata, blocked = ck.quantize_nvfp4(weight, ours["weight_scale_2"], pad_16x=True)
    assert_same_nvfp4(ours, {"weight": qdata, "weight_scale": blocked, "weight_scale_2": ours["weight_scale_2"]})
    assert_same_nvfp4(NVFP4().quantize(weight), ours)
    decoded = ck.dequantize_nvfp4(qdata, ours["weight_scale_2"], blocked, torch.float32)
    assert float((decoded - weight.float()).norm() / weight.float().norm()) < 0.15


# --- FP8: ComfyUI's own layout (comfy/quant_ops.py), so these need the ComfyUI runtime ---------------------------


def comfy_fp8(comfyui, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ComfyUI stores for this weight in format float8_e4m3fn (comfy.ops set_weight: scale="recalculate")."""
    qdata, params = comfyui.quant_ops.TensorCoreFP8E4M3Layout.quantize(weight, scale="recalculate")
    return {"weight": qdata, "weight_scale": params.scale}


def assert_same_fp8(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str = "") -> None:
    assert torch.equal(ours["weight"].view(torch.uint8), theirs["weight"].view(torch.uint8)), what
    assert ours["weight_scale"].dtype == torch.float32 and ours["weight_scale"].shape == ()
    assert torch.equal(ours["weight_scale"], theirs["weight_scale"].reshape(())), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats", STATISTICS)
def test_fp8_bytes_equal_comfyuis(comfyui, stats: str, dtype: str) -> None:
    weight = STATISTICS[stats].to(DTYPES[dtype])
    theirs = comfy_fp8(comfyui, weight)
    assert_same_fp8(encode_fp8(weight), theirs)
    assert_same_fp8(encode_fp8(weight, chunk_rows=7), theirs)
    assert_same_fp8(FP8E4M3().quantize(weight), theirs)


def test_fp8_data_is_comfy_kitchens_for_the_scale_written() -> None:
    # without ComfyUI: whatever the scale, the FP8 values are comfy-kitchen's quantize_per_tensor_fp8 of the weight
    for dtype in DTYPES.values():
        for stats, values in STATISTICS.items():
            weight = values.to(dtype)
            ours = encode_fp8(weight)
            theirs = ck.quantize_per_tensor_fp8(weight, ours["weight_scale"], torch.float8_e4m3fn)
            assert torch.equal(ours["weight"].view(torch.uint8), theirs.view(torch.uint8)), (stats, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_all_zero_weight(comfyui, dtype: str) -> None:
    weight = torch.zeros(16, 48, dtype=DTYPES[dtype])
    theirs = comfy_fp8(comfyui, weight)
    ours = encode_fp8(weight)
    assert not ours["weight"].float().isnan().any()
    if DTYPES[dtype] == torch.float16:  # ComfyUI's reciprocal clamp gives a finite scale: nothing to deviate from
        assert_same_fp8(ours, theirs)
    else:  # ComfyUI: scale 0, every element 0 * (1/0) = NaN; nvdiag: 1.0, exact zeros
        assert float(theirs["weight_scale"]) == 0.0 and theirs["weight"].float().isnan().all()
        assert float(ours["weight_scale"]) == 1.0 and not ours["weight"].float().any()


# --- convert: every quantized layer of a BF16 or F16 source is what ComfyUI makes of the same tensor -------------

VARIANT = "wan2.2-ti2v-5b"
PRESET = """name = "bf16-source"
default = "keep"

[[rules]]
match = "*"
ndim = 1
format = "f32"

[[rules]]
regex = '^blocks\\.\\d+\\.ffn\\.'
format = "fp8"

[[rules]]
regex = '^blocks\\.\\d+\\.(self_attn|cross_attn)\\.'
format = "nvfp4"
"""


@pytest.fixture(scope="module", params=["bf16", "f16"])
def converted(request, tmp_path_factory) -> tuple[torch.dtype, Path]:
    dtype = DTYPES[request.param]
    folder = tmp_path_factory.mktemp(f"{request.param}-source")
    src = write_float(folder / "src.safetensors", VARIANT, dtype=dtype)
    preset = folder / "preset.toml"
    preset.write_text(PRESET)
    out = folder / "out.safetensors"
    result = convert(src, out, str(preset))
    assert result.written and not result.refused, result.gate
    return dtype, out


def quantized_layers(path: Path) -> dict[str, str]:
    """Base name -> comfy_quant format of every quantized layer in the written file."""
    import json

    with safe_open(str(path), "pt") as f:
        return {key[: -len(".comfy_quant")]: json.loads(f.get_tensor(key).numpy().tobytes())["format"]
                for key in f.keys() if key.endswith(".comfy_quant")}


def test_convert_nvfp4_layers_equal_comfy_kitchens_from_the_same_source_tensor(converted) -> None:
    dtype, out = converted
    source = float_state_dict(VARIANT, dtype=dtype)  # the values the source file holds, native names
    layers = [name for name, fmt in quantized_layers(out).items() if fmt == "nvfp4"]
    assert len(layers) >= 8
    with safe_open(str(out), "pt") as f:
        for name in layers:
            stored = {role: f.get_tensor(f"{name}.{role}") for role in ("weight", "weight_scale", "weight_scale_2")}
            assert_same_nvfp4(stored, comfy_nvfp4(source[f"{name}.weight"]), name)


def test_convert_fp8_layers_equal_comfyuis_from_the_same_source_tensor(comfyui, converted) -> None:
    dtype, out = converted
    source = float_state_dict(VARIANT, dtype=dtype)
    layers = [name for name, fmt in quantized_layers(out).items() if fmt == "float8_e4m3fn"]
    assert layers
    with safe_open(str(out), "pt") as f:
        for name in layers:
            stored = {role: f.get_tensor(f"{name}.{role}") for role in ("weight", "weight_scale")}
            assert_same_fp8(stored, comfy_fp8(comfyui, source[f"{name}.weight"]), name)
