"""`nvdiag preset from-gguf`: reuse the layer selection of a GGUF file (city96/ComfyUI-GGUF style) as a preset.

Mapping (issue 7): F32 -> f32; F16 / BF16 -> fp16 / bf16; 4-bit and fewer (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K, IQ*) ->
nvfp4; types that gave the layer more bits (Q5_x, Q6_K, Q8_x: e.g. the v-projections and FFN-down a Q5_K_M file
raises to Q6_K, peers.md section C) -> `higher` (fp8 or keep). A bias the GGUF stores at another float type than
its kept weight (city96: every 1-D tensor F32) gets the rule's `bias` key: F32 tensors stay F32 per tensor. Names
are ComfyUI-native; layers that differ only in their block number and got the same type share one rule.
"""

from __future__ import annotations

import re
from pathlib import Path

from converter.preset import Preset, Rule, dumps_preset, loads_preset
from inspect_tools.errors import InputError, UsageError
from inspect_tools.layers import open_model
from reference_specs import models

FLOAT_ACTIONS = {"F32": "f32", "F16": "fp16", "BF16": "bf16", "F64": "f32"}
HIGHER_CHOICES = ("fp8", "keep")
_BLOCK_INDEX = re.compile(r"\\\.\d+\\\.")


def gguf_action(ggml_type: str, higher: str) -> str:
    """GGML type name of a layer's weight -> preset format."""
    t = ggml_type.upper()
    if t in FLOAT_ACTIONS:
        return FLOAT_ACTIONS[t]
    if t.startswith("IQ") or t in ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "TQ1_0", "TQ2_0"):
        return "nvfp4"
    if t in ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"):
        return higher
    raise InputError(f"unsupported GGML type {ggml_type}")


def _group_pattern(name: str) -> str:
    """'blocks.12.ffn.2' -> '^blocks\\.\\d+\\.ffn\\.2$' (the same layer in every block)."""
    return "^" + _BLOCK_INDEX.sub(r"\\.\\d+\\.", re.escape(name)) + "$"


def rules_from_decisions(decisions: list[tuple]) -> list[Rule]:
    """[(native name, format, ggml type[, bias format or None])] in file order -> rules: one per block-generalized
    name when every layer it covers agrees, else one exact rule per layer."""
    groups: dict[str, list[tuple]] = {}
    for item in decisions:
        groups.setdefault(_group_pattern(item[0]), []).append((*item[:3], item[3] if len(item) > 3 else None))
    rules: list[Rule] = []
    for pattern, items in groups.items():
        formats_ = {(fmt, bias) for _, fmt, _, bias in items}
        types = sorted({t for _, _, t, _ in items})
        if len(formats_) == 1 and (len(items) > 1 or pattern != "^" + re.escape(items[0][0]) + "$"):
            rules.append(Rule(format=items[0][1], regex=pattern, reason=f"GGUF {'/'.join(types)}", bias=items[0][3]))
        else:
            for name, fmt, t, bias in items:
                rules.append(Rule(format=fmt, regex="^" + re.escape(name) + "$", reason=f"GGUF {t}", bias=bias))
    return [Rule(format=r.format, regex=r.regex, reason=r.reason, index=i, bias=r.bias)
            for i, r in enumerate(rules, 1)]


def bias_action(layer, fmt: str) -> str | None:
    """The bias's own format when the GGUF stores it at another float type than the layer's kept weight (city96
    keeps every 1-D tensor F32, so a 16-bit weight's bias is F32 there): per tensor, not per layer."""
    bias = layer.tensors.get("bias")
    if bias is None or "weight" not in layer.tensors or fmt not in FLOAT_ACTIONS.values():
        return None
    action = FLOAT_ACTIONS.get(bias.dtype.upper())
    return action if action is not None and action != fmt else None


def preset_from_gguf(path: str | Path, higher: str = "fp8", name: str | None = None) -> Preset:
    if higher not in HIGHER_CHOICES:
        raise UsageError(f"--higher must be fp8 or keep, not {higher!r}")
    path = Path(path)
    with open_model(path) as model:
        if model.kind != "gguf":
            raise InputError("not a GGUF file", str(path))
        decisions = []
        for layer in model.layers.values():
            main = layer.tensors.get("weight") or layer.tensors.get("value") or next(iter(layer.tensors.values()))
            try:
                fmt = gguf_action(main.dtype, higher)
            except InputError as exc:
                raise InputError(f"{main.name}: {exc.message}", str(path)) from None
            decisions.append((layer.native_name or layer.name, fmt, main.dtype, bias_action(layer, fmt)))
        variant = model.detection.variant
        # the variants this GGUF's tensors fit: a GGUF cannot hold what tells look-alikes apart (no config.json; city96
        # files leave WAN's patch_embedding, hence the A14B experts' in_dim, out), so its preset fits them all
        fits = (variant, *models.could_also_be(model.detection)) if variant != "unknown" else ()
    preset = Preset(
        name=name or f"{path.stem}-gguf",
        rules=rules_from_decisions(decisions),
        default="keep",
        description=f"layer selection of {path.name} (higher-bit layers -> {higher})",
        architectures=fits,
    )
    text = dumps_preset(preset)
    loaded = loads_preset(text.encode("utf-8"), str(path))  # what the file will load back as (sha included)
    loaded.source = str(path)
    return loaded


def write_text_atomic(path: str | Path, text: str) -> None:
    """Temp file beside `path`, fsync, rename: an interrupted write leaves the old file or none."""
    from inspect_tools.writer import atomic_write_text  # the writer imports torch: not at CLI start-up

    atomic_write_text(Path(path), text)
