"""`nvdiag sensitivity` and `nvdiag calibrate`: which layers survive 4-bit activations, measured in ComfyUI itself.

The source model runs through ComfyUI (piece by piece when it is big, as verify does) on seeded synthetic inputs at
several noise levels and with several text contexts. Before every quantizable Linear layer a hook keeps what the
layer saw, bounded: each call's activation amax and a few of its rows (tokens). Per layer, on those rows, the layer's
output is then computed five ways and compared with full precision:

  w4a16         NVFP4 weights (comfy-kitchen, amax/2688), full-precision activations: every GPU but Blackwell
  w4a4_dynamic  NVFP4 weights and activations, each call's own amax/2688 (ComfyUI on Blackwell without input_scale)
  w4a4_static   the same with one calibrated scale for all calls (max over the calls' amax / 2688)
  fp8           FP8 weights (amax/448) and FP8 activations with the calibrated scale (max amax / 448)

Activations are quantized by ComfyUI's own `QuantizedTensor.from_float` with an explicit scale (the layout ComfyUI
multiplies with on Blackwell), weights by comfy-kitchen. risk = w4a4_dynamic / w4a16: about sqrt(2) when the
activations are as easy to quantize as the weights, far more for a layer whose activations have outlier channels.

A layer whose inputs were not finite in the reference forward (an overflow of ComfyUI's fp16 compute on a GPU), or
whose reference output is zero, has no relative error to measure: it is reported as not measurable, with why, after
every measured layer. It is never ranked, and the report holds no inf or NaN for it (JSON has neither).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inspect_tools.comfyui import forward, loading, pieces, reference
from inspect_tools.comfyui.runtime import ComfyRuntime
from inspect_tools.errors import InputError, UsageError
from inspect_tools.layers import CheckpointModel
from reference_specs import models

REPORT_KIND = "nvdiag-sensitivity"
ROWS_PER_LAYER = 256  # activation rows kept per layer, spread over its calls: bounded whatever the model size
NVFP4_DIVISOR = 448.0 * 6.0  # F8_E4M3_MAX * F4_E2M1_MAX: amax/2688 is NVFP4's per-tensor decode scale
FP8_DIVISOR = 448.0
# w4a4 far above w4a16: the same FAR as verify uses for a file against its baseline
RISKY = 2.0


@dataclass
class Capture:
    """What one layer saw: per call, its amax and a few of its rows."""

    amax: list[float] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LayerSensitivity:
    layer: str
    params: int
    w4a16: float  # the four errors are NaN when the layer is not measurable
    w4a4_dynamic: float
    w4a4_static: float
    fp8: float
    act_amax: float
    act_amax_calls: list[float]
    not_measurable: str | None = None  # why no error could be measured (then the errors mean nothing)

    @property
    def measured(self) -> bool:
        return self.not_measurable is None

    @property
    def risk(self) -> float:
        """w4a4_dynamic / w4a16; NaN when not measurable (NaN > RISKY is False: never counted at risk), 0 when both
        are exact, inf when only W4A16 is exact (weights exactly representable, activations not)."""
        if not self.measured:
            return math.nan
        if self.w4a16 > 0:
            return self.w4a4_dynamic / self.w4a16
        return math.inf if self.w4a4_dynamic > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        amax_calls = [_r(a) for a in self.act_amax_calls]
        if not self.measured:  # no error keys at all: absent, not a number that is not one
            return {"layer": self.layer, "params": self.params, "not_measurable": self.not_measurable,
                    "act_amax": _r(self.act_amax), "act_amax_calls": amax_calls}
        return {
            "layer": self.layer, "params": self.params, "w4a16": _r(self.w4a16),
            "w4a4_dynamic": _r(self.w4a4_dynamic), "w4a4_static": _r(self.w4a4_static), "fp8": _r(self.fp8),
            "risk": _r(self.risk), "act_amax": _r(self.act_amax), "act_amax_calls": amax_calls,
        }


def _r(value: float) -> float | None:
    """6 significant digits; None (JSON null) for inf and NaN, which JSON cannot hold."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def rank(layers: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Most at risk first; the layers that could not be measured after all of them, by name: an unknown is not a
    risk to rank (preset from-sensitivity keeps them out of W4A4 all the same)."""
    return sorted(layers, key=lambda r: (0, -r.risk, r.layer) if r.measured else (1, 0.0, r.layer))


@dataclass
class SensitivityResult:
    source: str
    architecture: str
    steps: int
    prompts: int
    seed: int
    pieces: int
    sigmas: list[float]
    layers: list[LayerSensitivity]  # most at risk first
    activations: str | None = None  # the user's activation file, when the inputs came from one

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "kind": REPORT_KIND,
            "source": self.source,
            "architecture": self.architecture,
            "inputs": self._inputs(),
            "pieces": self.pieces,
            "not_measurable": len(self.not_measurable()),
            "layers": [layer.to_json() for layer in self.layers],
        }

    def not_measurable(self) -> list[LayerSensitivity]:
        return [layer for layer in self.layers if not layer.measured]

    def advice(self) -> str:
        """What to do about the layers that could not be measured (one line), or ""."""
        lost = self.not_measurable()
        if not lost:
            return ""
        names = ", ".join(layer.layer for layer in lost[:5]) + (" ..." if len(lost) > 5 else "")
        overflow = any(str(layer.not_measurable).startswith("non-finite activations") for layer in lost)
        hint = ("" if not overflow else " Capture without the overflow (FP32 or BF16 compute) to measure them"
                if self.activations is not None else " On a GPU, --device cpu computes in FP32 and measures them")
        return (f"{len(lost)} layer(s) not measurable, left out of the ranking ({names}): {lost[0].not_measurable}"
                + ("" if len({layer.not_measurable for layer in lost}) == 1 else ", among others")
                + "; preset from-sensitivity keeps them out of W4A4." + hint)

    def describe_inputs(self) -> str:
        if self.activations is not None:
            return f"activations captured by the user ({self.activations})"
        return f"{self.steps} noise levels x {self.prompts} text contexts (seeded, synthetic)"

    def _inputs(self) -> dict[str, Any]:
        if self.activations is not None:
            return {"what": f"activations captured by the user, read from {self.activations}",
                    "file": self.activations}
        return {
            "what": "seeded Gaussian latents at the noise levels below (beside a Gaussian reference latent for an "
                    "edit model ComfyUI knows as one: Qwen Image Edit 2511), Gaussian text contexts (no text encoder "
                    "is run); activations of real prompts differ, the ranking is what carries over",
            "steps": self.steps, "prompts": self.prompts, "seed": self.seed,
            "sigmas": [_r(s) for s in self.sigmas], "rows_per_layer": ROWS_PER_LAYER,
        }


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    norm = float(ref.double().norm())
    return float((out - ref).double().norm()) / norm if norm > 0 else 0.0


def _fake_quantize(runtime: ComfyRuntime, x: torch.Tensor, layout: str, scale: float) -> torch.Tensor:
    return forward.fake_quantize(runtime, x, layout, torch.tensor(scale, dtype=torch.float32))


def _why_not_measurable(capture: Capture, w: torch.Tensor, where: str) -> str | None:
    """Why the layer has no error to measure, or None. A call counts as non-finite when its amax (over the whole
    call) or the rows kept of it are; then the dynamic scale, the reference output and every error are NaN/inf."""
    bad = sum(1 for amax, rows in zip(capture.amax, capture.rows, strict=True)
              if not math.isfinite(amax) or not bool(torch.isfinite(rows).all()))
    if bad:
        return f"non-finite activations in {bad} of {len(capture.amax)} calls {where}"
    if not bool(torch.isfinite(w).all()):
        return "non-finite weights in the source"
    return None


def _unmeasurable(name: str, w: torch.Tensor, capture: Capture, why: str) -> LayerSensitivity:
    finite = [a for a in capture.amax if math.isfinite(a)]
    return LayerSensitivity(layer=name, params=w.numel(), w4a16=math.nan, w4a4_dynamic=math.nan,
                            w4a4_static=math.nan, fp8=math.nan, act_amax=max(finite) if finite else math.nan,
                            act_amax_calls=list(capture.amax), not_measurable=why)


def measure(runtime: ComfyRuntime, name: str, weight: torch.Tensor, capture: Capture,
            where: str = "of the reference forward") -> LayerSensitivity:
    """The four errors of one layer on the rows it saw (float32), or the layer marked not measurable and why.
    where: where the activations came from, for that why."""
    w = weight.detach().float().cpu()
    why = _why_not_measurable(capture, w, where)
    if why is not None:
        return _unmeasurable(name, w, capture, why)
    x = torch.cat(capture.rows).float()
    y = x @ w.T
    if not bool(torch.isfinite(y).all()):
        return _unmeasurable(name, w, capture, "the full-precision output overflows float32 on these activations")
    if not bool(y.any()):
        return _unmeasurable(name, w, capture, "the full-precision output is zero on these activations (all-zero "
                                               "inputs or weights): no relative error exists")
    w4 = reference.nvfp4_decoded(w)
    w8 = reference.fp8_decoded(w)
    # each call's rows with that call's own dynamic scale, as ComfyUI scales a whole activation tensor per call
    dynamic = torch.cat([
        _fake_quantize(runtime, rows.float(), "TensorCoreNVFP4Layout", max(amax, 1e-30) / NVFP4_DIVISOR)
        for rows, amax in zip(capture.rows, capture.amax, strict=True)
    ])
    static_amax = max(capture.amax)
    static = _fake_quantize(runtime, x, "TensorCoreNVFP4Layout", max(static_amax, 1e-30) / NVFP4_DIVISOR)
    x8 = _fake_quantize(runtime, x, "TensorCoreFP8E4M3Layout", max(static_amax, 1e-30) / FP8_DIVISOR)
    errors = [_relative(x @ w4.T, y), _relative(dynamic @ w4.T, y), _relative(static @ w4.T, y),
              _relative(x8 @ w8.T, y)]
    if not all(math.isfinite(e) for e in errors):  # finite inputs, so a quantizer's fault: say so, rank nothing
        return _unmeasurable(name, w, capture, "a quantized output is not finite although the inputs are")
    return LayerSensitivity(layer=name, params=w.numel(), w4a16=errors[0], w4a4_dynamic=errors[1],
                            w4a4_static=errors[2], fp8=errors[3], act_amax=static_amax,
                            act_amax_calls=list(capture.amax))


def _capture_hook(captures: dict[str, Capture], name: str, per_call: int) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        capture = captures.setdefault(name, Capture())
        capture.amax.append(float(flat.abs().max()))
        # evenly spaced tokens: image and text positions alike, deterministic
        index = torch.linspace(0, flat.shape[0] - 1, min(per_call, flat.shape[0])).round().long()
        capture.rows.append(flat[index.to(flat.device)].float().cpu())

    return hook


def candidates(model: CheckpointModel) -> set[str]:
    """Native names of the 2-D Linear layers a preset may quantize (the profile's sensitive layers excluded)."""
    profile = models.get_profile(model.detection.variant)
    out = set()
    for layer in model.layers.values():
        weight = layer.tensors.get("weight")
        native = layer.native_name or layer.name
        if weight is None or len(weight.shape) != 2:
            continue
        if profile is not None and profile.sensitive(native) is not None:
            continue
        out.add(native)
    return out


def rows_per_call(steps: int, prompts: int) -> int:
    """Rows kept of each call of a layer: ROWS_PER_LAYER spread over its steps x prompts calls."""
    return max(4, ROWS_PER_LAYER // (steps * prompts))


def sensitivity(runtime: ComfyRuntime, source: CheckpointModel, steps: int = 3, prompts: int = 2, seed: int = 0,
                progress: Callable[[str], None] | None = None, blocks_at_once: int | None = None,
                keep: dict[str, Capture] | None = None) -> SensitivityResult:
    """Run SRC through ComfyUI, capture every candidate layer's inputs, and measure each layer's four errors.
    keep: when given, every layer's capture is also left there (for save_activations)."""
    from inspect_tools.comfyui.verify import plan_pieces

    if steps < 1 or prompts < 1:
        raise UsageError("--steps and --prompts must be at least 1")
    if not reference.has_float_values(source):
        raise InputError("the source must hold real values (FP32/FP16/BF16 or GGUF): sensitivity is measured "
                         "against full precision", str(source.path))
    say = progress or (lambda _msg: None)
    wanted = candidates(source)
    plan = plan_pieces(source, blocks_at_once)
    per_call = rows_per_call(steps, prompts)
    inputs: list[forward.StepInput] = []
    carry: list[dict[str, torch.Tensor]] | None = None
    results: list[LayerSensitivity] = []
    for number, piece in enumerate(plan, 1):
        where = "" if piece.whole else f" (blocks {piece.start}-{piece.stop - 1}, piece {number} of {len(plan)})"
        say(f"loading the source{where}")
        loaded = loading.load(runtime, reference.native_state_dict(source, piece), label=str(source.path),
                              metadata=pieces.piece_metadata(source.metadata, piece))
        if loaded.patcher is None:
            raise InputError(f"ComfyUI cannot load the source: {loaded.report.error_type}: {loaded.report.error}",
                             str(source.path))
        try:
            if not inputs:
                inputs = [step for p in range(prompts)
                          for step in forward.make_inputs(loaded.patcher, steps, seed + 7919 * p)]
            captures: dict[str, Capture] = {}
            modules: dict[str, torch.nn.Module] = {}
            handles = []
            for inner, module in loaded.patcher.model.diffusion_model.named_modules():
                name = piece.restore(inner)
                if name in wanted and getattr(module, "weight", None) is not None and hasattr(module, "in_features"):
                    if number > 1 and pieces.BLOCK_KEY.match(name) is None:
                        continue  # tensors outside the blocks are in every piece: measured once, in the first
                    modules[name] = module
                    handles.append(module.register_forward_pre_hook(_capture_hook(captures, name, per_call)))
            say(f"running the source{where}")
            try:
                out = forward.run(runtime, loaded.patcher, inputs, "w4a16", carry=carry)
            finally:
                for handle in handles:
                    handle.remove()
            carry = [step.carry for step in out]
            say(f"measuring {len(captures)} layers{where}")
            origin = (f"of the reference forward (ComfyUI computing in {loaded.report.compute_dtype}"
                      + (": an fp16 overflow?)" if loaded.report.compute_dtype == "float16" else ")"))
            for name, capture in captures.items():
                results.append(measure(runtime, name, modules[name].weight, capture, origin))
            if keep is not None:
                keep.update(captures)
        finally:
            loaded.release(runtime)
    results = rank(results)
    return SensitivityResult(source=str(source.path), architecture=source.detection.variant, steps=steps,
                             prompts=prompts, seed=seed, pieces=len(plan), sigmas=[s.sigma for s in inputs[:steps]],
                             layers=results)


MAX_ACTIVATION_ROWS = 1 << 16  # per layer: a sample, not a dump; 65536 rows of a 13824-wide FFN input are 3.6 GB


def captures_from_file(path: str, source: CheckpointModel) -> dict[str, tuple[Capture, torch.Tensor]]:
    """Activations the user captured (real prompts, a real sampler) instead of the synthetic run.

    The file is a safetensors file: per layer, `<layer>` float rows [N, in_features] (the layer's inputs, tokens as
    rows, native or diffusers names), and optionally `<layer>.amax` [calls]: each call's activation amax, the rows
    then being N/calls per call in call order. Without it the rows are one call. Everything is checked against the
    source: a layer it does not have, or rows of another width, is an error naming the tensor."""
    from inspect_tools.readers.safetensors_reader import SafetensorsReader

    wanted = candidates(source)
    layers = {layer.native_name or layer.name: layer for layer in source.layers.values()}
    reader = SafetensorsReader(Path(path))
    out: dict[str, tuple[Capture, torch.Tensor]] = {}
    try:
        names = [info.name for info in reader if not info.name.endswith(".amax")]
        if not names:
            raise InputError("no activation tensors in this file (expected <layer> rows [N, in_features])", path)
        for name in sorted(names):
            native = models.native_name(source.detection, name)
            if native not in wanted:
                raise InputError(f"{name}: not a quantizable Linear layer of {source.path.name}", path)
            weight = layers[native].tensors["weight"]
            info = reader.tensors[name]
            if len(info.shape) != 2 or info.shape[1] != weight.shape[1] or not 0 < info.shape[0] <= MAX_ACTIVATION_ROWS:
                raise InputError(f"{name}: rows must be [N, {weight.shape[1]}] with 0 < N <= {MAX_ACTIVATION_ROWS}, "
                                 f"got {list(info.shape)}", path)
            # non-finite rows or maxima are what a capture in fp16 gives when the model overflows: not a broken
            # file but a layer that cannot be measured, reported as such (measure says so)
            rows = reader.load_float(name)
            amax_name = f"{name}.amax"
            if amax_name in reader.tensors:
                amax = reader.load_float(amax_name).flatten()
                calls = amax.numel()
                if calls == 0 or rows.shape[0] % calls or bool((amax < 0).any()):
                    raise InputError(f"{amax_name}: must hold one non-negative amax per call, and the rows "
                                     f"({rows.shape[0]}) must split evenly into them ({calls})", path)
                chunks = list(rows.split(rows.shape[0] // calls))
                capture = Capture(amax=[_amax(float(a), c) for a, c in zip(amax, chunks, strict=True)], rows=chunks)
            else:
                capture = Capture(amax=[_amax(0.0, rows)], rows=[rows])
            out[native] = (capture, layers[native].load("weight").float())
    finally:
        reader.close()
    return out


def _amax(given: float, rows: torch.Tensor) -> float:
    """A call's amax: the larger of the one given and the rows' own; NaN when either is NaN (max() would hide it)."""
    seen = float(rows.abs().max())
    return math.nan if math.isnan(given) or math.isnan(seen) else max(given, seen)


def sensitivity_from_activations(runtime: ComfyRuntime, source: CheckpointModel, path: str) -> SensitivityResult:
    """Measure every layer the activation file holds, one layer at a time; the model itself is not run."""
    if not reference.has_float_values(source):
        raise InputError("the source must hold real values (FP32/FP16/BF16 or GGUF): sensitivity is measured "
                         "against full precision", str(source.path))
    results = rank([measure(runtime, name, weight, capture, "in the activation file")
                    for name, (capture, weight) in captures_from_file(path, source).items()])
    return SensitivityResult(source=str(source.path), architecture=source.detection.variant, steps=0, prompts=0,
                             seed=0, pieces=1, sigmas=[], layers=results, activations=Path(path).name)


def input_scales(result: SensitivityResult, percentile: float = 100.0, margin: float = 1.25) -> dict[str, float]:
    """Static input_scale per layer: the percentile of the calls' activation amax, times margin, / 2688. A layer
    with a non-finite maximum gets none (see uncalibrated)."""
    if not 0 < percentile <= 100:
        raise UsageError("--percentile must be in (0, 100]")
    if not margin >= 1.0:
        raise UsageError("--margin must be at least 1 (below it, activations seen in calibration are clipped)")
    out = {}
    for layer in result.layers:
        if not all(math.isfinite(a) for a in layer.act_amax_calls):
            continue  # an inf or NaN maximum is no scale: the layer stays dynamic (calibrate names them)
        calls = torch.tensor(layer.act_amax_calls, dtype=torch.float64)
        amax = float(torch.quantile(calls, percentile / 100.0)) if calls.numel() else 0.0
        if amax > 0:
            out[layer.layer] = amax * margin / NVFP4_DIVISOR
    return dict(sorted(out.items()))


def uncalibrated(result: SensitivityResult) -> list[str]:
    """Layers input_scales leaves dynamic because their activations were not finite."""
    return [layer.layer for layer in result.layers if not all(math.isfinite(a) for a in layer.act_amax_calls)]


# --save-activations: what the run captured, in the file --activations reads, so a capture can be measured again (other
# thresholds, another nvdiag) without running the model. Bounded: a few hundred float32 rows per layer, about 60 MB
# a block of WAN A14B at the defaults (2.4 GB for a whole 40-block expert); a larger estimate is refused before any
# forward runs, and the rows are kept in memory until the end (the file's header needs every shape).
MAX_SAVED_ACTIVATION_BYTES = 4 * 1024**3


def saved_activation_bytes(source: CheckpointModel, steps: int, prompts: int) -> int:
    """Upper bound of --save-activations' file: every candidate layer, rows_per_call x calls rows of float32."""
    rows = rows_per_call(steps, prompts) * steps * prompts
    widths = {layer.native_name or layer.name: int(layer.tensors["weight"].shape[1]) for layer in source.layers.values()
              if layer.tensors.get("weight") is not None and len(layer.tensors["weight"].shape) == 2}
    return sum(4 * (rows * widths[name] + steps * prompts) for name in candidates(source) if name in widths)


def check_saved_size(source: CheckpointModel, steps: int, prompts: int) -> None:
    estimate = saved_activation_bytes(source, steps, prompts)
    if estimate > MAX_SAVED_ACTIVATION_BYTES:
        raise UsageError(f"--save-activations would write about {estimate / 1024**3:.1f} GiB for {steps} steps x "
                         f"{prompts} prompts, above the {MAX_SAVED_ACTIVATION_BYTES / 1024**3:.0f} GiB it allows: "
                         "lower --steps or --prompts")


def save_activations(path: str | Path, captures: dict[str, Capture], source: str, steps: int, prompts: int,
                     seed: int, overwrite: bool = True) -> Path:
    """Write the captures as --activations reads them: `<layer>` float32 rows [calls x rows, in_features] in call
    order and `<layer>.amax` [calls], each call's amax over the whole call (inf/NaN kept: the layer reads back as
    not measurable, as it was). Every call of a layer keeps as many rows as its smallest one, so the rows split
    evenly into the calls. Atomic: a temporary file beside `path`, renamed when complete."""
    from inspect_tools.writer import SafetensorsWriter

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(captures):
        capture = captures[name]
        if not capture.rows:
            continue
        n = min(rows.shape[0] for rows in capture.rows)
        tensors[name] = torch.cat([rows[:n] for rows in capture.rows]).float().contiguous()
        tensors[f"{name}.amax"] = torch.tensor(capture.amax, dtype=torch.float32)
    if not tensors:
        raise InputError("no layer was captured: nothing to save", str(source))
    metadata = {"nvdiag": "activations captured by nvdiag sensitivity (rows: each layer's inputs)",
                "source": Path(source).name, "steps": str(steps), "prompts": str(prompts), "seed": str(seed)}
    entries = [(name, "F32", list(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, entries, metadata, overwrite=overwrite) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.commit()
