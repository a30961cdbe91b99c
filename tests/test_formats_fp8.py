"""Per-tensor FP8 codecs (comfy_quant float8_e4m3fn / float8_e5m2, legacy scaled_fp8, fast encode_fp8) against
comfy-kitchen's quantize_per_tensor_fp8 / dequantize_per_tensor_fp8 (test-only oracle)."""

from __future__ import annotations

import comfy_kitchen as ck
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reference_specs.formats.fast_encode import encode_fp8
from reference_specs.formats.fp8 import FP8E4M3, FP8E5M2
from reference_specs.formats.scaled_fp8 import ScaledFP8

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FORMATS = {"e4m3": (FP8E4M3, torch.float8_e4m3fn), "e5m2": (FP8E5M2, torch.float8_e5m2)}


def weight_with_outliers(rows: int = 48, cols: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    w[3, 7] = 40.0
    return w


@pytest.mark.parametrize("name", FORMATS)
def test_quantize_matches_comfy_kitchen(name: str) -> None:
    fmt, dtype = FORMATS[name]
    weight = weight_with_outliers()
    ours = fmt().quantize(weight)
    assert ours["weight"].dtype == dtype and ours["weight_scale"].shape == ()
    theirs = ck.quantize_per_tensor_fp8(weight, ours["weight_scale"], dtype)
    assert torch.equal(ours["weight"].view(torch.uint8), theirs.view(torch.uint8))
    decoded = fmt().dequantize(ours, tuple(weight.shape))
    assert torch.equal(decoded, ck.dequantize_per_tensor_fp8(ours["weight"], ours["weight_scale"], torch.float32))
    assert float((decoded - weight).norm() / weight.norm()) < fmt.typical_rel_error


@pytest.mark.parametrize("name", FORMATS)
def test_a_small_given_scale_clamps_like_comfy_kitchen(name: str) -> None:
    fmt, dtype = FORMATS[name]
    weight = weight_with_outliers()
    scale = torch.tensor(0.001)  # far too small: most values saturate at +-fp8_max
    ours = fmt().quantize(weight, scale)
    theirs = ck.quantize_per_tensor_fp8(weight, scale, dtype)
    assert torch.equal(ours["weight"].view(torch.uint8), theirs.view(torch.uint8))
    assert not ours["weight"].to(torch.float32).isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FORMATS)
def test_fast_encoder_matches_reference(name: str, device: str) -> None:
    fmt, dtype = FORMATS[name]
    for weight in (weight_with_outliers(), weight_with_outliers(17, 33).to(torch.bfloat16), torch.zeros(4, 8)):
        reference = fmt().quantize(weight)
        for chunk_rows in (None, 5):
            fast = encode_fp8(weight, dtype=dtype, device=device, chunk_rows=chunk_rows)
            assert torch.equal(fast["weight"].view(torch.uint8), reference["weight"].view(torch.uint8))
            assert torch.equal(fast["weight_scale"], reference["weight_scale"])


def test_all_zero_weight_gets_scale_one() -> None:
    stored = FP8E4M3().quantize(torch.zeros(8, 8))
    assert float(stored["weight_scale"]) == 1.0
    assert torch.equal(FP8E4M3().dequantize(stored, (8, 8)), torch.zeros(8, 8))


def test_legacy_scaled_fp8_is_the_same_arithmetic_under_other_names() -> None:
    weight = weight_with_outliers()
    legacy = ScaledFP8().quantize(weight)
    comfy = FP8E4M3().quantize(weight)
    assert set(legacy) == {"weight", "scale_weight"}
    assert torch.equal(legacy["weight"].view(torch.uint8), comfy["weight"].view(torch.uint8))
    assert torch.equal(ScaledFP8().dequantize(legacy, (48, 80)), FP8E4M3().dequantize(comfy, (48, 80)))
    # raw bytes (as some readers hand them over) decode the same
    raw = {"weight": legacy["weight"].view(torch.uint8), "scale_weight": legacy["scale_weight"]}
    assert torch.equal(ScaledFP8().dequantize(raw, (48, 80)), ScaledFP8().dequantize(legacy, (48, 80)))


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 40)), elements=st.floats(-1e6, 1e6, width=32)))
def test_property_fast_reference_and_comfy_kitchen_agree(values: np.ndarray) -> None:
    weight = torch.from_numpy(values.copy())
    reference = FP8E4M3().quantize(weight)
    fast = encode_fp8(weight, chunk_rows=3)
    theirs = ck.quantize_per_tensor_fp8(weight, reference["weight_scale"], torch.float8_e4m3fn)
    assert torch.equal(fast["weight"].view(torch.uint8), reference["weight"].view(torch.uint8))
    assert torch.equal(reference["weight"].view(torch.uint8), theirs.view(torch.uint8))
