"""`convert`: plan -> stream-encode into a temporary file -> gate (lint + sampled roundtrip) -> rename into place.

Memory stays bounded by the largest tensor: the header is written from the plan, then each layer is read, encoded
and written before the next one is touched. A NaN/Inf source weight or a gate finding aborts the writer, which
removes its temporary file: nothing is published and the inputs are never touched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import converter
from converter import encode as enc
from converter.gate import GateReport, run_gate
from converter.input_scales import load_input_scales
from converter.plan import (
    PROVENANCE_KEY,
    QUANT_METADATA_KEY,
    ConversionPlan,
    LayerPlan,
    build_plan,
    comfy_quant_bytes,
    quantization_metadata,
)
from converter.preset import Preset, load_preset
from inspect_tools.errors import OutputError, UsageError
from inspect_tools.layers import open_model
from reference_specs import models

VERSION = getattr(converter, "__version__", None)


def nvdiag_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvdiag")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return VERSION or "0+unknown"


@dataclass
class ConvertResult:
    plan: ConversionPlan
    out: Path
    dry_run: bool = False
    written: bool = False
    non_finite: dict[str, int] = field(default_factory=dict)  # source layer -> count of NaN/Inf
    gate: GateReport | None = None
    seconds: float = 0.0

    @property
    def refused(self) -> bool:
        return bool(self.non_finite) or (self.gate is not None and self.gate.failed)


class _Abort(Exception):
    """Raised inside the writer's context so it removes the temporary file."""


def provenance(plan: ConversionPlan, sources: list[Path], dtype_16: str | None, input_scales: Path | None) -> str:
    """What made this file, without timestamps so two runs give identical bytes."""
    doc: dict[str, Any] = {
        "tool": "nvdiag convert",
        "version": nvdiag_version(),
        "preset": plan.preset.name,
        "preset_sha256": plan.preset.sha256,
        "sources": [p.name for p in sources],
        "architecture": plan.detection.variant,
    }
    if dtype_16:
        doc["dtype_16"] = dtype_16
    if input_scales is not None:
        doc["input_scales"] = input_scales.name
    return json.dumps(doc, sort_keys=True)


def output_metadata(plan: ConversionPlan, sources: list[Path], dtype_16: str | None,
                    input_scales: Path | None) -> dict[str, str]:
    meta = dict(plan.metadata)
    if any(lp.quantized for lp in plan.layers):
        meta[QUANT_METADATA_KEY] = quantization_metadata(plan)
    meta[PROVENANCE_KEY] = provenance(plan, sources, dtype_16, input_scales)
    return meta


def load_sources(lp: LayerPlan, load: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The source tensors of one planned layer, by source key (read once, used for the NaN check and encoding)."""
    return {t.source: load(t.source) for t in lp.tensors if t.source is not None}


def produce_layer(lp: LayerPlan, src: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The output tensors of one planned layer, by output name, from its loaded source tensors."""
    out: dict[str, torch.Tensor] = {}
    encoded: dict[str, torch.Tensor] = {}
    if lp.quantized:
        encoded = enc.encode(lp.action, src[lp.source.tensors["weight"].name], device)
    for t in lp.tensors:
        if t.role == "comfy_quant":
            out[t.name] = torch.frombuffer(bytearray(comfy_quant_bytes(lp.action)), dtype=torch.uint8)
        elif t.role == "input_scale":
            out[t.name] = torch.tensor(lp.input_scale, dtype=torch.float32)
        elif lp.quantized and t.role in encoded:
            out[t.name] = encoded[t.role]
        else:
            out[t.name] = enc.cast(src[t.source], t.dtype)
    return out


def count_non_finite(src: dict[str, torch.Tensor]) -> int:
    return sum(enc.non_finite(t) for t in src.values())


def _progress(enabled: bool, total_bytes: int):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from inspect_tools.cli.output import console

    progress = Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        MofNCompleteColumn(), console=console(stderr=True), transient=True)
    return progress


def resolve_preset(preset: Preset | str | Path) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(preset)


def prepare(src: str | Path, preset: Preset | str | Path, dtype_16: str | None = None,
            input_scales: str | Path | None = None):
    """Open the source and build the plan (shared by convert and --dry-run)."""
    if dtype_16 not in (None, "bf16", "fp16"):
        raise UsageError(f"--dtype-16 must be bf16 or fp16, not {dtype_16!r}")
    preset = resolve_preset(preset)
    model = open_model(src)
    try:
        scales = None
        if input_scales is not None:
            known = {layer.native_name or layer.name for layer in model.layers.values()}
            scales = load_input_scales(input_scales, known, lambda n: models.native_name(model.detection, n))
        plan = build_plan(model, preset, dtype_16=dtype_16, input_scales=scales)
    except BaseException:
        model.close()
        raise
    return model, plan


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch on this machine")
    return device


def convert(src: str | Path, out: str | Path, preset: Preset | str | Path, *, dtype_16: str | None = None,
            input_scales: str | Path | None = None, dry_run: bool = False, force: bool = False,
            device: str = "cpu", progress: bool = False, gate_sample: int = 8) -> ConvertResult:
    """Convert SRC into a ComfyUI-native mixed NVFP4 file at OUT. Returns what happened; raises NvdiagError for
    bad input or a refused output path (exit 2). `result.refused` (exit 1) when a source weight is not finite
    or the gate finds an error in what was written; then OUT does not exist (or keeps its old content)."""
    from inspect_tools.writer import SafetensorsWriter, check_output_path, ensure_free_space

    started = time.monotonic()
    check_device(device)
    out = Path(out)
    model, plan = prepare(src, preset, dtype_16, input_scales)
    with model:
        result = ConvertResult(plan=plan, out=out, dry_run=dry_run)
        if dry_run:
            return result
        sources = list(model.reader.files)
        check_output_path(out, sources)
        if out.exists() and not force:
            raise OutputError("exists; pass --force to overwrite it", str(out))
        ensure_free_space(out.parent, plan.output_bytes)
        meta = output_metadata(plan, sources, dtype_16, Path(input_scales) if input_scales else None)
        load = model.reader.load
        bar = _progress(progress, plan.output_bytes)
        try:
            with SafetensorsWriter(out, plan.entries, meta) as writer:
                task = bar.add_task("convert", total=len(plan.layers)) if bar else None
                if bar:
                    bar.start()
                for lp in plan.layers:
                    src = load_sources(lp, load)
                    bad = count_non_finite(src)
                    if bad:
                        result.non_finite[lp.source.name if lp.source else lp.name] = bad
                    if result.non_finite:  # refusing: keep reading only to name every bad layer
                        continue
                    for name, tensor in produce_layer(lp, src, device).items():
                        writer.write(name, tensor)
                    del src
                    if bar:
                        bar.advance(task)
                if result.non_finite:
                    raise _Abort()
                _flush(writer)
                result.gate = run_gate(_temp_path(writer), model, plan, sample=gate_sample)
                if result.gate.failed:
                    raise _Abort()
                writer.commit()
                result.written = True
        except _Abort:
            pass
        finally:
            if bar:
                bar.stop()
    result.seconds = time.monotonic() - started
    return result


def _temp_path(writer: Any) -> Path:
    for attr in ("temp_path", "tmp_path", "tmp", "temp"):
        value = getattr(writer, attr, None)
        if value is not None:
            return Path(value)
    raise RuntimeError("SafetensorsWriter exposes no temporary path to verify")


def _flush(writer: Any) -> None:
    flush = getattr(writer, "flush", None)
    if callable(flush):
        flush()
