"""NV105: a tensor whose dtype is not the one its role requires in the layer's format."""

from __future__ import annotations

from collections.abc import Iterable

from reference_specs import formats
from reference_specs.findings import Finding
from reference_specs.rules.base import ModelView, Rule, RuleContext

# comfy_quant's dtype is invalid-quant-marker's business (NV104); reporting it twice helps nobody.
_SKIP_ROLES = frozenset({"comfy_quant"})

# What ComfyUI does with a wrong dtype per role (comfyui-load-path.md, "Misc loader tolerances").
_CONSEQUENCE = {
    "weight": "ComfyUI value-casts it with .to(uint8)/.to(fp8) instead of reinterpreting the bits: garbage weights",
    "weight_scale": "ComfyUI reinterprets the bytes with .view(float8_e4m3fn): wrong values or a shape error",
    "weight_scale_2": "the per-tensor multiplier must be a float32 scalar",
    "input_scale": "the static activation scale must be a float32 scalar",
}


class WrongDtype(Rule):
    id = "NV105"
    name = "wrong-dtype"
    cause = "wrong-dtype"
    summary = "a tensor's dtype is not what its role requires in the layer's format"
    explanation = """\
Every format has a fixed tensor signature. NVFP4: `.weight` U8 (two E2M1 codes per byte), `.weight_scale` F8_E4M3
(U8 accepted: same bytes), `.weight_scale_2` and `.input_scale` F32 scalars. FP8: `.weight` F8_E4M3/F8_E5M2 with an
F32 `.weight_scale`. ComfyUI does not check dtypes: it value-casts the packed weight with `.to(torch.uint8)` (an I8
or float weight becomes different numbers) and re-views block scales with `.view(float8_e4m3fn)` (a BF16/F32 scale
tensor is reinterpreted byte by byte, changing its shape). The model usually loads and produces noise, or fails
later with a shape error.

Fix: `nvdiag fix` re-stores tensors whose values are right but whose dtype is wrong; otherwise re-export with
`nvdiag convert`."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        if model.file_markers.get("container") == "gguf":
            return  # GGML types are not safetensors dtypes; GGUF layers are checked by their own format
        for layer in model.layers.values():
            if not formats.is_quantized(layer.format):
                continue
            try:
                fmt = formats.get(layer.format)
            except KeyError:
                continue
            for role, spec in fmt.signature.items():
                found = layer.dtype(role)
                if role in _SKIP_ROLES or found is None or found in spec.dtypes:
                    continue
                consequence = _CONSEQUENCE.get(role, "ComfyUI expects a different dtype")
                yield self.finding(
                    f"{role} is {found}, {layer.format} needs {' or '.join(spec.dtypes)}: {consequence}",
                    layer.name,
                    {"role": role, "expected": list(spec.dtypes), "found": found, "format": layer.format},
                )
