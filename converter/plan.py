"""The conversion plan: every output tensor (name, dtype, shape) decided before a byte is written.

The streaming writer needs the final header up front, so the plan is complete and exact: per source layer the
preset's decision, the output format, and the ComfyUI-native names, dtypes and shapes of the tensors it produces
(shared/DESIGN.md, "Output contract of nvdiag convert").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from converter.fp8_source import (
    CONSUMED_ROLES,
    DECODED_DTYPE,
    decode_scales,
    dropped_input_scales,
    is_fp8_source,
)
from converter.preset import (
    FULL_PRECISION_KEY,
    QUANT_FORMATS,
    Decision,
    Preset,
    codec_of,
    full_precision_mm,
    profile_view,
)
from inspect_tools.errors import InputError, UsageError
from reference_specs import formats, models
from reference_specs.formats.nvfp4 import NVFP4
from reference_specs.layer import QUANT_METADATA_KEY, Layer

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
SIXTEEN_BIT = ("F16", "BF16")
ACTION_DTYPE = {"bf16": "BF16", "fp16": "F16", "f32": "F32"}
DTYPE_16 = {"bf16": "BF16", "fp16": "F16"}
# comfy_quant "format" of each weight codec (comfyui-load-path.md: QUANT_ALGOS names)
COMFY_FORMAT = {"nvfp4": "nvfp4", "fp8": "float8_e4m3fn"}
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I32": 4,
              "I64": 8, "U32": 4, "I16": 2, "U16": 2, "BOOL": 1, "U64": 8}
PROVENANCE_KEY = "nvdiag"
# The roles of a source layer that become output tensors (an FP8 source's scales and marker are consumed instead).
CARRIED_ROLES = ("weight", "bias", "value")
# File-level marker tensors carried over verbatim (the Qwen edit 2511 marker is how ComfyUI detects that variant).
PASSTHROUGH_MARKERS = ("__index_timestep_zero__",)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_SIZE[dtype] * math.prod(shape)


def quant_conf(action: str) -> dict[str, Any]:
    """The layer's comfy_quant conf for a quantizing decision. The flag is added only when set, key order as in
    ComfyUI's own state_dict() (comfy/ops.py), so plain layers get exactly the marker they always got."""
    conf: dict[str, Any] = {"format": COMFY_FORMAT[codec_of(action)]}
    if full_precision_mm(action):
        conf[FULL_PRECISION_KEY] = True
    return conf


def comfy_quant_bytes(action: str) -> bytes:
    """The per-layer marker payload, spelled the way ComfyUI's own writer does (json.dumps of the conf)."""
    return json.dumps(quant_conf(action)).encode("utf-8")


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # output key (ComfyUI-native)
    role: str  # weight, bias, weight_scale, weight_scale_2, input_scale, comfy_quant, value, marker
    dtype: str
    shape: tuple[int, ...]
    source: str | None = None  # source key this tensor is made from (None: generated)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass
class LayerPlan:
    name: str  # ComfyUI-native base name
    source: Layer | None
    action: str  # nvfp4 | nvfp4-w4a16 | fp8 | fp8-w8a16 | keep | bf16 | fp16 | f32 | marker
    decision: Decision | None
    tensors: list[PlannedTensor] = field(default_factory=list)
    input_scale: float | None = None
    # source key -> FP8 decode multiplier: tensors dequantized (converter/fp8_source.py) before they are encoded or
    # cast; empty for a float source layer
    decode: dict[str, float] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.action in QUANT_FORMATS

    @property
    def codec(self) -> str | None:
        """nvfp4 / fp8: the encoder of a quantized layer's weight; None for a kept one."""
        return codec_of(self.action)

    @property
    def conf(self) -> dict[str, Any] | None:
        """The comfy_quant conf written for this layer (tensor marker and _quantization_metadata), None if kept."""
        return quant_conf(self.action) if self.quantized else None

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def source_bytes(self) -> int:
        return sum(t.nbytes for t in self.source.tensors.values()) if self.source is not None else 0

    @property
    def out_format(self) -> str:
        """nvfp4 / float8_e4m3fn for quantized layers, else the dtype of the main tensor (f32, bf16, f16)."""
        if self.quantized:
            return COMFY_FORMAT[self.codec]
        main = next((t for t in self.tensors if t.role in ("weight", "value", "marker")), self.tensors[0])
        return main.dtype.lower()


@dataclass
class ConversionPlan:
    layers: list[LayerPlan]
    preset: Preset
    detection: models.Detection
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    # kept layers planned F16 whose source values exceed FP16's range, written at BF16 instead: name -> max |value|
    widened: dict[str, float] = field(default_factory=dict)
    # FP8 source layers dequantized into this conversion, per source format (Format.convert_source): the source was
    # already lossy, which the output says
    lossy_source: dict[str, int] = field(default_factory=dict)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for lp in self.layers for t in lp.tensors]

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) in write order: what the streaming writer's header is built from."""
        return [(t.name, t.dtype, t.shape) for t in self.tensors]

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def source_bytes(self) -> int:
        return sum(lp.source_bytes for lp in self.layers)

    def counts(self) -> dict[str, int]:
        """Layers per output format; full-precision-matmul layers apart, under their decision (nvfp4-w4a16): the
        same bytes on disk, not the same arithmetic on Blackwell."""
        out: dict[str, int] = {}
        for lp in self.layers:
            key = lp.action if full_precision_mm(lp.action) else lp.out_format
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))


def _kept_dtype(src: str, action: str, dtype_16: str | None, own_16: bool = False) -> str:
    """Output dtype of a non-quantized tensor: floats follow the action, --dtype-16 rewrites any 16-bit result.
    own_16: a 16-bit source tensor asked to be 16-bit keeps its own type (the built-in presets' "bf16" means
    "16-bit": an FP16 source's kept layers become BF16 only when asked, since FP16 -> BF16 drops 3 mantissa bits)."""
    if src not in FLOAT_DTYPES:
        return src
    dtype = src if action == "keep" else ACTION_DTYPE[action]
    if dtype_16 is not None and dtype in SIXTEEN_BIT:
        dtype = DTYPE_16[dtype_16]
    elif own_16 and dtype in SIXTEEN_BIT and src in SIXTEEN_BIT:
        dtype = src
    return dtype


def _role_key(native: str, role: str) -> str:
    return native if role == "value" else f"{native}.{role}"


def plan_layer(layer: Layer, native: str, decision: Decision, dtype_16: str | None,
               input_scale: float | None, own_16: bool = False, decode: dict[str, float] | None = None) -> LayerPlan:
    """own_16: 16-bit source tensors that the decision keeps 16-bit keep their own type (see _kept_dtype).
    decode: the layer's FP8 tensors (source key -> decode multiplier), planned as the float32 they dequantize to;
    only CARRIED_ROLES become output tensors."""
    action = decision.format
    bias_action = decision.rule.bias if decision.rule is not None else None
    lp = LayerPlan(name=native, source=layer, action=action, decision=decision, decode=dict(decode or {}))
    carried = sorted((role, info) for role, info in layer.tensors.items() if role in CARRIED_ROLES)

    def source_dtype(info: Any) -> str:
        return DECODED_DTYPE if info.name in lp.decode else info.dtype

    if lp.quantized:
        out_f, in_f = layer.tensors["weight"].shape
        w = layer.tensors["weight"].name
        fmt = formats.get(COMFY_FORMAT[lp.codec])
        lp.tensors += [PlannedTensor(f"{native}.{role}", role, dtype, shape, w)
                       for role, dtype, shape in fmt.stored_tensors(out_f, in_f)]
        if input_scale is not None:
            # --input-scales values are NVFP4's activation decode scale, amax/(448*6) (what nvdiag calibrate and other
            # tools write); ComfyUI quantizes an FP8 layer's input as x/input_scale into E4M3 (max 448), so the same
            # activations need amax/448 there (shared/research/comfyui-load-path.md, Q2): six times the value
            lp.input_scale = input_scale if fmt is NVFP4 else input_scale * (NVFP4.scale_divisor / fmt.scale_divisor)
            lp.tensors.append(PlannedTensor(f"{native}.input_scale", "input_scale", "F32", ()))
        for role, info in carried:
            if role != "weight":  # bias (and any other float companion) at its source dtype, unless the rule says
                key = _role_key(native, role)
                dtype = _kept_dtype(source_dtype(info), bias_action, dtype_16, own_16) \
                    if bias_action and role == "bias" else source_dtype(info)
                lp.tensors.append(PlannedTensor(key, role, dtype, tuple(info.shape), info.name))
        marker = comfy_quant_bytes(action)
        lp.tensors.append(PlannedTensor(f"{native}.comfy_quant", "comfy_quant", "U8", (len(marker),)))
        return lp
    for role, info in carried:
        dtype = _kept_dtype(source_dtype(info), bias_action if bias_action and role == "bias" else action, dtype_16,
                            own_16)
        lp.tensors.append(PlannedTensor(_role_key(native, role), role, dtype, tuple(info.shape), info.name))
    return lp


# The largest finite FP16 value: a value beyond it becomes +-Inf in a cast to FP16 (IEEE 754 binary16, round to
# nearest: from 65520 up it rounds to Inf, between 65504 and 65520 to 65504; anything above 65504 is out of range).
F16_MAX = 65504.0


def fp16_candidates(plan: ConversionPlan) -> list[tuple[LayerPlan, PlannedTensor]]:
    """Kept tensors the plan narrows to F16 from a wider source dtype (F32, F64, BF16: BF16's range is F32's):
    the ones whose values may not fit. A source that is F16 already always fits."""
    out = []
    for lp in plan.layers:
        if lp.quantized or lp.source is None:
            continue
        by_name = {info.name: info for info in lp.source.tensors.values()}
        out += [(lp, t) for t in lp.tensors if t.dtype == "F16" and t.source in by_name
                and by_name[t.source].dtype != "F16"]
    return out


def widen_to_bf16(plan: ConversionPlan, lp: LayerPlan, amax: float) -> None:
    """Write the kept layer `lp` at BF16 instead of F16 (every F16 tensor of it: weight and bias stay alike),
    because its source holds values beyond FP16's range, and say so in the plan's warnings and provenance."""
    lp.tensors = [replace(t, dtype="BF16") if t.dtype == "F16" else t for t in lp.tensors]
    plan.widened[lp.name] = amax
    plan.warnings.append(f"{lp.name} kept at BF16 instead of F16: its source holds values up to {amax:.4g}, beyond "
                         f"FP16's {F16_MAX:g} (an FP16 cast would store Inf)")


def check_source(model: Any) -> dict[str, dict[str, float]]:
    """convert takes floating-point safetensors sources, and FP8 ones (dequantized: converter/fp8_source.py);
    anything else is refused with one clear message. Returns the FP8 layers' decode multipliers by source layer name
    and source key (decode_scales: their scales are read and checked here)."""
    if not model.reader.tensors:
        raise InputError("holds no tensors: nothing to convert", str(model.path))
    if model.kind == "gguf":
        raise InputError("convert reads FP32/FP16/BF16 safetensors sources, not GGUF (use `nvdiag preset from-gguf` "
                         "to reuse a GGUF file's layer selection)", str(model.path))
    quantized = sorted({layer.format for layer in model.layers.values()
                        if layer.is_quantized and not is_fp8_source(layer)})
    if quantized:
        raise InputError(f"already quantized ({', '.join(quantized)} layers): convert takes the FP32/FP16/BF16 "
                         "original; convert from that, or repair this file losslessly with `nvdiag fix "
                         f"{model.path.name} fixed.safetensors --against SRC`", str(model.path))
    decode = {layer.name: decode_scales(layer, str(model.path))
              for layer in model.layers.values() if is_fp8_source(layer)}
    bad = [
        f"{t.name} ({t.dtype})"
        for layer in model.layers.values() for role, t in layer.tensors.items()
        if not _plannable(role, t, decode.get(layer.name))
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(f"not a floating-point source: {shown}; convert takes FP32/FP16/BF16 checkpoints "
                         "(and FP8 ones)", str(model.path))
    return decode


def _plannable(role: str, info: Any, decode: dict[str, float] | None) -> bool:
    """A float tensor of a carried role, an FP8 tensor with its decode multiplier, or an FP8 layer's consumed scale
    or marker."""
    if decode is not None and (info.name in decode or role in CONSUMED_ROLES):
        return True
    return role in CARRIED_ROLES and info.dtype in FLOAT_DTYPES


def source_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """Source header metadata kept in the output, minus what would be wrong there (quantization, shard sizes)."""
    drop = {QUANT_METADATA_KEY, PROVENANCE_KEY, "total_size"}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if k not in drop}


def model_width(detection: models.Detection) -> int | None:
    dims = detection.dims or {}
    return dims.get("dim") or dims.get("hidden_size") or dims.get("inner_dim")


def build_plan(model: Any, preset: Preset, dtype_16: str | None = None,
               input_scales: dict[str, float] | None = None) -> ConversionPlan:
    """CheckpointModel + preset -> the full output plan. Layers in name order, so output is deterministic."""
    decode = check_source(model)
    detection = model.detection
    profile = models.get_profile(detection.variant)
    if detection.naming == "diffusers" and profile is not None and not profile.diffusers_convertible:
        raise InputError(f"{profile.display_name} under diffusers names: ComfyUI loads them only by fusing q/k/v "
                         "itself, without the scale and marker tensors of a quantized file; convert the original "
                         "(BFL-named) checkpoint instead", str(model.path))
    check_architecture(preset, detection, model)
    width = model_width(detection)
    own_16 = preset.source == "builtin"  # the built-in presets' bf16 means "16-bit" (see _kept_dtype)
    input_scales = dict(input_scales or {})
    plan = ConversionPlan(layers=[], preset=preset, detection=detection, metadata=source_metadata(model.metadata))
    seen: dict[str, str] = {}
    views = []
    for layer in model.layers.values():
        view = profile_view(layer, profile)
        if view_decoded(layer, decode.get(layer.name)):  # rules see the float32 the FP8 weight dequantizes to
            view = replace(view, dtype=DECODED_DTYPE)
        if view.name in seen:
            raise InputError(f"{layer.name} and {seen[view.name]} both map to the ComfyUI name {view.name}",
                             str(model.path))
        seen[view.name] = layer.name
        views.append((view, layer))
    for view, layer in sorted(views, key=lambda vl: vl[0].name):
        decision = preset.decide(view, width)
        scale = None
        if decision.format in QUANT_FORMATS:
            scale = input_scales.pop(view.name, None)
            if scale is not None and full_precision_mm(decision.format):
                # ComfyUI never quantizes this layer's input, so a stored scale would be dead weight that later
                # readers (and lint) take for a calibrated activation scale
                plan.warnings.append(f"input scale for {view.name} ignored: the preset decides {decision.format} "
                                     "(full-precision matmul, its activations are never quantized)")
                scale = None
        plan.layers.append(plan_layer(layer, view.name, decision, dtype_16, scale, own_16, decode.get(layer.name)))
        if layer.name in decode:
            plan.lossy_source[layer.format] = plan.lossy_source.get(layer.format, 0) + 1
    for info in model.reader:
        bare = info.name.rsplit(".", 1)[-1]
        if bare in PASSTHROUGH_MARKERS:
            plan.layers.append(LayerPlan(name=bare, source=None, action="marker", decision=None, tensors=[
                PlannedTensor(bare, "marker", info.dtype, tuple(info.shape), info.name)]))
    plan.layers += variant_markers(profile, plan)
    for name in sorted(input_scales):
        plan.warnings.append(f"input scale for {name} ignored: the preset does not quantize that layer")
    plan.warnings += preset_warnings(preset, detection, [v for v, _ in views], variant_unsure(model))
    if dropped := dropped_input_scales(list(model.layers.values())):
        plan.warnings.append(f"{dropped} FP8 source layer{'s' if dropped != 1 else ''} carried static input scales "
                             "for FP8 activations; not written (ComfyUI computes activation scales dynamically; "
                             "--input-scales supplies calibrated ones)")
    return plan


def view_decoded(layer: Layer, decode: dict[str, float] | None) -> bool:
    """Whether the tensor a preset rule looks at (profile_view's main tensor) is an FP8 one dequantized."""
    if not decode:
        return False
    main = layer.tensors.get("weight") or layer.tensors.get("value") or next(iter(layer.tensors.values()))
    return main.name in decode


def variant_unsure(model: Any) -> bool:
    """A diffusers model folder's weights (diffusers' save_pretrained names them diffusion_pytorch_model*) without
    the config.json that names the variant: look-alike variants (Qwen Image 2512 / Edit 2511) cannot be told."""
    return model.file_markers.get("config") is None and model.path.name.startswith(DIFFUSERS_WEIGHTS)


def variant_markers(profile: Any, plan: ConversionPlan) -> list[LayerPlan]:
    """The marker tensors ComfyUI detects the variant by that the source lacks (a diffusers Qwen Image Edit 2511
    says it in config.json; ComfyUI needs `__index_timestep_zero__`), generated as ComfyUI's own model registers
    them. Without one, ComfyUI runs the file as another variant, silently."""
    if profile is None:
        return []
    have = {lp.name for lp in plan.layers if lp.action == "marker"}
    return [LayerPlan(name=name, source=None, action="marker", decision=None,
                      tensors=[PlannedTensor(name, "marker", dtype, shape)])
            for name, (dtype, shape) in sorted(profile.marker_tensors.items()) if name not in have]


def check_architecture(preset: Preset, detection: models.Detection, model: Any) -> None:
    """A preset written for other architectures is refused (exit 2): its rules name another model's layers, and for
    look-alike variants (Qwen Image 2512 / Edit 2511) the mismatch says the user expects another model than the one
    the file is, which ComfyUI would run."""
    if not preset.architectures or detection.variant in preset.architectures:
        return
    why = f" ({detection.config})" if detection.config else ""
    raise UsageError(f"preset {preset.name} is for {', '.join(preset.architectures)}, this checkpoint is "
                     f"{detection.variant}{why}: use a preset for {detection.variant}, or a copy of this one with "
                     f"{detection.variant!r} in its architectures", str(model.path))


def preset_warnings(preset: Preset, detection: models.Detection, views: list, unsure: bool = False) -> list[str]:
    out = []
    alternatives = models.could_also_be(detection) if unsure else ()
    if alternatives:
        out.append(f"detected {detection.variant} from the tensor names alone; {', '.join(alternatives)} has the "
                   f"same tensors: put the model's diffusers config.json beside the weights to tell them apart")
    for rule in preset.unmatched_rules(views):
        out.append(f"preset {preset.name} {rule.describe()} matches no layer of this checkpoint")
    return out


def quantization_metadata(plan: ConversionPlan) -> str:
    """The header's `_quantization_metadata`: the same conf per layer as its comfy_quant tensor."""
    layers = {lp.name: lp.conf for lp in plan.layers if lp.quantized}
    return json.dumps({"format_version": "1.0", "layers": layers}, sort_keys=False)
