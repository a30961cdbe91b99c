"""The lint engine: run the registered rules (reference_specs.rules) over checkpoint models.

Selection is ruff-like: `select` / `ignore` take rule ids, id prefixes (NV2), rule names or cause slugs, and ALL.
Configuration comes from `[tool.nvdiag]` of the nearest pyproject.toml above the working directory that has one;
command-line options override it (`--select` replaces the file's select and ignore, `--ignore` adds); unknown keys
in the table are an error.
"""

from __future__ import annotations

import difflib
import shlex
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inspect_tools.errors import InputError, InternalError, NvdiagError, UsageError
from inspect_tools.layers import CheckpointModel, open_model
from reference_specs.findings import Finding, Severity
from reference_specs.rules import RULES, Rule, RuleContext, rules_for

CONFIG_TABLE = "nvdiag"
CONFIG_KEYS = ("select", "ignore", "fail-on", "fail_on")
# What no lint rule can see in a file with quantized layers: it takes the values the file was made from.
# (cause slug, what a user calls it); `nvdiag roundtrip FILE --against REF` measures and names each of them.
NEEDS_REFERENCE: tuple[tuple[str, str], ...] = (
    ("nibble-order", "nibble order"),
    ("stale-scale", "stale scales"),
    ("transposed-weight", "transposed square layers"),
    ("excess-error", "error above the format's own"),
)


@dataclass
class LintConfig:
    """What to run and what fails. values=False runs header-only rules (no tensor bytes read at all)."""

    select: list[str] = field(default_factory=lambda: ["ALL"])
    ignore: list[str] = field(default_factory=list)
    fail_on: Severity = Severity.ERROR
    values: bool = True
    block_scale_budget: int | None = 256 * 2**20  # None: value rules read every layer's block scales
    weight_budget: int | None = 1024 * 2**20  # None: NV206 reads every plain float tensor (kept layers)
    source: Path | None = None  # the pyproject.toml it came from, if any

    def rules(self) -> list[Rule]:
        return selected_rules(self.select, self.ignore)


@dataclass
class LintResult:
    findings: list[Finding]
    layers: int = 0
    files: int = 0
    # files with quantized layers, whose NEEDS_REFERENCE causes lint could not check
    needs_reference: list[str] = field(default_factory=list)
    values_skipped: bool = False  # --header-only: the value rules (scale layout, reciprocal, non-finite) did not run

    def not_checked(self) -> dict[str, Any] | None:
        """What this lint could not see and the command that checks it (None when every file is plain float)."""
        if not self.needs_reference:
            return None
        file = self.needs_reference[0] if len(self.needs_reference) == 1 else "FILE"
        what = [name for _, name in NEEDS_REFERENCE]
        if self.values_skipped:
            what.insert(0, "scale values (run without --header-only)")
        return {"causes": [cause for cause, _ in NEEDS_REFERENCE], "what": what, "files": self.needs_reference,
                "command": shlex.join(["nvdiag", "roundtrip", file, "--against", "REF"])}

    def exit_code(self, fail_on: Severity = Severity.ERROR) -> int:
        return 1 if any(f.severity >= fail_on for f in self.findings) else 0


def _expand(keys: Iterable[str], what: str) -> set[str]:
    ids: set[str] = set()
    for key in keys:
        matched = rules_for(key)
        if not matched:
            raise UsageError(f"{what}: {key!r} names no rule, cause or id prefix (see `nvdiag lint --list`)")
        ids.update(r.id for r in matched)
    return ids


def selected_rules(select: Sequence[str], ignore: Sequence[str] = ()) -> list[Rule]:
    """The registered rules chosen by select minus ignore, in registry order. UsageError for unknown names."""
    chosen = _expand(select or ["ALL"], "select") - _expand(ignore, "ignore")
    return [r for r in RULES if r.id in chosen]


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """'NV101,NV2' or ['NV101', 'NV2'] or repeated options -> ['NV101', 'NV2']."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml at or above `start` (default: the working directory) with a [tool.nvdiag]
    table; a pyproject.toml without one is passed over, as ruff does for [tool.ruff]."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and CONFIG_TABLE in _read_toml(candidate).get("tool", {}):
            return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"invalid TOML: {exc}", str(path)) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from None


def load_config(start: Path | None = None) -> LintConfig:
    """LintConfig from the nearest [tool.nvdiag] table; defaults when there is none."""
    path = find_pyproject(start)
    if path is None:
        return LintConfig()
    table = _read_toml(path)["tool"][CONFIG_TABLE]
    if not isinstance(table, dict):
        raise UsageError("[tool.nvdiag] must be a table", str(path))
    config = LintConfig(source=path)
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        hints = "; ".join(f"{key!r}{_did_you_mean(key)}" for key in unknown)
        raise UsageError(f"[tool.nvdiag]: unknown key {hints}; known keys: {', '.join(CONFIG_KEYS[:3])}", str(path))
    try:
        if "select" in table:
            config.select = split_list(table["select"])
        config.ignore = split_list(table.get("ignore"))
        fail_on = table.get("fail-on", table.get("fail_on"))
        if fail_on is not None:
            config.fail_on = Severity.parse(str(fail_on))
        config.rules()  # unknown rule names in the file are a usage error now, not at the end of a long run
    except (ValueError, UsageError) as exc:
        raise UsageError(f"[tool.nvdiag]: {exc}", str(path)) from None
    return config


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_config(
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    fail_on: str | None = None,
    values: bool = True,
    all_scales: bool = False,
    start: Path | None = None,
) -> LintConfig:
    """File configuration overridden by command-line options. --select replaces the file's select and ignore both
    (what the command line names explicitly runs, whatever the file ignores); --ignore adds to the file's ignore."""
    config = load_config(start)
    if select:
        config.select = split_list(select)
        config.ignore = []
    config.ignore = config.ignore + split_list(ignore)
    if fail_on is not None:
        try:
            config.fail_on = Severity.parse(fail_on)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    config.values = values
    if all_scales:
        config.block_scale_budget = None
        config.weight_budget = None
    config.rules()
    return config


def _run_rule(rule: Rule, model: CheckpointModel, ctx: RuleContext) -> list[Finding]:
    """One rule's findings. A read error stays the input's fault (exit 2): the readers raise InputError for
    anything unreadable (truncated, changed while open, malformed), and an OSError is the file system's. Any other
    exception escaped the rule's own code on data that was read fine: that is a bug in nvdiag (exit 3), reported as
    such with the rule's id, never disguised as a bad file."""
    try:
        return list(rule.check(model, ctx))
    except NvdiagError:
        raise
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(model.path)) from exc
    except Exception as exc:  # anything else is the rule's own failure
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise InternalError(f"rule {rule.id} ({rule.name}) crashed: {type(exc).__name__}"
                            f"{': ' + detail if detail else ''}; this is a bug in nvdiag, please report it "
                            "(run with --debug for the traceback)", str(model.path)) from exc


def lint_model(model: CheckpointModel, config: LintConfig | None = None) -> list[Finding]:
    """Every selected rule over one opened model; findings carry the model's path and come sorted
    (severity first, then rule id, then layer)."""
    config = config or LintConfig()
    ctx = RuleContext(model, block_scale_budget=config.block_scale_budget, weight_budget=config.weight_budget)
    findings: list[Finding] = []
    for rule in config.rules():
        if rule.needs_values and not config.values:
            continue
        for finding in _run_rule(rule, model, ctx):
            finding.file = str(model.path)
            findings.append(finding)
    findings.sort(key=lambda f: (-f.severity, f.rule, f.layer or ""))
    return findings


def lint_paths(paths: Sequence[str | Path], config: LintConfig | None = None) -> LintResult:
    """Open and lint each checkpoint in turn (one open at a time); InputError for an unreadable one."""
    config = config or LintConfig()
    result = LintResult(findings=[])
    for path in paths:
        with open_model(path) as model:
            result.findings.extend(lint_model(model, config))
            result.layers += len(model.layers)
            result.files += 1
            if any(layer.is_quantized for layer in model.layers.values()):
                result.needs_reference.append(str(path))
    result.values_skipped = not config.values
    return result


def explain(key: str) -> list[Rule]:
    """Rules an `--explain` argument names (id, name or cause slug); UsageError when none."""
    matched = [r for r in RULES if key.strip().lower() in (r.id.lower(), r.name, r.cause)]
    if not matched:
        raise UsageError(f"--explain: {key!r} is no rule id, rule name or cause (see `nvdiag lint --list`)")
    return matched
