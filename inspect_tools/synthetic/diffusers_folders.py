"""Diffusers model folders as the Hugging Face repositories ship them: `transformer/` (and, for WAN 2.2 A14B,
`transformer_2/`) holding diffusers-named weight shards, their index.json and the model class's config.json, plus a
`model_index.json` at the top. Configs follow the published ones (the keys that matter here: `_class_name`,
in/out channels, widths, Qwen Image's `zero_cond_t` / `use_additional_t_cond`), sized to the fixture's dims.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from inspect_tools.synthetic.dims import small_dims
from inspect_tools.synthetic.state_dicts import float_state_dict, profile_for
from inspect_tools.synthetic.writers import save_safetensors, write_sharded

# What each variant's transformer config.json adds beyond the dims (Qwen-Image-Edit-2511 and Qwen-Image-Layered
# model cards / transformer configs: zero_cond_t, use_additional_t_cond and use_layer3d_rope)
_QWEN_FLAGS: dict[str, dict[str, Any]] = {
    "qwen-image-2512": {},
    "qwen-image-edit-2511": {"zero_cond_t": True},
    "qwen-image-layered": {"use_additional_t_cond": True, "use_layer3d_rope": True},
}
# The variant whose tensors a diffusers folder of `variant` holds (Edit 2511 has no marker tensor in diffusers form)
_TENSORS_OF = {"qwen-image-edit-2511": "qwen-image-2512"}


def transformer_config(variant: str, dims: dict[str, int] | None = None) -> dict[str, Any]:
    """The diffusers config.json of `variant`'s transformer at `dims` (default: the fixture's small dims)."""
    profile = profile_for(variant)
    d = {**small_dims(variant), **(dims or {})}
    if profile.family == "wan":
        return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0", "added_kv_proj_dim": None,
                "attention_head_dim": d["dim"] // d["heads"], "cross_attn_norm": True, "eps": 1e-06,
                "ffn_dim": d["ffn"], "freq_dim": d["freq_dim"], "image_dim": None, "in_channels": d["in_dim"],
                "num_attention_heads": d["heads"], "num_layers": d["blocks"], "out_channels": d["out_dim"],
                "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                "text_dim": d["text_dim"]}
    if profile.family == "qwen_image":
        return {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.36.0",
                "attention_head_dim": d["dim"] // d["heads"], "axes_dims_rope": [16, 56, 56],
                "guidance_embeds": False, "in_channels": d["in_channels"], "joint_attention_dim": d["text_dim"],
                "num_attention_heads": d["heads"], "num_layers": d["blocks"], "out_channels": d["out_channels"] // 4,
                "patch_size": 2, **_QWEN_FLAGS[variant]}
    raise ValueError(f"no diffusers config for {variant}")


def write_transformer_folder(folder: str | Path, variant: str, dims: dict[str, int] | None = None,
                             dtype: torch.dtype = torch.float32, sharded: int | None = 2, seed: int = 0,
                             config: dict[str, Any] | None = None) -> Path:
    """One diffusers `transformer/` folder: weights (sharded + index.json, or one file) and config.json (`config`
    replaces the published one, e.g. to drop a flag). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = float_state_dict(_TENSORS_OF.get(variant, variant), dims, dtype, "diffusers", seed)
    if sharded:
        write_sharded(tensors, folder, sharded)
    else:
        save_safetensors(tensors, folder / "diffusion_pytorch_model.safetensors")
    text = json.dumps(transformer_config(variant, dims) if config is None else config, indent=2)
    (folder / "config.json").write_text(text)
    return folder


def write_model_folder(folder: str | Path, variant: str, experts: int = 1, dims: dict[str, int] | None = None,
                       dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers pipeline folder: model_index.json + transformer/ (+ transformer_2/ for a two-expert WAN 2.2
    A14B, whose second expert is the low-noise one). Returns the folder."""
    folder = Path(folder)
    names = ["transformer", "transformer_2"][:experts]
    for i, name in enumerate(names):
        write_transformer_folder(folder / name, variant, dims, dtype, seed=i)
    pipeline = "WanPipeline" if variant.startswith("wan") else "QwenImagePipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.35.0",
             **{name: ["diffusers", transformer_config(variant, dims)["_class_name"]] for name in names}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
