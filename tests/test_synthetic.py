"""The synthetic checkpoint factory: deterministic, realistic, every writer produces what ComfyUI expects, and every
fault changes exactly what it says. comfy-kitchen is the independent oracle for the NVFP4 bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch
from safetensors import safe_open

from inspect_tools import synthetic
from inspect_tools.synthetic import FAULTS, default_selection, float_state_dict, nvfp4_mixed_plan
from reference_specs import formats, models
from reference_specs.formats.nvfp4 import block_scale_shape, packed_shape, unswizzle

WAN = "wan2.2-ti2v-5b"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_float_state_dict_is_deterministic_by_seed() -> None:
    a, b, c = float_state_dict(WAN), float_state_dict(WAN), float_state_dict(WAN, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.ffn.0.weight"], c["blocks.0.ffn.0.weight"])


def test_written_files_are_byte_identical_across_runs(tmp_path: Path) -> None:
    one = synthetic.write_nvfp4_mixed(tmp_path / "a.safetensors", WAN, markers="both")
    two = synthetic.write_nvfp4_mixed(tmp_path / "b.safetensors", WAN, markers="both")
    assert sha(one) == sha(two)
    g1 = synthetic.write_gguf(tmp_path / "a.gguf", WAN, "Q5_K_M")
    g2 = synthetic.write_gguf(tmp_path / "b.gguf", WAN, "Q5_K_M")
    assert sha(g1) == sha(g2)


def test_weights_have_realistic_structure() -> None:
    sd = float_state_dict(WAN)
    w = sd["blocks.0.self_attn.q.weight"]
    columns = w.abs().amax(dim=0)
    assert columns.max() / columns.median() > 8  # a few outlier input columns
    assert sd["blocks.0.self_attn.q.bias"].abs().max() < 0.1
    assert (sd["blocks.0.norm3.weight"] - 1).abs().max() < 0.5
    assert sd["blocks.0.modulation"].shape == (1, 6, 256) and sd["head.modulation"].shape == (1, 2, 256)
    assert sd["patch_embedding.weight"].shape == (256, 48, 1, 2, 2)


def test_diffusers_naming_holds_the_same_values() -> None:
    native, diffusers = float_state_dict(WAN), float_state_dict(WAN, naming="diffusers")
    profile = models.get_profile(WAN)
    assert set(diffusers) == {profile.to_diffusers(k) for k in native}
    assert torch.equal(diffusers["blocks.1.attn2.to_out.0.weight"], native["blocks.1.cross_attn.o.weight"])


def test_default_selection_is_block_linears_minus_sensitive() -> None:
    wan = default_selection(WAN)
    assert "blocks.0.self_attn.q" in wan and "blocks.1.ffn.2" in wan and len(wan) == 20
    assert not {"head.head", "time_projection.1", "text_embedding.0"} & set(wan)
    qwen = default_selection("qwen-image-2512")
    assert "transformer_blocks.0.attn.to_q" in qwen and "transformer_blocks.0.img_mod.1" not in qwen
    flux = default_selection("flux1-dev")
    assert "single_blocks.1.linear2" in flux and "img_in" not in flux and "double_blocks.0.img_mod.lin" not in flux


def test_sharded_diffusers_layout(wan_float_sharded_diffusers: Path) -> None:
    index = json.loads(wan_float_sharded_diffusers.read_text())
    folder = wan_float_sharded_diffusers.parent
    assert wan_float_sharded_diffusers.name == "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors"]
    keys, shapes = {}, {}
    for shard in shards:
        tensors, _ = read(folder / shard)
        keys.update(dict.fromkeys(tensors, shard))
        shapes.update({k: tuple(v.shape) for k, v in tensors.items()})
    assert keys == index["weight_map"]
    assert "blocks.0.attn1.to_q.weight" in keys and "condition_embedder.time_proj.weight" in keys
    assert models.detect(shapes).naming == "diffusers"


@pytest.mark.parametrize("variant", synthetic.VARIANTS)
def test_nvfp4_fixture_decodes_identically_in_comfy_kitchen(variant: str, make_checkpoint) -> None:
    tensors, meta = read(make_checkpoint("nvfp4-mixed", variant))
    source = float_state_dict(variant)
    codec = formats.get("nvfp4")()
    selection = default_selection(variant)
    # every layer of the WAN fixture; a sample of the others (each layer costs a full comfy-kitchen decode)
    for base in selection if variant == WAN else selection[:: max(1, len(selection) // 4)]:
        stored = {r: tensors[f"{base}.{r}"] for r in ("weight", "weight_scale", "weight_scale_2")}
        shape = tuple(source[base + ".weight"].shape)
        assert stored["weight"].dtype == torch.uint8 and stored["weight"].shape == packed_shape(*shape)
        assert stored["weight_scale"].dtype == torch.float8_e4m3fn
        assert stored["weight_scale"].shape == block_scale_shape(*shape)
        assert stored["weight_scale_2"].dtype == torch.float32 and stored["weight_scale_2"].dim() == 0
        ours = codec.dequantize(stored, shape)
        theirs = ck.dequantize_nvfp4(stored["weight"], stored["weight_scale_2"], stored["weight_scale"],
                                     torch.float32)[: shape[0], : shape[1]]
        assert torch.equal(ours, theirs), base
        ref = source[base + ".weight"]
        assert (ours - ref).norm() / ref.norm() < 0.15
        assert json.loads(bytes(tensors[base + ".comfy_quant"].tolist())) == {"format": "nvfp4"}
    assert "_quantization_metadata" not in meta  # markers="tensor" by default


def test_nvfp4_fixture_matches_comfy_kitchen_quantizer(wan_nvfp4_mixed: Path) -> None:
    tensors, _ = read(wan_nvfp4_mixed)
    weight = float_state_dict(WAN)["blocks.0.ffn.2.weight"]
    qdata, block = ck.quantize_nvfp4(weight, tensors["blocks.0.ffn.2.weight_scale_2"], pad_16x=True)
    assert torch.equal(qdata, tensors["blocks.0.ffn.2.weight"])
    assert torch.equal(block.view(torch.uint8), tensors["blocks.0.ffn.2.weight_scale"].view(torch.uint8))


def test_kept_layers_stay_at_source_precision(tmp_path: Path) -> None:
    tensors, _ = read(synthetic.write_nvfp4_mixed(tmp_path / "m.safetensors", WAN, dtype=torch.bfloat16))
    assert tensors["head.head.weight"].dtype == torch.bfloat16
    assert tensors["blocks.0.self_attn.q.bias"].dtype == torch.bfloat16
    assert tensors["patch_embedding.weight"].dim() == 5


def test_markers_metadata_prefix_and_naming(tmp_path: Path) -> None:
    path = synthetic.write_nvfp4_mixed(tmp_path / "m.safetensors", WAN, markers="metadata",
                                       prefix="model.diffusion_model.")
    tensors, meta = read(path)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert "model.diffusion_model.blocks.0.self_attn.q" in layers
    assert not any(k.endswith(".comfy_quant") for k in tensors)
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    found = models.detect({k: tuple(v.shape) for k, v in tensors.items()})
    assert (found.variant, found.prefix) == (WAN, "model.diffusion_model.")


@pytest.mark.parametrize("variant", synthetic.VARIANTS)
@pytest.mark.parametrize("naming", ["native", "diffusers"])
def test_written_nvfp4_files_are_detected(variant: str, naming: str, make_checkpoint) -> None:
    tensors, _ = read(make_checkpoint("nvfp4-mixed", variant, naming=naming, markers="both"))
    found = models.detect({k: tuple(v.shape) for k, v in tensors.items()})
    assert found.variant == variant and found.scaled_down
    is_wan = variant.startswith("wan")
    assert found.naming == ("diffusers" if naming == "diffusers" and is_wan else "native")


def test_input_scale_options(tmp_path: Path) -> None:
    plan = nvfp4_mixed_plan(WAN, input_scale={"blocks.0.ffn.0": 0.02})
    assert float(plan.tensors["blocks.0.ffn.0.input_scale"]) == pytest.approx(0.02)
    assert "blocks.0.ffn.2.input_scale" not in plan.tensors
    derived = nvfp4_mixed_plan(WAN, input_scale="weight-derived")
    assert torch.equal(derived.tensors["blocks.1.self_attn.v.input_scale"],
                       derived.tensors["blocks.1.self_attn.v.weight_scale_2"])


def _fault(name: str, **options):
    good = nvfp4_mixed_plan(WAN, **options)
    bad = nvfp4_mixed_plan(WAN, faults=[name], **options)
    return good, bad, *good.finish(), *bad.finish()


def test_every_fault_is_documented_in_one_line() -> None:
    assert len(FAULTS) == 14
    assert all(f.doc and "\n" not in f.doc for f in FAULTS.values())
    with pytest.raises(ValueError, match="unknown fault"):
        nvfp4_mixed_plan(WAN, faults=["no-such-fault"])


def test_layout_and_value_faults() -> None:
    q = "blocks.0.self_attn.q"
    good, bad, gt, _, bt, _ = _fault("scale-layout-linear")
    assert torch.equal(bt[q + ".weight_scale"].view(torch.uint8), unswizzle(gt[q + ".weight_scale"]).view(torch.uint8))
    _, _, gt, _, bt, _ = _fault("nibble-order")
    assert torch.equal(bt[q + ".weight"], (gt[q + ".weight"] << 4) | (gt[q + ".weight"] >> 4))
    _, _, gt, _, bt, _ = _fault("scale2-reciprocal")
    s = gt[q + ".weight_scale_2"]
    assert torch.allclose(bt[q + ".weight_scale_2"], 1 / s)  # = 2688 / amax
    _, _, gt, _, bt, _ = _fault("wrong-dtype")
    assert bt[q + ".weight_scale_2"].dtype == torch.float16 and bt[q + ".weight_scale"].dtype == torch.bfloat16
    _, _, _, _, bt, _ = _fault("non-finite-scale")
    assert torch.isnan(bt[q + ".weight_scale"].to(torch.float32)).sum() == 1


def test_missing_and_stale_scale_faults() -> None:
    q, k = "blocks.0.self_attn.q", "blocks.0.self_attn.k"
    _, _, _, _, bt, _ = _fault("missing-block-scale")
    assert q + ".weight" in bt and q + ".weight_scale" not in bt
    _, _, _, _, bt, _ = _fault("missing-tensor-scale")
    assert q + ".weight_scale_2" not in bt
    _, _, gt, _, bt, _ = _fault("stale-scale")
    assert torch.equal(bt[q + ".weight_scale_2"], gt[k + ".weight_scale_2"])
    assert torch.equal(bt[q + ".weight"], gt[q + ".weight"])
    _, _, gt, _, bt, _ = _fault("weight-derived-input-scale")
    assert torch.equal(bt[q + ".input_scale"], gt[q + ".weight_scale_2"])


def test_transposed_weight_fault_quantizes_w_transposed() -> None:
    good, bad, *_ = _fault("transposed-weight")
    codec = formats.get("nvfp4")()
    q = "blocks.0.self_attn.q"
    expected = codec.quantize(good.source[q + ".weight"].T.contiguous())
    assert torch.equal(bad.tensors[q + ".weight"], expected["weight"])
    assert torch.equal(bad.tensors["blocks.0.ffn.0.weight"], good.tensors["blocks.0.ffn.0.weight"])  # not square


def test_marker_and_naming_faults() -> None:
    _, _, _, _, bt, bm = _fault("missing-quant-marker", markers="both")
    assert not any(k.endswith(".comfy_quant") for k in bt) and "_quantization_metadata" not in bm
    _, _, _, _, bt, bm = _fault("metadata-prefix")
    assert not any(k.endswith(".comfy_quant") for k in bt)
    assert all(n.startswith("transformer.") for n in json.loads(bm["_quantization_metadata"])["layers"])
    _, _, _, _, bt, _ = _fault("diffusers-key-names")
    assert "blocks.0.attn1.to_q.weight_scale" in bt and "blocks.0.attn1.to_q.comfy_quant" in bt


def test_sensitive_layer_fault_quantizes_head_and_a_modulation_linear() -> None:
    _, bad, *_ = _fault("sensitive-layer-quantized")
    assert {"head.head", "time_projection.1"} <= set(bad.quantized)
    flux = nvfp4_mixed_plan("flux1-dev", faults=["sensitive-layer-quantized"])
    assert {"final_layer.linear", "double_blocks.0.img_mod.lin"} <= set(flux.quantized)


def test_faults_can_target_chosen_layers() -> None:
    plan = nvfp4_mixed_plan(WAN, faults=["missing-block-scale"], fault_layers=["blocks.1.ffn.0"])
    assert "blocks.1.ffn.0.weight_scale" not in plan.tensors and "blocks.0.ffn.0.weight_scale" in plan.tensors


def test_fp8_comfy_fixture(wan_fp8_comfy: Path) -> None:
    tensors, _ = read(wan_fp8_comfy)
    base = "blocks.0.ffn.0"
    assert tensors[base + ".weight"].dtype == torch.float8_e4m3fn
    assert tensors[base + ".weight_scale"].dim() == 0
    assert json.loads(bytes(tensors[base + ".comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    ref = float_state_dict(WAN)[base + ".weight"]
    decoded = tensors[base + ".weight"].to(torch.float32) * tensors[base + ".weight_scale"]
    assert (decoded - ref).norm() / ref.norm() < 0.06
    assert tensors["head.head.weight"].dtype == torch.float32


def test_legacy_scaled_fp8_fixture(wan_scaled_fp8: Path, tmp_path: Path) -> None:
    tensors, meta = read(wan_scaled_fp8)
    assert tensors["scaled_fp8"].numel() == 0 and tensors["scaled_fp8"].dtype == torch.float8_e4m3fn
    assert tensors["blocks.0.self_attn.q.weight"].dtype == torch.float8_e4m3fn
    assert tensors["blocks.0.self_attn.q.scale_weight"].dim() == 0
    assert not any(k.endswith(".comfy_quant") for k in tensors) and "_quantization_metadata" not in meta
    full = read(synthetic.write_scaled_fp8_legacy(tmp_path / "f.safetensors", WAN, full_precision_matrix_mult=True))
    assert full[0]["scaled_fp8"].numel() == 2


def test_header_only_full_size_file(tmp_path: Path) -> None:
    path = synthetic.write_header_only(tmp_path / "wan14b.safetensors", "wan2.2-t2v-a14b")
    assert path.stat().st_size > 8e9
    assert path.stat().st_blocks * 512 < 50e6  # a sparse hole, not 8 GB on disk
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        marker = f.get_tensor("blocks.39.ffn.2.comfy_quant")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert json.loads(bytes(marker.tolist())) == {"format": "nvfp4"}
    assert shapes["blocks.0.self_attn.q.weight"] == (5120, 2560)
    found = models.detect(shapes)
    assert (found.variant, found.scaled_down) == ("wan2.2-t2v-a14b", False)
    bf16 = synthetic.write_header_only(tmp_path / "q.safetensors", "qwen-image-2512", kind="bf16")
    assert bf16.stat().st_size > 40e9


@pytest.mark.parametrize(
    "fixture, variant, naming, quantized_format",
    [
        ("wan_nvfp4_mixed", WAN, "native", "nvfp4"),
        ("wan_fp8_comfy", WAN, "native", "float8_e4m3fn"),
        ("wan_scaled_fp8", WAN, "native", "scaled_fp8"),
        ("wan_float_sharded_diffusers", WAN, "diffusers", None),
        ("qwen_nvfp4_mixed", "qwen-image-2512", "native", "nvfp4"),
        ("flux_nvfp4_mixed", "flux1-dev", "native", "nvfp4"),
    ],
)
def test_fixtures_open_as_layers_of_the_expected_format(
    fixture: str, variant: str, naming: str, quantized_format: str | None, request: pytest.FixtureRequest
) -> None:
    from inspect_tools.layers import open_model

    with open_model(request.getfixturevalue(fixture)) as model:
        assert (model.detection.variant, model.detection.naming) == (variant, naming)
        counts = model.format_counts()
    if quantized_format is None:
        assert set(counts) == {"f32"}
    else:
        assert counts[quantized_format] == len(default_selection(variant))
        assert set(counts) == {quantized_format, "f32"}


def test_gguf_fixture_opens_with_city96_types(wan_gguf_q4_0: Path) -> None:
    from inspect_tools.layers import open_model

    with open_model(wan_gguf_q4_0) as model:
        assert model.detection.variant == WAN
        assert model.format_counts() == {"F16": 6, "F32": 14, "Q4_0": 18, "Q4_1": 2}


def test_every_architecture_has_fixture_dims_that_keep_its_head_size() -> None:
    # the scaled-down dims live with the factory (not in reference_specs): one entry per profile, the same dims
    # named as the published model's, narrower or shallower but with the real head_dim (128)
    assert set(synthetic.SMALL_DIMS) == {p.variant for p in models.PROFILES}
    for profile in models.PROFILES:
        small = synthetic.small_dims(profile.variant)
        assert set(small) == set(profile.full_dims), profile.variant
        assert small["dim"] // small["heads"] == profile.full_dims["dim"] // profile.full_dims["heads"] == 128
