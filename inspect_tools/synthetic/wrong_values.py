"""Readable checkpoints whose values are wrong: the other half of the bad-input factory (bad_inputs.py holds files
that cannot be read at all). A reader accepts every file here; the commands must not: each entry says what a
command has to report, so a test can run every case against every command it names.

    for case in WRONG_VALUES.values():
        path = case.build(tmp_path / case.name)   # the builder creates that folder and returns the path to pass
        ...  # e.g. `nvdiag lint path` exits case.lint_exit with a finding of cause case.cause

Built from the synthetic WAN TI2V-5B fixtures (2 blocks, width 256), written with safetensors/gguf writers and then
patched, tiny and deterministic.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from inspect_tools.synthetic.gguf_files import write_gguf
from inspect_tools.synthetic.state_dicts import float_state_dict
from inspect_tools.synthetic.writers import (
    save_safetensors,
    write_fp8_comfy,
    write_nvfp4_mixed,
    write_scaled_fp8_legacy,
)

VARIANT = "wan2.2-ti2v-5b"
# A layer the wan2.2-ti2v-5b preset keeps at 16 bits (bf16, fp16 with --dtype-16 fp16), and one it quantizes.
KEPT_LAYER = "head.head"
QUANTIZED_LAYER = "blocks.0.ffn.0"
# Beyond FP16's largest finite value (65504): a narrowing cast makes them +Inf / -Inf.
BEYOND_FP16 = (1e5, -7e4)
SUBNORMAL_F32 = 1e-45  # the smallest positive float32 subnormal (2^-149)
F16_NAN = 0x7E00


@dataclass(frozen=True)
class WrongValue:
    """name: the case; doc: what is wrong; build(folder) -> the path to pass; cause: the catalogue slug a finding
    must name (None: the command must refuse the input instead); commands: what each one must do with it,
    command -> exit code."""

    name: str
    doc: str
    build: Callable[[Path], Path]
    cause: str | None
    commands: dict[str, int]


WRONG_VALUES: dict[str, WrongValue] = {}


def case(name: str, doc: str, cause: str | None, **commands: int) -> Callable[[Callable[[Path], Path]],
                                                                              Callable[[Path], Path]]:
    def register(fn: Callable[[Path], Path]) -> Callable[[Path], Path]:
        WRONG_VALUES[name] = WrongValue(name, doc, fn, cause, commands)
        return fn

    return register


def _patched(path: Path, change: Callable[[dict[str, torch.Tensor]], None],
             metadata: dict[str, str] | None = None) -> Path:
    """Rewrite a safetensors file with `change` applied to its tensors (metadata kept unless given)."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    if metadata is None:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
    change(tensors)
    return save_safetensors(tensors, path, metadata)


# --- sources convert must handle ---------------------------------------------------------------------------------

@case("fp16-overflow-source", f"F32 source whose kept layer {KEPT_LAYER} holds 1e5 and -7e4 (beyond FP16's 65504)",
      None, convert_fp16=0)
def fp16_overflow_source(folder: Path) -> Path:
    tensors = float_state_dict(VARIANT)
    weight = tensors[f"{KEPT_LAYER}.weight"]
    weight[0, :10], weight[1, :10] = BEYOND_FP16
    return save_safetensors(tensors, folder / "src.safetensors")


@case("zero-weight-source", f"F32 source whose quantized layer {QUANTIZED_LAYER} is all zeros", None, convert=0)
def zero_weight_source(folder: Path) -> Path:
    tensors = float_state_dict(VARIANT)
    tensors[f"{QUANTIZED_LAYER}.weight"].zero_()
    return save_safetensors(tensors, folder / "src.safetensors")


@case("negative-zero-weight-source", f"F32 source whose quantized layer {QUANTIZED_LAYER} is all -0.0", None,
      convert=0)
def negative_zero_weight_source(folder: Path) -> Path:
    tensors = float_state_dict(VARIANT)
    tensors[f"{QUANTIZED_LAYER}.weight"].fill_(-0.0)
    return save_safetensors(tensors, folder / "src.safetensors")


@case("no-tensors", "a valid safetensors file with no tensor at all", None, convert=2, roundtrip_against=2)
def no_tensors(folder: Path) -> Path:
    return save_safetensors({}, folder / "empty.safetensors")


@case("empty-weight-map", "a sharded index whose weight_map is {}", None, roundtrip_against=2)
def empty_weight_map(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return index


# --- files lint must flag ----------------------------------------------------------------------------------------

@case("inf-in-kept-weight", f"NVFP4 mixed file whose kept F16 layer {KEPT_LAYER} holds +Inf and -Inf (what a "
      "narrowing cast of 1e5 gives)", "non-finite-weight", lint=1, fix=1)
def inf_in_kept_weight(folder: Path) -> Path:
    path = write_nvfp4_mixed(folder / "model.safetensors", VARIANT, dtype=torch.float16)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        weight = tensors[f"{KEPT_LAYER}.weight"]
        weight[0, :10], weight[1, :10] = float("inf"), float("-inf")

    return _patched(path, poison)


def _legacy_scale(value: float | None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = write_scaled_fp8_legacy(folder / "model.safetensors", VARIANT)

        def change(tensors: dict[str, torch.Tensor]) -> None:
            key = f"{QUANTIZED_LAYER}.scale_weight"
            if value is None:
                del tensors[key]
            else:
                tensors[key] = torch.tensor(value, dtype=torch.float32)

        return _patched(path, change)

    return build


for _name, _value, _cause in (("nan", float("nan"), "non-finite-scale"), ("zero", 0.0, "non-finite-scale"),
                              ("negative", -0.002, "non-finite-scale"), ("missing", None, "missing-tensor-scale")):
    case(f"scaled-fp8-{_name}-scale-weight", f"legacy scaled_fp8 file whose {QUANTIZED_LAYER}.scale_weight is "
         f"{_name}", _cause, lint=1, fix=1)(_legacy_scale(_value))


@case("nvfp4-subnormal-scale2", f"NVFP4 mixed file whose {QUANTIZED_LAYER}.weight_scale_2 is 1e-45 (subnormal)",
      "non-finite-scale", lint=1, fix=1)
def nvfp4_subnormal_scale2(folder: Path) -> Path:
    path = write_nvfp4_mixed(folder / "model.safetensors", VARIANT)

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{QUANTIZED_LAYER}.weight_scale_2"] = torch.tensor(SUBNORMAL_F32, dtype=torch.float32)

    return _patched(path, change)


# --- references roundtrip must not call "ok" ---------------------------------------------------------------------

@case("nan-reference", f"F32 reference whose quantized layer {QUANTIZED_LAYER} holds a NaN", "non-finite-weight",
      roundtrip_against=1)
def nan_reference(folder: Path) -> Path:
    tensors = float_state_dict(VARIANT)
    tensors[f"{QUANTIZED_LAYER}.weight"][3, 5] = float("nan")
    return save_safetensors(tensors, folder / "ref.safetensors")


@case("fp8-nan-scale", f"comfy_quant FP8 file whose {QUANTIZED_LAYER}.weight_scale is NaN", "non-finite-scale",
      lint=1, roundtrip=1, roundtrip_against=1)
def fp8_nan_scale(folder: Path) -> Path:
    path = write_fp8_comfy(folder / "model.safetensors", VARIANT)

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{QUANTIZED_LAYER}.weight_scale"] = torch.tensor(float("nan"), dtype=torch.float32)

    return _patched(path, change)


@case("gguf-nan-block-scale", f"GGUF Q8_0 whose {QUANTIZED_LAYER}.weight has a NaN block scale (f16 d)",
      "non-finite-scale", roundtrip=1, roundtrip_against=1)
def gguf_nan_block_scale(folder: Path) -> Path:
    from inspect_tools.readers import open_checkpoint

    path = write_gguf(folder / "model.gguf", VARIANT, qtype="Q8_0")
    with open_checkpoint(path) as reader:
        info = reader.tensors[f"{QUANTIZED_LAYER}.weight"]
        assert info.dtype == "Q8_0", info.dtype
        offset = info.offset
    with path.open("r+b") as fh:  # a Q8_0 block starts with its f16 scale d
        fh.seek(offset)
        fh.write(struct.pack("<H", F16_NAN))
    return path
