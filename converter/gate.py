"""The gate: convert never trusts itself. Before the temporary file is renamed into place, it is opened like any
user file and must pass every lint rule (inspect_tools/lint.py) and a roundtrip of a sample of its quantized layers
against the source. Any error finding refuses the output.

The roundtrip stays independent of the encoder under test (it reads the WRITTEN file back and compares it with the
SOURCE), but its cost is bounded whatever the model size: it checks 128-row tiles at the start, middle and end of
each sampled layer, within a fixed element budget. That is exact, not an approximation: NVFP4 and per-tensor FP8 are
row-local once the per-tensor scale is fixed, and the swizzled NVFP4 block scales are stored in 128-row tiles
(nvfp4.swizzle_index), so a tile of the written file decodes on its own to exactly what the whole layer decodes to
in those rows, and the formats package's encoder gives the baseline on the same source rows with the same scale.
The per-tensor scale itself is checked against the source's amax (taken while converting, or read here).
An FP8 source layer is compared in the values it dequantizes to (converter/fp8_source.py), decoded here by its
format's own codec with the scale read from the source again, not with the numbers the plan carried: the written
file must be a correct encoding of what the source file holds.

Lint knows what a valid file is, not what this conversion meant to write: a marker that lost its
`full_precision_matrix_mult` flag is still a valid marker, and ComfyUI would then run that layer W4A4 on Blackwell.
So the gate also reads every written marker back (the `.comfy_quant` tensor and the `_quantization_metadata` entry)
and requires both to be exactly the conf the plan decided.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converter.fp8_source import DECODED_DTYPE, is_fp8_source
from converter.plan import COMFY_FORMAT
from inspect_tools.attribution import relative_error
from inspect_tools.layers import MAX_MARKER_BYTES, decode_marker_bytes, open_model
from inspect_tools.lint import LintConfig, lint_model
from reference_specs import formats
from reference_specs.findings import Finding, Severity
from reference_specs.sampling import spread, spread_indices

GATE_RULE = "CONVERT-ROUNDTRIP"
MARKER_RULE = "CONVERT-MARKER"
# A written layer may decode a little worse than the reference codec only through float noise; anything beyond
# 1.5x its baseline (plus an absolute margin for near-exact layers) means the bytes are not what was planned.
ERROR_RATIO = 1.5
ERROR_MARGIN = 1e-3
# The written per-tensor scale must be the source's amax / format max; a float32 division leaves no room for more.
SCALE_TOLERANCE = 1e-6
# Causes the user asks for explicitly through the preset (the `all` preset quantizes heads and embeddings): they
# stay visible as warnings but do not make a spec-valid file unpublishable.
USER_CHOSEN_CAUSES = ("sensitive-layer-quantized",)
TILE_ROWS = 128  # the swizzled block-scale tile height: a tile of the written file decodes on its own
TILES_PER_LAYER = 3  # start, middle, end
LAYER_ELEMENTS = 1 << 23  # per sampled layer: 3 tiles of rows up to ~21K wide, fewer tiles for wider layers
# The per-tensor scale role of each format convert writes (the formats ask: Format.tensor_scale_role).
SCALE_ROLE = {slug: formats.get(slug).tensor_scale_role for slug in COMFY_FORMAT.values()}


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
    """Every lint rule on the written file. (findings, True): the second value says the lint engine ran.
    Every kept (plain float) tensor is read for NaN/Inf, not a sample: convert has just written them (they are in
    the page cache) and an Inf from a narrowing cast is exactly what a sample would miss."""
    return [_soften(f) for f in lint_model(model, LintConfig(weight_budget=None))], True


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
    return spread(items, n)


def row_tiles(rows: int, cols: int, budget: int = LAYER_ELEMENTS) -> list[tuple[int, int]]:
    """[start, stop) row ranges of TILE_ROWS rows (each starting on a tile boundary) at the start, middle and end of
    a [rows, cols] weight, as many as the element budget allows (at least one)."""
    last = (rows - 1) // TILE_ROWS
    count = max(1, min(TILES_PER_LAYER, budget // max(1, TILE_ROWS * cols)))
    tiles = spread_indices(last + 1, count) if count > 1 else [last // 2]
    return [(t * TILE_ROWS, min(rows, (t + 1) * TILE_ROWS)) for t in tiles]


def source_rows(reader: Any, layer: Any, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of source layer `layer`'s weight as float32: as stored, or for an FP8 source layer
    dequantized by its format's codec (fp8 x the per-tensor scale read from the source; plain FP8 casts as they are)."""
    name = layer.tensors["weight"].name
    if not is_fp8_source(layer):
        return reader.read_rows(name, start, stop, as_float=True)
    fmt = formats.get(layer.format)
    tensors = {"weight": reader.read_rows(name, start, stop)}
    if fmt.tensor_scale_role is not None:
        tensors[fmt.tensor_scale_role] = layer.load(fmt.tensor_scale_role)
    return fmt().dequantize(tensors, tuple(tensors["weight"].shape))


def source_amax(reader: Any, layer: Any) -> float:
    """max |w| of a source layer's weight, tile by tile (only when the conversion did not record it)."""
    rows = layer.tensors["weight"].shape[0]
    amax = 0.0
    for start in range(0, rows, 4 * TILE_ROWS):
        lo, hi = torch.aminmax(source_rows(reader, layer, start, start + 4 * TILE_ROWS))
        amax = max(amax, -float(lo), float(hi))
    return amax


def expected_scale(slug: str, amax: float, source_dtype: str) -> torch.Tensor:
    """The per-tensor scale the format's own rules give a source weight of this amax and safetensors dtype, float32
    0-d: ComfyUI's rounding (BF16 sources get a BF16-rounded amax/2688), 1.0 for an all-zero weight. Taken from the
    format modules, not from the fast encoder under test."""
    return formats.get(slug).default_scale(amax, source_dtype)


def written_tile(layer: Any, reader: Any, slug: str, start: int, stop: int) -> dict[str, torch.Tensor]:
    """The stored tensors that hold logical rows [start, stop) (start on a tile boundary): the packed rows, the
    128-row block-scale tile (NVFP4) and the per-tensor scale."""
    fmt = formats.get(slug)
    tensors = {"weight": reader.read_rows(layer.tensors["weight"].name, start, stop)}
    if fmt.block_scale_role is not None:
        role = fmt.block_scale_role
        tensors[role] = reader.read_rows(layer.tensors[role].name, start, start + TILE_ROWS)
    if fmt.tensor_scale_role is not None:
        tensors[fmt.tensor_scale_role] = layer.load(fmt.tensor_scale_role)
    return tensors


def baseline_error(slug: str, weight: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """The error the reference codec gives on these source rows with this per-tensor scale. The reference codec
    (reference_specs/formats, plain step-by-step code) is deliberately not the fast chunked encoder convert writes
    with: a bug in that encoder would otherwise lower the bar it is measured against (a low-nibble-first packer
    once passed this gate with every layer at error 1.4 because its own baseline was 1.4 too)."""
    fmt = formats.get(slug)()
    encoded = fmt.quantize(weight) if scale is None else fmt.quantize(weight, scale)
    return relative_error(fmt.dequantize(encoded, tuple(weight.shape)), weight)


def ceiling_error(slug: str, weight: torch.Tensor, scale: torch.Tensor) -> float:
    """The format's own worst case on these rows (Format.error_ceiling: its number grid alone); inf when the format
    states none."""
    ceiling = formats.get(slug).error_ceiling(weight, scale)
    return math.inf if ceiling is None else ceiling


def _finding(path: Any, layer: str, message: str, evidence: dict | None = None) -> Finding:
    return Finding(GATE_RULE, "excess-error", Severity.ERROR, message, str(path), layer, evidence or {})


def check_layer(written: Any, out_model: Any, source: Any, lp: Any,
                amax: float | None) -> tuple[list[Finding], dict | None]:
    """Scale check and tile roundtrip of one written quantized layer. (findings, {rel_error, baseline} or None)."""
    slug, path = written.format, out_model.path
    name = lp.source.tensors["weight"].name
    rows, cols = source.reader.tensors[name].shape
    if amax is None:
        amax = source_amax(source.reader, lp.source)
    dtype = DECODED_DTYPE if is_fp8_source(lp.source) else source.reader.tensors[name].dtype
    scale = expected_scale(slug, amax, dtype)
    stored = written.load(SCALE_ROLE[slug]).to(torch.float32).reshape(())
    if not abs(float(stored) - float(scale)) <= SCALE_TOLERANCE * float(scale):
        return [_finding(path, lp.name, f"{SCALE_ROLE[slug]} is {float(stored):.6g}, the source's amax gives "
                                        f"{float(scale):.6g}: the per-tensor scale does not belong to this weight",
                         {"stored": float(stored), "expected": float(scale)})], None
    fmt = formats.get(slug)()
    err_sq = base_sq = ceil_sq = ref_sq = 0.0
    for start, stop in row_tiles(rows, cols):
        reference = source_rows(source.reader, lp.source, start, stop)
        tile = written_tile(written, out_model.reader, slug, start, stop)
        decoded = fmt.dequantize(tile, (stop - start, cols)).to(torch.float32)
        norm = float(torch.linalg.vector_norm(reference)) ** 2
        err_sq += relative_error(decoded, reference) ** 2 * norm
        base_sq += baseline_error(slug, reference, scale) ** 2 * norm
        ceil_sq += ceiling_error(slug, reference, scale) ** 2 * norm
        ref_sq += norm
    err, base, ceiling = (math.sqrt(v / ref_sq) if ref_sq else 0.0 for v in (err_sq, base_sq, ceil_sq))
    measured = {"rel_error": err, "baseline": base, "ceiling": ceiling}
    if not err <= ERROR_RATIO * base + ERROR_MARGIN:
        return [_finding(path, lp.name, f"decodes with relative error {err:.4g}, the {slug} reference codec gives "
                                        f"{base:.4g} on the same rows: the written bytes are not a correct encoding",
                         measured)], measured
    if not err <= ceiling:
        return [_finding(path, lp.name, f"decodes with relative error {err:.4g}, above {ceiling:.4g}, the most any "
                                        f"correct {slug} encoding of these rows can err: the written bytes are "
                                        "wrong whatever the baseline says", measured)], measured
    return [], measured


def _canonical(conf: Any) -> str:
    """A conf as comparable text: `true` and `1` differ here, as they would to a stricter reader than ComfyUI."""
    return json.dumps(conf, sort_keys=True)


def _tensor_conf(reader: Any, key: str) -> tuple[Any, str | None]:
    """(decoded conf or None when there is no such tensor, why it cannot be read)."""
    info = reader.tensors.get(key)
    if info is None:
        return None, None
    if info.dtype != "U8" or info.nbytes > MAX_MARKER_BYTES:
        return None, f"{key} is {info.dtype} with {info.nbytes} bytes, not a U8 JSON marker"
    try:
        return decode_marker_bytes(reader.read_bytes(key)), None
    except ValueError as exc:
        return None, f"{key} is {exc}"


def _marker_finding(path: Any, layer: str | None, cause: str, message: str, evidence: dict) -> Finding:
    return Finding(MARKER_RULE, cause, Severity.ERROR, message, str(path), layer, evidence)


def marker_findings(out_model: Any, plan: Any) -> list[Finding]:
    """Every written marker must be the conf the plan decided (flag included), in the `.comfy_quant` tensor and in
    `_quantization_metadata` alike; kept layers must have neither, and the metadata may name no other layer."""
    path, reader = out_model.path, out_model.reader
    parsed = out_model.file_markers.get("quantization_metadata")
    error = out_model.file_markers.get("quantization_metadata_error")
    findings: list[Finding] = []
    planned = [lp for lp in plan.layers if lp.source is not None]
    if error is not None:
        return [_marker_finding(path, None, "invalid-quant-marker", error, {})]
    if any(lp.quantized for lp in planned) and (parsed is None or parsed.get("format_version") != "1.0"):
        found = None if parsed is None else parsed.get("format_version")
        return [_marker_finding(path, None, "missing-quant-marker" if parsed is None else "invalid-quant-marker",
                                f"_quantization_metadata is {'absent' if parsed is None else 'not version 1.0'}; "
                                "the plan quantizes layers", {"format_version": found})]
    in_metadata = dict(parsed["layers"]) if parsed is not None else {}
    for lp in planned:
        want = lp.conf
        tensor, unreadable = _tensor_conf(reader, f"{lp.name}.comfy_quant")
        meta = in_metadata.pop(lp.name, None)
        evidence = {"planned": want, "tensor": tensor, "metadata": meta}
        if unreadable is not None:
            findings.append(_marker_finding(path, lp.name, "invalid-quant-marker", unreadable, evidence))
        elif want is None and (tensor is not None or meta is not None):
            findings.append(_marker_finding(path, lp.name, "invalid-quant-marker",
                                            f"the plan keeps this layer ({lp.action}) but the file marks it "
                                            "quantized", evidence))
        elif want is not None and (tensor is None or meta is None):
            where = " and ".join(n for n, c in (("comfy_quant tensor", tensor), ("metadata", meta)) if c is None)
            findings.append(_marker_finding(path, lp.name, "missing-quant-marker",
                                            f"planned {lp.action} but its {where} marker is missing", evidence))
        elif want is not None and _canonical(tensor) != _canonical(meta):
            findings.append(_marker_finding(path, lp.name, "invalid-quant-marker",
                                            f"comfy_quant says {_canonical(tensor)} but _quantization_metadata says "
                                            f"{_canonical(meta)}", evidence))
        elif want is not None and _canonical(tensor) != _canonical(want):
            findings.append(_marker_finding(path, lp.name, "invalid-quant-marker",
                                            f"marker says {_canonical(tensor)}, the plan decided {lp.action} "
                                            f"({_canonical(want)})", evidence))
    for name in sorted(in_metadata):
        findings.append(_marker_finding(path, name, "invalid-quant-marker",
                                        "_quantization_metadata names a layer this conversion did not write",
                                        {"metadata": in_metadata[name]}))
    return findings


class TileChecker:
    """The gate's roundtrip, one sampled layer at a time: convert calls check() right after a sampled layer is
    written (the temporary file's header is final from the start, so its layers can be opened before the data is
    complete), which hides the checks behind the stream; run_gate then only lints."""

    def __init__(self, path: str | Path, source: Any, plan: Any, sample: int = 8) -> None:
        self.source = source
        self.sampled = {lp.name: lp for lp in sample_evenly([lp for lp in plan.layers if lp.quantized], sample)}
        self.findings: list[Finding] = []
        self.errors: dict[str, dict[str, float]] = {}
        self._out = open_model(path)
        self._by_native = {layer.native_name or layer.name: layer for layer in self._out.layers.values()}

    def wants(self, name: str) -> bool:
        return name in self.sampled

    def check(self, name: str, amax: float | None = None) -> None:
        """Check the written layer `name` (a sampled one) against the source; amax: its source weight's max |w|."""
        lp = self.sampled[name]
        written = self._by_native.get(name)
        if written is None or written.format not in SCALE_ROLE:
            return  # missing or unreadable layers are lint's findings
        try:
            found, measured = check_layer(written, self._out, self.source, lp, amax)
        except Exception as exc:  # noqa: BLE001 - undecodable bytes are a finding, not a crash
            found, measured = [_finding(self._out.path, name, f"cannot be decoded: {exc}")], None
        self.findings += found
        if measured is not None:
            self.errors[name] = measured

    def check_all(self, amax: Mapping[str, float] | None = None) -> None:
        for name in self.sampled:
            if name not in self.errors:
                self.check(name, (amax or {}).get(name))

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> TileChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def roundtrip_sample(out_model: Any, source: Any, plan: Any, sample: int,
                     amax: Mapping[str, float] | None = None) -> tuple[list[Finding], dict]:
    """Tile roundtrip of `sample` quantized layers of a complete written file. (findings, per-layer errors)."""
    with TileChecker(out_model.path, source, plan, sample) as checker:
        checker.check_all(amax)
    return checker.findings, checker.errors


def run_gate(path: str | Path, source: Any, plan: Any, sample: int = 8,
             source_amax: Mapping[str, float] | None = None, checked: TileChecker | None = None) -> GateReport:
    """Lint + sampled tile roundtrip of the written file at `path` (still the temporary file). source_amax: max |w|
    of each quantized layer's source weight by native name, as the conversion saw it (read again when absent).
    checked: a TileChecker that already checked layers while they were written (the rest are checked here)."""
    report = GateReport()
    with open_model(path) as out_model:
        lint, report.lint_ran = lint_findings(out_model)
        markers = marker_findings(out_model, plan)
    if checked is None:
        rt, report.layer_errors = roundtrip_sample(out_model, source, plan, sample, source_amax)
    else:
        checked.check_all(source_amax)
        rt, report.layer_errors = checked.findings, checked.errors
    report.findings = lint + markers + rt
    return report
