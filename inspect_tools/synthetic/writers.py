"""Writers of synthetic safetensors checkpoints: plain float (single or sharded), NVFP4 mixed, FP8 comfy_quant and
legacy scaled_fp8. Every writer writes to a temporary file beside the target and renames it into place."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from inspect_tools.synthetic.faults import apply_faults
from inspect_tools.synthetic.mixed import MixedPlan
from inspect_tools.synthetic.state_dicts import float_state_dict, profile_for, selected
from reference_specs import formats

SHARD_NAME = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
InputScale = None | str | float | dict[str, float]


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or None)
    os.replace(tmp, path)
    return path


def write_sharded(tensors: dict[str, torch.Tensor], folder: str | Path, shards: int,
                  metadata: dict[str, str] | None = None) -> Path:
    """The diffusers sharded layout: N shards of about equal size + index.json; returns the index path."""
    folder = Path(folder)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    budget = total / shards
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    filled, part = 0, 0
    for key, tensor in tensors.items():
        if filled >= budget * (part + 1) and part < shards - 1:
            part += 1
        parts[part][key] = tensor
        filled += tensor.numel() * tensor.element_size()
    weight_map = {}
    for i, chunk in enumerate(parts):
        name = SHARD_NAME.format(i + 1, shards)
        save_safetensors(chunk, folder / name, metadata)
        weight_map.update(dict.fromkeys(chunk, name))
    index = folder / INDEX_NAME
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, index)
    return index


def write_float(
    path: str | Path,
    variant: str,
    dims: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    naming: str = "native",
    seed: int = 0,
    sharded: int | None = None,
    prefix: str = "",
    statistic: str = "structured",
) -> Path:
    """A plain float checkpoint. sharded=N: `path` is a folder receiving N shards + index.json (returned)."""
    tensors = {prefix + k: v for k, v in float_state_dict(variant, dims, dtype, naming, seed, statistic).items()}
    if sharded:
        return write_sharded(tensors, path, sharded)
    return save_safetensors(tensors, path)


def _plan(variant: str, dims: dict[str, int] | None, dtype: torch.dtype, seed: int, codec: formats.Format,
          conf: dict, selection: Callable[[str], bool] | None, naming: str, prefix: str, markers: str,
          statistic: str = "structured") -> MixedPlan:
    profile = profile_for(variant)
    chosen = selected(variant, dims, selection)
    source, quantized = _quantized_model(variant, dims, dtype, seed, codec, tuple(chosen), statistic)
    plan = MixedPlan(profile=profile, source=source, codec=codec, conf=conf, tensors=dict(quantized),
                     quantized=list(chosen), markers=markers, naming=naming, prefix=prefix)
    plan.targets = list(plan.quantized)
    return plan


# Quantizing a fixture costs far more than writing it, and tests build the same model many times (one per fault):
# the last few quantized models are kept. Safe because plans and faults replace tensors, never modify them in place.
_CACHE: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
_CACHE_SIZE = 8


def _quantized_model(variant: str, dims: dict[str, int] | None, dtype: torch.dtype, seed: int,
                     codec: formats.Format, chosen: tuple[str, ...], statistic: str) -> tuple[dict, dict]:
    key = (variant, tuple(sorted((dims or {}).items())), dtype, seed, type(codec).__name__, chosen, statistic)
    if key not in _CACHE:
        source = float_state_dict(variant, dims, dtype, "native", seed, statistic)
        plan = MixedPlan(profile=profile_for(variant), source=source, codec=codec, conf={})
        for base in chosen:
            plan.quantize(base)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (source, plan.tensors)
    return _CACHE[key]


def _add_input_scales(plan: MixedPlan, input_scale: InputScale) -> None:
    if input_scale is None:
        return
    for base in plan.quantized:
        if input_scale == "weight-derived":
            value = plan.tensors[f"{base}.weight_scale_2"].clone()
        elif isinstance(input_scale, dict):
            if base not in input_scale:
                continue
            value = torch.tensor(float(input_scale[base]), dtype=torch.float32)
        elif isinstance(input_scale, int | float):
            value = torch.tensor(float(input_scale), dtype=torch.float32)
        else:
            raise ValueError(f"input_scale must be None, 'weight-derived', a float or a dict, not {input_scale!r}")
        plan.tensors[f"{base}.input_scale"] = value


def nvfp4_mixed_plan(
    variant: str,
    dims: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    selection: Callable[[str], bool] | None = None,
    input_scale: InputScale = None,
    markers: str = "tensor",
    naming: str = "native",
    prefix: str = "",
    faults: tuple[str, ...] | list[str] = (),
    fault_layers: list[str] | None = None,
    seed: int = 0,
    full_precision_mm: bool = False,
    statistic: str = "structured",
) -> MixedPlan:
    """The NVFP4 mixed file before writing (see write_nvfp4_mixed); tests read `.quantized` and `.source`.
    full_precision_mm: every marker says "full_precision_matrix_mult": true (W4A16 on Blackwell)."""
    conf: dict[str, object] = {"format": "nvfp4"}
    if full_precision_mm:
        conf["full_precision_matrix_mult"] = True
    plan = _plan(variant, dims, dtype, seed, formats.get("nvfp4")(), conf, selection, naming, prefix, markers,
                 statistic)
    _add_input_scales(plan, input_scale)
    if fault_layers is not None:
        plan.targets = [b for b in fault_layers if b in plan.quantized]
    apply_faults(plan, faults)
    return plan


def write_nvfp4_mixed(path: str | Path, variant: str, **options: object) -> Path:
    """An NVFP4 mixed checkpoint as ComfyUI loads it (options: those of nvfp4_mixed_plan).

    Quantized: the 2-D linears inside the blocks (or `selection(native_base_name)`), through the reference codec
    (weight U8, swizzled F8_E4M3 block scales, F32 0-d weight_scale_2); all else at source precision `dtype`.
    markers: "tensor" (per-layer .comfy_quant), "metadata" (header _quantization_metadata) or "both".
    input_scale: None (absent, dynamic in ComfyUI), "weight-derived", a float, or {native_base_name: float}.
    faults: names from synthetic.FAULTS, applied to `fault_layers` (default: every quantized layer).
    """
    tensors, metadata = nvfp4_mixed_plan(variant, **options).finish()  # type: ignore[arg-type]
    return save_safetensors(tensors, path, metadata)


def write_fp8_comfy(
    path: str | Path,
    variant: str,
    dims: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    selection: Callable[[str], bool] | None = None,
    markers: str = "tensor",
    naming: str = "native",
    prefix: str = "",
    seed: int = 0,
    statistic: str = "structured",
) -> Path:
    """comfy_quant float8_e4m3fn: weight F8_E4M3 + weight_scale F32 0-d (amax/448) + marker, same selection."""
    plan = _plan(variant, dims, dtype, seed, formats.get("float8_e4m3fn")(), {"format": "float8_e4m3fn"},
                 selection, naming, prefix, markers, statistic)
    tensors, metadata = plan.finish()
    return save_safetensors(tensors, path, metadata)


def write_scaled_fp8_legacy(
    path: str | Path,
    variant: str,
    dims: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    selection: Callable[[str], bool] | None = None,
    full_precision_matrix_mult: bool = False,
    naming: str = "native",
    prefix: str = "",
    seed: int = 0,
) -> Path:
    """Legacy Kijai/Comfy fp8_scaled: `scaled_fp8` marker tensor (2 elements = full_precision_matrix_mult, per
    ComfyUI's convert_old_quants) + per-layer weight F8_E4M3 and scale_weight F32; no comfy_quant, no metadata."""
    plan = _plan(variant, dims, dtype, seed, formats.get("scaled_fp8")(), {}, selection, naming, prefix, "none")
    plan.tensors["scaled_fp8"] = torch.zeros(2 if full_precision_matrix_mult else 0, dtype=torch.float8_e4m3fn)
    tensors, metadata = plan.finish()
    return save_safetensors(tensors, path, metadata)
