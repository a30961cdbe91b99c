"""GGUF fixtures with city96's ComfyUI-GGUF type selection (shared/research/peers.md section C).

city96's pipeline: tools/convert.py writes F16 (BF16 for bf16 sources) with 1-D tensors, tensors of <= 1024
elements and "high precision" keys (WAN `.modulation`) in F32, and leaves 5-D tensors (WAN patch_embedding) out;
then the patched llama-quantize quantizes only 2-D `*weight` tensors outside the per-architecture skip list, bumps
v-projections, fused qkv and FFN-down layers for some types, and falls back to F16 when a K-quant row length is
not a multiple of 256. Names are ComfyUI-native; GGUF stores shapes reversed (gguf-py does that from numpy).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from inspect_tools.synthetic.kquants import QK_K, quantize_k
from inspect_tools.synthetic.state_dicts import float_state_dict, profile_for

QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors this small stay F32
HIGH_PRECISION_KEYS = {"wan": (".modulation",)}  # convert.py keys_hiprec ("nn.parameter, can't load from BF16")
SKIP_KEYS = {  # lcpp.patch: groups llama-quantize leaves at the convert.py type
    "wan": ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
            "img_emb.", "head."),
    "qwen_image": ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out."),
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
}
V_KEYS = ("to_v", "attn_v", ".v.weight", "_attn.v_proj.weight")
QKV_KEYS = ("attn_qkv", "attn.qkv", "attention.qkv")
DOWN_KEYS = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight", ".feed_forward.w2.weight",
             ".adaln_modulation_mlp.2.weight")
# file type -> (default type, {kind: bumped type}); kinds: "v", "qkv", "down" (lcpp.patch img_tensor_get_type)
FILE_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "Q4_0": ("Q4_0", {"down": "Q4_1"}),
    "Q4_1": ("Q4_1", {}),
    "Q5_0": ("Q5_0", {"down": "Q5_1"}),
    "Q5_1": ("Q5_1", {}),
    "Q8_0": ("Q8_0", {}),
    "Q4_K_M": ("Q4_K", {"v": "Q6_K", "qkv": "Q5_K", "down": "Q6_K"}),
    "Q5_K_M": ("Q5_K", {"v": "Q6_K", "qkv": "Q6_K", "down": "Q6_K"}),
    "Q6_K": ("Q6_K", {}),
    "F16": ("F16", {}),
    "BF16": ("BF16", {}),
}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
GGUF_ARCH = {"wan": "wan", "qwen_image": "qwen_image", "flux": "flux"}


def convert_type(family: str, key: str, shape: tuple[int, ...], source: torch.dtype) -> str:
    """Step 1 (convert.py): the type a tensor gets before llama-quantize."""
    numel = int(np.prod(shape)) if shape else 1
    if len(shape) == 1 or numel <= QUANTIZATION_THRESHOLD or any(k in key for k in HIGH_PRECISION_KEYS.get(family, ())):
        return "F32"
    return "BF16" if source == torch.bfloat16 else "F16"


def _bump_kind(key: str) -> str | None:
    if any(k in key for k in V_KEYS):
        return "v"
    if any(k in key for k in QKV_KEYS):
        return "qkv"
    if any(k in key for k in DOWN_KEYS):
        return "down"
    return None


def city96_type(family: str, key: str, shape: tuple[int, ...], file_type: str,
                source: torch.dtype = torch.float32) -> str | None:
    """The GGML type city96's tools give `key` in a `file_type` file; None: left out of the file (5-D)."""
    if len(shape) == 5:
        return None
    if file_type not in FILE_TYPES:
        raise ValueError(f"unsupported GGUF file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    first = convert_type(family, key, shape, source)
    default, bumps = FILE_TYPES[file_type]
    if file_type in ("F16", "BF16") or first == "F32":
        return first
    if len(shape) != 2 or not key.endswith("weight") or any(k in key for k in SKIP_KEYS.get(family, ())):
        return first
    kind = _bump_kind(key)
    qtype = bumps.get(kind, default) if kind else default
    block = QK_K if qtype in K_QUANTS else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    if shape[-1] % block:
        return "F16"  # llama-quantize's fallback when the row length does not fit the block
    return qtype


def encode(data: torch.Tensor, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    array = data.to(torch.float32).numpy()
    if qtype == "F32":
        return array, None
    if qtype == "F16":
        return array.astype(np.float16), None
    if qtype in K_QUANTS:
        return quantize_k(array, qtype), gguf.GGMLQuantizationType[qtype]
    ggml = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.quantize(array, ggml), ggml


def write_gguf(
    path: str | Path,
    variant: str,
    qtype: str = "Q4_0",
    dims: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    statistic: str = "structured",
) -> Path:
    """A city96-style GGUF of `variant` (native names, 5-D patch_embedding left out)."""
    profile = profile_for(variant)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH[profile.family])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in float_state_dict(variant, dims, dtype, "native", seed, statistic).items():
        ggml_type = city96_type(profile.family, key, tuple(tensor.shape), qtype, dtype)
        if ggml_type is None or tensor.numel() == 0:
            continue
        array, raw = encode(tensor, ggml_type)
        writer.add_tensor(key, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
