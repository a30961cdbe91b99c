"""`nvdiag convert SRC OUT --preset NAME|PATH`: ComfyUI-native mixed NVFP4, verified before it is published."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from converter.plan import quant_conf  # torch-free, like the preset vocabulary
from converter.preset import QUANT_FORMATS, describe_decision
from inspect_tools import cuda_driver
from inspect_tools.cli import app
from inspect_tools.cli.hints import check_safetensors_out
from inspect_tools.cli.output import (
    FORMAT_HELP,
    OutputFormat,
    console,
    findings_document,
    print_findings_text,
    render,
)
from inspect_tools.cli.terminal_text import shown
from inspect_tools.readers import prefetch
from reference_specs.findings import Finding, Severity

if TYPE_CHECKING:  # the engine (and torch) is imported by the command itself: other commands start without it
    from converter.pipeline import ConvertResult
    from converter.plan import ConversionPlan, LayerPlan


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _decision(lp: LayerPlan) -> str:
    """What the dry-run table shows: the quantizing decision (nvfp4-w4a16 and nvfp4 write the same tensors but
    different markers), else the kept layer's output dtype."""
    return lp.action if lp.quantized else lp.out_format


def _plan_rows(result: ConvertResult) -> list[dict]:
    return [
        {"layer": lp.name, "decision": lp.action, "format": lp.out_format, "marker": lp.conf,
         "rule": lp.decision.rule.index if lp.decision and lp.decision.rule else None,
         "reason": lp.decision.reason if lp.decision else "file marker", "bytes": lp.out_bytes,
         "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in lp.tensors]}
        for lp in result.plan.layers
    ]


def _findings(result: ConvertResult) -> list[Finding]:
    findings = list(result.gate.findings) if result.gate else []
    if result.non_finite:
        names = ", ".join(f"{n} ({c})" for n, c in sorted(result.non_finite.items()))
        findings.insert(0, Finding("CONVERT-NONFINITE", "excess-error", Severity.ERROR,
                                   f"NaN/Inf values in source weights: {names}; nothing was written",
                                   str(result.out), None, {"layers": dict(result.non_finite)}))
    return findings


def _summary(result: ConvertResult) -> dict:
    plan = result.plan
    worst = result.gate.worst if result.gate else None
    return {
        "architecture": plan.detection.to_json(),
        "preset": {"name": plan.preset.name, "sha256": plan.preset.sha256, "source": plan.preset.source},
        "layers_per_format": plan.counts(),
        "source_bytes": plan.source_bytes,
        "output_bytes": plan.output_bytes,
        "worst_layer": {"layer": worst[0], "rel_error": worst[1]} if worst else None,
        "written": result.written,
        "dry_run": result.dry_run,
        "out": str(result.out),
        "seconds": round(result.seconds, 3),
        # where those seconds went: plan, stream, gate, commit, and each streaming stage's busy time
        "timings": {phase: round(value, 3) for phase, value in result.timings.items()},
        "warnings": plan.warnings,
        "source_lossy": _source_lossy(plan),
    }


def _source_lossy(plan: ConversionPlan) -> dict | None:
    """What the JSON says of an FP8 source (converter/fp8_source.py): already lossy, in how many layers."""
    if not plan.lossy_source:
        return None
    from converter.fp8_source import lossy_note

    return {"layers": sum(plan.lossy_source.values()), "formats": dict(sorted(plan.lossy_source.items())),
            "message": lossy_note(plan.lossy_source)}


def _print_text(result: ConvertResult) -> None:
    out = console()
    plan = result.plan
    for w in plan.warnings:
        console(stderr=True).print(f"[yellow]warning:[/] {shown(w)}")
    if result.dry_run:
        table = Table(title=f"plan: {plan.preset.name} on {plan.detection.variant}")
        for col in ("layer", "decision", "rule", "output", "size"):
            table.add_column(col, overflow="fold")
        for lp in plan.layers:
            rule = lp.decision.rule.index if lp.decision and lp.decision.rule else "default"
            dtypes = " ".join(sorted({t.dtype for t in lp.tensors}))
            table.add_row(shown(lp.name), _decision(lp), str(rule), dtypes, _size(lp.out_bytes))
        out.print(table)
        used = {lp.action for lp in plan.layers if lp.quantized}
        for decision in (d for d in QUANT_FORMATS if d in used):
            out.print(f"{decision}: marker {json.dumps(quant_conf(decision))}: {describe_decision(decision)}",
                      markup=False, highlight=False)
    findings = _findings(result)
    if findings:
        print_findings_text(findings, title="gate" if result.gate else None, out=out)
    counts = ", ".join(f"{k} {n}" for k, n in plan.counts().items())
    if (lossy := _source_lossy(plan)) is not None:
        out.print(f"note: {shown(lossy['message'])}", markup=False, highlight=False)
    out.print(f"layers: {counts}")
    out.print(f"size: {_size(plan.source_bytes)} -> {_size(plan.output_bytes)}")
    if result.gate and result.gate.worst:
        name, err = result.gate.worst
        out.print(f"worst sampled layer: {name} relative error {err:.4f}")
    style = "red" if not result.dry_run and not result.written else "green" if result.written else ""
    out.print(f"[{style}]{escape(_outcome(result))}[/]" if style else escape(_outcome(result)))


def _outcome(result: ConvertResult) -> str:
    if result.dry_run:
        return "dry run: nothing written"
    if result.written:
        return f"wrote {result.out} in {result.seconds:.1f} s"
    return f"refused: {result.out} was not written"


@app.command("convert")
def convert_cmd(
    # readable=False: click's own check would answer an unreadable file with its multi-line usage text; the readers
    # report it in one line naming the file, as for every other bad input
    src: Path = typer.Argument(..., readable=False,
                               help="FP32/FP16/BF16 (or FP8, dequantized) source: .safetensors, index.json, a sharded "
                                    "folder, or a diffusers model folder (transformer/, and transformer_2/ for WAN 2.2 "
                                    "A14B)"),
    out: Path = typer.Argument(..., readable=False, help="output .safetensors (ComfyUI-native NVFP4 mixed); for a "
                               "two-expert model the name of both: OUT_high_noise.safetensors, OUT_low_noise...."),
    preset: list[str] = typer.Option(..., "--preset", "-p", help="built-in preset name (nvdiag preset list) or a "
                                     ".toml; twice for a two-expert model: high-noise expert's, then low-noise's"),
    dtype_16: str | None = typer.Option(None, "--dtype-16", help="bf16 or fp16 (f16) for kept 16-bit layers"),
    input_scales: Path | None = typer.Option(None, "--input-scales", readable=False,
                                             help="calibrated input scales: JSON {layer: value} or a checkpoint"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the per-layer plan and output size, write nothing"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing OUT"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (encode on the GPU, same bytes)"),
    fmt: OutputFormat = typer.Option(OutputFormat.text, "--format", help=FORMAT_HELP),
    sample: int = typer.Option(8, "--gate-sample", help="quantized layers the gate roundtrips against the source"),
    verify: bool = typer.Option(False, "--verify", help="also load and run the written file in ComfyUI against the "
                                "source before publishing (nvdiag verify); refused if ComfyUI refuses or misrenders "
                                "it"),
    comfyui: str | None = typer.Option(None, "--comfyui", help="ComfyUI folder for --verify (default: $COMFYUI_PATH, "
                                       "else an importable comfy package)"),
) -> None:
    """Convert a float checkpoint into a ComfyUI-native NVFP4 mixed file; lint + roundtrip it before publishing.

    An FP8 source (comfy_quant float8, legacy scaled_fp8, plain FP8 casts) is dequantized (FP8 value x scale, in
    float32) and converted from there; the output says it was already lossy. NVFP4 sources are refused.

    Examples:
      nvdiag convert wan_ti2v/ wan_ti2v_nvfp4.safetensors --preset wan2.2-ti2v-5b
      nvdiag convert model.safetensors out.safetensors --preset smart --dry-run
      nvdiag preset from-gguf model-Q4_0.gguf -o q4.toml && nvdiag convert src/ out.safetensors --preset q4.toml
      nvdiag convert Wan2.2-T2V-A14B-Diffusers/ wan22_t2v_nvfp4.safetensors --preset wan2.2-t2v-a14b
        (two experts: writes wan22_t2v_nvfp4_high_noise.safetensors from transformer/ and
        wan22_t2v_nvfp4_low_noise.safetensors from transformer_2/; --preset twice gives each its own)

    Exit codes: 0 written, 1 refused (NaN/Inf in the source or the gate found an error; nothing published),
    2 bad input or usage. Two experts are converted one after the other, each published once its own gate passes;
    a refused one stops the run.
    """
    check_safetensors_out(out)
    if device == "cuda" and not dry_run:
        # the source is read into the page cache while torch, CUDA and the plan start (seconds, in a fresh process),
        # and CUDA's driver starts while torch is imported
        prefetch.warm_checkpoint(src)
        cuda_driver.start()
    try:
        _convert_all(src, out, preset, dtype_16, input_scales, dry_run, force, device, fmt, sample, verify, comfyui)
    finally:
        prefetch.stop()


def _convert_all(src: Path, out: Path, preset: list[str] | None, dtype_16: str | None, input_scales: Path | None,
                 dry_run: bool, force: bool, device: str, fmt: OutputFormat, sample: int, verify: bool,
                 comfyui: str | None) -> None:
    from converter.experts import expert_output, expert_presets, pipeline_experts
    from inspect_tools.errors import OutputError

    experts = pipeline_experts(src)
    presets = expert_presets(preset, experts)
    jobs = ([(e.source, expert_output(out, e), p, e.label) for e, p in zip(experts, presets, strict=True)]
            if experts else [(src, out, presets[0], "")])
    if not (dry_run or force):  # before any work: a two-expert run must not stop half-way on an existing file
        for _, target, _, _ in jobs:
            if target.exists():
                raise OutputError("exists; pass --force to overwrite it", str(target))
    options = {"dtype_16": dtype_16, "input_scales": input_scales, "dry_run": dry_run, "force": force,
               "device": device, "gate_sample": sample}
    show_bar = sys.stderr.isatty() and fmt == OutputFormat.text
    results: list[tuple[str, ConvertResult]] = []
    for source, target, chosen, label in jobs:
        result = _convert_one(source, target, chosen, options, verify and not dry_run, comfyui, show_bar)
        results.append((label, result))
        if result.refused:
            break
    _render(fmt, results, dry_run, out)
    raise typer.Exit(1 if any(r.refused for _, r in results) else 0)


def _progress_bar(enabled: bool) -> tuple[Progress | None, Callable[[int, int, str], None] | None]:
    """A transient bar on stderr, drawn from convert's progress calls (converter.pipeline.ProgressFn); it appears
    when the stream starts and advances once per layer: it counts layers, in one column, and says so."""
    if not enabled:
        return None, None
    bar = Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                   TimeRemainingColumn(), console=console(stderr=True), transient=True)
    task = bar.add_task("convert", total=None)

    def update(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total)
        if not bar.live.is_started:
            bar.start()

    return bar, update


def _convert_one(src: Path, out: Path, preset: str, options: dict, verify: bool, comfyui: str | None,
                 show_progress: bool):
    from converter.pipeline import convert

    extra_gate = None
    if verify:
        from inspect_tools.comfyui.gate import comfyui_gate
        from inspect_tools.comfyui.runtime import load_runtime

        # no ComfyUI: exit 2 before any work
        extra_gate = comfyui_gate(load_runtime(comfyui, device=options["device"]), src)
    bar, update = _progress_bar(show_progress)
    try:
        return convert(src, out, preset, extra_gate=extra_gate, progress=update, **options)
    finally:
        if bar is not None:
            bar.stop()


def _render(fmt: OutputFormat, results: list[tuple[str, ConvertResult]], dry_run: bool, out: Path) -> None:
    findings = [f for _, r in results for f in _findings(r)]

    def entry(result: ConvertResult) -> dict:
        extra = {"convert": _summary(result)}
        if dry_run:
            extra["plan"] = _plan_rows(result)
        return extra

    def document() -> dict:
        if len(results) == 1:
            return findings_document(findings, layers=len(results[0][1].plan.layers), **entry(results[0][1]))
        # a two-expert model: one entry per expert, in the order converted
        return findings_document(findings, layers=sum(len(r.plan.layers) for _, r in results),
                                 experts=[{"expert": label, **entry(r)} for label, r in results])

    def text() -> None:
        for label, result in results:
            if label:
                console().print(f"[bold]{label.replace('_', ' ')} expert[/]: {escape(shown(result.out))}")
            _print_text(result)

    summary = "; ".join(_outcome(r) for _, r in results)
    render(fmt, findings, document, text, summary=lambda: summary, file=str(out), title="nvdiag convert")
