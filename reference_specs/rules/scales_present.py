"""NV101 / NV102: an NVFP4 layer without one of the two scales ComfyUI requires."""

from __future__ import annotations

from collections.abc import Iterable

from reference_specs.findings import Finding
from reference_specs.rules.base import FP8_DTYPES, NVFP4, ModelView, Rule, RuleContext

_LOAD_ERROR = (
    "ComfyUI's mixed-precision loader pops `.weight_scale` and `.weight_scale_2` for every layer whose comfy_quant "
    'says "nvfp4" and raises `ValueError: Missing NVFP4 scales for layer ...` when either is absent, so the whole '
    "model fails to load (comfy/ops.py _load_quantized_module)."
)


class MissingBlockScale(Rule):
    id = "NV101"
    name = "missing-block-scale"
    cause = "missing-block-scale"
    summary = "NVFP4 layer without its .weight_scale block scales"
    explanation = f"""\
An NVFP4 layer stores one FP8 E4M3 scale per 16 weights in `<layer>.weight_scale` (swizzled 128x4 tiles). {_LOAD_ERROR}

What you see: the load fails with "Missing NVFP4 scales". Usually the exporter dropped the tensor or renamed it
(e.g. `weight_scale_inv`, `scales`).

Fix: re-export the layer from the source weights with `nvdiag convert`, or keep it at high precision; the block
scales cannot be reconstructed from the packed 4-bit codes alone."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in ctx.layers_of(NVFP4):
            if not layer.has("weight_scale"):
                yield self.finding(
                    "NVFP4 layer has no .weight_scale: ComfyUI refuses to load the model",
                    layer.name,
                    {"roles": sorted(layer.tensors)},
                )


class MissingTensorScale(Rule):
    id = "NV102"
    name = "missing-tensor-scale"
    cause = "missing-tensor-scale"
    summary = "NVFP4 layer without its .weight_scale_2 per-tensor scale"
    explanation = f"""\
An NVFP4 layer needs a per-tensor F32 decode multiplier `<layer>.weight_scale_2` = amax(|W|) / (448 * 6).
{_LOAD_ERROR}

What you see: the load fails with "Missing NVFP4 scales". Files quantized with a single-level scale scheme, or
with compressed-tensors names (`weight_global_scale`), lack it.

Fix: re-export the layer with `nvdiag convert` (or let `nvdiag fix` repair the file where it can); keeping the
layer at high precision also works."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in ctx.layers_of(NVFP4):
            if not layer.has("weight_scale_2"):
                yield self.finding(
                    "NVFP4 layer has no .weight_scale_2: ComfyUI refuses to load the model",
                    layer.name,
                    {"roles": sorted(layer.tensors)},
                )


class MissingLegacyScale(Rule):
    id = "NV109"
    name = "missing-legacy-scale"
    cause = "missing-tensor-scale"
    summary = "FP8 weight of a legacy scaled_fp8 file without its .scale_weight"
    explanation = """\
A legacy scaled_fp8 file stores each FP8 weight with `<layer>.scale_weight`, the per-tensor decode multiplier
(W = fp8 * scale_weight). ComfyUI's convert_old_quants (comfy/utils.py) builds a layer's float8 marker from that
tensor alone, so an FP8 weight without it gets no marker: ComfyUI loads the raw FP8 values as a plain weight, off
by the missing factor (amax/448: a layer with amax 0.5 comes out ~900x too large).

What you see: the model loads without complaint and renders noise or NaN.

Fix: re-convert from the source with `nvdiag convert`; the scale cannot be recovered from the FP8 values."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        scaled = [layer for layer in model.layers.values() if layer.has("scale_weight")]
        if model.file_markers.get("scaled_fp8") is None and not scaled:
            return
        for layer in model.layers.values():
            if (layer.dtype("weight") in FP8_DTYPES and not layer.has("scale_weight")
                    and not layer.has("weight_scale") and layer.marker is None):
                yield self.finding(
                    "FP8 weight without .scale_weight in a legacy scaled_fp8 file: ComfyUI loads the raw FP8 "
                    "values unscaled", layer.name,
                    {"roles": sorted(layer.tensors), "scaled_layers": len(scaled)},
                )
