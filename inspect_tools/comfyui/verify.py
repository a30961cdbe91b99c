"""`nvdiag verify`: what ComfyUI itself loads and renders from a file, against a reference.

Three models run through ComfyUI's own code, one after the other (only one is in memory at a time):
REF (the truth), FILE (the user's file) and BASELINE (REF encoded into FILE's per-layer formats by comfy-kitchen: what
a correct file of the same layer selection renders). FILE's output error is judged against BASELINE's: a correct file
gives the same error (x1.0 when it was made from REF itself), a broken one a multiple of it. Where FILE renders
wrongly, nvdiag's per-layer decode (roundtrip) names the cause. Where FILE is BASELINE byte for byte as ComfyUI
receives them (what a correct conversion of REF writes), FILE's run stands for both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from inspect_tools.comfyui import forward, loading, pieces, reference
from inspect_tools.comfyui.runtime import ComfyRuntime
from inspect_tools.errors import InputError, UsageError
from inspect_tools.layers import CheckpointModel
from reference_specs import models
from reference_specs.findings import Finding, Severity

# A correct file renders BASELINE's error: x1.0 when made from REF by comfy-kitchen's rules, within a few percent when
# made from an equivalent source (FP16 vs FP32), about x1.2-1.6 against a lossy reference (GGUF Q4_0, FP8), whose own
# error adds in quadrature. Twice the baseline's error is beyond all of these and below every format fault measured.
FAR = 2.0
# relative L2 errors below this are float noise (FP32 against itself gives exactly 0 on the CPU)
FLOOR = 1e-6
QUANTIZED_FORMATS = reference.NVFP4_FORMATS | reference.FP8_FORMATS
BASELINE_LABEL = "baseline (comfy-kitchen)"


@dataclass
class Comparison:
    """One model's outputs against REF's, on one compute path."""

    name: str  # "file" or "baseline"
    compute: str
    rel_l2: list[float]  # per step, final output
    cosine: list[float]
    psnr_db: list[float]
    blocks: list[float]  # per block, mean over steps of the block output's relative L2
    finite: bool

    @property
    def error(self) -> float:
        return max(self.rel_l2) if self.rel_l2 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "compute": self.compute,
            "rel_l2": _round(self.error),
            "rel_l2_per_step": [_round(v) for v in self.rel_l2],
            "cosine_min": _round(min(self.cosine)) if self.cosine else None,
            "psnr_db_min": _round(min(self.psnr_db)) if self.psnr_db else None,
            "blocks": [_round(v) for v in self.blocks],
            "finite": self.finite,
        }


def _round(value: float, digits: int = 6) -> float | str:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)


def _metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    diff = (out - ref).double()
    ref64 = ref.double()
    norm = float(ref64.norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    denom = float(out.double().norm()) * norm
    cosine = float((out.double() * ref64).sum()) / denom if denom > 0 else 1.0
    mse = float((diff * diff).mean())
    peak = float(ref64.abs().max()) if ref64.numel() else 0.0
    psnr = 10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else math.inf
    return rel, cosine, psnr


def block_errors(outputs: list[forward.StepOutput], ref: list[forward.StepOutput]) -> list[float]:
    """Per block of one piece: the relative L2 of its output against REF's, averaged over the steps."""
    n_blocks = len(ref[0].blocks) if ref else 0
    sums = [0.0] * n_blocks
    for mine, theirs in zip(outputs, ref, strict=True):
        for i, (b_mine, b_ref) in enumerate(zip(mine.blocks, theirs.blocks, strict=False)):
            sums[i] += _metrics(b_mine, b_ref)[0]
    return [total / max(len(outputs), 1) for total in sums]


def compare(name: str, compute: str, outputs: list[forward.StepOutput], ref: list[forward.StepOutput],
            blocks: list[float]) -> Comparison:
    """The final outputs of every step against REF's, with the per-block errors gathered piece by piece."""
    rel, cos, psnr = [], [], []
    finite = True
    for mine, theirs in zip(outputs, ref, strict=True):
        finite = finite and bool(torch.isfinite(mine.output).all())
        r, c, p = _metrics(mine.output, theirs.output)
        rel.append(r if math.isfinite(r) else math.inf)
        cos.append(c if math.isfinite(c) else -1.0)
        psnr.append(p)
    return Comparison(name=name, compute=compute, rel_l2=rel, cosine=cos, psnr_db=psnr, blocks=blocks, finite=finite)


@dataclass
class PathResult:
    """FILE and BASELINE on one compute path, and the verdict numbers."""

    compute: str
    file: Comparison
    baseline: Comparison | None
    reference_factor: float = 1.0  # Baseline.reference_factor: a lossy reference's own error, in quadrature

    @property
    def expected(self) -> float | None:
        return self.baseline.error * self.reference_factor if self.baseline is not None else None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None:
            return None
        if not self.file.finite or not math.isfinite(self.file.error):
            return math.inf
        return self.file.error / max(self.expected or 0.0, FLOOR)

    @property
    def overflow(self) -> bool:
        """A correct file's output is not finite either: the compute dtype overflows, not the file's fault."""
        return not self.file.finite and self.baseline is not None and not self.baseline.finite

    @property
    def far(self) -> bool:
        if self.overflow:
            return False
        ratio = self.ratio
        return (ratio is not None and ratio > FAR) or not self.file.finite

    def first_wrong_block(self, block_names: list[str]) -> str | None:
        """The first block whose output error is more than FAR x the baseline's there: where the fault enters."""
        if self.baseline is None:
            return None
        for name, mine, base in zip(block_names, self.file.blocks, self.baseline.blocks, strict=False):
            if not math.isfinite(mine) or mine > FAR * max(base * self.reference_factor, FLOOR):
                return name
        return None

    def to_json(self, block_names: list[str]) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "compute": self.compute,
            "file": self.file.to_json(),
            "baseline": self.baseline.to_json() if self.baseline else None,
            "expected": _round(self.expected) if self.expected is not None else None,
            "ratio": _round(ratio) if ratio is not None else None,
            "far_above_baseline": self.far,
            "first_wrong_block": self.first_wrong_block(block_names),
        }


@dataclass
class VerifyResult:
    path: Path
    ref_path: Path
    runtime: ComfyRuntime
    steps: int
    seed: int
    file_report: loading.LoadReport
    ref_report: loading.LoadReport
    baseline_report: loading.LoadReport | None
    baseline_note: str
    paths: list[PathResult] = field(default_factory=list)
    block_names: list[str] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    pieces: int = 1  # loads per model: 1 = the whole model at once

    def verdict(self) -> str:
        if not self.file_report.loaded or any(f.rule == "V102" for f in self.findings):
            return "ComfyUI refuses this file: it cannot render anything from it"
        errors = [f for f in self.findings if f.severity == Severity.ERROR]
        if errors:
            causes = ", ".join(sorted({f.cause for f in errors}))
            if any(f.rule.startswith("V") for f in errors):
                return f"ComfyUI renders this file wrongly: {causes}"
            layers = len({f.layer for f in errors})
            return (f"ComfyUI's output on these inputs looks right, but {layers} layer(s) decode wrongly: {causes} "
                    "(other inputs will show it)")
        if any(p.overflow for p in self.paths):
            return ("inconclusive: a correct file's output is not finite either (the compute dtype overflows on these "
                    "inputs); the per-layer decode found nothing")
        if not self.paths or all(p.baseline is None for p in self.paths):
            return "ComfyUI loads and runs this file (no baseline to judge its error against)"
        return "ComfyUI renders this file as well as a correct file of the same layer selection"

    def summary(self) -> dict[str, Any]:
        return {
            "comfyui": str(self.runtime.root),
            "comfyui_version": self.runtime.version,
            "device": self.runtime.device,
            "steps": self.steps,
            "seed": self.seed,
            "sigmas": [_round(s) for s in self.sigmas],
            "baseline": self.baseline_note,
            "pieces": self.pieces,
            "verdict": self.verdict(),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "file_load": self.file_report.to_json(),
            "ref_load": self.ref_report.to_json(),
            "baseline_load": self.baseline_report.to_json() if self.baseline_report else None,
            "compute": [p.to_json(self.block_names) for p in self.paths],
            "blocks": list(self.block_names),
        }


def _finding(rule: str, cause: str, severity: Severity, path: Path, message: str, layer: str | None = None,
             **evidence: Any) -> Finding:
    return Finding(rule=rule, cause=cause, severity=severity, file=str(path), layer=layer, message=message,
                   evidence=evidence)


def refusal_cause(error: str, model: CheckpointModel) -> str:
    """Which catalogue cause a ComfyUI exception message points to (its wording: comfy/ops.py, comfy/sd.py)."""
    text = error.lower()
    if "missing nvfp4 scales" in text:
        missing_block = any(layer.format == "nvfp4" and not layer.has("weight_scale")
                            for layer in model.layers.values())
        return "missing-block-scale" if missing_block else "missing-tensor-scale"
    if "could not detect model type" in text:
        return "diffusers-key-names" if model.detection.naming == "diffusers" else "unknown-architecture"
    if "quantization format" in text or "expecting value" in text or "keyerror" in text:
        return "invalid-quant-marker"
    if "size mismatch" in text or "shape" in text or "mat1 and mat2" in text:
        unmarked = any(layer.tensors.get("weight") is not None and layer.tensors["weight"].dtype == "U8"
                       and layer.marker is None for layer in model.layers.values())
        return "missing-quant-marker" if unmarked else "wrong-shape"
    return "comfyui-refused"


def _load_findings(report: loading.LoadReport, model: CheckpointModel, path: Path) -> list[Finding]:
    findings = []
    if not report.loaded:
        cause = refusal_cause(f"{report.error_type} {report.error}", model)
        findings.append(_finding("V101", cause, Severity.ERROR, path,
                                 f"ComfyUI refuses to load the file: {report.error_type}: {report.error}",
                                 comfyui_error=report.error, comfyui_error_type=report.error_type))
        return findings
    quantized_here = {layer.native_name or layer.name for layer in model.layers.values()
                      if layer.format in QUANTIZED_FORMATS}
    held = set(report.quantized_layers)
    plain = sorted(quantized_here - held)
    if plain:
        findings.append(_finding("V103", "missing-quant-marker", Severity.ERROR, path,
                                 f"{len(plain)} layers stored quantized were loaded by ComfyUI as plain weights "
                                 f"(first: {plain[0]})", layers=plain[:50]))
    if report.left_over:
        findings.append(_finding("V104", "comfyui-ignored-tensors", Severity.WARNING, path,
                                 f"ComfyUI left {len(report.left_over)} tensors of the file unused "
                                 f"(first: {report.left_over[0]})", keys=report.left_over[:50]))
    return findings


def _attribute(file_model: CheckpointModel, ref_model: CheckpointModel) -> tuple[list[str], list[Finding]]:
    """Causes of the layers nvdiag's per-layer decode finds wrong (roundtrip), and its findings."""
    from inspect_tools.roundtrip import roundtrip

    result = roundtrip(file_model, ref_model)
    causes: dict[str, int] = {}
    for layer in result.wrong:
        cause = layer.cause or "excess-error"
        causes[cause] = causes.get(cause, 0) + 1
    return sorted(causes, key=lambda c: -causes[c]), result.findings


def _path_findings(result: VerifyResult, file_model: CheckpointModel, ref_model: CheckpointModel,
                   decoded: tuple[list[str], list[Finding]] | None) -> None:
    path = result.path
    attributed = decoded
    by_compute = {p.compute: p for p in result.paths}
    for p in result.paths:
        if p.overflow:
            result.findings.append(_finding(
                "V203", "compute-overflow", Severity.WARNING, path,
                f"ComfyUI's output ({p.compute}, compute {result.file_report.compute_dtype}) is not finite for a "
                "correct file of this layer selection either: the model overflows on these inputs, so the output "
                "comparison proves nothing; the per-layer decode still holds", compute=p.compute))
    for p in result.paths:
        if not p.far:
            continue
        if attributed is None:
            attributed = _attribute(file_model, ref_model) if reference.has_float_values(ref_model) else ([], [])
        causes = list(attributed[0])
        w4a16 = by_compute.get("w4a16")
        if p.compute == "w4a4" and w4a16 is not None and not w4a16.far:
            has_static = any(layer.has("input_scale") for layer in file_model.layers.values())
            cause = "input-scale-implausible" if has_static else "activation-sensitive-w4a4"
            message = (f"with activations quantized to NVFP4 (Blackwell, emulated) the output error is "
                       f"{_fmt_ratio(p.ratio)} a correct file's, while W4A16 is fine"
                       + ("; the file's static input_scale values are the difference" if has_static else ""))
        else:
            if not p.file.finite and _has_non_finite_scales(file_model):
                causes = ["non-finite-scale", *[c for c in causes if c != "non-finite-scale"]]
            cause = causes[0] if causes else "excess-error"
            where = p.first_wrong_block(result.block_names)
            message = (f"ComfyUI's output ({p.compute}) is {_fmt_ratio(p.ratio)} the error a correct file gives "
                       f"(relative L2 {p.file.error:.4g}, expected {p.expected:.4g})"
                       + (f"; the error enters at {where}" if where else "")
                       + (f"; per-layer decode: {', '.join(causes)}" if causes else ""))
        result.findings.append(_finding("V201", cause, Severity.ERROR, path, message, compute=p.compute,
                                        ratio=p.ratio, error=p.file.error,
                                        baseline_error=p.baseline.error if p.baseline else None,
                                        first_wrong_block=p.first_wrong_block(result.block_names),
                                        causes=causes))
    # W4A4 itself, on a correct file: how much Blackwell's activation quantization costs this layer selection
    # W4A4 itself, on a correct file: how much Blackwell's activation quantization costs this layer selection
    w4a4, w4a16 = by_compute.get("w4a4"), by_compute.get("w4a16")
    if w4a4 and w4a16 and w4a4.baseline and w4a16.baseline and not w4a4.far:
        cost = w4a4.baseline.error / max(w4a16.baseline.error, FLOOR)
        if cost > FAR:
            result.findings.append(_finding(
                "V202", "activation-sensitive-w4a4", Severity.INFO, path,
                f"on Blackwell (W4A4) this layer selection renders {cost:.2f}x the W4A16 error even from a correct "
                "file: mark activation-sensitive layers full_precision_matrix_mult or keep them at FP8/16-bit",
                w4a4_error=w4a4.baseline.error, w4a16_error=w4a16.baseline.error))


def _has_non_finite_scales(file_model: CheckpointModel) -> bool:
    """lint's value rules say whether a scale is NaN, Inf, zero or negative: the usual reason for NaN outputs."""
    from inspect_tools.lint import lint_model

    return any(f.cause == "non-finite-scale" for f in lint_model(file_model))


def _reference_errors(ref_model: CheckpointModel) -> dict[str, float]:
    """Native layer name -> the typical relative error of the reference's own format (roundtrip's e_ref)."""
    from inspect_tools.roundtrip import reference_error

    return {layer.native_name or layer.name: reference_error(layer) for layer in ref_model.layers.values()}


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "?"
    return "infinitely" if not math.isfinite(ratio) else f"{ratio:.2f}x"


def memory_budget() -> int:
    """Bytes verify lets one loaded model use: half of what the machine has available now."""
    try:
        import psutil  # ComfyUI itself needs it

        return int(psutil.virtual_memory().available * 0.5)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)


def plan_pieces(ref_model: CheckpointModel, per_piece: int | None) -> list[pieces.Piece]:
    """The whole model when it fits in memory_budget() (or per_piece blocks at a time when given)."""
    sizes: dict[str, int] = {}
    for info in ref_model.reader:
        sizes[models.native_name(ref_model.detection, info.name)] = info.numel
    total = pieces.count_blocks(sizes)
    if per_piece is None:
        block_params = sum(n for k, n in sizes.items() if pieces.BLOCK_KEY.match(k))
        global_params = sum(sizes.values()) - block_params
        per_piece = pieces.blocks_at_once(global_params, block_params // max(total, 1), total, memory_budget())
    return pieces.split(total, per_piece if per_piece > 0 else total)


@dataclass
class _Run:
    """One model (REF, FILE or BASELINE) as it goes through the pieces."""

    carry: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)  # compute -> per step
    outputs: dict[str, list[forward.StepOutput]] = field(default_factory=dict)  # compute -> last piece's outputs
    blocks: dict[str, list[float]] = field(default_factory=dict)  # compute -> per-block errors so far
    reports: list[tuple[pieces.Piece, loading.LoadReport]] = field(default_factory=list)
    alive: bool = True
    run_error: tuple[str, str] | None = None  # (exception type, message) when ComfyUI loaded it but could not run it

    def run(self, runtime: ComfyRuntime, loaded: loading.LoadedModel, inputs: list[forward.StepInput],
            paths: tuple[str, ...], ref: _Run | None) -> None:
        for c in paths:
            out = forward.run(runtime, loaded.patcher, inputs, c, carry=self.carry.get(c))
            self.carry[c] = [step.carry for step in out]
            self.outputs[c] = out
            if ref is not None:
                theirs = ref.outputs.get(c) or ref.outputs["w4a16"]
                self.blocks.setdefault(c, []).extend(block_errors(out, theirs))

    def adopt(self, other: _Run, blocks_before: dict[str, int]) -> None:
        """Take `other`'s run of the piece just run as this model's own: the same state dict, handed to ComfyUI with
        the same carry, renders the same (blocks_before: other's block errors per compute path before the piece)."""
        for c, outputs in other.outputs.items():
            self.outputs[c] = outputs
            self.carry[c] = other.carry[c]
            self.blocks.setdefault(c, []).extend(other.blocks.get(c, [])[blocks_before.get(c, 0):])


def verify(
    runtime: ComfyRuntime,
    file_model: CheckpointModel,
    ref_model: CheckpointModel,
    compute: tuple[str, ...] = ("w4a16",),
    steps: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    blocks_at_once: int | None = None,
    decode: bool = True,
    reuse: bool = True,
) -> VerifyResult:
    """Load REF, FILE and BASELINE through ComfyUI in turn and compare what they render.

    A model too big for memory_budget() (or, with blocks_at_once, always) goes through ComfyUI piece by piece:
    the tensors outside the blocks plus a few blocks at a time, the last block's output carried to the next piece.
    decode: also decode every quantized layer against REF (nvdiag roundtrip) when REF holds real values: faults that
    the output on synthetic inputs hides are found there.
    reuse: where ComfyUI would receive BASELINE exactly as it received FILE (what a correct conversion of REF
    writes: reference.loads_as), FILE's run stands for BASELINE's instead of a third identical run."""
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if file_model.kind != "safetensors":
        raise UsageError(f"{file_model.path}: ComfyUI's Load Diffusion Model node reads one .safetensors file; "
                         f"this is {file_model.kind} (use it as --against, or `nvdiag roundtrip`)")
    say = progress or (lambda _msg: None)
    plan = plan_pieces(ref_model, blocks_at_once)
    ref_float = reference.has_float_values(ref_model)
    ref_errors = _reference_errors(ref_model) if ref_float else {}
    ref_run, file_run, base_run = _Run(), _Run(), _Run(alive=ref_float)
    inputs: list[forward.StepInput] = []
    block_names: list[str] = []
    filled: list[str] = []
    baseline_parts: list[reference.Baseline] = []
    baseline_note = "none: the reference is itself quantized (its values are not the truth)"
    adopted = 0  # pieces whose baseline ComfyUI would receive exactly as it received the file's
    base_follows_file = reuse  # every piece so far adopted: the baseline's carry is the file's
    for number, piece in enumerate(plan, 1):
        where = "" if piece.whole else f" (blocks {piece.start}-{piece.stop - 1}, piece {number} of {len(plan)})"
        say(f"loading the reference{where}")
        ref_values = None
        if ref_float or not reference.loads_as_is(ref_model) or not piece.whole:
            ref_values = reference.native_state_dict(ref_model, piece)
            if not reference.loads_as_is(ref_model) or not piece.whole:
                filled += reference.fill_from_file(ref_values, file_model, piece)
        use_path = piece.whole and reference.loads_as_is(ref_model)
        ref_loaded = loading.load(runtime, ref_model.path if use_path else dict(ref_values or {}),
                                  label=str(ref_model.path),
                                  metadata=None if use_path else pieces.piece_metadata(ref_model.metadata, piece))
        ref_run.reports.append((piece, ref_loaded.report))
        if not ref_loaded.report.loaded:
            raise InputError(f"ComfyUI cannot load the reference: {ref_loaded.report.error_type}: "
                             f"{ref_loaded.report.error}", str(ref_model.path))
        try:
            if not inputs:
                inputs = forward.make_inputs(ref_loaded.patcher, steps, seed)
            names = [name for name, _ in forward.block_modules(ref_loaded.patcher.model.diffusion_model)]
            block_names += [piece.restore(n) for n in names]
            ref_quantized = bool(ref_loaded.report.quantized)
            say(f"running the reference{where}")
            ref_run.run(runtime, ref_loaded, inputs, compute if ref_quantized else ("w4a16",), None)
        finally:
            ref_loaded.release(runtime)

        blocks_before = {c: len(v) for c, v in file_run.blocks.items()}
        file_metadata = file_model.metadata if piece.whole else pieces.piece_metadata(file_model.metadata, piece)
        if file_run.alive:
            say(f"loading the file{where}")
            if piece.whole:
                file_loaded = loading.load(runtime, file_model.path, label=str(file_model.path))
            else:
                file_loaded = loading.load(runtime, reference.file_state_dict(file_model, piece),
                                           label=str(file_model.path), metadata=file_metadata)
            file_run.reports.append((piece, file_loaded.report))
            file_run.alive = file_loaded.patcher is not None
            try:
                if file_run.alive:
                    say(f"running the file{where}")
                    file_run.run(runtime, file_loaded, inputs, compute, ref_run)
            except Exception as exc:  # ComfyUI loaded it but cannot run it: that is a refusal too
                file_run.alive = False
                file_run.run_error = (exc.__class__.__name__, " ".join(str(exc).split())[:500])
            finally:
                file_loaded.release(runtime)

        if base_run.alive and file_run.alive and ref_values is not None:
            say(f"building the baseline{where}")
            baseline = reference.baseline_state_dict(file_model, ref_values, ref_errors, piece)
            baseline_parts.append(baseline)
            if baseline.state_dict is None:
                base_run.alive, baseline_note = False, baseline.note
            elif (base_follows_file and file_run.alive and
                  reference.loads_as(file_model, piece, file_metadata, baseline.state_dict)):
                say(f"the file is the baseline{where}: its run serves for both")
                base_run.reports.append((piece, replace(file_run.reports[-1][1], source=BASELINE_LABEL)))
                base_run.adopt(file_run, blocks_before)
                adopted += 1
            else:
                base_follows_file = False
                base_loaded = loading.load(runtime, baseline.state_dict, label=BASELINE_LABEL)
                base_run.reports.append((piece, base_loaded.report))
                try:
                    if base_loaded.patcher is None:
                        base_run.alive = False
                        baseline_note = f"not built: ComfyUI refused it ({base_loaded.report.error})"
                    else:
                        say(f"running the baseline{where}")
                        base_run.run(runtime, base_loaded, inputs, compute, ref_run)
                finally:
                    base_loaded.release(runtime)
        del ref_values

    total = plan[-1].total
    file_report = loading.merge(file_run.reports, total)
    result = VerifyResult(path=file_model.path, ref_path=ref_model.path, runtime=runtime, steps=steps, seed=seed,
                          file_report=file_report, ref_report=loading.merge(ref_run.reports, total),
                          baseline_report=loading.merge(base_run.reports, total) if base_run.reports else None,
                          baseline_note=baseline_note, block_names=block_names,
                          sigmas=[s.sigma for s in inputs], pieces=len(plan))
    result.findings.extend(_load_findings(file_report, file_model, file_model.path))
    if file_run.run_error is not None:
        kind, message = file_run.run_error
        cause = refusal_cause(f"{kind} {message}", file_model)
        result.findings.append(_finding("V102", cause, Severity.ERROR, file_model.path,
                                        f"ComfyUI loads the file but fails to run it: {kind}: {message}",
                                        comfyui_error=message, comfyui_error_type=kind))
        result.baseline_note = "not built: the file did not run"
        return result
    if not file_run.alive:
        result.baseline_note = "not built: the file did not load"
        return result
    factor = 1.0
    if base_run.alive and baseline_parts:
        encoded = sum(b.encoded for b in baseline_parts)
        merged = reference.Baseline(None, "", encoded=encoded, fmt_err2=sum(b.fmt_err2 for b in baseline_parts),
                                    ref_err2=sum(b.ref_err2 for b in baseline_parts))
        factor = merged.reference_factor
        result.baseline_note = reference.describe(encoded, factor)
        if adopted:
            result.baseline_note += ("; the file is this baseline byte for byte as ComfyUI receives it, so the "
                                     "file's run served for both")
    if filled:
        result.baseline_note += f"; taken from the file, which the reference lacks: {', '.join(dict.fromkeys(filled))}"
    for c in compute:
        theirs = ref_run.outputs.get(c) or ref_run.outputs["w4a16"]
        file_cmp = compare("file", c, file_run.outputs[c], theirs, file_run.blocks.get(c, []))
        base_cmp = (compare("baseline", c, base_run.outputs[c], theirs, base_run.blocks.get(c, []))
                    if base_run.alive and c in base_run.outputs else None)
        result.paths.append(PathResult(compute=c, file=file_cmp, baseline=base_cmp, reference_factor=factor))
    decoded = None
    if decode and reference.has_float_values(ref_model) and any(
            layer.format in QUANTIZED_FORMATS for layer in file_model.layers.values()):
        say("decoding every quantized layer against the reference")
        decoded = _attribute(file_model, ref_model)
        _decode_findings(result, decoded[1])
    _path_findings(result, file_model, ref_model, decoded)
    return result


def _decode_findings(result: VerifyResult, findings: list[Finding]) -> None:
    """nvdiag's per-layer decode (roundtrip) of the same file: a layer can decode wrongly although these synthetic
    inputs hide it in the output (a stale scale on one cross-attention layer does); real prompts may not."""
    hidden = not any(p.far for p in result.paths)
    for finding in findings:
        if finding.severity <= Severity.INFO:
            continue
        if hidden:
            finding.message += " (ComfyUI's output on these inputs hides it; the layer is wrong all the same)"
        result.findings.append(finding)
