"""Fast NVFP4 and FP8 encoders: the same arithmetic as the reference codecs, organised for speed.

Bit-identical to NVFP4.quantize / FP8E4M3.quantize, and so to what ComfyUI writes for the same tensor in its own
dtype (comfy-kitchen's TensorCoreNVFP4Layout.quantize; ComfyUI's TensorCoreFP8E4M3Layout.quantize), default scales
included: those are divided as ComfyUI divides them, for FP32, BF16 and F16 weights alike (nvfp4.scale_from_amax,
fp8.comfy_fp8_scale), except where ComfyUI's scale would be 0 (nvfp4.encoding_scale_from_amax,
fp8.fp8_encoding_scale). tests/test_codec_matches_comfy_kitchen.py holds the proof. What makes them fast:
- the weight is processed in row chunks of about 2 MiB of float32, so every pass over a chunk stays in cache, and
  all work buffers are allocated once and reused (no full-size temporaries);
- one |x| buffer serves the block maxima, the division and the rounding; the sign comes from the input's sign bit
  (x / t keeps the sign of x for t > 0, -0.0 included), so no signed copy is needed;
- E2M1 rounding is seven in-place compare-and-add passes on uint8 (measured faster on CPU than bucketize, whose
  int32/int64 output costs more than the comparisons), values above 6 fall in the top bucket so no clamp pass;
- elementwise ops on a chunk run on all torch intra-op threads; device="cuda" runs the same code on the GPU.
On CUDA, PyTorch divides by a CPU scalar (a Python number) as a multiplication by its float32 reciprocal
(BinaryDivTrueKernel.cu: "this may lose one bit of precision"), which is not the reference's rounding: every divisor
here is therefore a tensor on the weight's device, or the division runs on the CPU.
A float input of any dtype is converted chunk by chunk (exactly: BF16/F16/FP32 values all fit in float32); its amax
stays in its own dtype, which decides how the default scale rounds.
"""

from __future__ import annotations

import torch

from reference_specs.formats.fp8 import fp8_encoding_scale, fp8_max
from reference_specs.formats.nvfp4 import (
    BLOCK,
    F4_E2M1_MAX,
    F8_E4M3_MAX,
    block_scale_shape,
    checked_scale,
    encoding_scale_from_amax,
    packed_shape,
    roundup,
)

# E2M1 rounding thresholds (round half to even), see nvfp4._E2M1_STEPS: inclusive where the lower code is odd.
_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
# Elements per CPU chunk: 512K float32 = 2 MiB per buffer, in the L2/L3 of 2-core machines, far above torch's intra-op
# grain size (32768) so both cores share every pass, and large enough that per-op dispatch costs vanish. Measured on
# a 5120x13824 weight with 2 threads: 118 M elements/s at 55K elements per chunk, 177 at 442K, 190 at 885K.
CPU_CHUNK_ELEMENTS = 1 << 19
GPU_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(rows: int, cols: int, device: torch.device, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        return chunk_rows
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, min(rows, budget // max(cols, 1)))


def _abs_max(weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """amax(|W|) in the weight's own dtype (exact: it is one of its values) on the CPU, chunk by chunk (no full-size
    |W| temporary). The dtype matters: ComfyUI divides it by 2688 in that dtype (nvfp4.scale_from_amax)."""
    amax = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        lo, hi = torch.aminmax(weight[start : start + chunk])
        amax = torch.maximum(amax, torch.maximum(-lo, hi))
    return amax.cpu()


def _float_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {list(weight.shape)}")
    if not (weight.is_floating_point() and weight.element_size() >= 2):
        raise ValueError(f"expected a float weight (F32, F16, BF16, F64), got {weight.dtype}")
    return weight


def nvfp4_scale(weight: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """The default per-tensor scale, float32 0-d: amax/2688 divided in the weight's dtype as ComfyUI does, 1.0 for an
    all-zero weight (nvfp4.encoding_scale_from_amax). Divided on the CPU: see the module docstring."""
    chunk = _chunk_rows(weight.shape[0], weight.shape[1], weight.device, chunk_rows)
    return encoding_scale_from_amax(_abs_max(weight, chunk), weight.dtype)


def swizzle_tiles(scales: torch.Tensor) -> torch.Tensor:
    """Linear [R, C] block scales (R % 128 == 0, C % 4 == 0) -> the cuBLAS 128x4 tiled layout, by views only.

    Row r = 128*i + 32*a + b, column c = 4*j + k goes to tile (i, j), offset b*16 + a*4 + k (nvfp4.swizzle_index).
    """
    rows, cols = scales.shape
    tiles = scales.view(rows // 128, 4, 32, cols // 4, 4)  # i, a, b, j, k
    return tiles.permute(0, 3, 2, 1, 4).contiguous().view(rows, cols)  # i, j, b, a, k


class _Workspace:
    """Buffers for one chunk, reused for every chunk (the last, shorter chunk uses their leading rows)."""

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.x = torch.zeros((rows, cols), dtype=torch.float32, device=device)  # padded input copy
        self.a = torch.empty((rows, cols), dtype=torch.float32, device=device)
        self.codes = torch.empty((rows, cols), dtype=torch.uint8, device=device)
        self.mask = torch.empty((rows, cols), dtype=torch.bool, device=device)
        # a device tensor, not a Python number: a true division on CUDA too (see the module docstring)
        self.f4_max = torch.tensor(F4_E2M1_MAX, dtype=torch.float32, device=device)


def _encode_chunk(
    x: torch.Tensor, scale_2: torch.Tensor, work: _Workspace, packed_out: torch.Tensor, scales_out: torch.Tensor
) -> None:
    """Float32 rows [r, C] (C % 16 == 0) -> packed codes into packed_out [r, C/2], FP8 scales into scales_out."""
    rows, cols = x.shape
    blocks = cols // BLOCK
    a = torch.abs(x, out=work.a[:rows])
    a_blocks = a.view(rows, blocks, BLOCK)
    # Block scale arithmetic exactly as the reference (nvfp4.encode_blocks): small, 1/16 of the elements.
    scaled = torch.clamp(a_blocks.amax(dim=-1) / work.f4_max / scale_2, max=F8_E4M3_MAX)
    scales_fp8 = scaled.to(torch.float8_e4m3fn)
    total = scale_2 * scales_fp8.to(torch.float32)
    zero = total == 0
    torch.div(a_blocks, torch.where(zero, torch.ones_like(total), total).unsqueeze(-1), out=a_blocks)

    codes, mask = work.codes[:rows], work.mask[:rows]
    bits = mask.view(torch.uint8)  # a bool is one byte holding 0 or 1: adding its uint8 view avoids a cast copy
    torch.gt(a, _STEPS[0][0], out=mask)
    codes.copy_(bits)
    for threshold, inclusive in _STEPS[1:]:
        (torch.ge if inclusive else torch.gt)(a, threshold, out=mask)
        codes.add_(bits)
    torch.signbit(x, out=mask)
    codes.add_(bits, alpha=8)  # the sign bit, without a shifted temporary
    # the reference writes +0 codes for blocks whose scale rounds to zero; on the GPU a fill of the (usually empty)
    # mask costs less than the wait for the device that testing it first would cost
    if x.is_cuda:
        codes.view(rows, blocks, BLOCK).masked_fill_(zero.unsqueeze(-1), 0)
    elif bool(zero.any()):
        codes.view(rows, blocks, BLOCK)[zero] = 0

    torch.bitwise_or(codes[:, 0::2] << 4, codes[:, 1::2], out=packed_out)
    scales_out.copy_(scales_fp8)


def encode_nvfp4(
    weight: torch.Tensor,
    scale_2: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    chunk_rows: int | None = None,
    stay_on_device: bool = False,
) -> dict[str, torch.Tensor]:
    """Float weight [out, in] -> {"weight", "weight_scale", "weight_scale_2"} as ComfyUI stores NVFP4: codes and
    block scales on the CPU, where a writer wants them, or left on `device` (stay_on_device: for a comparison on
    the GPU, which would otherwise copy them out and back in); the per-tensor scale is always on the CPU.

    Same bytes as NVFP4().quantize(weight, scale_2). scale_2 defaults to amax/2688 (1.0 for an all-zero weight);
    a given scale must be finite and positive.
    """
    weight = _float_weight(weight)
    dev = torch.device(device)
    out_f, in_f = weight.shape
    cols = roundup(in_f, BLOCK)
    chunk = _chunk_rows(out_f, cols, dev, chunk_rows)
    scale = nvfp4_scale(weight, chunk) if scale_2 is None else checked_scale(scale_2)
    scale_dev = scale.to(dev)

    packed = torch.zeros(packed_shape(out_f, in_f), dtype=torch.uint8, device=dev)
    scales = torch.zeros(block_scale_shape(out_f, in_f), dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
    work = _Workspace(min(chunk, out_f), cols, dev)
    for start in range(0, out_f, chunk):
        stop = min(out_f, start + chunk)
        rows = weight[start:stop]
        if cols == in_f:
            x = rows if rows.dtype == torch.float32 and rows.device == dev else work.x[: stop - start].copy_(rows)
        else:
            x = work.x[: stop - start]
            x[:, :in_f].copy_(rows)  # the padding columns stay zero from the allocation
        _encode_chunk(x, scale_dev, work, packed[start:stop], scales[start:stop, : cols // BLOCK])
    swizzled = swizzle_tiles(scales)
    if not stay_on_device:
        packed, swizzled = to_host(packed, swizzled)
    return {"weight": packed, "weight_scale": swizzled, "weight_scale_2": scale}


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the CPU. From a GPU: copied into pinned memory without waiting, then one wait for all of them
    (`.cpu()` of each would wait once per tensor, through a pageable staging copy)."""
    if not tensors or tensors[0].device.type != "cuda":
        return tuple(t.cpu() for t in tensors)
    try:
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                     for t in tensors)
    except RuntimeError:  # memory that cannot be pinned: the same bytes through plain copies
        return tuple(t.cpu() for t in tensors)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def fp8_scale(
    weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, chunk_rows: int | None = None
) -> torch.Tensor:
    """amax/fp8_max as ComfyUI computes it (fp8.comfy_fp8_scale), float32 0-d; 1.0 for an all-zero FP32/BF16
    weight (fp8.fp8_encoding_scale). On the CPU: see the module docstring."""
    chunk = _chunk_rows(weight.shape[0], weight.shape[1], weight.device, chunk_rows)
    return fp8_encoding_scale(_abs_max(weight, chunk), weight.dtype, dtype)


def encode_fp8(
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float8_e4m3fn,
    device: str | torch.device = "cpu",
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Float weight [out, in] -> {"weight" FP8, "weight_scale" F32 0-d} (on the CPU), same bytes as FP8E4M3.quantize.

    Like comfy-kitchen, the weight is multiplied by the float32 reciprocal of the scale cast to the weight's dtype.
    """
    weight = _float_weight(weight)
    dev = torch.device(device)
    out_f, in_f = weight.shape
    chunk = _chunk_rows(out_f, in_f, dev, chunk_rows)
    scale = fp8_scale(weight, dtype, chunk) if scale is None else checked_scale(scale)
    limit = fp8_max(dtype)
    reciprocal = (1.0 / scale).to(dev, weight.dtype)
    out = torch.empty((out_f, in_f), dtype=dtype, device=dev)
    buf = torch.empty((min(chunk, out_f), in_f), dtype=weight.dtype, device=dev)
    for start in range(0, out_f, chunk):
        stop = min(out_f, start + chunk)
        scaled = torch.mul(weight[start:stop].to(dev), reciprocal, out=buf[: stop - start])
        out[start:stop].copy_(torch.clamp(scaled, -limit, limit, out=scaled))
    return {"weight": out.cpu(), "weight_scale": scale}
