"""NV201-NV203: scale values that decode to absurd weights, that are not finite or positive, or input scales that
are not calibrated activation scales. Reads scalars and block scales only."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from reference_specs.findings import Finding, Severity
from reference_specs.formats.nvfp4 import F4_E2M1_MAX, F8_E4M3_MAX
from reference_specs.layer import Layer
from reference_specs.rules.base import FP8_DTYPES, NVFP4, ModelView, Rule, RuleContext
from reference_specs.rules.foreign_layouts import foreign_format
from reference_specs.rules.scale_data import BLOCK_SCALE_DTYPES

if TYPE_CHECKING:
    import torch

NVFP4_RANGE = F4_E2M1_MAX * F8_E4M3_MAX  # 2688: the largest value an NVFP4 layer can decode to per unit of scale_2
# A diffusion model's weights have amax of order 0.01..10 (a few reach ~100); a per-tensor scale above 1 means the
# decoded amax exceeds 2688, which only a reciprocal (2688/amax) produces.
MAX_WEIGHT_SCALE_2 = 1.0
# Activation amax of diffusion transformers reaches 1e3..1e5 at most: input_scale = amax/2688 stays below ~40.
MAX_INPUT_SCALE = 100.0
MIN_INPUT_SCALE = 1e-5
CONSTANT_INPUT_SCALE_LAYERS = 4
# The smallest normal float32, 2^-126. A per-tensor scale below it is subnormal: GPU kernels built with
# flush-to-zero treat it as 0 (the layer decodes to zeros on the GPU, not on the CPU), and no real weight gives one:
# amax/2688 (NVFP4) or amax/448 (FP8) is subnormal only for amax < 3.2e-35, which every compute dtype ComfyUI uses
# (bf16 and fp32 flush below 2^-126 too, fp16 below 6e-8) holds as zero. So such a scale is a zero in disguise.
MIN_NORMAL_F32 = 2.0**-126
# Per-tensor decode multipliers: NVFP4 weight_scale_2, FP8 weight_scale, legacy scaled_fp8 scale_weight; and the
# static activation scales (input_scale, legacy scale_input) they multiply with.
TENSOR_SCALE_ROLES = ("weight_scale_2", "scale_weight", "input_scale", "scale_input")
COMPRESSED_TENSORS_ROLES = ("weight_global_scale", "input_global_scale")


def _fp8_weight_scale(layer: Layer, ctx: RuleContext) -> float | None:
    if layer.dtype("weight") in FP8_DTYPES:
        return ctx.scalar(layer, "weight_scale")
    return None


class Scale2Reciprocal(Rule):
    id = "NV201"
    name = "scale2-reciprocal"
    cause = "scale2-reciprocal"
    needs_values = True
    summary = "weight_scale_2 / input_scale stored as 2688/amax (the reciprocal) instead of amax/2688"
    explanation = """\
ComfyUI multiplies: decoded weight = e2m1(code) * weight_scale_2 * fp8(block scale), so `.weight_scale_2` must be the
decode multiplier amax(|W|)/(448*6). Tools from the compressed-tensors / ModelOpt family store the *quantize*
factor 448*6/amax (often named `weight_global_scale`); loaded as-is every weight comes out amax^2/2688^2 times too
large or too small. The same holds for `.input_scale` (amax of activations / 2688) and an FP8 `.weight_scale`
(amax/448). This rule flags per-tensor scales whose decoded amax (2688 * weight_scale_2) is absurd for a diffusion
model (above 2688), and the compressed-tensors names ComfyUI ignores.

What you see: the model loads and produces saturated noise, NaNs or black frames.

Fix: `nvdiag fix` stores 1/x for these scales (and renames weight_global_scale); or re-export with `nvdiag convert`."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            if foreign_format(layer) is not None:
                continue  # its scales are the layout's own convention: NV112 names the layout and fix rewrites them
            for role in COMPRESSED_TENSORS_ROLES:
                if layer.has(role):
                    yield self.finding(
                        f"{role} is the compressed-tensors reciprocal (2688/amax) under a name ComfyUI ignores; "
                        f"ComfyUI needs weight_scale_2 = amax/2688",
                        layer.name,
                        {"role": role, "value": ctx.scalar(layer, role)},
                    )
            yield from self._values(layer, ctx)

    def _values(self, layer: Layer, ctx: RuleContext) -> Iterator[Finding]:
        checks: list[tuple[str, float | None, float, float]] = []
        if layer.format == NVFP4:
            checks.append(("weight_scale_2", ctx.scalar(layer, "weight_scale_2"), MAX_WEIGHT_SCALE_2, NVFP4_RANGE))
            checks.append(("input_scale", ctx.scalar(layer, "input_scale"), MAX_INPUT_SCALE, NVFP4_RANGE))
        fp8 = _fp8_weight_scale(layer, ctx)
        if fp8 is not None:
            checks.append(("weight_scale", fp8, MAX_WEIGHT_SCALE_2, F8_E4M3_MAX))
        for role, value, limit, span in checks:
            if value is None or not math.isfinite(value) or value <= limit:
                continue
            yield self.finding(
                f"{role} = {value:.4g} decodes to amax {value * span:.4g}: looks like the reciprocal "
                f"({span:g}/amax, amax would be {span / value:.4g})",
                layer.name,
                {"role": role, "value": value, "decoded_amax": value * span, "amax_if_reciprocal": span / value,
                 "limit": limit},
            )


def block_scale_counts(raw: torch.Tensor) -> dict[str, int] | None:
    """NaN / negative / zero counts of FP8 E4M3 block scales from their raw bytes; None when all is well.

    E4M3 (OCP FP8 spec): bit 7 is the sign, 0x7F and 0xFF are NaN, there is no Inf; 0x80 is -0, counted as zero.
    So finite positive scales are exactly the bytes 0x01..0x7E plus zeros, and one max() over the bytes clears a
    healthy layer (a 14B model has ~900 MB of block scales: this has to be one cheap pass).
    Zeros include the 128x4 tile padding, so only "every byte zero" says something about the layer.
    """
    import torch

    flat = raw.view(torch.uint8).reshape(-1)
    if flat.numel() == 0:
        return None
    top = int(flat.max())
    if 0 < top < 0x7F:
        return None
    counts = torch.bincount(flat, minlength=256) if top else None
    nan = int(counts[0x7F] + counts[0xFF]) if counts is not None else 0
    zero = int(counts[0x00] + counts[0x80]) if counts is not None else flat.numel()
    negative = int(counts[0x81:0xFF].sum()) if counts is not None else 0
    if not nan and not negative and zero != flat.numel():
        return None
    return {"nan": nan, "inf": 0, "negative": negative, "zero": zero, "total": flat.numel()}


# Bits of a stored weight byte that are not the sign: zero exactly for +0 and -0 codes. NVFP4 packs two E2M1 codes
# (sign bits 0x80 and 0x08); FP8 E4M3/E5M2 has one sign bit (0x80).
MAGNITUDE_BITS = {"U8": 0x77, "F8_E4M3": 0x7F, "F8_E5M2": 0x7F}
# The per-tensor decode multipliers: a zero one over zero codes is an all-zero layer, not a lost scale.
DECODE_MULTIPLIERS = ("weight_scale_2", "weight_scale", "scale_weight")


def zero_codes(layer: Layer) -> bool:
    """True when every stored code of a quantized weight (NVFP4 nibbles, FP8 bytes) is +0 or -0: the weight was all
    zero. Zero scales over non-zero codes are scales that went missing, not a zero layer."""
    import torch

    mask = MAGNITUDE_BITS.get(layer.dtype("weight") or "")
    if mask is None:
        return False
    packed = layer.load("weight").view(torch.uint8).reshape(-1)
    return packed.numel() > 0 and not bool((packed & mask).any())


class NonFiniteScale(Rule):
    id = "NV202"
    name = "non-finite-scale"
    cause = "non-finite-scale"
    needs_values = True
    summary = "NaN, Inf, zero or negative scales"
    explanation = """\
Scales multiply every decoded weight. A NaN or Inf scale turns its 16-element block (block scale) or the whole layer
(weight_scale_2) into NaN, which spreads through attention and gives black or NaN frames; a zero per-tensor scale
zeroes the layer; negative scales flip signs. FP8 E4M3 has no Inf but encodes NaN as 0x7F/0xFF, which a writer
produces when it casts an overflowing value without clamping to 448. Zero block scales are legitimate where a block
of weights is all zero and in the padding of the 128x4 tiles, so only a layer whose block scales are all zero is
reported (its weights all decode to zero), and not when its FP4 codes are all zero too: that is an all-zero
weight, which real models have and which decodes to exact zeros (a zero per-tensor scale over all-zero codes is
one too: an info). A per-tensor scale below the smallest normal
float32 (2^-126) is a zero in disguise: no real weight's amax gives one, and flush-to-zero GPU kernels read it as 0.
Legacy scaled_fp8 files are checked the same way (`scale_weight`, `scale_input`). Block scales are checked on their
raw bytes, every layer of a file with up to 256 MB of them; beyond that an evenly spread sample of layers
(`nvdiag lint --all-scales` reads all).

Fix: re-export with `nvdiag convert` (it clamps block scales to 448 and keeps the per-tensor scale positive)."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            yield from self._scalars(layer, ctx)
        # NVFP4's block scales, and those of the published layouts nvdiag fix rewrites into it (their format says
        # which role holds them): a NaN there survives the rewrite
        blocked = [layer for layer in model.layers.values() if layer.format == NVFP4 or (
            (fmt := foreign_format(layer)) is not None and fmt.block_scale_role == "weight_scale")]
        for layer in ctx.within_budget(blocked):
            yield from self._blocks(layer, ctx)

    def _scalars(self, layer: Layer, ctx: RuleContext) -> Iterator[Finding]:
        roles = list(TENSOR_SCALE_ROLES)
        if layer.dtype("weight") in FP8_DTYPES:
            roles.append("weight_scale")
        foreign = foreign_format(layer)
        if foreign is not None:  # a published layout's own scalars (LightX2V's alpha, input_global_scale)
            roles += [r for r, spec in foreign.signature.items() if spec.scalar and r not in roles]
        for role in roles:
            value = ctx.scalar(layer, role) if layer.has(role) else None
            if value is None or (math.isfinite(value) and value >= MIN_NORMAL_F32):
                continue
            if value == 0 and role in DECODE_MULTIPLIERS and zero_codes(layer):
                # ComfyUI only multiplies by a stored scale (a LoRA re-quantization recalculates its own from the
                # patched weight, comfy/ops.py scale="recalculate"), so this decodes to exact zeros: information
                yield self.finding(f"{role} = 0 over all-zero codes: an all-zero layer, it decodes to zeros",
                                   layer.name, {"role": role, "value": value, "all_zero_codes": True},
                                   severity=Severity.INFO)
                continue
            if math.isfinite(value) and value > 0:
                yield self.finding(f"{role} = {value:.4g} is subnormal (below 2^-126 = {MIN_NORMAL_F32:.4g}): no "
                                   "real weight gives it, and flush-to-zero GPU kernels read it as 0",
                                   layer.name, {"role": role, "value": value, "min_normal": MIN_NORMAL_F32})
                continue
            yield self.finding(f"{role} = {value}: scales must be finite and positive", layer.name,
                               {"role": role, "value": value})

    def _blocks(self, layer: Layer, ctx: RuleContext) -> Iterator[Finding]:
        if layer.dtype("weight_scale") not in BLOCK_SCALE_DTYPES:
            return  # a wrong dtype is NV105's; its bytes mean nothing as E4M3
        counts = block_scale_counts(layer.load("weight_scale"))
        if counts is not None and not counts["nan"] and not counts["negative"] and zero_codes(layer):
            return  # an all-zero layer (they exist in real models): zero scales, zero codes, decodes to exact zeros
        if counts is not None:
            what = ", ".join(f"{counts[k]} {k}" for k in ("nan", "negative") if counts[k])
            yield self.finding(f"block scales: {what or 'all zero'} (of {counts['total']})", layer.name,
                               {"role": "weight_scale", **counts})


class InputScaleImplausible(Rule):
    id = "NV203"
    name = "input-scale-implausible"
    cause = "input-scale-implausible"
    severity = Severity.WARNING
    needs_values = True
    summary = "static input_scale that is not a calibrated activation scale"
    explanation = """\
On Blackwell GPUs ComfyUI quantizes each layer's input activations to NVFP4 before the matmul. With
`<layer>.input_scale` in the file it uses that value as the static per-tensor activation scale (amax of the
activations / 2688); without it, it computes the scale dynamically on every call. Absent input_scale is therefore
the safe default. A static scale only helps when it was calibrated on real activations: one copied from the
weights (equal to weight_scale_2), the same constant for every layer, or a value outside any plausible activation
range clips the activations (block scales saturate at 448) and the output degrades, while non-Blackwell GPUs
(which dequantize) show no problem: "works on my 4090, noise on my 5090".

Fix: `nvdiag fix` drops the input_scale tensors (dynamic scaling), or supply calibrated scales to `nvdiag convert`."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        values: dict[str, float] = {}
        for layer in ctx.layers_of(NVFP4):
            value = ctx.scalar(layer, "input_scale") if layer.has("input_scale") else None
            if value is None or not math.isfinite(value) or value <= 0:
                continue  # absent is right; non-finite is NV202's
            values[layer.name] = value
            yield from self._layer(layer, value, ctx)
        yield from self._constant(values)

    def _layer(self, layer: Layer, value: float, ctx: RuleContext) -> Iterator[Finding]:
        scale_2 = ctx.scalar(layer, "weight_scale_2")
        if scale_2 is not None and math.isclose(value, scale_2, rel_tol=1e-6):
            yield self.finding(
                f"input_scale = weight_scale_2 = {value:.4g}: derived from the weights, not from activations",
                layer.name,
                {"input_scale": value, "weight_scale_2": scale_2, "reason": "equals-weight-scale"},
            )
        elif value < MIN_INPUT_SCALE:
            yield self.finding(
                f"input_scale = {value:.4g} implies activation amax {value * NVFP4_RANGE:.3g}: implausibly small",
                layer.name,
                {"input_scale": value, "plausible": [MIN_INPUT_SCALE, MAX_INPUT_SCALE], "reason": "out-of-range"},
            )

    def _constant(self, values: dict[str, float]) -> Iterator[Finding]:
        if len(values) < CONSTANT_INPUT_SCALE_LAYERS:
            return
        value, count = Counter(values.values()).most_common(1)[0]
        if count >= CONSTANT_INPUT_SCALE_LAYERS and count >= 0.9 * len(values):
            yield self.finding(
                f"{count} of {len(values)} layers share input_scale = {value:.4g}: a constant, not a calibration",
                None,
                {"input_scale": value, "layers_with_value": count, "layers_with_input_scale": len(values),
                 "reason": "constant"},
            )
