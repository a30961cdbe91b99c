"""NV106 / NV107: shapes inconsistent with the padding rules or with the architecture, and transposed weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from reference_specs import formats
from reference_specs.findings import Finding
from reference_specs.formats.nvfp4 import BLOCK, block_scale_shape, packed_shape
from reference_specs.layer import Layer
from reference_specs.rules.base import NVFP4, ModelView, Rule, RuleContext, numel


def nvfp4_dims(layer: Layer, ctx: RuleContext) -> tuple[int, int] | None:
    """(out, in) of an NVFP4 layer: the architecture's logical shape when known, else the padded packed shape."""
    expected = ctx.expected_weight_shape(layer)
    if expected is not None and len(expected) == 2:
        return expected[0], expected[1]
    shape = layer.shape("weight")
    if shape is None or len(shape) != 2:
        return None
    return shape[0], shape[1] * 2


def linear_scale_shapes(layer: Layer, ctx: RuleContext) -> set[tuple[int, int]]:
    """Block-scale shapes that only a row-major (unswizzled, unpadded) writer produces: [out, in/16]."""
    dims = nvfp4_dims(layer, ctx)
    shape = layer.shape("weight")
    if dims is None or shape is None or len(shape) != 2:
        return set()
    out = set()
    for out_f, in_f in (dims, (shape[0], shape[1] * 2)):  # the architecture's [out, in] and the packed one
        linear = (out_f, -(-in_f // BLOCK))
        if linear != block_scale_shape(out_f, in_f):
            out.add(linear)
    return out


def _transposed_packed(layer: Layer, expected: tuple[int, ...]) -> bool:
    out_f, in_f = expected
    return out_f != in_f and layer.shape("weight") == packed_shape(in_f, out_f)


def _scalar_roles(layer: Layer) -> Iterator[tuple[str, tuple[int, ...]]]:
    try:
        signature = formats.get(layer.format).signature
    except KeyError:
        return
    for role, spec in signature.items():
        shape = layer.shape(role)
        if spec.scalar and shape is not None and numel(shape) != 1:
            yield role, shape


class WrongShape(Rule):
    id = "NV106"
    name = "wrong-shape"
    cause = "wrong-shape"
    summary = "packed weight, block scale or scalar shapes inconsistent with each other or the architecture"
    explanation = """\
NVFP4 shapes follow fixed padding rules (comfy-kitchen): `.weight` U8 [roundup(out,16), roundup(in,16)/2],
`.weight_scale` [roundup(out,128), roundup(roundup(in,16)/16, 4)] in 128x4 tiles, `.weight_scale_2` and
`.input_scale` one element. ComfyUI takes the layer's logical shape from the model, not from the file, and does not
validate the stored shapes at load: a mismatch shows up as a reshape error inside the dequantizer, a cuBLAS
failure, or silently wrong weights. Shapes are also compared with the detected architecture's expected
[out, in] (this is how a weight for a different model size or variant is caught).

Fix: re-export the layer with `nvdiag convert`; a block-scale tensor of shape [out, in/16] is the row-major layout,
reported by NV204 scale-layout-linear and repaired by `nvdiag fix`."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            if layer.format == NVFP4:
                yield from self._nvfp4(layer, ctx)
            elif layer.has("weight"):
                yield from self._architecture(layer, ctx)
            for role, shape in _scalar_roles(layer):
                yield self.finding(
                    f"{role} has shape {list(shape)}, {layer.format} needs a single-element scalar",
                    layer.name,
                    {"role": role, "expected": [], "found": list(shape)},
                )

    def _nvfp4(self, layer: Layer, ctx: RuleContext) -> Iterator[Finding]:
        shape = layer.shape("weight")
        if shape is None:
            return
        if len(shape) != 2:
            yield self.finding(f"packed weight is {len(shape)}-D {list(shape)}, NVFP4 needs 2-D", layer.name,
                               {"role": "weight", "found": list(shape)})
            return
        expected = ctx.expected_weight_shape(layer)
        if expected is not None and len(expected) == 2 and shape != packed_shape(*expected):
            if not _transposed_packed(layer, expected):  # NV107 reports that one
                yield self.finding(
                    f"packed weight {list(shape)} does not fit the architecture's [out, in] = {list(expected)} "
                    f"(expected {list(packed_shape(*expected))})",
                    layer.name,
                    {"role": "weight", "expected": list(packed_shape(*expected)), "found": list(shape),
                     "logical": list(expected)},
                )
            return
        if shape[0] % 16 or (shape[1] * 2) % 16:
            yield self.finding(
                f"packed weight {list(shape)} is not padded to multiples of 16 (rows) and 8 (bytes per row)",
                layer.name,
                {"role": "weight", "found": list(shape)},
            )
            return
        scale = layer.shape("weight_scale")
        dims = nvfp4_dims(layer, ctx)
        if scale is None or dims is None:
            return
        want = block_scale_shape(*dims)
        if scale != want and scale not in linear_scale_shapes(layer, ctx):  # row-major shapes: NV204
            yield self.finding(
                f"block scale {list(scale)} does not match the packed weight {list(shape)} "
                f"(expected {list(want)})",
                layer.name,
                {"role": "weight_scale", "expected": list(want), "found": list(scale)},
            )

    def _architecture(self, layer: Layer, ctx: RuleContext) -> Iterator[Finding]:
        expected = ctx.expected_weight_shape(layer)
        found = _logical_shape(layer)
        if expected is None or found is None or found == expected:
            return
        if len(expected) == 2 and found == expected[::-1]:
            return  # NV107
        yield self.finding(
            f"weight {list(found)} does not match the architecture's expected {list(expected)}",
            layer.name,
            {"role": "weight", "expected": list(expected), "found": list(found)},
        )


def _logical_shape(layer: Layer) -> tuple[int, ...] | None:
    try:
        shape = formats.get(layer.format).logical_shape(layer)
    except KeyError:
        shape = layer.shape("weight")
    return tuple(shape) if shape is not None else None


class TransposedWeight(Rule):
    id = "NV107"
    name = "transposed-weight"
    cause = "transposed-weight"
    summary = "weight stored [in, out] instead of [out, in]"
    explanation = """\
PyTorch Linear weights are [out, in]; some exporters (JAX, TensorRT, GGML-minded tools) write [in, out]. ComfyUI
takes the logical shape from the model, so a transposed NVFP4 weight is decoded row by row into the wrong places
(noise), and a transposed float weight fails with "size mismatch". Only non-square weights can be caught from the
header, by comparing with the detected architecture's shapes.

Fix: re-export with `nvdiag convert`, which transposes before quantizing (a quantized weight cannot be transposed
in place: its block scales run along the input dimension)."""

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        for layer in model.layers.values():
            expected = ctx.expected_weight_shape(layer)
            if expected is None or len(expected) != 2 or expected[0] == expected[1]:
                continue
            if layer.format == NVFP4:
                transposed = _transposed_packed(layer, expected)
            else:
                transposed = layer.has("weight") and _logical_shape(layer) == expected[::-1]
            if transposed:
                yield self.finding(
                    f"weight is stored [in, out]: {list(layer.shape('weight') or ())} where the architecture "
                    f"has [out, in] = {list(expected)}",
                    layer.name,
                    {"expected": list(expected), "found": list(layer.shape("weight") or ())},
                )
