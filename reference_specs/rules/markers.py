"""NV103 / NV104 / NV110: the quantization marker ComfyUI needs to treat a layer as quantized, whether it can read
it, and the broken marker tensors published files carry (placeholders, no format)."""

from __future__ import annotations

from collections.abc import Iterable

from reference_specs.findings import Finding, Severity
from reference_specs.layer import Layer
from reference_specs.rules.base import COMFY_QUANT_FORMATS, FP8_DTYPES, ModelView, Rule, RuleContext
from reference_specs.rules.foreign_layouts import foreign_format

# Prefixes ComfyUI strips from diffusion-model keys (model_detection.unet_prefix_from_state_dict) plus the ones
# exporters commonly add; used only to tell the user which spelling would have matched.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "model.", "net.", "transformer.")


def _legacy_fp8(model: ModelView, layer: Layer) -> bool:
    """Legacy scaled_fp8 files mark layers by the file-level `scaled_fp8` key; convert_old_quants adds markers."""
    return model.file_markers.get("scaled_fp8") is not None and (layer.has("scale_weight") or layer.has("weight_scale"))


def _needs_marker(layer: Layer) -> str | None:
    """Why a layer without a marker is a broken quantized layer, or None when it is a plain weight."""
    if layer.has("weight_packed"):
        return "compressed-tensors packed weight (.weight_packed, a name ComfyUI never reads)"
    dtype = layer.dtype("weight")
    if dtype in ("U8", "I8"):
        return f"packed {dtype} weight"
    if dtype in FP8_DTYPES and (layer.has("weight_scale") or layer.has("scale_weight")):
        # An FP8 weight with no scale is a plain fp8 checkpoint (loads by value); with a scale it needs the marker.
        return f"{dtype} weight with a scale"
    return None


class MissingQuantMarker(Rule):
    id = "NV103"
    name = "missing-quant-marker"
    cause = "missing-quant-marker"
    summary = "quantized weight with neither .comfy_quant nor a _quantization_metadata entry"
    explanation = """\
ComfyUI decides per layer whether a weight is quantized: only a `<layer>.comfy_quant` tensor (uint8 UTF-8 JSON such
as {"format": "nvfp4"}) or an entry for the layer in the header's `_quantization_metadata` makes it build a
quantized tensor. Without either, the layer is loaded as a plain weight cast to the compute dtype: packed NVFP4 bytes
become numbers 0..255 with the wrong shape ("size mismatch" at load) and FP8 weights lose their scale, so the model
loads but produces noise. The scale tensors end up as "left over keys" in the log.

Published files do this: LTX-2.5's official NVFP4 checkpoint ships its scale tensors with no marker anywhere, and
ComfyUI "silently throws away" 3528 of them (Comfy-Org/ComfyUI#15511, as reported there). In ComfyUI 0.8.0,
comfy/utils.py detect_layer_quantization finds no `.comfy_quant` key, so MixedPrecisionOps is never chosen; every
scale is logged by comfy/model_base.py load_model_weights as "unet unexpected" (a warning, not an error). An FP8
weight then loads as it is and the model runs with wrong output; a packed NVFP4 weight stops the load with "size
mismatch" in this version.

Fix: `nvdiag fix` adds the markers; `nvdiag convert` writes them (both the per-layer tensor and the metadata)."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        if model.file_markers.get("container") == "gguf":
            return
        for layer in model.layers.values():
            if layer.marker is not None or layer.marker_error is not None or layer.has("comfy_quant"):
                continue
            reason = _needs_marker(layer)
            if reason is None or _legacy_fp8(model, layer) or foreign_format(layer) is not None:
                continue
            yield self.finding(
                f"{reason} but no comfy_quant marker: ComfyUI loads the raw bytes as a plain weight",
                layer.name,
                {"weight_dtype": layer.dtype("weight"), "format": layer.format, "roles": sorted(layer.tensors)},
            )


def _suggest_prefix(name: str, layer_names: set[str]) -> str | None:
    """The spelling of a metadata name that would match a layer (prefix added or removed), if one does."""
    for prefix in KNOWN_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in layer_names:
            return name[len(prefix):]
        if prefix + name in layer_names:
            return prefix + name
    return None


class InvalidQuantMarker(Rule):
    id = "NV104"
    name = "invalid-quant-marker"
    cause = "invalid-quant-marker"
    summary = "quantization marker unreadable, unknown format, or metadata the loader will not match"
    explanation = f"""\
ComfyUI reads a layer's marker with `json.loads(tensor.numpy().tobytes())`, so `.comfy_quant` must be a uint8 tensor
of UTF-8 JSON; its "format" selects an entry of QUANT_ALGOS ({", ".join(sorted(COMFY_QUANT_FORMATS))}). A missing or
unknown format raises at load ("Unknown quantization format" / KeyError). The header's `_quantization_metadata` must
be JSON {{"format_version": ..., "layers": {{name: conf}}}}; ComfyUI applies each name verbatim to the file's keys
(with or without the `model.diffusion_model.` prefix), so a name that matches no layer is silently ignored and that
layer loads unquantized. A per-layer tensor and a metadata entry that disagree make the result depend on load order.

What you see: a load error, or a model that loads and produces noise for the layers the marker missed.

Fix: `nvdiag fix` rewrites markers and metadata with the file's own key names; `nvdiag convert` writes them right."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        markers = model.file_markers
        if markers.get("quantization_metadata_error") and not markers.get("quantization_metadata_recovered"):
            yield self.finding(
                str(markers["quantization_metadata_error"]) + ": ComfyUI cannot read the quantization metadata",
                None,
                {"error": markers["quantization_metadata_error"]},
            )
        yield from self._unmatched(model)
        for layer in model.layers.values():
            if marker_tensor_defect(model, layer) is not None:
                continue  # NV110 names it, with what ComfyUI does and the fix
            if layer.marker_error:
                yield self.finding(layer.marker_error, layer.name, {"marker_source": layer.marker_source})
            elif layer.marker is not None:
                fmt = layer.marker.get("format")
                if fmt not in COMFY_QUANT_FORMATS:
                    yield self.finding(
                        f"marker format {fmt!r} is not one ComfyUI knows: the model fails to load",
                        layer.name,
                        {"found": fmt, "expected": sorted(COMFY_QUANT_FORMATS), "marker_source": layer.marker_source},
                    )

    def _unmatched(self, model: ModelView) -> Iterable[Finding]:
        unmatched = list(model.file_markers.get("metadata_unmatched") or [])
        if not unmatched:
            return
        names = set(model.layers)
        suggestions = {n: s for n in unmatched if (s := _suggest_prefix(n, names)) is not None}
        hint = ""
        if suggestions:
            example, fixed = next(iter(suggestions.items()))
            hint = f" (a prefix mismatch: e.g. {example!r} should be {fixed!r})"
        yield self.finding(
            f"_quantization_metadata names {len(unmatched)} layer(s) the file does not contain; ComfyUI ignores "
            f"those entries and loads the layers unquantized{hint}",
            None,
            {"unmatched": unmatched[:20], "count": len(unmatched),
             "prefix_fixes": dict(list(suggestions.items())[:20])},
        )


def marker_tensor_defect(model: ModelView, layer: Layer) -> str | None:
    """"empty", "all-zero" or "no-format" when the layer's comfy_quant tensor is one of the broken markers
    published files carry; None otherwise (no tensor, a readable one, or another defect NV104 reports)."""
    placeholder = (model.file_markers.get("marker_placeholders") or {}).get(layer.name)
    if placeholder is not None:
        return str(placeholder)
    confs = (model.file_markers.get("marker_confs") or {}).get(layer.name) or {}
    tensor_conf = confs.get("tensor")
    if tensor_conf is not None and tensor_conf.get("format") is None:
        return "no-format"
    return None


def _metadata_replaces(model: ModelView, name: str) -> bool:
    """Whether ComfyUI overwrites the layer's comfy_quant tensor before reading it: convert_old_quants writes
    `<name>.comfy_quant` for every metadata entry verbatim, so only an entry spelled exactly as the file's key (with
    a format ComfyUI knows) lands on the broken tensor."""
    parsed = model.file_markers.get("quantization_metadata") or {}
    conf = (parsed.get("layers") or {}).get(name)
    return isinstance(conf, dict) and conf.get("format") in COMFY_QUANT_FORMATS


_DEFECT_TEXT = {
    "empty": ("comfy_quant is an empty tensor",
              "json.loads(b'') raises JSONDecodeError 'Expecting value' and stops the load"),
    "all-zero": ("comfy_quant holds only zero bytes", "json.loads reads the NULs as UTF-16/32 and raises "
                 "UnicodeDecodeError or JSONDecodeError, stopping the load"),
    "no-format": ("comfy_quant JSON has no \"format\"",
                  "ValueError('Unknown quantization format for layer') stops the load"),
}


class BrokenMarkerTensor(Rule):
    id = "NV110"
    name = "broken-marker-tensor"
    cause = "invalid-quant-marker"
    summary = "comfy_quant tensor that is empty, all zero bytes, or JSON without \"format\""
    explanation = """\
Published files, Comfy-Org's own among them, carry `.comfy_quant` tensors that hold no usable marker: a 0-element
tensor (Comfy-Org/ComfyUI#16472, an int8 ConvRot text encoder's embedding), zero bytes where the JSON should be
(#15567, 42 of 200 markers of an fp8_scaled MiniMax file), or JSON without "format" (#15400). ComfyUI 0.8.0 pops the
tensor in comfy/ops.py (MixedPrecisionOps.Linear._load_from_state_dict) and runs
`json.loads(layer_conf.numpy().tobytes())` on it: an empty payload raises JSONDecodeError ("Expecting value: line 1
column 1"), NUL bytes are taken for UTF-16/32 and raise UnicodeDecodeError ("'utf-32-be' codec can't decode") or
JSONDecodeError, and a conf without "format" raises ValueError("Unknown quantization format for layer ..."). The
whole model fails to load. Only when the header's `_quantization_metadata` has an entry spelled exactly as the
layer's key does comfy/utils.py convert_old_quants overwrite the tensor with that conf first: ComfyUI then loads the
layer, other loaders still fail, and the finding is a warning. Open PRs #15410 and #16474 would make later
versions skip such placeholders; other loaders still read them.

What you see: the load stops with one of the errors above, naming comfy/ops.py.

Fix: lossless. `nvdiag fix` rebuilds the marker from the layer's own tensors when they prove one format (U8
weight + swizzled F8_E4M3 block scales + weight_scale_2 = nvfp4; F8_E4M3 weight + one scale = float8_e4m3fn),
keeping the conf's other keys, and removes the placeholder from a layer whose weight is not quantized, which
ComfyUI then loads as the plain weight it is."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            defect = marker_tensor_defect(model, layer)
            if defect is None:
                continue
            what, comfy = _DEFECT_TEXT[defect]
            plain = _needs_marker(layer) is None
            state = "on a layer whose weight is not quantized" if plain else f"on a {_needs_marker(layer)}"
            evidence = {"defect": defect, "weight_dtype": layer.dtype("weight"), "quantized": not plain}
            if _metadata_replaces(model, layer.name):
                yield self.finding(
                    f"{what} {state}; ComfyUI loads the layer anyway: the header's _quantization_metadata entry "
                    "of the same name replaces the tensor (comfy/utils.py convert_old_quants), but a loader that "
                    "reads the tensor fails",
                    layer.name, {**evidence, "replaced_by_metadata": True}, severity=Severity.WARNING,
                )
                continue
            yield self.finding(f"{what} {state}: in ComfyUI {comfy}", layer.name, evidence)


class DoubleBracedMetadata(Rule):
    id = "NV111"
    name = "double-braced-metadata"
    cause = "invalid-quant-marker"
    summary = "_quantization_metadata wrapped in double braces {{...}}: not JSON, though the JSON inside is fine"
    explanation = """\
Some published files store the header's `_quantization_metadata` as `{{"format_version": "1.0", "layers": {{...}}}}`:
the braces of a string template that was escaped for str.format or an f-string and then never formatted (or one
extra pair around the whole object). That is not JSON. ComfyUI 0.8.0 reads the entry in comfy/utils.py
convert_old_quants with a bare `json.loads(metadata["_quantization_metadata"])`, which raises JSONDecodeError
("Expecting property name enclosed in double quotes") before any layer is built: the whole model fails to load,
even when every layer also has a good `.comfy_quant` tensor. Loaders that validate the entry (custom-node loaders
and converters) stop with "Invalid _quantization_metadata JSON" instead.

What you see: the load stops in comfy/utils.py convert_old_quants with a JSONDecodeError.

Fix: lossless. `nvdiag fix` writes the JSON inside the braces back as the entry (only when that JSON is metadata
ComfyUI reads: an object with a "layers" object); nothing else changes."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        recovered = model.file_markers.get("quantization_metadata_recovered")
        if not recovered:
            return
        yield self.finding(
            f"_quantization_metadata is wrapped in double braces: ComfyUI's json.loads fails and the model does "
            f"not load; the JSON inside names {len(recovered['layers'])} layer(s)",
            None,
            {"defect": "double-braces", "error": model.file_markers.get("quantization_metadata_error"),
             "layers": len(recovered["layers"])},
        )
