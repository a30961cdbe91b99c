"""Encoders for the GGML K-quant blocks Q4_K, Q5_K and Q6_K, which gguf-py can decode but not encode.

Simple min/max scale choice (no llama.cpp error search): good enough for fixtures, and the bytes follow the block
layout of ggml's block_q4_K / block_q5_K / block_q6_K exactly (256 elements per super-block), so gguf-py's
dequantize (the oracle in the tests) reads them back within the format's precision.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12-byte packing of block_q4_K/q5_K."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _affine(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Sub-blocks of 32 with w = d*sc*q - dmin*m: returns (d16, dmin16, sc, m, q)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    span = sub.max(axis=-1) - low
    scale = span / levels
    offset = -low
    d = _fp16(scale.max(axis=-1) / 63.0)
    dmin = _fp16(offset.max(axis=-1) / 63.0)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 63)
        m = np.where(dmin32[:, None] > 0, np.rint(offset / dmin32[:, None]), 0).clip(0, 63)
        step = (d32[:, None] * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin32[:, None] * m)[..., None]) / step), 0)
    return d, dmin, sc, m, q.clip(0, levels).astype(np.uint8).reshape(n, 8, 32)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, 15)
    # qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in the low nibble and 2c+1 in the high nibble
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scale_min(sc, m), qs], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, 31)
    low = q & 0x0F
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    # qh: byte i holds bit 4 of element i of sub-block g in its bit g
    high = (q >> 4) & 1
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for g in range(8):
        qh |= high[:, g] << g
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scale_min(sc, m), qh, qs], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    amax_idx = np.abs(sub).argmax(axis=-1)
    signed_max = np.take_along_axis(sub, amax_idx[..., None], axis=-1)[..., 0]
    scale = signed_max / -32.0  # the largest magnitude maps to -32, as ggml does, using the full 6-bit range
    d = _fp16(np.abs(scale).max(axis=-1) / 127.0)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(-128, 127)
        step = (d32[:, None] * sc)[..., None]
        q = np.where(step != 0, np.rint(sub / step), 0).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 elements
    # ql: per half 64 bytes; element p in low nibble of byte p%64 when p < 64, else high nibble
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    # qh: per half 32 bytes; element p's two high bits at shift 2*(p//32) of byte p%32
    top = q >> 4
    qh = top[:, :, 0:32] | (top[:, :, 32:64] << 2) | (top[:, :, 64:96] << 4) | (top[:, :, 96:128] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                           d.view(np.uint8).reshape(-1, 2)], axis=1)


ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_k(data: np.ndarray, qtype: str) -> np.ndarray:
    """[rows, cols] float32 (cols % 256 == 0) -> [rows, bytes per row] uint8 blocks of `qtype`."""
    rows, cols = data.shape
    blocks = data.astype(np.float32).reshape(-1, QK_K)
    return ENCODERS[qtype](blocks).reshape(rows, -1)
