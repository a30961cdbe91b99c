"""`convert`: plan -> stream-encode into a temporary file -> gate (lint + sampled roundtrip) -> rename into place.

The header is written from the plan, then the layers stream through three overlapping stages
(converter/stages.py): a reader thread preads the next layers' source tensors into reused (on the GPU path pinned)
buffers, the calling thread checks them for NaN/Inf and encodes (on the CPU or the GPU), a writer thread pwrites the
outputs, in memory bounded by a few of the largest quantized layers (large kept tensors are streamed in chunks by
the encoding thread, Stages.stream_kept). A NaN/Inf source weight or a gate finding aborts the
writer, which removes its temporary file: nothing is published and the inputs are never touched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converter import encode as enc
from converter import stages
from converter.fp8_source import decode_sources
from converter.fp16_range import keep_overflowing_at_bf16
from converter.gate import GateReport, TileChecker, run_gate
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
from converter.preset import Preset, canonical_format, load_preset
from converter.stages import Stages
from inspect_tools.cuda_warm_up import CudaWarmUp
from inspect_tools.errors import OutputError, UsageError
from inspect_tools.layers import open_model
from reference_specs import models
from reference_specs.findings import Finding

# Told how far the stream is: (layers written, layers planned, the layer just handed to the writer); called with
# (0, planned, "") when the stream starts. The CLI draws its progress bar from it: the converter renders nothing.
ProgressFn = Callable[[int, int, str], None]


def nvdiag_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvdiag")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "0+unknown"


@dataclass
class ConvertResult:
    plan: ConversionPlan
    out: Path
    dry_run: bool = False
    written: bool = False
    non_finite: dict[str, int] = field(default_factory=dict)  # source layer -> count of NaN/Inf
    gate: GateReport | None = None
    seconds: float = 0.0
    # seconds per phase (plan, stream, gate, commit) and spent working in each streaming stage (*_busy)
    timings: dict[str, float] = field(default_factory=dict)

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
    if plan.widened:  # layers the preset wanted at F16 whose values FP16 cannot hold (converter/fp16_range.py)
        doc["kept_bf16"] = {name: f"{amax:.6g}" for name, amax in sorted(plan.widened.items())}
    if plan.lossy_source:  # an FP8 source (converter/fp8_source.py): its rounding is in this file too
        doc["source_lossy"] = dict(sorted(plan.lossy_source.items()))
    return json.dumps(doc, sort_keys=True)


def output_metadata(plan: ConversionPlan, sources: list[Path], dtype_16: str | None,
                    input_scales: Path | None) -> dict[str, str]:
    meta = dict(plan.metadata)
    if any(lp.quantized for lp in plan.layers):
        meta[QUANT_METADATA_KEY] = quantization_metadata(plan)
    meta[PROVENANCE_KEY] = provenance(plan, sources, dtype_16, input_scales)
    return meta


def stage_sources(lp: LayerPlan, src: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The layer's source tensors where they are used: a quantized weight goes to the encoding device (from a pinned
    buffer the copy is asynchronous), everything else stays on the CPU to be cast and written."""
    if device == "cpu" or not lp.quantized:
        return src
    key = lp.source.tensors["weight"].name
    return {**src, key: src[key].to(device, non_blocking=True)}


def produce_layer(lp: LayerPlan, src: dict[str, torch.Tensor], device: str,
                  streamed: Collection[str] = (), amax: float | None = None) -> dict[str, torch.Tensor]:
    """The output tensors of one planned layer (on the CPU), by output name, from its loaded source tensors; outputs
    made from a `streamed` source (written in chunks by Stages.stream_kept) are left out. amax: the quantized
    weight's max |w| where check_sources measured it (the encoder then skips its own pass)."""
    out: dict[str, torch.Tensor] = {}
    encoded: dict[str, torch.Tensor] = {}
    if lp.quantized:
        encoded = enc.encode(lp.codec, src[lp.source.tensors["weight"].name], device, amax)
    for t in lp.tensors:
        if t.source is not None and t.source in streamed:
            continue
        if t.role == "comfy_quant":
            out[t.name] = torch.frombuffer(bytearray(comfy_quant_bytes(lp.action)), dtype=torch.uint8)
        elif t.role == "input_scale":
            out[t.name] = torch.tensor(lp.input_scale, dtype=torch.float32)
        elif t.role == "marker" and t.source is None:  # a variant marker the source lacked: key presence only
            out[t.name] = torch.zeros(t.shape, dtype=enc.TORCH_DTYPE[t.dtype])
        elif lp.quantized and t.role in encoded:
            out[t.name] = encoded[t.role]
        else:
            out[t.name] = enc.cast(src[t.source], t.dtype, reuse=True)  # src holds this layer's own buffers
    return out


def check_sources(lp: LayerPlan, src: dict[str, torch.Tensor]) -> tuple[int, float | None]:
    """(NaN/Inf count over the layer's source tensors, max |w| of its quantized weight or None), in one pass each:
    the amax is what the gate checks the written per-tensor scale against."""
    weight_key = lp.source.tensors["weight"].name if lp.quantized else None
    bad, amax = 0, None
    for key, tensor in src.items():
        count, extreme = enc.finite_check(tensor)
        bad += count
        if key == weight_key:
            amax = extreme
    return bad, amax


def presized(writer: Any) -> Path:
    """The writer's temporary file at its final length (a sparse hole until written), so that it opens as a complete
    safetensors file for the gate's per-layer checks before its last tensor is written."""
    os.truncate(writer.temp_path, writer.total_bytes)
    return writer.temp_path


def split_buffers(outputs: dict[str, torch.Tensor],
                  buffers: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(source buffers that outputs still view, buffers free now). An encoded layer's outputs are new tensors, so
    its source buffer goes back to the pool as soon as it is encoded (on the GPU path the encoder's copies back to
    the CPU have synchronised the device, so the host-to-device copy out of it is complete); a kept tensor written
    as it was read is a view of its buffer, which returns once written."""
    viewed = {t.untyped_storage().data_ptr() for t in outputs.values()}
    held = [b for b in buffers if b.untyped_storage().data_ptr() in viewed]
    done = [b for b in buffers if b.untyped_storage().data_ptr() not in viewed]
    return held, done


def overlapped_checks(device: str, checker: TileChecker,
                      source_amax: dict[str, float]) -> Callable[[str], None] | None:
    """The writer thread's hook that runs the gate's checks as sampled layers land, on the GPU path only. On a CPU
    conversion the checks' torch ops would run parallel regions beside the encoder's on the same cores, and each
    region waits for its slowest thread: measured on 2 cores, a 2 GB conversion took 3.3-3.5 s with them overlapped
    and 2.3 s with them after the stream (where run_gate does them, ~0.1 s)."""
    if device == "cpu":
        return None
    return lambda name: check_written(checker, name, source_amax)


def check_written(checker: TileChecker, name: str, source_amax: dict[str, float]) -> None:
    """The gate's roundtrip of a sampled layer, right after it was written (in the writer thread, while the other
    stages keep the disk and the encoder busy)."""
    if checker.wants(name):
        checker.check(name, source_amax.get(name))


class PhaseClock:
    """Seconds spent in each phase of a conversion (reported in ConvertResult.timings, read by the benchmarks)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.timings[phase] = now - self._last
        self._last = now


def resolve_preset(preset: Preset | str | Path) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(preset)


def prepare(src: str | Path, preset: Preset | str | Path, dtype_16: str | None = None,
            input_scales: str | Path | None = None):
    """Open the source and build the plan (shared by convert and --dry-run)."""
    dtype_16 = None if dtype_16 is None else canonical_format(dtype_16)
    if dtype_16 not in (None, "bf16", "fp16"):
        raise UsageError(f"--dtype-16 must be bf16 or fp16 (f16), not {dtype_16!r}")
    preset = resolve_preset(preset)
    model = open_model(src)
    try:
        scales = None
        if input_scales is not None:
            known = {layer.native_name or layer.name for layer in model.layers.values()}
            scales = load_input_scales(input_scales, known, lambda n: models.native_name(model.detection, n))
        plan = build_plan(model, preset, dtype_16=dtype_16, input_scales=scales)
        keep_overflowing_at_bf16(plan, model.reader)
        if scales == {}:  # a valid but empty file: the run is right (dynamic scales), but not what was asked for
            plan.warnings.insert(0, f"{input_scales}: holds no input scales; none was applied (ComfyUI computes "
                                    "activation scales dynamically)")
    except BaseException:
        model.close()
        raise
    return model, plan


def encoder_kernels(device: torch.device) -> None:
    """The stream's CUDA work, once: a host-to-device copy, the source check, every encoder, the copy back."""
    weight = torch.linspace(-6.0, 6.0, 256 * 512).reshape(256, 512).to(device, non_blocking=True)
    enc.finite_check(weight)
    for action in enc.ENCODERS:
        enc.encode(action, weight, device)


def warm_up(device: str) -> CudaWarmUp | None:
    """Start the CUDA warm-up for a conversion on `device` (None on the CPU): context, pinned memory, and the
    encoder's kernels unless stages.GPU_WARM_KERNELS is off (read at run time: benchmarks switch it off for A/B
    runs)."""
    if device != "cuda":
        return None
    return CudaWarmUp(device, encoder_kernels if stages.GPU_WARM_KERNELS else None)


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch on this machine")
    return device


def convert(src: str | Path, out: str | Path, preset: Preset | str | Path, *, dtype_16: str | None = None,
            input_scales: str | Path | None = None, dry_run: bool = False, force: bool = False,
            device: str = "cpu", progress: ProgressFn | None = None, gate_sample: int = 8, threads: bool = True,
            extra_gate: Callable[[Path], list[Finding]] | None = None) -> ConvertResult:
    """Convert SRC into a ComfyUI-native mixed NVFP4 file at OUT. Returns what happened; raises NvdiagError for
    bad input or a refused output path (exit 2). `result.refused` (exit 1) when a source weight is not finite
    or the gate finds an error in what was written; then OUT does not exist (or keeps its old content).
    threads=False reads, encodes and writes one layer after the other (same bytes, no overlap).
    progress: told after each layer is handed to the writer (ProgressFn).
    extra_gate: a further check of the written temporary file (ComfyUI itself, for --verify); its errors refuse."""
    from inspect_tools.writer import SafetensorsWriter, check_output_path, ensure_free_space

    started = time.monotonic()
    clock = PhaseClock()
    mark = clock.mark
    check_device(device)
    warming = warm_up(device)
    out = Path(out)
    model, plan = prepare(src, preset, dtype_16, input_scales)
    with model:
        result = ConvertResult(plan=plan, out=out, dry_run=dry_run, timings=clock.timings)
        mark("plan")
        if dry_run:
            return result
        sources = list(model.reader.files)
        check_output_path(out, sources)
        if out.exists() and not force:
            raise OutputError("exists; pass --force to overwrite it", str(out))
        ensure_free_space(out.parent, plan.output_bytes)
        meta = output_metadata(plan, sources, dtype_16, Path(input_scales) if input_scales else None)
        source_amax: dict[str, float] = {}  # quantized layer -> max |w| of its source weight, for the gate
        encode_busy = 0.0
        # reading starts while the CUDA context may still be starting (pageable buffers until it is up); the
        # encoder's first CUDA call waits for it (torch's lazy init is thread-safe)
        pin_ready = warming.context_ready if warming is not None else None
        pin_after = warming.wait_context if warming is not None else None
        try:
            # overwrite only with --force: without it, a run that another process beat to OUT is refused at publishing
            with SafetensorsWriter(out, plan.entries, meta, overwrite=force) as writer, \
                    TileChecker(presized(writer), model, plan, gate_sample) as checker, \
                    Stages(model.reader, plan, writer, pinned=device == "cuda", threaded=threads,
                           after_write=overlapped_checks(device, checker, source_amax),
                           pin_ready=pin_ready, pin_after=pin_after) as stages:
                written = 0  # layers handed to the writer, for `progress`
                if progress is not None:
                    progress(written, len(plan.layers), "")
                for job in stages.jobs():
                    encode_started = time.perf_counter()
                    lp = job.plan
                    # FP8 source tensors dequantized where they are used (on the GPU path after the 1-byte copy)
                    src = decode_sources(lp.decode, stage_sources(lp, job.src, device))
                    bad, amax = check_sources(lp, src)
                    bad += stages.stream_kept(job, write=not (bad or result.non_finite))
                    if amax is not None:
                        source_amax[lp.name] = amax
                    if bad:
                        result.non_finite[lp.source.name if lp.source else lp.name] = bad
                    if result.non_finite:  # refusing: keep reading only to name every bad layer
                        stages.release(job.buffers)
                        continue
                    outputs = produce_layer(lp, src, device, job.streamed, amax)
                    encode_busy += time.perf_counter() - encode_started
                    held, done = split_buffers(outputs, job.buffers)
                    stages.release(done)
                    stages.write(lp.name, outputs, held)
                    del src, job
                    if progress is not None:
                        written += 1
                        progress(written, len(plan.layers), lp.name)
                if result.non_finite:
                    order = {lp.source.name if lp.source else lp.name: i for i, lp in enumerate(plan.layers)}
                    result.non_finite = dict(sorted(result.non_finite.items(), key=lambda kv: order.get(kv[0], 0)))
                    raise _Abort()
                stages.finish()
                writer.sync_early()  # the output's write-out to the disk overlaps with the gate's checks
                mark("stream")
                result.timings.update({f"{k}_busy": v for k, v in {**stages.busy, "encode": encode_busy}.items()})
                if stages.chunks is not None:  # how much came from the disk rather than the page cache
                    result.timings["direct_read_gb"] = stages.chunks.direct_bytes / 1e9
                result.gate = run_gate(writer.temp_path, model, plan, sample=gate_sample, source_amax=source_amax,
                                       checked=checker)
                if extra_gate is not None and not result.gate.failed:
                    result.gate.findings += extra_gate(writer.temp_path)
                mark("gate")
                if result.gate.failed:
                    raise _Abort()
                writer.commit()
                mark("commit")
                result.written = True
        except _Abort:
            pass
        finally:
            if warming is not None:
                warming.join()
    result.seconds = time.monotonic() - started
    return result

