"""The gate: convert never trusts itself. Before the temporary file is renamed into place, it is opened like any
user file and must pass every lint rule (inspect_tools/lint.py) and a roundtrip of a sample of its quantized layers
against the source (each layer decoded with the format registry and compared with the source weight; an error far
above what the reference codec gives on the same weight is a finding). Any error finding refuses the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inspect_tools.layers import open_model
from reference_specs import formats
from reference_specs.findings import Finding, Severity

GATE_RULE = "CONVERT-ROUNDTRIP"
# A written layer may decode a little worse than the reference codec only through float noise; anything beyond
# 1.5x its baseline (plus an absolute margin for near-exact layers) means the bytes are not what was planned.
ERROR_RATIO = 1.5
ERROR_MARGIN = 1e-3
# Causes the user asks for explicitly through the preset (the `all` preset quantizes heads and embeddings): they
# stay visible as warnings but do not make a spec-valid file unpublishable.
USER_CHOSEN_CAUSES = ("sensitive-layer-quantized",)


@dataclass
class GateReport:
    findings: list[Finding] = field(default_factory=list)
    layer_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # native name -> rel_error, baseline
    lint_ran: bool = False

    @property
    def failed(self) -> bool:
        return any(f.severity >= Severity.ERROR for f in self.findings)

    @property
    def worst(self) -> tuple[str, float] | None:
        if not self.layer_errors:
            return None
        name = max(self.layer_errors, key=lambda n: self.layer_errors[n]["rel_error"])
        return name, self.layer_errors[name]["rel_error"]


def lint_findings(model: Any) -> tuple[list[Finding], bool]:
    """Every lint rule on the written file. (findings, whether the lint engine was available)."""
    try:
        from inspect_tools import lint
    except ImportError:
        return [], False
    for entry in ("lint_model", "run_rules", "lint"):
        fn = getattr(lint, entry, None)
        if callable(fn):
            result = fn(model)
            findings = list(getattr(result, "findings", result))
            return [_soften(f) for f in findings], True
    return [], False


def _soften(finding: Finding) -> Finding:
    if finding.cause in USER_CHOSEN_CAUSES and finding.severity > Severity.WARNING:
        finding.severity = Severity.WARNING
        finding.message += " (chosen by the preset)"
    return finding


def sample_evenly(items: list, n: int) -> list:
    """n items spread over the list (first and last included), in order."""
    if n <= 0 or len(items) <= n:
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def relative_error(decoded: torch.Tensor, reference: torch.Tensor) -> float:
    """||decoded - reference|| / ||reference|| (Frobenius), 0 for an all-zero reference decoded exactly.
    The same definition as inspect_tools.roundtrip's metric, without its other statistics (the gate runs on every
    conversion and needs only this one)."""
    ref = reference.to(torch.float64)
    diff = torch.linalg.vector_norm(decoded.to(torch.float64) - ref)
    norm = torch.linalg.vector_norm(ref)
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / norm)


def decode_layer(layer: Any, shape: tuple[int, ...]) -> torch.Tensor:
    fmt = formats.get(layer.format)
    tensors = {role: layer.load(role) for role in fmt.signature if layer.has(role)}
    return fmt().dequantize(tensors, shape).to(torch.float32)


def baseline_error(slug: str, weight: torch.Tensor) -> float:
    """The error the reference codec gives on this weight. Computed with the formats package's own encoders (the
    chunked one is bit-identical to the reference and much faster), never through converter.encode.ENCODERS, so a
    broken encoder under test cannot lower the bar it is measured against."""
    fmt = formats.get(slug)()
    try:
        from reference_specs.formats import fast_encode
    except ImportError:
        fast_encode = None
    if slug == "nvfp4" and fast_encode is not None:
        encoded = fast_encode.encode_nvfp4(weight)
    else:
        encoded = fmt.quantize(weight)
    return relative_error(fmt.dequantize(encoded, tuple(weight.shape)), weight)


def roundtrip_sample(out_model: Any, source: Any, plan: Any, sample: int) -> tuple[list[Finding], dict]:
    findings: list[Finding] = []
    errors: dict[str, dict[str, float]] = {}
    by_native = {layer.native_name or layer.name: layer for layer in out_model.layers.values()}
    quantized = [lp for lp in plan.layers if lp.quantized]
    for lp in sample_evenly(quantized, sample):
        written = by_native.get(lp.name)
        if written is None or written.format not in (f.slug for f in formats.FORMATS):
            continue  # missing or unreadable layers are lint's findings
        weight = source.reader.load(lp.source.tensors["weight"].name).to(torch.float32)
        try:
            decoded = decode_layer(written, tuple(weight.shape))
        except Exception as exc:  # noqa: BLE001 - undecodable bytes are a finding, not a crash
            findings.append(Finding(GATE_RULE, "excess-error", Severity.ERROR, f"cannot be decoded: {exc}",
                                    str(out_model.path), lp.name))
            continue
        err = relative_error(decoded, weight)
        base = baseline_error(written.format, weight)
        errors[lp.name] = {"rel_error": err, "baseline": base}
        if not err <= ERROR_RATIO * base + ERROR_MARGIN:
            findings.append(Finding(
                GATE_RULE, "excess-error", Severity.ERROR,
                f"decodes with relative error {err:.4g}, the {written.format} reference codec gives {base:.4g} "
                "on the same weight: the written bytes are not a correct encoding",
                str(out_model.path), lp.name, {"rel_error": err, "baseline": base},
            ))
    return findings, errors


def run_gate(path: str | Path, source: Any, plan: Any, sample: int = 8) -> GateReport:
    """Lint + sampled roundtrip of the written file at `path` (still the temporary file)."""
    report = GateReport()
    with open_model(path) as out_model:
        lint, report.lint_ran = lint_findings(out_model)
        rt, report.layer_errors = roundtrip_sample(out_model, source, plan, sample)
        report.findings = lint + rt
    return report
