"""`nvdiag lint PATH...`: check checkpoints against what ComfyUI requires and name the cause of every problem."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from inspect_tools.cli import app
from inspect_tools.cli.output import (
    FORMAT_HELP,
    OutputFormat,
    compact_findings_table,
    console,
    findings_document,
    github_notice,
    print_json,
    render,
    rule_legend,
    verdict,
)
from inspect_tools.errors import UsageError
from inspect_tools.lint import LintConfig, LintResult, explain, lint_paths, resolve_config
from reference_specs.causes import CAUSES
from reference_specs.rules import RULES, Rule


def rules_table(rules: list[Rule], config: LintConfig | None = None) -> Table:
    enabled = {r.id for r in config.rules()} if config is not None else {r.id for r in rules}
    table = Table(title="nvdiag lint rules", show_lines=False, expand=False, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("sev", no_wrap=True)
    table.add_column("on", no_wrap=True)  # enabled by --select / --ignore / [tool.nvdiag]
    table.add_column("reads", no_wrap=True)
    table.add_column("summary", overflow="fold", ratio=1)
    for rule in rules:
        style = "" if rule.id in enabled else "[dim]"
        table.add_row(f"{style}{rule.id}", f"{style}{rule.name}", str(rule.severity),
                      "yes" if rule.id in enabled else "[dim]no[/]", "values" if rule.needs_values else "header",
                      escape(rule.summary))
    return table


RULES_LEGEND = ("on: enabled by --select / --ignore / \\[tool.nvdiag]; reads: header only, or scale values too "
                "(skipped by --header-only)")


def rule_json(rule: Rule, config: LintConfig, explanation: bool = False) -> dict:
    """A rule as `--list` / `--explain --format json` give it: what it checks, and whether this config runs it."""
    doc = {"id": rule.id, "name": rule.name, "cause": rule.cause, "severity": str(rule.severity),
           "reads": "values" if rule.needs_values else "header", "enabled": rule in config.rules(),
           "summary": rule.summary}
    if explanation:
        doc["explanation"] = reflow(rule.explanation)
    return doc


def reflow(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph so the terminal wraps them at its own width; list items and
    indented lines keep their own line."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        starts_item = stripped[:2] in ("- ", "* ") or stripped[:1].isdigit() and stripped[1:3] in (". ", ") ")
        if out and out[-1] and stripped and not starts_item and not line.startswith((" ", "\t")):
            out[-1] += " " + stripped
        else:
            out.append(line.rstrip())
    return "\n".join(out)


def explanation_text(rule: Rule) -> str:
    return (
        f"[bold]{rule.id} {rule.name}[/] ({rule.severity}; cause [bold]{rule.cause}[/]: {escape(CAUSES[rule.cause])})\n"
        f"{'reads scale values' if rule.needs_values else 'header only'}\n\n{escape(rule.summary)}\n\n"
        f"{escape(reflow(rule.explanation))}\n"
    )


@app.command("lint")
def lint_command(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="Checkpoints: .safetensors, *.safetensors.index.json (or its folder), .gguf"),
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = (
        OutputFormat.text
    ),
    select: Annotated[
        list[str] | None,
        typer.Option("--select", help="Only these rules: ids, id prefixes (NV2), names, causes, ALL; comma-separated"),
    ] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Skip these rules (same forms as --select)")] = (
        None
    ),
    fail_on: Annotated[
        str | None, typer.Option("--fail-on", help="Exit 1 at this severity or above: error (default), warning, info")
    ] = None,
    header_only: Annotated[
        bool, typer.Option("--header-only", help="Run only rules that need no tensor bytes (instant on any size)")
    ] = False,
    all_scales: Annotated[
        bool, typer.Option("--all-scales", help="Check every layer's block scales even past 256 MB of them, and "
                           "every kept float weight even past 1 GiB of them")
    ] = False,
    explain_key: Annotated[
        str | None, typer.Option("--explain", help="Print the long explanation of a rule id, name or cause")
    ] = None,
    list_rules: Annotated[bool, typer.Option("--list", help="List every rule and whether it is enabled (the 'on' "
                                                               "column, after --select / --ignore / config)")] = False,
) -> None:
    """Check checkpoints against the rules ComfyUI actually applies; every finding names its cause.

    Exit 0 when nothing at or above --fail-on was found, 1 otherwise, 2 for unreadable input or bad options,
    3 when a rule itself crashed (a bug in nvdiag: the message names the rule; please report it).
    Defaults come from \\[tool.nvdiag] (select, ignore, fail-on) in the nearest
    pyproject.toml that has one (the text output names it); the command line wins: --select replaces the file's
    select and ignore, --ignore adds to its ignore.

    Examples:

      nvdiag lint wan22_5b_nvfp4.safetensors

      nvdiag lint model.safetensors --format json > findings.json

      nvdiag lint *.safetensors --format github --fail-on warning

      nvdiag lint model.safetensors --select NV1,NV204 --ignore NV303

      nvdiag lint --explain NV204

      nvdiag lint --explain input-scale-implausible

      nvdiag lint --list
    """
    config = resolve_config(select=select, ignore=ignore, fail_on=fail_on, values=not header_only,
                            all_scales=all_scales)
    out = console()
    if explain_key is not None:
        print_rules(fmt, out, explain(explain_key), config, explanation=True)
        return
    if list_rules:
        print_rules(fmt, out, RULES, config, explanation=False)
        return
    if not paths:
        raise UsageError("lint needs at least one checkpoint PATH (or --list / --explain)")
    result = lint_paths(paths, config)
    render(fmt, result.findings, lambda: lint_document(result, config), lambda: print_text(out, result, config),
           summary=lambda: plain_summary(result, config), title="nvdiag lint")
    raise typer.Exit(result.exit_code(config.fail_on))


def print_rules(fmt: OutputFormat, out: Console, rules: list[Rule], config: LintConfig, explanation: bool) -> None:
    """--list (a table with the enabled column) or --explain (the long texts), in the --format asked for."""
    if fmt == OutputFormat.json:
        print_json({"version": 1, "config": str(config.source) if config.source else None,
                    "rules": [rule_json(r, config, explanation) for r in rules]})
    elif fmt == OutputFormat.github:
        for doc in (rule_json(r, config, explanation) for r in rules):
            state = "enabled" if doc["enabled"] else "disabled"
            text = f"{doc['severity']}, {state}, cause {doc['cause']}: {doc['summary']}"
            text += f". {doc['explanation']}" if explanation else ""
            print(github_notice(text, f"{doc['id']} {doc['name']}"))
    elif explanation:
        for rule in rules:
            out.print(explanation_text(rule))
    else:
        out.print(rules_table(rules, config))
        out.print(f"[dim]{RULES_LEGEND}[/]")
        if config.source is not None:
            out.print(f"[dim]config: \\[tool.nvdiag] in {escape(str(config.source))}[/]")


def plain_summary(result: LintResult, config: LintConfig) -> str:
    """The verdict, and what was not checked, as one plain line (the notice of --format github)."""
    line = Text.from_markup(verdict(result.findings, config.fail_on, result.layers)).plain
    unchecked = result.not_checked()
    if unchecked:
        line += f"; not checked: {', '.join(unchecked['what'])}; run: {unchecked['command']}"
    return line


def lint_document(result: LintResult, config: LintConfig) -> dict:
    """The findings document; "not_checked" says what needs a reference and which command checks it."""
    return findings_document(result.findings, result.layers, not_checked=result.not_checked(),
                             config=str(config.source) if config.source else None)


def print_text(out: Console, result: LintResult, config: LintConfig) -> None:
    """Findings per file, the legend of the rules that fired, and the verdict line."""
    if config.source is not None:
        out.print(f"[dim]config: \\[tool.nvdiag] in {escape(str(config.source))}[/]")
    files = list(dict.fromkeys(f.file for f in result.findings))
    for file in files:
        if len(files) > 1:
            out.print(f"[bold]{escape(file)}[/]")
        out.print(compact_findings_table([f for f in result.findings if f.file == file]))
    if result.findings:
        for line in rule_legend(result.findings, {r.id: r.name for r in RULES}):
            out.print(line)
        first = min(result.findings, key=lambda f: (-f.severity, f.rule)).rule
        out.print(f"[dim]nvdiag lint --explain {first}: what ComfyUI does with it and how to fix it "
                  "(any rule id above)[/]")
    unchecked = result.not_checked()
    if unchecked:
        out.print(f"[yellow]not checked: {', '.join(unchecked['what'])}[/] (they need the values the file was made "
                  "from); run:")
        out.print(f"  {escape(unchecked['command'])}", soft_wrap=True)
    out.print(verdict(result.findings, config.fail_on, result.layers))  # last line, as scripts expect
