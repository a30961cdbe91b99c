"""NV204 / NV205: block scales stored row-major instead of in cuBLAS's swizzled 128x4 tile layout.

NV205 reads only the header: a block-scale tensor shaped [out, in/16] without the 128x4 padding can only come from a
row-major writer. NV204 is a statistical probe for the case where the padded shapes coincide: it decodes the same
bytes both ways and asks which reading has the structure real weights give their block scales (scales vary
strongly per output row and per input channel, so log2(scale) is close to row effect + column effect). The wrong
reading scatters 4-column groups of 32-row-strided rows and destroys most of that structure.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reference_specs.findings import Finding, Severity
from reference_specs.formats.nvfp4 import BLOCK, block_scale_shape
from reference_specs.layer import Layer
from reference_specs.rules.base import NVFP4, ModelView, Rule, RuleContext
from reference_specs.rules.scale_data import as_linear, as_swizzled, load_block_scales
from reference_specs.rules.shapes import linear_scale_shapes, nvfp4_dims

if TYPE_CHECKING:
    import torch

MAX_PROBE_LAYERS = 16  # evenly spaced over the file: enough evidence, a few megabytes read
MAX_PROBE_ROWS = 512  # 4 tile rows; a row band of tiles is contiguous in both layouts, so a prefix is a sample
MIN_PROBE_VALUES = 64
LAYER_MARGIN = 0.05  # a layer "favours" a layout when its structure score is this much higher
VERDICT_MARGIN = 0.10  # median difference needed for a verdict
VERDICT_SHARE = 2 / 3  # and this share of the informative layers must agree


def structure_score(scales: torch.Tensor) -> float | None:
    """Adjusted R^2 of log2(scale) explained by row means + column means (two-way additive model), over the finite
    positive entries (zero blocks and padding excluded). ~0 for i.i.d. noise, near 1 for strong row/column structure.
    None when too few values or no variance."""
    import torch

    valid = torch.isfinite(scales) & (scales > 0)
    n = int(valid.sum())
    if n < MIN_PROBE_VALUES:
        return None
    mask = valid.to(torch.float64)
    y = torch.where(valid, torch.log2(torch.where(valid, scales, torch.ones_like(scales))), torch.zeros_like(scales))
    y = y.to(torch.float64)
    grand = float((y * mask).sum()) / n
    row_n, col_n = mask.sum(1), mask.sum(0)
    row_mean = torch.where(row_n > 0, (y * mask).sum(1) / row_n.clamp(min=1), torch.full_like(row_n, grand))
    col_mean = torch.where(col_n > 0, (y * mask).sum(0) / col_n.clamp(min=1), torch.full_like(col_n, grand))
    fitted = row_mean[:, None] + col_mean[None, :] - grand
    ss_total = float((((y - grand) ** 2) * mask).sum())
    ss_resid = float((((y - fitted) ** 2) * mask).sum())
    dof = n - int((row_n > 0).sum()) - int((col_n > 0).sum()) + 1
    if ss_total <= 1e-12 or dof <= 0:
        return None
    return 1.0 - (ss_resid / dof) / (ss_total / (n - 1))


@dataclass
class LayerScore:
    layer: str
    swizzled: float
    linear: float

    @property
    def difference(self) -> float:
        """Positive: the swizzled reading (what ComfyUI does) has more structure."""
        return self.swizzled - self.linear


def score_layer(layer: Layer, ctx: RuleContext) -> LayerScore | None:
    """Both readings of one layer's block scales, or None when the layer cannot tell them apart."""
    stored_shape = layer.shape("weight_scale")
    dims = nvfp4_dims(layer, ctx)
    if stored_shape is None or dims is None or stored_shape != block_scale_shape(*dims):
        return None  # unpadded (NV205) or inconsistent (NV106) shapes: nothing to compare
    if stored_shape[1] <= 4:
        return None  # one tile column: the two readings differ by a row permutation only
    stored = load_block_scales(layer)
    if stored is None or not bool(stored[:MAX_PROBE_ROWS].any()):
        return None  # all-zero scales (a header-only file's holes): nothing to read
    band = min(stored.shape[0], MAX_PROBE_ROWS)
    rows, cols = min(dims[0], band), -(-dims[1] // BLOCK)
    swizzled = as_swizzled(stored[:band], rows, cols)
    linear = as_linear(stored[:band], rows, cols)
    if swizzled is None or linear is None:
        return None
    s, lin = structure_score(swizzled), structure_score(linear)
    if s is None or lin is None:
        return None
    return LayerScore(layer.name, round(s, 4), round(lin, 4))


def padding_reading(layer: Layer, ctx: RuleContext) -> str | None:
    """'swizzled' or 'linear' when exactly one reading leaves every padding slot zero, None when the layer has no
    padding or both (or neither) readings do.

    The swizzled layout pads the [out, in/16] scales to [roundup(out, 128), roundup(in/16, 4)] with zeros
    (comfy-kitchen's to_blocked, cuBLAS's layout); a row-major writer that pads to the same shape puts its zeros
    at the end instead. Read the wrong way, real scales land in the padding slots. This holds for every weight
    statistic, where the structure score needs structured weights."""
    stored_shape, dims = layer.shape("weight_scale"), nvfp4_dims(layer, ctx)
    if stored_shape is None or dims is None or stored_shape != block_scale_shape(*dims):
        return None
    rows, cols = dims[0], -(-dims[1] // BLOCK)
    if (rows, cols) == tuple(stored_shape):
        return None  # no padding slot: nothing to read
    stored = load_block_scales(layer)
    if stored is None or not bool(stored.any()):
        return None

    def padding_is_zero(logical: torch.Tensor) -> bool:  # noqa: F821 - torch only under TYPE_CHECKING
        return not bool(logical[rows:].any()) and not bool(logical[:, cols:].any())

    swizzled = as_swizzled(stored, *stored.shape)
    if swizzled is None:
        return None
    readings = {"swizzled": padding_is_zero(swizzled), "linear": padding_is_zero(stored)}
    zero = [name for name, ok in readings.items() if ok]
    return zero[0] if len(zero) == 1 else None


def _sample(layers: list[Layer], limit: int) -> list[Layer]:
    # Not reference_specs.sampling.spread: this one never takes the last layer (floor of i * len / limit), and
    # switching would change which layers NV204's evidence is measured on.
    if len(layers) <= limit:
        return layers
    step = len(layers) / limit
    return [layers[int(i * step)] for i in range(limit)]


def probe(model: ModelView, ctx: RuleContext) -> dict[str, object]:
    """Score a sample of the NVFP4 layers and aggregate: the evidence behind NV204's verdict."""
    candidates = [layer for layer in ctx.layers_of(NVFP4) if layer.has("weight_scale")]
    sampled = _sample(candidates, MAX_PROBE_LAYERS)
    padded = [p for layer in sampled if (p := padding_reading(layer, ctx)) is not None]
    scores = [s for layer in sampled if (s := score_layer(layer, ctx)) is not None]
    diffs = [s.difference for s in scores]
    favour_linear = sum(d < -LAYER_MARGIN for d in diffs)
    favour_swizzled = sum(d > LAYER_MARGIN for d in diffs)
    median = statistics.median(diffs) if diffs else 0.0
    verdict, basis = "inconclusive", None
    if padded and len(set(padded)) == 1:
        verdict, basis = padded[0], "padding"
    elif diffs and median < -VERDICT_MARGIN and favour_linear >= VERDICT_SHARE * len(diffs):
        verdict, basis = "linear", "structure"
    elif diffs and median > VERDICT_MARGIN and favour_swizzled >= VERDICT_SHARE * len(diffs):
        verdict, basis = "swizzled", "structure"
    return {
        "verdict": verdict,
        "basis": basis,
        "layers_candidate": len(candidates),
        "layers_with_padding": len(padded),
        "layers_scored": len(scores),
        "layers_favouring_swizzled": favour_swizzled,
        "layers_favouring_linear": favour_linear,
        "median_difference": round(median, 4),
        "scores": [{"layer": s.layer, "swizzled": s.swizzled, "linear": s.linear} for s in scores[:8]],
    }


_EXPLANATION = """\
comfy-kitchen and ComfyUI store NVFP4 block scales in the cuBLAS "swizzled" layout: the [out, in/16] scale matrix
is padded to [roundup(out,128), roundup(in/16,4)] and written as 128x4 tiles, rows interleaved in groups of 32.
ComfyUI decodes `.weight_scale` that way unconditionally (`from_blocked`); a file written row-major (as torchao,
ModelOpt exports and many hand-written converters do) loads without any error, but every block of 16 weights gets
another block's scale.

What you see: the model loads and renders structured noise (blocky patterns, color confetti), while the same
quantizer's own dequantization looks fine.

Fix: `nvdiag fix` re-swizzles the block scales in place (no requantization needed); `nvdiag convert` writes the
right layout."""


class ScaleLayoutLinear(Rule):
    id = "NV204"
    name = "scale-layout-linear"
    cause = "scale-layout-linear"
    needs_values = True
    summary = "block scales stored row-major instead of the swizzled 128x4 layout (statistical probe)"
    explanation = _EXPLANATION + """

How it is detected: each sampled layer's block scales are read both ways (as swizzled and as row-major) and scored
by how much of the variance of log2(scale) row means + column means explain (adjusted R^2). Real weights give the
right reading far more structure. The verdict needs a clear median difference agreed by most layers. Before that,
layers whose scale matrix has padding slots (out not a multiple of 128, or in/16 not a multiple of 4) are read
exactly: the swizzled layout leaves those slots zero, a row-major writer leaves its zeros at the end, so only the
right reading has zero padding, whatever the weights look like. Where neither gives a verdict (i.i.d., uniform
or per-head weights of unpadded layers), NV204 says so as an info finding instead of passing silently: a roundtrip
against any reference decides the layout exactly. The evidence lists the scores."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        evidence = probe(model, ctx)
        if evidence["verdict"] == "linear" and evidence["basis"] == "padding":
            yield self.finding(
                f"read as swizzled, the block scales put real values in the padding slots; read row-major they leave "
                f"them zero ({evidence['layers_with_padding']} padded layers agree): the file uses the linear layout "
                "ComfyUI misreads", None, evidence)
        elif evidence["verdict"] == "linear":
            yield self.finding(
                f"block scales read as row-major have far more structure than as swizzled "
                f"({evidence['layers_favouring_linear']} of {evidence['layers_scored']} layers, median score "
                f"difference {evidence['median_difference']}): the file uses the linear layout ComfyUI misreads",
                None, evidence)
        elif evidence["verdict"] == "inconclusive" and evidence["layers_candidate"]:
            yield self.finding(
                "layout not determinable from the block scales alone (no padding slots to read, and these weights "
                "give neither reading more structure): run `nvdiag roundtrip` against any reference you have "
                "(the FP16, FP8 or GGUF file, or the source); it decides the layout layer by layer",
                None, evidence, severity=Severity.INFO)


class ScaleLayoutUnpadded(Rule):
    id = "NV205"
    name = "scale-layout-unpadded"
    cause = "scale-layout-linear"
    summary = "block scales shaped [out, in/16] without 128x4 padding: only a row-major writer produces this"
    explanation = _EXPLANATION + """

How it is detected: from the header alone. The swizzled layout always pads the scale matrix to multiples of 128
rows and 4 columns; a `.weight_scale` of exactly [out, in/16] that differs from the padded shape was written
row-major. ComfyUI's unswizzle then either fails with a reshape error or reads the wrong scales."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in ctx.layers_of(NVFP4):
            shape = layer.shape("weight_scale")
            dims = nvfp4_dims(layer, ctx)
            if shape is None or dims is None or shape not in linear_scale_shapes(layer, ctx):
                continue
            yield self.finding(
                f"block scale {list(shape)} is the unpadded row-major shape; the swizzled layout needs "
                f"{list(block_scale_shape(*dims))}",
                layer.name,
                {"expected": list(block_scale_shape(*dims)), "found": list(shape), "layout": "linear"},
            )
