"""State dicts that nvdiag hands to ComfyUI: a reference ComfyUI core cannot load, and the baseline file.

- A GGUF file or a diffusers-named / sharded source becomes a plain state dict with ComfyUI-native names and float
  values (GGUF blocks dequantized by gguf-py), which `comfy.sd.load_diffusion_model_state_dict` takes.
- The baseline is the file as it should be: the reference's values encoded into the file's own per-layer formats by
  comfy-kitchen (the codec ComfyUI itself uses: NVFP4 with the per-tensor scale amax/2688, FP8 with amax/448, each
  computed on the reference in its own dtype as ComfyUI computes it) and cast
  to the file's dtypes elsewhere. What ComfyUI renders from it is the error a correct file of that layer selection
  gives, so the file's error is judged against an independent implementation, never against nvdiag's own encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from inspect_tools.comfyui.pieces import Piece
from inspect_tools.layers import CheckpointModel
from reference_specs import models
from reference_specs.layer import QUANT_METADATA_KEY

FLOAT_FORMATS = {"f32", "f16", "bf16", "f64"}
NVFP4_FORMATS = {"nvfp4"}
FP8_FORMATS = {"float8_e4m3fn", "scaled_fp8"}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# comfy-kitchen's maxima (comfy_kitchen/float_utils.py): F8_E4M3_MAX 448, F4_E2M1_MAX 6
F8_E4M3_MAX = 448.0
F4_E2M1_MAX = 6.0


def has_float_values(model: CheckpointModel) -> bool:
    """True when every tensor can be read as the model's real values (plain floats, or GGUF blocks)."""
    if model.kind == "gguf":
        return True
    return all(layer.format in FLOAT_FORMATS for layer in model.layers.values())


def loads_as_is(model: CheckpointModel) -> bool:
    """A single safetensors file with native names: ComfyUI's loader takes the path itself."""
    return model.kind == "safetensors" and model.detection.naming == "native"


def native_state_dict(model: CheckpointModel, piece: Piece | None = None) -> dict[str, torch.Tensor]:
    """Every tensor (of `piece`) under its ComfyUI-native name (renumbered for the piece), GGUF blocks dequantized,
    plain floats at their own dtype."""
    out: dict[str, torch.Tensor] = {}
    reader = model.reader
    for info in reader:
        key = models.native_name(model.detection, info.name)
        if piece is not None:
            key = piece.rename(key)
            if key is None:
                continue
        out[key] = reader.load_float(info.name) if model.kind == "gguf" else reader.load(info.name)
    return out


def file_state_dict(model: CheckpointModel, piece: Piece) -> dict[str, torch.Tensor]:
    """The file's own tensors of `piece`, under the file's own names (renumbered): what ComfyUI would read."""
    out: dict[str, torch.Tensor] = {}
    for info in model.reader:
        key = piece.rename(info.name)
        if key is not None:
            out[key] = model.reader.load(info.name)
    return out


def fill_from_file(ref: dict[str, torch.Tensor], file_model: CheckpointModel, piece: Piece | None = None) -> list[str]:
    """Plain float tensors the file has and the reference lacks, copied into the reference (names returned).

    city96's GGUF files leave the 5-D patch_embedding out (ComfyUI-GGUF carries it another way): without it ComfyUI
    cannot even detect the model. A tensor the file keeps in full precision is the same in any correct file."""
    added = []
    for layer in file_model.layers.values():
        if layer.format not in FLOAT_FORMATS:
            continue
        for info in layer.tensors.values():
            key = models.native_name(file_model.detection, info.name)
            inside = piece.rename(key) if piece is not None else key
            if inside is not None and inside not in ref:
                ref[inside] = file_model.reader.load(info.name)
                added.append(key)
    return added


def _marker(conf: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


# Rows per float64 chunk of _squared_error: a few MB of temporaries instead of five full-size float64 copies (a
# 13824x5120 layer: 3.9 s whole, 1.8 s in chunks on 2 cores).
ERROR_CHUNK_ELEMENTS = 1 << 20


def _squared_error(decoded: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(sum |decoded - w|^2, sum |w|^2) of two [rows, ...] tensors, accumulated in float64 row chunk by chunk."""
    row_elements = w[0].numel() if len(w) else 1
    rows = max(1, ERROR_CHUNK_ELEMENTS // max(1, row_elements))
    err2 = norm2 = 0.0
    for start in range(0, len(w), rows):
        x = w[start: start + rows].double()
        err2 += float((decoded[start: start + rows].double() - x).square().sum())
        norm2 += float(x.square().sum())
    return err2, norm2


# Elements per comfy-kitchen encoder call, in whole 128-row block-scale tiles: NVFP4 is row-local and the swizzled
# scales of a 128-row tile are contiguous, so the calls' codes and scales joined are the whole call's bytes
# (tests/test_baseline_encoding.py), while the eager encoder runs ~20x faster on row slices than on a large layer at
# once (a 13824x5120 FP32 layer: 0.63 s in 128-row calls against 4.3-12.5 s whole, on 2 cores).
CK_CHUNK_ELEMENTS = 1 << 20
SCALE_TILE_ROWS = 128


def _nvfp4_encode(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """comfy-kitchen's NVFP4 encoding of a float weight and what it decodes to: TensorCoreNVFP4Layout.quantize, the
    layout ComfyUI registers unchanged, on the weight in its own dtype (a BF16 weight gets the BF16-rounded per-tensor
    scale amax/2688 that ComfyUI gives it).
    Faster, same bytes (tests/test_baseline_encoding.py holds it to the plain call): the per-tensor scale is taken
    once, as that call takes it, on the weight in its own dtype; then comfy-kitchen encodes row slices of whole
    scale tiles (CK_CHUNK_ELEMENTS), a 16-bit weight as float32 (its eager quantize_nvfp4 takes only |x|, block
    maxima and x.float() from it: all exact in float32; 2.5x faster on a BF16 layer)."""
    import comfy_kitchen as ck
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    # TensorCoreNVFP4Layout.quantize's own default scale, in the weight's dtype
    scale = (torch.amax(weight.abs()) / (F8_E4M3_MAX * F4_E2M1_MAX)).to(torch.float32)
    rows, cols = weight.shape
    step = SCALE_TILE_ROWS * max(1, CK_CHUNK_ELEMENTS // (SCALE_TILE_ROWS * max(1, cols)))
    codes, block_scales = [], []
    for start in range(0, max(1, rows), step):
        qdata, params = TensorCoreNVFP4Layout.quantize(weight[start: start + step].float(), scale=scale)
        codes.append(qdata)
        block_scales.append(params.block_scale)
    qdata, block_scale = torch.cat(codes), torch.cat(block_scales)
    decoded = ck.dequantize_nvfp4(qdata, scale, block_scale, output_type=torch.float32)
    return {"weight": qdata, "weight_scale": block_scale, "weight_scale_2": scale}, decoded[:rows, :cols]


def _fp8_encode(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ComfyUI's FP8 E4M3 encoding of a float weight (per-tensor scale amax/448) and what it decodes to: its own
    TensorCoreFP8E4M3Layout (comfy/quant_ops.py: the scale in float32, clamped for F16 weights so that the F16
    reciprocal stays finite) when ComfyUI is imported, which it is wherever a baseline is rendered; comfy-kitchen's
    quantize_per_tensor_fp8 with that scale rule otherwise."""
    import comfy_kitchen as ck

    try:
        from comfy.quant_ops import TensorCoreFP8E4M3Layout
    except ImportError:
        TensorCoreFP8E4M3Layout = None  # noqa: N806
    if TensorCoreFP8E4M3Layout is not None:
        qdata, params = TensorCoreFP8E4M3Layout.quantize(weight, scale="recalculate")
        scale = params.scale.reshape(())
    else:
        w = weight.float()
        scale = torch.amax(w.abs()).to(torch.float32) / F8_E4M3_MAX
        qdata = ck.quantize_per_tensor_fp8(w, scale)
    decoded = ck.dequantize_per_tensor_fp8(qdata, scale, output_type=torch.float32)
    return {"weight": qdata, "weight_scale": scale}, decoded


def nvfp4_decoded(weight: torch.Tensor) -> torch.Tensor:
    return _nvfp4_encode(weight)[1]


def fp8_decoded(weight: torch.Tensor) -> torch.Tensor:
    return _fp8_encode(weight)[1]


def _nvfp4(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    tensors, decoded = _nvfp4_encode(weight)
    return tensors, _squared_error(decoded, weight.float())


def _fp8(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    tensors, decoded = _fp8_encode(weight)
    return tensors, _squared_error(decoded, weight.float())


@dataclass
class Baseline:
    state_dict: dict[str, torch.Tensor] | None
    note: str  # what it is, or why there is none
    # A file made from the true weights differs from a lossy reference by its own error and the reference's, which
    # add in quadrature (independent errors); the baseline, encoded from the reference, carries only the first.
    # sqrt(1 + sum e_ref^2 / sum e_fmt^2) over the encoded layers scales the baseline's output error to what a
    # correct file shows against this reference (1.0 for an exact reference).
    encoded: int = 0
    fmt_err2: float = 0.0  # sum over encoded layers of |decoded - ref|^2
    ref_err2: float = 0.0  # sum over encoded layers of (e_ref |ref|)^2

    @property
    def reference_factor(self) -> float:
        return (1.0 + self.ref_err2 / self.fmt_err2) ** 0.5 if self.fmt_err2 > 0 else 1.0


def describe(encoded: int, reference_factor: float) -> str:
    what = f"{encoded} layers encoded by comfy-kitchen" if encoded else "the reference cast to the file's dtypes"
    lossy = (f"; the reference is lossy itself: expected error x{reference_factor:.2f}"
             if reference_factor > 1.01 else "")
    return f"the reference in the file's formats ({what}){lossy}"


def baseline_state_dict(file_model: CheckpointModel, ref: dict[str, torch.Tensor],
                        ref_errors: dict[str, float] | None = None, piece: Piece | None = None) -> Baseline:
    """`ref` (native names, renumbered for `piece`) re-encoded into the file's per-layer formats by comfy-kitchen;
    input_scale left out (dynamic).

    ref_errors: native layer name -> the relative error the reference's own layer carries (0 for plain floats)."""
    out = dict(ref)
    encoded = 0
    fmt_err2 = ref_err2 = 0.0
    for layer in file_model.layers.values():
        whole_name = layer.native_name or layer.name
        native = piece.rename(whole_name) if piece is not None else whole_name
        if native is None:
            continue
        weight_key = f"{native}.weight" if layer.has("weight") else native
        if weight_key not in ref:
            return Baseline(None, f"the reference has no {weight_key}: no baseline")
        marker = layer.marker or {}
        if layer.format in NVFP4_FORMATS | FP8_FORMATS:
            if layer.format in NVFP4_FORMATS:
                conf: dict[str, Any] = {"format": "nvfp4"}
                tensors, (err2, norm2) = _nvfp4(ref[weight_key])
            else:
                conf = {"format": "float8_e4m3fn"}
                tensors, (err2, norm2) = _fp8(ref[weight_key])
            fmt_err2 += err2
            ref_err2 += (ref_errors or {}).get(whole_name, 0.0) ** 2 * norm2
            if marker.get("full_precision_matrix_mult") is True:
                conf["full_precision_matrix_mult"] = True
            for role, tensor in tensors.items():
                out[f"{native}.{role}"] = tensor
            out[f"{native}.comfy_quant"] = _marker(conf)
            encoded += 1
            roles = ("bias",)
        elif layer.format in FLOAT_FORMATS:
            roles = tuple(layer.tensors)
        else:
            return Baseline(None, f"layer {layer.name} is {layer.format}: no comfy-kitchen baseline for it")
        for role in roles:
            info = layer.tensors.get(role)
            key = native if role == "value" else f"{native}.{role}"
            dtype = TORCH_DTYPES.get(info.dtype) if info is not None else None
            if key in ref and dtype is not None:
                out[key] = ref[key].to(dtype)
    baseline = Baseline(out, "", encoded=encoded, fmt_err2=fmt_err2, ref_err2=ref_err2)
    baseline.note = describe(encoded, baseline.reference_factor)
    return baseline


# Header keys ComfyUI's diffusion-model loader does not read (nvdiag's provenance, safetensors' own "format"). It
# reads `_quantization_metadata` (comfy/utils.py convert_old_quants: each layer's entry replaces its .comfy_quant
# tensor) and `config` (comfy/model_detection.py); a newer ComfyUI may read more, so any key not listed here counts
# as one that could make a file load differently from a state dict.
UNREAD_HEADER_KEYS = frozenset({"nvdiag", "format"})


def header_markers(metadata: dict[str, str] | None) -> dict[str, bytes] | None:
    """The .comfy_quant marker bytes ComfyUI makes from a header's `_quantization_metadata` (key -> JSON bytes, as
    convert_old_quants writes them), {} without one; None when the header holds a key the loader may read otherwise,
    or `_quantization_metadata` that does not parse as ComfyUI expects."""
    metadata = dict(metadata or {})
    quant = metadata.pop(QUANT_METADATA_KEY, None)
    if any(key not in UNREAD_HEADER_KEYS for key in metadata):
        return None
    if quant is None:
        return {}
    try:
        layers = json.loads(quant)["layers"]
        return {f"{name}.comfy_quant": json.dumps(conf).encode("utf-8") for name, conf in layers.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def loads_as(file_model: CheckpointModel, piece: Piece, metadata: dict[str, str] | None,
             state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ComfyUI, loading the file's `piece` with this header metadata (as verify hands it over), receives
    exactly `state_dict`: the same keys, every tensor the same dtype, shape and bytes, markers as the header sets
    them. Then it builds and runs the same model from both. Reads the file's tensors one at a time."""
    markers = header_markers(metadata)
    if markers is None:
        return False
    names = {}
    for info in file_model.reader:
        key = piece.rename(info.name)
        if key is not None:
            names[key] = info.name
    if set(names) | set(markers) != set(state_dict):
        return False
    for key, tensor in state_dict.items():
        if key in markers:
            expected = torch.tensor(list(markers[key]), dtype=torch.uint8)
        else:
            expected = file_model.reader.load(names[key])
        if not _same_bytes(expected, tensor):
            return False
    return True
