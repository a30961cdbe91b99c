"""`nvdiag preset list | show | explain | from-gguf | from-sensitivity`: the layer-selection presets `nvdiag convert`
uses."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from converter import from_sensitivity as fs
from converter.from_gguf import preset_from_gguf, write_text_atomic
from converter.plan import model_width, quant_conf
from converter.preset import (
    QUANT_FORMATS,
    LayerView,
    Preset,
    builtin_names,
    describe_decision,
    dumps_preset,
    load_builtin,
    load_preset,
    profile_view,
)
from inspect_tools.cli import app
from inspect_tools.cli.output import FORMAT_HELP, TABLE_ROWS, console, github_notice, print_json
from inspect_tools.cli.terminal_text import shown
from inspect_tools.errors import OutputError, UsageError
from inspect_tools.layers import open_model
from inspect_tools.output_paths import check_output_path
from reference_specs import models

preset_app = typer.Typer(
    help="Layer-selection presets for `nvdiag convert`: list, show, explain, or derive one from a GGUF file or a "
         "sensitivity report.",
    no_args_is_help=True,
)
app.add_typer(preset_app, name="preset")

FormatOpt = typer.Option("text", "--format", help=FORMAT_HELP)


def _check_format(fmt: str) -> None:
    if fmt not in ("text", "json", "github"):
        raise UsageError(f"--format must be text, json or github, not {fmt!r}")


def _notice(message: str, title: str) -> None:
    print(github_notice(message, title))


def _marker(decision: str) -> dict | None:
    """The comfy_quant conf convert writes for a decision (None: the layer is kept, no marker)."""
    return quant_conf(decision) if decision in QUANT_FORMATS else None


def _rule_rows(preset: Preset) -> list[dict]:
    return [
        {"index": r.index, "pattern": r.pattern, "conditions": dict(r.conditions), "format": r.format,
         "marker": _marker(r.format), "reason": r.reason, **({"bias": r.bias} if r.bias else {})}
        for r in preset.rules
    ]


def _legend(decisions: list[str]) -> list[str]:
    """One line per quantizing decision in use: what it writes and what ComfyUI then does with it."""
    return [f"{d}: writes {json.dumps(quant_conf(d))}: {describe_decision(d)}"
            for d in QUANT_FORMATS if d in decisions]


def _preset_doc(preset: Preset) -> dict:
    return {"name": preset.name, "description": preset.description, "default": preset.default,
            "architectures": list(preset.architectures), "source": preset.source, "sha256": preset.sha256,
            "rules": _rule_rows(preset)}


@preset_app.command("list")
def list_cmd(fmt: str = FormatOpt) -> None:
    """List the built-in presets.

    Example: nvdiag preset list
    """
    _check_format(fmt)
    presets = [load_builtin(n) for n in builtin_names()]
    if fmt == "json":
        print_json({"version": 1, "presets": [_preset_doc(p) for p in presets]})
        return
    if fmt == "github":
        for p in presets:
            _notice(f"{len(p.rules)} rules for {', '.join(p.architectures) or 'any'}: {p.description}", p.name)
        return
    table = Table(title="built-in presets")
    for col in ("name", "rules", "for", "description"):
        table.add_column(col, overflow="fold")
    for p in presets:
        table.add_row(p.name, str(len(p.rules)), ", ".join(p.architectures) or "any", p.description)
    console().print(table)


def _file_decisions(preset: Preset, path: str):
    """[(LayerView, Decision)] for every layer of the checkpoint at `path`, plus its detection."""
    with open_model(path) as model:
        profile = models.get_profile(model.detection.variant)
        width = model_width(model.detection)
        views = sorted((profile_view(layer, profile) for layer in model.layers.values()), key=lambda v: v.name)
        return [(v, preset.decide(v, width)) for v in views], model.detection, preset.unmatched_rules(views)


@preset_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="built-in preset name or path to a .toml preset"),
    on: Path | None = typer.Option(None, "--on", help="a checkpoint: show what the preset selects in it"),
    fmt: str = FormatOpt,
) -> None:
    """Show a preset's rules, and with --on what it decides for every layer of a file.

    Examples:
      nvdiag preset show smart
      nvdiag preset show wan2.2-ti2v-5b --on diffusion_pytorch_model.safetensors.index.json
    """
    _check_format(fmt)
    preset = load_preset(name)
    decisions, detection, unmatched = _file_decisions(preset, str(on)) if on is not None else ([], None, [])
    counts: dict[str, int] = {}
    for _, d in decisions:
        counts[d.format] = counts.get(d.format, 0) + 1
    warnings = [f"{r.describe()} matches no layer of {on}" for r in unmatched]
    if fmt == "json":
        doc = _preset_doc(preset)
        if on is not None:
            doc["on"] = {"path": str(on), "architecture": detection.to_json(), "counts": counts,
                         "warnings": warnings,
                         "layers": [{"name": v.name, "shape": list(v.shape), "format": d.format,
                                     "marker": _marker(d.format), "rule": d.rule.index if d.rule else None,
                                     "reason": d.reason}
                                    for v, d in decisions]}
        print_json({"version": 1, "preset": doc})
        return
    if fmt == "github":
        on_text = f"; on {on}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) if on is not None else ""
        _notice(f"{len(preset.rules)} rules, default {preset.default}{on_text}", preset.name)
        for w in warnings:
            print(f"::warning title={preset.name}::{w}")
        return
    out = console()
    out.print(f"[bold]{preset.name}[/] ({preset.source or 'file'}, sha256 {preset.sha256[:12]}): {preset.description}")
    table = Table(title="rules (first match wins)")
    for col in ("#", "pattern", "conditions", "format", "reason"):
        table.add_column(col, overflow="fold")
    for r in preset.rules:
        conds = " ".join(f"{k}={v}" for k, v in r.conditions.items())
        table.add_row(str(r.index), r.pattern, conds, r.format + (f" (bias {r.bias})" if r.bias else ""), r.reason)
    table.add_row("-", "default", "", preset.default, "no rule matched")
    out.print(table)
    for line in _legend([r.format for r in preset.rules]):
        out.print(line, markup=False)
    if on is None:
        return
    out.print(f"on {shown(on)}: {detection.variant} ({detection.naming} names)")
    layers = Table(title="decisions")
    for col in ("layer", "shape", "format", "rule"):
        layers.add_column(col, overflow="fold")
    for v, d in decisions[:TABLE_ROWS]:
        layers.add_row(shown(v.name), "x".join(map(str, v.shape)), d.format, str(d.rule.index) if d.rule else "default")
    out.print(layers)
    if len(decisions) > TABLE_ROWS:
        out.print(f"[dim]decisions: showing {TABLE_ROWS} of {len(decisions)} (--format json for all)[/]")
    out.print(", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    for w in warnings:
        out.print(f"[yellow]warning:[/] {shown(w)}")


def _view_for(preset: Preset, layer: str, on: Path | None) -> tuple[LayerView, int | None, str]:
    if on is not None:
        with open_model(on) as model:
            profile = models.get_profile(model.detection.variant)
            for candidate in model.layers.values():
                view = profile_view(candidate, profile)
                if layer in (view.name, candidate.name):
                    return view, model_width(model.detection), f"shape from {on}"
        raise UsageError(f"no layer {layer!r} in {on}")
    for variant in preset.architectures:
        profile = models.get_profile(variant)
        if profile is None:
            continue
        shapes = profile.tensor_shapes(profile.full_dims)
        for role in ("weight", "value"):
            key = layer if role == "value" else f"{layer}.{role}"
            if key in shapes:
                return (LayerView(layer, tuple(shapes[key]), "F32", role == "weight", profile.sensitive(layer),
                                  dict(profile.read_axes(layer)), profile.is_table(layer)),
                        profile.full_dims.get("dim"), f"shape from the {variant} profile")
    return LayerView(layer, (4096, 4096)), None, "shape unknown: assumed a 2-D 4096x4096 linear (pass --on FILE)"


@preset_app.command("explain")
def explain_cmd(
    name: str = typer.Argument(..., help="built-in preset name or path to a .toml preset"),
    layer: str = typer.Argument(..., help="layer base name, e.g. blocks.0.self_attn.q"),
    on: Path | None = typer.Option(None, "--on", help="a checkpoint to take the layer's real shape from"),
    fmt: str = FormatOpt,
) -> None:
    """Explain which rule of a preset decides a layer, and why the earlier rules did not.

    Example: nvdiag preset explain smart blocks.0.ffn.2
    """
    _check_format(fmt)
    preset = load_preset(name)
    view, width, origin = _view_for(preset, layer, on)
    trace = preset.explain(view, width)
    decision = preset.decide(view, width)
    if fmt == "json":
        print_json({"version": 1, "preset": preset.name, "layer": view.name, "shape": list(view.shape),
                    "shape_origin": origin, "format": decision.format, "marker": _marker(decision.format),
                    "meaning": describe_decision(decision.format),
                    "rule": decision.rule.index if decision.rule else None, "reason": decision.reason,
                    "trace": [{"rule": r.index, "pattern": r.pattern, "skipped_because": why} for r, why in trace]})
        return
    by = f"rule {decision.rule.index}" if decision.rule else "the default"
    if fmt == "github":
        _notice(f"{view.name} => {decision.format} by {by}: {decision.reason}", f"{preset.name} {view.name}")
        return
    out = console()
    out.print(f"{shown(view.name)} [{'x'.join(map(str, view.shape))}] ({origin})")
    for rule, why in trace:
        if why is None:
            out.print(f"  [green]{rule.describe()}[/]: applies")
        else:
            out.print(f"  {rule.describe()}: skipped, {why}")
    out.print(f"=> [bold]{decision.format}[/] by {by}: {decision.reason}")
    marker = _marker(decision.format)
    written = f"marker {json.dumps(marker)}" if marker else "no marker"
    out.print(f"   {written}; {describe_decision(decision.format)}", markup=False)


@preset_app.command("from-gguf")
def from_gguf_cmd(
    gguf: Path = typer.Argument(..., help="a GGUF file whose per-layer types to reuse"),
    output: Path = typer.Option(..., "-o", "--output", help="preset TOML to write"),
    higher: str = typer.Option("fp8", "--higher", help="for layers GGUF gave more than 4 bits: fp8 or keep"),
    name: str | None = typer.Option(None, "--name", help="preset name (default: FILE stem + -gguf)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing OUTPUT"),
    fmt: str = FormatOpt,
) -> None:
    """Write a preset that reproduces a GGUF file's layer selection (4-bit -> nvfp4, F32 -> f32, ...).

    Example: nvdiag preset from-gguf wan2.2_ti2v_5B-Q4_0.gguf -o wan-q4.toml --higher fp8
    """
    _check_format(fmt)
    check_output_path(output, [gguf])  # --force must never turn the GGUF into a TOML
    if output.exists() and not force:
        raise OutputError("exists; pass --force to overwrite it", str(output))
    preset = preset_from_gguf(gguf, higher=higher, name=name)
    write_text_atomic(output, dumps_preset(preset))
    counts: dict[str, int] = {}
    for r in preset.rules:
        counts[r.format] = counts.get(r.format, 0) + 1
    shown = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    said = f"wrote {output}: {len(preset.rules)} rules ({shown})"
    if fmt == "json":
        print_json({"version": 1, "output": str(output), "preset": _preset_doc(preset), "counts": counts})
    elif fmt == "github":
        _notice(said, "nvdiag preset from-gguf")
    else:
        console().print(said, markup=False, highlight=False)


# Paragraphs as single lines: the help renderer wraps them to the terminal, and keeps hard line breaks.
FROM_SENSITIVITY_HELP = "\n\n".join([
    "Write a preset from a sensitivity report (nvdiag sensitivity -o REPORT.json).",
    "Per measured layer: W4A4 (nvfp4) where risk = W4A4 error / W4A16 error is at most --risk; nvfp4-w4a16 (NVFP4 "
    "weights with full_precision_matrix_mult: ComfyUI multiplies in full precision on Blackwell too) where W4A4 is "
    "far above W4A16; where even the W4A16 error exceeds --max-error, fp8-w8a16 if the FP8 error is within it, else "
    "bf16. FP8 layers multiply in full precision because convert writes them without an input_scale, with which "
    "ComfyUI quantizes FP8 activations at scale 1.0, not at the calibrated scale the report's FP8 error assumes. "
    "Layers the report does not list (embeddings, norms, modulation, head) are decided by --base: by default the "
    "built-in preset of the report's architecture, so they keep the precision it gives them; --base none keeps the "
    "source precision.",
    f"Defaults: --risk {fs.DEFAULT_RISK:g}: when activations quantize as well as weights the two errors add in "
    "quadrature and W4A4 is about 1.41x W4A16; above 2x the activations lose more than 1.7x what the weights lose, "
    f"the mark of outlier channels (nvdiag sensitivity flags the same layers). --max-error {fs.DEFAULT_MAX_ERROR:g}: "
    "the error NVFP4 is expected to stay within on well-behaved weights (nvdiag's NVFP4 format spec); above it "
    f"under W4A16 the weights themselves are too coarse for 4 bits. --budget {fs.DEFAULT_BUDGET:g} (no cap): W4A16 "
    "costs Blackwell speed, FP8 and 16-bit also size; a cap admits the most risky layers first (those that fail "
    "even W4A16, then by risk) until that fraction of the measured parameters has left W4A4.",
    "Examples:\n\n"
    "  nvdiag preset from-sensitivity report.json -o measured.toml\n\n"
    "  nvdiag preset from-sensitivity report.json --budget 0.25 -o measured.toml --force\n\n"
    "  nvdiag preset from-sensitivity report.json          # print the preset",
])


@preset_app.command("from-sensitivity", help=FROM_SENSITIVITY_HELP)
def from_sensitivity_cmd(
    report: Path = typer.Argument(..., help="a report written by nvdiag sensitivity -o"),
    output: Path | None = typer.Option(None, "-o", "--output", help="preset TOML to write (default: print it)"),
    budget: float = typer.Option(fs.DEFAULT_BUDGET, "--budget",
                                 help="fraction of the measured parameters that may leave plain W4A4 (0-1)"),
    risk: float = typer.Option(fs.DEFAULT_RISK, "--risk", help="W4A4/W4A16 error ratio above which a layer gets W4A16"),
    max_error: float = typer.Option(fs.DEFAULT_MAX_ERROR, "--max-error",
                                    help="relative output error above which 4-bit weights are too coarse"),
    name: str | None = typer.Option(None, "--name", help="preset name (default: ARCHITECTURE-sensitivity)"),
    base: str = typer.Option("auto", "--base", help="preset for the layers the report does not measure: auto (the "
                             "architecture's built-in preset), none (keep the source precision), a name or a TOML"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing OUTPUT"),
    fmt: str = FormatOpt,
) -> None:
    _check_format(fmt)
    fs.check_thresholds(risk, max_error, budget)  # a usage error before any file is touched
    if output is not None:
        check_output_path(output, [report])  # --force must never turn the report into a TOML
        if output.exists() and not force:
            raise OutputError("exists; pass --force to overwrite it", str(output))
    outcome = fs.preset_from_sensitivity(report, risk=risk, max_error=max_error, budget=budget, name=name, base=base)
    if output is not None:
        write_text_atomic(output, outcome.text)
    counts = ", ".join(f"{k} {n}" for k, n in outcome.counts().items())
    held = f"; {outcome.held_by_budget} held at W4A4 by --budget" if outcome.held_by_budget else ""
    said = (f"{len(outcome.preset.rules)} rules for {len(outcome.choices)} layers ({counts}); "
            f"{outcome.fraction_left_w4a4:.1%} of the measured parameters leave W4A4{held}")
    if fmt == "json":
        print_json({"version": 1, "output": str(output) if output else None, "preset": _preset_doc(outcome.preset),
                    "counts": outcome.counts(), "fraction_left_w4a4": outcome.fraction_left_w4a4,
                    "held_by_budget": outcome.held_by_budget, "toml": outcome.text})
    elif fmt == "github":
        _notice((f"wrote {output}: " if output else "") + said, "nvdiag preset from-sensitivity")
    elif output is None:
        print(outcome.text, end="")
    else:
        console().print(f"wrote {output}: {said}", markup=False, highlight=False)
