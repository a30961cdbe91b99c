"""The cause catalogue (shared/DESIGN.md). Slugs are public JSON output: never rename one."""

from __future__ import annotations

CAUSES: dict[str, str] = {
    "missing-block-scale": "NVFP4 layer without .weight_scale (ComfyUI refuses to load)",
    "missing-tensor-scale": "NVFP4 layer without .weight_scale_2 (ComfyUI refuses to load)",
    "missing-quant-marker": "quantized weight with neither .comfy_quant nor a _quantization_metadata entry: "
    "ComfyUI loads the raw bytes as a plain weight",
    "invalid-quant-marker": "marker present but unreadable, unknown format, or metadata the loader will not match",
    "wrong-dtype": "a tensor's dtype is not what its role requires",
    "wrong-shape": "packed weight, block scale or scalar shapes inconsistent with each other or the architecture",
    "scale-layout-linear": "block scales stored row-major instead of the swizzled 128x4 tile layout: "
    "block-pattern noise",
    "nibble-order": "FP4 codes packed low-nibble-first; ComfyUI expects the even element in the high nibble",
    "scale2-reciprocal": "weight_scale_2 (or input_scale) stored as 2688/amax instead of amax/2688",
    "input-scale-implausible": "a static input_scale that is not a calibrated activation scale",
    "non-finite-scale": "NaN, Inf, zero or negative scales",
    "non-finite-weight": "NaN or Inf values in a weight stored as plain floats (a kept layer), or in the reference "
    "a roundtrip compares with: every output that layer touches becomes NaN",
    "stale-scale": "scales that do not belong to the packed data",
    "transposed-weight": "weight stored [in, out]",
    "sensitive-layer-quantized": "a layer that should stay high precision was quantized",
    "diffusers-key-names": "a WAN file written with diffusers names: ComfyUI cannot detect the model",
    "unknown-architecture": "no supported architecture matches the keys and shapes",
    "legacy-fp8-format": "legacy scaled_fp8 + scale_weight file (loads, converted on the fly; informational)",
    "excess-error": "a layer's dequantization error is far above its format's expected error, cause not attributable",
    "comfyui-refused": "ComfyUI raised an error loading or running the file and no more specific cause explains it",
    "comfyui-ignored-tensors": "ComfyUI loaded the file but left tensors of it unused (logged as left-over keys)",
    "compute-overflow": "ComfyUI's output is not finite for a correct file too: the model overflows in the compute "
    "dtype (float16 on most GPUs) on these inputs, whatever the file holds",
    "reference-mismatch": "REF is not the weights the file was made from (rows rescaled, a fine-tune, another "
    "version): the file encodes its own weights consistently, nothing wrong is proven about it",
    "foreign-layout": "a published quantized layout ComfyUI does not load as it is (LightX2V NVFP4, NVIDIA ModelOpt "
    "NVFP4 exports: low-nibble-first codes, their own scale layout or scalars, no marker), whose bytes rewrite "
    "losslessly into ComfyUI's",
    "newer-comfyui-format": "a ComfyUI quantization format newer than NVFP4/FP8 (MXFP8, INT8 tensorwise, ConvRot "
    "W4A4, AWQ W4A16, W4A8, MoE expert banks): loaded only by ComfyUI versions whose QUANT_ALGOS has it; nvdiag "
    "names it but does not decode or verify it",
    "third-party-layout": "another runtime's quantized layout (Nunchaku SVDQuant W4A4 and AWQ W4A16, AutoAWQ GEMM) "
    "whose tensors ComfyUI's own loader never reads: it needs that project's loader; nvdiag names it, does not "
    "decode or convert it",
    "activation-sensitive-w4a4": "with activations quantized to 4 bits (W4A4, Blackwell) the output error is far "
    "above the W4A16 error: layers that need full_precision_matrix_mult, a calibrated input_scale or more bits",
}


def check_cause(slug: str) -> str:
    if slug not in CAUSES:
        raise KeyError(f"unknown cause {slug!r}")
    return slug
