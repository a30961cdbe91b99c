"""The lossless remedies of `nvdiag fix`, one per cause, on tensors made by the reference NVFP4 codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_kitchen.float_utils import swap_nibbles as ck_swap_nibbles
from comfy_kitchen.float_utils import to_blocked as ck_to_blocked

from converter import remedies
from reference_specs.formats.nvfp4 import NVFP4, reswizzle_block_scales, unswizzle


def _good(out_f: int = 200, in_f: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return NVFP4().quantize(torch.randn(out_f, in_f, generator=gen))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_reswizzle_restores_padded_linear_scales_bit_for_bit():
    good = _good()
    linear = unswizzle(good["weight_scale"])  # what a writer that forgot to swizzle stores
    fixed = reswizzle_block_scales(linear, tuple(good["weight"].shape))
    assert fixed.dtype == torch.float8_e4m3fn and fixed.shape == good["weight_scale"].shape
    assert _bytes(fixed) == _bytes(good["weight_scale"])


def test_reswizzle_pads_an_unpadded_linear_matrix_like_comfy_kitchen():
    good = _good(out_f=200, in_f=96)
    linear = unswizzle(good["weight_scale"])[:200, : 96 // 16]  # [out, in/16], no padding at all
    fixed = reswizzle_block_scales(linear, tuple(good["weight"].shape))
    assert _bytes(fixed) == _bytes(good["weight_scale"])
    oracle = ck_to_blocked(linear.to(torch.float32), flatten=False).to(torch.float8_e4m3fn)
    assert _bytes(fixed) == _bytes(oracle.reshape(fixed.shape))


def test_reswizzle_keeps_u8_storage():
    good = _good()
    linear = unswizzle(good["weight_scale"]).view(torch.uint8)
    fixed = reswizzle_block_scales(linear, tuple(good["weight"].shape))
    assert fixed.dtype == torch.uint8 and _bytes(fixed) == _bytes(good["weight_scale"])


def test_reswizzle_refuses_scales_larger_than_the_weight_allows():
    good = _good()
    too_big = torch.zeros(512, 64, dtype=torch.float8_e4m3fn)
    try:
        reswizzle_block_scales(too_big, tuple(good["weight"].shape))
    except ValueError as exc:
        assert "do not fit" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_swap_nibbles_matches_comfy_kitchen_and_is_its_own_inverse():
    good = _good()
    low_first = ck_swap_nibbles(good["weight"])
    assert torch.equal(remedies.swap_nibbles(low_first), good["weight"])
    assert torch.equal(remedies.swap_nibbles(good["weight"]), low_first)


def real_looking_amax(n: int, seed: int = 0) -> np.ndarray:
    """float32 max |w| of real weight tensors: log-uniform from 1e-3 to 1e2."""
    return (10.0 ** np.random.default_rng(seed).uniform(-3.0, 2.0, n)).astype(np.float32)


def f32_quotient(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """a / b rounded once to float32, computed two independent ways that must agree: an IEEE float32 division, and
    a float64 division rounded to float32 (float64 holds more than twice float32's bits: no double-rounding error)."""
    in32 = np.float32(a) / np.float32(b)
    in64 = (np.float64(np.float32(a)) / np.float64(np.float32(b))).astype(np.float32)
    assert np.array_equal(in32.view(np.int32), in64.view(np.int32))
    return in32


def ulps(a: torch.Tensor, b: np.float32) -> int:
    return abs(int(a.to(torch.float32).reshape(1).view(torch.int32)) - int(np.float32(b).view(np.int32)))


def check_inversions(stored: np.ndarray, wanted: np.ndarray, divisors: tuple[float, ...]) -> tuple[int, int]:
    """Invert every stored reciprocal; 'exact' must be bit-exact, 'within N ulp' must hold. (exact, not exact)."""
    exact = 0
    for r, s in zip(stored, wanted, strict=True):
        inverted = remedies.invert_reciprocal_scale(torch.tensor(r), divisors)
        assert inverted.value.dtype == torch.float32 and inverted.value.shape == ()
        if inverted.exact:
            exact += 1
            assert ulps(inverted.value, s) == 0, (float(r), float(s), float(inverted.value))
        else:
            assert "not exact" in inverted.note and f"within {inverted.ulps} ulp" in inverted.note
            assert ulps(inverted.value, s) <= inverted.ulps
    return exact, len(stored) - exact


def test_a_reciprocal_2688_over_amax_is_called_exact_only_when_it_is():
    # the real fault: a global scale 2688/amax stored where ComfyUI wants amax/2688 (issue 15: 2594 of 20000 such
    # values were called exact although 1 ulp off)
    amax = real_looking_amax(4000)
    stored, wanted = f32_quotient(2688.0, amax), f32_quotient(amax, 2688.0)
    for divisors in (remedies.RECIPROCAL_DIVISORS, (remedies.NVFP4_DIVISOR,)):
        exact, inexact = check_inversions(stored, wanted, divisors)
        assert exact and inexact  # both outcomes occur on real values: neither is vacuous


def test_a_reciprocal_of_an_fp8_scale_is_called_exact_only_when_it_is():
    amax = real_looking_amax(2000, seed=1)
    stored, wanted = f32_quotient(448.0, amax), f32_quotient(amax, 448.0)
    for divisors in (remedies.RECIPROCAL_DIVISORS, (remedies.FP8_DIVISOR,)):
        exact, inexact = check_inversions(stored, wanted, divisors)
        assert exact and inexact


def test_a_reciprocal_1_over_scale_is_called_exact_only_when_it_is():
    # nvdiag's synthetic fault: the float32 reciprocal of the scale the encoder used
    scale = f32_quotient(real_looking_amax(2000, seed=2), 2688.0)
    exact, inexact = check_inversions(f32_quotient(1.0, scale), scale, remedies.RECIPROCAL_DIVISORS)
    assert exact and inexact


def test_the_preimage_search_is_wide_enough():
    for r in f32_quotient(2688.0, real_looking_amax(300, seed=3)):
        r = torch.tensor(r)
        assert torch.equal(remedies.reciprocal_origins(r), remedies.reciprocal_origins(r, steps=16))


def test_a_value_no_float32_arithmetic_makes_is_not_exact():
    # r such that no float32 s has float32(1/s) == r and no float32 amax has float32(D/amax) == r: found by search
    for r in f32_quotient(2688.0, real_looking_amax(2000, seed=4)).view(np.int32) + 1:
        stored = torch.tensor(np.int32(r).view(np.float32))
        if remedies.reciprocal_origins(stored).numel() == 0:
            inverted = remedies.invert_reciprocal_scale(stored)
            assert not inverted.exact and inverted.ulps == -1 and "no float32" in inverted.note
            return
    pytest.skip("every value searched has a float32 origin")


def test_invert_reciprocal_scale_rejects_non_positive_values():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        try:
            remedies.invert_reciprocal_scale(torch.tensor(bad))
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_cast_block_scale_back_to_fp8_only_when_exact():
    good = _good()["weight_scale"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        widened = good.to(dtype)
        fixed = remedies.cast_block_scale_to_fp8(widened)
        assert fixed is not None and _bytes(fixed) == _bytes(good)
    not_fp8 = good.to(torch.float32) * 1.01
    assert remedies.cast_block_scale_to_fp8(not_fp8) is None


def test_widen_scale_to_f32_is_exact():
    scale_2 = _good()["weight_scale_2"].to(torch.bfloat16)
    widened = remedies.widen_scale_to_f32(scale_2)
    assert widened.dtype == torch.float32 and float(widened) == float(scale_2)


def test_marker_tensor_is_comfyui_json_bytes():
    t = remedies.marker_tensor(remedies.NVFP4_MARKER)
    assert t.dtype == torch.uint8 and t.numpy().tobytes() == b'{"format": "nvfp4"}'


def test_marker_for_recognises_formats_only_from_consistent_tensors():
    good = _good(200, 96)
    shape_w, shape_s = tuple(good["weight"].shape), tuple(good["weight_scale"].shape)
    roles = {"weight", "weight_scale", "weight_scale_2"}
    assert remedies.marker_for("U8", roles, shape_w, shape_s) == {"format": "nvfp4"}
    assert remedies.marker_for("U8", roles, shape_w, (200, 6)) is None  # linear-shaped scales: not certain
    assert remedies.marker_for("U8", {"weight", "weight_scale"}, shape_w, shape_s) is None
    assert remedies.marker_for("F8_E4M3", {"weight", "weight_scale"}, (64, 64), ()) == {"format": "float8_e4m3fn"}
    assert remedies.marker_for("BF16", {"weight"}, (64, 64), None) is None


def test_prefix_rewrite_of_metadata_names():
    layers = {"blocks.0.ffn.0", "blocks.0.ffn.2"}
    assert remedies.strip_or_add_prefix(["diffusion_model.blocks.0.ffn.0", "diffusion_model.blocks.0.ffn.2"],
                                        layers) == {
        "diffusion_model.blocks.0.ffn.0": "blocks.0.ffn.0",
        "diffusion_model.blocks.0.ffn.2": "blocks.0.ffn.2",
    }
    prefixed = {"net.blocks.0.ffn.0"}
    assert remedies.strip_or_add_prefix(["blocks.0.ffn.0"], prefixed) == {"blocks.0.ffn.0": "net.blocks.0.ffn.0"}
    assert remedies.strip_or_add_prefix(["x.blocks.0.ffn.0", "other.thing"], layers) is None
