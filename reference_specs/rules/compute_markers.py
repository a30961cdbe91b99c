"""NV108 and the compute policy on Blackwell: which layers ComfyUI multiplies with quantized activations.

A quantized layer's marker may carry `"full_precision_matrix_mult": true`. ComfyUI (comfy/ops.py, where mixed
precision ops load a layer's marker: `_load_from_state_dict` in the copy read, `_load_quantized_module` in others;
`self._full_precision_mm_config = layer_conf.get("full_precision_matrix_mult", False)`) then keeps the weight
quantized but dequantizes it and multiplies in the compute dtype (W4A16 for NVFP4) instead of quantizing the layer's
activations too (W4A4 on Blackwell). The flag is read with Python truthiness, so any truthy JSON value turns it on,
the string "false" included.

The helpers here are what inspect and diff show; the rule is what lint checks. They see the markers through
`file_markers["marker_confs"]` (layer name -> {"tensor": conf, "metadata": conf}, recorded by
inspect_tools.layers), because `Layer.marker` keeps only one of the two confs when a layer has both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from reference_specs import formats
from reference_specs.findings import Finding, Severity
from reference_specs.layer import Layer
from reference_specs.rules.base import ModelView, Rule, RuleContext, numel

FULL_PRECISION_KEY = "full_precision_matrix_mult"
MARKER_CONFS_KEY = "marker_confs"
# Which marker ComfyUI loads when a layer has both: comfy/utils.py convert_old_quants writes every metadata entry
# into the state dict as `<name>.comfy_quant`, over the file's tensor of that key, before ops.py pops it.
SOURCE_PRECEDENCE = ("metadata", "tensor")
# Marker format -> (compute path with quantized activations, compute path with full_precision_matrix_mult), on
# Blackwell where ComfyUI disables neither NVFP4 nor FP8 (ops.py pick_operations). Only the formats of ComfyUI's
# QUANT_ALGOS whose kernels are known here; other formats get no label rather than a guessed one.
COMPUTE_PATHS: dict[str, tuple[str, str]] = formats.compute_paths()


def marker_confs(layer: Layer, file_markers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The layer's marker confs by source ("tensor", "metadata"); empty when it has none."""
    recorded = (file_markers.get(MARKER_CONFS_KEY) or {}).get(layer.name)
    if recorded is not None:
        return dict(recorded)
    if layer.marker is None:
        return {}
    # A model built without per-source records has only the merged conf, which comes from the tensor when both exist.
    return {"metadata" if layer.marker_source == "metadata" else "tensor": layer.marker}


def _has_quantization_metadata(file_markers: Mapping[str, Any]) -> bool:
    return file_markers.get("quantization_metadata") is not None or bool(
        file_markers.get("quantization_metadata_error")
    )


def loaded_marker(layer: Layer, file_markers: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(conf, source) of the marker ComfyUI's loader actually reads for this layer, or (None, None).

    source "scaled_fp8": a legacy file, for which convert_old_quants makes the conf itself (only when the header has
    no _quantization_metadata), with the flag on when the `scaled_fp8` tensor has two elements."""
    confs = marker_confs(layer, file_markers)
    for source in SOURCE_PRECEDENCE:
        if source in confs:
            return confs[source], source
    legacy = file_markers.get("scaled_fp8")
    if legacy is not None and layer.has("scale_weight") and not _has_quantization_metadata(file_markers):
        conf: dict[str, Any] = {"format": "float8_e4m3fn"}
        if numel(tuple(legacy.shape)) == 2:
            conf[FULL_PRECISION_KEY] = True
        return conf, "scaled_fp8"
    return None, None


def full_precision_mm(layer: Layer, file_markers: Mapping[str, Any]) -> bool | None:
    """Whether ComfyUI runs this quantized layer in full precision (the flag's truthiness, as ComfyUI reads it);
    None when the layer has no marker of a format with a known compute path."""
    conf, _ = loaded_marker(layer, file_markers)
    if conf is None or conf.get("format") not in COMPUTE_PATHS:
        return None
    return bool(conf.get(FULL_PRECISION_KEY, False))


def compute_path(layer: Layer, file_markers: Mapping[str, Any]) -> str | None:
    """"W4A4" / "W4A16" (NVFP4), "W8A8" / "W8A16" (FP8): how ComfyUI multiplies this layer on Blackwell; None for a
    layer it does not load as quantized."""
    full = full_precision_mm(layer, file_markers)
    if full is None:
        return None
    conf, _ = loaded_marker(layer, file_markers)
    assert conf is not None
    return COMPUTE_PATHS[conf["format"]][int(full)]


def compute_counts(layers: Iterable[Layer], file_markers: Mapping[str, Any]) -> dict[str, int]:
    """Compute path -> number of layers, quantized-activation paths first ({"W4A4": 12, "W4A16": 8})."""
    counts: dict[str, int] = {}
    for layer in layers:
        path = compute_path(layer, file_markers)
        if path is not None:
            counts[path] = counts.get(path, 0) + 1
    order = [p for pair in COMPUTE_PATHS.values() for p in pair]
    return {p: counts[p] for p in sorted(counts, key=order.index)}


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages ("string", "number", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class FullPrecisionMmFlag(Rule):
    id = "NV108"
    name = "full-precision-mm-flag"
    cause = "invalid-quant-marker"
    severity = Severity.WARNING
    summary = "full_precision_matrix_mult is not a JSON boolean, or .comfy_quant and _quantization_metadata disagree"
    explanation = """\
A quantized layer's marker may say `"full_precision_matrix_mult": true`. ComfyUI (comfy/ops.py, where the mixed
precision Linear loads its marker) reads it as `layer_conf.get("full_precision_matrix_mult", False)` and tests it
with Python truthiness: when it is on, the weight stays quantized in memory but every forward dequantizes it and
multiplies in the compute dtype (W4A16 for NVFP4, W8A16 for FP8); when it is absent or off, Blackwell GPUs quantize
the layer's activations too (W4A4 / W8A8). Layers whose activations have outlier channels need the flag: W4A4
renders noise from a perfectly encoded file.

Error: the value is not a JSON boolean. Any truthy value turns the flag on, so "false" (a string), "no", 1 or [0]
give W4A16, while 0, "", null, [] and {} give W4A4, whatever the writer meant.

Warning: the layer has both a `.comfy_quant` tensor and a `_quantization_metadata` entry, and they disagree on the
flag (compared by truthiness, the way ComfyUI reads it). The metadata wins: comfy/utils.py `convert_old_quants`
writes every metadata entry into the state dict as `<name>.comfy_quant`, replacing the file's tensor of that key,
before ops.py pops and reads the marker, so the tensor's value is never seen. (The entry replaces the tensor when
its name is spelled the way the loader holds the keys at that point: `load_diffusion_model` strips the
`model.diffusion_model.` prefix first, a full checkpoint load keeps it; an entry spelled the other way reaches no
layer, and then the tensor decides.) Other tools that read only the tensors, or only the metadata, see the other
value, and which one a re-export keeps depends on the tool.

What you see: a layer rendered at the compute path you did not choose (noise where W4A16 was meant, or the speed
of W4A4 lost where it was safe).

Fix: write `true` or `false` (or leave the key out) in both places; `nvdiag inspect --format json` shows the compute
path ComfyUI will use per layer, `nvdiag convert` writes both markers from one conf."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            confs = marker_confs(layer, model.file_markers)
            if not confs:
                continue
            yield from self._non_boolean(layer, confs)
            if "tensor" in confs and "metadata" in confs:
                yield from self._disagreement(layer, confs)

    def _non_boolean(self, layer: Layer, confs: dict[str, dict[str, Any]]) -> Iterable[Finding]:
        for source, conf in confs.items():
            if FULL_PRECISION_KEY not in conf or isinstance(conf[FULL_PRECISION_KEY], bool):
                continue
            value = conf[FULL_PRECISION_KEY]
            on = bool(value)
            where = ".comfy_quant" if source == "tensor" else "_quantization_metadata"
            # A tensor conf shadowed by a metadata entry is still wrong (other tools read it), but not what runs.
            shadowed = source == "tensor" and "metadata" in confs
            consequence = (
                "; the _quantization_metadata entry replaces it at load" if shadowed
                else f": ComfyUI runs the layer {_path_for(conf, on)} on Blackwell"
            )
            yield self.finding(
                f"{where} has {FULL_PRECISION_KEY} = {json.dumps(value)}, a JSON {json_type(value)} where "
                f"true/false belongs; ComfyUI tests it with Python truthiness and reads it as "
                f"{'on' if on else 'off'}{consequence}",
                layer.name,
                {"source": source, "value": value, "json_type": json_type(value), "read_as": on,
                 "shadowed_by_metadata": shadowed},
                severity=Severity.ERROR,
            )

    def _disagreement(self, layer: Layer, confs: dict[str, dict[str, Any]]) -> Iterable[Finding]:
        tensor, metadata = confs["tensor"], confs["metadata"]
        t_on = bool(tensor.get(FULL_PRECISION_KEY, False))
        m_on = bool(metadata.get(FULL_PRECISION_KEY, False))
        if t_on == m_on:
            return
        yield self.finding(
            f".comfy_quant has {_said(tensor)} but _quantization_metadata has {_said(metadata)}: ComfyUI "
            "applies the metadata over the tensor and runs the layer "
            f"{_path_for(metadata, m_on)} on Blackwell; tools that read the tensor see {_path_for(tensor, t_on)}",
            layer.name,
            {
                "tensor": tensor.get(FULL_PRECISION_KEY),
                "metadata": metadata.get(FULL_PRECISION_KEY),
                "comfyui_uses": "metadata",
                "compute": _path_for(metadata, m_on),
            },
        )


def _said(conf: dict[str, Any]) -> str:
    if FULL_PRECISION_KEY not in conf:
        return f"no {FULL_PRECISION_KEY} (off)"
    return f"{FULL_PRECISION_KEY} = {json.dumps(conf[FULL_PRECISION_KEY])}"


def _path_for(conf: dict[str, Any], on: bool) -> str:
    paths = COMPUTE_PATHS.get(str(conf.get("format")))
    if paths is None:
        return "in full precision" if on else "with quantized activations"
    return paths[int(on)]
