"""`nvdiag fix`: repair a silently broken NVFP4 file losslessly, when the cause is certain."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from converter.fix import FIXABLE, FixResult, fix_checkpoint, parse_only
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

# Layers named per cause in the text plan before "... and N more".
SHOWN_LAYERS = 6


def fix_document(result: FixResult) -> dict:
    """The JSON document: findings of BROKEN, the plan, and what the gate said about the written file."""
    return findings_document(
        result.findings,
        command="fix",
        source=str(result.plan.source),
        out=str(result.out),
        dry_run=result.dry_run,
        written=result.written,
        plan=result.plan.to_json(),
        gate=[f.to_json() for f in result.gate_findings],
        verdict=result.verdict(),
        exit_code=result.exit_code,
    )


def _print_text(result: FixResult) -> None:
    out = console()
    plan = result.plan
    if plan.repairs:
        table = Table(title="repairs" + (" (dry run: nothing written)" if result.dry_run else ""))
        table.add_column("cause", no_wrap=True)
        table.add_column("layers", justify="right")
        table.add_column("what changes", overflow="fold")
        for cause, repairs in plan.by_cause().items():
            names = [r.layer or "(file)" for r in repairs]
            listed = ", ".join(names[:SHOWN_LAYERS]) + (f" ... and {len(names) - SHOWN_LAYERS} more"
                                                         if len(names) > SHOWN_LAYERS else "")
            detail = shown(f"{FIXABLE[cause]}: {listed}; e.g. {repairs[0].change}")
            if not all(r.exact for r in repairs):
                detail += " [not bit-exact for some layers: see provenance]"
            table.add_row(cause, str(len(repairs)), detail)
        out.print(table)
    if plan.unfixable or plan.skipped:
        table = Table(title="not fixable here")
        table.add_column("severity", no_wrap=True)
        table.add_column("cause", no_wrap=True)
        table.add_column("layer", overflow="fold")
        table.add_column("why / what to do", overflow="fold")
        groups: dict[tuple, list[str]] = {}
        for u in plan.unfixable:  # one row per cause and reason: a 400-layer model stays readable
            key = (str(u.finding.severity), u.finding.cause, f"{u.reason}; {u.remedy}")
            groups.setdefault(key, []).append(u.finding.layer or "(file)")
        for (severity, cause, why), names in groups.items():
            listed = ", ".join(names[:SHOWN_LAYERS]) + (f" ... and {len(names) - SHOWN_LAYERS} more"
                                                         if len(names) > SHOWN_LAYERS else "")
            table.add_row(severity, cause, shown(listed), shown(why))
        for f in plan.skipped:
            table.add_row(str(f.severity), f.cause, shown(f.layer or "-"), "excluded by --only")
        out.print(table)
    if result.gate_findings and result.refused:
        print_findings_text(result.gate_findings, title="gate findings on the repaired file", out=out)
    style = "red" if result.exit_code else "green"
    out.print(f"[{style}]{escape(result.verdict())}[/]", soft_wrap=True)


@app.command("fix")
def fix_command(
    broken: Annotated[str, typer.Argument(help="The broken checkpoint (never modified)")],
    out: Annotated[str, typer.Argument(help="Where to write the repaired .safetensors file")],
    against: Annotated[str | None, typer.Option("--against", help="A reference checkpoint to roundtrip against "
                                                 "(finds value-level causes; the repaired file must pass it too)")]
    = None,
    only: Annotated[str | None, typer.Option("--only", help="Comma list of causes to repair: "
                                              + ", ".join(FIXABLE))] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT")] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
    verify: Annotated[bool, typer.Option("--verify", help="Also load and run the repaired file in ComfyUI before "
                                         "publishing: against --against when given (nvdiag verify), else only that "
                                         "ComfyUI loads and runs it")] = False,
    comfyui: Annotated[str | None, typer.Option("--comfyui", help="ComfyUI folder for --verify (default: "
                                                "$COMFYUI_PATH, else an importable comfy package)")] = None,
) -> None:
    """Repair a silently broken NVFP4/FP8 file losslessly, when the cause is certain.

    Remedies: re-swizzle block scales, swap nibbles, invert a reciprocal per-tensor scale, rename diffusers keys,
    add missing markers, fix metadata prefixes, drop weight-derived input scales, re-store scales in their required
    dtype. Everything else is listed with the reason and what to do instead.

    OUT is written through a temporary file and published only when it lints clean (and roundtrips clean
    against --against). Exit codes: 0 written and clean, or nothing to repair (no file written), or a dry run whose
    plan can be carried out; 1 error findings that cannot be repaired (nothing written), the repaired file
    failed the gate, or value repairs (layout, nibbles, reciprocal scale) were written without --against, so
    nothing verified that the file now decodes right (the verdict says NOT VERIFIED and how to check); 2
    unreadable input or a refused OUT.

    Examples:

      nvdiag fix broken.safetensors fixed.safetensors --dry-run

      nvdiag fix broken.safetensors fixed.safetensors --against wan2.2_ti2v_5B_fp16.safetensors

      nvdiag fix broken.safetensors fixed.safetensors --only nibble-order,scale-layout-linear --format json
    """
    check_safetensors_out(out)
    extra_gate = None
    if verify and not dry_run:
        from inspect_tools.comfyui.gate import comfyui_gate
        from inspect_tools.comfyui.runtime import load_runtime

        extra_gate = comfyui_gate(load_runtime(comfyui), against)  # no ComfyUI: exit 2 before any work
    result = fix_checkpoint(broken, out, against=against, only=parse_only(only), dry_run=dry_run, force=force,
                            extra_gate=extra_gate)
    render(fmt, result.findings + result.gate_findings, lambda: fix_document(result), lambda: _print_text(result),
           summary=result.verdict, file=broken, title="nvdiag fix")
    raise typer.Exit(result.exit_code)
