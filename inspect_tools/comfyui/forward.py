"""Run a ComfyUI-loaded denoiser the way the sampler does, on seeded synthetic inputs, block by block.

`patcher.model.apply_model(x, sigma, c_crossattn=context)` is the call ComfyUI's samplers make at every step
(shared/comfyui.md). Inputs are seeded: the starting latent of a sampler is plain Gaussian noise, and a latent at
noise level sigma of a flow model is sigma * noise + (1 - sigma) * x0; the text context is Gaussian too (no text
encoder is loaded); an edit model also gets a Gaussian reference latent (`ref_latents`, what its workflows give).
Every transformer block's output is recorded through ComfyUI's block-replacement hook, so a
single wrong block is visible even when the final output hides it.

Compute paths:
- "w4a16": what the CPU and every GPU before Blackwell do: each quantized layer's weight is dequantized by
  comfy-kitchen and multiplied in the compute dtype (ComfyUI disables NVFP4 compute there, comfy/ops.py).
- "w4a4": Blackwell emulated: before each NVFP4 (and FP8) layer, the activation is quantized with ComfyUI's own
  `QuantizedTensor.from_float(x, layout, scale=input_scale)` (input_scale from the file, or the dynamic
  amax/2688 when absent; FP8 without input_scale uses 1.0) and dequantized again, which is what a native FP4 matmul
  sees; layers whose marker says `full_precision_matrix_mult` are left in full precision, as on Blackwell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inspect_tools.comfyui.runtime import ComfyRuntime
from reference_specs.models.base import BLOCK_LISTS

COMPUTE_PATHS = ("w4a16", "w4a4")
LATENT_FRAMES = 2  # WAN latent frames (2 latent frames = 5 video frames)
LATENT_SIZE = 16  # latent height and width: 8x8 patches of 2x2
TEXT_TOKENS = 32


@dataclass(frozen=True)
class StepInput:
    sigma: float
    x: torch.Tensor
    context: torch.Tensor
    concat: torch.Tensor | None
    reference: torch.Tensor | None = None  # an edit model's reference latent (ComfyUI's ref_latents)


@dataclass
class StepOutput:
    sigma: float
    output: torch.Tensor  # the denoiser's output (the model's, once the last piece has run)
    blocks: list[torch.Tensor]  # every block's output, flattened, float32, in the order they ran
    carry: dict[str, torch.Tensor]  # the last block's outputs ("img", and "txt" for Qwen): the next piece's input


def _text_width(diffusion_model: Any) -> int:
    for attr in ("text_embedding", "txt_in", "txt_norm"):
        module = getattr(diffusion_model, attr, None)
        if module is None:
            continue
        first = module[0] if isinstance(module, torch.nn.Sequential) else module
        width = getattr(first, "in_features", None) or getattr(first, "normalized_shape", [None])[0]
        if width:
            return int(width)
    return 4096


def _in_channels(diffusion_model: Any) -> int | None:
    patch = getattr(diffusion_model, "patch_embedding", None)
    if patch is not None:
        return int(patch.weight.shape[1])
    return None


def _edits(diffusion_model: Any) -> bool:
    """An edit model, run as its workflows run it: with a reference image's latent beside the noisy one.

    Qwen Image Edit 2511 is known by its `__index_timestep_zero__` marker, which ComfyUI turns into
    default_ref_method "index_timestep_zero" (comfy/ldm/qwen_image/model.py): its reference tokens go through every
    block beside the image's, modulated at timestep 0, activations that a run without them never shows
    (TextEncodeQwenImageEditPlus always gives reference latents). Edit 2509 carries no marker: nothing in its file
    tells it from Qwen Image, so it runs without a reference."""
    return getattr(diffusion_model, "default_ref_method", None) == "index_timestep_zero"


def make_inputs(patcher: Any, steps: int, seed: int) -> list[StepInput]:
    """Seeded inputs of the shapes this model takes, at `steps` noise levels spread over its schedule."""
    model = patcher.model
    net = model.diffusion_model
    channels = model.latent_format.latent_channels
    in_channels = _in_channels(net)
    video = in_channels is not None  # both take [B, C, T, H, W]; Qwen Image is one frame
    shape = (1, channels, LATENT_FRAMES if video else 1, LATENT_SIZE, LATENT_SIZE)
    extra = (in_channels or channels) - channels
    width = _text_width(net)
    inputs = []
    sampling = model.model_sampling
    for i in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000 + i)
        sigma = float(sampling.percent_to_sigma((i + 0.5) / steps))
        noise = torch.randn(shape, generator=gen)
        x0 = torch.randn(shape, generator=gen)
        x = sigma * noise + (1.0 - sigma) * x0
        context = torch.randn((1, TEXT_TOKENS, width), generator=gen)
        concat = torch.randn((shape[0], extra, *shape[2:]), generator=gen) if extra > 0 else None
        reference = torch.randn(shape, generator=gen) if _edits(net) else None
        inputs.append(StepInput(sigma=sigma, x=x, context=context, concat=concat, reference=reference))
    return inputs


def block_modules(diffusion_model: Any) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks in the order they run, named as in the checkpoint (e.g. blocks.3)."""
    found = []
    for list_name in BLOCK_LISTS:
        blocks = getattr(diffusion_model, list_name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            found.extend((f"{list_name}.{i}", block) for i, block in enumerate(blocks))
    return found


def _flat_output(out: dict[str, Any]) -> torch.Tensor:
    tensors = [out[k] for k in ("img", "txt") if isinstance(out.get(k), torch.Tensor)]
    return torch.cat([t.detach().float().reshape(-1) for t in tensors]).cpu()


def _block_patches(count: int, state: dict[str, Any]) -> dict[tuple[str, int], Callable[..., dict[str, Any]]]:
    """ComfyUI's block-replacement hooks (transformer_options patches_replace "dit"): the first block takes the
    carried input when there is one, every block's output is recorded, the last one's is kept for the next piece."""

    def patch_for(index: int) -> Callable[..., dict[str, Any]]:
        def patch(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
            carry = state["carry"]
            if index == 0 and carry is not None:
                args = dict(args)
                for key, value in carry.items():
                    args[key] = value.to(device=args[key].device, dtype=args[key].dtype)
            out = extra["original_block"](args)
            state["blocks"].append(_flat_output(out))
            if index == count - 1:
                state["last"] = {k: v.detach().clone().cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}
            return out

        return patch

    return {("double_block", i): patch_for(i) for i in range(count)}


def fake_quantize(runtime: ComfyRuntime, x: torch.Tensor, layout: str, scale: Any) -> torch.Tensor:
    """x (2-D) through ComfyUI's own activation quantizer and back: what a quantized matmul sees. scale: the static
    per-tensor scale, or None for ComfyUI's dynamic one."""
    q = runtime.quant_ops.QuantizedTensor.from_float(x, layout, scale=scale)
    return q.dequantize().to(x.dtype)


def _fake_quantize_input(runtime: ComfyRuntime) -> Callable[[torch.nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        flat = fake_quantize(runtime, x.reshape(-1, x.shape[-1]), module.layout_type,
                             getattr(module, "input_scale", None))
        return (flat.reshape(x.shape), *args[1:])

    return hook


def w4a4_layers(diffusion_model: Any) -> list[tuple[str, torch.nn.Module]]:
    """Quantized Linear layers that Blackwell runs with quantized activations (not marked full precision)."""
    return [
        (name, module) for name, module in diffusion_model.named_modules()
        if getattr(module, "layout_type", None) is not None and not getattr(module, "_full_precision_mm_config", False)
    ]


def run(runtime: ComfyRuntime, patcher: Any, inputs: list[StepInput], compute: str = "w4a16",
        carry: list[dict[str, torch.Tensor]] | None = None) -> list[StepOutput]:
    """apply_model on every input; the final output and every block's output, as float32 on the CPU.

    carry: per input, the previous piece's last block output, fed to this piece's first block (None: the model's
    own embeddings feed it, as in a whole model)."""
    if compute not in COMPUTE_PATHS:
        raise ValueError(f"compute must be one of {COMPUTE_PATHS}, not {compute!r}")
    runtime.model_management.load_models_gpu([patcher])
    model = patcher.model
    device = runtime.model_management.get_torch_device()
    state: dict[str, Any] = {"carry": None, "blocks": [], "last": {}}
    patches = _block_patches(len(block_modules(model.diffusion_model)), state)
    handles = []
    if compute == "w4a4":
        hook = _fake_quantize_input(runtime)
        handles = [module.register_forward_pre_hook(hook) for _, module in w4a4_layers(model.diffusion_model)]
    results = []
    try:
        with torch.inference_mode():
            for i, step in enumerate(inputs):
                state.update(carry=carry[i] if carry is not None else None, blocks=[], last={})
                kwargs: dict[str, Any] = {"c_crossattn": step.context.to(device),
                                          "transformer_options": {"patches_replace": {"dit": dict(patches)}}}
                if step.concat is not None:
                    kwargs["c_concat"] = step.concat.to(device)
                if step.reference is not None:
                    kwargs["ref_latents"] = [step.reference.to(device)]
                sigma = torch.tensor([step.sigma], device=device)
                out = model.apply_model(step.x.to(device), sigma, **kwargs)
                results.append(StepOutput(sigma=step.sigma, output=out.detach().float().cpu(),
                                          blocks=list(state["blocks"]), carry=dict(state["last"])))
    finally:
        for handle in handles:
            handle.remove()
    return results
