"""FLUX.1-dev profile: the format reference (the published NVFP4 mixed files that load in ComfyUI are Flux files).

Facts: shared/research/architectures.md (Flux section); peers.md B: ComfyUI reads the shapes of img_in, txt_in and
vector_in.in_layer to configure the model, so those must stay high precision (ComfyUI PR #15273).
Native names are the BFL repository names; the name maps are the identity. Diffusers-named Flux files
(FluxTransformer2DModel: x_embedder, transformer_blocks.N.attn.to_q, single_transformer_blocks.N.proj_mlp, ...) are
recognized but not renamed: ComfyUI loads them through its own map (comfy/utils.py flux_to_diffusers), which FUSES
to_q/to_k/to_v (and single blocks' proj_mlp) into one qkv / linear1 weight by slicing; it carries no scale or marker
tensors, so a quantized diffusers-named Flux cannot load. Converting one would need the fusion; convert refuses.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import ClassVar

from reference_specs.models.base import ArchitectureProfile, Detection, module_name

HEAD_DIM = 128
_DOUBLE_RE = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
_SINGLE_RE = re.compile(r"^single_blocks\.(\d+)\.(.+)$")
_DETECTION_CRITICAL = ("img_in", "txt_in", "vector_in.")


def _is_norm(name: str) -> bool:
    return ".norm." in name or name.endswith(("query_norm.scale", "key_norm.scale"))


# Keys only a diffusers-named Flux has (FluxTransformer2DModel), and the guidance embedder that makes it dev
_DIFFUSERS_KEYS = ("x_embedder.weight", "single_transformer_blocks.0.proj_out.weight",
                   "time_text_embed.guidance_embedder.linear_1.weight")
_DIFFUSERS_DOUBLE_RE = re.compile(r"^transformer_blocks\.(\d+)\.")
_DIFFUSERS_SINGLE_RE = re.compile(r"^single_transformer_blocks\.(\d+)\.")


class Flux1Dev(ArchitectureProfile):
    family = "flux"
    variant = "flux1-dev"
    display_name = "FLUX.1-dev"
    full_dims = {"dim": 3072, "double_blocks": 19, "single_blocks": 38, "in_channels": 64, "context_dim": 4096,
                 "vec_dim": 768, "mlp_ratio": 4, "heads": 24}
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

    diffusers_class: ClassVar[str] = "FluxTransformer2DModel"
    config_dims: ClassVar[dict[str, str]] = {"num_layers": "double_blocks", "num_single_layers": "single_blocks"}
    # nvdiag has no map from the diffusers names (the q/k/v are fused in BFL's): see the module docstring
    diffusers_convertible: ClassVar[bool] = False

    def detect_diffusers_names(self, shapes: dict[str, tuple[int, ...]]) -> Detection | None:
        """A diffusers-named FLUX.1-dev (FluxTransformer2DModel keys), for lint and a clear refusal in convert."""
        if not all(k in shapes for k in _DIFFUSERS_KEYS):
            return None
        dims: dict[str, int] = {}
        if "x_embedder.bias" in shapes:
            dims["dim"] = shapes["x_embedder.bias"][0]
            dims["heads"] = dims["dim"] // HEAD_DIM
        for name, pattern in (("double_blocks", _DIFFUSERS_DOUBLE_RE), ("single_blocks", _DIFFUSERS_SINGLE_RE)):
            blocks = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
            dims[name] = max(blocks) + 1 if blocks else 0
        return replace(self.detection(dims), naming="diffusers")

    def diffusers_tensor_shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Every tensor of FluxTransformer2DModel (diffusers names) at `dims`: the names ComfyUI's flux_to_diffusers
        maps from, for fixtures of diffusers-named Flux files."""
        d = dims["dim"]
        mlp = dims["mlp_ratio"] * d
        s: dict[str, tuple[int, ...]] = {}

        def linear(name: str, out_f: int, in_f: int) -> None:
            s[name + ".weight"] = (out_f, in_f)
            s[name + ".bias"] = (out_f,)

        linear("x_embedder", d, dims["in_channels"])
        linear("context_embedder", d, dims["context_dim"])
        embedders = (("timestep_embedder", 256), ("guidance_embedder", 256), ("text_embedder", dims["vec_dim"]))
        for embedder, in_f in embedders:
            linear(f"time_text_embed.{embedder}.linear_1", d, in_f)
            linear(f"time_text_embed.{embedder}.linear_2", d, d)
        for n in range(dims["double_blocks"]):
            p = f"transformer_blocks.{n}."
            linear(p + "norm1.linear", 6 * d, d)
            linear(p + "norm1_context.linear", 6 * d, d)
            for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
                linear(f"{p}attn.{proj}", d, d)
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                s[f"{p}attn.{norm}.weight"] = (HEAD_DIM,)
            for ff in ("ff", "ff_context"):
                linear(f"{p}{ff}.net.0.proj", mlp, d)
                linear(f"{p}{ff}.net.2", d, mlp)
        for n in range(dims["single_blocks"]):
            p = f"single_transformer_blocks.{n}."
            linear(p + "norm.linear", 3 * d, d)
            for proj in ("to_q", "to_k", "to_v"):
                linear(f"{p}attn.{proj}", d, d)
            s[p + "attn.norm_q.weight"] = (HEAD_DIM,)
            s[p + "attn.norm_k.weight"] = (HEAD_DIM,)
            linear(p + "proj_mlp", mlp, d)
            linear(p + "proj_out", d, d + mlp)
        linear("norm_out.linear", 2 * d, d)
        linear("proj_out", dims["in_channels"], d)
        return s

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
