"""NV112: a published quantized layout ComfyUI does not load, whose bytes rewrite losslessly into ComfyUI's format.

The formats say which they are (Format.native_slug) and how they rewrite (Format.native_tensors): adding such a
format adds it to this rule, with nothing to change here but the explanation's list of known layouts.
"""

from __future__ import annotations

from collections.abc import Iterable

from reference_specs import formats
from reference_specs.findings import Finding
from reference_specs.layer import Layer
from reference_specs.rules.base import ModelView, Rule, RuleContext


def foreign_format(layer: Layer) -> type[formats.Format] | None:
    """The layer's format when it is a foreign layout with a native rewrite (other rules leave such layers to NV112:
    one finding for one defect), else None."""
    try:
        fmt = formats.get(layer.format)
    except KeyError:
        return None
    return fmt if fmt.native_slug is not None else None


class ForeignLayout(Rule):
    id = "NV112"
    name = "foreign-layout"
    cause = "foreign-layout"
    summary = "a published quantized layout ComfyUI does not load (LightX2V, ModelOpt NVFP4); nvdiag fix rewrites it"
    explanation = """\
Some quantizers publish NVFP4 in their own runtime's layout. The bytes are NVFP4, but not as ComfyUI stores it.

LightX2V NVFP4 (ModelTC/LightX2V tools/convert/quant; the lightx2v/Wan-NVFP4 checkpoints): `.weight` U8 with the
even element in the LOW nibble (NVIDIA's kernel order), `.weight_scale` F8_E4M3 already in the swizzled 128x4 tile
layout, `.input_global_scale` = 2688/act_absmax and `.alpha` = 1/(input_global_scale * weight_global_scale), with no
`.weight_scale_2`, no `.comfy_quant` and no `_quantization_metadata`. ComfyUI's answer (Comfy-Org/ComfyUI#11640):
"Lightx format is not supported and will most likely never will be". With no marker anywhere, ComfyUI (0.8.0) builds
plain Linear layers and copies the packed U8 weight into them: the load stops with `size mismatch for
blocks.0.self_attn.q.weight: copying a param with shape [out, in/2] ... the shape in current model is [out, in]`.

NVIDIA ModelOpt NVFP4 exports (e.g. nvidia/Wan2.2-T2V-A14B-Diffusers-NVFP4; recognised by `quantization_config`
`quant_method: "modelopt"` in the transformer's config.json): ComfyUI's tensor names and scale conventions, but
diffusers key names (NV302: ComfyUI cannot detect the model), codes low nibble first, block scales row-major [out,
in/16] (the swizzle is opt-in at export), no marker. Even renamed, without a marker ComfyUI stops with the same size
mismatch; with a marker added by hand it loads and decodes every block as noise (wrong nibble order and scale layout,
no error). `.weight_scale_2` is amax/2688, or amax/(6*256) under ModelOpt's "four over six" block scaling: both
decode the same way, so nvdiag decodes and judges the values (`nvdiag roundtrip`) and does not lint the constant.

What you see: the model does not load (size mismatch), or, in loaders that skip mismatched keys, runs on garbage.

Fix: `nvdiag fix` rewrites each layer losslessly into ComfyUI's NVFP4: nibbles swapped, block scales kept,
`.weight_scale_2` = alpha * input_global_scale (= 1/weight_global_scale, the decode multiplier), `.input_scale` =
1/input_global_scale (act_absmax/2688, LightX2V's calibrated activation scale), alpha and input_global_scale dropped,
`.comfy_quant` {"format": "nvfp4"} and a `_quantization_metadata` entry added. A ModelOpt layer gets its nibbles
swapped and its block scales zero-padded and swizzled, every scale kept as it is, the markers added, and (NV302) the
keys renamed to ComfyUI's in the same run."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            fmt = foreign_format(layer)
            if fmt is None:
                continue
            problem = fmt.decode_problem(layer)
            remedy = (f"nvdiag fix rewrites it into {fmt.native_slug} losslessly" if problem is None else
                      f"it cannot be rewritten as it is: {problem[1]}")
            yield self.finding(
                f"{fmt.slug} layer ({fmt.describe()}): ComfyUI does not load this layout; {remedy}",
                layer.name,
                {"format": fmt.slug, "native": fmt.native_slug, "roles": sorted(layer.tensors),
                 **({"problem": problem[1]} if problem is not None else {})},
            )
