"""GGUF tensor types: one format per GGML type, quantize/dequantize through gguf-py on raw uint8 blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from reference_specs import formats


def weight(rows: int = 8, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("slug", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32", "F64"])
def test_roundtrip(slug: str) -> None:
    fmt = formats.get(slug)()
    w = weight()
    stored = fmt.quantize(w)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[slug]]
    assert stored["weight"].dtype == torch.uint8
    assert stored["weight"].shape == (8, 512 // block_size * type_size)
    decoded = fmt.dequantize(stored, (8, 512))
    assert decoded.dtype == torch.float32 and decoded.shape == (8, 512)
    assert float((decoded - w).norm() / w.norm()) <= fmt.typical_rel_error + 1e-7


def test_quantize_is_gguf_py_bit_for_bit() -> None:
    w = weight()
    ours = formats.get("Q4_0")().quantize(w)["weight"].numpy()
    theirs = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("slug", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_quants_dequantize_like_gguf_py_and_refuse_to_quantize(slug: str) -> None:
    qtype = GGMLQuantizationType[slug]
    _, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(4, 2 * type_size), dtype=np.uint8)
    # random bytes may hold NaN/Inf f16 super-block scales: compared with equal_nan
    expected = gguf_quants.dequantize(raw, qtype)
    ours = formats.get(slug)().dequantize({"weight": torch.from_numpy(raw)}, (4, 512))
    assert np.array_equal(ours.numpy(), expected.astype(np.float32), equal_nan=True)
    with pytest.raises(NotImplementedError, match="dequantize only"):
        formats.get(slug)().quantize(weight(4, 512))


def test_raw_bytes_in_any_container_dtype_and_3d_shapes() -> None:
    fmt = formats.get("F16")()
    w = weight(2, 32).reshape(2, 2, 16)
    half = w.to(torch.float16)
    assert torch.equal(fmt.dequantize({"weight": half}, (2, 2, 16)), half.to(torch.float32))
    bf = formats.get("BF16")()
    assert torch.equal(bf.dequantize({"weight": w.to(torch.bfloat16)}, (2, 2, 16)), w.to(torch.bfloat16).float())


def test_wrong_byte_count_and_row_size_are_value_errors() -> None:
    fmt = formats.get("Q8_0")()
    with pytest.raises(ValueError, match="bytes stored"):
        fmt.dequantize({"weight": torch.zeros(10, dtype=torch.uint8)}, (1, 32))
    with pytest.raises(ValueError, match="block size"):
        fmt.quantize(weight(2, 40))


def test_quantized_flags() -> None:
    assert formats.get("Q4_0").quantized and formats.get("Q6_K").quantized
    assert not formats.get("F16").quantized and not formats.get("BF16").quantized and not formats.get("F32").quantized
