"""NVFP4 as ComfyUI stores it (comfy_quant format "nvfp4").

Facts (shared/research/comfyui-load-path.md, Q6; comfy-kitchen tensor/nvfp4.py, float_utils.py):
- `.weight` U8 [ru16(out), ru16(in)/2]: E2M1 codes, the even-indexed element in the HIGH nibble.
- `.weight_scale` F8_E4M3 [ru128(out), ru4(ru16(in)/16)]: one scale per 16 elements, cuBLAS swizzled 128x4 tiles.
- `.weight_scale_2` F32 0-d: the per-tensor decode multiplier amax/(448*6).
- decoded weight = e2m1(code) * weight_scale_2 * fp8(weight_scale).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format, Rereading, RoleSpec, Tensors, source_dtype
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

F4_E2M1_MAX = 6.0
F8_E4M3_MAX = 448.0
BLOCK = 16
# decode value of each 4-bit code; bit 3 is the sign
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Rounding thresholds between neighbouring magnitudes, round-half-to-even: a tie goes to the even code,
# so the comparison is strict (>) where the lower neighbour is even and inclusive (>=) where it is odd.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def roundup(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return roundup(out_features, 16), roundup(in_features, 16) // 2


def block_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return roundup(out_features, 128), roundup(roundup(in_features, 16) // BLOCK, 4)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float32 values already scaled into [-6, 6] -> uint8 codes 0..15, round half to even, sign kept for -0."""
    import torch

    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold, inclusive in _E2M1_STEPS:
        code += (a >= threshold) if inclusive else (a > threshold)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    import torch

    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def decode_packed(packed: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    """[r, c/2] packed bytes -> [r, c] float32 E2M1 values: the same as e2m1_decode(unpack_nibbles(packed)), through
    one 256-entry table of value pairs (a byte's two nibbles at once), so a large layer decodes without per-nibble
    temporaries or 64-bit indices."""
    import torch

    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    hi, lo = values.repeat_interleave(16), values.repeat(16)  # byte b: high nibble b >> 4, low nibble b & 15
    table = torch.stack((hi, lo) if high_first else (lo, hi), dim=-1)  # [256, 2]
    rows, half = packed.shape
    pairs = torch.index_select(table, 0, packed.reshape(-1).to(torch.int32))
    return pairs.reshape(rows, half * 2)


def pack_nibbles(codes: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    """[r, c] codes -> [r, c/2] bytes. ComfyUI's convention (high_first) puts element 2k in the high nibble."""
    even, odd = codes[:, 0::2], codes[:, 1::2]
    return (even << 4) | odd if high_first else (odd << 4) | even


def unpack_nibbles(packed: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    import torch

    hi, lo = packed >> 4, packed & 0x0F
    first, second = (hi, lo) if high_first else (lo, hi)
    return torch.stack((first, second), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


# Index tables up to this many entries are kept (row tiles of a layer, probed once per layer and re-reading); larger
# ones (a whole 14B layer's scales: 140 MB of int64) are built each time.
CACHED_INDEX_ENTRIES = 1 << 17


def swizzle_index(rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat position in the swizzled buffer of every (r, c) of a padded [rows, cols] scale matrix (do not modify
    the result: small tables are shared).

    cuBLAS block-scale layout (cuBLAS docs, "1D block scaling factors layout"): 128x4 tiles stored one after the
    other, row-major over tiles; inside a tile, row r = 32*a + b and column c go to offset b*16 + a*4 + c.
    """
    if rows * cols <= CACHED_INDEX_ENTRIES:
        return _small_swizzle_index(rows, cols, str(device))
    return _swizzle_index(rows, cols, device)


@functools.lru_cache(maxsize=64)
def _small_swizzle_index(rows: int, cols: int, device: str) -> torch.Tensor:
    return _swizzle_index(rows, cols, device)


def _swizzle_index(rows: int, cols: int, device: torch.device | str) -> torch.Tensor:
    import torch

    r = torch.arange(rows, device=device).view(-1, 1)
    c = torch.arange(cols, device=device).view(1, -1)
    tile = (r // 128) * (cols // 4) + (c // 4)
    inner = (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
    return tile * 512 + inner


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """Linear [R, C] (already padded to 128 x 4 multiples) -> swizzled [R, C]."""
    import torch

    rows, cols = scales.shape
    out = torch.empty(rows * cols, dtype=scales.dtype, device=scales.device)
    out[swizzle_index(rows, cols, scales.device).flatten()] = scales.flatten()
    return out.view(rows, cols)


def unswizzle(blocked: torch.Tensor) -> torch.Tensor:
    """Swizzled [R, C] -> linear [R, C].

    The inverse of swizzle_index's map written as a permutation of axes: the swizzled buffer is [tile row i, tile
    column j, b, a, k] and row 32*a + b, column 4*j + k of tile row i is where it came from, so swapping the a and j
    axes back undoes it (tests/test_formats_nvfp4.py checks it against the index table). A gather through the table
    of a large layer cost 50 ms of building per call on a CPU, a tenth of a CPU roundtrip."""
    rows, cols = blocked.shape
    if rows % 128 or cols % 4:
        return blocked.flatten()[swizzle_index(rows, cols, blocked.device).flatten()].view(rows, cols)
    tiles = blocked.reshape(rows // 128, cols // 4, 32, 4, 4)  # i, j, b, a, k
    return tiles.permute(0, 3, 2, 1, 4).reshape(rows, cols)  # i, a, b, j, k


def pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    import torch

    if x.shape == (rows, cols):
        return x
    out = torch.zeros((rows, cols), dtype=x.dtype, device=x.device)
    out[: x.shape[0], : x.shape[1]] = x
    return out


# The per-tensor scale's divisor: the largest block scale (FP8 E4M3) times the largest code (E2M1).
SCALE_DIVISOR = F8_E4M3_MAX * F4_E2M1_MAX


def scale_from_amax(amax: torch.Tensor | float, dtype: torch.dtype | str) -> torch.Tensor:
    """amax(|W|) / 2688 exactly as ComfyUI computes it for a weight of `dtype`, float32 0-d; may be 0.

    ComfyUI quantizes to NVFP4 with comfy-kitchen's TensorCoreNVFP4Layout.quantize (comfy/quant_ops.py registers it
    unchanged), whose default scale is `torch.amax(tensor.abs()) / (448 * 6)`: a 0-d tensor of the WEIGHT's dtype
    divided by a Python number, so the quotient is rounded to that dtype, and only then widened to float32
    (Params keeps scale as float32). So FP32: amax/2688 rounded once to float32; BF16: rounded to BF16 (8 significant
    bits, up to 2^-9 relative from the float32 quotient); F16: rounded to F16, subnormal below 2^-14 (amax < 0.165)
    and 0 below 2^-25 (amax < 8.0e-5). The division runs here as the same torch operation on the CPU, so it rounds
    as comfy-kitchen's eager (CPU) quantizer does. amax: max |w| of a weight of that dtype (so exact in it).
    """
    import torch

    amax = amax if isinstance(amax, torch.Tensor) else torch.tensor(float(amax), dtype=torch.float64)
    amax = amax.detach().to("cpu", source_dtype(dtype)).reshape(())
    return (amax / SCALE_DIVISOR).to(torch.float32)


def encoding_scale_from_amax(amax: torch.Tensor | float, dtype: torch.dtype | str) -> torch.Tensor:
    """The per-tensor scale nvdiag writes into weight_scale_2 for a weight of this amax and dtype, float32 0-d:
    ComfyUI's own (scale_from_amax), bit for bit, wherever that is positive. Where it is 0, comfy-kitchen's encoder
    divides by 0 (NaN block scales, or every element 0), so nvdiag writes instead:
    - an all-zero weight: 1.0 (finite and positive, no non-finite-scale finding; every block scale is 0 so the weight
      still decodes to exact zeros);
    - a non-zero F16 weight whose amax/2688 underflows F16 (amax < 8.0e-5): the float32 quotient.
    This is what the gate expects the written scale to be (converter/gate.py)."""
    import torch

    scale = scale_from_amax(amax, dtype)
    if scale > 0:
        return scale
    wide = scale_from_amax(amax, torch.float32)
    return wide if wide > 0 else torch.ones((), dtype=torch.float32)


def per_tensor_scale(weight: torch.Tensor) -> torch.Tensor:
    """The decode multiplier ComfyUI computes for this weight: amax(|W|) / (448 * 6) in the weight's dtype, as
    float32 0-d (scale_from_amax); 0 for an all-zero weight."""
    return scale_from_amax(weight.abs().amax(), weight.dtype)


def encoding_scale(weight: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale nvdiag encodes this weight with: per_tensor_scale where it is positive, see
    encoding_scale_from_amax for the all-zero (1.0) and F16-underflow cases."""
    import torch

    amax = weight.abs().amax() if weight.numel() else torch.zeros((), dtype=weight.dtype)
    return encoding_scale_from_amax(amax, weight.dtype)


def checked_scale(scale_2: torch.Tensor) -> torch.Tensor:
    """A caller-supplied per-tensor scale as float32 0-d; zero, negative or non-finite scales cannot encode."""
    import torch

    scale = scale_2.to(torch.float32).reshape(())
    if not bool(torch.isfinite(scale)) or float(scale) <= 0:
        raise ValueError(f"per-tensor scale must be finite and positive, got {float(scale)}")
    return scale


def encode_blocks(x: torch.Tensor, scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [R, C] weight (C % 16 == 0) -> (codes uint8 [R, C], block scales float8_e4m3fn [R, C/16]), linear.

    The arithmetic follows comfy-kitchen's reference quantizer step by step (all in float32) so the output is
    bit-identical: block amax/6, divided by the per-tensor scale, clamped to 448, rounded to FP8 E4M3 (RNE);
    data divided by (per-tensor * fp8 block scale), zero blocks kept zero, clamped to +-6, rounded to E2M1.
    """
    import torch

    rows, cols = x.shape
    blocks = x.to(torch.float32).reshape(rows, cols // BLOCK, BLOCK)
    block_scale = blocks.abs().amax(dim=-1) / F4_E2M1_MAX
    scaled = torch.clamp(block_scale / scale_2, max=F8_E4M3_MAX)
    scales_fp8 = scaled.to(torch.float8_e4m3fn)
    total = scale_2 * scales_fp8.to(torch.float32)
    zero = total == 0
    data = blocks / torch.where(zero, torch.ones_like(total), total).unsqueeze(-1)
    data = torch.where(zero.unsqueeze(-1), torch.zeros_like(data), data)
    data = torch.clamp(data, -F4_E2M1_MAX, F4_E2M1_MAX)
    return e2m1_encode(data.reshape(rows, cols)), scales_fp8


# --- re-readings: each returns the tensors a correct file would hold, or None when it does not apply -----------


def _fp8_scales(tensors: Tensors) -> torch.Tensor:
    import torch

    scales = tensors["weight_scale"]
    return scales.view(torch.float8_e4m3fn) if scales.dtype == torch.uint8 else scales


def scales_linear(tensors: Tensors) -> Tensors:
    """Stored scales taken as a row-major matrix: swizzle them so the reference decoder's unswizzle is undone."""
    import torch

    scales = _fp8_scales(tensors)
    rows, cols = scales.shape
    padded = pad_to(scales.view(torch.uint8), roundup(rows, 128), roundup(cols, 4)).view(torch.float8_e4m3fn)
    return {**tensors, "weight_scale": swizzle(padded)}


def nibbles_swapped(tensors: Tensors) -> Tensors:
    import torch

    packed = tensors["weight"].view(torch.uint8)
    return {**tensors, "weight": (packed << 4) | (packed >> 4)}


def scale2_reciprocal(tensors: Tensors) -> Tensors | None:
    # stored r = 2688/amax where ComfyUI wants s = amax/2688, so s = 1/r (research Q6: decode multiplier)
    import torch

    stored = tensors["weight_scale_2"].to(torch.float32).reshape(())
    if not torch.isfinite(stored) or stored <= 0:
        return None
    return {**tensors, "weight_scale_2": 1.0 / stored}


REREADINGS: dict[str, Rereading] = {
    "scale-layout-linear": scales_linear,
    "nibble-order": nibbles_swapped,
    "scale2-reciprocal": scale2_reciprocal,
}


def block_refit(tensors: Tensors, reference: torch.Tensor) -> torch.Tensor:
    """Decode the stored codes with the per-block scale that best fits `reference` (least squares).

    Close to the reference exactly when the codes were made from the reference data, whatever the stored scales.
    """
    import torch

    values = e2m1_decode(unpack_nibbles(tensors["weight"].view(torch.uint8)))
    rows, cols = values.shape
    ref = pad_to(reference.to(torch.float32), rows, cols).reshape(rows, cols // BLOCK, BLOCK)
    blocks = values.reshape(rows, cols // BLOCK, BLOCK)
    num = (blocks * ref).sum(-1)
    den = (blocks * blocks).sum(-1)
    scale = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    fitted = (blocks * scale.unsqueeze(-1)).reshape(rows, cols)
    return fitted[: reference.shape[0], : reference.shape[1]]


def sign_agreement(tensors: Tensors, reference: torch.Tensor) -> float | None:
    import torch

    codes = unpack_nibbles(tensors["weight"].view(torch.uint8))[: reference.shape[0], : reference.shape[1]]
    nonzero = ((codes & 7) != 0) & (reference != 0)
    total = int(nonzero.sum())
    if total == 0:
        return None
    same = ((codes >> 3).bool() == (reference < 0)) & nonzero
    return int(same.sum()) / total


# The dtypes the decoder can read the bytes of (I8 codes are the same bytes as U8; lint still names the dtype).
DECODABLE_DTYPES = {"weight": ("U8", "I8"), "weight_scale": ("F8_E4M3", "U8")}


def packed_problem(layer: Layer) -> tuple[str, str] | None:
    """(cause, reason) when a layer's packed weight and block scales cannot be decoded as NVFP4 codes, from the header
    alone: byte-sized codes and scales, a 2-D packed weight padded to 16 rows and whole 16-element blocks, and a 2-D
    block scale of the swizzled shape (or the row-major [out, in/16], which decodes and is reported as
    scale-layout-linear). The same shapes NV105 / NV106 require. Shared by every layout of NVFP4 codes."""
    for role, dtypes in DECODABLE_DTYPES.items():
        if layer.dtype(role) not in dtypes:
            return "wrong-dtype", f"{role} is {layer.dtype(role)}, NVFP4 stores {' or '.join(dtypes)}"
    weight, scale = layer.shape("weight"), layer.shape("weight_scale")
    if len(weight) != 2:
        return "wrong-shape", f"packed weight is {len(weight)}-D {list(weight)}, NVFP4 needs 2-D"
    rows, cols = weight[0], weight[1] * 2
    if rows % 16 or cols % BLOCK or not rows:
        return "wrong-shape", f"packed weight {list(weight)} is not padded to multiples of 16 (rows) and 8 " \
                              "(bytes per row)"
    linear_rows = range(rows - 15, rows + 1)  # row-major scales of the unpadded [out, in/16]
    if len(scale) != 2 or not (scale == block_scale_shape(rows, cols)
                               or (scale[1] == cols // BLOCK and scale[0] in linear_rows)):
        return "wrong-shape", f"block scale {list(scale)} does not match the packed weight {list(weight)} " \
                              f"(expected {list(block_scale_shape(rows, cols))})"
    return None


def reswizzle_block_scales(linear: torch.Tensor, packed_shape: tuple[int, ...]) -> torch.Tensor:
    """Row-major block scales -> the swizzled 128x4 tile layout ComfyUI decodes.

    The linear matrix may be stored padded [ru128(out), ru4(in/16)] or unpadded [out, in/16]; it is zero-padded to
    the swizzled shape first (comfy-kitchen pads with zeros before `to_blocked`, so padding is zero in a good file).
    The dtype (F8_E4M3 or U8) is kept; the bytes are moved as uint8 because indexing float8 is not supported on CPU.
    """
    import torch

    rows, cols = block_scale_shape(packed_shape[0], packed_shape[1] * 2)  # two codes per byte
    if linear.dim() != 2 or linear.shape[0] > rows or linear.shape[1] > cols:
        raise ValueError(f"block scales {tuple(linear.shape)} do not fit a [{rows}, {cols}] scale matrix")
    as_bytes = linear.contiguous().view(torch.uint8)
    return swizzle(pad_to(as_bytes, rows, cols)).view(linear.dtype)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low-nibble-first FP4 bytes <-> ComfyUI's order (even element in the high nibble); its own inverse. Codes stored
    as another 1-byte dtype (I8) are read as their bytes."""
    import torch

    packed = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    return ((packed & 0x0F) << 4) | (packed >> 4)


def same(tensor: torch.Tensor) -> torch.Tensor:
    """The transform of a tensor a rewrite into ComfyUI's layout keeps as it is (Format.native_tensors)."""
    return tensor


class PackedCodes(Format):
    """A layout of NVFP4 codes (two per byte, 16-element blocks): ComfyUI's own and the published ones fix rewrites
    into it share its logical shape and the header checks that decide whether the bytes decode."""

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        shape = layer.shape("weight")
        return (shape[0], shape[1] * 2) if shape is not None and len(shape) == 2 else shape

    @classmethod
    def decode_problem(cls, layer: Layer) -> tuple[str, str] | None:
        """Beyond the base checks, packed_problem's: byte-sized codes and scales, a 2-D packed weight padded to 16
        rows and whole 16-element blocks, a 2-D block scale of the swizzled (or row-major) shape."""
        problem = super().decode_problem(layer)
        return problem if problem is not None else packed_problem(layer)


class NVFP4(PackedCodes):
    slug: ClassVar[str] = "nvfp4"
    comfy_format: ClassVar[str | None] = "nvfp4"
    typical_rel_error: ClassVar[float] = 0.12
    tensor_scale_role: ClassVar[str | None] = "weight_scale_2"
    scale_divisor: ClassVar[float | None] = SCALE_DIVISOR
    block_scale_role: ClassVar[str | None] = "weight_scale"
    compute_paths: ClassVar[tuple[str, str] | None] = ("W4A4", "W4A16")
    rereadings: ClassVar[dict[str, Rereading]] = REREADINGS
    signature: ClassVar[dict[str, RoleSpec]] = {
        "weight": RoleSpec(("U8",), description="E2M1 codes, two per byte, even element in the high nibble"),
        "weight_scale": RoleSpec(("F8_E4M3", "U8"), description="FP8 E4M3 block scales, swizzled 128x4 tiles"),
        "weight_scale_2": RoleSpec(("F32",), scalar=True, description="per-tensor decode multiplier amax/2688"),
        "input_scale": RoleSpec(("F32",), required=False, scalar=True, description="static activation scale"),
        "bias": RoleSpec(("F32", "BF16", "F16"), required=False),
        "comfy_quant": RoleSpec(("U8",), required=False, description='UTF-8 JSON {"format": "nvfp4"}'),
    }

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        if layer.marker and layer.marker.get("format") == "nvfp4":
            return True
        # Unmarked but shaped like NVFP4: a packed byte weight beside a per-tensor scale or block scales.
        return layer.dtype("weight") in ("U8", "I8") and (layer.has("weight_scale_2") or layer.has("weight_scale"))

    @classmethod
    def proves_marker(cls, weight_dtype: str, roles: set[str], weight_shape: tuple[int, ...],
                      scale_shape: tuple[int, ...] | None) -> bool:
        """U8 weight [R, C] + weight_scale of the swizzled shape for [R, 2C] + weight_scale_2."""
        if weight_dtype != "U8" or not {"weight_scale", "weight_scale_2"} <= roles or len(weight_shape) != 2:
            return False
        return scale_shape == block_scale_shape(weight_shape[0], weight_shape[1] * 2)

    def quantize(self, weight: torch.Tensor, scale_2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        scale_2 = encoding_scale(weight) if scale_2 is None else checked_scale(scale_2)
        rows, cols = roundup(out_f, 16), roundup(in_f, 16)
        codes, scales = encode_blocks(pad_to(weight, rows, cols), scale_2)
        scale_rows, scale_cols = block_scale_shape(out_f, in_f)
        return {
            "weight": pack_nibbles(codes),
            "weight_scale": swizzle(pad_to(scales, scale_rows, scale_cols)),
            "weight_scale_2": scale_2,
        }

    @classmethod
    def stored_tensors(cls, out_features: int, in_features: int) -> list[tuple[str, str, tuple[int, ...]]]:
        return [("weight", "U8", packed_shape(out_features, in_features)),
                ("weight_scale", "F8_E4M3", block_scale_shape(out_features, in_features)),
                ("weight_scale_2", "F32", ())]

    @classmethod
    def default_scale(cls, amax: float, source: str) -> torch.Tensor:
        return encoding_scale_from_amax(amax, source)

    def fast_quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The chunked fast encoder on the weight's own device (2-D weights only)."""
        if weight.dim() != 2:
            return None
        from reference_specs.formats import fast_encode

        encoded = fast_encode.encode_nvfp4(weight, device=weight.device, stay_on_device=True)
        return {role: t.to(weight.device) for role, t in encoded.items()}

    def code_refit(self, tensors: Tensors, reference: torch.Tensor) -> torch.Tensor | None:
        return block_refit(tensors, reference)

    def sign_agreement(self, tensors: Tensors, reference: torch.Tensor) -> float | None:
        return sign_agreement(tensors, reference)

    @classmethod
    def error_ceiling(cls, weight: torch.Tensor, scale: torch.Tensor) -> float | None:
        """Bound from the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} alone. With block scale s an element x is rounded
        to the nearest grid point times s: half the gap there is at most 0.25 s below 2 s and at most |x|/4 above
        (gaps 1 on [2, 4], 2 on [4, 6]); beyond 6 s it is clamped (error |x| - 6 s). The spec's block scale is
        amax/6/scale_2 rounded to E4M3, but any rounding of it is allowed here: one E4M3 step up or down (1/8
        relative, 2^-9 absolute in the subnormal range). The bound holds for every encoder that picks the block
        scale that way and rounds each element to a neighbouring grid point."""
        import torch

        rows, cols = weight.shape
        x = pad_to(weight.to(torch.float32), rows, roundup(cols, BLOCK)).reshape(rows, -1, BLOCK).abs()
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
        if norm == 0.0:
            return 0.0
        scale_2 = scale.to(torch.float32).reshape(())
        exact = torch.clamp(x.amax(-1, keepdim=True) / F4_E2M1_MAX / scale_2, max=F8_E4M3_MAX)
        s = exact.to(torch.float8_e4m3fn).to(torch.float32)
        step = 2.0**-9
        s_up = (s * 1.125 + step) * scale_2
        s_down = torch.clamp(s / 1.125 - step, min=0.0) * scale_2
        bound = torch.maximum(torch.maximum(0.25 * s_up, x / 4), x - F4_E2M1_MAX * s_down)
        return float(torch.linalg.vector_norm(bound, dtype=torch.float64)) / norm * (1 + 1e-6)

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        packed = tensors["weight"].view(torch.uint8) if tensors["weight"].dtype != torch.uint8 else tensors["weight"]
        scales = tensors["weight_scale"]
        if scales.dtype == torch.uint8:
            scales = scales.view(torch.float8_e4m3fn)
        linear = unswizzle(scales).to(torch.float32)
        rows, cols = packed.shape[0], packed.shape[1] * 2
        scale_2 = tensors["weight_scale_2"].to(torch.float32).reshape(())
        # per-tensor times block scale first, then the code value: the same float32 rounding as ComfyUI's decoder
        total = (scale_2 * linear[:rows, : cols // BLOCK]).unsqueeze(-1)
        weight = decode_packed(packed).reshape(rows, cols // BLOCK, BLOCK).mul_(total).reshape(rows, cols)
        return weight[: shape[0], : shape[1]]
