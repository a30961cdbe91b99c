"""Synthetic NVIDIA ModelOpt NVFP4 exports (issue 16), a diffusers `transformer/` folder built from the public
description of that export (reference_specs/formats/modelopt.py has the sources), not from nvdiag's encoders:
- diffusers key names; per quantized linear `.weight` U8 [out, in/2] with the even element in the LOW nibble,
  `.weight_scale` F8_E4M3 [out, in/16] row-major, `.weight_scale_2` F32 = amax/2688, `.input_scale` F32 =
  act_absmax/2688; every other tensor as in the source;
- "four over six" (four_over_six=True): weight_scale_2 = amax/(6*256) and each block scaled so its largest element
  lands on 6 or on 4, whichever reconstructs the block with the smaller squared error (adaptive block scaling);
- config.json: the published transformer config plus `quantization_config` {"quant_method": "modelopt",
  "quant_algo": "NVFP4"}; no comfy_quant marker, no header metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inspect_tools.synthetic.diffusers_folders import transformer_config
from inspect_tools.synthetic.lightx2v import E2M1_GRID, round_e2m1
from inspect_tools.synthetic.state_dicts import float_state_dict, profile_for
from inspect_tools.synthetic.writers import save_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _decode_codes(codes: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(E2M1_GRID)
    values = grid[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -values, values)


def _blocks_for(blocks: torch.Tensor, scale_2: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp8 block scales) with every block's largest element scaled onto `top` (6, or 4)."""
    sf = (blocks.abs().amax(-1) / top / scale_2).clamp(max=448.0).to(torch.float8_e4m3fn)
    total = sf.to(torch.float32) * scale_2
    safe = torch.where(total > 0, total, torch.ones_like(total))
    scaled = torch.where(total.unsqueeze(-1) > 0, blocks / safe.unsqueeze(-1), torch.zeros_like(blocks))
    return round_e2m1(scaled), sf


def quantize_modelopt(weight: torch.Tensor, four_over_six: bool = False) -> dict[str, torch.Tensor]:
    """A float [out, in] weight (in % 16 == 0) -> ModelOpt's weight, weight_scale and weight_scale_2."""
    w = weight.to(torch.float32)
    out_f, in_f = w.shape
    amax = w.abs().max()
    scale_2 = amax / (6.0 * 256.0 if four_over_six else 6.0 * 448.0)
    blocks = w.reshape(out_f, in_f // 16, 16)
    codes, sf = _blocks_for(blocks, scale_2, 6.0)
    if four_over_six:
        codes4, sf4 = _blocks_for(blocks, scale_2, 4.0)

        def error(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return ((_decode_codes(c) * (s.to(torch.float32) * scale_2).unsqueeze(-1) - blocks) ** 2).sum(-1)

        four = error(codes4, sf4) < error(codes, sf)
        codes = torch.where(four.unsqueeze(-1), codes4, codes)
        sf = torch.where(four, sf4.view(torch.uint8), sf.view(torch.uint8)).view(torch.float8_e4m3fn)
    codes = codes.reshape(out_f, in_f)
    return {"weight": codes[:, 0::2] | (codes[:, 1::2] << 4), "weight_scale": sf,
            "weight_scale_2": scale_2.reshape(())}


def write_modelopt_nvfp4(folder: str | Path, variant: str, layers: list[str], dims: dict[str, int] | None = None,
                         dtype: torch.dtype = torch.bfloat16, seed: int = 0, four_over_six: bool = False) -> Path:
    """A ModelOpt NVFP4 `transformer/` folder of the synthetic `variant` (the float source write_float writes with
    the same arguments) with `layers` (native base names) quantized. Returns the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    profile = profile_for(variant)
    tensors = float_state_dict(variant, dims, dtype, "native", seed)
    out: dict[str, torch.Tensor] = {}
    chosen = set(layers)
    for i, (key, tensor) in enumerate(tensors.items()):
        base, _, role = key.rpartition(".")
        name = profile.to_diffusers(key)
        if base in chosen and role == "weight":
            stem = name[: -len(".weight")]
            out.update({f"{stem}.{r}": t for r, t in quantize_modelopt(tensor, four_over_six).items()})
            out[f"{stem}.input_scale"] = torch.tensor((3.0 + 1.5 * (i % 5)) / 2688.0, dtype=torch.float32)
        else:
            out[name] = tensor
    path = save_safetensors(out, folder / WEIGHTS_NAME)
    config = transformer_config(variant, dims)
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return path
