"""WAN 2.2 profiles: TI2V 5B, T2V A14B, I2V A14B (ComfyUI-native = original Wan repository names).

Facts: shared/research/architectures.md (names, shapes, diffusers map) and comfyui-load-path.md Q5 (ComfyUI keys
the WAN family on `head.modulation`, reads out_dim = rows(head.head.weight) / 4 and in_dim = patch_embedding dim 1;
WAN 2.2 TI2V 5B is the out_dim 48 model, the A14B experts differ by in_dim 16 (T2V) vs 36 (I2V)).
"""

from __future__ import annotations

import re
from typing import ClassVar

from reference_specs.layer import split_key
from reference_specs.models.base import ArchitectureProfile, Detection

HEAD_DIM = 128

# Per-block sub-names, diffusers (WanTransformer3DModel) -> native. Applied to base names (role suffix removed).
_BLOCK_TO_NATIVE: dict[str, str] = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "norm2": "norm3",
    "scale_shift_table": "modulation",
}
# Top-level names, diffusers -> native.
_GLOBAL_TO_NATIVE: dict[str, str] = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
}
_BLOCK_TO_DIFFUSERS = {v: k for k, v in _BLOCK_TO_NATIVE.items()}
_GLOBAL_TO_DIFFUSERS = {v: k for k, v in _GLOBAL_TO_NATIVE.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DIFFUSERS_MARKERS = ("condition_embedder.", ".attn1.", ".attn2.", ".ffn.net.", "scale_shift_table", "proj_out")


def _rename(key: str, block_map: dict[str, str], global_map: dict[str, str]) -> str:
    base, role = split_key(key)
    match = _BLOCK_RE.match(base)
    if match:
        rest = block_map.get(match.group(2))
        new = f"blocks.{match.group(1)}.{rest}" if rest is not None else base
    else:
        new = global_map.get(base, base)
    return new if role == "value" else f"{new}.{role}"


class WanProfile(ArchitectureProfile):
    """Shared by the three WAN 2.2 variants; subclasses pin (in_dim, out_dim) and the full dimensions."""

    family = "wan"
    diffusers_class: ClassVar[str] = "WanTransformer3DModel"
    config_dims: ClassVar[dict[str, str]] = {"in_channels": "in_dim", "out_channels": "out_dim", "num_layers": "blocks",
                                             "ffn_dim": "ffn"}
    # dims that make a model "the real one"; narrower or shallower fixtures are scaled down
    _size_dims: ClassVar[tuple[str, ...]] = ("dim", "ffn", "blocks")
    # comfy/model_detection.py (Wan branch, ComfyUI 0.8.0): dim = head.modulation.shape[-1] (a parameter, never
    # quantized), out_dim = head.head.weight.shape[0] // 4, ffn_dim = blocks.0.ffn.0.weight.shape[0],
    # in_dim = patch_embedding.weight.shape[1] (a 5-D conv, never quantized). Rows survive NVFP4 packing when they
    # are a multiple of 16 (every real WAN's are), so ffn.0 and the head may be quantized; a packed in_dim never is.
    shape_reads: ClassVar[dict[str, dict[int, str]]] = {
        "head.head": {0: "out_dim (rows / 4)"},
        "blocks.0.ffn.0": {0: "ffn_dim"},
        "patch_embedding": {1: "in_dim"},
    }

    def tensor_shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        d, f, t, fr = dims["dim"], dims["ffn"], dims["text_dim"], dims["freq_dim"]
        s: dict[str, tuple[int, ...]] = {
            "patch_embedding.weight": (d, dims["in_dim"], 1, 2, 2),
            "patch_embedding.bias": (d,),
            "text_embedding.0.weight": (d, t),
            "text_embedding.0.bias": (d,),
            "text_embedding.2.weight": (d, d),
            "text_embedding.2.bias": (d,),
            "time_embedding.0.weight": (d, fr),
            "time_embedding.0.bias": (d,),
            "time_embedding.2.weight": (d, d),
            "time_embedding.2.bias": (d,),
            "time_projection.1.weight": (6 * d, d),
            "time_projection.1.bias": (6 * d,),
        }
        for n in range(dims["blocks"]):
            p = f"blocks.{n}."
            s[p + "modulation"] = (1, 6, d)
            for attn in ("self_attn", "cross_attn"):
                for proj in ("q", "k", "v", "o"):
                    s[f"{p}{attn}.{proj}.weight"] = (d, d)
                    s[f"{p}{attn}.{proj}.bias"] = (d,)
                s[f"{p}{attn}.norm_q.weight"] = (d,)
                s[f"{p}{attn}.norm_k.weight"] = (d,)
            s[p + "norm3.weight"] = (d,)
            s[p + "norm3.bias"] = (d,)
            s[p + "ffn.0.weight"] = (f, d)
            s[p + "ffn.0.bias"] = (f,)
            s[p + "ffn.2.weight"] = (d, f)
            s[p + "ffn.2.bias"] = (d,)
        s["head.modulation"] = (1, 2, d)
        s["head.head.weight"] = (4 * dims["out_dim"], d)
        s["head.head.bias"] = (4 * dims["out_dim"],)
        return s

    def read_dims(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """The dimensions ComfyUI reads off the keys (model_detection.py, WAN branch). Quantized (packed) tensors
        are avoided where a kept tensor says the same: head.modulation gives dim, ffn.0's bias gives ffn."""
        dims = {"dim": shapes["head.modulation"][-1]}
        head = shapes.get("head.head.bias") or shapes.get("head.head.weight")
        if head:
            dims["out_dim"] = head[0] // 4
        if "patch_embedding.weight" in shapes and len(shapes["patch_embedding.weight"]) > 1:
            dims["in_dim"] = shapes["patch_embedding.weight"][1]
        ffn = shapes.get("blocks.0.ffn.0.bias") or shapes.get("blocks.0.ffn.0.weight")
        if ffn:
            dims["ffn"] = ffn[0]
        blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))}
        dims["blocks"] = max(blocks) + 1 if blocks else 0
        for key, name in (("text_embedding.0.weight", "text_dim"), ("time_embedding.0.weight", "freq_dim")):
            if key in shapes and len(shapes[key]) == 2 and "text_embedding.0.weight_scale" not in shapes:
                dims[name] = shapes[key][1]
        dims["heads"] = dims["dim"] // HEAD_DIM
        return dims

    def detect(self, shapes: dict[str, tuple[int, ...]]) -> Detection | None:
        if "head.modulation" not in shapes:
            return None
        if "img_emb.proj.0.bias" in shapes:  # WAN 2.1 I2V (CLIP image branch): not a WAN 2.2 model
            return None
        dims = self.read_dims(shapes)
        if dims.get("out_dim") != self.full_dims["out_dim"]:
            return None
        in_dim = dims.get("in_dim")
        if in_dim is None:
            # city96 GGUF files leave the 5-D patch_embedding out: in_dim is unknown, the T2V profile (in_dim ==
            # out_dim) is the one assumed, as ComfyUI would with no image-conditioning channels.
            if self.full_dims["in_dim"] != self.full_dims["out_dim"]:
                return None
        elif in_dim != self.full_dims["in_dim"]:
            return None
        return self.detection(dims)

    def could_also_be(self, found: Detection) -> tuple[str, ...]:
        # without patch_embedding (city96 GGUF files) the A14B experts' in_dim is unknown: T2V was assumed
        if found.variant == Wan22T2VA14B.variant and "in_dim" not in found.dims:
            return (Wan22I2VA14B.variant,)
        return ()

    def to_native(self, name: str) -> str:
        return _rename(name, _BLOCK_TO_NATIVE, _GLOBAL_TO_NATIVE)

    def to_diffusers(self, name: str) -> str:
        return _rename(name, _BLOCK_TO_DIFFUSERS, _GLOBAL_TO_DIFFUSERS)

    def is_diffusers_name(self, name: str) -> bool:
        return any(marker in name for marker in _DIFFUSERS_MARKERS)

    def sensitive(self, layer_name: str) -> str | None:
        # convert_to_quant's --wan highprec list + AVOID_KEY_NAMES and city96's WAN skip list (peers.md A, C)
        name = self.to_native(layer_name)
        if name.startswith("patch_embedding"):
            return "patch embedding (5-D conv; ComfyUI reads in_dim from it)"
        if name.startswith(("text_embedding.", "time_embedding.", "img_emb.")):
            return "embedding"
        if name.startswith("time_projection."):
            return "modulation (time projection feeding every block's modulation)"
        if name.endswith("modulation"):
            return "modulation"
        if name.startswith("head.head"):
            return "head (final layer; ComfyUI reads out_dim from it)"
        if _is_norm(name):
            return "norm"
        return None

    def role_of(self, layer_name: str) -> str | None:
        name = self.to_native(layer_name)
        match = _BLOCK_RE.match(name)
        if match:
            rest = match.group(2)
            if rest == "modulation":
                return "modulation"
            if _is_norm(rest):
                return "norm"
            leaf = rest.split(".", 1)[-1]
            return {
                "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_out", "k_img": "attn_k",
                "v_img": "attn_v", "0": "mlp_up", "2": "mlp_down",
            }.get(leaf)
        if name.startswith(("patch_embedding", "text_embedding.", "time_embedding.", "img_emb.")):
            return "norm" if _is_norm(name) else "embedding"
        if name.startswith("time_projection.") or name == "head.modulation":
            return "modulation"
        if name.startswith("head.head"):
            return "head"
        return None


def _is_norm(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("norm") or name.startswith(("img_emb.proj.0", "img_emb.proj.4"))


class Wan22TI2V5B(WanProfile):
    variant = "wan2.2-ti2v-5b"
    display_name = "WAN 2.2 TI2V 5B"
    full_dims = {"dim": 3072, "ffn": 14336, "blocks": 30, "in_dim": 48, "out_dim": 48, "text_dim": 4096,
                 "freq_dim": 256, "heads": 24}


class Wan22T2VA14B(WanProfile):
    variant = "wan2.2-t2v-a14b"
    display_name = "WAN 2.2 T2V A14B (one expert)"
    full_dims = {"dim": 5120, "ffn": 13824, "blocks": 40, "in_dim": 16, "out_dim": 16, "text_dim": 4096,
                 "freq_dim": 256, "heads": 40}


class Wan22I2VA14B(WanProfile):
    variant = "wan2.2-i2v-a14b"
    display_name = "WAN 2.2 I2V A14B (one expert)"
    full_dims = {"dim": 5120, "ffn": 13824, "blocks": 40, "in_dim": 36, "out_dim": 16, "text_dim": 4096,
                 "freq_dim": 256, "heads": 40}
