"""NV301-NV304: architecture-level findings: sensitive layers quantized, diffusers names, unknown model, legacy FP8."""

from __future__ import annotations

import re
from collections.abc import Iterable

from reference_specs import formats
from reference_specs.findings import Finding, Severity
from reference_specs.layer import Layer
from reference_specs.rules.base import ModelView, Rule, RuleContext

# Without an architecture profile only one thing is certain: normalisation weights are never worth quantizing.
_GENERIC_SENSITIVE = re.compile(r"(^|\.)(norm\w*|\w*_norm|ln_\w+|layernorm\w*)$")


def sensitive_reason(layer: Layer, ctx: RuleContext) -> str | None:
    name = layer.native_name or layer.name
    if ctx.profile is not None:
        return ctx.profile.sensitive(name)
    return "normalization" if _GENERIC_SENSITIVE.search(name) else None


class SensitiveLayerQuantized(Rule):
    id = "NV301"
    name = "sensitive-layer-quantized"
    cause = "sensitive-layer-quantized"
    summary = "a layer that must stay high precision (embeddings, modulation, norms, head, detection keys) is quantized"
    explanation = """\
Some layers are tiny in parameters but decisive for quality or for loading: patch/text/time embeddings, time
projection and modulation (adaLN) layers, norms, the output head / final layer, and the layers ComfyUI reads to
detect the model (Flux img_in/txt_in/vector_in, WAN head.modulation/patch_embedding). Quantizing them to NVFP4/FP8
saves almost nothing and costs visible quality (colour shifts, washed-out frames, flicker) or breaks detection.
Published working NVFP4 files keep them in BF16/F32.

Fix: re-export with `nvdiag convert` (its presets keep these layers high precision)."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            if not formats.is_quantized(layer.format):
                continue
            reason = sensitive_reason(layer, ctx)
            if reason:
                yield self.finding(
                    f"{layer.format} on a layer that should stay high precision ({reason})",
                    layer.name,
                    {"format": layer.format, "reason": reason, "native_name": layer.native_name},
                )


class DiffusersKeyNames(Rule):
    id = "NV302"
    name = "diffusers-key-names"
    cause = "diffusers-key-names"
    summary = "a WAN (or quantized diffusers-named) file ComfyUI will not convert: model detection fails"
    explanation = """\
ComfyUI's diffusion-model loader detects WAN by `head.modulation` and has no diffusers-to-ComfyUI converter for WAN
(only for Flux, SD3, AuraFlow, PixArt, Z-Image), so a WAN file with diffusers names (`blocks.N.attn1.to_q`,
`condition_embedder.*`, `scale_shift_table`) fails with "Could not detect model type". For the architectures it does
convert, the conversion only carries mapped `.weight`/`.bias` keys: `.weight_scale`, `.weight_scale_2`,
`.comfy_quant` are dropped, so a quantized diffusers-named file loses its scales.

Fix: `nvdiag convert` (or `nvdiag fix`) renames every key, auxiliary tensors and `_quantization_metadata` names
included, to ComfyUI-native names."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        detection = model.detection
        if detection.naming != "diffusers":
            return
        examples = [name for name in model.layers if name != (model.layers[name].native_name or name)][:5]
        evidence = {"family": detection.family, "variant": detection.variant, "naming": detection.naming,
                    "examples": examples}
        if detection.family == "wan":
            yield self.finding("WAN weights under diffusers names: ComfyUI fails with \"Could not detect model "
                               "type\"", None, evidence)
        elif any(formats.is_quantized(layer.format) for layer in model.layers.values()):
            yield self.finding(f"quantized {detection.family} file with diffusers names: ComfyUI's key conversion "
                               "drops the scale and marker tensors", None, evidence)


class UnknownArchitecture(Rule):
    id = "NV303"
    name = "unknown-architecture"
    cause = "unknown-architecture"
    severity = Severity.WARNING
    summary = "no supported architecture matches the keys and shapes"
    explanation = """\
nvdiag checks shapes and sensitive layers against architecture profiles (WAN 2.x, Qwen-Image, Flux). When none
matches, those checks are skipped and only format rules run. ComfyUI itself may still recognise the model; if it
does not, it fails with "Could not detect model type". Usual reasons: a text encoder or VAE passed instead of the
diffusion model, a truncated or partial shard, or an unsupported model.

Fix: lint the diffusion-model file (or the sharded index); `nvdiag inspect` shows what was detected."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        if model.detection.family == "unknown":
            yield self.finding(
                "no supported architecture matches this file: architecture checks skipped",
                None,
                {"layers": len(model.layers), "examples": list(model.layers)[:5]},
            )


class LegacyFp8Format(Rule):
    id = "NV304"
    name = "legacy-fp8-format"
    cause = "legacy-fp8-format"
    severity = Severity.INFO
    summary = "legacy scaled_fp8 + scale_weight file (loads, converted on the fly)"
    explanation = """\
Older FP8 checkpoints mark themselves with a file-level `scaled_fp8` tensor and store `<layer>.scale_weight` /
`<layer>.scale_input`. ComfyUI still loads them: `convert_old_quants` renames the scales to `.weight_scale` /
`.input_scale` (dropping input scales equal to 1.0) and attaches {"format": "float8_e4m3fn"} markers at load time.
Nothing is wrong; the note is there because tools other than ComfyUI may not understand the old names.

Fix (optional): `nvdiag convert` writes the current format with explicit markers."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        legacy = [layer.name for layer in model.layers.values() if layer.has("scale_weight")]
        if model.file_markers.get("scaled_fp8") is None and not legacy:
            return
        yield self.finding(
            f"legacy scaled_fp8 format ({len(legacy)} layer(s) with scale_weight): ComfyUI converts it at load",
            None,
            {"scaled_fp8_marker": model.file_markers.get("scaled_fp8") is not None, "layers": len(legacy)},
        )
