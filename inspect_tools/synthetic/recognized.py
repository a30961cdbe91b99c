"""Synthetic files in the formats nvdiag recognises but does not decode (issue 16; reference_specs/formats/
recognized.py and the format modules cite the sources), each built from the public description of its layout, not
from nvdiag's code: a test that inspects them proves nvdiag names a file someone else made.

Every file holds one quantized linear (LAYER, [OUT, IN]) in its format beside a plain BF16 norm (NORM), so a test
can also check that no layer of it is left "unknown". The values are real encodings of a seeded random weight (the
code layouts inside a packed word follow the descriptions where they say it; where a runtime's kernel interleaves
codes in its own order, e.g. Nunchaku's int32 packing, only the stored shapes and dtypes are faithful).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from inspect_tools.synthetic.lightx2v import tile_layout
from inspect_tools.synthetic.writers import save_safetensors

LAYER = "blocks.0.attn.q"
NORM = "blocks.0.norm"
OUT, IN = 64, 256
RANK = 16
EXPERTS = 4


def marker(conf: dict) -> torch.Tensor:
    """comfy_quant as ComfyUI writes it (comfy/ops.py): the UTF-8 bytes of the JSON conf in a uint8 tensor."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def weight(out_f: int = OUT, in_f: int = IN, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((out_f, in_f), generator=gen) * 0.02


def pack_low_first(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] 4-bit codes (0..15) -> [out, in/2] bytes, column 2j in bits 0..3 and 2j+1 in bits 4..7 (kitchen's
    AWQ W4A16 description; Nunchaku's int8 `qweight` is the same shape)."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)


def symmetric_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int4 per `group` inputs: (codes as 4-bit two's complement 0..15 [out, in], scales [in/group, out])."""
    out_f, in_f = w.shape
    blocks = w.reshape(out_f, in_f // group, group)
    scale = (blocks.abs().amax(-1) / 7.0).clamp(min=1e-12)
    q = torch.round(blocks / scale.unsqueeze(-1)).clamp(-8, 7).to(torch.int8).reshape(out_f, in_f)
    return (q & 0x0F).to(torch.uint8), scale.t().contiguous()


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's normalised Hadamard matrix of size n (a power of two)."""
    h = torch.ones((1, 1))
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _norm() -> dict[str, torch.Tensor]:
    return {f"{NORM}.weight": torch.ones(IN, dtype=torch.bfloat16)}


def mxfp8_tensors() -> dict[str, torch.Tensor]:
    """MXFP8 (comfy-kitchen TensorCoreMXFP8Layout): E4M3 values, one power-of-two (E8M0) scale per 32 elements of a
    row, the smallest power of two that brings the block's amax within 448; scales padded to the 128x4 tiles of the
    cuBLAS block-scaled GEMM; marker {"format": "mxfp8"}."""
    w = weight()
    blocks = w.reshape(OUT, IN // 32, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=2.0 ** -126) / 448.0))
    scale = torch.exp2(exponent)
    values = (blocks / scale.unsqueeze(-1)).reshape(OUT, IN).to(torch.float8_e4m3fn)
    rows, cols = -(-OUT // 128) * 128, -(-(IN // 32) // 4) * 4
    padded = torch.full((rows, cols), 127, dtype=torch.uint8)  # E8M0 127 = 2**0
    padded[:OUT, : IN // 32] = (exponent + 127).to(torch.uint8)
    return {f"{LAYER}.weight": values, f"{LAYER}.weight_scale": tile_layout(padded).view(torch.float8_e8m0fnu),
            f"{LAYER}.comfy_quant": marker({"format": "mxfp8"}), **_norm()}


def int8_tensorwise_tensors() -> dict[str, torch.Tensor]:
    """INT8 tensorwise (comfy-kitchen TensorWiseINT8Layout): int8 values, one F32 scale amax/127."""
    w = weight()
    scale = w.abs().amax() / 127.0
    return {f"{LAYER}.weight": torch.round(w / scale).clamp(-127, 127).to(torch.int8),
            f"{LAYER}.weight_scale": scale.to(torch.float32).reshape(()),
            f"{LAYER}.comfy_quant": marker({"format": "int8_tensorwise"}), **_norm()}


def convrot_w4a4_tensors() -> dict[str, torch.Tensor]:
    """ConvRot W4A4 (comfy-kitchen TensorCoreConvRotW4A4Layout): the weight rotated by a regular Hadamard matrix per
    256 inputs, then signed int4 per 64 inputs; `.weight` int8 [out, in/2], `.weight_scale` BF16 [in/64, out]."""
    w = weight()
    rotated = (w.reshape(OUT, IN // 256, 256) @ hadamard(256).T).reshape(OUT, IN)
    codes, scale = symmetric_int4(rotated, 64)
    return {f"{LAYER}.weight": pack_low_first(codes), f"{LAYER}.weight_scale": scale.to(torch.bfloat16),
            f"{LAYER}.comfy_quant": marker({"format": "convrot_w4a4", "convrot_groupsize": 256}), **_norm()}


def awq_w4a16_tensors() -> dict[str, torch.Tensor]:
    """AWQ W4A16 (comfy-kitchen TensorCoreAWQW4A16Layout): W = (q - 8) * scale + zeros per 64 inputs, q uint4 in
    [0, 15]; scale = (max - min) / 15 and zeros = min + 8 * scale put the group's range on the 16 codes."""
    w = weight()
    blocks = w.reshape(OUT, IN // 64, 64)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    zeros = low + 8.0 * scale
    q = torch.round((blocks - zeros.unsqueeze(-1)) / scale.unsqueeze(-1) + 8.0).clamp(0, 15).reshape(OUT, IN)
    return {f"{LAYER}.weight": pack_low_first(q), f"{LAYER}.weight_scale": scale.t().to(torch.bfloat16),
            f"{LAYER}.weight_zeros": zeros.t().to(torch.bfloat16),
            f"{LAYER}.comfy_quant": marker({"format": "awq_w4a16", "group_size": 64}), **_norm()}


def moe_experts_tensors() -> dict[str, torch.Tensor]:
    """A ComfyUI MoE expert bank (comfy/ops.py MoEExperts): E experts' FP8 weights [E, out, in] with one F32 scale
    per expert [E], marker {"format": "float8_e4m3fn", "num_experts": E}."""
    bank = torch.stack([weight(seed=i) for i in range(EXPERTS)])
    scale = bank.abs().amax(dim=(1, 2)) / 448.0
    values = (bank / scale.reshape(-1, 1, 1)).to(torch.float8_e4m3fn)
    base = "blocks.0.moe.experts"
    return {f"{base}.weight": values, f"{base}.weight_scale": scale.to(torch.float32),
            f"{base}.comfy_quant": marker({"format": "float8_e4m3fn", "num_experts": EXPERTS}), **_norm()}


def _low_rank(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVDQuant's split: the top-RANK SVD branch (proj_down [in, rank], proj_up [out, rank]) and the residual."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    up = u[:, :RANK] * s[:RANK]
    down = vh[:RANK].T
    return down, up, w - up @ down.T


def svdquant_int4_tensors() -> dict[str, torch.Tensor]:
    """Nunchaku SVDQuant W4A4, int4 (SVDQW4A4Linear): smoothing factors (ones here), the low-rank branch in BF16,
    the residual as signed int4 per 64 inputs: `.qweight` int8 [out, in/2], `.wscales` BF16 [in/64, out]."""
    w = weight()
    down, up, residual = _low_rank(w)
    codes, scale = symmetric_int4(residual, 64)
    base = "transformer_blocks.0.attn.to_qkv"
    return {f"{base}.qweight": pack_low_first(codes), f"{base}.wscales": scale.to(torch.bfloat16),
            f"{base}.smooth_factor": torch.ones(IN, dtype=torch.bfloat16),
            f"{base}.smooth_factor_orig": torch.ones(IN, dtype=torch.bfloat16),
            f"{base}.proj_down": down.to(torch.bfloat16), f"{base}.proj_up": up.to(torch.bfloat16),
            f"{base}.bias": torch.zeros(OUT, dtype=torch.bfloat16), **_norm()}


def svdquant_nvfp4_tensors() -> dict[str, torch.Tensor]:
    """Nunchaku SVDQuant W4A4, NVFP4 (SVDQW4A4Linear precision 'nvfp4'): the residual as E2M1 codes with one FP8
    E4M3 scale per 16 inputs (`.wscales` [in/16, out]), `.wcscales` ones [out] and `.wtscale` 1.0."""
    from inspect_tools.synthetic.lightx2v import round_e2m1

    w = weight()
    down, up, residual = _low_rank(w)
    blocks = residual.reshape(OUT, IN // 16, 16)
    scale = (blocks.abs().amax(-1) / 6.0).clamp(min=2.0 ** -9).to(torch.float8_e4m3fn)
    codes = round_e2m1((blocks / scale.to(torch.float32).unsqueeze(-1)).reshape(OUT, IN))
    base = "transformer_blocks.0.attn.to_qkv"
    return {f"{base}.qweight": pack_low_first(codes), f"{base}.wscales": scale.t().contiguous(),
            f"{base}.wcscales": torch.ones(OUT, dtype=torch.bfloat16), f"{base}.wtscale": torch.tensor(1.0),
            f"{base}.smooth_factor": torch.ones(IN, dtype=torch.bfloat16),
            f"{base}.proj_down": down.to(torch.bfloat16), f"{base}.proj_up": up.to(torch.bfloat16), **_norm()}


def awq_nunchaku_tensors() -> dict[str, torch.Tensor]:
    """Nunchaku AWQ W4A16 (AWQW4A16Linear, its modulation layers): `.qweight` int32 [out/4, in/2], `.wscales` and
    `.wzeros` BF16 [in/64, out]. The codes are asymmetric uint4 per 64 inputs (zero point: the group minimum), eight
    per int32 in plain order (the kernel's interleaving is not reproduced)."""
    w = weight()
    blocks = w.reshape(OUT, IN // 64, 64)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((blocks - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.int64).reshape(-1, 8)
    words = sum(q[:, i] << (4 * i) for i in range(8))
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).reshape(OUT // 4, IN // 2)
    base = "transformer_blocks.0.img_mod.1"
    return {f"{base}.qweight": words, f"{base}.wscales": scale.t().to(torch.bfloat16),
            f"{base}.wzeros": low.t().to(torch.bfloat16), **_norm()}


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ packs output columns 0..7 into nibbles in this order


def autoawq_tensors(group: int = 128) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM (WQLinear_GEMM): `.qweight` int32 [in, out/8], `.qzeros` int32 [in/G, out/8], `.scales` F16
    [in/G, out]; asymmetric uint4 per G inputs, eight output columns per int32 in AWQ's order."""
    w = weight().T.contiguous()  # AutoAWQ stores [in, out]
    blocks = w.reshape(IN // group, group, OUT)
    low, high = blocks.amin(1), blocks.amax(1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    zero = torch.round(-low / scale).clamp(0, 15)
    q = torch.round(blocks / scale.unsqueeze(1) + zero.unsqueeze(1)).clamp(0, 15).reshape(IN, OUT).to(torch.int64)

    def pack(codes: torch.Tensor) -> torch.Tensor:
        grouped = codes.reshape(codes.shape[0], -1, 8)
        words = sum(grouped[..., col] << (4 * slot) for slot, col in enumerate(AWQ_ORDER))
        return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)

    base = "model.layers.0.self_attn.q_proj"
    return {f"{base}.qweight": pack(q), f"{base}.qzeros": pack(zero.to(torch.int64)),
            f"{base}.scales": scale.to(torch.float16), **_norm()}


BUILDERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "mxfp8": mxfp8_tensors,
    "int8_tensorwise": int8_tensorwise_tensors,
    "convrot_w4a4": convrot_w4a4_tensors,
    "awq_w4a16": awq_w4a16_tensors,
    "moe-experts": moe_experts_tensors,
    "svdquant-int4": svdquant_int4_tensors,
    "svdquant-nvfp4": svdquant_nvfp4_tensors,
    "awq-nunchaku": awq_nunchaku_tensors,
    "awq-autoawq": autoawq_tensors,
}


def write_recognized(path: str | Path, fmt: str) -> Path:
    """A small safetensors file with one linear stored in `fmt` (a key of BUILDERS) beside a BF16 norm."""
    return save_safetensors(BUILDERS[fmt](), path)
