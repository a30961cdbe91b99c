"""The dimensions synthetic fixtures are written at: every architecture scaled down, so a fixture takes a fraction of
a second to write, yet keeps the real in/out channels and head_dim (and ComfyUI still builds and runs it).

Fixture knowledge, not truth: the architecture profiles (reference_specs/models) hold only the published models'
full_dims; what a test-sized model looks like is decided here, beside the factory that writes it.
"""

from __future__ import annotations

# WAN: ComfyUI reads width, FFN and depth off the keys but always builds text width 4096: narrow and 2 blocks deep.
_SCALED_WAN = {"dim": 256, "ffn": 512, "blocks": 2, "text_dim": 4096, "freq_dim": 256}
# Qwen Image scaled down like WAN for everything nvdiag does by itself. ComfyUI builds Qwen Image at its real width
# only (it reads in_channels and depth off the keys, nothing else): files it loads use COMFYUI_QWEN (comfyui_dims),
# full width and one block deep, 380M parameters, which is why they are not every Qwen test's default.
_SCALED_QWEN = {"dim": 256, "blocks": 1, "text_dim": 256, "in_channels": 64, "out_channels": 64, "heads": 2}
COMFYUI_QWEN = {"dim": 3072, "blocks": 1, "text_dim": 3584, "in_channels": 64, "out_channels": 64, "heads": 24}

SMALL_DIMS: dict[str, dict[str, int]] = {
    "wan2.2-ti2v-5b": {**_SCALED_WAN, "in_dim": 48, "out_dim": 48, "heads": 2},
    "wan2.2-t2v-a14b": {**_SCALED_WAN, "in_dim": 16, "out_dim": 16, "heads": 2},
    "wan2.2-i2v-a14b": {**_SCALED_WAN, "in_dim": 36, "out_dim": 16, "heads": 2},
    "qwen-image-layered": dict(_SCALED_QWEN),
    "qwen-image-edit-2511": dict(_SCALED_QWEN),
    "qwen-image-2512": dict(_SCALED_QWEN),
    "flux1-dev": {"dim": 256, "double_blocks": 2, "single_blocks": 2, "in_channels": 64, "context_dim": 256,
                  "vec_dim": 256, "mlp_ratio": 4, "heads": 2},
}


def small_dims(variant: str) -> dict[str, int]:
    """The scaled-down dims fixtures of `variant` are written at (a copy: callers override some of them)."""
    try:
        return dict(SMALL_DIMS[variant])
    except KeyError:
        raise ValueError(f"no fixture dims for variant {variant!r}; known: {', '.join(SMALL_DIMS)}") from None


def comfyui_dims(variant: str) -> dict[str, int]:
    """The dims of fixtures that ComfyUI builds and runs. ComfyUI reads WAN's width, FFN and depth off the keys but
    always builds text width 4096; it builds Qwen Image only at its real width (24 heads of 128, text 3584) and
    reads just in_channels and depth (comfy/model_detection.py): small WAN dims, full-width one-block Qwen."""
    dims = small_dims(variant)
    return {**dims, **COMFYUI_QWEN} if variant.startswith("qwen-image") else dims
