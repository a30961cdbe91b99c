"""Diffusers pipeline folders: the transformer(s) inside, and the output name of each.

A diffusers model repository holds its diffusion model in `transformer/`; WAN 2.2 A14B ships two experts, and
diffusers' WanPipeline says which is which: "`transformer` handles high-noise stages and `transformer_2` handles
low-noise stages" (WanPipeline docstring, boundary_ratio). ComfyUI loads each expert as its own diffusion model
file (Comfy-Org's repackaged files are named ..._high_noise_... and ..._low_noise_...), so converting such a
folder writes two files: OUT's name with `_high_noise` and `_low_noise` before the suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inspect_tools.errors import InputError, UsageError

# (subfolder, label): the order diffusers lists them in, which is also the order of repeated --preset options
EXPERT_FOLDERS = (("transformer", "high_noise"), ("transformer_2", "low_noise"))
_WEIGHTS_SUFFIXES = (".safetensors", ".index.json")


@dataclass(frozen=True)
class Expert:
    source: Path  # the transformer folder (weights + config.json)
    label: str  # "high_noise" / "low_noise" of a two-expert model, "" for a single transformer


def _holds_weights(folder: Path) -> bool:
    try:
        return any(p.is_file() and p.name.endswith(_WEIGHTS_SUFFIXES) for p in folder.iterdir())
    except OSError:
        return False


def pipeline_experts(src: str | Path) -> list[Expert]:
    """The transformers of a diffusers pipeline folder (model_index.json, transformer/, transformer_2/); [] when
    `src` is anything else (a weights file, an index.json, a folder holding weights itself)."""
    src = Path(src)
    if not src.is_dir() or _holds_weights(src):
        return []
    found = [(src / name, label) for name, label in EXPERT_FOLDERS if (src / name).is_dir()]
    if not found:
        return []
    if found[0][0].name != "transformer":
        raise InputError("holds transformer_2/ but no transformer/: the high-noise expert is missing", str(src))
    if len(found) == 1:
        return [Expert(found[0][0], "")]
    return [Expert(folder, label) for folder, label in found]


def expert_output(out: Path, expert: Expert) -> Path:
    """The file an expert is written to: OUT itself for a single transformer, else OUT's stem + _<label>."""
    return out if not expert.label else out.with_name(f"{out.stem}_{expert.label}{out.suffix}")


def expert_presets(presets: list[str], experts: list[Expert]) -> list[str]:
    """One preset per expert: one --preset serves every expert, or one per expert in folder order."""
    if len(presets) == 1:
        return presets * max(len(experts), 1)
    if len(presets) == len(experts) > 1:
        return list(presets)
    what = f"{len(experts)} experts (transformer/, transformer_2/)" if len(experts) > 1 else "one model"
    raise UsageError(f"{len(presets)} --preset options for {what}: give one, or one per expert in the order "
                     "transformer/ (high noise), transformer_2/ (low noise)")
