"""`nvdiag diff MINE REF`: two checkpoints side by side, what differs and whether ComfyUI cares."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from inspect_tools.cli import app
from inspect_tools.cli.hints import check_glob, command, display, no_match
from inspect_tools.cli.output import (
    FORMAT_HELP,
    OutputFormat,
    compact_findings_table,
    console,
    exit_code,
    findings_document,
    render,
    verdict,
)
from inspect_tools.cli.terminal_text import shown
from inspect_tools.errors import UsageError
from reference_specs.findings import Severity

if TYPE_CHECKING:  # the engine (and torch) is imported where it runs: other commands start without it
    from inspect_tools.diff import DiffReport
    from inspect_tools.diff.scale_stats import ScaleStats

CHECKPOINT_HELP = "A .safetensors file, a sharded *.safetensors.index.json (or its folder), or a .gguf"
# Text tables stop after this many rows; --format json has everything.
MAX_ROWS = 40
HISTOGRAM_BARS = " ▁▂▃▄▅▆▇█"
# A difference usually repeats over every quantized layer: a few examples per rule, the rest counted.
FINDINGS_PER_RULE = 3
VALUES_TITLE = "dequantized values, MINE vs REF"


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isinf(x)) else f"{x:.3g}"


def histogram(stats: ScaleStats, decades: range) -> str:
    """One character per power of ten, height proportional to the share of values in it."""
    counts = stats.decades()
    top = max(counts.values(), default=0)
    if not top:
        return ""
    chars = []
    for d in decades:
        c = counts.get(d, 0)
        chars.append(HISTOGRAM_BARS[0] if c == 0 else HISTOGRAM_BARS[max(1, round(c / top * 8))])
    return "".join(chars)


def _limited(rows: list[Any], out: Console, what: str) -> list[Any]:
    if len(rows) > MAX_ROWS:
        out.print(f"[dim]{what}: showing {MAX_ROWS} of {len(rows)} (--layers GLOB to narrow, --format json for all)[/]")
        return rows[:MAX_ROWS]
    return rows


def _print_findings(report: DiffReport, out: Console) -> None:
    if not report.findings:
        out.print("[green]no findings[/]")
        return
    for severity, title in ((Severity.ERROR, "errors"), (Severity.WARNING, "warnings"), (Severity.INFO, "info")):
        group = [f for f in report.findings if f.severity == severity]
        if group:
            out.print(f"[bold]{title}[/]")
            out.print(compact_findings_table(group, limit_per_rule=FINDINGS_PER_RULE))


def _precision_table(report: DiffReport) -> Table:
    table = Table(title="precision plan (layers)")
    table.add_column("stored as")
    table.add_column("MINE", justify="right")
    table.add_column("REF", justify="right")
    for cls in sorted(set(report.precision["mine"]) | set(report.precision["ref"])):
        table.add_row(cls, str(report.precision["mine"].get(cls, 0)), str(report.precision["ref"].get(cls, 0)))
    mine_compute, ref_compute = report.compute.get("mine", {}), report.compute.get("ref", {})
    paths = list(mine_compute) + [p for p in ref_compute if p not in mine_compute]
    for path in paths:
        # a split of the quantized row above: W4A16 layers are the ones kept out of 4-bit activations on Blackwell
        table.add_row(f"  computed {path} on Blackwell", str(mine_compute.get(path, 0)), str(ref_compute.get(path, 0)))
    return table


def _signature_table(report: DiffReport) -> Table:
    table = Table(title="aux-tensor signatures of quantized layers")
    table.add_column("side", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("layers", justify="right")
    table.add_column("signature", overflow="fold")
    for side in ("mine", "ref"):
        for fmt, sigs in report.signatures[side].items():
            for sig, n in sigs.items():
                table.add_row(side.upper(), fmt, str(n), sig)
    return table


def _scales_table(report: DiffReport) -> Table | None:
    kinds = sorted(set(report.scales["mine"]) | set(report.scales["ref"]))
    if not kinds:
        return None
    every = [report.scales[s][k] for s in ("mine", "ref") for k in kinds if k in report.scales[s]]
    lows = [min(st.decades()) for st in every if st.count]
    highs = [max(st.decades()) for st in every if st.count]
    decades = range(min(lows), max(highs) + 1) if lows else range(0)
    title = "scale distributions" + (f" (histogram 1e{decades.start}..1e{decades.stop - 1})" if lows else "")
    table = Table(title=title)
    for name, justify in (("scale", "left"), ("side", "left"), ("n", "right"), ("min", "right"),
                          ("median", "right"), ("max", "right"), ("histogram", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for kind in kinds:
        for side in ("mine", "ref"):
            st = report.scales[side].get(kind)
            if st is None:
                continue
            table.add_row(kind, side.upper(), str(st.count), _fmt(st.min if st.count else None), _fmt(st.median),
                          _fmt(st.max if st.count else None), histogram(st, decades))
    return table


def _metadata_table(report: DiffReport) -> Table | None:
    if not report.metadata:
        return None
    table = Table(title="header metadata")
    table.add_column("key", overflow="fold")
    table.add_column("MINE", overflow="fold")
    table.add_column("REF", overflow="fold")
    for row in report.metadata:
        style = "" if row["same"] else "[yellow]"
        table.add_row(f"{style}{shown(row['key'])}", shown(row["mine"] or "-"), shown(row["ref"] or "-"))
    return table


def _roles_table(report: DiffReport) -> Table | None:
    if report.roles is None:
        return None
    table = Table(title="layers by role (different architectures)")
    table.add_column("role", no_wrap=True)
    table.add_column("MINE", overflow="fold")
    table.add_column("REF", overflow="fold")

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "-"
        return f"{row['layers']}: " + ", ".join(f"{k} {v}" for k, v in sorted(row["formats"].items()))

    for role in sorted(set(report.roles["mine"]) | set(report.roles["ref"])):
        table.add_row(role, cell(report.roles["mine"].get(role)), cell(report.roles["ref"].get(role)))
    return table


def _layers_table(report: DiffReport, out: Console) -> Table | None:
    """Layers that differ, rows with the same difference folded into one: "blocks.0.ffn.0 and 19 more"."""
    groups = report.differing_layers()
    if not groups:
        return None
    table = Table(title="layers that differ")
    table.add_column("layer", overflow="fold")
    table.add_column("MINE", overflow="fold")
    table.add_column("REF", overflow="fold")
    table.add_column("difference", overflow="fold")
    rows = [(shown(names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else ""), _cell(mine), _cell(ref), what)
            for names, mine, ref, what in groups]
    for row in _limited(rows, out, "layer groups"):
        table.add_row(*row)
    return table


def _cell(storage: str | None) -> str:
    return "[red]absent[/]" if storage is None else storage


def _values_table(report: DiffReport, out: Console) -> Table | None:
    """roundtrip's per-layer rows (inspect_tools.roundtrip.LayerResult.to_json), worst first."""
    if not report.values:
        return None
    table = Table(title=VALUES_TITLE)
    table.add_column("layer", overflow="fold")
    table.add_column("formats", no_wrap=True)
    table.add_column("rel err", justify="right")
    table.add_column("expected", justify="right")
    table.add_column("verdict", overflow="fold")
    rows = sorted(report.values, key=lambda r: -(r.get("rel_error") or 0.0))
    for row in _limited(rows, out, "value rows"):
        said = row.get("cause") or row.get("status", "")
        if row.get("note") and row.get("status") != "ok":
            said = f"{said}: {row['note']}"
        table.add_row(shown(row.get("key") or row["layer"]), f"{row.get('format', '?')}/{row.get('ref_format', '?')}",
                      _fmt(row.get("rel_error")), _fmt(row.get("expected")), shown(said))
    return table


def print_report(report: DiffReport, out: Console | None = None, fail_on: Severity = Severity.ERROR) -> None:
    out = out or console()
    out.print(shown(report.summary_text()), soft_wrap=True)
    out.print()
    _print_findings(report, out)
    for role_verdict in report.verdicts:
        out.print(f"[dim]{role_verdict['text']}: {role_verdict['verdict']}[/]", soft_wrap=True)
    for table in (
        _precision_table(report),
        _signature_table(report),
        _roles_table(report),
        _scales_table(report),
        _metadata_table(report),
        _layers_table(report, out),
        _values_table(report, out),
    ):
        if table is not None and table.row_count:
            out.print(table)
            if table.title == VALUES_TITLE:
                out.print("[dim]rel err: relative L2 error of MINE's decoded weight against REF's; expected: what a "
                          "correct file of MINE's format gives against REF[/]")
    if report.disagreements:
        out.print(f"{len(report.disagreements)} layers are stored at a different precision (see 'layers that differ').")
    if report.values_skipped:
        out.print(f"[bold yellow]values not compared ({shown(report.values_skipped)}):[/] headers alone cannot see "
                  "nibble order, stale scales or transposed layers; run:")
        out.print(f"  {shown(command('roundtrip', display(report.mine.path), '--against', display(report.ref.path)))}",
                  soft_wrap=True)
    line = verdict(report.findings, fail_on, layers=len(report.pairs))
    out.print(line + (" [yellow](headers only)[/]" if report.values_skipped else ""))


def diff_document(report: DiffReport) -> dict[str, Any]:
    """The JSON document: lint finding schema plus the diff's sections and its paired `layers` rows."""
    data = report.to_json()
    rows = data.pop("rows")
    doc = findings_document(report.findings, layers=len(rows), **data)
    doc["layers"] = rows
    return doc


@app.command("diff")
def diff_command(
    mine: Annotated[str, typer.Argument(help="The checkpoint under suspicion. " + CHECKPOINT_HELP)],
    ref: Annotated[str, typer.Argument(help="A checkpoint that works (any format, naming or architecture)")],
    layers: Annotated[str | None, typer.Option("--layers", help="Only layers matching this glob")] = None,
    values: Annotated[bool, typer.Option("--values/--no-values", help="Compare dequantized weights of matched "
                                         "quantized layers (reads them; on by default: headers alone miss noise)")]
    = True,
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
    fail_on: Annotated[str, typer.Option("--fail-on", help="error, warning or info")] = "error",
) -> None:
    """Put two checkpoints side by side and say what differs and whether it matters to ComfyUI.

    Per layer: format, dtypes, shapes, aux tensors (input_scale, comfy_quant, scales), precision plan.

    Per file: signature counts, scale ranges, header metadata, naming scheme.

    Layers are matched across prefixes and diffusers / ComfyUI names, or by role across architectures.

    Exit 0 when nothing breaks MINE in ComfyUI, 1 when something does (--fail-on), 2 on unreadable input.

    Examples:

      nvdiag diff wan22_5b_nvfp4.safetensors flux1-dev-nvfp4.safetensors

      nvdiag diff mine.safetensors wan2.2_ti2v_5B-Q4_0.gguf --layers 'blocks.0.*' --values

      nvdiag diff mine.safetensors ./diffusers/transformer/ --format json > diff.json
    """
    from inspect_tools.diff import diff_paths

    check_glob(layers)
    try:
        threshold = Severity.parse(fail_on)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    report = diff_paths(mine, ref, layers=layers, values=values)
    if layers is not None and not report.pairs:
        raise no_match(layers, mine, report.mine.layers, "layer")
    render(fmt, report.findings, lambda: diff_document(report), lambda: print_report(report, fail_on=threshold),
           summary=report.summary_text, file=str(report.mine.path), title="nvdiag diff")
    raise typer.Exit(exit_code(report.findings, threshold))


__all__ = ["diff_command", "diff_document", "print_report"]
