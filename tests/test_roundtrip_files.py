"""Tiny checkpoints for the roundtrip tests: an FP32 source, its comfy-kitchen NVFP4 file, optional injected faults,
and references in other containers (FP16, GGUF Q4_0, sharded with a prefix). No tests here; imported by
test_roundtrip*.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy_kitchen as ck
import numpy as np
import torch
from safetensors.torch import save_file

from reference_specs.formats.nvfp4 import per_tensor_scale, unswizzle

# name -> [out, in]; square layers are the candidates for the transposed fault
SHAPES: dict[str, tuple[int, int]] = {
    "blocks.0.self_attn.q": (128, 128),
    "blocks.0.self_attn.k": (128, 128),
    "blocks.0.ffn.0": (256, 128),
    "blocks.0.ffn.2": (128, 256),
    "blocks.1.self_attn.q": (128, 128),
    "blocks.1.self_attn.k": (128, 128),
    "blocks.1.ffn.0": (256, 128),
    "blocks.1.ffn.2": (128, 256),
}
KEPT = {"blocks.0.norm3": (128,), "blocks.1.norm3": (128,)}


def source_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian weights with uneven input channels, like trained Linear layers (block scales vary)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in SHAPES.items():
        channel = 0.02 * (1 + 3 * torch.rand(i, generator=gen))
        out[f"{name}.weight"] = torch.randn(o, i, generator=gen) * channel
        out[f"{name}.bias"] = torch.randn(o, generator=gen) * 0.01
    for name, shape in KEPT.items():
        out[f"{name}.weight"] = 1 + 0.1 * torch.randn(shape, generator=gen)
    return out


def marker() -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)


def ck_nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """comfy-kitchen's reference quantizer, as ComfyUI files carry it."""
    scale = per_tensor_scale(weight)
    qdata, block_scales = ck.quantize_nvfp4(weight, scale, pad_16x=True)
    return {"weight": qdata, "weight_scale": block_scales, "weight_scale_2": scale}


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return (packed << 4) | (packed >> 4)


def quantized_state(source: dict[str, torch.Tensor], faults: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The NVFP4 mixed file of `source`; faults: layer -> linear | nibbles | reciprocal | transposed | stale:<other>."""
    faults = faults or {}
    encoded = {name: ck_nvfp4(source[f"{name}.weight"]) for name in SHAPES}
    state: dict[str, torch.Tensor] = {}
    for name in SHAPES:
        t = dict(encoded[name])
        fault = faults.get(name, "")
        if fault == "linear":
            t["weight_scale"] = unswizzle(t["weight_scale"])
        elif fault == "nibbles":
            t["weight"] = swap_nibbles(t["weight"])
        elif fault == "reciprocal":
            t["weight_scale_2"] = 1.0 / t["weight_scale_2"]  # 2688/amax
        elif fault == "transposed":
            t = ck_nvfp4(source[f"{name}.weight"].T.contiguous())
        elif fault.startswith("stale:"):
            other = encoded[fault.split(":", 1)[1]]
            t["weight_scale"], t["weight_scale_2"] = other["weight_scale"].clone(), other["weight_scale_2"].clone()
        for role, tensor in t.items():
            state[f"{name}.{role}"] = tensor.contiguous()
        state[f"{name}.bias"] = source[f"{name}.bias"].to(torch.bfloat16)
        state[f"{name}.comfy_quant"] = marker()
    for name in KEPT:
        state[f"{name}.weight"] = source[f"{name}.weight"]
    return state


def write_pair(tmp_path: Path, faults: dict[str, str] | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(nvfp4 file, fp32 source file)."""
    source = source_weights(seed)
    ref = tmp_path / "source_fp32.safetensors"
    mine = tmp_path / "model_nvfp4.safetensors"
    save_file(source, str(ref))
    save_file(quantized_state(source, faults), str(mine))
    return mine, ref


def write_fp16(tmp_path: Path, seed: int = 0) -> Path:
    path = tmp_path / "source_fp16.safetensors"
    save_file({k: v.to(torch.float16) for k, v in source_weights(seed).items()}, str(path))
    return path


def write_sharded(tmp_path: Path, prefix: str = "model.diffusion_model.", seed: int = 0) -> Path:
    """Two shards plus index.json, every key behind `prefix`."""
    source = {prefix + k: v for k, v in source_weights(seed).items()}
    keys = sorted(source)
    half = len(keys) // 2
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: source[k] for k in part}, str(folder / shard))
        weight_map.update({k: shard for k in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def write_gguf_q4_0(tmp_path: Path, seed: int = 0) -> Path:
    """city96-style GGUF: Linear weights Q4_0, everything else F32."""
    import gguf

    path = tmp_path / "source_q4_0.gguf"
    writer = gguf.GGUFWriter(str(path), arch="wan")
    for name, tensor in source_weights(seed).items():
        data = tensor.numpy().astype(np.float32)
        if data.ndim == 2:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
