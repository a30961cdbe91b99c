"""NV206: NaN or Inf in weights stored as plain floats (the layers a conversion keeps at F32/BF16/F16).

Quantized layers hide a NaN behind their scales (NV202 reads those); a kept layer has no scale, so the only way to
know is to read its values. That costs one pass over the bytes, so the rule reads every plain float tensor of a
file up to RuleContext.weight_budget (1 GiB: every kept layer of a converted model) and an evenly spread sample
beyond it (`nvdiag lint --all-scales` reads all). One tensor is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from reference_specs.findings import Finding
from reference_specs.layer import Layer
from reference_specs.rules.base import ModelView, Rule, RuleContext
from reference_specs.sampling import spread

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
VALUE_ROLES = ("weight", "value", "bias")


def non_finite_counts(tensor: torch.Tensor) -> dict[str, int] | None:
    """NaN / +Inf / -Inf counts of a float tensor; None when every value is finite.

    One aminmax pass clears a healthy tensor (NaN propagates through it, an Inf is an extreme) without the full-size
    bool temporary of isfinite(); only a tensor that fails pays for the exact counts."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if tensor.element_size() == 1:  # float8 has no aminmax on the CPU; widening is exact
        tensor = tensor.to(torch.float16)
    lo, hi = torch.stack(torch.aminmax(tensor)).tolist()  # one transfer (on a GPU: one wait for the device)
    if math.isfinite(lo) and math.isfinite(hi):
        return None
    return {"nan": int(torch.isnan(tensor).sum()), "inf": int(torch.isposinf(tensor).sum()),
            "-inf": int(torch.isneginf(tensor).sum()), "total": tensor.numel()}


def plain_tensors(model: ModelView) -> list[tuple[Layer, str]]:
    """(layer, role) of every plain float tensor of an unquantized layer, in file order."""
    out = []
    for layer in model.layers.values():
        if layer.is_quantized:
            continue
        out += [(layer, role) for role in VALUE_ROLES if layer.dtype(role) in FLOAT_DTYPES]
    return out


def within_weight_budget(items: list[tuple[Layer, str]], budget: int | None) -> list[tuple[Layer, str]]:
    """All items when their bytes fit `budget`, else an evenly spread subset (first and last included) that does:
    small files are read entirely, big ones stay bounded in time."""
    sizes = [layer.tensors[role].nbytes for layer, role in items]
    total = sum(sizes)
    if budget is None or total <= budget:
        return items
    return spread(items, max(1, int(len(items) * budget / total)))


class NonFiniteWeight(Rule):
    id = "NV206"
    name = "non-finite-weight"
    cause = "non-finite-weight"
    needs_values = True
    summary = "NaN or Inf values in a weight stored as plain floats (a kept layer)"
    explanation = """\
Layers kept at high precision (norms, modulation, embeddings, the head, biases) are stored as plain F32, BF16 or
F16 values with no scale. One NaN or Inf there reaches every activation the layer touches: attention spreads it to
every token, and ComfyUI renders black or NaN frames. The usual origin is a narrowing cast: FP16's largest value
is 65504, so a source value of 1e5 written as FP16 becomes Inf (BF16 keeps F32's range and does not overflow).

The rule reads the values of every plain float tensor up to 1 GiB per file (every kept layer of a converted model;
beyond that an evenly spread sample, `nvdiag lint --all-scales` reads all), one tensor at a time.

Fix: re-convert from the source with `nvdiag convert`: it keeps a layer whose values exceed FP16's range at BF16
and refuses a source that holds NaN or Inf itself. No lossless repair exists: the overflowed values are lost."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer, role in within_weight_budget(plain_tensors(model), ctx.weight_budget):
            yield from self._tensor(layer, role)

    def _tensor(self, layer: Layer, role: str) -> Iterator[Finding]:
        counts = non_finite_counts(layer.load(role))
        if counts is None:
            return
        what = ", ".join(f"{counts[k]} {k}" for k in ("nan", "inf", "-inf") if counts[k])
        yield self.finding(f"{role} ({layer.dtype(role)}) holds {what} of {counts['total']} values", layer.name,
                           {"role": role, "dtype": layer.dtype(role), **counts})
