"""`nvdiag roundtrip`: does each quantized layer decode to the model it was made from?"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from inspect_tools import cuda_driver
from inspect_tools.cli import app
from inspect_tools.cli.hints import PLAIN_FLOAT, check_glob, command, no_match, roundtrip_next
from inspect_tools.cli.output import (
    FORMAT_HELP,
    OutputFormat,
    console,
    exit_code,
    findings_document,
    print_records,
    render,
    table_width,
)
from inspect_tools.cli.output import format_number as _num
from inspect_tools.cli.terminal_text import shown
from inspect_tools.errors import UsageError
from inspect_tools.layers import CheckpointModel, open_model
from inspect_tools.output_paths import check_output_path
from inspect_tools.read_ahead import roundtrip_key, warm_roundtrip
from inspect_tools.readers import prefetch
from reference_specs.findings import Severity

if TYPE_CHECKING:  # the engine (and torch) is imported where it runs: other commands start without it
    from inspect_tools.roundtrip import RoundtripResult

CHECKPOINT_HELP = "The quantized checkpoint: .safetensors, sharded *.safetensors.index.json (or its folder), .gguf"
TEXT_ROWS = 30  # the text table shows the worst layers; --format json has all of them
HEATMAPS = 4

EPILOG = """Examples:

  nvdiag roundtrip wan_nvfp4.safetensors --against wan_fp16.safetensors

  nvdiag roundtrip model.safetensors --against model-Q4_0.gguf --sample 20 --report report.html

  nvdiag roundtrip model.safetensors --against diffusers/transformer/ --layers 'blocks.*.ffn.*' --format json
"""


def document(result: RoundtripResult, next_step: str | None = None) -> dict[str, Any]:
    """lint's findings schema plus "layers" (per-layer metrics, worst first) and "unmatched"; summary.next is the
    command that repairs what was found (null when nothing was)."""
    doc = findings_document(result.findings, len(result.checked), path=str(result.path),
                            against=str(result.ref_path))
    doc["summary"].update(result.summary())
    doc["summary"]["next"] = next_step
    doc["layers"] = [r.to_json() for r in result.layers]
    doc["unmatched"] = {
        "only_mine": [layer.name for layer in result.alignment.only_mine],
        "only_ref": [layer.name for layer in result.alignment.only_ref],
    }
    return doc


COLUMN_LEGEND = ("error: relative L2 error of the decoded weight against REF; expected: what a correct file of this "
                 "format gives against this REF; x: error / expected (a correct file gives about 1)")


def print_text(result: RoundtripResult, next_step: str | None = None) -> None:
    out = console()
    title = f"{shown(result.path.name)} against {shown(result.ref_path.name)} (worst first)"
    rows = []
    for r in result.layers[:TEXT_ROWS]:
        m = r.metrics
        status = (f"[bold red]{r.cause}[/]" if r.status in ("far-above", "non-finite")
                  else shown(r.note or r.status))
        rows.append([shown(r.name), r.format, _num(m.rel_error if m else None), _num(r.expected), _num(r.ratio, 3),
                     _num(m.snr_db if m else None, 3), status])
    # max abs error and cosine are in --format json; the text table keeps what fits an 80-column terminal
    header = ["layer", "format", "error", "expected", "x", "SNR dB", "status"]
    # a long status (a note on a skipped layer) may fold; a cause may not
    if table_width(header, [row[:-1] + [row[-1][:20]] for row in rows]) > out.width:
        # too narrow for the table: one record per layer, so that neither the name nor the cause is ever cut
        print_records(out, header, rows, title, lead=len(header) - 1)
    else:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        for column in header:
            wraps = column == "status"
            table.add_column(column, overflow="fold" if wraps else "ellipsis", no_wrap=not wraps,
                             min_width=12 if wraps else None)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    out.print(f"[dim]{COLUMN_LEGEND}[/]")
    hidden = len(result.layers) - TEXT_ROWS
    if hidden > 0:
        out.print(f"... {hidden} more layers within their expected error (--format json lists all)")
    only_mine, only_ref = result.alignment.only_mine, result.alignment.only_ref
    if only_mine or only_ref:
        out.print(f"unmatched: {len(only_mine)} layers of PATH, {len(only_ref)} of REF have no partner "
                  "(--format json lists them)")
    style = "bold red" if result.wrong or result.not_comparable or result.unreadable else "green"
    out.print(f"[{style}]{shown(result.verdict())}[/]")
    if next_step:
        # one unbroken line, however narrow the terminal: it is meant to be copied
        out.print(f"next: {shown(next_step)}", soft_wrap=True)


def next_step(result: RoundtripResult, mine: CheckpointModel, ref: CheckpointModel, path: str,
              against: str) -> str | None:
    """The command line that repairs what this roundtrip found, with the paths as the user gave them."""
    from converter.preset import builtin_names

    causes = {r.cause or "excess-error" for r in result.wrong}
    ref_is_float = all(layer.format.lower() in PLAIN_FLOAT for layer in ref.layers.values())
    variant = ref.detection.variant if ref.detection.family != "unknown" else mine.detection.variant
    preset = variant if variant in builtin_names() else "smart"
    return roundtrip_next(causes, path, against, ref_is_float, preset)


def nothing_compared(result: RoundtripResult, mine: CheckpointModel, ref: CheckpointModel,
                     layers: str | None, path: str, against: str) -> UsageError:
    """Why not one layer was compared, as the usage error it is (exit 2): swapped arguments, a glob that selects
    nothing, or two files with no layer in common."""
    def quantized(model: CheckpointModel) -> int:
        return sum(layer.is_quantized and layer.has("weight") for layer in model.layers.values())

    if quantized(mine) == 0 and quantized(ref) > 0:
        swapped = command("roundtrip", against, "--against", path)
        return UsageError(f"{result.path.name} has no quantized layer but --against {result.ref_path.name} has "
                          f"{quantized(ref)}: did you swap PATH and --against? ({swapped})")
    if quantized(mine) == 0:
        return UsageError(f"{result.path.name} has no quantized layer: nothing to roundtrip (nvdiag inspect shows "
                          "its formats)")
    if layers and result.quantized_pairs:
        names = [p.key for p in result.alignment.pairs if p.mine.is_quantized]
        return no_match(layers, result.path, names, "quantized layer")
    return UsageError(f"no quantized layer of {result.path.name} could be paired with a layer of "
                      f"{result.ref_path.name}: are they the same model? (nvdiag diff compares them by role)")


def _progress_bar() -> tuple[Progress | None, Any]:
    if not sys.stderr.isatty():
        return None, None
    bar = Progress(TextColumn("roundtrip"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                   TimeRemainingColumn(), TextColumn("{task.description}"), console=console(stderr=True),
                   transient=True)
    task = bar.add_task("", total=None)

    def update(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, description=name)

    return bar, update


@app.command("roundtrip", epilog=EPILOG)
def roundtrip_command(
    path: Annotated[str, typer.Argument(help=CHECKPOINT_HELP)],
    against: Annotated[str, typer.Option("--against", help="Reference: FP32/FP16/BF16 source (single, sharded, "
                                         "diffusers names), GGUF, or another quantized file of the same model")],
    layers: Annotated[str | None, typer.Option("--layers", help="Only layers matching this glob")] = None,
    sample: Annotated[int | None, typer.Option("--sample", help="Check N layers spread over the model")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
    report: Annotated[Path | None, typer.Option("--report", help="Write a self-contained HTML report here "
                                                "(needs matplotlib, the 'report' extra of nvdiag)")] = None,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 at or above: error, warning, info")] = "error",
) -> None:
    """Decode every quantized layer of PATH and measure it against REF; name the cause of layers that are wrong.

    Exit 0 when every layer is within its format's expected error, 1 on findings (a layer with NaN/Inf on either
    side is one) or when no pair could be measured, 2 on unreadable input or when nothing pairs at all.
    """
    check_glob(layers)
    try:
        threshold = Severity.parse(fail_on)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if report is not None:
        from inspect_tools.html_report import require_matplotlib

        require_matplotlib()  # fail before the long part, not after it
    with open_model(path) as mine, open_model(against) as ref:
        inputs = mine.reader.files + ref.reader.files
        if report is not None:
            check_output_path(report, inputs)  # refuse a report over an input now, not after the long part
        if layers is None and sample is None:  # every pair is read: start reading while torch is imported
            warm_roundtrip(mine, ref, roundtrip_key(path, against))
        cuda_driver.start_for(device)  # and CUDA's driver, on the GPU path
        from inspect_tools.roundtrip import roundtrip

        bar, update = _progress_bar()
        if bar is not None:
            bar.start()
        try:
            result = roundtrip(mine, ref, layers=layers, sample=sample, device=device,
                               heatmaps=HEATMAPS if report else 0, progress=update)
        finally:
            prefetch.stop()
            if bar is not None:
                bar.stop()
        if not result.checked and not result.layers:
            raise nothing_compared(result, mine, ref, layers, path, against)
        hint = next_step(result, mine, ref, path, against)
        if report is not None:
            from inspect_tools.html_report import panels, write_report

            write_report(result, report, inputs, panels(result, mine, ref))
    def text() -> None:
        print_text(result, hint)
        if report is not None:
            console().print(f"report: {report}")

    render(fmt, result.findings, lambda: document(result, hint), text, file=path, title="nvdiag roundtrip",
           summary=lambda: result.verdict() + (f"; next: {hint}" if hint else ""))
    skipped_all = not result.checked and not result.not_comparable  # every pair skipped: no evidence either way
    raise typer.Exit(max(exit_code(result.findings, threshold), 1 if skipped_all else 0))
