"""Two checkpoints side by side: what differs and whether ComfyUI cares (the data behind `nvdiag diff`).

Everything works on Layers (inspect_tools.layers.CheckpointModel); rendering lives in inspect_tools/cli/diff_cmd.py.
Header facts are compared first (formats, dtypes, shapes, aux-tensor signatures, markers, metadata, naming); the
only tensor bytes read are scale tensors (small) and, with `values=True`, the weights of matched layers, one pair
at a time.

Verdicts come from shared/research/comfyui-load-path.md (ComfyUI comfy/ops.py `_load_quantized_module`,
comfy/quant_ops.py, comfy/utils.py `convert_old_quants`):
- input_scale is optional: absent means a dynamic per-call activation scale (amax/2688), the safe choice;
- a quantized weight needs a `.comfy_quant` tensor or a `_quantization_metadata` entry, either one;
- NVFP4 needs `.weight_scale` and `.weight_scale_2` (otherwise "Missing NVFP4 scales");
- weight_scale is re-viewed as float8_e4m3fn, so U8 and F8_E4M3 both work, 2/4-byte dtypes do not;
- weight_scale_2 accepts any float (cast to F32); F32 0-d is canonical;
- a truthy `full_precision_matrix_mult` in the marker ComfyUI loads (the metadata entry over the tensor) makes the
  layer W4A16 on Blackwell, absent or false W4A4 (activations quantized too).
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inspect_tools.align import align_layers
from inspect_tools.errors import InputError
from inspect_tools.inspect import metadata_summary
from inspect_tools.layers import CheckpointModel, open_model
from reference_specs import formats, models
from reference_specs.findings import Finding, Severity
from reference_specs.formats.nvfp4 import BLOCK, block_scale_shape, packed_shape, roundup
from reference_specs.layer import Layer
from reference_specs.rules.compute_markers import compute_counts, compute_path, full_precision_mm

# Roles that carry no information about the format's signature (a bias is optional in every format).
SIGNATURE_SKIP = ("bias",)
# Order of roles in a signature string, so "weight U8 + weight_scale F8_E4M3 + ..." reads the same on both sides.
ROLE_ORDER = (
    "weight",
    "weight_packed",
    "value",
    "weight_scale",
    "weight_scale_2",
    "weight_global_scale",
    "scale_weight",
    "input_scale",
    "input_global_scale",
    "scale_input",
    "pre_quant_scale",
    "comfy_quant",
)
# Optional roles whose presence is counted per format ("REF 110/110 layers have input_scale, MINE 0/210").
COUNTED_ROLES = ("input_scale", "comfy_quant", "pre_quant_scale", "scale_input", "bias")
# Header metadata keys ComfyUI reads (model detection reads "config"; "format"/"model_type" are common writers' keys).
METADATA_KEYS = ("_quantization_metadata", "format", "model_type", "config")
# Scales whose medians differ by this factor are flagged (a reciprocal scale is ~6-7 orders of magnitude off).
SCALE_APART_FACTOR = 100.0
FLOAT32_DTYPES = ("F32", "F64")
FLOAT16_DTYPES = ("F16", "BF16")
# comfy-kitchen / ComfyUI view the block scale bytes as float8_e4m3fn: any 1-byte dtype is read correctly.
BLOCK_SCALE_OK_DTYPES = ("F8_E4M3", "U8")


# ----------------------------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LayerPair:
    """One row of the diff: the same module on both sides (either side None when it exists on one side only).

    key: the name both sides are aligned on (ComfyUI-native name, or the role in a cross-architecture diff)."""

    key: str
    mine: Layer | None
    ref: Layer | None

    @property
    def matched(self) -> bool:
        return self.mine is not None and self.ref is not None


def align_key(layer: Layer) -> str:
    """The name a layer is matched on: its ComfyUI-native name (prefix stripped, diffusers names mapped)."""
    return layer.native_name or layer.name


def align(mine: CheckpointModel, ref: CheckpointModel) -> list[LayerPair]:
    """Pair the layers of two checkpoints of the same architecture across prefixes and naming schemes (the same
    alignment roundtrip uses), in natural order."""
    alignment = align_layers(mine, ref)
    pairs = [LayerPair(align_key(pair.ref), pair.mine, pair.ref) for pair in alignment.pairs]
    pairs.extend(LayerPair(align_key(layer), layer, None) for layer in alignment.only_mine)
    pairs.extend(LayerPair(align_key(layer), None, layer) for layer in alignment.only_ref)
    return sorted(pairs, key=lambda p: _natural_key(p.key))


def _natural_key(name: str) -> list[Any]:
    """'blocks.10.x' after 'blocks.2.x'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def same_architecture(mine: CheckpointModel, ref: CheckpointModel) -> bool:
    """Compare by name unless both architectures are known and belong to different families (WAN vs Flux)."""
    a, b = mine.detection.family, ref.detection.family
    return a == "unknown" or b == "unknown" or a == b


# Separate q/k/v projections (WAN, Qwen) and a fused qkv (Flux) do the same job: compared as one role.
ROLE_GROUPS = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv"}


def role_of(model: CheckpointModel, layer: Layer) -> str:
    """Cross-architecture role (attn_qkv, attn_out, mlp_up, mlp_down, modulation, embedding, head, norm) or
    'other'."""
    profile = models.get_profile(model.detection.variant)
    role = profile.role_of(align_key(layer)) if profile is not None else None
    return ROLE_GROUPS.get(role, role) if role else "other"


def sensitive_reason(model: CheckpointModel, layer: Layer) -> str | None:
    profile = models.get_profile(model.detection.variant)
    return profile.sensitive(align_key(layer)) if profile is not None else None


# ----------------------------------------------------------------------------------------------------------------
# Per-layer facts
# ----------------------------------------------------------------------------------------------------------------


def _shape_text(shape: tuple[int, ...]) -> str:
    if len(shape) == 0:
        return "scalar"
    return "[" + ",".join(str(d) for d in shape) + "]"


def tensor_signature(layer: Layer) -> str:
    """'weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar + comfy_quant': the aux-tensor signature of one
    layer (bias left out; 0-d tensors are 'scalar', one-element 1-d ones '[1]')."""
    roles = [r for r in ROLE_ORDER if r in layer.tensors] + sorted(
        r for r in layer.tensors if r not in ROLE_ORDER and r not in SIGNATURE_SKIP
    )
    parts = []
    for role in roles:
        if role == "comfy_quant":
            parts.append("comfy_quant")
            continue
        info = layer.tensors[role]
        shape = tuple(info.shape)
        suffix = " scalar" if len(shape) == 0 else (" [1]" if shape == (1,) else "")
        parts.append(f"{role} {info.dtype}{suffix}")
    if layer.marker_source == "metadata":
        parts.append("metadata marker")
    return " + ".join(parts)


def main_dtype(layer: Layer) -> str | None:
    for role in ("weight", "weight_packed", "value"):
        if role in layer.tensors:
            return layer.tensors[role].dtype
    return next(iter(layer.tensors.values())).dtype if layer.tensors else None


def precision_class(layer: Layer) -> str:
    """How a layer is stored, coarsely: 'quantized', 'f32', '16-bit' or the dtype itself."""
    if layer.is_quantized and layer.format != "unknown":
        return "quantized"
    dtype = main_dtype(layer) or "?"
    if dtype in FLOAT32_DTYPES:
        return "f32"
    if dtype in FLOAT16_DTYPES:
        return "16-bit"
    if dtype in ("U8", "I8", "F8_E4M3", "F8_E5M2") and layer.format == "unknown":
        return "quantized"  # stored in a low-precision container even if no format claims it
    return dtype


def logical_shape(layer: Layer) -> tuple[int, ...] | None:
    """The unquantized weight shape the stored tensors imply (NVFP4: padded bound)."""
    try:
        fmt = formats.get(layer.format)
    except KeyError:
        fmt = None
    shape = fmt.logical_shape(layer) if fmt is not None else None
    if shape is None:
        shape = layer.shape("weight") or layer.shape("value")
    return tuple(shape) if shape is not None else None


def layer_row(layer: Layer | None, file_markers: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One side of a paired JSON row; `compute` needs the side's file_markers (which marker ComfyUI loads)."""
    if layer is None:
        return None
    shape = logical_shape(layer)
    return {
        "name": layer.name,
        "format": layer.format,
        "precision": precision_class(layer),
        "compute": compute_path(layer, file_markers or {}),
        "logical_shape": list(shape) if shape is not None else None,
        "signature": tensor_signature(layer),
        "tensors": {role: {"dtype": t.dtype, "shape": list(t.shape)} for role, t in layer.tensors.items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# Findings
# ----------------------------------------------------------------------------------------------------------------


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
        return sorted(self._findings, key=lambda f: (-f.severity, f.rule, _natural_key(f.layer or "")))


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
                    f"MINE's packed weight {_shape_text(got)} fits REF's shape transposed {_shape_text(b)}", pair.key)
            return
        out.add("D131", "wrong-shape", Severity.ERROR,
                f"MINE's packed weight is {_shape_text(got)}, REF's shape {_shape_text(b)} packs to "
                f"{_shape_text(expected)}", pair.key)
        return
    if ref.format == "nvfp4" and len(a) == 2:
        if ref.shape("weight") == packed_shape(a[0], a[1]):
            return
    if a != b:
        transposed = len(a) == 2 and a == (b[1], b[0])
        out.add("D130" if transposed else "D131", "transposed-weight" if transposed else "wrong-shape",
                Severity.ERROR, f"shape differs: MINE {_shape_text(a)}, REF {_shape_text(b)}", pair.key)


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
                f"MINE's block scale is {_shape_text(got)}, the unpadded row-major shape; ComfyUI decodes the "
                f"swizzled {_shape_text(block_scale_shape(out_f, in_f))} 128x4-tile layout", pair.key)
    else:
        out.add("D133", "wrong-shape", Severity.ERROR,
                f"MINE's block scale is {_shape_text(got)}, expected {_shape_text(block_scale_shape(out_f, in_f))}",
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


def same_dimensions(mine: CheckpointModel, ref: CheckpointModel) -> bool:
    """Shapes are only comparable layer by layer when both files are the same model size (a scaled-down fixture
    against a full-size reference differs everywhere, which is no finding)."""
    a, b = mine.detection.dims, ref.detection.dims
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def compare_pairs(
    pairs: list[LayerPair], mine_model: CheckpointModel, out: FindingCollector, by_name: bool = True,
    check_shapes: bool = True,
) -> None:
    """Per-layer checks: markers, NVFP4 roles and dtypes, input_scale, shapes, precision (the last two only when
    layers are paired by name)."""
    for pair in pairs:
        _check_markers(pair, out)
        _check_nvfp4_roles(pair, out)
        if by_name and check_shapes:
            _check_shapes(pair, out)
        if by_name:
            _check_precision(pair, mine_model, out)


# ----------------------------------------------------------------------------------------------------------------
# Summaries per side: signatures, counts, precision plan, scales, metadata
# ----------------------------------------------------------------------------------------------------------------


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


def _signature_verdicts(
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


# The value of each of the 256 FP8 E4M3 bytes (0x7F / 0xFF are NaN).
FP8_VALUES: list[float] = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float().tolist()


@dataclass
class ScaleStats:
    """Distribution of one kind of scale on one side: exact for per-layer scalars, log2-binned for block scales."""

    count: int = 0
    zeros: int = 0
    non_finite: int = 0
    negative: int = 0
    min: float = math.inf
    max: float = -math.inf
    log2_bins: Counter[int] = field(default_factory=Counter)
    values: list[float] = field(default_factory=list)  # per-layer scalars only

    def add(self, t: torch.Tensor, keep_values: bool) -> None:
        if t.dtype == torch.float8_e4m3fn and not keep_values:
            self._add_fp8(t)
            return
        v = t.detach().to(torch.float32).flatten()
        finite = torch.isfinite(v)
        self.non_finite += int((~finite).sum())
        v = v[finite]
        self.zeros += int((v == 0).sum())
        self.negative += int((v < 0).sum())
        v = v[v > 0]
        if v.numel() == 0:
            return
        self.count += v.numel()
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        bins, counts = torch.unique(torch.floor(torch.log2(v)).to(torch.int64), return_counts=True)
        for b, c in zip(bins.tolist(), counts.tolist(), strict=True):
            self.log2_bins[b] += c
        if keep_values:
            self.values.extend(v.tolist())

    def _add_fp8(self, t: torch.Tensor) -> None:
        """FP8 block scales have 256 possible values: count the bytes, then account each value once (millions of
        block scales per layer cost one bincount)."""
        counts = torch.bincount(t.contiguous().view(torch.uint8).flatten().to(torch.int64), minlength=256).tolist()
        for value, n in zip(FP8_VALUES, counts, strict=True):
            if not n:
                continue
            if not math.isfinite(value):
                self.non_finite += n
            elif value == 0:
                self.zeros += n
            elif value < 0:
                self.negative += n
            else:
                self.count += n
                self.min, self.max = min(self.min, value), max(self.max, value)
                self.log2_bins[math.floor(math.log2(value))] += n

    @property
    def median(self) -> float | None:
        if self.values:
            return statistics.median(self.values)
        if not self.count:
            return None
        half, seen = self.count / 2, 0
        for b in sorted(self.log2_bins):
            seen += self.log2_bins[b]
            if seen >= half:
                return 2.0 ** (b + 0.5)
        return None

    def decades(self) -> Counter[int]:
        """Counts per power of ten (from the log2 bins), for the text histogram."""
        out: Counter[int] = Counter()
        for b, c in self.log2_bins.items():
            out[math.floor(b * math.log10(2))] += c
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "zeros": self.zeros,
            "non_finite": self.non_finite,
            "negative": self.negative,
            "min": self.min if self.count else None,
            "median": self.median,
            "max": self.max if self.count else None,
            "decades": {f"1e{k}": v for k, v in sorted(self.decades().items())},
        }


def scale_kind(layer: Layer, role: str) -> str | None:
    """Which distribution a scale tensor belongs to: NVFP4 block scales are not comparable with FP8 per-tensor
    scales, so they are kept apart."""
    if role == "weight_scale":
        return "block_scale" if layer.format == "nvfp4" else "weight_scale"
    if role == "scale_weight":
        return "weight_scale"
    if role in ("weight_scale_2", "input_scale"):
        return role
    if role == "scale_input":
        return "input_scale"
    return None


def scale_distributions(layers: Iterable[Layer]) -> dict[str, ScaleStats]:
    """Read every scale tensor of the quantized layers, one at a time, into per-kind distributions."""
    stats: dict[str, ScaleStats] = {}
    for layer in layers:
        if precision_class(layer) != "quantized":
            continue
        for role in ("weight_scale", "weight_scale_2", "input_scale", "scale_weight", "scale_input"):
            kind = scale_kind(layer, role) if layer.has(role) else None
            if kind is None:
                continue
            try:
                t = layer.load(role)
            except Exception:  # noqa: BLE001 - unreadable bytes are the readers' and lint's business
                continue
            if t.dtype == torch.uint8 and kind == "block_scale":
                t = t.view(torch.float8_e4m3fn)
            stats.setdefault(kind, ScaleStats()).add(t, keep_values=kind != "block_scale")
    return stats


def _check_scales(mine: dict[str, ScaleStats], ref: dict[str, ScaleStats], out: FindingCollector) -> None:
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


def _check_file_level(mine: CheckpointModel, ref: CheckpointModel, out: FindingCollector) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Cross-architecture comparison by role
# ----------------------------------------------------------------------------------------------------------------


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


def _check_roles(mine_roles: dict[str, dict[str, Any]], ref_roles: dict[str, dict[str, Any]],
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


# ----------------------------------------------------------------------------------------------------------------
# Dequantized values (--values)
# ----------------------------------------------------------------------------------------------------------------


def compare_values(
    pairs: list[LayerPair], mine: CheckpointModel, ref: CheckpointModel, out: FindingCollector
) -> list[dict[str, Any]]:
    """Dequantize every matched quantized layer of MINE and its REF partner (one pair at a time) with roundtrip's
    machinery: the same metrics, expected error and cause attribution as `nvdiag roundtrip`."""
    from inspect_tools import roundtrip  # noqa: PLC0415 - only --values needs the decoders
    from inspect_tools.align import LayerPair as AlignedPair  # noqa: PLC0415

    device = torch.device("cpu")
    rows = []
    for pair in pairs:
        if pair.mine is None or pair.ref is None or not pair.mine.is_quantized or not pair.mine.has("weight"):
            continue
        try:
            result, _ = roundtrip.check_pair(AlignedPair(mine=pair.mine, ref=pair.ref, key=pair.key), ref, device)
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


# ----------------------------------------------------------------------------------------------------------------
# The diff
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiffReport:
    mine: CheckpointModel
    ref: CheckpointModel
    mode: str  # "name" | "role"
    pairs: list[LayerPair]
    findings: list[Finding]
    signatures: dict[str, dict[str, dict[str, int]]]
    counts: dict[str, dict[str, dict[str, int]]]
    verdicts: list[dict[str, str]]
    precision: dict[str, dict[str, int]]
    disagreements: list[dict[str, str]]
    scales: dict[str, dict[str, ScaleStats]]
    metadata: list[dict[str, Any]]
    roles: dict[str, dict[str, dict[str, Any]]] | None = None
    values: list[dict[str, Any]] | None = None
    # side -> compute path on Blackwell -> layers ({"mine": {"W4A4": 12, "W4A16": 8}, "ref": {...}})
    compute: dict[str, dict[str, int]] = field(default_factory=dict)
    values_skipped: str | None = None  # why quantized layers were compared by header only (None: values compared)

    @property
    def only_mine(self) -> list[str]:
        return [p.key for p in self.pairs if p.ref is None]

    @property
    def only_ref(self) -> list[str]:
        return [p.key for p in self.pairs if p.mine is None]

    @property
    def matched(self) -> int:
        return sum(p.matched for p in self.pairs)

    def summary_text(self) -> str:
        """The one paragraph on top of the text output."""
        m, r = self.mine, self.ref
        parts = [
            f"MINE {m.path.name} ({_arch_text(m)}, {_formats_text(m)}) vs REF {r.path.name} "
            f"({_arch_text(r)}, {_formats_text(r)})."
        ]
        if self.mode == "role":
            parts.append("Different architectures: layers compared by role (attention, MLP, modulation, ...).")
        else:
            parts.append(
                f"{self.matched} layers matched by ComfyUI-native name, {len(self.only_mine)} only in MINE, "
                f"{len(self.only_ref)} only in REF."
            )
            if self.disagreements:
                parts.append(f"{len(self.disagreements)} layers stored at a different precision.")
        errors = [f for f in self.findings if f.severity == Severity.ERROR]
        warnings = [f for f in self.findings if f.severity == Severity.WARNING]
        if errors:
            causes = sorted({f.cause for f in errors})
            parts.append(f"Differences that break MINE in ComfyUI ({len(errors)} error findings): {', '.join(causes)}.")
        elif warnings:
            causes = sorted({f.cause for f in warnings})
            parts.append(f"Nothing that stops ComfyUI loading MINE; {len(warnings)} warning(s) to look at: "
                         f"{', '.join(causes)}.")
        else:
            parts.append("No difference that matters to ComfyUI"
                         + (" in the headers" if self.values_skipped else "") + ".")
        if self.values_skipped:
            parts.append(f"Dequantized values NOT compared ({self.values_skipped}).")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "mine": _side_json(self.mine),
            "ref": _side_json(self.ref),
            "mode": self.mode,
            "summary_text": self.summary_text(),
            "only_mine": self.only_mine,
            "only_ref": self.only_ref,
            "signatures": self.signatures,
            "counts": self.counts,
            "signature_verdicts": self.verdicts,
            "precision_plan": {**self.precision, "disagreements": self.disagreements, "compute": self.compute},
            "scales": {side: {k: v.to_json() for k, v in st.items()} for side, st in self.scales.items()},
            "metadata": self.metadata,
            "roles": self.roles,
            "values": self.values,
            "values_skipped": self.values_skipped,
            "rows": [
                {
                    "name": p.key,
                    "mine": layer_row(p.mine, self.mine.file_markers),
                    "ref": layer_row(p.ref, self.ref.file_markers),
                }
                for p in self.pairs
            ],
        }


def _arch_text(model: CheckpointModel) -> str:
    det = model.detection
    if det.family == "unknown":
        return "unknown architecture"
    return det.variant + (", diffusers names" if det.naming == "diffusers" else "")


def _formats_text(model: CheckpointModel) -> str:
    return ", ".join(f"{fmt} {n}" for fmt, n in model.format_counts().items()) or "no layers"


def _side_json(model: CheckpointModel) -> dict[str, Any]:
    return {
        "path": str(model.path),
        "container": model.kind,
        "architecture": model.detection.to_json(),
        "formats": model.format_counts(),
    }


def _selected(layers: Iterable[Layer], pattern: str | None) -> list[Layer]:
    return [
        layer
        for layer in layers
        if not pattern
        or fnmatch.fnmatchcase(layer.name, pattern)
        or fnmatch.fnmatchcase(align_key(layer), pattern)
    ]


def diff_models(
    mine: CheckpointModel, ref: CheckpointModel, layers: str | None = None, values: bool = False
) -> DiffReport:
    """Compare two opened checkpoints. `layers`: glob on file or native names; `values`: also compare the
    dequantized weights of matched quantized layers (reads those weights, one pair at a time)."""
    out = FindingCollector(str(mine.path))
    by_name = same_architecture(mine, ref)
    mine_layers = _selected(mine.layers.values(), layers)
    ref_layers = _selected(ref.layers.values(), layers)
    if by_name:
        keep_m, keep_r = {id(x) for x in mine_layers}, {id(x) for x in ref_layers}
        pairs = [
            LayerPair(p.key, p.mine if id(p.mine) in keep_m else None, p.ref if id(p.ref) in keep_r else None)
            for p in align(mine, ref)
        ]
        pairs = [p for p in pairs if p.mine is not None or p.ref is not None]
    else:
        pairs = [LayerPair(align_key(x), x, None) for x in mine_layers]
        pairs += [LayerPair(align_key(x), None, x) for x in ref_layers]
    _check_file_level(mine, ref, out)
    compare_pairs(pairs, mine, out, by_name=by_name, check_shapes=same_dimensions(mine, ref))
    if by_name:
        check_compute(pairs, mine, ref, out)
    mine_counts, ref_counts = role_counts(mine_layers), role_counts(ref_layers)
    scales = {"mine": scale_distributions(mine_layers), "ref": scale_distributions(ref_layers)}
    _check_scales(scales["mine"], scales["ref"], out)
    roles = None
    if not by_name:
        roles = {"mine": role_table(mine, mine_layers), "ref": role_table(ref, ref_layers)}
        _check_roles(roles["mine"], roles["ref"], out)
    value_rows = compare_values(pairs, mine, ref, out) if values and by_name else None
    quantized = any(p.mine is not None and p.mine.is_quantized for p in pairs)
    skipped = None
    if quantized and value_rows is None:
        skipped = "different architectures: no layer pairs to decode" if not by_name else "--no-values"
    return DiffReport(
        mine=mine,
        ref=ref,
        mode="name" if by_name else "role",
        pairs=pairs,
        findings=out.findings(),
        signatures={"mine": signatures(mine_layers), "ref": signatures(ref_layers)},
        counts={"mine": mine_counts, "ref": ref_counts},
        verdicts=_signature_verdicts(mine_counts, ref_counts),
        precision={"mine": precision_plan(mine_layers), "ref": precision_plan(ref_layers)},
        disagreements=plan_disagreements(pairs) if by_name else [],
        scales=scales,
        metadata=metadata_comparison(mine, ref),
        roles=roles,
        values=value_rows,
        compute={"mine": compute_counts(mine_layers, mine.file_markers),
                 "ref": compute_counts(ref_layers, ref.file_markers)},
        values_skipped=skipped,
    )


def diff_paths(mine: str | Path, ref: str | Path, layers: str | None = None, values: bool = False) -> DiffReport:
    """Open both checkpoints, diff them, close them. The report keeps headers only (no tensor is read later)."""
    with open_model(mine) as mine_model, open_model(ref) as ref_model:
        return diff_models(mine_model, ref_model, layers, values)
