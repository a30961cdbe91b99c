"""FLUX.1-dev profile: the format reference (the published NVFP4 mixed files that load in ComfyUI are Flux files).

Facts: shared/research/architectures.md (Flux section); peers.md B: ComfyUI reads the shapes of img_in, txt_in and
vector_in.in_layer to configure the model, so those must stay high precision (ComfyUI PR #15273).
Native names are the BFL repository names; the name maps are the identity (diffusers Flux files are a separate
naming ComfyUI converts itself and are out of scope here).
"""

from __future__ import annotations

import re
from typing import ClassVar

from reference_specs.models.base import ArchitectureProfile, Detection, module_name

HEAD_DIM = 128
_DOUBLE_RE = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
_SINGLE_RE = re.compile(r"^single_blocks\.(\d+)\.(.+)$")
_DETECTION_CRITICAL = ("img_in", "txt_in", "vector_in.")


def _is_norm(name: str) -> bool:
    return ".norm." in name or name.endswith(("query_norm.scale", "key_norm.scale"))


class Flux1Dev(ArchitectureProfile):
    family = "flux"
    variant = "flux1-dev"
    display_name = "FLUX.1-dev"
    full_dims = {"dim": 3072, "double_blocks": 19, "single_blocks": 38, "in_channels": 64, "context_dim": 4096,
                 "vec_dim": 768, "mlp_ratio": 4, "heads": 24}
    small_dims = {"dim": 256, "double_blocks": 2, "single_blocks": 2, "in_channels": 64, "context_dim": 256,
                  "vec_dim": 256, "mlp_ratio": 4, "heads": 2}
    _size_dims: ClassVar[tuple[str, ...]] = ("dim", "double_blocks", "single_blocks")
    # comfy/model_detection.py (Flux branch, ComfyUI 0.8.0): in_channels = img_in.weight.shape[1] // patch_size**2,
    # hidden_size = img_in/txt_in .weight.shape[0], context_in_dim = txt_in.weight.shape[1],
    # vec_in_dim = vector_in.in_layer.weight.shape[1]
    shape_reads: ClassVar[dict[str, dict[int, str]]] = {
        "img_in": {0: "hidden_size", 1: "in_channels (x patch_size^2)"},
        "txt_in": {0: "hidden_size", 1: "context_in_dim"},
        "vector_in.in_layer": {1: "vec_in_dim"},
    }

    def tensor_shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        d = dims["dim"]
        mlp = dims["mlp_ratio"] * d
        s: dict[str, tuple[int, ...]] = {}

        def linear(name: str, out_f: int, in_f: int) -> None:
            s[name + ".weight"] = (out_f, in_f)
            s[name + ".bias"] = (out_f,)

        linear("img_in", d, dims["in_channels"])
        linear("txt_in", d, dims["context_dim"])
        linear("time_in.in_layer", d, 256)
        linear("time_in.out_layer", d, d)
        linear("vector_in.in_layer", d, dims["vec_dim"])
        linear("vector_in.out_layer", d, d)
        linear("guidance_in.in_layer", d, 256)
        linear("guidance_in.out_layer", d, d)
        for n in range(dims["double_blocks"]):
            p = f"double_blocks.{n}."
            for stream in ("img", "txt"):
                linear(f"{p}{stream}_mod.lin", 6 * d, d)
                linear(f"{p}{stream}_attn.qkv", 3 * d, d)
                s[f"{p}{stream}_attn.norm.query_norm.scale"] = (HEAD_DIM,)
                s[f"{p}{stream}_attn.norm.key_norm.scale"] = (HEAD_DIM,)
                linear(f"{p}{stream}_attn.proj", d, d)
                linear(f"{p}{stream}_mlp.0", mlp, d)
                linear(f"{p}{stream}_mlp.2", d, mlp)
        for n in range(dims["single_blocks"]):
            p = f"single_blocks.{n}."
            linear(p + "linear1", 3 * d + mlp, d)
            linear(p + "linear2", d, d + mlp)
            s[p + "norm.query_norm.scale"] = (HEAD_DIM,)
            s[p + "norm.key_norm.scale"] = (HEAD_DIM,)
            linear(p + "modulation.lin", 3 * d, d)
        linear("final_layer.linear", dims["in_channels"], d)
        linear("final_layer.adaLN_modulation.1", 2 * d, d)
        return s

    def read_dims(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        dims: dict[str, int] = {}
        if "img_in.bias" in shapes:
            dims["dim"] = shapes["img_in.bias"][0]
            dims["heads"] = dims["dim"] // HEAD_DIM
        for key, name in (("img_in.weight", "in_channels"), ("txt_in.weight", "context_dim"),
                          ("vector_in.in_layer.weight", "vec_dim")):
            if key in shapes and len(shapes[key]) == 2 and key[:-7] + ".weight_scale" not in shapes:
                dims[name] = shapes[key][1]
        for name, pattern in (("double_blocks", _DOUBLE_RE), ("single_blocks", _SINGLE_RE)):
            blocks = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
            dims[name] = max(blocks) + 1 if blocks else 0
        return dims

    def detect(self, shapes: dict[str, tuple[int, ...]]) -> Detection | None:
        # double_blocks marks the Flux family (comfyui-load-path.md Q5); guidance_in separates dev from schnell
        if "double_blocks.0.img_attn.qkv.weight" not in shapes or "guidance_in.in_layer.weight" not in shapes:
            return None
        dims = self.read_dims(shapes)
        return self.detection(dims)

    def sensitive(self, layer_name: str) -> str | None:
        name = module_name(layer_name)
        if name.startswith(_DETECTION_CRITICAL):
            return "detection-critical embedding (ComfyUI reads its shape to configure the model)"
        if name.startswith(("time_in.", "guidance_in.")):
            return "embedding"
        if name.startswith("final_layer.adaLN_modulation"):
            return "modulation (final adaLN)"
        if name.startswith("final_layer."):
            return "head (final layer)"
        if name.endswith(("_mod.lin", "modulation.lin")):
            return "modulation"
        if _is_norm(name):
            return "norm"
        return None

    def role_of(self, layer_name: str) -> str | None:
        name = module_name(layer_name)
        if _is_norm(name):
            return "norm"
        match = _DOUBLE_RE.match(name) or _SINGLE_RE.match(name)
        if match:
            rest = match.group(2)
            if rest.endswith("mod.lin") or rest == "modulation.lin":
                return "modulation"
            # single blocks fuse qkv with the MLP up projection (linear1) and out with MLP down (linear2)
            return {
                "img_attn.qkv": "attn_qkv", "txt_attn.qkv": "attn_qkv", "linear1": "attn_qkv",
                "img_attn.proj": "attn_out", "txt_attn.proj": "attn_out", "linear2": "attn_out",
                "img_mlp.0": "mlp_up", "txt_mlp.0": "mlp_up", "img_mlp.2": "mlp_down", "txt_mlp.2": "mlp_down",
            }.get(rest)
        if name.startswith(("img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.")):
            return "embedding"
        if name.startswith("final_layer.adaLN_modulation"):
            return "modulation"
        if name == "final_layer.linear":
            return "head"
        return None
