"""The building blocks of `nvdiag diff` on hand-made Layers: no files involved."""

from __future__ import annotations

import math

import torch

from inspect_tools.diff.checks import FindingCollector
from inspect_tools.diff.facts import difference, precision_class, storage_text, tensor_signature
from inspect_tools.diff.scale_stats import ScaleStats
from inspect_tools.diff.summaries import role_counts, signatures
from inspect_tools.readers.base import TensorInfo
from reference_specs.findings import Severity
from reference_specs.layer import Layer


def info(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name=name, dtype=dtype, shape=shape, nbytes=0, file=None, offset=0)  # type: ignore[arg-type]


def nvfp4_layer(name: str = "blocks.0.ffn.0", input_scale: tuple[int, ...] | None = None, marker: bool = True) -> Layer:
    layer = Layer(name=name, format="nvfp4")
    layer.tensors = {
        "weight": info(f"{name}.weight", "U8", (64, 32)),
        "weight_scale": info(f"{name}.weight_scale", "F8_E4M3", (128, 4)),
        "weight_scale_2": info(f"{name}.weight_scale_2", "F32", ()),
        "bias": info(f"{name}.bias", "F32", (64,)),
    }
    if input_scale is not None:
        layer.tensors["input_scale"] = info(f"{name}.input_scale", "F32", input_scale)
    if marker:
        layer.tensors["comfy_quant"] = info(f"{name}.comfy_quant", "U8", (19,))
        layer.marker, layer.marker_source = {"format": "nvfp4"}, "tensor"
    return layer


def test_signature_names_every_aux_tensor_in_a_fixed_order_without_bias():
    assert tensor_signature(nvfp4_layer()) == (
        "weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar + comfy_quant"
    )
    assert tensor_signature(nvfp4_layer(input_scale=(1,), marker=False)) == (
        "weight U8 + weight_scale F8_E4M3 + weight_scale_2 F32 scalar + input_scale F32 [1]"
    )


def test_signature_mentions_a_marker_that_comes_from_header_metadata():
    layer = nvfp4_layer(marker=False)
    layer.marker, layer.marker_source = {"format": "nvfp4"}, "metadata"
    assert tensor_signature(layer).endswith("+ metadata marker")


def test_signatures_and_counts_per_format():
    layers = [nvfp4_layer(f"blocks.{i}.ffn.0", input_scale=() if i < 2 else None) for i in range(5)]
    sigs = signatures(layers)
    assert sum(sigs["nvfp4"].values()) == 5 and len(sigs["nvfp4"]) == 2
    counts = role_counts(layers)["nvfp4"]
    assert counts["layers"] == 5 and counts["input_scale"] == 2 and counts["comfy_quant"] == 5
    assert counts["marker"] == 5


def test_precision_class_groups_storage_coarsely():
    assert precision_class(nvfp4_layer()) == "quantized"
    norm = Layer(name="blocks.0.norm3", format="f32", tensors={"weight": info("blocks.0.norm3.weight", "F32", (64,))})
    half = Layer(name="head.head", format="bf16", tensors={"weight": info("head.head.weight", "BF16", (64, 64))})
    assert precision_class(norm) == "f32"
    assert precision_class(half) == "16-bit"


def test_scale_stats_keep_exact_scalars_and_binned_block_scales():
    stats = ScaleStats()
    for v in (1e-4, 2e-4, 4e-4):
        stats.add(torch.tensor(v), keep_values=True)
    assert math.isclose(stats.median, 2e-4, rel_tol=1e-6)
    blocks = ScaleStats()
    blocks.add(torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan")]), keep_values=False)
    assert blocks.count == 3 and blocks.zeros == 1 and blocks.non_finite == 1
    assert blocks.min == 1.0 and blocks.max == 3.0
    assert 1.0 <= blocks.median <= 4.0
    assert blocks.to_json()["decades"] == {"1e0": 3}


def test_collector_orders_findings_by_severity_then_rule_then_model_order():
    out = FindingCollector("mine.safetensors")
    out.add("D120", "input-scale-implausible", Severity.INFO, "absent input_scale", "blocks.0.ffn.2")
    for i in (10, 2, 1):
        out.add("D103", "missing-block-scale", Severity.ERROR, "no block scale", f"blocks.{i}.ffn.0")
    found = out.findings()
    assert [f.layer for f in found] == ["blocks.1.ffn.0", "blocks.2.ffn.0", "blocks.10.ffn.0", "blocks.0.ffn.2"]
    assert found[0].file == "mine.safetensors" and found[-1].severity == Severity.INFO


def test_difference_names_what_a_row_of_the_layers_table_differs_in():
    plain = nvfp4_layer()
    with_input_scale = nvfp4_layer(input_scale=())
    assert difference(plain, nvfp4_layer()) == ""
    assert difference(with_input_scale, plain) == "MINE +input_scale"
    assert difference(None, plain) == "only in REF" and difference(plain, None) == "only in MINE"
    half = Layer(name=plain.name, format="bf16", tensors={"weight": info("w", "BF16", (64, 64))})
    assert difference(plain, half) == "format; MINE +bias,comfy_quant,weight_scale,weight_scale_2"
    # NVFP4 packs two values per byte: U8 [64, 32] is a [64, 64] weight
    assert storage_text(plain) == "nvfp4 64x64"
