"""Each side of a diff summed up over its selected layers: aux-tensor signatures, optional-role counts and what a
difference in them means to ComfyUI, the precision plan, header metadata, and (across architectures) layers by role.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from inspect_tools.align import LayerPair
from inspect_tools.diff.alignment import role_of
from inspect_tools.diff.facts import precision_class, tensor_signature
from inspect_tools.inspect import metadata_summary
from inspect_tools.layers import CheckpointModel
from reference_specs.layer import Layer

# Optional roles whose presence is counted per format ("REF 110/110 layers have input_scale, MINE 0/210").
COUNTED_ROLES = ("input_scale", "comfy_quant", "pre_quant_scale", "scale_input", "bias")
# Header metadata keys ComfyUI reads (model detection reads "config"; "format"/"model_type" are common writers' keys).
METADATA_KEYS = ("_quantization_metadata", "format", "model_type", "config")


def signatures(layers: Iterable[Layer]) -> dict[str, dict[str, int]]:
    """format -> signature -> number of layers with it."""
    out: dict[str, Counter[str]] = {}
    for layer in layers:
        if not layer.is_quantized and precision_class(layer) != "quantized":
            continue
        out.setdefault(layer.format, Counter())[tensor_signature(layer)] += 1
    return {fmt: dict(sigs.most_common()) for fmt, sigs in sorted(out.items())}


def role_counts(layers: Iterable[Layer]) -> dict[str, dict[str, int]]:
    """format -> {"layers": n, "input_scale": k, "comfy_quant": k, "marker": k, ...} over quantized layers."""
    out: dict[str, dict[str, int]] = {}
    for layer in layers:
        if precision_class(layer) != "quantized":
            continue
        counts = out.setdefault(layer.format, {"layers": 0, "marker": 0, **{r: 0 for r in COUNTED_ROLES}})
        counts["layers"] += 1
        counts["marker"] += layer.marker is not None
        for role in COUNTED_ROLES:
            counts[role] += layer.has(role)
    return dict(sorted(out.items()))


def signature_verdicts(
    mine_counts: dict[str, dict[str, int]], ref_counts: dict[str, dict[str, int]]
) -> list[dict[str, str]]:
    """Research-backed verdict on every per-format role count that differs between the sides."""
    verdicts = []
    for fmt in sorted(set(mine_counts) & set(ref_counts)):
        m, r = mine_counts[fmt], ref_counts[fmt]
        for role in ("input_scale", "comfy_quant", "marker", "pre_quant_scale"):
            mf, rf = m[role] / max(m["layers"], 1), r[role] / max(r["layers"], 1)
            if mf == rf:
                continue
            text = f"{fmt}: REF {r[role]}/{r['layers']} layers have {role}, MINE {m[role]}/{m['layers']}"
            verdicts.append({"format": fmt, "role": role, "text": text, "verdict": ROLE_VERDICTS[role]})
    return verdicts


ROLE_VERDICTS = {
    "input_scale": "does not matter for loading: absent input_scale = dynamic per-call activation scale in ComfyUI "
    "(safe); a present one is used as-is on Blackwell and must be calibrated",
    "comfy_quant": "matters only if the layer has no _quantization_metadata entry either: ComfyUI turns header "
    "metadata into the same per-layer markers",
    "marker": "matters: a quantized layer without any marker is loaded by ComfyUI as raw bytes",
    "pre_quant_scale": "matters: ComfyUI multiplies the input by pre_quant_scale when present (AWQ smoothing)",
}


def precision_plan(layers: Iterable[Layer]) -> dict[str, int]:
    counts = Counter(precision_class(layer) for layer in layers)
    return dict(sorted(counts.items()))


def plan_disagreements(pairs: list[LayerPair]) -> list[dict[str, str]]:
    rows = []
    for pair in pairs:
        mine, ref = pair.mine, pair.ref
        if mine is None or ref is None:
            continue
        a, b = precision_class(mine), precision_class(ref)
        if a != b:
            rows.append({"layer": pair.key, "mine": f"{a} ({mine.format})", "ref": f"{b} ({ref.format})"})
    return rows


def metadata_view(model: CheckpointModel) -> dict[str, str]:
    """Header metadata as short previews; _quantization_metadata summarized (version, layers, formats)."""
    meta = dict(model.metadata)
    view = metadata_summary(meta)
    parsed = model.file_markers.get("quantization_metadata")
    if parsed is not None:
        fmts = Counter(str(c.get("format")) if isinstance(c, dict) else "?" for c in parsed["layers"].values())
        view["_quantization_metadata"] = (
            f"format_version {parsed.get('format_version')!s}, {len(parsed['layers'])} layers ("
            + ", ".join(f"{k} {v}" for k, v in sorted(fmts.items())) + ")"
        )
    return view


def metadata_comparison(mine: CheckpointModel, ref: CheckpointModel) -> list[dict[str, Any]]:
    a, b = metadata_view(mine), metadata_view(ref)
    rows = []
    for key in sorted(set(a) | set(b), key=lambda k: (k not in METADATA_KEYS, k)):
        rows.append({"key": key, "mine": a.get(key), "ref": b.get(key), "same": a.get(key) == b.get(key)})
    return rows


def role_table(model: CheckpointModel, layers: Iterable[Layer]) -> dict[str, dict[str, Any]]:
    """role -> {"layers": n, "formats": {fmt: n}, "precision": {...}, "signatures": {...}}."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        row = out.setdefault(role_of(model, layer), {"layers": 0, "formats": Counter(), "precision": Counter(),
                                                     "signatures": Counter()})
        row["layers"] += 1
        row["formats"][layer.format] += 1
        row["precision"][precision_class(layer)] += 1
        if precision_class(layer) == "quantized":
            row["signatures"][tensor_signature(layer)] += 1
    return {
        role: {k: (dict(v) if isinstance(v, Counter) else v) for k, v in row.items()}
        for role, row in sorted(out.items())
    }
