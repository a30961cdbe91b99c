"""Faults seen in real NVFP4 files, injected into a MixedPlan before it is written.

Shared by the lint, roundtrip, fix and diff tests: each fault reproduces one cause of shared/DESIGN.md's catalogue.
Per-layer faults act on `plan.targets` (by default every quantized layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from inspect_tools.synthetic.mixed import MixedPlan
from reference_specs.formats.nvfp4 import unswizzle

FP8_E4M3_NAN = 0x7F


@dataclass(frozen=True)
class Fault:
    name: str
    doc: str
    apply: Callable[[MixedPlan], None]


FAULTS: dict[str, Fault] = {}


def fault(name: str, doc: str) -> Callable[[Callable[[MixedPlan], None]], Callable[[MixedPlan], None]]:
    def register(fn: Callable[[MixedPlan], None]) -> Callable[[MixedPlan], None]:
        FAULTS[name] = Fault(name, doc, fn)
        return fn

    return register


def _each(plan: MixedPlan, role: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
    """Replace (or drop, when fn returns None) the `role` tensor of every target layer."""
    for base in plan.targets:
        key = f"{base}.{role}"
        if key in plan.tensors:
            new = fn(plan.tensors[key].clone())
            if new is None:
                del plan.tensors[key]
            else:
                plan.tensors[key] = new


@fault("scale-layout-linear", "block scales stored row-major (unswizzled), padded to the same shape")
def _scale_layout_linear(plan: MixedPlan) -> None:
    _each(plan, "weight_scale", unswizzle)


@fault("nibble-order", "FP4 codes packed low-nibble-first (element 2k in the low nibble)")
def _nibble_order(plan: MixedPlan) -> None:
    _each(plan, "weight", lambda w: ((w & 0x0F) << 4) | (w >> 4))


@fault("scale2-reciprocal", "weight_scale_2 stored as 2688/amax (= 1/s) instead of the multiplier amax/2688")
def _scale2_reciprocal(plan: MixedPlan) -> None:
    _each(plan, "weight_scale_2", lambda s: 1.0 / s)


@fault("missing-quant-marker", "neither comfy_quant tensors nor _quantization_metadata: ComfyUI loads raw bytes")
def _missing_quant_marker(plan: MixedPlan) -> None:
    plan.markers = "none"


@fault("missing-block-scale", "NVFP4 layers without .weight_scale")
def _missing_block_scale(plan: MixedPlan) -> None:
    _each(plan, "weight_scale", lambda s: None)


@fault("missing-tensor-scale", "NVFP4 layers without .weight_scale_2")
def _missing_tensor_scale(plan: MixedPlan) -> None:
    _each(plan, "weight_scale_2", lambda s: None)


@fault("weight-derived-input-scale", "input_scale copied from weight_scale_2 (not a calibrated activation scale)")
def _weight_derived_input_scale(plan: MixedPlan) -> None:
    for base in plan.targets:
        if f"{base}.weight_scale_2" in plan.tensors:
            plan.tensors[f"{base}.input_scale"] = plan.tensors[f"{base}.weight_scale_2"].clone()


@fault("stale-scale", "the scales of same-shaped layers swapped pairwise: scales that belong to other data")
def _stale_scale(plan: MixedPlan) -> None:
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for base in plan.targets:
        if f"{base}.weight" in plan.tensors:
            by_shape.setdefault(tuple(plan.tensors[f"{base}.weight"].shape), []).append(base)
    for group in by_shape.values():
        for a, b in zip(group[0::2], group[1::2], strict=False):
            for role in ("weight_scale", "weight_scale_2"):
                ka, kb = f"{a}.{role}", f"{b}.{role}"
                if ka in plan.tensors and kb in plan.tensors:
                    plan.tensors[ka], plan.tensors[kb] = plan.tensors[kb], plan.tensors[ka]


@fault("transposed-weight", "square layers quantized from W.T (weight stored [in, out])")
def _transposed_weight(plan: MixedPlan) -> None:
    for base in plan.targets:
        weight = plan.source[base + ".weight"]
        if weight.shape[0] == weight.shape[1]:
            plan.quantize(base, weight.T.contiguous())


@fault("wrong-dtype", "weight_scale_2 stored as F16 and block scales converted to BF16")
def _wrong_dtype(plan: MixedPlan) -> None:
    _each(plan, "weight_scale_2", lambda s: s.to(torch.float16))
    _each(plan, "weight_scale", lambda s: s.to(torch.bfloat16))


@fault("non-finite-scale", "one NaN in each target layer's block scales")
def _non_finite_scale(plan: MixedPlan) -> None:
    def poison(scales: torch.Tensor) -> torch.Tensor:
        raw = scales.view(torch.uint8).clone()
        raw[0, 0] = FP8_E4M3_NAN
        return raw.view(scales.dtype)

    _each(plan, "weight_scale", poison)


@fault("diffusers-key-names", "keys written with diffusers names (WAN): ComfyUI cannot detect the model")
def _diffusers_key_names(plan: MixedPlan) -> None:
    plan.naming = "diffusers"


@fault("metadata-prefix", "markers only in _quantization_metadata, under a 'transformer.' prefix no loader matches")
def _metadata_prefix(plan: MixedPlan) -> None:
    plan.markers = "metadata"
    plan.metadata_prefix = "transformer."


@fault("sensitive-layer-quantized", "the head and one modulation linear quantized too")
def _sensitive_layer_quantized(plan: MixedPlan) -> None:
    wanted = {"head", "modulation"}
    for key, tensor in plan.source.items():
        base = key[: -len(".weight")]
        if not key.endswith(".weight") or tensor.dim() != 2 or base in plan.quantized:
            continue
        role = plan.profile.role_of(base)
        if role in wanted:
            wanted.discard(role)
            plan.quantize(base)


def apply_faults(plan: MixedPlan, names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        FAULTS[name].apply(plan)
