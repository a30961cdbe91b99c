"""NV305: a weight whose shape ComfyUI reads to build the model is stored quantized with another shape."""

from __future__ import annotations

from collections.abc import Iterable

from reference_specs import formats
from reference_specs.findings import Finding
from reference_specs.formats.nvfp4 import packed_shape
from reference_specs.models.base import changed_reads
from reference_specs.rules.base import NVFP4, ModelView, Rule, RuleContext


class ShapeReadWeightQuantized(Rule):
    id = "NV305"
    name = "shape-read-weight-quantized"
    cause = "wrong-shape"
    summary = "a weight ComfyUI reads the model's dimensions from is quantized into another shape"
    explanation = """\
ComfyUI does not store a model's configuration: it reads it off the shapes of a few weights
(comfy/model_detection.py). Qwen Image: in_channels = img_in.weight.shape[1]. Flux: in_channels and hidden_size
from img_in.weight, context_in_dim from txt_in.weight, vec_in_dim from vector_in.in_layer.weight. WAN: out_dim from
the rows of head.head.weight, ffn_dim from the rows of blocks.0.ffn.0.weight, in_dim from patch_embedding.weight.
NVFP4 stores two values per byte, so a packed weight's dim 1 is half the real one (and rows pad to 16): ComfyUI
builds a model with half the input channels, and the first step fails with "mat1 and mat2 shapes cannot be
multiplied" (or, for WAN's head, a wrong out_dim). FP8 keeps the shape and is not reported.

Fix: convert again with `nvdiag convert`: no preset quantizes these weights into a changed shape, and its gate
refuses a plan that would."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        profile = ctx.profile
        if profile is None:
            return
        for layer in model.layers.values():
            if not formats.is_quantized(layer.format):
                continue
            reads = profile.read_axes(layer.native_name or layer.name)
            stored = layer.shape("weight")
            if not reads or stored is None:
                continue
            logical = ctx.expected_weight_shape(layer) or _logical_shape(layer)
            if logical is None or (layer.format == NVFP4 and len(logical) == 2
                                   and tuple(stored) != packed_shape(*logical)):
                continue  # not the format's own shape for this weight: NV106 / NV107 say what is wrong with it
            broken = changed_reads(reads, tuple(logical), tuple(stored))
            if broken:
                what = ", ".join(f"{name} from dim {axis}" for axis, name in broken.items())
                yield self.finding(
                    f"{layer.format} weight stored as {list(stored)} where the model's is {list(logical)}: "
                    f"ComfyUI reads {what} of it and builds the wrong model",
                    layer.name,
                    {"format": layer.format, "stored": list(stored), "logical": list(logical),
                     "reads": {str(axis): name for axis, name in broken.items()}},
                )


def _logical_shape(layer) -> tuple[int, ...] | None:
    try:
        shape = formats.get(layer.format).logical_shape(layer)
    except KeyError:
        return None
    return tuple(shape) if shape is not None else None
