"""Shared rendering for every command: the findings document (text, json, github) and exit codes.

JSON contract (shared/DESIGN.md): {"version": 1, "findings": [...], "summary": {...}} plus command-specific keys.
Exit codes: 0 clean, 1 findings at or above --fail-on, 2 usage or unreadable input.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any

from rich.console import Console
from rich.table import Table

from reference_specs.findings import Finding, Severity, summarize

JSON_VERSION = 1


class OutputFormat(str, Enum):
    text = "text"
    json = "json"
    github = "github"


def console(stderr: bool = False) -> Console:
    """Colours only on a TTY; wide enough for tables when piped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, highlight=False, soft_wrap=False, width=None if stream.isatty() else 120)


def findings_document(findings: list[Finding], layers: int | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": JSON_VERSION}
    doc.update(extra)
    doc["findings"] = [f.to_json() for f in findings]
    doc["summary"] = summarize(findings, layers)
    return doc


def print_json(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


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
        where = f"{f.layer}: " if f.layer else ""
        lines.append(
            f"::{GITHUB_LEVEL[f.severity]} file={_github_escape(f.file, prop=True)},title={title}::"
            f"{_github_escape(where + f.message)}"
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
            f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]", f.rule, f.cause, f.layer or "-", f.message
        )
    return table


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
