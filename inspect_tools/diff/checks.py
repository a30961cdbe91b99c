"""The diff's findings: what differs between MINE and REF that matters to ComfyUI (see the package docstring for
the load-path facts behind each verdict), per layer, per file, per role and, with --values, on dequantized weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from inspect_tools.align import LayerPair
from inspect_tools.diff.alignment import natural_key, sensitive_reason
from inspect_tools.diff.facts import logical_shape, precision_class, shape_text
from inspect_tools.diff.scale_stats import ScaleStats
from inspect_tools.errors import InputError
from inspect_tools.layers import CheckpointModel
from reference_specs.findings import Finding, Severity
from reference_specs.formats.nvfp4 import BLOCK, block_scale_shape, packed_shape, roundup
from reference_specs.layer import Layer
from reference_specs.rules.compute_markers import compute_path, full_precision_mm
from reference_specs.rules.foreign_layouts import foreign_format

# Scales whose medians differ by this factor are flagged (a reciprocal scale is ~6-7 orders of magnitude off).
SCALE_APART_FACTOR = 100.0
# comfy-kitchen / ComfyUI view the block scale bytes as float8_e4m3fn: any 1-byte dtype is read correctly.
BLOCK_SCALE_OK_DTYPES = ("F8_E4M3", "U8")


class FindingCollector:
    """The findings of one diff, one per layer (lint schema: the layer field names it) or per file (layer None)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._findings: list[Finding] = []

    def add(
        self,
        rule: str,
        cause: str,
        severity: Severity,
        message: str,
        layer: str | None = None,
        **evidence: Any,
    ) -> None:
        self._findings.append(Finding(rule, cause, severity, message, file=self.file, layer=layer,
                                      evidence=evidence))

    def findings(self) -> list[Finding]:
        """Most severe first; within a rule, layers in model order (blocks.2 before blocks.10)."""
        return sorted(self._findings, key=lambda f: (-f.severity, f.rule, natural_key(f.layer or "")))


def _check_markers(pair: LayerPair, out: FindingCollector) -> None:
    mine, ref = pair.mine, pair.ref
    if mine is None or not mine.is_quantized or mine.format == "unknown":
        return
    if mine.marker is None and not mine.marker_error and mine.format in ("nvfp4", "float8_e4m3fn", "float8_e5m2"):
        ref_has = ref is not None and ref.marker is not None
        out.add(
            "D101",
            "missing-quant-marker",
            Severity.ERROR,
            "MINE's quantized layer has neither .comfy_quant nor a _quantization_metadata entry"
            + (" (REF's layer has one)" if ref_has else "")
            + ": ComfyUI loads the raw bytes as a plain weight",
            pair.key,
            ref_marker=ref.marker if ref_has else None,
        )
    if mine.marker_error:
        out.add("D102", "invalid-quant-marker", Severity.ERROR, f"MINE's marker is unreadable: {mine.marker_error}",
                pair.key)


def _check_layout(pair: LayerPair, out: FindingCollector) -> None:
    """A published layout ComfyUI does not load (lint's NV112): its values may match REF's, yet the file does not
    load, so a value comparison alone must not let it pass."""
    mine = pair.mine
    fmt = foreign_format(mine) if mine is not None else None
    if fmt is not None:
        out.add("D105", "foreign-layout", Severity.ERROR,
                f"MINE's layer is {fmt.slug} ({fmt.describe()}): ComfyUI does not load this layout; "
                f"`nvdiag fix MINE OUT` rewrites it into {fmt.native_slug} losslessly", pair.key,
                format=fmt.slug, native=fmt.native_slug)


def _check_nvfp4_roles(pair: LayerPair, out: FindingCollector) -> None:
    mine, ref = pair.mine, pair.ref
    if mine is None or mine.format != "nvfp4":
        return
    ref_nvfp4 = ref is not None and ref.format == "nvfp4"
    if not mine.has("weight_scale"):
        out.add("D103", "missing-block-scale", Severity.ERROR,
                "MINE's NVFP4 layer has no .weight_scale: ComfyUI stops with 'Missing NVFP4 scales'", pair.key)
    if not mine.has("weight_scale_2"):
        out.add("D104", "missing-tensor-scale", Severity.ERROR,
                "MINE's NVFP4 layer has no .weight_scale_2: ComfyUI stops with 'Missing NVFP4 scales'", pair.key)
    if mine.dtype("weight") not in (None, "U8"):
        out.add("D110", "wrong-dtype", Severity.ERROR,
                f"MINE's NVFP4 weight is {mine.dtype('weight')}: ComfyUI value-casts it to U8 (garbage)", pair.key)
    scale_dtype = mine.dtype("weight_scale")
    if scale_dtype is not None and scale_dtype not in BLOCK_SCALE_OK_DTYPES:
        out.add("D111", "wrong-dtype", Severity.ERROR,
                f"MINE's block scale is {scale_dtype}: ComfyUI re-views its bytes as float8_e4m3fn (garbage)",
                pair.key)
    elif ref_nvfp4 and scale_dtype is not None and ref.dtype("weight_scale") not in (None, scale_dtype):
        out.add("D112", "wrong-dtype", Severity.INFO,
                f"block scale dtype differs (MINE {scale_dtype}, REF {ref.dtype('weight_scale')}): both are read as "
                "float8_e4m3fn bytes, no effect in ComfyUI", pair.key)
    s2_dtype = mine.dtype("weight_scale_2")
    if s2_dtype is not None and s2_dtype != "F32":
        out.add("D113", "wrong-dtype", Severity.INFO if s2_dtype.startswith(("F", "BF")) else Severity.ERROR,
                f"MINE's weight_scale_2 is {s2_dtype}: ComfyUI casts any float to F32 (F32 0-d is canonical)",
                pair.key)
    _check_input_scale(pair, out)


def _scalar_value(layer: Layer, role: str) -> float | None:
    try:
        return float(layer.load(role).to(torch.float32).flatten()[0])
    except Exception:  # noqa: BLE001 - an unreadable scalar is reported by lint; here it just has no value
        return None


def _check_input_scale(pair: LayerPair, out: FindingCollector) -> None:
    mine, ref = pair.mine, pair.ref
    assert mine is not None
    ref_has = ref is not None and ref.has("input_scale")
    if ref_has and not mine.has("input_scale"):
        out.add("D120", "input-scale-implausible", Severity.INFO,
                "REF carries .input_scale, MINE does not: absent input_scale = dynamic per-call activation scaling "
                "in ComfyUI, safe", pair.key)
    elif mine.has("input_scale") and not ref_has:
        value = _scalar_value(mine, "input_scale")
        s2 = _scalar_value(mine, "weight_scale_2") if mine.has("weight_scale_2") else None
        if value is not None and s2 is not None and math.isclose(value, s2, rel_tol=1e-3):
            out.add("D121", "input-scale-implausible", Severity.WARNING,
                    "MINE's input_scale equals its weight_scale_2 (derived from weights, not calibrated on "
                    "activations): ComfyUI uses it as-is on Blackwell and clips activations; drop it (absent = "
                    "dynamic, safe)", pair.key)
        else:
            out.add("D122", "input-scale-implausible", Severity.INFO,
                    "MINE carries a static .input_scale REF does not have: ComfyUI uses it as-is on Blackwell; "
                    "make sure it is a calibrated activation scale", pair.key)


def _check_shapes(pair: LayerPair, out: FindingCollector) -> None:
    mine, ref = pair.mine, pair.ref
    if mine is None or ref is None:
        return
    a, b = logical_shape(mine), logical_shape(ref)
    if a is None or b is None or len(a) != len(b):
        return
    if mine.format == "nvfp4" and len(b) == 2:
        expected = packed_shape(b[0], b[1])
        got = mine.shape("weight")
        if got == expected:
            _check_block_scale_shape(pair, b, out)
            return
        if got == packed_shape(b[1], b[0]) and b[0] != b[1]:
            out.add("D130", "transposed-weight", Severity.ERROR,
                    f"MINE's packed weight {shape_text(got)} fits REF's shape transposed {shape_text(b)}", pair.key)
            return
        out.add("D131", "wrong-shape", Severity.ERROR,
                f"MINE's packed weight is {shape_text(got)}, REF's shape {shape_text(b)} packs to "
                f"{shape_text(expected)}", pair.key)
        return
    if ref.format == "nvfp4" and len(a) == 2:
        if ref.shape("weight") == packed_shape(a[0], a[1]):
            return
    if a != b:
        transposed = len(a) == 2 and a == (b[1], b[0])
        out.add("D130" if transposed else "D131", "transposed-weight" if transposed else "wrong-shape",
                Severity.ERROR, f"shape differs: MINE {shape_text(a)}, REF {shape_text(b)}", pair.key)


def _check_block_scale_shape(pair: LayerPair, logical: tuple[int, ...], out: FindingCollector) -> None:
    mine = pair.mine
    assert mine is not None
    got = mine.shape("weight_scale")
    if got is None:
        return
    out_f, in_f = logical
    if got == block_scale_shape(out_f, in_f):
        return
    if got == (out_f, roundup(in_f, 16) // BLOCK):
        out.add("D132", "scale-layout-linear", Severity.ERROR,
                f"MINE's block scale is {shape_text(got)}, the unpadded row-major shape; ComfyUI decodes the "
                f"swizzled {shape_text(block_scale_shape(out_f, in_f))} 128x4-tile layout", pair.key)
    else:
        out.add("D133", "wrong-shape", Severity.ERROR,
                f"MINE's block scale is {shape_text(got)}, expected {shape_text(block_scale_shape(out_f, in_f))}",
                pair.key)


def _check_precision(pair: LayerPair, mine_model: CheckpointModel, out: FindingCollector) -> None:
    mine, ref = pair.mine, pair.ref
    if mine is None or ref is None:
        return
    if precision_class(mine) == "quantized" and precision_class(ref) != "quantized":
        reason = sensitive_reason(mine_model, mine)
        if reason:
            out.add("D140", "sensitive-layer-quantized", Severity.WARNING,
                    f"MINE quantizes a layer REF keeps at {precision_class(ref)}; it should stay high precision: "
                    f"{reason}", pair.key,
                    reason=reason)


def check_compute(pairs: list[LayerPair], mine: CheckpointModel, ref: CheckpointModel, out: FindingCollector) -> None:
    """D142: the two sides of an aligned layer disagree on full_precision_matrix_mult, as ComfyUI reads it (the marker
    it loads, truthiness). Only REF's W4A16 against MINE's W4A4 can hurt: REF's author kept 4-bit activations away
    from a layer that may not survive them, MINE exposes it on Blackwell."""
    for pair in pairs:
        if pair.mine is None or pair.ref is None:
            continue
        mine_full = full_precision_mm(pair.mine, mine.file_markers)
        ref_full = full_precision_mm(pair.ref, ref.file_markers)
        if mine_full is None or ref_full is None or mine_full == ref_full:
            continue
        mine_path = compute_path(pair.mine, mine.file_markers)
        ref_path = compute_path(pair.ref, ref.file_markers)
        evidence = {"mine": mine_path, "ref": ref_path, "mine_full_precision_mm": mine_full,
                    "ref_full_precision_mm": ref_full}
        if ref_full:
            out.add("D142", "activation-sensitive-w4a4", Severity.WARNING,
                    f"MINE runs this layer {mine_path} on Blackwell (activations quantized), REF {ref_path} "
                    "(full_precision_matrix_mult): a layer REF keeps out of quantized activations may render noise "
                    "in MINE on Blackwell; set the flag in MINE's marker or measure it with `nvdiag sensitivity`",
                    pair.key, **evidence)
        else:
            out.add("D142", "activation-sensitive-w4a4", Severity.INFO,
                    f"MINE runs this layer {mine_path} on Blackwell (full_precision_matrix_mult), REF {ref_path}: "
                    "safer for its activations, slower than REF there", pair.key, **evidence)


def compare_pairs(
    pairs: list[LayerPair], mine_model: CheckpointModel, out: FindingCollector, by_name: bool = True,
    check_shapes: bool = True,
) -> None:
    """Per-layer checks: markers, NVFP4 roles and dtypes, input_scale, shapes, precision (the last two only when
    layers are paired by name)."""
    for pair in pairs:
        _check_markers(pair, out)
        _check_layout(pair, out)
        _check_nvfp4_roles(pair, out)
        if by_name and check_shapes:
            _check_shapes(pair, out)
        if by_name:
            _check_precision(pair, mine_model, out)


def check_scales(mine: dict[str, ScaleStats], ref: dict[str, ScaleStats], out: FindingCollector) -> None:
    for kind in sorted(set(mine) & set(ref)):
        a, b = mine[kind].median, ref[kind].median
        if not a or not b:
            continue
        ratio = a / b
        if ratio >= SCALE_APART_FACTOR or ratio <= 1 / SCALE_APART_FACTOR:
            out.add("D150", "scale2-reciprocal", Severity.WARNING,
                    f"median {kind} is {a:.3g} in MINE vs {b:.3g} in REF ({math.log10(ratio):+.1f} orders of "
                    "magnitude): a scale stored as 2688/amax instead of amax/2688 looks like this",
                    None, kind=kind, mine_median=a, ref_median=b)
    for kind, st in mine.items():
        bad = st.non_finite + st.negative + (st.zeros if kind != "block_scale" else 0)
        if bad:
            out.add("D151", "non-finite-scale", Severity.ERROR,
                    f"MINE has {bad} NaN/Inf/zero/negative {kind} values", None, kind=kind)


def check_file_level(mine: CheckpointModel, ref: CheckpointModel, out: FindingCollector) -> None:
    md, rd = mine.detection, ref.detection
    if md.family == "wan" and md.naming == "diffusers" and rd.naming == "native":
        out.add("D160", "diffusers-key-names", Severity.ERROR,
                "MINE uses diffusers key names, REF ComfyUI-native ones: ComfyUI has no diffusers->native conversion "
                "for WAN and cannot detect the model", None, mine_naming=md.naming, ref_naming=rd.naming)
    if md.family == "unknown" and rd.family != "unknown":
        out.add("D161", "unknown-architecture", Severity.WARNING,
                f"REF is {rd.variant} but MINE matches no supported architecture", None)
    error = mine.file_markers.get("quantization_metadata_error")
    if error:
        out.add("D162", "invalid-quant-marker", Severity.ERROR, f"MINE's header: {error}", None)
    unmatched = mine.file_markers.get("metadata_unmatched") or []
    if unmatched:
        out.add("D163", "invalid-quant-marker", Severity.WARNING,
                f"MINE's _quantization_metadata names {len(unmatched)} layers the file does not have (ComfyUI "
                "matches the names verbatim)", None, names=unmatched[:10])
    for side, model in (("MINE", mine), ("REF", ref)):
        if model.file_markers.get("scaled_fp8") is not None:
            out.add("D164", "legacy-fp8-format", Severity.INFO,
                    f"{side} is a legacy scaled_fp8 file: ComfyUI converts it on load (scale_weight -> weight_scale)",
                    None, side=side)


def check_roles(mine_roles: dict[str, dict[str, Any]], ref_roles: dict[str, dict[str, Any]],
                out: FindingCollector) -> None:
    """A role MINE quantizes while REF keeps all of it high precision (embeddings, modulation, head...)."""
    for role in sorted(set(mine_roles) & set(ref_roles)):
        if role == "other":
            continue
        mq = mine_roles[role]["precision"].get("quantized", 0)
        rq = ref_roles[role]["precision"].get("quantized", 0)
        if mq and not rq:
            out.add("D141", "sensitive-layer-quantized", Severity.WARNING,
                    f"MINE quantizes {mq} '{role}' layers; REF keeps all {ref_roles[role]['layers']} of them high "
                    "precision", None, role=role)


def compare_values(
    pairs: list[LayerPair], mine: CheckpointModel, ref: CheckpointModel, out: FindingCollector
) -> list[dict[str, Any]]:
    """Dequantize every matched quantized layer of MINE and its REF partner (one pair at a time) with roundtrip's
    machinery: the same metrics, expected error and cause attribution as `nvdiag roundtrip`."""
    from inspect_tools import roundtrip  # noqa: PLC0415 - only --values needs the decoders

    device = torch.device("cpu")
    rows = []
    for pair in pairs:
        if pair.mine is None or pair.ref is None or not pair.mine.is_quantized or not pair.mine.has("weight"):
            continue
        try:
            result, _ = roundtrip.check_pair(pair, ref, device)
        except (OSError, ValueError, RuntimeError, KeyError, InputError) as exc:
            # one undecodable layer must not stop the diff; a malformed REF layer, which makes roundtrip refuse the
            # whole run, is one row here
            rows.append({"layer": pair.mine.name, "key": pair.key, "status": "unreadable", "note": str(exc)})
            continue
        rows.append(result.to_json())
        for finding in roundtrip.findings_for(result, mine.path):
            if result.status == "unreadable":
                message = f"MINE's layer {result.note}"
            else:
                message = "dequantized MINE is far from REF: " + roundtrip.CAUSE_VERDICT.get(
                    finding.cause, ("dequantized values differ",))[0]
            out.add(finding.rule, finding.cause, finding.severity, message, pair.key, **finding.evidence)
    return rows
