"""Qwen-Image profiles: Qwen Image 2512, Qwen Image Edit 2511 and Qwen Image Layered.

Facts: shared/research/architectures.md (Qwen-Image section) and comfyui-load-path.md Q5: ComfyUI detects the family
by `txt_norm.weight`; an extra `__index_timestep_zero__` key marks the 2511 edit model (comfy/model_detection.py sets
default_ref_method "index_timestep_zero"; comfy/ldm/qwen_image/model.py registers it as an empty float buffer), and
`time_text_embed.addition_t_embedding.weight` the Layered model (use_additional_t_cond, ref method "negative_index").
ComfyUI's native names ARE the diffusers (QwenImageTransformer2DModel) names, so the name maps are the identity.

In diffusers form, Edit 2511 has exactly the 2512 tensors: what tells them apart is `"zero_cond_t": true` in the
transformer's config.json (diffusers QwenImageTransformer2DModel: zero_cond_t gives the reference image timestep 0,
which is ComfyUI's "index_timestep_zero"). Layered's config has `"use_additional_t_cond": true`, and the key.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from reference_specs.models.base import ArchitectureProfile, Detection, module_name

HEAD_DIM = 128
EDIT_MARKER = "__index_timestep_zero__"
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"
DIFFUSERS_CLASS = "QwenImageTransformer2DModel"
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
# convert_to_quant --qwen highprec/exclude lists and city96's QWEN_IMAGE skip list (peers.md A, C)
_EMBEDDINGS = ("img_in", "txt_in", "time_text_embed.")


class QwenImageProfile(ArchitectureProfile):
    family = "qwen_image"
    diffusers_class: ClassVar[str] = DIFFUSERS_CLASS
    config_dims: ClassVar[dict[str, str]] = {"in_channels": "in_channels", "num_layers": "blocks"}
    edit: ClassVar[bool] = False
    layered: ClassVar[bool] = False
    # Layered's addition_t_embedding is an nn.Embedding(2, dim): a lookup table, not a Linear
    tables: ClassVar[tuple[str, ...]] = ("time_text_embed.addition_t_embedding",)
    # comfy/model_detection.py (Qwen Image branch, ComfyUI 0.8.0): in_channels = img_in.weight.shape[1]; the depth
    # is counted from the keys, nothing else is read from a shape
    shape_reads: ClassVar[dict[str, dict[int, str]]] = {"img_in": {1: "in_channels"}}
    _size_dims: ClassVar[tuple[str, ...]] = ("dim", "blocks")

    def tensor_shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        d, t = dims["dim"], dims["text_dim"]
        s: dict[str, tuple[int, ...]] = {
            "img_in.weight": (d, dims["in_channels"]),
            "img_in.bias": (d,),
            "txt_norm.weight": (t,),
            "txt_in.weight": (d, t),
            "txt_in.bias": (d,),
            "time_text_embed.timestep_embedder.linear_1.weight": (d, 256),
            "time_text_embed.timestep_embedder.linear_1.bias": (d,),
            "time_text_embed.timestep_embedder.linear_2.weight": (d, d),
            "time_text_embed.timestep_embedder.linear_2.bias": (d,),
        }
        for n in range(dims["blocks"]):
            p = f"transformer_blocks.{n}."
            for mod in ("img_mod.1", "txt_mod.1"):
                s[f"{p}{mod}.weight"] = (6 * d, d)
                s[f"{p}{mod}.bias"] = (6 * d,)
            for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
                s[f"{p}attn.{proj}.weight"] = (d, d)
                s[f"{p}attn.{proj}.bias"] = (d,)
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                s[f"{p}attn.{norm}.weight"] = (HEAD_DIM,)
            for mlp in ("img_mlp", "txt_mlp"):
                s[f"{p}{mlp}.net.0.proj.weight"] = (4 * d, d)
                s[f"{p}{mlp}.net.0.proj.bias"] = (4 * d,)
                s[f"{p}{mlp}.net.2.weight"] = (d, 4 * d)
                s[f"{p}{mlp}.net.2.bias"] = (d,)
        s["norm_out.linear.weight"] = (2 * d, d)
        s["norm_out.linear.bias"] = (2 * d,)
        s["proj_out.weight"] = (dims["out_channels"], d)
        s["proj_out.bias"] = (dims["out_channels"],)
        if self.edit:
            s[EDIT_MARKER] = (0,)
        if self.layered:
            s[LAYERED_KEY] = (2, d)
        return s

    def read_dims(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        dims = {"text_dim": shapes["txt_norm.weight"][0]}
        # biases are never quantized, so they give the widths even when the weights are packed
        for key, name in (("img_in.bias", "dim"), ("proj_out.bias", "out_channels")):
            if key in shapes:
                dims[name] = shapes[key][0]
        if "img_in.weight" in shapes and "img_in.weight_scale" not in shapes:
            dims["in_channels"] = shapes["img_in.weight"][1]
        blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))}
        dims["blocks"] = max(blocks) + 1 if blocks else 0
        if "dim" in dims:
            dims["heads"] = dims["dim"] // HEAD_DIM
        return dims

    def detect(self, shapes: dict[str, tuple[int, ...]]) -> Detection | None:
        if "txt_norm.weight" not in shapes or (LAYERED_KEY in shapes) != self.layered:
            return None
        # ComfyUI sets Layered's ref method after 2511's: the Layered key decides whatever else is there
        if not self.layered and (EDIT_MARKER in shapes) != self.edit:
            return None
        # ComfyUI checks Lens (img_mlp.w1) and Qwen Image 2.1 (txt_in.text_norm) keys: other models, not ours
        if "transformer_blocks.0.img_mlp.w1.weight" in shapes or "txt_in.text_norm.weight" in shapes:
            return None
        dims = self.read_dims(shapes)
        return self.detection(dims)

    def variant_from_config(self, found: Detection, config: dict[str, Any]) -> tuple[str, str] | None:
        # only the Edit 2511 flag adds no tensor; Layered has its key, and a key the file lacks is not there
        if config.get("_class_name") != DIFFUSERS_CLASS or found.variant != QwenImage2512.variant:
            return None
        if config.get("zero_cond_t") is True:
            return QwenImageEdit2511.variant, "config.json: zero_cond_t true"
        return None

    def could_also_be(self, found: Detection) -> tuple[str, ...]:
        # 2512 keys without a config.json: an Edit 2511 whose marker or config was lost looks the same
        return (QwenImageEdit2511.variant,) if found.variant == QwenImage2512.variant else ()

    def sensitive(self, layer_name: str) -> str | None:
        name = module_name(layer_name)
        if name in self.tables:
            return "embedding (lookup table)"
        if name.startswith(_EMBEDDINGS):
            return "embedding (ComfyUI reads in_channels from img_in)" if name == "img_in" else "embedding"
        if name.startswith("norm_out."):
            return "modulation (final adaLN)"
        if name.startswith("proj_out"):
            return "head (final projection)"
        if name.endswith(("img_mod.1", "txt_mod.1")):
            return "modulation"
        if "norm" in name.rsplit(".", 1)[-1] or name == "txt_norm":
            return "norm"
        return None

    def role_of(self, layer_name: str) -> str | None:
        name = module_name(layer_name)
        match = _BLOCK_RE.match(name)
        if match:
            rest = match.group(2)
            if rest.endswith("_mod.1"):
                return "modulation"
            if "norm" in rest.rsplit(".", 1)[-1]:
                return "norm"
            return {
                "attn.to_q": "attn_q", "attn.add_q_proj": "attn_q", "attn.to_k": "attn_k",
                "attn.add_k_proj": "attn_k", "attn.to_v": "attn_v", "attn.add_v_proj": "attn_v",
                "attn.to_out.0": "attn_out", "attn.to_add_out": "attn_out", "img_mlp.net.0.proj": "mlp_up",
                "txt_mlp.net.0.proj": "mlp_up", "img_mlp.net.2": "mlp_down", "txt_mlp.net.2": "mlp_down",
            }.get(rest)
        if name.startswith(_EMBEDDINGS):
            return "embedding"
        if name == "txt_norm":
            return "norm"
        if name.startswith("norm_out."):
            return "modulation"
        if name == "proj_out":
            return "head"
        return None


_FULL = {"dim": 3072, "blocks": 60, "text_dim": 3584, "in_channels": 64, "out_channels": 64, "heads": 24}


class QwenImage2512(QwenImageProfile):
    variant = "qwen-image-2512"
    display_name = "Qwen Image 2512"
    full_dims = dict(_FULL)


class QwenImageEdit2511(QwenImageProfile):
    variant = "qwen-image-edit-2511"
    display_name = "Qwen Image Edit 2511"
    edit = True
    full_dims = dict(_FULL)
    # ComfyUI's QwenImageTransformer2DModel registers it as torch.tensor([]) (float32, 0 elements)
    marker_tensors: ClassVar[dict[str, tuple[str, tuple[int, ...]]]] = {EDIT_MARKER: ("F32", (0,))}


class QwenImageLayered(QwenImageProfile):
    variant = "qwen-image-layered"
    display_name = "Qwen Image Layered"
    layered = True
    full_dims = dict(_FULL)
