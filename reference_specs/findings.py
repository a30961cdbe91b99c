"""Findings: the one output record of lint, diff, roundtrip, convert's gate and fix (shared/DESIGN.md schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from reference_specs.causes import check_cause


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r}: use error, warning or info") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class Finding:
    rule: str
    cause: str
    severity: Severity
    message: str
    file: str = ""
    layer: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_cause(self.cause)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "cause": self.cause,
            "severity": str(self.severity),
            "file": self.file,
            "layer": self.layer,
            "message": self.message,
            "evidence": self.evidence,
        }


def summarize(findings: list[Finding], layers: int | None = None) -> dict[str, int]:
    out = {
        "errors": sum(f.severity == Severity.ERROR for f in findings),
        "warnings": sum(f.severity == Severity.WARNING for f in findings),
        "infos": sum(f.severity == Severity.INFO for f in findings),
    }
    if layers is not None:
        out["layers"] = layers
    return out
