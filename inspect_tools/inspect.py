"""What a checkpoint is, layer by layer: the data behind `nvdiag inspect` (rendering lives in the CLI)."""

from __future__ import annotations

import fnmatch
from typing import Any

from inspect_tools.layers import CheckpointModel
from reference_specs import formats
from reference_specs.layer import Layer
from reference_specs.rules.compute_markers import compute_counts, compute_path, marker_confs

# Long metadata values (configs, quantization metadata) are shortened in the text view only.
METADATA_PREVIEW_CHARS = 80


def select_layers(model: CheckpointModel, pattern: str | None) -> list[Layer]:
    """Layers whose file name or ComfyUI-native name matches the glob (all when no pattern)."""
    layers = list(model.layers.values())
    if not pattern:
        return layers
    return [
        layer
        for layer in layers
        if fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.native_name or "", pattern)
    ]


def layer_record(layer: Layer, file_markers: dict[str, Any] | None = None) -> dict[str, Any]:
    """One layer of the JSON document. `compute` is how ComfyUI multiplies it on Blackwell ("W4A4", "W4A16", ...;
    None when it does not load it as quantized); without `file_markers` the legacy scaled_fp8 and both-markers
    cases cannot be told, so callers with a model pass its file_markers."""
    markers = file_markers or {}
    record: dict[str, Any] = {
        "name": layer.name,
        "format": layer.format,
        "compute": compute_path(layer, markers),
        "tensors": {role: {"dtype": t.dtype, "shape": list(t.shape)} for role, t in layer.tensors.items()},
    }
    logical = _logical_shape(layer)
    if logical is not None:
        record["logical_shape"] = list(logical)
    if layer.native_name and layer.native_name != layer.name:
        record["native_name"] = layer.native_name
    if layer.marker is not None:
        record["marker"] = {"conf": layer.marker, "source": layer.marker_source}
        metadata_conf = marker_confs(layer, markers).get("metadata")
        if layer.marker_source == "both" and metadata_conf not in (None, layer.marker):
            # `conf` is the tensor's; ComfyUI loads this one, which is where `compute` comes from
            record["marker"]["metadata_conf"] = metadata_conf
    if layer.marker_error:
        record["marker_error"] = layer.marker_error
    return record


def _logical_shape(layer: Layer) -> tuple[int, ...] | None:
    """The unquantized weight shape (packed NVFP4 bytes hold two values each); None where it is the stored one."""
    if not layer.is_quantized:
        return None
    try:
        return formats.get(layer.format).logical_shape(layer)
    except (KeyError, TypeError, IndexError):
        return None


def metadata_summary(metadata: dict[str, Any]) -> dict[str, str]:
    """Short one-line previews of header metadata values for the text view."""
    out = {}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else repr(value)
        text = " ".join(text.split())
        out[key] = text if len(text) <= METADATA_PREVIEW_CHARS else text[: METADATA_PREVIEW_CHARS - 1] + "…"
    return out


def inspect_document(model: CheckpointModel, pattern: str | None = None) -> dict[str, Any]:
    """The JSON document of `nvdiag inspect --format json` (issue 3 schema, plus container and summary)."""
    layers = select_layers(model, pattern)
    det = model.detection
    quant_meta = model.file_markers.get("quantization_metadata")
    return {
        "version": 1,
        "path": str(model.path),
        "container": model.kind,
        "architecture": det.to_json(),
        "summary": {
            "tensors": len(model.reader.tensors),
            "layers": len(model.layers),
            "bytes": sum(t.nbytes for t in model.reader),
            "formats": model.format_counts(),
            "compute": compute_counts(model.layers.values(), model.file_markers),
            "quantization_metadata_layers": len(quant_meta["layers"]) if quant_meta else 0,
            "scaled_fp8_marker": model.file_markers.get("scaled_fp8") is not None,
        },
        "metadata": model.metadata,
        "layers": [layer_record(layer, model.file_markers) for layer in layers],
    }
