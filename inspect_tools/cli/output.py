"""Shared rendering for every command: the findings document (text, json, github) and exit codes.

JSON contract (shared/DESIGN.md): {"version": 1, "findings": [...], "summary": {...}} plus command-specific keys.
Exit codes: 0 clean, 1 findings at or above --fail-on, 2 usage or unreadable input.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from inspect_tools.cli.terminal_text import plain_shown, shown
from reference_specs.causes import CAUSES
from reference_specs.findings import Finding, Severity, summarize

JSON_VERSION = 1


# Rows of a per-layer text table (inspect, preset show --on). rich needs about a millisecond per row on a slow
# machine, so a header of 200k tensors took minutes; real diffusion models have 300-1,500 layers. Longer tables end
# with a line saying how many rows were left out; --format json has them all.
TABLE_ROWS = 2000


class OutputFormat(str, Enum):
    text = "text"
    json = "json"
    github = "github"


def console(stderr: bool = False, width: int | None = None) -> Console:
    """Colours only on a TTY; wide enough for tables when piped (or exactly `width` columns)."""
    stream = sys.stderr if stderr else sys.stdout
    if width is None and not stream.isatty():
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) >= 40 else 120
    return Console(file=stream, highlight=False, soft_wrap=False, width=width)


def findings_document(findings: list[Finding], layers: int | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": JSON_VERSION}
    doc.update(extra)
    doc["findings"] = [f.to_json() for f in findings]
    doc["summary"] = summarize(findings, layers)
    return doc


def json_safe(value: Any) -> Any:
    """NaN and Inf are not JSON: write them as the strings "nan", "inf", "-inf" (evidence often holds them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def format_number(value: float | None, digits: int = 4) -> str:
    """A table cell: `digits` significant digits, "-" for nothing, nan/inf spelled out."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def print_json(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(json_safe(doc), indent=2, default=str, allow_nan=False) + "\n")


FORMAT_HELP = "text, json (one document) or github (workflow annotations)"


def render(fmt: OutputFormat, findings: list[Finding], document: Callable[[], dict[str, Any]],
           text: Callable[[], None], summary: Callable[[], str] | None = None, file: str | None = None,
           title: str = "nvdiag") -> None:
    """Print a command's result the way --format asks: the JSON document, workflow annotations (one per finding,
    then the command's one-line summary as a notice), or the text view."""
    if fmt == OutputFormat.json:
        print_json(document())
    elif fmt == OutputFormat.github:
        for line in github_lines(findings):
            print(line)
        if summary is not None:
            print(github_notice(summary(), title, file))
    else:
        text()


def github_notice(message: str, title: str = "nvdiag", file: str | None = None) -> str:
    """`::notice file=F,title=T::message`: what a command says besides its findings, for a workflow log."""
    props = ([f"file={_github_escape(file, prop=True)}"] if file else []) + [f"title={_github_escape(title, True)}"]
    return f"::notice {','.join(props)}::{_github_escape(message)}"


def _github_escape(text: str, prop: bool = False) -> str:
    # workflow command escaping (GitHub Actions docs, "Workflow commands": %, CR, LF; plus : and , in properties)
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


GITHUB_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def github_lines(findings: list[Finding]) -> list[str]:
    """`::error file=F,title=NV101 missing-block-scale::layer: message` workflow annotations."""
    lines = []
    for f in findings:
        title = _github_escape(f"{f.rule} {f.cause}", prop=True)
        where = f"{plain_shown(f.layer)}: " if f.layer else ""
        lines.append(
            f"::{GITHUB_LEVEL[f.severity]} file={_github_escape(f.file, prop=True)},title={title}::"
            f"{_github_escape(where + plain_shown(f.message))}"
        )
    return lines


SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def findings_table(findings: list[Finding], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("severity", no_wrap=True)
    table.add_column("rule", no_wrap=True)
    table.add_column("cause", no_wrap=True)
    table.add_column("layer", overflow="fold")
    table.add_column("message", overflow="fold")
    for f in sorted(findings, key=lambda f: (-f.severity, f.rule, f.layer or "")):
        table.add_row(
            f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]", f.rule, f.cause, shown(f.layer or "-"), shown(f.message)
        )
    return table


def collapse_per_rule(findings: Iterable[Finding], limit: int) -> tuple[list[Finding], dict[str, int]]:
    """At most `limit` findings of each rule, in order; and how many of each rule were left out."""
    kept: list[Finding] = []
    seen: dict[str, int] = {}
    for f in findings:
        seen[f.rule] = seen.get(f.rule, 0) + 1
        if seen[f.rule] <= limit:
            kept.append(f)
    return kept, {rule: n - limit for rule, n in seen.items() if n > limit}


def compact_findings_table(findings: list[Finding], limit_per_rule: int = 8) -> Table:
    """Four columns that stay readable at 80 columns: severity, rule id, layer, message (print `rule_legend` below
    it for what the ids mean); long runs of one rule are cut to `limit_per_rule` rows plus a row saying how many
    more there are."""
    table = Table(show_lines=False, expand=False, pad_edge=False)
    table.add_column("sev", no_wrap=True)
    table.add_column("rule", no_wrap=True)
    table.add_column("layer", overflow="fold", max_width=26)
    table.add_column("message", overflow="fold", ratio=1)
    ordered = sorted(findings, key=lambda f: (-f.severity, f.rule, f.file, f.layer or ""))
    kept, left_out = collapse_per_rule(ordered, limit_per_rule)
    for i, f in enumerate(kept):
        table.add_row(f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]", f.rule, shown(f.layer or "(file)"),
                      shown(f.message))
        last_of_rule = i + 1 == len(kept) or kept[i + 1].rule != f.rule
        if last_of_rule and f.rule in left_out:
            table.add_row("", f.rule, "…", f"[dim]{left_out[f.rule]} more like this (--format json lists all)[/]")
    return table


def rule_legend(findings: list[Finding], names: dict[str, str] | None = None) -> list[str]:
    """'NV101 missing-block-scale: <cause meaning>' once per rule that fired, in table order."""
    lines, seen = [], set()
    for f in sorted(findings, key=lambda f: (-f.severity, f.rule)):
        if f.rule in seen:
            continue
        seen.add(f.rule)
        name = (names or {}).get(f.rule, f.cause)
        lines.append(f"[bold]{f.rule}[/] {name}: {escape(CAUSES.get(f.cause, ''))}")
    return lines


def verdict(findings: list[Finding], fail_on: Severity = Severity.ERROR, layers: int | None = None) -> str:
    """One line: PASS / FAIL with the counts, as the last line of text output."""
    s = summarize(findings, layers)
    counts = f"{s['errors']} error(s), {s['warnings']} warning(s), {s['infos']} info(s)"
    where = f" in {layers} layers" if layers is not None else ""
    if exit_code(findings, fail_on):
        return f"[bold red]FAIL[/]: {counts}{where} (--fail-on {fail_on})"
    return f"[green]PASS[/]: {counts}{where}"


def print_findings_text(findings: list[Finding], title: str | None = None, out: Console | None = None) -> None:
    out = out or console()
    if not findings:
        out.print("[green]no findings[/]")
        return
    out.print(findings_table(findings, title))
    s = summarize(findings)
    out.print(f"{s['errors']} error(s), {s['warnings']} warning(s), {s['infos']} info(s)")


def exit_code(findings: list[Finding], fail_on: Severity = Severity.ERROR) -> int:
    return 1 if any(f.severity >= fail_on for f in findings) else 0


def table_width(header: list[str], rows: list[list[str]], padding: int = 3) -> int:
    """Columns a table of these plain cells needs without folding any of them (borders and padding included)."""
    widths = [max([len(h), *(len(Text.from_markup(r[i]).plain) for r in rows)]) for i, h in enumerate(header)]
    return sum(widths) + padding * len(widths) + 1


def print_records(out: Console, header: list[str], rows: list[list[str]], title: str | None = None,
                  lead: int | None = None) -> None:
    """A table too wide for the terminal, as one record per row: the first cell (a layer name) whole on its own
    line, the other cells as 'column value' pairs below it (cell `lead` first, without its column name), wrapped
    between pairs, never inside a name, a value or a cause."""
    if title:
        out.print(f"[bold]{escape(title)}[/]")
    for row in rows:
        out.print(row[0], soft_wrap=True)
        order = ([lead] if lead is not None else []) + [i for i in range(1, len(row)) if i != lead]
        pairs = [row[i] if i == lead else f"{header[i]} {row[i]}" for i in order if row[i] not in ("", "-")]
        line = ""
        for pair in pairs:
            candidate = f"{line}; {pair}" if line else f"  {pair}"
            if line and len(Text.from_markup(candidate).plain) > out.width:
                out.print(line, soft_wrap=True)
                candidate = f"  {pair}"
            line = candidate
        if line:
            out.print(line, soft_wrap=True)
