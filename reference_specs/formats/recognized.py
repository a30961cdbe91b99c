"""Formats nvdiag recognises and names but does not decode (issue 16): inspect shows them, diff aligns them, lint
explains what ComfyUI does with them (NV113 / NV114, reference_specs/rules/recognized_formats.py). Never "unknown".

Two kinds:
- ComfyUI's own newer comfy_quant formats (MXFP8, INT8 tensorwise, ConvRot W4A4, AWQ W4A16, W4A8, MoE expert
  banks): ComfyUI loads them from the version whose comfy/quant_ops.py QUANT_ALGOS names them (0271a469 does; the
  oracle snapshot in shared/comfyui, 618b803, knows only float8_e4m3fn, float8_e5m2 and nvfp4, and its loader stops
  with KeyError on `QUANT_ALGOS[format]` for any other marker);
- other runtimes' layouts (Nunchaku SVDQuant W4A4 and AWQ W4A16, AutoAWQ GEMM): tensor names ComfyUI's loader
  never reads (comfy/ops.py reads `.weight`, `.bias`, `.comfy_quant` and the scales QUANT_ALGOS lists).

Each format still declares its signature (roles and dtypes, so its keys group into layers and NV105 checks dtypes)
and its logical [out, in] shape (so diff aligns it with the same layer of another file); `dequantize` says plainly
that nvdiag does not decode it, which roundtrip reports as a layer it cannot measure.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from reference_specs.formats.base import Format
from reference_specs.layer import Layer

if TYPE_CHECKING:
    import torch

FLOAT_SCALE_DTYPES = ("BF16", "F16", "F32")


def newer_comfyui(fmt: str, detail: str) -> str:
    """The `comfyui` line of a comfy_quant format that newer ComfyUI loads and the oracle snapshot does not; `detail`
    follows the commit that has it (what its matmul path needs)."""
    return (f"ComfyUI loads it from the version whose QUANT_ALGOS has {fmt!r} (comfy/quant_ops.py 0271a469{detail}); "
            f"older ones (618b803) stop with KeyError: {fmt!r}")


def marked(layer: Layer, comfy_format: str) -> bool:
    """The layer's marker selects `comfy_format` for a plain (not expert-bank) Linear."""
    conf = layer.marker
    return isinstance(conf, dict) and conf.get("format") == comfy_format and "num_experts" not in conf


def numel(layer: Layer, role: str) -> int | None:
    shape = layer.shape(role)
    return math.prod(shape) if shape is not None else None


def packed_int4_shape(layer: Layer, role: str = "weight") -> tuple[int, ...] | None:
    """[out, in] of an int8 tensor holding two 4-bit codes per byte along `in` ([out, in/2])."""
    shape = layer.shape(role)
    return (shape[0], shape[1] * 2) if shape is not None and len(shape) == 2 else shape


class RecognizedFormat(Format):
    """A quantized layout nvdiag names but does not decode (see the module docstring)."""

    quantized: ClassVar[bool] = True
    decodes: ClassVar[bool] = False
    # True: a comfy_quant format of newer ComfyUI (NV113); False: another runtime's layout (NV114).
    comfyui_native: ClassVar[bool] = True
    # One line each: who writes the layout, and what ComfyUI does with a layer of it (lint's message).
    producer: ClassVar[str] = ""
    comfyui: ClassVar[str] = ""

    @classmethod
    def claims(cls, layer: Layer, file_markers: dict[str, Any]) -> bool:
        return cls.comfy_format is not None and marked(layer, cls.comfy_format)

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"nvdiag recognises {self.slug} layers but does not encode them")

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError(f"nvdiag recognises {self.slug} layers but does not decode them")
