"""The bar a written file is measured against never comes from the encoder that wrote it.

convert writes with the fast chunked encoder (reference_specs/formats/fast_encode.py). If that encoder breaks (here:
patched where it lives to pack the low nibble first, or to store linear block scales), the gate and roundtrip must
still see it: their baseline is the reference codec, and a format's error ceiling (from its number grid alone)
caps what any correct encoding can err. comfy-kitchen, ComfyUI's own codec, is the independent witness.
"""

from __future__ import annotations

import comfy_kitchen as ck
import pytest
import torch

from converter.pipeline import convert
from inspect_tools.roundtrip import run_roundtrip
from inspect_tools.synthetic import write_float
from reference_specs.formats import fast_encode
from reference_specs.formats.fp8 import FP8E4M3
from reference_specs.formats.nvfp4 import NVFP4, pad_to, roundup, unswizzle

REAL_ENCODER = fast_encode.encode_nvfp4


def low_nibble_first(weight, scale_2=None, device="cpu", chunk_rows=None, **options):
    out = REAL_ENCODER(weight, scale_2, device, chunk_rows, **options)
    packed = out["weight"]
    out["weight"] = (packed << 4) | (packed >> 4)
    return out


def linear_block_scales(weight, scale_2=None, device="cpu", chunk_rows=None, **options):
    out = REAL_ENCODER(weight, scale_2, device, chunk_rows, **options)
    out["weight_scale"] = unswizzle(out["weight_scale"])  # same shape, row-major bytes: what a torchao writer does
    return out


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory):
    return write_float(tmp_path_factory.mktemp("wan") / "src", "wan2.2-ti2v-5b", naming="diffusers", sharded=2)


@pytest.mark.parametrize("broken", [low_nibble_first, linear_block_scales])
def test_convert_refuses_what_a_broken_fast_encoder_writes(wan_src, tmp_path, monkeypatch, broken) -> None:
    monkeypatch.setattr(fast_encode, "encode_nvfp4", broken)
    out = tmp_path / "out.safetensors"
    result = convert(wan_src, out, "wan2.2-ti2v-5b")
    assert result.refused and not out.exists()
    worst = max(result.gate.layer_errors.values(), key=lambda e: e["rel_error"])
    assert worst["rel_error"] > 1.5 * worst["baseline"]


def test_roundtrip_baseline_is_not_the_broken_encoders(wan_src, tmp_path, monkeypatch) -> None:
    """A file written by the broken encoder (no gate) is far above expected under a roundtrip run with the same
    broken encoder installed: its baseline comes from the reference codec once the encoder disagrees with it."""
    good = tmp_path / "good.safetensors"
    convert(wan_src, good, "wan2.2-ti2v-5b")
    monkeypatch.setattr(fast_encode, "encode_nvfp4", low_nibble_first)
    result = run_roundtrip(good, wan_src)
    assert result.findings == []  # the right file stays right: the bar did not move
    baselines = [r.baseline for r in result.layers if r.baseline is not None]
    assert baselines and max(baselines) < 0.2  # NVFP4's own error, not the broken encoder's ~1.4


STATISTICS = {
    "gaussian": lambda g: torch.randn(256, 320, generator=g),
    "uniform": lambda g: torch.rand(256, 320, generator=g) * 2 - 1,
    "student-t": lambda g: torch.randn(256, 320, generator=g) / torch.sqrt((torch.randn(3, 256, 320, generator=g) ** 2)
                                                                       .mean(0)),
    "per-row gains": lambda g: torch.randn(256, 320, generator=g) * torch.logspace(-4, 1, 256)[:, None],
    "column outliers": lambda g: torch.randn(256, 320, generator=g) * (1 + 40 * (torch.arange(320) % 97 == 0)),
    "odd size": lambda g: torch.randn(100, 72, generator=g),
}


def comfy_kitchen_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """comfy-kitchen's own encode -> decode of `weight`, and its per-tensor scale."""
    scale = weight.abs().amax().float() / (448.0 * 6.0)
    rows, cols = roundup(weight.shape[0], 16), roundup(weight.shape[1], 16)
    qdata, block = ck.quantize_nvfp4(pad_to(weight, rows, cols), scale)
    decoded = ck.dequantize_nvfp4(qdata, scale, block, output_type=torch.float32)
    return decoded[: weight.shape[0], : weight.shape[1]], scale


@pytest.mark.parametrize("stat", STATISTICS)
def test_the_ceiling_bounds_comfy_kitchen_and_catches_what_is_not_an_encoding(stat) -> None:
    weight = STATISTICS[stat](torch.Generator().manual_seed(7)).float()
    decoded, scale = comfy_kitchen_nvfp4(weight)
    ceiling = NVFP4.error_ceiling(weight, scale)
    error = float((decoded - weight).norm() / weight.norm())
    assert error <= ceiling
    swapped = decoded.reshape(weight.shape[0], -1, 2).flip(-1).reshape(weight.shape)  # neighbours exchanged
    assert float((swapped - weight).norm() / weight.norm()) > ceiling


@pytest.mark.parametrize("stat", STATISTICS)
def test_the_fp8_ceiling_bounds_comfy_kitchen(stat) -> None:
    weight = STATISTICS[stat](torch.Generator().manual_seed(8)).float()
    for source in (weight, weight.bfloat16()):
        scale = source.abs().amax().float() / 448.0
        data = ck.quantize_per_tensor_fp8(source, scale)
        decoded = ck.dequantize_per_tensor_fp8(data, scale, output_type=torch.float32)
        error = float((decoded - source.float()).norm() / source.float().norm())
        assert error <= FP8E4M3.error_ceiling(source, scale)
