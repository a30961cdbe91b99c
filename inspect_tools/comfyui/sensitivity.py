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
"""

from __future__ import annotations

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
    w4a16: float
    w4a4_dynamic: float
    w4a4_static: float
    fp8: float
    act_amax: float
    act_amax_calls: list[float]

    @property
    def risk(self) -> float:
        return self.w4a4_dynamic / self.w4a16 if self.w4a16 > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "params": self.params, "w4a16": _r(self.w4a16),
            "w4a4_dynamic": _r(self.w4a4_dynamic), "w4a4_static": _r(self.w4a4_static), "fp8": _r(self.fp8),
            "risk": _r(self.risk), "act_amax": _r(self.act_amax),
            "act_amax_calls": [_r(a) for a in self.act_amax_calls],
        }


def _r(value: float) -> float:
    return float(f"{value:.6g}")


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
            "layers": [layer.to_json() for layer in self.layers],
        }

    def describe_inputs(self) -> str:
        if self.activations is not None:
            return f"activations captured by the user ({self.activations})"
        return f"{self.steps} noise levels x {self.prompts} text contexts (seeded, synthetic)"

    def _inputs(self) -> dict[str, Any]:
        if self.activations is not None:
            return {"what": f"activations captured by the user, read from {self.activations}",
                    "file": self.activations}
        return {
            "what": "seeded Gaussian latents at the noise levels below, Gaussian text contexts (no text encoder "
                    "is run); activations of real prompts differ, the ranking is what carries over",
            "steps": self.steps, "prompts": self.prompts, "seed": self.seed,
            "sigmas": [_r(s) for s in self.sigmas], "rows_per_layer": ROWS_PER_LAYER,
        }


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    norm = float(ref.double().norm())
    return float((out - ref).double().norm()) / norm if norm > 0 else 0.0


def _fake_quantize(runtime: ComfyRuntime, x: torch.Tensor, layout: str, scale: float) -> torch.Tensor:
    return forward.fake_quantize(runtime, x, layout, torch.tensor(scale, dtype=torch.float32))


def measure(runtime: ComfyRuntime, name: str, weight: torch.Tensor, capture: Capture) -> LayerSensitivity:
    """The four errors of one layer on the rows it saw (float32)."""
    w = weight.detach().float().cpu()
    x = torch.cat(capture.rows).float()
    y = x @ w.T
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
    return LayerSensitivity(
        layer=name, params=w.numel(), w4a16=_relative(x @ w4.T, y), w4a4_dynamic=_relative(dynamic @ w4.T, y),
        w4a4_static=_relative(static @ w4.T, y), fp8=_relative(x8 @ w8.T, y), act_amax=static_amax,
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


def sensitivity(runtime: ComfyRuntime, source: CheckpointModel, steps: int = 3, prompts: int = 2, seed: int = 0,
                progress: Callable[[str], None] | None = None, blocks_at_once: int | None = None) -> SensitivityResult:
    """Run SRC through ComfyUI, capture every candidate layer's inputs, and measure each layer's four errors."""
    from inspect_tools.comfyui.verify import plan_pieces

    if steps < 1 or prompts < 1:
        raise UsageError("--steps and --prompts must be at least 1")
    if not reference.has_float_values(source):
        raise InputError("the source must hold real values (FP32/FP16/BF16 or GGUF): sensitivity is measured "
                         "against full precision", str(source.path))
    say = progress or (lambda _msg: None)
    wanted = candidates(source)
    plan = plan_pieces(source, blocks_at_once)
    per_call = max(4, ROWS_PER_LAYER // (steps * prompts))
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
            for name, capture in captures.items():
                results.append(measure(runtime, name, modules[name].weight, capture))
        finally:
            loaded.release(runtime)
    results.sort(key=lambda r: (-r.risk, r.layer))
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
            rows = reader.load_float(name)
            if not bool(torch.isfinite(rows).all()):
                raise InputError(f"{name}: non-finite activation values", path)
            amax_name = f"{name}.amax"
            if amax_name in reader.tensors:
                amax = reader.load_float(amax_name).flatten()
                calls = amax.numel()
                bad = not bool(torch.isfinite(amax).all()) or bool((amax < 0).any())
                if calls == 0 or rows.shape[0] % calls or bad:
                    raise InputError(f"{amax_name}: must hold one finite, non-negative amax per call, and the rows "
                                     f"({rows.shape[0]}) must split evenly into them ({calls})", path)
                chunks = list(rows.split(rows.shape[0] // calls))
                capture = Capture(amax=[max(float(a), float(c.abs().max())) for a, c in zip(amax, chunks, strict=True)],
                                  rows=chunks)
            else:
                capture = Capture(amax=[float(rows.abs().max())], rows=[rows])
            out[native] = (capture, layers[native].load("weight").float())
    finally:
        reader.close()
    return out


def sensitivity_from_activations(runtime: ComfyRuntime, source: CheckpointModel, path: str) -> SensitivityResult:
    """Measure every layer the activation file holds, one layer at a time; the model itself is not run."""
    if not reference.has_float_values(source):
        raise InputError("the source must hold real values (FP32/FP16/BF16 or GGUF): sensitivity is measured "
                         "against full precision", str(source.path))
    results = [measure(runtime, name, weight, capture)
               for name, (capture, weight) in captures_from_file(path, source).items()]
    results.sort(key=lambda r: (-r.risk, r.layer))
    return SensitivityResult(source=str(source.path), architecture=source.detection.variant, steps=0, prompts=0,
                             seed=0, pieces=1, sigmas=[], layers=results, activations=Path(path).name)


def input_scales(result: SensitivityResult, percentile: float = 100.0, margin: float = 1.25) -> dict[str, float]:
    """Static input_scale per layer: the percentile of the calls' activation amax, times margin, / 2688."""
    if not 0 < percentile <= 100:
        raise UsageError("--percentile must be in (0, 100]")
    if not margin >= 1.0:
        raise UsageError("--margin must be at least 1 (below it, activations seen in calibration are clipped)")
    out = {}
    for layer in result.layers:
        calls = torch.tensor(layer.act_amax_calls, dtype=torch.float64)
        amax = float(torch.quantile(calls, percentile / 100.0)) if calls.numel() else 0.0
        if amax > 0:
            out[layer.layer] = amax * margin / NVFP4_DIVISOR
    return dict(sorted(out.items()))
