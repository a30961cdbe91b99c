"""What a format is: a fixed set of named tensors (its signature) and matching quantize / dequantize.

Adding a format = one module with one subclass, registered in formats/__init__.py. Callers (layer classification,
lint, roundtrip, convert, diff) only ever go through the registry, so they never change when a format is added.
What callers ask a format instead of switching on its name: its signature (roles, dtypes; the role names join the
layer grouping), `tensor_scale_role` / `scale_divisor` / `default_scale` / `block_scale_role`, `stored_tensors`
(what convert plans), `marker_conf` / `proves_marker` (what fix may mark), `compute_paths` (Blackwell W4A4/W4A16),
`rereadings` / `readings` / `code_refit` / `sign_agreement` (roundtrip's attribution), `fast_quantize`, and for a
published layout ComfyUI does not load, `native_slug` + `native_tensors` (NV112 names it, `nvdiag fix` rewrites it).
Copy formats/lightx2v.py for a foreign layout, formats/fp8.py for a ComfyUI-native one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch


class TorchDtype:
    """A class attribute that names a torch dtype and resolves it on access.

    Formats are declared (and layers classified) from headers alone; resolving dtypes only when a codec runs keeps
    header-only commands from importing torch (about a second of start-up).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


# Source dtypes by safetensors name, for callers that know a weight only by its header (the gate). Anything else
# (GGUF block types) is dequantized to float32 before it is encoded, so it divides in float32.
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def source_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype a weight of this dtype (torch, or a safetensors name) is encoded in: non-float -> float32."""
    import torch

    if isinstance(dtype, str):
        return getattr(torch, _FLOAT_DTYPES.get(dtype, "float32"))
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


@dataclass(frozen=True)
class RoleSpec:
    """One tensor of a format's signature. dtypes: safetensors dtype names accepted, preferred first."""

    dtypes: tuple[str, ...]
    required: bool = True
    scalar: bool = False  # 0-d (or a single element) expected
    description: str = ""


# The cause a missing role of a quantized layer is catalogued under (reference_specs/causes.py).
MISSING_ROLE_CAUSES = {"weight_scale": "missing-block-scale", "weight_scale_2": "missing-tensor-scale"}

Tensors = dict[str, "torch.Tensor"]
# A re-reading of a layer's stored tensors: the tensors a correct file would hold if the bytes had one fault, or None
# when the reading does not apply (roundtrip's attribution tries them; inspect_tools/attribution.py).
Rereading = Callable[[Tensors], "Tensors | None"]
# A published layout's rewrite into the ComfyUI-native format, per native role: (the stored role it is made from, how
# (applied to that tensor), the shape that gives when it is not the stored one) or (None, the new tensor, None).
# `nvdiag fix` streams the big ones through their transform.
NativeTensor = tuple[str | None, "Callable[[torch.Tensor], torch.Tensor] | torch.Tensor", tuple[int, ...] | None]


class Format:
    """Base class of every storage format of a Linear weight.

    slug: the stable name used in output (`nvfp4`, `float8_e4m3fn`, `scaled_fp8`, `Q4_0`, `f32`, ...).
    comfy_format: the value of comfy_quant's "format" that selects it in ComfyUI, if any.
    signature: role -> RoleSpec, the tensors a layer of this format carries.
    """

    slug: ClassVar[str]
    comfy_format: ClassVar[str | None] = None
    signature: ClassVar[dict[str, RoleSpec]] = {}
    quantized: ClassVar[bool] = True
    # Expected relative Frobenius error of quantize->dequantize on well-behaved weights (a loose upper bound
    # used when no measured baseline is available).
    typical_rel_error: ClassVar[float] = 0.0
    # The role holding the per-tensor decode multiplier, amax(|W|) / scale_divisor (None: the format has none).
    tensor_scale_role: ClassVar[str | None] = None
    scale_divisor: ClassVar[float | None] = None
    # The role of the block scales, one F8_E4M3 per 16 codes (None: no block scales); whether they are swizzled is
    # the format's (NVFP4: 128-row tiles, which the convert gate reads one at a time).
    block_scale_role: ClassVar[str | None] = None
    # How ComfyUI multiplies a layer of this format on Blackwell: (with quantized activations, with the marker's
    # full_precision_matrix_mult); None when no kernel is known here (no label rather than a guessed one).
    compute_paths: ClassVar[tuple[str, str] | None] = None
    # Exact re-readings of the stored bytes under one fault each, by cause slug (attribution tries them and every
    # combination of them, `readings()`).
    rereadings: ClassVar[dict[str, Rereading]] = {}
    # A published layout ComfyUI does not load but whose bytes rewrite losslessly into this native format's slug
    # (`native_tensors`); None for the formats ComfyUI loads as they are.
    native_slug: ClassVar[str | None] = None
    # False for a format nvdiag names but does not decode (formats/recognized.py): roundtrip skips its layers
    decodes: ClassVar[bool] = True
    # True for a lossy format convert takes as a source (converter/fp8_source.py): its values decode exactly from
    # the stored bytes and one per-tensor scale (tensor_scale_role) or none, so they can be quantized again
    convert_source: ClassVar[bool] = False

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        """True when `layer` (as stored) is of this format. Called in registry order; first claim wins."""
        raise NotImplementedError

    @classmethod
    def marker_conf(cls) -> dict[str, Any] | None:
        """The comfy_quant conf ComfyUI selects this format with ({"format": "nvfp4"}); None when there is none."""
        return {"format": cls.comfy_format} if cls.comfy_format else None

    @classmethod
    def proves_marker(cls, weight_dtype: str, roles: set[str], weight_shape: tuple[int, ...],
                      scale_shape: tuple[int, ...] | None) -> bool:
        """Whether a layer's header (weight dtype, roles present, weight and weight_scale shapes) proves this
        format beyond doubt, so that `nvdiag fix` may add its marker. False unless a format says how."""
        return False

    @classmethod
    def readings(cls) -> tuple[tuple[str, ...], ...]:
        """Every combination of the format's re-readings, single faults first: faults come together in real files
        (a hand-renamed ModelOpt export: linear scales AND low-nibble-first codes)."""
        names = list(cls.rereadings)
        return tuple(combo for n in range(1, len(names) + 1) for combo in combinations(names, n))

    @classmethod
    def reread(cls, tensors: Tensors, causes: tuple[str, ...]) -> Tensors | None:
        """The stored tensors read as a file with all of `causes` would need: None when a reading does not apply."""
        out: Tensors | None = tensors
        for cause in causes:
            out = cls.rereadings[cause](out) if out is not None else None
        return out

    @classmethod
    def native_tensors(cls, layer: Layer) -> dict[str, NativeTensor]:
        """The layer rewritten into `native_slug`'s tensors (see NativeTensor), markers excluded; reads only the
        scalars it needs. Raises ValueError when these bytes cannot be rewritten exactly."""
        raise NotImplementedError

    @classmethod
    def stored_tensors(cls, out_features: int, in_features: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(role, safetensors dtype, shape) of each tensor `quantize` writes for a [out, in] weight, in file order
        (what convert plans before it encodes)."""
        raise NotImplementedError

    @classmethod
    def default_scale(cls, amax: float, source: str) -> torch.Tensor:
        """The per-tensor scale (tensor_scale_role) the format's own rules give a weight of this amax and
        safetensors dtype, float32 0-d, as nvdiag encodes it."""
        raise NotImplementedError

    def fast_quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The same encoding as `quantize` through a faster (chunked, device-side) encoder, or None when the format
        has none. Callers that use it check it against `quantize` (a broken fast encoder must not set its own bar)."""
        return None

    def code_refit(self, tensors: Tensors, reference: torch.Tensor) -> torch.Tensor | None:
        """The stored codes decoded with the scales that best fit `reference` (the stale-scale hypothesis), or None
        when the format refits only per tensor (attribution then does that for it)."""
        return None

    def sign_agreement(self, tensors: Tensors, reference: torch.Tensor) -> float | None:
        """Share of non-zero stored codes whose sign matches `reference`; None where the format cannot tell."""
        return None

    @classmethod
    def logical_shape(cls, layer: Layer) -> tuple[int, ...] | None:
        """The unquantized weight shape [out, in] that the stored tensors imply (padding makes it a bound)."""
        return layer.shape("weight")

    @classmethod
    def decode_problem(cls, layer: Layer) -> tuple[str, str] | None:
        """(cause slug, reason) when the stored tensors cannot be decoded as this format, judged from the header
        alone; None when dequantize can run. The base checks what every format needs: its required roles and
        single-element scalars. Formats add their own shape rules (the ones lint reports)."""
        for role, spec in cls.signature.items():
            shape = layer.shape(role)
            if shape is None:
                if spec.required:
                    return MISSING_ROLE_CAUSES.get(role, "wrong-shape"), f"no {role} tensor"
                continue
            if spec.scalar and math.prod(shape) != 1:
                return "wrong-shape", f"{role} has shape {list(shape)}, a scalar has one element"
        return None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float weight [out, in] -> role -> tensor, exactly as written to a ComfyUI file."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """role -> stored tensor -> float32 weight of `shape` (padding cropped)."""
        raise NotImplementedError

    @classmethod
    def error_ceiling(cls, weight: torch.Tensor, scale: torch.Tensor) -> float | None:
        """The largest relative error ||decode(encode(W)) - W|| / ||W|| that ANY correct encoding of `weight` with
        this per-tensor `scale` can have, derived from the format's number grid alone (no encoder involved); None
        when the format states no such bound. A decode above it is wrong whatever any baseline says."""
        return None

    @classmethod
    def describe(cls) -> str:
        """'weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar' for diff and explanations."""
        parts = []
        for role, spec in cls.signature.items():
            s = f"{role} {spec.dtypes[0]}" + (" scalar" if spec.scalar else "")
            parts.append(s if spec.required else f"[{s}]")
        return " + ".join(parts)
