"""`nvdiag diff`'s result: DiffReport (everything the text and JSON outputs show) and diff_models / diff_paths, which
run the alignment, the checks and the summaries over two opened checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inspect_tools.align import LayerPair
from inspect_tools.diff.alignment import diff_pairs, same_architecture, same_dimensions, select_layers
from inspect_tools.diff.checks import (
    FindingCollector,
    check_compute,
    check_file_level,
    check_roles,
    check_scales,
    compare_pairs,
    compare_values,
)
from inspect_tools.diff.facts import difference, layer_row, storage_text
from inspect_tools.diff.scale_stats import ScaleStats, scale_distributions
from inspect_tools.diff.summaries import (
    metadata_comparison,
    plan_disagreements,
    precision_plan,
    role_counts,
    role_table,
    signature_verdicts,
    signatures,
)
from inspect_tools.layers import CheckpointModel, open_model
from reference_specs.findings import Finding, Severity
from reference_specs.rules.compute_markers import compute_counts, compute_path


@dataclass


class DiffReport:
    mine: CheckpointModel
    ref: CheckpointModel
    mode: str  # "name" | "role"
    pairs: list[LayerPair]
    findings: list[Finding]
    signatures: dict[str, dict[str, dict[str, int]]]
    counts: dict[str, dict[str, dict[str, int]]]
    verdicts: list[dict[str, str]]
    precision: dict[str, dict[str, int]]
    disagreements: list[dict[str, str]]
    scales: dict[str, dict[str, ScaleStats]]
    metadata: list[dict[str, Any]]
    roles: dict[str, dict[str, dict[str, Any]]] | None = None
    values: list[dict[str, Any]] | None = None
    # side -> compute path on Blackwell -> layers ({"mine": {"W4A4": 12, "W4A16": 8}, "ref": {...}})
    compute: dict[str, dict[str, int]] = field(default_factory=dict)
    values_skipped: str | None = None  # why quantized layers were compared by header only (None: values compared)

    @property
    def only_mine(self) -> list[str]:
        return [p.key for p in self.pairs if p.ref is None]

    @property
    def only_ref(self) -> list[str]:
        return [p.key for p in self.pairs if p.mine is None]

    @property
    def matched(self) -> int:
        return sum(p.matched for p in self.pairs)

    def differing_layers(self) -> list[tuple[list[str], str | None, str | None, str]]:
        """Layers that differ (present on one side only, another format, other aux tensors or dtypes, another compute
        path), rows with the same difference folded into one: (row keys, MINE's storage_text, REF's, what differs);
        None for an absent side. Empty in a role diff (no layer has a partner)."""
        if self.mode == "role":
            return []
        groups: dict[tuple[str | None, str | None, str], list[str]] = {}
        for pair in self.pairs:
            m, r = pair.mine, pair.ref
            what = difference(m, r)
            if m is not None and r is not None:
                mine_path = compute_path(m, self.mine.file_markers)
                ref_path = compute_path(r, self.ref.file_markers)
                if mine_path and ref_path and mine_path != ref_path:
                    what = "; ".join(filter(None, (what, f"compute MINE {mine_path}, REF {ref_path}")))
            if what:
                cells = (storage_text(m) if m is not None else None, storage_text(r) if r is not None else None)
                groups.setdefault((*cells, what), []).append(pair.key)
        return [(names, *key) for key, names in groups.items()]

    def summary_text(self) -> str:
        """The one paragraph on top of the text output."""
        m, r = self.mine, self.ref
        parts = [
            f"MINE {m.path.name} ({_arch_text(m)}, {_formats_text(m)}) vs REF {r.path.name} "
            f"({_arch_text(r)}, {_formats_text(r)})."
        ]
        if self.mode == "role":
            parts.append("Different architectures: layers compared by role (attention, MLP, modulation, ...).")
        else:
            parts.append(
                f"{self.matched} layers matched by ComfyUI-native name, {len(self.only_mine)} only in MINE, "
                f"{len(self.only_ref)} only in REF."
            )
            if self.disagreements:
                parts.append(f"{len(self.disagreements)} layers stored at a different precision.")
        errors = [f for f in self.findings if f.severity == Severity.ERROR]
        warnings = [f for f in self.findings if f.severity == Severity.WARNING]
        if errors:
            causes = sorted({f.cause for f in errors})
            parts.append(f"Differences that break MINE in ComfyUI ({len(errors)} error findings): {', '.join(causes)}.")
        elif warnings:
            causes = sorted({f.cause for f in warnings})
            parts.append(f"Nothing that stops ComfyUI loading MINE; {len(warnings)} warning(s) to look at: "
                         f"{', '.join(causes)}.")
        else:
            parts.append("No difference that matters to ComfyUI"
                         + (" in the headers" if self.values_skipped else "") + ".")
        if self.values_skipped:
            parts.append(f"Dequantized values NOT compared ({self.values_skipped}).")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "mine": _side_json(self.mine),
            "ref": _side_json(self.ref),
            "mode": self.mode,
            "summary_text": self.summary_text(),
            "only_mine": self.only_mine,
            "only_ref": self.only_ref,
            "signatures": self.signatures,
            "counts": self.counts,
            "signature_verdicts": self.verdicts,
            "precision_plan": {**self.precision, "disagreements": self.disagreements, "compute": self.compute},
            "scales": {side: {k: v.to_json() for k, v in st.items()} for side, st in self.scales.items()},
            "metadata": self.metadata,
            "roles": self.roles,
            "values": self.values,
            "values_skipped": self.values_skipped,
            "rows": [
                {
                    "name": p.key,
                    "mine": layer_row(p.mine, self.mine.file_markers),
                    "ref": layer_row(p.ref, self.ref.file_markers),
                }
                for p in self.pairs
            ],
        }


def _arch_text(model: CheckpointModel) -> str:
    det = model.detection
    if det.family == "unknown":
        return "unknown architecture"
    return det.variant + (", diffusers names" if det.naming == "diffusers" else "")


def _formats_text(model: CheckpointModel) -> str:
    return ", ".join(f"{fmt} {n}" for fmt, n in model.format_counts().items()) or "no layers"


def _side_json(model: CheckpointModel) -> dict[str, Any]:
    return {
        "path": str(model.path),
        "container": model.kind,
        "architecture": model.detection.to_json(),
        "formats": model.format_counts(),
    }


def diff_models(
    mine: CheckpointModel, ref: CheckpointModel, layers: str | None = None, values: bool = False
) -> DiffReport:
    """Compare two opened checkpoints. `layers`: glob on file or native names; `values`: also compare the
    dequantized weights of matched quantized layers (reads those weights, one pair at a time)."""
    out = FindingCollector(str(mine.path))
    by_name = same_architecture(mine, ref)
    mine_layers = select_layers(mine.layers.values(), layers)
    ref_layers = select_layers(ref.layers.values(), layers)
    pairs = diff_pairs(mine, ref, mine_layers, ref_layers, by_name)
    check_file_level(mine, ref, out)
    compare_pairs(pairs, mine, out, by_name=by_name, check_shapes=same_dimensions(mine, ref))
    if by_name:
        check_compute(pairs, mine, ref, out)
    mine_counts, ref_counts = role_counts(mine_layers), role_counts(ref_layers)
    scales = {"mine": scale_distributions(mine_layers), "ref": scale_distributions(ref_layers)}
    check_scales(scales["mine"], scales["ref"], out)
    roles = None
    if not by_name:
        roles = {"mine": role_table(mine, mine_layers), "ref": role_table(ref, ref_layers)}
        check_roles(roles["mine"], roles["ref"], out)
    value_rows = compare_values(pairs, mine, ref, out) if values and by_name else None
    quantized = any(p.mine is not None and p.mine.is_quantized for p in pairs)
    skipped = None
    if quantized and value_rows is None:
        skipped = "different architectures: no layer pairs to decode" if not by_name else "--no-values"
    return DiffReport(
        mine=mine,
        ref=ref,
        mode="name" if by_name else "role",
        pairs=pairs,
        findings=out.findings(),
        signatures={"mine": signatures(mine_layers), "ref": signatures(ref_layers)},
        counts={"mine": mine_counts, "ref": ref_counts},
        verdicts=signature_verdicts(mine_counts, ref_counts),
        precision={"mine": precision_plan(mine_layers), "ref": precision_plan(ref_layers)},
        disagreements=plan_disagreements(pairs) if by_name else [],
        scales=scales,
        metadata=metadata_comparison(mine, ref),
        roles=roles,
        values=value_rows,
        compute={"mine": compute_counts(mine_layers, mine.file_markers),
                 "ref": compute_counts(ref_layers, ref.file_markers)},
        values_skipped=skipped,
    )


def diff_paths(mine: str | Path, ref: str | Path, layers: str | None = None, values: bool = False) -> DiffReport:
    """Open both checkpoints, diff them, close them. The report keeps headers only (no tensor is read later)."""
    with open_model(mine) as mine_model, open_model(ref) as ref_model:
        return diff_models(mine_model, ref_model, layers, values)
