"""`nvdiag preset from-sensitivity`: turn a sensitivity report (`nvdiag sensitivity`) into a preset.

The report measures, per quantizable layer, the relative output error of NVFP4 weights with full-precision
activations (w4a16), with NVFP4 activations too (w4a4_dynamic, what ComfyUI does on Blackwell when the file has no
input_scale, which is how `nvdiag convert` writes it), and of FP8 weights and activations (fp8); risk is
w4a4_dynamic / w4a16. Each measured layer gets one decision, the cheapest that keeps its error in bounds:

  nvfp4         W4A4 on Blackwell         w4a16 <= max_error and risk <= the risk threshold
  nvfp4-w4a16   NVFP4, full-precision mm  w4a16 <= max_error, risk above the threshold
  fp8-w8a16     FP8, full-precision mm    w4a16 > max_error (4-bit weights alone are too coarse), fp8 <= max_error
  bf16          16-bit                    w4a16 and fp8 both > max_error

A layer the report could not measure (`not_measurable`: its activations were not finite in the reference forward,
an fp16 overflow) has no risk to weigh: it is kept out of W4A4 (nvdiag-w4a16: NVFP4 weights, full-precision mm),
first in the budget and never held back by it, and its rule says why.

The FP8 tier multiplies in full precision because convert writes FP8 layers without an input_scale, with which
ComfyUI quantizes FP8 activations at scale 1.0 (shared/research/comfyui-load-path.md, Q2), not at the calibrated
scale the report's fp8 error was measured with; the report's fp8 error (FP8 activations included) is then an upper
estimate of what the layer gives. The budget caps the share of the measured parameters that may leave plain W4A4,
most risky first: layers that fail even W4A16 (by their W4A16 error), then the others by risk.

The report is untrusted input: its size, structure, names and numbers are checked, and anything wrong is one
InputError naming the file and the field (exit 2, never a traceback).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from converter.preset import Preset, Rule, builtin_names, dumps_preset, load_builtin, load_preset, loads_preset
from inspect_tools.errors import InputError, UsageError
from inspect_tools.safety import read_at_most

REPORT_KIND = "nvdiag-sensitivity"
REPORT_VERSION = 1
# A report lists a few hundred layers (a 14B WAN expert has 400 linears) of a few hundred bytes each: megabytes at
# most. Far more is not a report, and is not read into memory.
MAX_REPORT_BYTES = 32 * 1024 * 1024
MAX_LAYERS = 100_000
MAX_PARAMS = 10**13  # per layer; the largest diffusion linears have ~10^8
MAX_TEXT = 4096
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
METRICS = ("w4a16", "w4a4_dynamic", "w4a4_static", "fp8")

# Defaults (the CLI help repeats the reasoning):
# - risk 2.0: with weights and activations quantized alike, the two errors add in quadrature and W4A4 is about
#   sqrt(2) = 1.41x W4A16 (the synthetic demo's whole-model verify measures 0.0956 / 0.0632 = 1.51x); above 2x the
#   activations alone lose more than sqrt(3) times what the weights lose, the mark of outlier channels. It is also the
#   threshold `nvdiag sensitivity` itself flags layers at (inspect_tools/comfyui/sensitivity.py, RISKY).
# - max_error 0.12: reference_specs' expected NVFP4 error on well-behaved weights (formats/nvfp4.py,
#   typical_rel_error, a loose upper bound). A linear's relative output error on well-spread inputs is of the order
#   of its weight error, so a layer above it under W4A16 is not well-behaved for 4 bits at all.
# - budget 1.0 (no cap): W4A16 costs Blackwell speed, not size; how much speed to give up is the user's call.
DEFAULT_RISK = 2.0
DEFAULT_MAX_ERROR = 0.12
DEFAULT_BUDGET = 1.0
SIXTEEN_BIT = "bf16"  # ComfyUI's usual compute dtype; convert --dtype-16 fp16 rewrites it
DECISION_ORDER = ("bf16", "fp8-w8a16", "nvfp4-w4a16", "nvfp4")


@dataclass(frozen=True)
class LayerReport:
    layer: str
    params: int
    w4a16: float  # the errors and risk are NaN when not measurable
    w4a4_dynamic: float
    w4a4_static: float
    fp8: float
    risk: float
    not_measurable: str | None = None  # the report's why, when it measured nothing for this layer

    @property
    def measured(self) -> bool:
        return self.not_measurable is None


@dataclass(frozen=True)
class SensitivityReport:
    architecture: str
    source: str
    layers: tuple[LayerReport, ...]


@dataclass(frozen=True)
class Choice:
    """One listed layer's decision and why (why: low | risk | weights | fp8-too | budget | unmeasured)."""

    layer: LayerReport
    decision: str
    why: str


# ---------------------------------------------------------------------------------------------- reading

def _fail(path: Path, message: str) -> InputError:
    return InputError(f"not a usable sensitivity report: {message}", str(path))


def _number(path: Path, where: str, value: Any, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"{where} must be a number (got {type(value).__name__})")
    try:
        value = float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise _fail(path, f"{where} must be a finite number >= 0 (got an integer too large for a float)") from None
    if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
        raise _fail(path, f"{where} must be a finite number >= 0 (got {value})")
    return value


def _layer(path: Path, index: int, raw: Any) -> LayerReport:
    where = f"layers[{index}]"
    if not isinstance(raw, dict):
        raise _fail(path, f"{where} is not an object")
    name = raw.get("layer")
    if not isinstance(name, str) or len(name) > 256 or not _NAME.fullmatch(name):
        raise _fail(path, f"{where}.layer must be a layer name such as blocks.0.self_attn.q (got {str(name)[:80]!r})")
    where = f"layer {name}"
    params = raw.get("params")
    if isinstance(params, bool) or not isinstance(params, int) or not 0 < params <= MAX_PARAMS:
        raise _fail(path, f"{where}: params must be a positive integer (got {str(params)[:40]})")
    if "not_measurable" in raw:
        why = raw["not_measurable"]
        if not isinstance(why, str) or not why or len(why) > MAX_TEXT:
            raise _fail(path, f"{where}: not_measurable must be the reason, a non-empty string")
        measured = [k for k in (*METRICS, "risk") if raw.get(k) is not None]
        if measured:
            raise _fail(path, f"{where}: not measurable, yet it gives {', '.join(measured)}")
        return LayerReport(layer=name, params=params, w4a16=math.nan, w4a4_dynamic=math.nan, w4a4_static=math.nan,
                           fp8=math.nan, risk=math.nan, not_measurable=why)
    missing = [k for k in (*METRICS, "risk") if k not in raw]
    if missing:
        raise _fail(path, f"{where}: missing {', '.join(missing)}")
    values = {k: _number(path, f"{where}: {k}", raw[k]) for k in METRICS}
    w4a16, w4a4 = values["w4a16"], values["w4a4_dynamic"]
    # null (JSON has no Infinity): only W4A16 exact, W4A4 not; older reports wrote Infinity there
    risk = math.inf if raw["risk"] is None and w4a16 == 0 else _number(path, f"{where}: risk", raw["risk"],
                                                                          allow_inf=True)
    if w4a16 > 0:
        # the report rounds each number to 6 digits; a ratio further off was edited or corrupted, and deciding on it
        # would contradict the errors printed beside it
        if not math.isclose(risk, w4a4 / w4a16, rel_tol=1e-3, abs_tol=1e-9):
            raise _fail(path, f"{where}: risk {risk:g} is not w4a4_dynamic / w4a16 = {w4a4 / w4a16:g}")
    else:  # W4A16 exact (an all-zero layer): infinite risk if W4A4 is not exact too, none if it is (0/0)
        risk = math.inf if w4a4 > 0 else 0.0
    return LayerReport(layer=name, params=params, risk=risk, **values)


def parse_report(data: Any, path: Path) -> SensitivityReport:
    """A decoded report -> SensitivityReport; InputError naming the first thing that is wrong."""
    if not isinstance(data, dict):
        raise _fail(path, "the JSON document is not an object")
    if data.get("kind") != REPORT_KIND:
        found = "no kind" if "kind" not in data else f"kind is {str(data['kind'])[:40]!r}"
        raise _fail(path, f"{found}, expected {REPORT_KIND!r} (written by nvdiag sensitivity -o)")
    if data.get("version") != REPORT_VERSION or isinstance(data.get("version"), bool):
        raise _fail(path, f"version {repr(data.get('version'))[:20]} is not supported (this nvdiag reads "
                          f"version {REPORT_VERSION})")
    arch = data.get("architecture")
    if not isinstance(arch, str) or len(arch) > 100 or not _SLUG.fullmatch(arch):
        raise _fail(path, f"architecture must be a variant name such as wan2.2-ti2v-5b (got {str(arch)[:40]!r})")
    source = data.get("source", "")
    if not isinstance(source, str) or len(source) > MAX_TEXT:
        raise _fail(path, "source must be a string")
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list):
        raise _fail(path, "layers must be a list")
    if not raw_layers:
        raise _fail(path, "layers is empty: the report measured nothing to decide")
    if len(raw_layers) > MAX_LAYERS:
        raise _fail(path, f"{len(raw_layers)} layers, more than any model has ({MAX_LAYERS})")
    layers = [_layer(path, i, raw) for i, raw in enumerate(raw_layers)]
    seen: set[str] = set()
    for layer in layers:
        if layer.layer in seen:
            raise _fail(path, f"layer {layer.layer} is listed twice")
        seen.add(layer.layer)
    return SensitivityReport(architecture=arch, source=source, layers=tuple(layers))


def load_report(path: str | Path) -> SensitivityReport:
    """Read and validate a report file (bounded size, UTF-8 JSON)."""
    path = Path(path)
    # checked before opening: opening a FIFO (or a device) for reading can block forever
    if not path.exists():
        raise InputError("report not found", str(path))
    if path.is_dir():
        raise InputError("is a folder, not a report file", str(path))
    if not path.is_file():
        raise InputError("is not a regular file", str(path))
    raw = read_at_most(path, MAX_REPORT_BYTES, f"not a usable sensitivity report: larger than {MAX_REPORT_BYTES} "
                       "bytes, far more than any model's report")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail(path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # absurdly long integers, absurdly deep nesting
        raise _fail(path, f"not JSON this tool reads: {exc.__class__.__name__}") from None
    return parse_report(data, path)


# ---------------------------------------------------------------------------------------------- deciding

def check_thresholds(risk: float, max_error: float, budget: float) -> None:
    if not (math.isfinite(risk) and risk >= 1.0):
        raise UsageError(f"--risk must be a finite ratio >= 1 (W4A4 is never expected to beat W4A16), not {risk}")
    if not (math.isfinite(max_error) and max_error > 0):
        raise UsageError(f"--max-error must be a finite relative error > 0, not {max_error}")
    if not (math.isfinite(budget) and 0.0 <= budget <= 1.0):
        raise UsageError(f"--budget must be a fraction between 0 and 1, not {budget}")


def wanted(layer: LayerReport, risk: float, max_error: float) -> Choice:
    """What the layer needs, budget aside."""
    if not layer.measured:  # nothing known: not W4A4; its NVFP4 weights are the preset's usual choice
        return Choice(layer, "nvfp4-w4a16", "unmeasured")
    if layer.w4a16 > max_error:
        if layer.fp8 <= max_error:
            return Choice(layer, "fp8-w8a16", "weights")
        return Choice(layer, SIXTEEN_BIT, "fp8-too")
    if layer.risk > risk:
        return Choice(layer, "nvfp4-w4a16", "risk")
    return Choice(layer, "nvfp4", "low")


def _priority(choice: Choice) -> tuple:
    """Most risky first: unmeasured layers (nothing says they are safe), layers that fail even W4A16 (worst W4A16
    first), then by risk; name breaks ties."""
    if choice.why == "unmeasured":
        return (0, 0.0, choice.layer.layer)
    failed_weights = choice.decision in ("fp8-w8a16", SIXTEEN_BIT)
    return (1 if failed_weights else 2, -(choice.layer.w4a16 if failed_weights else choice.layer.risk),
            choice.layer.layer)


def decide(report: SensitivityReport, risk: float = DEFAULT_RISK, max_error: float = DEFAULT_MAX_ERROR,
           budget: float = DEFAULT_BUDGET) -> list[Choice]:
    """Per listed layer (in name order) its decision. Layers that would leave W4A4 are admitted most risky first
    while their parameters fit in `budget` x the listed parameters; the rest stay W4A4 (why = budget). Unmeasured
    layers are admitted first and always: W4A4 on a layer nothing is known of is not the user's budget to spend."""
    check_thresholds(risk, max_error, budget)
    choices = {layer.layer: wanted(layer, risk, max_error) for layer in report.layers}
    allowance = budget * sum(layer.params for layer in report.layers)
    spent = 0
    for choice in sorted((c for c in choices.values() if c.decision != "nvfp4"), key=_priority):
        if spent + choice.layer.params <= allowance or choice.why == "unmeasured":
            spent += choice.layer.params
        else:  # a smaller, less risky layer further down may still fit
            choices[choice.layer.layer] = Choice(choice.layer, "nvfp4", "budget")
    return [choices[name] for name in sorted(choices)]


# ---------------------------------------------------------------------------------------------- rules

def _split_block(name: str) -> tuple[str, str | None, str]:
    """'blocks.12.ffn.2' -> ('blocks', '12', 'ffn.2'): the first numeric component that is not the last one (the
    block index); (name, None, '') when there is none."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0:
            return ".".join(parts[:i]), part, ".".join(parts[i + 1:])
    return name, None, ""


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}-{hi:.3g}"


def _reason(why: str, members: list[LayerReport], risk: float, max_error: float, budget: float) -> str:
    n = f"{len(members)} layer{'s' if len(members) > 1 else ''}"
    if why == "unmeasured":
        reasons = sorted({str(m.not_measurable) for m in members})
        return (f"W4A16: not measurable ({'; '.join(reasons)[:300]}), so kept out of W4A4; NVFP4 weights, "
                f"full-precision matmul on Blackwell, its W4A16 error unmeasured too ({n})")
    r = _span([m.risk for m in members])
    w16 = _span([m.w4a16 for m in members])
    if why == "low":
        return f"W4A4 on Blackwell: risk {r} <= {risk:g}, W4A16 error {w16} <= {max_error:g} (measured, {n})"
    if why == "budget":
        return (f"W4A4 on Blackwell although it needs more (risk {r}, W4A16 error {w16}): over --budget {budget:g} "
                f"of the measured parameters ({n})")
    if why == "risk":
        return (f"W4A16: W4A4 error {_span([m.w4a4_dynamic for m in members])} far above W4A16 error {w16} "
                f"(risk {r} > {risk:g}); NVFP4 weights, full-precision matmul on Blackwell ({n})")
    fp8 = _span([m.fp8 for m in members])
    if why == "weights":
        return (f"FP8 weights, full-precision matmul: W4A16 error {w16} > {max_error:g} even with 16-bit "
                f"activations, FP8 error {fp8} <= {max_error:g}; no FP8 activations, since convert writes no FP8 "
                f"input_scale and ComfyUI would quantize them at scale 1.0 ({n})")
    return f"16-bit: W4A16 error {w16} and FP8 error {fp8} both > {max_error:g} ({n})"


def rules_from_choices(choices: list[Choice], risk: float, max_error: float, budget: float) -> list[Rule]:
    """One exact rule per (layer kind, decision, why): `^blocks\\.(?:0|3|7)\\.ffn\\.2$` names exactly the measured
    blocks, never a layer the report left out (those are the ones the source must not quantize)."""
    groups: dict[tuple[str, str, str, str], list[Choice]] = {}
    for choice in choices:
        head, _, tail = _split_block(choice.layer.layer)
        groups.setdefault((head, tail, choice.decision, choice.why), []).append(choice)

    def order(key: tuple[str, str, str, str]) -> tuple:
        head, tail, decision, why = key
        return head, tail, DECISION_ORDER.index(decision), why

    rules = []
    for index, key in enumerate(sorted(groups, key=order), 1):
        head, tail, decision, why = key
        members = groups[key]
        blocks = sorted({int(_split_block(c.layer.layer)[1]) for c in members if _split_block(c.layer.layer)[1]})
        if len(members) == 1 or not blocks:  # a name without a block index is its own group
            pattern = "^" + re.escape(members[0].layer.layer) + "$"
        else:
            pattern = (f"^{re.escape(head)}\\.(?:{'|'.join(map(str, blocks))})\\.{re.escape(tail)}$")
        rules.append(Rule(format=decision, regex=pattern, index=index,
                          reason=_reason(why, [c.layer for c in members], risk, max_error, budget)))
    return rules


# ---------------------------------------------------------------------------------------------- preset

@dataclass
class Outcome:
    preset: Preset
    text: str  # the TOML to write (a comment header with the thresholds, then the preset)
    choices: list[Choice]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for choice in self.choices:
            out[choice.decision] = out.get(choice.decision, 0) + 1
        return {k: out[k] for k in DECISION_ORDER if k in out}

    @property
    def held_by_budget(self) -> int:
        return sum(1 for c in self.choices if c.why == "budget")

    @property
    def unmeasured(self) -> list[str]:
        """Layers the report could not measure, kept out of W4A4."""
        return [c.layer.layer for c in self.choices if c.why == "unmeasured"]

    @property
    def fraction_left_w4a4(self) -> float:
        """Share of the measured parameters that leave plain W4A4."""
        total = sum(c.layer.params for c in self.choices)
        moved = sum(c.layer.params for c in self.choices if c.decision != "nvfp4")
        return moved / total if total else 0.0


def base_preset(base: str | None, architecture: str) -> Preset | None:
    """The preset that decides the layers a report does not measure: `base` ("auto": the architecture's built-in
    preset when there is one; "none": no base, those layers keep the source precision; else a preset name or path)."""
    if base is None or base == "none":
        return None
    if base == "auto":
        return load_builtin(architecture) if architecture in builtin_names() else None
    return load_preset(base)


def _borrowed(base: Preset | None) -> list[Rule]:
    """The base preset's rules, each saying where it came from."""
    if base is None:
        return []
    return [replace(rule, reason=f"preset {base.name}: {rule.reason or rule.describe()}") for rule in base.rules]


def preset_from_sensitivity(path: str | Path, risk: float = DEFAULT_RISK, max_error: float = DEFAULT_MAX_ERROR,
                            budget: float = DEFAULT_BUDGET, name: str | None = None,
                            base: str | None = "auto") -> Outcome:
    """The report at `path` -> the preset (validated by loading its own TOML back) and the text to write.

    The measured rules come first (first match decides) and name exactly the layers they decide; every other layer
    (embeddings, norms, modulation, head: what sensitivity does not measure) is decided by the base preset's rules,
    so the file keeps those at the precision the architecture's preset chose (F32 norms, 16-bit embeddings) instead
    of the source's (FP32: a measured WAN TI2V fixture's file was 1.8x the size of the built-in preset's)."""
    path = Path(path)
    check_thresholds(risk, max_error, budget)
    report = load_report(path)
    arch = report.architecture
    underneath = base_preset(base, arch)
    choices = decide(report, risk, max_error, budget)
    source = Path(report.source).name if report.source else path.name  # never an absolute path in the preset
    rest = (f"unmeasured layers as preset {underneath.name} decides them" if underneath is not None
            else "unmeasured layers keep the source precision")
    preset = Preset(
        name=name or (f"{arch}-sensitivity" if arch != "unknown" else f"{path.stem}-sensitivity"),
        rules=rules_from_choices(choices, risk, max_error, budget) + _borrowed(underneath),
        default=underneath.default if underneath is not None else "keep",
        description=(f"measured by nvdiag sensitivity on {source}: W4A4 where risk <= {risk:g}, W4A16 above it, "
                     f"FP8 or 16-bit where W4A16 error > {max_error:g}; {rest}"),
        architectures=(arch,) if arch != "unknown" else (),
    )
    tail = (f"# falls to the rules of preset {underneath.name} copied below them (embeddings, norms, modulation,\n"
            f"# head), then to its default ({underneath.default}).\n" if underneath is not None
            else "# falls to the default and keeps the source precision.\n")
    header = (f"# nvdiag preset from-sensitivity {path.name} --risk {risk:g} --max-error {max_error:g} "
              f"--budget {budget:g} --base {base if base is not None else 'none'}\n"
              "# Each measured rule names exactly the layers it decides; a layer the report does not list (the\n"
              "# sensitive and non-linear ones) " + tail)
    lost = [c.layer.layer for c in choices if c.why == "unmeasured"]
    if lost:
        header += (f"# {len(lost)} layer(s) the report could not measure are kept out of W4A4 (W4A16), not ranked:\n"
                   f"# {', '.join(lost[:8])}{' ...' if len(lost) > 8 else ''}\n")
    text = header + dumps_preset(preset)
    loaded = loads_preset(text.encode("utf-8"), str(path))  # what the file will load back as (sha included)
    loaded.source = str(path)
    return Outcome(preset=loaded, text=text, choices=choices)
