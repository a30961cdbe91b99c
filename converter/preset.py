"""Presets: which precision each layer of a checkpoint gets in `nvdiag convert`.

A preset is an ordered list of rules plus a default; the first rule that matches a layer decides. Rules match
ComfyUI-native layer base names (`blocks.3.self_attn.q`, `transformer_blocks.0.img_mlp.net.2`), by shell glob
(`match`) or regular expression (`regex`, searched), optionally narrowed by structural conditions. On disk a preset
is TOML (stdlib tomllib):

    name = "my-preset"
    description = "what it is for"
    default = "keep"
    architectures = ["wan2.2-ti2v-5b"]     # optional: what it was written for (another variant is refused)

    [[rules]]
    match = "*.modulation"
    format = "f32"
    reason = "nn.Parameter read by every block"

    [[rules]]
    regex = '^blocks\\.\\d+\\.'
    format = "nvfp4"
    min_dim = 1024

Formats: nvfp4 | nvfp4-w4a16 | fp8 | fp8-w8a16 | keep (source precision) | bf16 | fp16 (16-bit; `--dtype-16`
may override; under the built-in presets a 16-bit source keeps its own 16-bit type) | f32. Case does not matter,
and f16/float16 read as fp16, fp32/float32 as f32, bfloat16 as bf16; output names the dtypes as inspect does (F16).
`bias = "keep" | "bf16" | "fp16" | "f32"` on a rule gives the layer's bias its own precision (a GGUF file stores
biases F32 beside 16-bit weights, and `preset from-gguf` says so); without it the bias follows the layer's format
(a quantized layer's bias keeps its source precision).
A quantizing rule (nvfp4*, fp8*) only ever matches an eligible layer (a 2-D floating-point `.weight`); on any other
layer it is skipped and the next rule is tried, so `match = "*"` + `format = "nvfp4"` means "every eligible linear".
A weight whose shape ComfyUI reads to build the model (Qwen Image and Flux `img_in`, Flux `txt_in` and
`vector_in.in_layer`: the architecture profile's shape_reads) is not eligible for a format that would store another
shape there (NVFP4 halves dim 1): ComfyUI would build the wrong model and fail at the first step.

W4A4 or W4A16 on Blackwell: there ComfyUI multiplies a plain nvfp4 layer with its activations quantized to NVFP4
too (W4A4); every other GPU dequantizes the weight and multiplies in the compute dtype. `nvfp4-w4a16` stores the same
NVFP4 weight but writes `"full_precision_matrix_mult": true` into the layer's marker, which makes ComfyUI multiply
that layer in the compute dtype on every GPU (shared/research/comfyui-load-path.md, Q3): for layers whose
activations do not survive 4 bits. `fp8-w8a16` is the same for FP8. `full_precision_matrix_mult = true` on an nvfp4
or fp8 rule is another spelling of these decisions:

    [[rules]]
    regex = '^blocks\\.\\d+\\.ffn\\.2$'
    format = "nvfp4"
    full_precision_matrix_mult = true      # the same as format = "nvfp4-w4a16"

Conditions (all optional, all must hold):
  linear = true|false      the layer has a 2-D floating-point weight
  in_blocks = true|false   the layer sits inside a repeated block (a `.N.` component in its name)
  sensitive = true|false   the architecture profile says it must stay high precision (embeddings, modulation, ...)
  ndim = N                 rank of the main tensor (weight, or the bare parameter), 1..8
  min_dim = N              both weight dims >= min(N, model width): "a large linear" means at least N wide or as
                           wide as the model itself, so one preset serves every model size (a model narrower than
                           N keeps its main linears eligible; on the published widths, >= 3072, it is just N);
                           1..65536 (past that it could match no layer of any model: refused as a typo)
  divisible_by = N         both weight dims divisible by N, 1..65536
  max_numel = N            the main tensor has at most N elements (small tensors), 1..2^63-1
A preset file is at most 1 MiB with at most 10,000 rules, nested at most 32 levels deep.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.hand_written import MAX_PRESET_BYTES, MAX_TOML_DEPTH, read_bounded, toml_nesting_depth
from inspect_tools.errors import InputError, UsageError
from reference_specs import presets as builtin_presets
from reference_specs.formats.nvfp4 import packed_shape
from reference_specs.models.base import changed_reads

# Quantizing decision -> (codec that encodes the weight, whether ComfyUI is told to multiply in full precision).
QUANT_DECISIONS: dict[str, tuple[str, bool]] = {
    "nvfp4": ("nvfp4", False),
    "nvfp4-w4a16": ("nvfp4", True),
    "fp8": ("fp8", False),
    "fp8-w8a16": ("fp8", True),
}
QUANT_FORMATS = tuple(QUANT_DECISIONS)
FORMATS = (*QUANT_FORMATS, "keep", "bf16", "fp16", "f32")
FULL_PRECISION_KEY = "full_precision_matrix_mult"  # the rule key, spelled as in ComfyUI's comfy_quant conf
# codec -> its full-precision-matmul decision (what `full_precision_matrix_mult = true` turns a rule into)
_FULL_PRECISION_DECISION = {"nvfp4": "nvfp4-w4a16", "fp8": "fp8-w8a16"}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
CONDITIONS = ("linear", "in_blocks", "sensitive", "ndim", "min_dim", "divisible_by", "max_numel")
# Spellings of the float precisions users bring from other tools (GGUF's F16/F32, safetensors' dtype names, torch's
# float16): each reads as the preset word; output always shows the dtype names inspect prints (F32, F16, BF16).
FLOAT_SPELLINGS = {"f16": "fp16", "float16": "fp16", "half": "fp16", "fp32": "f32", "float32": "f32",
                   "float": "f32", "bfloat16": "bf16"}


def canonical_format(name: Any) -> Any:
    """A format as written in a preset or on the command line -> the preset word (case-insensitive, with the
    spellings of FLOAT_SPELLINGS); anything that is not a string is returned unchanged for the caller to refuse."""
    if not isinstance(name, str):
        return name
    low = name.strip().lower()
    return FLOAT_SPELLINGS.get(low, low)


BIAS_FORMATS = ("keep", "bf16", "fp16", "f32")  # a rule's `bias` key: the precisions a kept tensor may have
_BOOL_CONDITIONS = ("linear", "in_blocks", "sensitive")
_TOP_KEYS = ("name", "description", "default", "architectures", "rules")
# A `.N.` component: the layer is one of a stack of repeated blocks (blocks.3.ffn.0, transformer_blocks.0.attn.to_q).
_IN_BLOCKS = re.compile(r"(^|\.)\d+\.")
DEFAULT_MIN_DIM_WIDTH = 1024
# The sane range of each numeric condition. Layer widths of the supported models are at most a few tens of thousands
# (WAN 14B: 5120 wide, FFN 13824), so a dimension condition past 2^16 can match no layer of any diffusion model: it is
# a typo (an extra digit) and would silently quantize nothing, so it is refused rather than warned about. ndim: a
# weight is 1- to 5-D (conv3d). max_numel: TOML integers are 64-bit.
CONDITION_RANGES: dict[str, tuple[int, int]] = {
    "ndim": (1, 8),
    "min_dim": (1, 2**16),
    "divisible_by": (1, 2**16),
    "max_numel": (1, 2**63 - 1),
}
# A preset rule is tried on every layer: 10,000 rules (25 per layer of a 400-layer model) is far beyond a real
# preset and keeps planning a matter of seconds.
MAX_RULES = 10_000


@dataclass(frozen=True)
class LayerView:
    """What a rule may look at: the native name, the main tensor's dtype and shape, and the profile's opinion."""

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "F32"
    has_weight: bool = True
    sensitive_reason: str | None = None
    shape_reads: dict[int, str] = field(default_factory=dict, hash=False)  # axes ComfyUI reads off the weight
    table: bool = False  # a 2-D lookup table (nn.Embedding), not a Linear: never quantized

    @property
    def linear(self) -> bool:
        return self.has_weight and len(self.shape) == 2 and self.dtype in FLOAT_DTYPES and not self.table

    @property
    def in_blocks(self) -> bool:
        return bool(_IN_BLOCKS.search(self.name))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Rule:
    format: str
    match: str | None = None
    regex: str | None = None
    conditions: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    index: int = 0  # position in the preset, 1-based, for messages
    bias: str | None = None  # the bias's own precision (BIAS_FORMATS); None: it follows the layer

    @property
    def pattern(self) -> str:
        return f"regex {self.regex}" if self.regex is not None else f"match {self.match or '*'}"

    def describe(self) -> str:
        conds = " ".join(f"{k}={v}" for k, v in self.conditions.items())
        bias = f" (bias {self.bias})" if self.bias else ""
        return f"rule {self.index}: {self.pattern}" + (f" [{conds}]" if conds else "") + f" -> {self.format}{bias}"

    def name_matches(self, name: str) -> bool:
        if self.regex is not None:
            return re.search(self.regex, name) is not None
        return fnmatch.fnmatchcase(name, self.match or "*")

    def failed_condition(self, layer: LayerView, model_width: int | None = None) -> str | None:
        """None when the rule applies to `layer`; otherwise why it does not (for `preset explain`)."""
        if not self.name_matches(layer.name):
            return "name does not match"  # the pattern itself is already in describe()
        if self.format in QUANT_FORMATS and not layer.linear:
            return f"{self.format} applies only to 2-D floating-point weights"
        if self.format in QUANT_FORMATS and (broken := read_shape_changes(self.format, layer)):
            stored = list(stored_weight_shape(codec_of(self.format), layer.shape))
            return (f"ComfyUI reads {', '.join(broken.values())} off this weight's shape: {self.format} would store "
                    f"it as {stored} instead of {list(layer.shape)} (ComfyUI would build the wrong model)")
        c = self.conditions
        if "linear" in c and layer.linear != c["linear"]:
            return f"linear is {layer.linear}"
        if "in_blocks" in c and layer.in_blocks != c["in_blocks"]:
            return f"in_blocks is {layer.in_blocks}"
        if "sensitive" in c and (layer.sensitive_reason is not None) != c["sensitive"]:
            return f"sensitive is {layer.sensitive_reason is not None}"
        if "ndim" in c and len(layer.shape) != c["ndim"]:
            return f"ndim is {len(layer.shape)}"
        if "max_numel" in c and layer.numel > c["max_numel"]:
            return f"{layer.numel} elements > {c['max_numel']}"
        dims = layer.shape if len(layer.shape) == 2 else None
        if "min_dim" in c:
            need = effective_min_dim(c["min_dim"], model_width)
            if dims is None or min(dims) < need:
                return f"dims {list(layer.shape)} not all >= {need}"
        if "divisible_by" in c:
            k = c["divisible_by"]
            if dims is None or any(d % k for d in dims):
                return f"dims {list(layer.shape)} not divisible by {k}"
        return None

    def applies(self, layer: LayerView, model_width: int | None = None) -> bool:
        return self.failed_condition(layer, model_width) is None


def codec_of(decision: str) -> str | None:
    """The weight codec of a quantizing decision (nvfp4 or fp8), None for a kept layer."""
    entry = QUANT_DECISIONS.get(decision)
    return entry[0] if entry else None


def stored_weight_shape(codec: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The `.weight` shape a codec writes for a [out, in] weight: NVFP4 packs (DESIGN.md output contract), FP8 keeps."""
    return packed_shape(*shape) if codec == "nvfp4" and len(shape) == 2 else tuple(shape)


def read_shape_changes(decision: str, layer: LayerView) -> dict[int, str]:
    """What ComfyUI would read wrong off `layer`'s weight if `decision` quantized it: {axis: what}, {} when safe."""
    codec = codec_of(decision)
    if codec is None or not layer.shape_reads:
        return {}
    return changed_reads(layer.shape_reads, layer.shape, stored_weight_shape(codec, layer.shape))


def full_precision_mm(decision: str) -> bool:
    """Whether ComfyUI is told to multiply this layer in full precision (W4A16 / W8A16 on every GPU)."""
    entry = QUANT_DECISIONS.get(decision)
    return bool(entry and entry[1])


def describe_decision(decision: str) -> str:
    """What a decision means at run time, for `preset show/explain` and `convert --dry-run`."""
    codec = codec_of(decision)
    if codec is None:
        return {"keep": "source precision", "bf16": "BF16", "fp16": "F16", "f32": "F32"}.get(decision, decision)
    if full_precision_mm(decision):
        return ("NVFP4 weights, full-precision matmul on every GPU, Blackwell included (W4A16)" if codec == "nvfp4"
                else "FP8 weights, full-precision matmul on every GPU (W8A16)")
    if codec == "nvfp4":
        return "NVFP4 weights; on Blackwell activations quantized to NVFP4 too (W4A4)"
    return "FP8 weights; on FP8-capable GPUs activations quantized to FP8 too (W8A8)"


def effective_min_dim(min_dim: int, model_width: int | None) -> int:
    """min_dim capped at the model's own width (see module docstring): product behaviour, not a test hook. The
    built-in presets name sizes of the published models; a layer as wide as the model it belongs to is one of its
    main linears whatever the model's size, so a narrower model (a pruned or distilled variant, the demo's and the
    tests' scaled-down files alike) is selected the same way rather than quantizing nothing."""
    return min(min_dim, model_width) if model_width else min_dim


@dataclass(frozen=True)
class Decision:
    format: str
    rule: Rule | None  # None: the preset's default
    reason: str


@dataclass
class Preset:
    name: str
    rules: list[Rule]
    default: str = "keep"
    description: str = ""
    architectures: tuple[str, ...] = ()
    source: str = ""  # "builtin" or the file path
    sha256: str = ""  # of the TOML bytes: provenance in converted files

    def decide(self, layer: LayerView, model_width: int | None = None) -> Decision:
        for rule in self.rules:
            if rule.applies(layer, model_width):
                return Decision(rule.format, rule, rule.reason or rule.describe())
        return Decision(self.default, None, f"no rule matched: default {self.default}")

    def explain(self, layer: LayerView, model_width: int | None = None) -> list[tuple[Rule, str | None]]:
        """Every rule up to the deciding one, with why it did not apply (None for the one that decided)."""
        trace = []
        for rule in self.rules:
            why = rule.failed_condition(layer, model_width)
            trace.append((rule, why))
            if why is None:
                break
        return trace

    def unmatched_rules(self, layers: list[LayerView], model_width: int | None = None) -> list[Rule]:
        """Rules whose name pattern matches none of `layers` (a typo, or a preset for another architecture)."""
        return [r for r in self.rules if not any(r.name_matches(v.name) for v in layers)]


# ---------------------------------------------------------------------------------------------- parsing

def _shown(value: Any, limit: int = 40) -> str:
    """A value from the file as one short line for a message (a preset may hold anything): repr escapes newlines
    and terminal control characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys(keys: set[str]) -> str:
    """Keys from the file for a message: plain names as they are, anything else escaped; five at most."""
    shown = [k if re.fullmatch(r"[\w.-]{1,40}", k) else _shown(k) for k in sorted(keys)[:5]]
    return ", ".join(shown) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _check_rule(raw: Any, index: int, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise UsageError(f"rule {index} is not a table", where)
    unknown = set(raw) - {"match", "regex", "format", "reason", "bias", FULL_PRECISION_KEY, *CONDITIONS}
    if unknown:
        raise UsageError(f"rule {index}: unknown key(s) {_keys(unknown)}", where)
    fmt = canonical_format(raw.get("format"))
    bias = canonical_format(raw.get("bias"))
    if fmt not in FORMATS:
        raise UsageError(f"rule {index}: unknown format {_shown(fmt)}; use one of {', '.join(FORMATS)}", where)
    if FULL_PRECISION_KEY in raw:
        fmt = _with_full_precision(fmt, raw[FULL_PRECISION_KEY], index, where)
    if "match" in raw and "regex" in raw:
        raise UsageError(f"rule {index}: give either match (glob) or regex, not both", where)
    if "bias" in raw and bias not in BIAS_FORMATS:
        raise UsageError(f"rule {index}: unknown bias format {_shown(raw['bias'])}; use one of "
                         f"{', '.join(BIAS_FORMATS)}", where)
    for key in ("match", "regex", "reason"):
        if key in raw and not isinstance(raw[key], str):
            raise UsageError(f"rule {index}: {key} must be a string", where)
    if "regex" in raw:
        try:
            re.compile(raw["regex"])
        except re.error as exc:
            raise UsageError(f"rule {index}: invalid regex {_shown(raw['regex'])}: {exc}", where) from None
    conditions = {}
    for key in CONDITIONS:
        if key not in raw:
            continue
        value = raw[key]
        if key in _BOOL_CONDITIONS:
            if not isinstance(value, bool):
                raise UsageError(f"rule {index}: {key} must be true or false", where)
        else:
            low, high = CONDITION_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UsageError(f"rule {index}: {key} must be an integer from {low} to {high}, "
                                 f"not {_shown(value)}", where)
        conditions[key] = value
    return Rule(
        format=fmt, match=raw.get("match"), regex=raw.get("regex"), conditions=conditions,
        reason=raw.get("reason", ""), index=index, bias=bias,
    )


def _with_full_precision(fmt: str, flag: Any, index: int, where: str) -> str:
    """A rule's format with its `full_precision_matrix_mult` key folded in, so that a rule has one decision and
    `preset show`, the plan and the written marker cannot disagree about it."""
    if not isinstance(flag, bool):
        raise UsageError(f"rule {index}: {FULL_PRECISION_KEY} must be true or false", where)
    if fmt not in QUANT_DECISIONS:
        raise UsageError(f"rule {index}: {FULL_PRECISION_KEY} applies only to quantizing rules "
                         f"({', '.join(QUANT_FORMATS)}), not to {fmt!r}", where)
    codec, already = QUANT_DECISIONS[fmt]
    if already and not flag:
        raise UsageError(f"rule {index}: format {fmt!r} means {FULL_PRECISION_KEY} = true; "
                         f"use format {codec!r} for {FULL_PRECISION_KEY} = false", where)
    return _FULL_PRECISION_DECISION[codec] if flag else fmt


def parse_preset(data: dict[str, Any], where: str, name: str | None = None) -> Preset:
    """A parsed TOML document -> Preset; UsageError (naming `where`) for anything invalid."""
    unknown = set(data) - set(_TOP_KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {_keys(unknown)}; expected {', '.join(_TOP_KEYS)}", where)
    default = canonical_format(data.get("default", "keep"))
    if default not in FORMATS or default in QUANT_FORMATS:
        raise UsageError(f"default must be one of keep, bf16, fp16, f32 (got {_shown(default)})", where)
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise UsageError("rules must be an array of tables ([[rules]])", where)
    if len(rules_raw) > MAX_RULES:
        raise UsageError(f"{len(rules_raw)} rules; a preset may hold at most {MAX_RULES}", where)
    archs = data.get("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UsageError("architectures must be a list of variant names", where)
    return Preset(
        name=str(data.get("name") or name or Path(where).stem),
        rules=[_check_rule(r, i, where) for i, r in enumerate(rules_raw, 1)],
        default=default,
        description=str(data.get("description", "")),
        architectures=tuple(archs),
    )


def loads_preset(text: bytes, where: str, name: str | None = None) -> Preset:
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"not a valid TOML preset: {exc}", where) from None
    if toml_nesting_depth(decoded) > MAX_TOML_DEPTH:
        raise UsageError(f"not a valid preset: arrays or tables nested more than {MAX_TOML_DEPTH} levels deep "
                         "(a preset needs two)", where)
    try:
        data = tomllib.loads(decoded)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"not a valid TOML preset: {exc}", where) from None
    except ValueError as exc:  # an integer of thousands of digits: int() refuses it past sys.get_int_max_str_digits
        raise UsageError(f"not a valid TOML preset: {str(exc).split(':')[0]}", where) from None
    except RecursionError:  # the depth scan is the bound; this is the parser's own, should a construct escape it
        raise UsageError("not a valid preset: nested too deeply to parse", where) from None
    preset = parse_preset(data, where, name)
    preset.sha256 = hashlib.sha256(text).hexdigest()
    return preset


def builtin_names() -> list[str]:
    return builtin_presets.names()


def load_builtin(name: str) -> Preset:
    text = builtin_presets.read(name)
    if text is None:
        raise UsageError(f"no built-in preset {name!r}{_did_you_mean(name)}; built-ins: {', '.join(builtin_names())}")
    preset = loads_preset(text, f"preset {name}", name)
    preset.source = "builtin"
    return preset


def looks_like_path(ref: str) -> bool:
    return ref.endswith(".toml") or "/" in ref or "\\" in ref


def load_preset(ref: str | Path) -> Preset:
    """A built-in preset by name, or a TOML file by path."""
    ref = str(ref)
    if not looks_like_path(ref) and ref in builtin_names():
        return load_builtin(ref)
    path = Path(ref)
    if looks_like_path(ref) or path.exists():
        if not path.is_file():
            raise InputError("preset file not found", ref)
        preset = loads_preset(read_bounded(path, MAX_PRESET_BYTES, "preset"), ref)
        preset.source = str(path)
        return preset
    raise UsageError(f"no built-in preset {ref!r} and no such file{_did_you_mean(ref)}; built-ins: "
                     f"{', '.join(builtin_names())}")


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, builtin_names(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------- writing

# Characters a TOML string may not hold as they are (TOML 1.0, "String": control characters other than tab); a
# tensor name from a hostile file can contain any of them, and the preset must still load back.
_TOML_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def _toml_str(s: str) -> str:
    # TOML literal strings cannot hold a single quote or a control character; basic strings need \ and " escaped
    # and control characters written as \uXXXX.
    if "'" not in s and not _TOML_CONTROL.search(s):
        return "'" + s + "'"
    escaped = s.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _TOML_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def dumps_preset(preset: Preset) -> str:
    """Preset -> TOML text that loads back into an equal preset."""
    lines = [f"name = {_toml_str(preset.name)}"]
    if preset.description:
        lines.append(f"description = {_toml_str(preset.description)}")
    lines.append(f"default = {_toml_str(preset.default)}")
    if preset.architectures:
        lines.append("architectures = [" + ", ".join(_toml_str(a) for a in preset.architectures) + "]")
    for rule in preset.rules:
        lines.append("")
        lines.append("[[rules]]")
        if rule.regex is not None:
            lines.append(f"regex = {_toml_str(rule.regex)}")
        else:
            lines.append(f"match = {_toml_str(rule.match or '*')}")
        lines.append(f"format = {_toml_str(rule.format)}")
        if rule.bias:
            lines.append(f"bias = {_toml_str(rule.bias)}")
        for key, value in rule.conditions.items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
        if rule.reason:
            lines.append(f"reason = {_toml_str(rule.reason)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- layers

def view_of(layer: Any, sensitive: Callable[[str], str | None] | None = None,
            read_axes: Callable[[str], dict[int, str]] | None = None,
            is_table: Callable[[str], bool] | None = None) -> LayerView:
    """A reference_specs.layer.Layer -> the LayerView rules see (native name, main tensor). sensitive / read_axes /
    is_table: the architecture profile's methods of those names (None: no profile)."""
    name = layer.native_name or layer.name
    main = layer.tensors.get("weight") or layer.tensors.get("value") or next(iter(layer.tensors.values()))
    return LayerView(
        name=name,
        shape=tuple(main.shape),
        dtype=main.dtype,
        has_weight="weight" in layer.tensors,
        sensitive_reason=sensitive(name) if sensitive else None,
        shape_reads=dict(read_axes(name)) if read_axes else {},
        table=bool(is_table and is_table(name)),
    )


def profile_view(layer: Any, profile: Any) -> LayerView:
    """view_of with everything the architecture profile (or None) knows about the layer."""
    if profile is None:
        return view_of(layer)
    return view_of(layer, profile.sensitive, profile.read_axes, profile.is_table)
