"""GGUF fixtures follow city96's type selection (shared/research/peers.md C) and decode through gguf-py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from inspect_tools.synthetic import city96_type, float_state_dict
from inspect_tools.synthetic.kquants import quantize_k

WAN = "wan2.2-ti2v-5b"


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_q4_0_file_types(wan_gguf_q4_0: Path) -> None:
    types = types_of(wan_gguf_q4_0)
    assert types["blocks.0.self_attn.q.weight"] == "Q4_0"
    assert types["blocks.0.self_attn.v.weight"] == "Q4_0"  # no v bump for Q4_0
    assert types["blocks.0.ffn.2.weight"] == "Q4_1"  # ffn down bumped
    assert types["blocks.0.modulation"] == "F32"  # WAN high-precision key
    assert types["blocks.0.self_attn.q.bias"] == "F32" and types["blocks.0.norm3.weight"] == "F32"  # 1-D
    assert types["head.head.weight"] == "F16" and types["text_embedding.0.weight"] == "F16"  # skip groups
    assert "patch_embedding.weight" not in types and "patch_embedding.bias" in types  # 5-D left out


def test_q5_k_m_file_types(wan_gguf_q5_k_m: Path) -> None:
    types = types_of(wan_gguf_q5_k_m)
    assert types["blocks.1.self_attn.q.weight"] == "Q5_K"
    assert types["blocks.1.cross_attn.v.weight"] == "Q6_K"
    assert types["blocks.1.ffn.2.weight"] == "Q6_K"
    assert types["time_projection.1.weight"] == "F16"


@pytest.mark.parametrize(
    "family, key, shape, qtype, expected",
    [
        ("wan", "blocks.0.ffn.0.weight", (512, 384), "Q5_K_M", "F16"),  # 384 % 256: K-quant fallback
        ("wan", "blocks.0.ffn.0.weight", (512, 384), "Q4_0", "Q4_0"),  # 384 % 32 == 0
        ("flux", "double_blocks.0.img_attn.qkv.weight", (768, 256), "Q5_K_M", "Q6_K"),  # fused qkv bump
        ("flux", "double_blocks.0.img_attn.qkv.weight", (768, 256), "Q4_K_M", "Q5_K"),
        ("flux", "img_in.weight", (256, 64), "Q4_0", "F16"),  # detection-critical skip group
        ("qwen_image", "transformer_blocks.0.attn.to_v.weight", (256, 256), "Q5_K_M", "Q6_K"),
        ("qwen_image", "proj_out.weight", (64, 256), "Q4_0", "F16"),
        ("wan", "blocks.0.self_attn.q.weight", (256, 256), "F16", "F16"),
        ("wan", "blocks.0.self_attn.q.weight", (32, 32), "Q4_0", "F32"),  # <= 1024 elements
        ("wan", "blocks.0.self_attn.q.weight", (256, 256), "Q4_0", "Q4_0"),
    ],
)
def test_city96_selection(family: str, key: str, shape: tuple[int, ...], qtype: str, expected: str) -> None:
    assert city96_type(family, key, shape, qtype) == expected


def test_bf16_sources_keep_bf16_for_unquantized() -> None:
    assert city96_type("wan", "head.head.weight", (192, 256), "Q4_0", torch.bfloat16) == "BF16"


def test_gguf_shapes_are_reversed_and_values_decode(wan_gguf_q5_k_m: Path) -> None:
    source = float_state_dict(WAN)
    for tensor in gguf.GGUFReader(str(wan_gguf_q5_k_m)).tensors:
        expected = source[tensor.name].numpy()
        assert tuple(int(d) for d in reversed(tensor.shape)) == expected.shape
        decoded = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        bound = {"Q5_K": 0.08, "Q6_K": 0.05}.get(tensor.tensor_type.name, 1e-3)
        assert np.linalg.norm(decoded - expected) <= bound * np.linalg.norm(expected), tensor.name


@pytest.mark.parametrize("qtype, bound", [("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.035)])
def test_k_quant_encoder_is_read_back_by_gguf_py(qtype: str, bound: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    x[:, 7] *= 30  # an outlier column
    x[1] = 0.0  # an all-zero row must not produce NaN
    blocks = quantize_k(x, qtype)
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    assert np.isfinite(decoded).all() and not decoded[1].any()
    assert np.linalg.norm(decoded - x) <= bound * np.linalg.norm(x)
