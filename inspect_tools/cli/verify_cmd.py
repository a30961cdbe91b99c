"""`nvdiag verify`: load the file in ComfyUI itself and measure what it renders, against a reference."""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from inspect_tools.cli import app
from inspect_tools.cli.output import (
    FORMAT_HELP,
    OutputFormat,
    compact_findings_table,
    console,
    exit_code,
    findings_document,
    render,
    rule_legend,
)
from inspect_tools.cli.output import format_number as _num
from inspect_tools.errors import UsageError
from inspect_tools.layers import open_model
from reference_specs.findings import Severity

if TYPE_CHECKING:  # torch and ComfyUI are imported where the command runs
    from inspect_tools.comfyui.loading import LoadReport
    from inspect_tools.comfyui.verify import VerifyResult

EPILOG = """Examples:

  nvdiag verify wan_nvfp4.safetensors --against wan_fp16.safetensors --comfyui ~/ComfyUI

  COMFYUI_PATH=~/ComfyUI nvdiag verify model.safetensors --against model-Q4_0.gguf --compute both

  nvdiag verify model.safetensors --against diffusers/transformer/ --steps 5 --seed 1 --format json
"""
BLOCK_COLUMNS = 8  # per-block errors shown in text; --format json has all of them


class Compute(str, Enum):
    w4a16 = "w4a16"
    w4a4 = "w4a4"
    both = "both"


def compute_paths(choice: Compute) -> tuple[str, ...]:
    return ("w4a16", "w4a4") if choice == Compute.both else (choice.value,)


def document(result: VerifyResult) -> dict[str, Any]:
    doc = findings_document(result.findings, None, path=str(result.path), against=str(result.ref_path))
    doc["summary"].update(result.summary())
    doc.update(result.to_json())
    return doc


def _describe_load(report: LoadReport) -> str:
    if not report.loaded:
        return f"[bold red]refused[/]: {escape(str(report.error_type))}: {escape(str(report.error))}"
    cfg = report.config
    dims = ", ".join(f"{k} {cfg[k]}" for k in ("dim", "num_layers", "in_dim", "out_dim", "in_channels", "model_type")
                     if k in cfg)
    quantized = ", ".join(f"{fmt} {n}" for fmt, n in report.quantized.items()) or "none"
    w4a16 = f" ({len(report.full_precision_mm)} marked full_precision_matrix_mult)" if report.full_precision_mm else ""
    return (f"{report.model_class} / {report.config_class} ({dims}); weights {report.weight_dtype}, compute "
            f"{report.compute_dtype}; quantized Linear layers: {quantized}{w4a16}; plain Linear layers: "
            f"{report.plain_linear}")


def print_text(result: VerifyResult) -> None:
    out = console()
    rt = result.runtime
    out.print(f"ComfyUI {rt.version} at {escape(str(rt.root))}, device {rt.device}; "
              f"{result.steps} noise levels (sigma {', '.join(f'{s:.3g}' for s in result.sigmas)}), seed {result.seed}"
              + ("" if result.pieces == 1 else f"; models loaded block by block in {result.pieces} pieces"))
    out.print(f"[bold]file[/]      {escape(result.path.name)}: {_describe_load(result.file_report)}")
    out.print(f"[bold]reference[/] {escape(result.ref_path.name)}: {_describe_load(result.ref_report)}")
    out.print(f"[bold]baseline[/]  {escape(result.baseline_note)}")
    for label, keys in (("left-over keys", result.file_report.left_over),
                        ("missing keys", result.file_report.missing),
                        ("unexpected keys", result.file_report.unexpected)):
        if keys:
            out.print(f"{label}: {len(keys)} (first: {escape(keys[0])})")
    for line in result.file_report.warnings[:5]:
        out.print(f"[yellow]ComfyUI warned[/]: {escape(line)}")
    if result.paths:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="output of apply_model against the reference")
        for column in ("compute", "file error", "expected", "x", "cos min", "PSNR dB", "first wrong block"):
            table.add_column(column, no_wrap=True)
        for p in result.paths:
            ratio = p.ratio
            style = "bold red" if p.far else "green"
            table.add_row(p.compute, _num(p.file.error), _num(p.expected),
                          f"[{style}]{_num(ratio, 3)}[/]", _num(min(p.file.cosine)), _num(min(p.file.psnr_db), 3),
                          p.first_wrong_block(result.block_names) or "-")
        out.print(table)
        out.print("[dim]error: relative L2 of the denoiser output against the reference's; expected: the same for "
                  "the reference encoded into this file's formats by comfy-kitchen (what a correct file gives); "
                  "x: error / expected[/]")
        for p in result.paths:
            cells = []
            for name, mine, base in list(zip(result.block_names, p.file.blocks,
                                              p.baseline.blocks if p.baseline else [None] * len(p.file.blocks),
                                              strict=False))[:BLOCK_COLUMNS]:
                ratio = f" x{mine / max(base, 1e-6):.2f}" if base is not None and math.isfinite(mine) else ""
                cells.append(f"{name} {_num(mine, 3)}{ratio}")
            more = len(p.file.blocks) - BLOCK_COLUMNS
            tail = f" ... {more} more (--format json)" if more > 0 else ""
            out.print(f"per block ({p.compute}): {'; '.join(cells)}{tail}")
    if result.findings:
        out.print(compact_findings_table(result.findings))
        for line in rule_legend(result.findings):
            out.print(line)
    style = "bold red" if exit_code(result.findings) else "green"
    out.print(f"[{style}]{escape(result.verdict())}[/]")


@app.command("verify", epilog=EPILOG)
def verify_command(
    path: Annotated[str, typer.Argument(help="The file to check: one .safetensors file, as ComfyUI's Load Diffusion "
                                        "Model node reads it")],
    against: Annotated[str, typer.Option("--against", help="Reference: FP32/FP16/BF16, FP8 scaled, legacy "
                                         "scaled_fp8 or NVFP4 safetensors, a GGUF file, or a (sharded) diffusers "
                                         "source")],
    comfyui: Annotated[str | None, typer.Option("--comfyui", help="ComfyUI folder (holds comfy/ and main.py); "
                                                "default: $COMFYUI_PATH, else an importable comfy package")] = None,
    compute: Annotated[Compute, typer.Option("--compute", help="w4a16 (CPU and GPUs before Blackwell: weights "
                                             "dequantized), w4a4 (Blackwell emulated: activations quantized too), "
                                             "or both")] = Compute.w4a16,
    steps: Annotated[int, typer.Option("--steps", help="Noise levels to run, spread over the schedule")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic latents and text context")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    blocks_at_once: Annotated[int | None, typer.Option("--blocks-at-once", min=1, help="Load the models this many "
                                                       "transformer blocks at a time (default: the whole model when "
                                                       "it fits in half the free memory, else as many as fit)")] = None,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Also decode every quantized layer against "
                                         "REF (nvdiag roundtrip), which finds faults the output on synthetic inputs "
                                         "hides")] = True,
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 at or above: error, warning, info")] = "error",
) -> None:
    """Load PATH and REF with ComfyUI's own loader, run both denoisers and compare what they render.

    Reports what ComfyUI made of the file (model class and config, quantized layers, left-over keys, warnings, or the
    error it raised), the output error per noise level and per transformer block against a correct file of the same
    layer selection, and the cause where the file renders wrongly. A model too big for memory (a 14B model computes
    in FP32 on the CPU: 56 GB) is loaded and run a few blocks at a time, the hidden state carried from piece to
    piece: the same computation, bounded memory. Exit 0 when it renders as a correct file does,
    1 on findings, 2 when ComfyUI or an input cannot be used.
    """
    from inspect_tools.comfyui.runtime import load_runtime
    from inspect_tools.comfyui.verify import verify

    try:
        threshold = Severity.parse(fail_on)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    runtime = load_runtime(comfyui, device=device)
    status = console(stderr=True).status("verify") if sys.stderr.isatty() else nullcontext()
    with open_model(path) as mine, open_model(against) as ref, status as spinner:
        def progress(message: str) -> None:
            if spinner is not None:
                spinner.update(f"verify: {message}")

        result = verify(runtime, mine, ref, compute=compute_paths(compute), steps=steps, seed=seed,
                        progress=progress, blocks_at_once=blocks_at_once, decode=decode)
    render(fmt, result.findings, lambda: document(result), lambda: print_text(result), summary=result.verdict,
           file=path, title="nvdiag verify")
    raise typer.Exit(exit_code(result.findings, threshold))
