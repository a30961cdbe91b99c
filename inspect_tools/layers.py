"""Turn an opened checkpoint into Layers: group tensors by base name and role, read markers, classify formats."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inspect_tools.errors import InputError
from inspect_tools.model_config import read_config_beside
from inspect_tools.readers import CheckpointReader, open_checkpoint
from inspect_tools.readers.bounded_json import loads_bounded
from reference_specs import formats, models
from reference_specs.layer import FILE_MARKER_KEYS, QUANT_METADATA_KEY, Layer, split_key
from reference_specs.models import Detection

# comfy_quant markers are tiny JSON; a bigger one is hostile or broken and is not read into memory.
MAX_MARKER_BYTES = 64 * 1024


@dataclass
class CheckpointModel:
    """A checkpoint seen as Layers. `file_markers` holds what is not a layer:
    container (reader kind: "safetensors" | "sharded" | "gguf"), scaled_fp8 (TensorInfo or None),
    quantization_metadata (parsed dict or None), quantization_metadata_error (str or None),
    quantization_metadata_recovered (the metadata inside a double-braced header entry, or None),
    marker_placeholders (layer name -> "empty" / "all-zero": comfy_quant tensors with no JSON at all),
    metadata_unmatched (layer names the header metadata names but the file lacks), index_timestep_zero (bool),
    config (the diffusers config.json beside the weights, parsed, or None),
    marker_confs (layer name -> {"tensor": conf, "metadata": conf}: each source's conf as read, because
    `Layer.marker` keeps the tensor's when a layer has both and ComfyUI loads the metadata's)."""

    path: Path
    reader: CheckpointReader
    layers: dict[str, Layer]
    detection: Detection
    file_markers: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.reader.metadata

    @property
    def kind(self) -> str:
        return self.reader.kind

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers.values():
            counts[layer.format] = counts.get(layer.format, 0) + 1
        return dict(sorted(counts.items()))

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> CheckpointModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_conf(conf: object) -> dict[str, Any]:
    """A marker conf as the rules may use it: an object whose "format", when present, is a string (ComfyUI looks
    it up in QUANT_ALGOS, so an object or a list there fails the load); ValueError with the reason otherwise."""
    if not isinstance(conf, dict):
        raise ValueError("JSON is not an object")
    fmt = conf.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise ValueError(f'"format" is a JSON {type(fmt).__name__}, not a format name')
    return conf


def decode_marker_bytes(raw: bytes) -> dict[str, Any]:
    """comfy_quant payload -> conf dict; ValueError with the reason when ComfyUI could not read it either."""
    try:
        conf = loads_bounded(raw)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 JSON (UnicodeDecodeError)") from None
    except ValueError as exc:
        raise ValueError(f"not UTF-8 JSON ({str(exc).splitlines()[0][:120]})") from None
    return check_conf(conf)


def marker_placeholder(raw: bytes) -> str | None:
    """The placeholder kind of a comfy_quant payload published files carry instead of JSON, or None: "empty" (a
    0-element tensor, Comfy-Org/ComfyUI#16472) or "all-zero" (NUL bytes where the JSON should be, #15567)."""
    if not raw:
        return "empty"
    if not raw.strip(b"\x00"):
        return "all-zero"
    return None


def _read_tensor_marker(reader: CheckpointReader, layer: Layer) -> str | None:
    """Read a layer's comfy_quant tensor into Layer.marker / marker_error; returns its placeholder kind, if any."""
    info = layer.tensors["comfy_quant"]
    if info.dtype != "U8":
        layer.marker_error = f"comfy_quant is {info.dtype}, ComfyUI reads it as U8 JSON bytes"
        return None
    if info.nbytes > MAX_MARKER_BYTES:
        layer.marker_error = f"comfy_quant is {info.nbytes} bytes, far larger than any JSON marker"
        return None
    raw = reader.read_bytes(info.name)  # raw bytes, not a tensor: building a model from headers needs no torch
    placeholder = marker_placeholder(raw)
    if placeholder is not None:
        what = "an empty tensor" if placeholder == "empty" else f"{len(raw)} zero bytes"
        layer.marker_error = f"comfy_quant is {what}, not JSON"
        return placeholder
    try:
        layer.marker = decode_marker_bytes(raw)
        layer.marker_source = "tensor"
    except ValueError as exc:
        layer.marker_error = f"comfy_quant {exc}"
    return None


def parse_quant_metadata(metadata: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The header's `_quantization_metadata` as ComfyUI reads it (json string with a "layers" object)."""
    raw = metadata.get(QUANT_METADATA_KEY)
    if raw is None:
        return None, None
    try:
        parsed = loads_bounded(raw) if isinstance(raw, str) else raw
    except UnicodeError:
        return None, f"{QUANT_METADATA_KEY} is not valid JSON: not UTF-8"
    except ValueError as exc:  # invalid, nested too deep, or an absurdly long integer
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).splitlines()[0][:120]
        return None, f"{QUANT_METADATA_KEY} is not valid JSON: {reason}"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("layers"), dict):
        return None, f'{QUANT_METADATA_KEY} has no "layers" object'
    return parsed, None


def recover_double_braces(raw: object) -> dict[str, Any] | None:
    """The metadata a `_quantization_metadata` string wrapped in double braces holds, or None. Seen in published
    files: the outer pair doubled ({{"format_version": ...}}) or every brace doubled, as an unformatted template
    with escaped braces leaves them. Accepted only when the undoubled text is metadata ComfyUI reads."""
    if not isinstance(raw, str) or not raw.strip().startswith("{{"):
        return None
    text = raw.strip()
    for candidate in (text[1:-1] if text.endswith("}}") else None, text.replace("{{", "{").replace("}}", "}")):
        if candidate is None:
            continue
        parsed, error = parse_quant_metadata({QUANT_METADATA_KEY: candidate})
        if error is None and parsed is not None:
            return parsed
    return None


def _apply_metadata_markers(
    layers: dict[str, Layer],
    parsed: dict[str, Any],
    prefix: str,
    confs: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> list[str]:
    """Attach metadata confs to layers. ComfyUI matches names verbatim, before and after stripping the
    diffusion-model prefix (comfyui-load-path.md, load sequence steps 1-2), so both spellings count as a match.
    `confs` (layer name -> source -> conf) receives each matched metadata conf."""
    unmatched = []
    for name, conf in parsed["layers"].items():
        target = layers.get(name) or (layers.get(prefix + name) if prefix else None)
        if target is None:
            unmatched.append(name)
            continue
        try:
            check_conf(conf)
        except ValueError as exc:
            target.marker_error = target.marker_error or f"{QUANT_METADATA_KEY} entry: {exc}"
            continue
        if confs is not None:
            # setdefault: the first entry naming a layer is the one Layer.marker took as well
            confs.setdefault(target.name, {}).setdefault("metadata", conf)
        if target.marker is None:
            target.marker, target.marker_source = conf, "metadata"
        elif target.marker_source == "tensor":
            target.marker_source = "both"
            if target.marker.get("format") != conf.get("format"):
                target.marker_error = (
                    f"comfy_quant says {target.marker.get('format')!r} but {QUANT_METADATA_KEY} "
                    f"says {conf.get('format')!r}"
                )
    return unmatched


def group_layers(reader: CheckpointReader) -> tuple[dict[str, Layer], dict[str, Any]]:
    layers: dict[str, Layer] = {}
    file_markers: dict[str, Any] = {"container": reader.kind, "scaled_fp8": None, "index_timestep_zero": False}
    for info in reader:
        bare = info.name.rsplit(".", 1)[-1]  # markers may sit behind a prefix such as model.diffusion_model.
        if bare == "scaled_fp8":
            file_markers["scaled_fp8"] = info
            continue
        if bare in FILE_MARKER_KEYS:
            file_markers["index_timestep_zero"] = True
            continue
        base, role = split_key(info.name)
        layer = layers.setdefault(base, Layer(name=base, loader=reader.load))
        layer.tensors[role] = info
    return layers, file_markers


def build_model(reader: CheckpointReader) -> CheckpointModel:
    layers, file_markers = group_layers(reader)
    shapes = {info.name: info.shape for info in reader}
    # a diffusers folder's config.json names the variant where the keys cannot (Qwen Image Edit 2511's zero_cond_t)
    config = read_config_beside(reader.path) if reader.kind != "gguf" else None
    file_markers["config"] = config
    detection = models.detect(shapes, config)
    conflict = models.config_conflict(detection, config) if config is not None else None
    if conflict is not None:  # the variant would be read off a config that is not these weights'
        raise InputError(f"{conflict}: the config.json beside the weights must be theirs", str(reader.path))
    placeholders: dict[str, str] = {}
    for layer in layers.values():
        if layer.has("comfy_quant") and (kind := _read_tensor_marker(reader, layer)) is not None:
            placeholders[layer.name] = kind
    file_markers["marker_placeholders"] = placeholders
    # Recorded before metadata is merged in: afterwards Layer.marker no longer says which source a conf came from.
    confs = {name: {"tensor": layer.marker} for name, layer in layers.items() if layer.marker is not None}
    file_markers["marker_confs"] = confs
    parsed, error = parse_quant_metadata(reader.metadata)
    file_markers["quantization_metadata"] = parsed
    file_markers["quantization_metadata_error"] = error
    # what the JSON inside double braces says, for the rule that names the defect and the fix that unwraps it
    file_markers["quantization_metadata_recovered"] = (
        recover_double_braces(reader.metadata.get(QUANT_METADATA_KEY)) if error is not None else None
    )
    file_markers["metadata_unmatched"] = (
        _apply_metadata_markers(layers, parsed, detection.prefix, confs) if parsed is not None else []
    )
    for layer in layers.values():
        layer.native_name = models.native_name(detection, layer.name)
        layer.format = formats.classify(layer, file_markers)
    return CheckpointModel(
        path=reader.path, reader=reader, layers=layers, detection=detection, file_markers=file_markers
    )


def open_model(path: str | Path) -> CheckpointModel:
    """Open a checkpoint and build its Layer model (headers and tiny marker tensors only)."""
    reader = open_checkpoint(path)
    try:
        return build_model(reader)
    except BaseException:
        reader.close()
        raise
