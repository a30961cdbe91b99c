"""`nvdiag sensitivity` and `nvdiag calibrate`: per-layer W4A4 risk and static input scales, measured in ComfyUI."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from inspect_tools.cli import app
from inspect_tools.cli.output import FORMAT_HELP, OutputFormat, console, render
from inspect_tools.errors import OutputError, UsageError
from inspect_tools.layers import open_model
from inspect_tools.output_paths import check_output_path

if TYPE_CHECKING:
    from inspect_tools.comfyui.sensitivity import SensitivityResult

TEXT_ROWS = 25
SOURCE_HELP = "The full-precision source: FP32/FP16/BF16 .safetensors, sharded index.json or folder, or GGUF"
COMFYUI_HELP = "ComfyUI folder (holds comfy/ and main.py); default: $COMFYUI_PATH, else an importable comfy package"

ACTIVATIONS_HELP = ("Measure on activations you captured (real prompts and sampler) instead of running SRC on "
                    "synthetic inputs: a .safetensors with, per layer, <layer> float rows [N, in_features] (the "
                    "layer's inputs, a few hundred tokens) and optionally <layer>.amax [calls], each call's amax")
SAVE_HELP = ("Also write what this run captured here, in the format --activations reads (float32 rows and per-call "
             "maxima per layer; a few hundred rows a layer, at most 4 GiB): capture once, measure again without the "
             "model run")
REPORT_HELP = ("Write an HTML page here: per-block heatmaps of the W4A16 and W4A4 error on one colour scale, "
               "and every layer (needs matplotlib)")
SENSITIVITY_EPILOG = """Examples:

  nvdiag sensitivity wan_ti2v_fp16.safetensors --comfyui ~/ComfyUI -o sensitivity.json

  nvdiag sensitivity diffusers/transformer/ --steps 4 --prompts 3 --format json

  nvdiag sensitivity wan_ti2v_fp16.safetensors --activations captured.safetensors --report sensitivity.html

  nvdiag sensitivity wan_ti2v_fp16.safetensors --device cuda --save-activations acts.safetensors
  nvdiag sensitivity wan_ti2v_fp16.safetensors --activations acts.safetensors -o sensitivity.json

  nvdiag preset from-sensitivity sensitivity.json -o policy.toml
"""
CALIBRATE_EPILOG = """Examples:

  nvdiag calibrate wan_ti2v_fp16.safetensors -o input_scales.json

  nvdiag convert src/ out.safetensors --preset wan2.2-ti2v-5b --input-scales input_scales.json
"""


def _run(src: str, comfyui: str | None, device: str, steps: int, prompts: int, seed: int,
         blocks_at_once: int | None, activations: Path | None = None, save: Path | None = None,
         force: bool = False) -> SensitivityResult:
    from inspect_tools.comfyui import sensitivity as sens
    from inspect_tools.comfyui.runtime import load_runtime

    if activations is not None and save is not None:
        raise UsageError("--save-activations writes what a model run captures; with --activations nothing is run "
                         "(the file you give is the capture already)")
    if save is not None:
        with open_model(src) as model:
            sens.check_saved_size(model, steps, prompts)  # before minutes of running, not after
    runtime = load_runtime(comfyui, device=device)
    if activations is not None:
        with open_model(src) as model:
            return sens.sensitivity_from_activations(runtime, model, str(activations))
    status = console(stderr=True).status("sensitivity") if sys.stderr.isatty() else nullcontext()
    keep: dict[str, sens.Capture] | None = {} if save is not None else None
    with open_model(src) as model, status as spinner:
        def progress(message: str) -> None:
            if spinner is not None:
                spinner.update(message)

        result = sens.sensitivity(runtime, model, steps=steps, prompts=prompts, seed=seed, progress=progress,
                                  blocks_at_once=blocks_at_once, keep=keep)
    if save is not None and keep is not None:
        # a file that appeared while measuring is not overwritten without --force
        sens.save_activations(save, keep, src, steps, prompts, seed, overwrite=force)
    return result


def _check_outputs(paths: list[Path | None], src: str, force: bool) -> None:
    """Refuse an output that is an input, or exists without --force, before any measuring."""
    wanted = [path for path in paths if path is not None]
    if not wanted:
        return
    if len({path.resolve() for path in wanted}) < len(wanted):
        raise UsageError("the same path is given for two outputs")
    with open_model(src) as model:
        inputs = list(model.reader.files)
    for path in wanted:
        check_output_path(path, inputs)
        if path.exists() and not force:
            raise OutputError("exists; pass --force to overwrite it", str(path))


def _write(path: Path, text: str, force: bool) -> None:
    """Write atomically; a file that appeared while measuring is not overwritten without --force."""
    from inspect_tools.writer import atomic_write_text

    if path.exists() and not force:
        raise OutputError("exists; pass --force to overwrite it", str(path))
    atomic_write_text(path, text)


def print_text(result: SensitivityResult) -> None:
    from inspect_tools.comfyui.sensitivity import RISKY

    out = console()
    out.print(f"{escape(Path(result.source).name)}: {result.architecture}, {len(result.layers)} quantizable layers, "
              f"{result.describe_inputs()}"
              + ("" if result.pieces == 1 else f", block by block in {result.pieces} pieces"))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="output error per layer against full precision "
                  "(most at risk on Blackwell first)")
    for column in ("layer", "w4a16", "w4a4 dyn", "w4a4 static", "fp8", "risk"):
        table.add_column(column, no_wrap=column != "layer", overflow="fold")
    for layer in result.layers[:TEXT_ROWS]:
        if not layer.measured:
            table.add_row(escape(layer.layer), "-", "-", "-", "-", "[yellow]not measurable[/]")
            continue
        style = "bold red" if layer.risk > RISKY else ""
        risk = f"[{style}]{layer.risk:.2f}[/]" if style else f"{layer.risk:.2f}"
        table.add_row(escape(layer.layer), f"{layer.w4a16:.4g}", f"{layer.w4a4_dynamic:.4g}",
                      f"{layer.w4a4_static:.4g}", f"{layer.fp8:.4g}", risk)
    out.print(table)
    hidden = len(result.layers) - TEXT_ROWS
    if hidden > 0:
        out.print(f"... {hidden} more layers (--format json or -o lists all)")
    risky = [layer for layer in result.layers if layer.risk > RISKY]
    out.print("[dim]risk = w4a4 dyn / w4a16; about 1.4 when activations quantize as well as weights[/]")
    if result.advice():
        out.print(f"[yellow]{escape(result.advice())}[/]")
    if risky:
        out.print(f"[bold]{len(risky)} layer(s) at risk under W4A4[/] (risk > {RISKY:g}): mark them "
                  "full_precision_matrix_mult, give them a calibrated input_scale, or keep them at FP8/16-bit "
                  "(nvdiag preset from-sensitivity REPORT.json)")
    else:
        out.print("[green]no layer is far worse under W4A4 than under W4A16 on these inputs[/]")


@app.command("sensitivity", epilog=SENSITIVITY_EPILOG)
def sensitivity_command(
    src: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    comfyui: Annotated[str | None, typer.Option("--comfyui", help=COMFYUI_HELP)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Noise levels, spread over the schedule")] = 3,
    prompts: Annotated[int, typer.Option("--prompts", help="Synthetic text contexts (seeded) per noise level")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the latents and text contexts")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    blocks_at_once: Annotated[int | None, typer.Option("--blocks-at-once", min=1, help="Load the source this many "
                                                       "blocks at a time (default: as many as fit)")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the report (JSON) here")] = None,
    activations: Annotated[Path | None, typer.Option("--activations", help=ACTIVATIONS_HELP)] = None,
    save_activations: Annotated[Path | None, typer.Option("--save-activations", help=SAVE_HELP)] = None,
    report: Annotated[Path | None, typer.Option("--report", help=REPORT_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report")] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
) -> None:
    """Which layers survive 4-bit activations (W4A4, Blackwell)? Runs SRC through ComfyUI and measures per layer.

    Each quantizable Linear layer's inputs are captured (bounded: a few hundred rows per layer, block by block for
    big models) and its output error measured for NVFP4 W4A16, NVFP4 W4A4 with a dynamic and with a calibrated
    static input scale, and FP8, against full precision. The report feeds `nvdiag preset from-sensitivity`.
    Exit 0, or 2 when ComfyUI or the source cannot be used.
    """
    if report is not None:
        from inspect_tools.html_report import require_matplotlib

        require_matplotlib()  # before minutes of measuring, not after
    _check_outputs([output, report, save_activations], src, force)
    result = _run(src, comfyui, device, steps, prompts, seed, blocks_at_once, activations, save_activations, force)
    doc = result.to_json()
    if output is not None:
        _write(output, json.dumps(doc, indent=2) + "\n", force)
    if report is not None:
        from inspect_tools.comfyui.sensitivity import RISKY
        from inspect_tools.sensitivity_report import render as render_html

        _write(report, render_html(result, RISKY), force)

    def text() -> None:
        print_text(result)
        for path in (output, report, save_activations):
            if path is not None:
                console().print(f"wrote {escape(str(path))}")

    render(fmt, [], lambda: doc, text, summary=lambda: _risk_summary(result), file=src, title="nvdiag sensitivity")


def _risk_summary(result: SensitivityResult) -> str:
    from inspect_tools.comfyui.sensitivity import RISKY

    risky = [layer.layer for layer in result.layers if layer.risk > RISKY]
    lost = len(result.not_measurable())
    return (f"{len(result.layers) - lost} quantizable layers measured; {len(risky)} at risk under W4A4 "
            f"(risk > {RISKY:g})" + (f": {', '.join(risky[:8])}" + (" ..." if len(risky) > 8 else "") if risky else "")
            + (f"; {result.advice()}" if lost else ""))


@app.command("calibrate", epilog=CALIBRATE_EPILOG)
def calibrate_command(
    src: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write {layer: input_scale} JSON")],
    comfyui: Annotated[str | None, typer.Option("--comfyui", help=COMFYUI_HELP)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Noise levels, spread over the schedule")] = 3,
    prompts: Annotated[int, typer.Option("--prompts", help="Synthetic text contexts (seeded) per noise level")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the latents and text contexts")] = 0,
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile of the per-call activation maxima "
                                              "(100: the largest seen, nothing seen is clipped)")] = 100.0,
    margin: Annotated[float, typer.Option("--margin", help="Headroom above it for inputs calibration did not see "
                                          "(1.25 costs a third of a bit of the FP8 block scales' range)")] = 1.25,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    blocks_at_once: Annotated[int | None, typer.Option("--blocks-at-once", min=1, help="Load the source this many "
                                                       "blocks at a time (default: as many as fit)")] = None,
    activations: Annotated[Path | None, typer.Option("--activations", help=ACTIVATIONS_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUTPUT")] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
) -> None:
    """Static input_scale per quantizable layer (amax/2688 of its activations in ComfyUI), for convert.

    The JSON is what `nvdiag convert --input-scales` takes. A static scale replaces ComfyUI's dynamic per-call scale
    on Blackwell: activations above the calibrated maximum are clipped there, so the default takes the largest
    maximum seen, with headroom. Without input_scale ComfyUI scales dynamically, which is always safe.
    """
    from inspect_tools.comfyui.sensitivity import input_scales, uncalibrated

    _check_outputs([output], src, force)
    result = _run(src, comfyui, device, steps, prompts, seed, blocks_at_once, activations)
    scales = input_scales(result, percentile=percentile, margin=margin)
    _write(output, json.dumps(scales, indent=2) + "\n", force)
    dynamic = uncalibrated(result)
    said = (f"wrote {output}: {len(scales)} input scales (percentile {percentile:g}, margin {margin:g}) from "
            f"{result.describe_inputs()}"
            + (f"; {len(dynamic)} layer(s) left dynamic, their activations were not finite ({', '.join(dynamic[:5])}"
               + (" ...)" if len(dynamic) > 5 else ")") if dynamic else ""))
    render(fmt, [], lambda: {"version": 1, "output": str(output), "percentile": percentile, "margin": margin,
                             "input_scales": scales, "left_dynamic": dynamic},
           lambda: console().print(escape(said)), summary=lambda: said, file=src, title="nvdiag calibrate")
