"""NV113 / NV114: layers in a format nvdiag recognises and names but does not decode (reference_specs/formats/
recognized.py). Each gets one finding that says what the format is, who writes it and what ComfyUI does with it,
so that no layer of such a file is left unexplained ("unknown")."""

from __future__ import annotations

from collections.abc import Iterable

from reference_specs import formats
from reference_specs.findings import Finding, Severity
from reference_specs.formats.moe_experts import MoEExperts, experts, inner_format
from reference_specs.formats.recognized import RecognizedFormat
from reference_specs.layer import Layer
from reference_specs.rules.base import ModelView, Rule, RuleContext


def recognized_format(layer: Layer) -> type[RecognizedFormat] | None:
    """The layer's format when it is one nvdiag names but does not decode, else None."""
    try:
        fmt = formats.get(layer.format)
    except KeyError:
        return None
    return fmt if isinstance(fmt, type) and issubclass(fmt, RecognizedFormat) else None


def _what(fmt: type[RecognizedFormat], layer: Layer) -> str:
    if fmt is MoEExperts:
        count = experts(layer)
        return f"{fmt.slug} layer: a bank of {count if count is not None else '?'} {inner_format(layer)} experts"
    return f"{fmt.slug} layer"


class _Recognized(Rule):
    native: bool

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            fmt = recognized_format(layer)
            if fmt is None or fmt.comfyui_native is not self.native:
                continue
            problem = fmt.decode_problem(layer)
            tail = f"; and it is incomplete: {problem[1]}" if problem is not None else ""
            yield self.finding(
                f"{_what(fmt, layer)}, {fmt.producer}: {fmt.comfyui}; nvdiag names it but does not decode or "
                f"verify it{tail}",
                layer.name,
                {"format": fmt.slug, "comfy_format": fmt.comfy_format, "marked": layer.marker is not None,
                 "roles": sorted(layer.tensors), **({"problem": problem[1]} if problem is not None else {})},
            )


class NewerComfyFormat(_Recognized):
    id = "NV113"
    name = "newer-comfyui-format"
    cause = "newer-comfyui-format"
    severity = Severity.WARNING
    native = True
    summary = ("a ComfyUI format beyond NVFP4/FP8 (MXFP8, INT8, ConvRot W4A4, AWQ W4A16, W4A8, MoE expert banks): "
               "named, not verified; older ComfyUI cannot load it")
    explanation = """\
ComfyUI's comfy_quant marker names more formats than NVFP4 and FP8. Comfy-Org/ComfyUI comfy/quant_ops.py (0271a469)
registers in QUANT_ALGOS, besides float8_e4m3fn, float8_e5m2 and nvfp4:
- "mxfp8": `.weight` F8_E4M3 padded to 32x32, `.weight_scale` E8M0 block scales, one per 32 elements (comfy-kitchen
  TensorCoreMXFP8Layout); registered only when the installed comfy-kitchen has MXFP8; fast matmul on Blackwell;
- "int8_tensorwise": `.weight` I8 [out, in], `.weight_scale` one float (comfy-kitchen TensorWiseINT8Layout, from
  OneTrainer); optional `convrot` in the marker;
- "convrot_w4a4": `.weight` I8 [out, in/2] Hadamard-rotated int4, `.weight_scale` [in/64, out];
- "awq_w4a16": `.weight` I8 [out, in/2] uint4, `.weight_scale` and `.weight_zeros` [in/G, out], G from the marker;
- "asym_w4a8_int8": `.weight` I8 [out, in/2], `.weight_s_rel`, `.weight_s_channel`, optional `.weight_codebook`;
- MoE expert banks (comfy/ops.py MoEExperts): the same tensors with a leading expert dimension E, per-expert
  scales, and `"num_experts": E` in the marker.
The ComfyUI snapshot nvdiag tests against (618b803, shared/comfyui) has only float8_e4m3fn, float8_e5m2 and nvfp4:
its loader looks the marker's format up in QUANT_ALGOS and stops with `KeyError: 'mxfp8'` (and likewise for the
others); it has no expert bank op. Without a marker any ComfyUI loads the stored values as a plain weight (NV103).

What you see: the file loads and runs in a ComfyUI new enough (and, for MXFP8, with a comfy-kitchen that has it);
an older one refuses it at load. nvdiag names these layers in inspect and diff but does not decode them: roundtrip
cannot measure them and convert does not read them.

Fix: nothing in the file; update ComfyUI (and comfy-kitchen) if it refuses the file. For an NVFP4 file, convert the
original 16-bit weights with `nvdiag convert`."""


class ThirdPartyLayout(_Recognized):
    id = "NV114"
    name = "third-party-layout"
    cause = "third-party-layout"
    native = False
    summary = "another runtime's quantized layout (Nunchaku SVDQuant, AutoAWQ) that ComfyUI's own loader never reads"
    explanation = """\
Some published quantized diffusion checkpoints are written for another runtime, with tensor names ComfyUI's loader
has no code for:
- Nunchaku SVDQuant W4A4 (nunchaku-tech/nunchaku nunchaku/models/linear.py, SVDQW4A4Linear): `.qweight` int8
  [out, in/2] 4-bit codes, `.wscales` [in/G, out] (16-bit, G 64, for int4; FP8 E4M3, G 16, for NVFP4, with
  `.wcscales` and `.wtscale`), `.smooth_factor` / `.smooth_factor_orig` [in], and the 16-bit low-rank branch
  `.proj_down` [in, rank] / `.proj_up` [out, rank];
- Nunchaku AWQ W4A16 (AWQW4A16Linear, its modulation layers): `.qweight` int32 [out/4, in/2], `.wscales` and
  `.wzeros` [in/64, out];
- AutoAWQ GEMM (WQLinear_GEMM): `.qweight` int32 [in, out/8], `.qzeros` int32 [in/G, out/8], `.scales` F16
  [in/G, out].
ComfyUI's Linear loader (comfy/ops.py) reads `.weight`, `.bias`, `.comfy_quant` and the scales its QUANT_ALGOS
lists. These layers have no `.weight`: the model is not detected, or loads with those weights missing (their keys
logged as left over), depending on the architecture.

What you see: "Load Diffusion Model" fails or the model produces garbage. Nunchaku files load through the
ComfyUI-nunchaku custom nodes; AutoAWQ checkpoints have no ComfyUI loader.

Fix: use the producer's loader, or start again from the 16-bit weights (`nvdiag convert` writes ComfyUI's NVFP4).
nvdiag names these layers but does not decode or convert them."""
