"""align_layers: the same module is found across naming schemes, prefixes and containers."""

from __future__ import annotations

from inspect_tools.align import align_layers, strip_known_prefix
from inspect_tools.layers import open_model


def test_native_file_pairs_with_diffusers_named_shards(wan_nvfp4_mixed, wan_float_sharded_diffusers):
    with open_model(wan_nvfp4_mixed) as mine, open_model(wan_float_sharded_diffusers) as ref:
        alignment = align_layers(mine, ref)
        by_name = {p.mine.name: p.ref.name for p in alignment.pairs}
    assert by_name["blocks.0.self_attn.q"] == "blocks.0.attn1.to_q"
    assert by_name["blocks.1.ffn.0"] == "blocks.1.ffn.net.0.proj"
    assert not alignment.only_mine and not alignment.only_ref


def test_prefixed_reference_pairs_with_bare_names(make_checkpoint, wan_float):
    prefixed = make_checkpoint("float", prefix="model.diffusion_model.")
    with open_model(wan_float) as mine, open_model(prefixed) as ref:
        alignment = align_layers(mine, ref)
    assert len(alignment.pairs) == len(mine.layers)
    assert all(p.ref.name == "model.diffusion_model." + p.mine.name for p in alignment.pairs)


def test_gguf_layers_pair_with_safetensors_layers(wan_nvfp4_mixed, wan_gguf_q4_0):
    with open_model(wan_nvfp4_mixed) as mine, open_model(wan_gguf_q4_0) as ref:
        alignment = align_layers(mine, ref)
    quantized = {p.mine.name for p in alignment.pairs if p.mine.is_quantized}
    assert quantized == {n for n, layer in mine.layers.items() if layer.is_quantized}


def test_unmatched_layers_are_listed_on_both_sides(make_checkpoint, wan_float):
    other = make_checkpoint("float", "qwen-image-2512")
    with open_model(wan_float) as mine, open_model(other) as ref:
        alignment = align_layers(mine, ref)
    assert len(alignment.only_mine) + len(alignment.pairs) == len(mine.layers)
    assert len(alignment.only_ref) + len(alignment.pairs) == len(ref.layers)
    assert alignment.to_json()["pairs"] == len(alignment.pairs)


def test_strip_known_prefix():
    assert strip_known_prefix("model.diffusion_model.blocks.0.ffn.0") == "blocks.0.ffn.0"
    assert strip_known_prefix("blocks.0.ffn.0") == "blocks.0.ffn.0"
