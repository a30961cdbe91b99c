"""NVFP4 codecs: the reference (formats/nvfp4.py), the fast encoder (formats/fast_encode.py) and comfy-kitchen
(used here only as an independent oracle) must produce the same bytes for the same per-tensor scale."""

from __future__ import annotations

import comfy_kitchen as ck
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reference_specs.formats.compressed_tensors import NVFP4CompressedTensors
from reference_specs.formats.fast_encode import encode_nvfp4, swizzle_tiles
from reference_specs.formats.nvfp4 import NVFP4, pad_to, swizzle, unswizzle

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def structured_weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    """Per-input-channel magnitudes spread over decades, plus a few outlier columns, as in real Linear weights."""
    g = torch.Generator().manual_seed(seed)
    column_scale = torch.exp(torch.randn(cols, generator=g) * 1.5)
    column_scale[torch.randint(0, cols, (3,), generator=g)] *= 100.0
    return torch.randn(rows, cols, generator=g) * column_scale * 0.01


def tie_weight(rows: int, cols: int, seed: int = 2) -> torch.Tensor:
    """With scale_2 = 1 every block has amax 6*s (s a power of two, exact in FP8), so x / s lands exactly on the
    midpoints between E2M1 steps: every element is a round-half-to-even decision."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.tensor(E2M1_MIDPOINTS)[torch.randint(0, len(E2M1_MIDPOINTS), (rows, cols // 16, 16), generator=g)]
    signs = torch.where(torch.rand(rows, cols // 16, 16, generator=g) < 0.5, -1.0, 1.0)
    block_s = 2.0 ** torch.randint(-4, 4, (rows, cols // 16, 1), generator=g).float()
    values = picks * signs
    values[..., 0] = 6.0  # fixes each block's amax at 6*s
    return (values * block_s).reshape(rows, cols)


def subnormal_scale_weight(rows: int, cols: int, seed: int = 3) -> torch.Tensor:
    """One block sets amax = 2688 (scale_2 = 1); the others are so small that their FP8 block scales are
    subnormal (< 2^-6) or round to zero, which exercises the zero-scale path with non-zero data."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.randn(rows, cols, generator=g) * (2.0 ** torch.randint(-14, -6, (rows, 1), generator=g).float())
    tiny[0, 0] = 2688.0
    tiny[1 % rows, 5 % cols] = -0.0
    return tiny


def ck_quantize(weight: torch.Tensor, scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ck.quantize_nvfp4(weight.to(torch.float32), scale_2, pad_16x=True)


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert torch.equal(a["weight"], b["weight"])
    assert torch.equal(a["weight_scale"].view(torch.uint8), b["weight_scale"].view(torch.uint8))
    assert torch.equal(a["weight_scale_2"], b["weight_scale_2"])


CASES = {
    "random": (random_weight(64, 256), None),
    "structured": (structured_weight(48, 512), None),
    "ties": (tie_weight(32, 128), torch.tensor(1.0)),
    "subnormal-scales": (subnormal_scale_weight(40, 96), torch.tensor(1.0)),
    "padded": (random_weight(130, 200), None),
    "odd-padding": (structured_weight(17, 33), None),
    "zero": (torch.zeros(16, 64), None),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_comfy_kitchen(case: str) -> None:
    weight, scale_2 = CASES[case]
    ours = NVFP4().quantize(weight, scale_2)
    qdata, blocked = ck_quantize(weight, ours["weight_scale_2"])
    assert torch.equal(ours["weight"], qdata)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), blocked.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_fast_encoder_matches_reference(case: str, device: str) -> None:
    weight, scale_2 = CASES[case]
    reference = NVFP4().quantize(weight, scale_2)
    for chunk_rows in (None, 1, 7):
        assert_same_bytes(encode_nvfp4(weight, scale_2, device=device, chunk_rows=chunk_rows), reference)


def test_fast_encoder_encodes_bf16_and_f16_inputs_like_the_reference() -> None:
    # the values are exact in float32; only the per-tensor scale depends on the dtype (rounded to it, as ComfyUI
    # does: tests/test_codec_matches_comfy_kitchen.py), so with that scale given both encode the float32 copy
    weight = structured_weight(32, 160)
    for dtype in (torch.bfloat16, torch.float16):
        low = weight.to(dtype)
        ours = encode_nvfp4(low, chunk_rows=5)
        assert_same_bytes(ours, NVFP4().quantize(low))
        assert_same_bytes(ours, NVFP4().quantize(low.to(torch.float32), ours["weight_scale_2"]))


def test_fast_encoder_does_not_modify_its_input() -> None:
    weight = random_weight(32, 64)
    before = weight.clone()
    encode_nvfp4(weight, chunk_rows=8)
    assert torch.equal(weight, before)


def test_dequantize_matches_comfy_kitchen() -> None:
    weight = structured_weight(100, 200)
    stored = NVFP4().quantize(weight)
    ours = NVFP4().dequantize(stored, (100, 200))
    theirs = ck.dequantize_nvfp4(stored["weight"], stored["weight_scale_2"], stored["weight_scale"], torch.float32)
    assert torch.equal(ours, theirs[:100, :200])
    assert float((ours - weight).norm() / weight.norm()) < NVFP4.typical_rel_error


def test_all_zero_weight_gets_scale_one_and_decodes_to_zeros() -> None:
    stored = encode_nvfp4(torch.zeros(20, 40))
    assert float(stored["weight_scale_2"]) == 1.0
    assert not stored["weight_scale"].to(torch.float32).isnan().any()
    assert torch.equal(NVFP4().dequantize(stored, (20, 40)), torch.zeros(20, 40))


def test_a_zero_or_non_finite_scale_is_refused() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and positive"):
            encode_nvfp4(random_weight(16, 16), torch.tensor(bad))


def test_view_swizzle_equals_index_swizzle() -> None:
    scales = torch.randn(256, 12)
    assert torch.equal(swizzle_tiles(scales), swizzle(scales))
    assert torch.equal(unswizzle(swizzle_tiles(scales)), scales)


def test_unswizzle_reads_every_scale_from_where_the_cublas_layout_puts_it() -> None:
    """Expected from the layout's formula, element by element: row r = 128*i + 32*a + b, column c = 4*j + k sits at
    tile (i, j), offset b*16 + a*4 + k, tiles row-major (cuBLAS docs, 1D block scaling factors layout)."""
    rows, cols = 256, 8
    blocked = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)  # each value names its position
    linear = unswizzle(blocked)
    for r in range(rows):
        for c in range(cols):
            i, a, b, j, k = r // 128, (r % 128) // 32, r % 32, c // 4, c % 4
            assert linear[r, c] == (i * (cols // 4) + j) * 512 + b * 16 + a * 4 + k


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 70)),
        elements=st.floats(-1e4, 1e4, width=32),
    )
)
def test_property_fast_reference_and_comfy_kitchen_agree(values: np.ndarray) -> None:
    weight = torch.from_numpy(values.copy())
    reference = NVFP4().quantize(weight)
    assert_same_bytes(encode_nvfp4(weight, chunk_rows=3), reference)
    qdata, blocked = ck_quantize(weight, reference["weight_scale_2"])
    assert torch.equal(reference["weight"], qdata)
    assert torch.equal(reference["weight_scale"].view(torch.uint8), blocked.view(torch.uint8))


def test_compressed_tensors_roundtrip_and_relation_to_comfy_layout() -> None:
    weight = structured_weight(48, 96)
    ct = NVFP4CompressedTensors().quantize(weight)
    assert ct["weight_packed"].shape == (48, 48)
    assert ct["weight_scale"].shape == (48, 6)
    assert ct["weight_global_scale"].shape == (1,)
    decoded = NVFP4CompressedTensors().dequantize(ct, (48, 96))
    assert float((decoded - weight).norm() / weight.norm()) < NVFP4CompressedTensors.typical_rel_error

    # The same data in ComfyUI's layout: swap the nibbles, swizzle the scales, invert the global scale.
    comfy = NVFP4().quantize(weight, 1.0 / ct["weight_global_scale"])
    packed = ct["weight_packed"]
    assert torch.equal(comfy["weight"], (packed << 4) | (packed >> 4))
    linear = pad_to(ct["weight_scale"].view(torch.uint8), 128, 8)
    assert torch.equal(comfy["weight_scale"].view(torch.uint8), swizzle(linear))
