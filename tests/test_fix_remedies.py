"""The lossless remedies of `nvdiag fix`, one per cause, on tensors made by the reference NVFP4 codec."""

from __future__ import annotations

import torch
from comfy_kitchen.float_utils import swap_nibbles as ck_swap_nibbles
from comfy_kitchen.float_utils import to_blocked as ck_to_blocked

from converter import remedies
from reference_specs.formats.nvfp4 import NVFP4, unswizzle


def _good(out_f: int = 200, in_f: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return NVFP4().quantize(torch.randn(out_f, in_f, generator=gen))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_reswizzle_restores_padded_linear_scales_bit_for_bit():
    good = _good()
    linear = unswizzle(good["weight_scale"])  # what a writer that forgot to swizzle stores
    fixed = remedies.reswizzle_block_scales(linear, tuple(good["weight"].shape))
    assert fixed.dtype == torch.float8_e4m3fn and fixed.shape == good["weight_scale"].shape
    assert _bytes(fixed) == _bytes(good["weight_scale"])


def test_reswizzle_pads_an_unpadded_linear_matrix_like_comfy_kitchen():
    good = _good(out_f=200, in_f=96)
    linear = unswizzle(good["weight_scale"])[:200, : 96 // 16]  # [out, in/16], no padding at all
    fixed = remedies.reswizzle_block_scales(linear, tuple(good["weight"].shape))
    assert _bytes(fixed) == _bytes(good["weight_scale"])
    oracle = ck_to_blocked(linear.to(torch.float32), flatten=False).to(torch.float8_e4m3fn)
    assert _bytes(fixed) == _bytes(oracle.reshape(fixed.shape))


def test_reswizzle_keeps_u8_storage():
    good = _good()
    linear = unswizzle(good["weight_scale"]).view(torch.uint8)
    fixed = remedies.reswizzle_block_scales(linear, tuple(good["weight"].shape))
    assert fixed.dtype == torch.uint8 and _bytes(fixed) == _bytes(good["weight_scale"])


def test_reswizzle_refuses_scales_larger_than_the_weight_allows():
    good = _good()
    too_big = torch.zeros(512, 64, dtype=torch.float8_e4m3fn)
    try:
        remedies.reswizzle_block_scales(too_big, tuple(good["weight"].shape))
    except ValueError as exc:
        assert "do not fit" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_swap_nibbles_matches_comfy_kitchen_and_is_its_own_inverse():
    good = _good()
    low_first = ck_swap_nibbles(good["weight"])
    assert torch.equal(remedies.swap_nibbles(low_first), good["weight"])
    assert torch.equal(remedies.swap_nibbles(good["weight"]), low_first)


def test_invert_reciprocal_scale_recovers_the_decode_multiplier_exactly():
    exact = 0
    for seed in range(50):
        scale_2 = _good(32, 32, seed)["weight_scale_2"]
        broken = torch.tensor(1.0, dtype=torch.float32) / scale_2
        inverted = remedies.invert_reciprocal_scale(broken)
        assert inverted.value.dtype == torch.float32 and inverted.value.shape == ()
        if inverted.exact:
            exact += 1
            assert _bytes(inverted.value) == _bytes(scale_2)
        else:
            assert "not exact" in inverted.note
            assert abs(float(inverted.value) - float(scale_2)) <= 2 * torch.finfo(torch.float32).eps * float(scale_2)
    assert exact >= 25  # most float32 reciprocals have a single preimage


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
