"""`nvdiag fix`: repair a silently broken checkpoint by lossless byte transformations, never by re-quantizing.

Flow: lint BROKEN (and roundtrip it against REF when given) -> plan: each finding whose cause is certain and has a
lossless remedy (converter/remedies.py) becomes a Repair on the output tensors; every other finding is listed as
not fixable here, with the reason and what to do instead -> write OUT tensor by tensor through the atomic writer ->
gate: the written file must lint clean (and roundtrip clean against REF) before it is published.

Decisions (documented in the command's help too):
- Nothing is written when an ERROR finding cannot be repaired: the result could not pass the gate anyway.
- Warnings and infos that cannot be repaired do not block; they are listed.
- Nothing to repair: OUT is not written (a byte copy helps nobody); exit 0.
- Without --against, repairs that change decoded values (layout, nibbles, reciprocal scale) are written, but
  nothing has checked the values (a second fault, such as swapped nibbles, is invisible to lint): the verdict says
  NOT VERIFIED with the command that checks, and the exit code is 1.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter import remedies
from inspect_tools.layers import QUANT_METADATA_KEY, CheckpointModel
from reference_specs import formats
from reference_specs.findings import Finding, Severity
from reference_specs.formats.nvfp4 import block_scale_shape, reswizzle_block_scales
from reference_specs.layer import Layer, split_key
from reference_specs.models import get_profile
from reference_specs.rules.foreign_layouts import foreign_format

if TYPE_CHECKING:
    import torch

PROVENANCE_KEY = "nvdiag_fix"

# Causes fix can repair, with what the repair does (the plan's and the provenance's vocabulary).
FIXABLE: dict[str, str] = {
    "scale-layout-linear": "block scales re-swizzled into the 128x4 tile layout",
    "nibble-order": "FP4 nibbles swapped to even-element-high",
    "scale2-reciprocal": "per-tensor scale replaced by its reciprocal (the decode multiplier)",
    "diffusers-key-names": "keys renamed to ComfyUI-native names (aux tensors and metadata too)",
    "missing-quant-marker": "comfy_quant marker and _quantization_metadata entry added",
    "invalid-quant-marker": "_quantization_metadata layer names rewritten to the file's keys, or broken comfy_quant "
                            "tensors rebuilt from the layer's tensors (removed where the weight is not quantized), "
                            "or double-braced metadata unwrapped",
    "input-scale-implausible": "weight-derived input_scale dropped (absent = dynamic activation scale)",
    "wrong-dtype": "scale re-stored in the dtype its role requires (values unchanged)",
    "foreign-layout": "published layout rewritten into ComfyUI's format, decoded values unchanged (LightX2V NVFP4: "
                      "nibbles swapped, weight_scale_2 = alpha * input_global_scale, input_scale = "
                      "1 / input_global_scale, alpha and input_global_scale dropped; ModelOpt NVFP4: nibbles "
                      "swapped, block scales swizzled; markers added)",
}

# Repairs that change what the file decodes to: only a reference can confirm the result (fix's verdict says so).
VALUE_CAUSES = ("scale-layout-linear", "nibble-order", "scale2-reciprocal")

# What to do about causes fix never repairs (the plan's "not fixable here" list).
NOT_FIXABLE: dict[str, tuple[str, str]] = {
    "stale-scale": ("the scales do not belong to the packed data; the original values are lost",
                    "re-convert from the source with nvdiag convert"),
    "excess-error": ("the error has no attributable cause, so no lossless transformation is known",
                     "re-convert from the source with nvdiag convert"),
    "reference-mismatch": ("the reference is not the weights the file was made from; nothing to repair is proven",
                           "fix again with --against the file's own source"),
    "transposed-weight": ("a quantized weight's blocks run along the wrong axis; transposing cannot regroup them",
                          "re-convert from the source with nvdiag convert"),
    "missing-block-scale": ("the block scales are not in the file", "re-convert from the source with nvdiag convert"),
    "missing-tensor-scale": ("the per-tensor scale is not in the file",
                             "re-convert from the source with nvdiag convert"),
    "non-finite-scale": ("NaN, Inf, zero, negative or subnormal scales have no recoverable value",
                         "re-convert from the source with nvdiag convert"),
    "non-finite-weight": ("NaN/Inf weight values have no recoverable value (an overflowed cast lost them)",
                          "re-convert from the source with nvdiag convert (it keeps such layers at BF16)"),
    "sensitive-layer-quantized": ("the layer's high-precision values are lost",
                                  "re-convert from the source with a preset that keeps the layer (nvdiag convert)"),
    "wrong-shape": ("tensor shapes disagree; which one is wrong cannot be told from the bytes",
                    "re-convert from the source with nvdiag convert"),
    "unknown-architecture": ("no supported architecture matches the keys", "nothing to repair losslessly"),
    "legacy-fp8-format": ("legacy scaled_fp8 loads as it is (informational)",
                          "re-convert with nvdiag convert for native markers"),
}

Transform = Callable[["torch.Tensor"], "torch.Tensor"]  # quoted: torch is imported only to repair


class NotFixable(Exception):
    """A finding whose cause has a remedy, but not for this layer (uncertain, inexact, unsupported variant)."""

    def __init__(self, reason: str, remedy: str = "re-convert from the source with nvdiag convert") -> None:
        super().__init__(reason)
        self.reason = reason
        self.remedy = remedy


@dataclass
class OutTensor:
    """One tensor of the fixed file: where it comes from and what happens to it on the way."""

    name: str  # key in OUT (before the final rename pass)
    source: str | None  # key in BROKEN; None for a tensor fix creates
    dtype: str
    shape: tuple[int, ...]
    transforms: list[Transform] = field(default_factory=list)
    value: torch.Tensor | None = None  # created tensors (tiny markers)


@dataclass
class Repair:
    cause: str
    layer: str | None
    change: str
    exact: bool = True


@dataclass
class Unfixable:
    finding: Finding
    reason: str
    remedy: str

    def to_json(self) -> dict[str, Any]:
        return {**self.finding.to_json(), "reason": self.reason, "remedy": self.remedy}


@dataclass
class FixPlan:
    source: Path
    tensors: list[OutTensor]
    metadata: dict[str, str]
    repairs: list[Repair] = field(default_factory=list)
    unfixable: list[Unfixable] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)  # fixable but excluded by --only

    @property
    def blocking(self) -> list[Finding]:
        """Error findings the plan leaves in place (unfixable, or excluded by --only): the fixed file could not
        lint clean, so nothing is written."""
        return [u.finding for u in self.unfixable if u.finding.severity >= Severity.ERROR] + [
            f for f in self.skipped if f.severity >= Severity.ERROR]

    def repaired_causes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.repairs:
            counts[r.cause] = counts.get(r.cause, 0) + 1
        return dict(sorted(counts.items()))

    def by_cause(self) -> dict[str, list[Repair]]:
        out: dict[str, list[Repair]] = {}
        for r in self.repairs:
            out.setdefault(r.cause, []).append(r)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "repairs": {
                cause: {"summary": FIXABLE[cause], "layers": [r.layer for r in reps],
                        "changes": [r.change for r in reps], "exact": all(r.exact for r in reps)}
                for cause, reps in self.by_cause().items()
            },
            "not_fixable": [u.to_json() for u in self.unfixable],
            "skipped": [f.to_json() for f in self.skipped],
        }


# --- building the plan -------------------------------------------------------------------------------------------


class _Planner:
    """Holds the output tensors of one plan while remedies edit them."""

    def __init__(self, model: CheckpointModel) -> None:
        self.model = model
        self.tensors: dict[str, OutTensor] = {
            info.name: OutTensor(info.name, info.name, info.dtype, tuple(info.shape)) for info in model.reader
        }
        self.order: list[str] = list(self.tensors)
        self.quant_layers: dict[str, Any] | None = _quant_layers(model)
        self.metadata_added = False
        self.rename: Callable[[str], str] | None = None
        self.done: set[tuple[str, str | None, str | None]] = set()
        self.per_layer: dict[str, int] = {}  # cause -> number of findings naming a layer

    def layer(self, finding: Finding) -> Layer:
        layer = self.model.layers.get(finding.layer or "")
        if layer is None:
            raise NotFixable(f"the finding names no layer of the file ({finding.layer!r})")
        return layer

    def entry(self, layer: Layer, role: str) -> OutTensor:
        info = layer.tensors.get(role)
        if info is None or info.name not in self.tensors:
            raise NotFixable(f"{layer.name} has no {role} tensor")
        return self.tensors[info.name]

    def add_after(self, layer: Layer, entry: OutTensor) -> None:
        last = max(self.order.index(t.name) for t in layer.tensors.values())
        self.order.insert(last + 1, entry.name)
        self.tensors[entry.name] = entry

    def drop(self, name: str) -> None:
        self.tensors.pop(name)
        self.order.remove(name)


def _quant_layers(model: CheckpointModel) -> dict[str, Any] | None:
    parsed = model.file_markers.get("quantization_metadata")
    return dict(parsed["layers"]) if parsed else None


def _role_of(finding: Finding, default: str) -> str:
    return str(finding.evidence.get("role") or default)


def _fix_scale_layout(p: _Planner, f: Finding) -> list[Repair]:
    if f.layer is None:
        return _fix_scale_layout_file(p, f)
    return _reswizzle(p, f, p.layer(f))


def _fix_scale_layout_file(p: _Planner, f: Finding) -> list[Repair]:
    """NV204's verdict is about the file: writers use one layout for every layer. Per-layer findings (a roundtrip
    against REF measures every layer) are more precise and win; without them every NVFP4 layer is re-swizzled and
    the gate checks the verdict on the result."""
    if any(cause == f.cause and layer is not None for cause, layer, _ in p.done) or p.per_layer.get(f.cause):
        return []
    layers = [layer for layer in p.model.layers.values() if layer.format == "nvfp4" and layer.has("weight_scale")]
    if not layers:
        raise NotFixable("no NVFP4 layer with block scales")
    repairs = []
    for layer in layers:
        repairs += _reswizzle(p, f, layer)
        p.done.add((f.cause, layer.name, None))
    return repairs


def _reswizzle(p: _Planner, f: Finding, layer: Layer) -> list[Repair]:
    if layer.format != "nvfp4":
        raise NotFixable(f"layer format is {layer.format}, not nvfp4")
    packed = layer.shape("weight")
    scales = p.entry(layer, "weight_scale")
    if packed is None or len(packed) != 2 or len(scales.shape) != 2:
        raise NotFixable("packed weight or block scales are not 2-D")
    target = block_scale_shape(packed[0], packed[1] * 2)
    if scales.shape[0] > target[0] or scales.shape[1] > target[1]:
        raise NotFixable(f"block scales {scales.shape} do not fit the swizzled shape {target}")
    scales.transforms.append(lambda t, shape=packed: reswizzle_block_scales(t, shape))
    change = f"weight_scale {list(scales.shape)} linear -> {list(target)} swizzled"
    scales.shape = target
    return [Repair(f.cause, layer.name, change)]


def _fix_nibbles(p: _Planner, f: Finding) -> list[Repair]:
    layer = p.layer(f)
    weight = p.entry(layer, "weight")
    if weight.dtype != "U8":
        raise NotFixable(f"packed weight is {weight.dtype}, not U8")
    weight.transforms.append(remedies.swap_nibbles)
    return [Repair(f.cause, layer.name, "weight nibbles swapped")]


def _fix_reciprocal(p: _Planner, f: Finding) -> list[Repair]:
    layer = p.layer(f)
    role = _role_of(f, "weight_scale_2")
    if role not in ("weight_scale_2", "input_scale", "weight_scale"):
        raise NotFixable(f"{role} is a compressed-tensors scale; its layer is not in ComfyUI's format")
    if role == "weight_scale" and layer.dtype("weight") not in ("F8_E4M3", "F8_E5M2"):
        raise NotFixable("weight_scale is a block scale here, not a per-tensor scale")
    entry = p.entry(layer, role)
    if len([d for d in entry.shape if d != 1]) != 0:
        raise NotFixable(f"{role} is not a single value")
    inverted = remedies.invert_reciprocal_scale(layer.load(role))
    entry.transforms = [lambda _t, v=inverted.value, s=entry.shape: v.reshape(s).clone()]
    entry.dtype = "F32"
    return [Repair(f.cause, layer.name, f"{role} {float(layer.load(role)):.6g} -> {float(inverted.value):.6g} "
                   f"({inverted.note})", inverted.exact)]


def _fix_input_scale(p: _Planner, f: Finding) -> list[Repair]:
    if f.evidence.get("reason") != "equals-weight-scale":
        raise NotFixable("only an input_scale copied from the weights is certainly wrong; this one may be calibrated",
                         "drop it by hand if you know it is not calibrated, or re-convert with calibrated scales")
    layer = p.layer(f)
    p.drop(p.entry(layer, "input_scale").name)
    return [Repair(f.cause, layer.name, "input_scale dropped")]


def _fix_dtype(p: _Planner, f: Finding) -> list[Repair]:
    layer = p.layer(f)
    role = _role_of(f, "")
    entry = p.entry(layer, role) if role else None
    if entry is None:
        raise NotFixable("the finding names no tensor role")
    if role == "weight_scale" and layer.format == "nvfp4" and entry.dtype in ("F32", "F16", "BF16"):
        if remedies.cast_block_scale_to_fp8(layer.load(role)) is None:
            raise NotFixable("block scale values are not all exactly representable in F8_E4M3")
        entry.transforms.append(_cast_fp8_checked)
        entry.dtype = "F8_E4M3"
        return [Repair(f.cause, layer.name, f"weight_scale {f.evidence.get('found')} -> F8_E4M3 (exact)")]
    if role in ("weight_scale_2", "input_scale") and entry.dtype in ("F16", "BF16"):
        entry.transforms.append(remedies.widen_scale_to_f32)
        entry.dtype = "F32"
        return [Repair(f.cause, layer.name, f"{role} {f.evidence.get('found')} -> F32 (exact)")]
    raise NotFixable(f"{role} stored as {entry.dtype} has no lossless conversion to what its role needs")


def _cast_fp8_checked(t: torch.Tensor) -> torch.Tensor:
    fp8 = remedies.cast_block_scale_to_fp8(t)
    if fp8 is None:  # checked at planning time; the file changed under us
        raise ValueError("block scale values are no longer exactly representable in F8_E4M3")
    return fp8


def _fix_marker(p: _Planner, f: Finding) -> list[Repair]:
    layer = p.layer(f)
    if p.quant_layers is not None and p.metadata_added and layer.name in p.quant_layers:
        return []  # the metadata name rewrite (invalid-quant-marker, planned first) already marks this layer
    scale_shape = layer.shape("weight_scale")
    conf = remedies.marker_for(layer.dtype("weight") or "", set(layer.tensors), layer.shape("weight") or (),
                               scale_shape)
    if conf is None:
        raise NotFixable("the layer's tensors do not prove one quantized format")
    value = remedies.marker_tensor(conf)
    p.add_after(layer, OutTensor(f"{layer.name}.comfy_quant", None, "U8", tuple(value.shape), value=value))
    p.quant_layers = p.quant_layers if p.quant_layers is not None else {}
    p.quant_layers[layer.name] = conf
    p.metadata_added = True
    return [Repair(f.cause, layer.name, f"comfy_quant {json.dumps(conf)} added")]


# safetensors dtype names of the tensors a format's rewrite creates (scalars)
_CREATED_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint8": "U8"}


def _fix_foreign_layout(p: _Planner, f: Finding) -> list[Repair]:
    """NV112: a published layout rewritten into its native format by the format's own rule (Format.native_tensors):
    tensors it keeps are streamed through its transforms, the scalars it computes are written, roles it does not
    name are dropped, and the native format's marker is added (tensor and metadata entry)."""
    layer = p.layer(f)
    fmt = foreign_format(layer)
    if fmt is None or fmt.native_slug is None:
        raise NotFixable(f"layer format {layer.format} has no rewrite into a format ComfyUI loads")
    try:
        rewrite = fmt.native_tensors(layer)
    except (ValueError, NotImplementedError) as exc:
        raise NotFixable(f"{fmt.slug} layer cannot be rewritten exactly: {exc}") from exc
    conf = formats.get(fmt.native_slug).marker_conf()
    if conf is None:
        raise NotFixable(f"{fmt.native_slug} has no comfy_quant marker")
    created = []
    for role, (source, how, shape) in rewrite.items():
        if source is None:
            value = how.contiguous()  # type: ignore[union-attr]
            created.append(OutTensor(f"{layer.name}.{role}", None, _CREATED_DTYPES[str(value.dtype).split(".")[-1]],
                                     tuple(value.shape), value=value))
        else:
            entry = p.entry(layer, source)
            entry.transforms.append(how)  # type: ignore[arg-type]
            entry.shape = entry.shape if shape is None else tuple(shape)
    marker = remedies.marker_tensor(conf)
    created.append(OutTensor(f"{layer.name}.comfy_quant", None, "U8", tuple(marker.shape), value=marker))
    for entry in reversed(created):
        p.add_after(layer, entry)
    kept = {source for source, _, _ in rewrite.values() if source is not None}
    dropped = sorted(role for role in layer.tensors if role not in kept)
    for role in dropped:
        p.drop(layer.tensors[role].name)
    p.quant_layers = p.quant_layers if p.quant_layers is not None else {}
    p.quant_layers[layer.name] = conf
    p.metadata_added = True
    computed = [role for role, (source, _, _) in rewrite.items() if source is None]
    reshaped = [role for role, (source, _, shape) in rewrite.items() if source is not None and shape is not None]
    said = [f"{', '.join(computed)} computed"] if computed else []
    said += [f"{', '.join(reshaped)} re-laid out"] if reshaped else []
    said += [f"{', '.join(dropped)} dropped"] if dropped else []
    said.append(f"comfy_quant {json.dumps(conf)} added")
    return [Repair(f.cause, layer.name, f"{fmt.slug} -> {fmt.native_slug}: {'; '.join(said)}")]


def _fix_metadata_names(p: _Planner, f: Finding) -> list[Repair]:
    unmatched = list(p.model.file_markers.get("metadata_unmatched") or [])
    if f.layer is not None or not unmatched or p.quant_layers is None:
        raise NotFixable("the marker itself is unreadable or wrong, not its layer names",
                         "re-convert from the source with nvdiag convert")
    mapping = remedies.strip_or_add_prefix(unmatched, set(p.model.layers))
    if mapping is None:
        raise NotFixable("no single prefix change maps the metadata names onto the file's layers")
    p.quant_layers = {mapping.get(name, name): conf for name, conf in p.quant_layers.items()}
    p.metadata_added = True
    return [Repair(f.cause, new, f"_quantization_metadata name {old!r} -> {new!r}") for old, new in mapping.items()]


def _fix_key_names(p: _Planner, f: Finding) -> list[Repair]:
    detection = p.model.detection
    profile = get_profile(detection.variant)
    if detection.naming != "diffusers" or profile is None:
        raise NotFixable("the architecture is not detected under diffusers names, so the name map is unknown")
    prefix = detection.prefix

    def rename(key: str) -> str:
        if prefix and not key.startswith(prefix):
            return key
        return prefix + profile.to_native(key[len(prefix):])

    p.rename = rename
    renamed = sorted({split_key(n)[0] for n in p.tensors if rename(n) != n})
    return [Repair(f.cause, name, f"{name} -> {rename(name)}") for name in renamed]


def _fix_marker_tensor(p: _Planner, f: Finding) -> list[Repair]:
    """NV110: a placeholder or format-less comfy_quant tensor. Rebuilt from the layer's own tensors when they prove
    one format (the conf's other keys kept); removed from a layer whose weight is not quantized."""
    layer = p.layer(f)
    entry = p.entry(layer, "comfy_quant")
    if not f.evidence.get("quantized"):
        p.drop(entry.name)
        if p.quant_layers is not None and p.quant_layers.pop(layer.name, None) is not None:
            p.metadata_added = True
        return [Repair(f.cause, layer.name, f"placeholder comfy_quant ({f.evidence['defect']}) removed: "
                                            "the weight is not quantized")]
    conf = remedies.marker_for(layer.dtype("weight") or "", set(layer.tensors), layer.shape("weight") or (),
                               layer.shape("weight_scale"))
    if conf is None:
        raise NotFixable("the layer's tensors do not prove one quantized format")
    kept = (p.model.file_markers.get("marker_confs") or {}).get(layer.name, {}).get("tensor") or {}
    conf = {**kept, **conf}  # a format-less conf keeps its other keys (full_precision_matrix_mult ...)
    value = remedies.marker_tensor(conf)
    entry.source, entry.value, entry.shape, entry.transforms = None, value, tuple(value.shape), []
    if p.quant_layers is not None and layer.name in p.quant_layers:
        p.quant_layers[layer.name] = conf
        p.metadata_added = True
    return [Repair(f.cause, layer.name, f"comfy_quant ({f.evidence['defect']}) rebuilt as {json.dumps(conf)}")]


def _fix_double_braces(p: _Planner, f: Finding) -> list[Repair]:
    """NV111: the metadata inside the double braces becomes the entry (layers renamed by no one)."""
    recovered = p.model.file_markers.get("quantization_metadata_recovered")
    if not recovered:
        raise NotFixable("the text inside the braces is not quantization metadata either")
    p.quant_layers = dict(recovered["layers"])
    p.metadata_added = True
    return [Repair(f.cause, None, f"_quantization_metadata unwrapped from double braces "
                                  f"({len(p.quant_layers)} layer(s))")]


def _fix_invalid_marker(p: _Planner, f: Finding) -> list[Repair]:
    if f.evidence.get("defect") in ("empty", "all-zero", "no-format"):
        return _fix_marker_tensor(p, f)
    if f.evidence.get("defect") == "double-braces":
        return _fix_double_braces(p, f)
    return _fix_metadata_names(p, f)


HANDLERS: dict[str, Callable[[_Planner, Finding], list[Repair]]] = {
    "scale-layout-linear": _fix_scale_layout,
    "nibble-order": _fix_nibbles,
    "scale2-reciprocal": _fix_reciprocal,
    "input-scale-implausible": _fix_input_scale,
    "wrong-dtype": _fix_dtype,
    "missing-quant-marker": _fix_marker,
    "invalid-quant-marker": _fix_invalid_marker,
    "diffusers-key-names": _fix_key_names,
    "foreign-layout": _fix_foreign_layout,
}


def _dedupe_key(f: Finding) -> tuple[str, str | None, str | None]:
    role = f.evidence.get("role") if f.cause in ("scale2-reciprocal", "wrong-dtype") else None
    return f.cause, f.layer if f.cause != "diffusers-key-names" else None, role


def plan_fix(model: CheckpointModel, findings: list[Finding], only: set[str] | None = None) -> FixPlan:
    """Findings of `model` -> the output tensors and metadata of the fixed file, the repairs made and the findings
    left unrepaired with their reason. Reads only the small tensors a decision needs (scalars, block scales)."""
    if only:
        unknown = sorted(only - set(FIXABLE))
        if unknown:
            from inspect_tools.errors import UsageError

            raise UsageError(f"--only names causes fix cannot repair: {', '.join(unknown)} "
                             f"(fixable: {', '.join(FIXABLE)})")
    p = _Planner(model)
    for f in findings:
        if f.layer is not None:
            p.per_layer[f.cause] = p.per_layer.get(f.cause, 0) + 1
    plan = FixPlan(source=model.path, tensors=[], metadata={})
    # renames last so every other repair still sees the file's own names
    ordered = sorted(findings, key=lambda f: (f.cause == "diffusers-key-names", f.cause, f.layer is None,
                                              f.layer or ""))
    for f in ordered:
        key = _dedupe_key(f)
        if key in p.done or f.severity < Severity.WARNING:
            continue  # an info finding states what lint could not decide (NV204 inconclusive): nothing to repair
        handler = HANDLERS.get(f.cause)
        if handler is None:
            reason, remedy = NOT_FIXABLE.get(f.cause, ("no lossless remedy is known", "re-convert with nvdiag convert"))
            plan.unfixable.append(Unfixable(f, reason, remedy))
            continue
        if only and f.cause not in only:
            plan.skipped.append(f)
            continue
        try:
            plan.repairs.extend(handler(p, f))
            p.done.add(key)
        except NotFixable as exc:
            plan.unfixable.append(Unfixable(f, exc.reason, exc.remedy))
        except (ValueError, RuntimeError) as exc:
            plan.unfixable.append(Unfixable(f, f"the remedy does not apply: {exc}", "re-convert with nvdiag convert"))
    _finish(p, plan)
    return plan


def _finish(p: _Planner, plan: FixPlan) -> None:
    rename = p.rename or (lambda key: key)
    plan.tensors = []
    for name in p.order:
        entry = p.tensors[name]
        entry.name = rename(entry.name)
        plan.tensors.append(entry)
    metadata = {k: v for k, v in p.model.metadata.items() if isinstance(v, str)}
    if p.quant_layers is not None and (p.metadata_added or p.rename is not None):
        parsed = dict(p.model.file_markers.get("quantization_metadata") or {"format_version": "1.0"})
        parsed["layers"] = {rename(name): conf for name, conf in p.quant_layers.items()}
        metadata[QUANT_METADATA_KEY] = json.dumps(parsed)
    plan.metadata = metadata


def provenance(plan: FixPlan, version: str) -> str:
    """The JSON recorded under PROVENANCE_KEY in the fixed file's header: what was repaired, how many layers."""
    inexact = [r.change for r in plan.repairs if not r.exact]
    entry: dict[str, Any] = {
        "tool": "nvdiag fix",
        "version": version,
        "source": plan.source.name,
        "repaired": plan.repaired_causes(),
    }
    if inexact:
        entry["not_exact"] = inexact
    return json.dumps(entry, sort_keys=True)


# --- running it --------------------------------------------------------------------------------------------------


@dataclass
class FixResult:
    """What `fix_checkpoint` did. exit_code: 0 written and clean (or nothing to do / a dry run that can proceed),
    1 unfixable errors remain or the gate refused the written file."""

    plan: FixPlan
    out: Path
    findings: list[Finding]  # BROKEN's findings (lint, plus roundtrip with --against)
    dry_run: bool = False
    written: bool = False
    gate_findings: list[Finding] = field(default_factory=list)
    against: bool = False  # a reference was given: value-level causes were looked for too

    @property
    def refused(self) -> bool:
        return any(f.severity >= Severity.ERROR for f in self.gate_findings)

    @property
    def unverified(self) -> list[str]:
        """Repaired causes that change decoded values, made without a reference: nothing checked that the values
        now decode right (a file with linear scales AND swapped nibbles shows lint only the layout)."""
        if self.against:
            return []
        return sorted({r.cause for r in self.plan.repairs} & set(VALUE_CAUSES))

    @property
    def exit_code(self) -> int:
        return 1 if self.plan.blocking or self.refused or (self.unverified and not self.dry_run) else 0

    def verdict(self) -> str:
        repaired = ", ".join(f"{c} ({n})" for c, n in self.plan.repaired_causes().items())
        if self.plan.blocking:
            return (f"{len(self.plan.blocking)} error finding(s) cannot be repaired losslessly; nothing written"
                    if not self.dry_run else f"would refuse: {len(self.plan.blocking)} error finding(s) cannot be "
                    "repaired losslessly")
        if not self.plan.repairs and self.plan.unfixable:
            return (f"nothing fix can repair losslessly: {len(self.plan.unfixable)} finding(s) listed above need "
                    "another remedy" + ("" if self.dry_run else "; no output written"))
        if not self.plan.repairs:
            said = "nothing to repair" + ("" if self.dry_run else "; no output written")
            if not self.against:
                again = shlex.join(["nvdiag", "fix", str(self.plan.source), str(self.out), "--against", "SRC"])
                said += (f"; lint rules only: nibble order, stale scales and other value-level causes need the "
                         f"source the file was made from: {again}")
            return said
        if self.dry_run:
            return f"would repair {repaired}" + self._unverified_note()
        if self.refused:
            return f"the repaired file does not pass the gate ({len(self.gate_findings)} finding(s)); nothing written"
        return f"repaired {repaired}; wrote {self.out}" + self._unverified_note()

    def _unverified_note(self) -> str:
        if not self.unverified:
            return ""
        check = shlex.join(["nvdiag", "roundtrip", str(self.out), "--against", "SRC"])
        return (f"; NOT VERIFIED: {', '.join(self.unverified)} change(s) decoded values and no reference was given, "
                "so nothing checked that the file now decodes right (swapped nibbles and stale scales are invisible "
                f"without one): {check}, or fix again with --against SRC")


def collect_findings(model: CheckpointModel, against: CheckpointModel | None = None) -> list[Finding]:
    """Lint `model` (every rule, at the severities `nvdiag lint` gives: no preset chose anything in a file fix
    is given) and, with a reference, roundtrip it: the findings fix plans from."""
    from inspect_tools.lint import lint_model

    findings = lint_model(model)
    if against is not None:
        from inspect_tools.roundtrip import roundtrip

        findings += roundtrip(model, against).findings
    return findings


def gate_fixed(path: Path, against: CheckpointModel | None) -> tuple[list[Finding], bool]:
    """The gate for a fixed file (convert's converter.gate.run_gate needs a conversion plan, so fix runs lint, at
    lint's own severities, and a full roundtrip against REF itself). (findings, lint ran)."""
    from inspect_tools.layers import open_model
    from inspect_tools.lint import lint_model

    with open_model(path) as fixed:
        findings, ran = lint_model(fixed), True
        if against is not None:
            from inspect_tools.roundtrip import roundtrip

            findings += roundtrip(fixed, against).findings
    return findings, ran


def _produce(entry: OutTensor, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    if entry.value is not None:
        return entry.value
    assert entry.source is not None
    tensor = load(entry.source)
    for transform in entry.transforms:
        tensor = transform(tensor)
    return tensor.contiguous()


def write_fixed(plan: FixPlan, model: CheckpointModel, out: Path, version: str,
                gate: Callable[[Path], tuple[list[Finding], bool]],
                overwrite: bool = True) -> tuple[bool, list[Finding]]:
    """Stream the planned tensors into a temporary file beside `out`, gate it, and rename it into place only
    when the gate finds no error (replacing an existing `out` only when `overwrite`). (written, gate findings)."""
    from inspect_tools.writer import SafetensorsWriter

    metadata = dict(plan.metadata)
    metadata[PROVENANCE_KEY] = provenance(plan, version)
    entries = [(t.name, t.dtype, t.shape) for t in plan.tensors]
    by_name = {t.name: t for t in plan.tensors}
    with SafetensorsWriter(out, entries, metadata, overwrite=overwrite) as writer:
        for name in writer.order:
            writer.write(name, _produce(by_name[name], model.reader.load))
        assert writer.temp_path is not None
        findings, _ran = gate(writer.temp_path)
        if any(f.severity >= Severity.ERROR for f in findings):
            return False, findings
        writer.commit()
    return True, findings


def parse_only(text: str | None) -> set[str] | None:
    """'--only nibble-order,scale-layout-linear' -> the set of causes (None: every fixable cause)."""
    if not text:
        return None
    return {part.strip() for part in text.split(",") if part.strip()}


def fix_checkpoint(broken: str | Path, out: str | Path, *, against: str | Path | None = None,
                   only: set[str] | None = None, dry_run: bool = False, force: bool = False,
                   extra_gate: Callable[[Path], list[Finding]] | None = None) -> FixResult:
    """Diagnose BROKEN, plan the lossless repairs and (unless dry_run) write OUT through the gate.

    Raises NvdiagError for unreadable input or a refused output path (exit 2). BROKEN is only ever read."""
    from converter.pipeline import nvdiag_version
    from inspect_tools.errors import OutputError
    from inspect_tools.layers import open_model
    from inspect_tools.writer import check_output_path

    out = Path(out)
    with open_model(broken) as model, (open_model(against) if against is not None else nullcontext()) as ref:
        inputs = list(model.reader.files) + (list(ref.reader.files) if ref is not None else [])
        if not dry_run:
            # refuse a bad OUT before any work is done
            check_output_path(out, inputs)
            if out.exists() and not force:
                raise OutputError("exists; pass --force to overwrite it", str(out))
        findings = collect_findings(model, ref)
        plan = plan_fix(model, findings, only)
        result = FixResult(plan=plan, out=out, findings=findings, dry_run=dry_run, against=ref is not None)
        if dry_run or plan.blocking or not plan.repairs:
            return result
        def gate(path: Path) -> tuple[list[Finding], bool]:
            findings, ran = gate_fixed(path, ref)
            if extra_gate is not None and not any(f.severity >= Severity.ERROR for f in findings):
                findings += extra_gate(path)
            return findings, ran

        result.written, result.gate_findings = write_fixed(plan, model, out, nvdiag_version(), gate, overwrite=force)
    return result
