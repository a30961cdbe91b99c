"""verify's baseline is comfy-kitchen's own NVFP4 encoding of the reference (inspect_tools.comfyui.reference). It
calls comfy-kitchen on row slices of whole scale tiles, 16-bit weights as float32 with the scale ComfyUI gives them,
which is much faster: here those shortcuts are held to the plain call, TensorCoreNVFP4Layout.quantize on the whole
weight in its own dtype, byte for byte."""

from __future__ import annotations

import comfy_kitchen as ck
import pytest
import torch
from comfy_kitchen.tensor import TensorCoreNVFP4Layout

from inspect_tools.comfyui.reference import _nvfp4_encode, _squared_error

STATISTICS = {
    "gaussian": lambda g: torch.randn(256, 320, generator=g),
    "uniform": lambda g: torch.rand(256, 320, generator=g) * 2 - 1,
    "heavy-tailed": lambda g: torch.randn(256, 320, generator=g) / torch.randn(256, 320, generator=g).abs().clamp(0.05),
    "per-row gains": lambda g: torch.randn(256, 320, generator=g) * torch.logspace(-4, 1, 256)[:, None],
    "padded shape": lambda g: torch.randn(100, 72, generator=g),
    "several row tiles, padded": lambda g: torch.randn(300, 72, generator=g),
    "wide rows, one per call": lambda g: torch.randn(260, 8200, generator=g),
    "tiny (F16 scale underflows)": lambda g: torch.randn(64, 64, generator=g) * 1e-4,
    "all zero": lambda g: torch.zeros(32, 64),
}


def plain(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    qdata, params = TensorCoreNVFP4Layout.quantize(weight)
    scale = params.scale.reshape(())
    decoded = ck.dequantize_nvfp4(qdata, scale, params.block_scale, output_type=torch.float32)
    return {"weight": qdata, "weight_scale": params.block_scale, "weight_scale_2": scale}, decoded


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("calls", ["default slices", "one scale tile a call"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("stat", STATISTICS)
def test_the_baseline_encoding_is_comfy_kitchens_plain_call_byte_for_byte(stat: str, dtype: torch.dtype, calls: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect_tools.comfyui.reference as reference

    if calls == "one scale tile a call":
        monkeypatch.setattr(reference, "CK_CHUNK_ELEMENTS", 1)  # 128 rows a call, the last one shorter
    weight = STATISTICS[stat](torch.Generator().manual_seed(3)).to(dtype)
    tensors, decoded = _nvfp4_encode(weight)
    expected, expected_decoded = plain(weight)
    for role in ("weight", "weight_scale", "weight_scale_2"):
        assert same(tensors[role].contiguous(), expected[role].contiguous()), role
    rows, cols = weight.shape
    assert same(decoded.contiguous(), expected_decoded[:rows, :cols].contiguous())


def test_squared_errors_in_chunks_are_the_whole_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect_tools.comfyui.reference as reference

    g = torch.Generator().manual_seed(4)
    w, decoded = torch.randn(300, 70, generator=g), torch.randn(300, 70, generator=g)
    whole = (float((decoded.double() - w.double()).square().sum()), float(w.double().square().sum()))
    monkeypatch.setattr(reference, "ERROR_CHUNK_ELEMENTS", 7 * 70)  # 7 rows a chunk, the last one shorter
    assert _squared_error(decoded, w) == pytest.approx(whole, rel=1e-12)
