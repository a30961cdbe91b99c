"""Presets: matching, validation, built-ins checked against the architecture profiles, from-gguf, and the CLI."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from converter.from_gguf import gguf_action, preset_from_gguf
from converter.preset import (
    LayerView,
    builtin_names,
    describe_decision,
    dumps_preset,
    load_builtin,
    load_preset,
    loads_preset,
)
from inspect_tools.cli import main
from inspect_tools.errors import InputError, UsageError
from inspect_tools.synthetic import default_selection, float_state_dict, shapes_for, small_dims, write_float
from reference_specs import models

TARGETS = ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "qwen-image-2512", "qwen-image-edit-2511")


def views_for(variant: str, dims: dict | None = None) -> list[LayerView]:
    profile = models.get_profile(variant)
    shapes = profile.tensor_shapes(dims) if dims else shapes_for(variant)
    views = {}
    for key, shape in shapes.items():
        base, _, role = key.rpartition(".")
        if role not in ("weight", "bias"):
            base, role = key, "value"
        if role == "bias" and base in views:
            continue
        views[base] = LayerView(base, tuple(shape), "F32", role == "weight", profile.sensitive(base))
    return list(views.values())


def test_builtins_are_listed_and_valid() -> None:
    names = builtin_names()
    assert set(TARGETS) | {"smart", "all"} <= set(names)
    for name in names:
        preset = load_builtin(name)
        assert preset.rules and preset.sha256 and preset.source == "builtin"


@pytest.mark.parametrize("variant", TARGETS)
def test_model_preset_matches_city96_selection_on_full_size_shapes(variant: str) -> None:
    """Each per-model preset quantizes exactly what city96's Q4_0 quantizes, on the real model's shapes, and
    every rule matches something in that architecture."""
    profile = models.get_profile(variant)
    preset = load_builtin(variant)
    views = views_for(variant, profile.full_dims)
    chosen = {v.name for v in views if preset.decide(v, profile.full_dims.get("dim")).format == "nvfp4"}
    expected = set(default_selection(variant, profile.full_dims))
    assert chosen == expected
    assert preset.unmatched_rules(views) == []
    for v in views:
        if v.sensitive_reason:
            assert preset.decide(v).format != "nvfp4", v.name


@pytest.mark.parametrize("variant", TARGETS)
def test_smart_quantizes_block_linears_of_scaled_down_models_and_keeps_sensitive_ones(variant: str) -> None:
    preset = load_builtin("smart")
    profile = models.get_profile(variant)
    width = small_dims(profile.variant)["dim"]
    views = views_for(variant)
    decided = {v.name: preset.decide(v, width).format for v in views}
    assert any(f == "nvfp4" for f in decided.values())
    for v in views:
        if v.sensitive_reason or len(v.shape) != 2 or not v.in_blocks:
            assert decided[v.name] == "keep", v.name


def test_smart_threshold_is_1024_on_real_widths() -> None:
    smart = load_builtin("smart")
    assert smart.decide(LayerView("blocks.0.ffn.0", (13824, 5120)), 5120).format == "nvfp4"
    assert smart.decide(LayerView("blocks.0.x", (512, 5120)), 5120).format == "keep"  # below 1024
    assert smart.decide(LayerView("blocks.0.x", (2056, 5120)), 5120).format == "keep"  # not divisible by 16
    assert smart.decide(LayerView("blocks.0.x", (256, 256)), 256).format == "nvfp4"  # scaled-down model


def test_all_quantizes_every_2d_weight_but_not_norms() -> None:
    preset = load_builtin("all")
    assert preset.decide(LayerView("head.head", (192, 256))).format == "nvfp4"
    assert preset.decide(LayerView("blocks.0.norm3", (256,))).format == "keep"
    assert preset.decide(LayerView("blocks.0.modulation", (1, 6, 256), has_weight=False)).format == "keep"


def test_first_match_wins_and_explain_says_why() -> None:
    preset = loads_preset(b"""
default = "f32"
[[rules]]
match = "blocks.*.ffn.*"
format = "fp8"
[[rules]]
regex = '^blocks\\.\\d+\\.'
format = "nvfp4"
min_dim = 64
""", "inline")
    assert preset.decide(LayerView("blocks.3.ffn.2", (128, 128))).format == "fp8"
    assert preset.decide(LayerView("blocks.3.self_attn.q", (128, 128))).format == "nvfp4"
    assert preset.decide(LayerView("blocks.3.self_attn.q", (32, 128))).format == "f32"
    trace = preset.explain(LayerView("blocks.3.self_attn.q", (32, 128)))
    assert "does not match" in trace[0][1] and "not all >= 64" in trace[1][1]


@pytest.mark.parametrize(("text", "message"), [
    (b'[[rules]]\nmatch = "*"\nformat = "nvfp8"\n', "unknown format"),
    (b'[[rules]]\nregex = "("\nformat = "nvfp4"\n', "invalid regex"),
    (b'[[rules]]\nmatch = "*"\nformat = "nvfp4"\nsize = 3\n', "unknown key"),
    (b'default = "nvfp4"\n', "default must be"),
    (b'[[rules]]\nmatch = "*"\nregex = "x"\nformat = "keep"\n', "not both"),
    (b'[[rules]]\nmatch = "*"\nformat = "keep"\nmin_dim = -1\n', "min_dim must be an integer from 1 to 65536"),
    # an absurd width is a typo that would quantize nothing: refused, with the sane range
    (b'[[rules]]\nmatch = "*"\nformat = "nvfp4"\nmin_dim = 1000000000000000\n', "from 1 to 65536, not 1000000000"),
    (b'[[rules]]\nmatch = "*"\nformat = "nvfp4"\nmin_dim = 3072.0\n', "min_dim must be an integer"),
    (b'[[rules]]\nmatch = "*"\nformat = "keep"\nndim = 0\n', "ndim must be an integer from 1 to 8"),
    (b"rules = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more than 32 levels deep"),
    (b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000 + b"\n", "nested more than 32 levels deep"),
    (b"x = 1" + b"0" * 5000 + b"\n", "integer string conversion"),
    (b"[[rules]]\nformat = 'keep'\n" * 10_001, "at most 10000"),
    (b"not toml [", "not a valid TOML"),
])
def test_invalid_presets_are_usage_errors(text: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        loads_preset(text, "bad.toml")


def test_dump_loads_back_equal(tmp_path) -> None:
    for name in builtin_names():
        preset = load_builtin(name)
        again = loads_preset(dumps_preset(preset).encode(), "x")
        assert [(r.format, r.match, r.regex, r.conditions, r.reason) for r in again.rules] == \
               [(r.format, r.match, r.regex, r.conditions, r.reason) for r in preset.rules]
    path = tmp_path / "mine.toml"
    path.write_text(dumps_preset(load_builtin("smart")))
    assert load_preset(str(path)).name == "smart"
    with pytest.raises(UsageError, match="no built-in preset"):
        load_preset("no-such-preset")


# ------------------------------------------------------------------------------------------------ from-gguf

def write_gguf_city96(path, variant: str, qtype: str = "Q4_0") -> None:
    """A small GGUF laid out like city96's files: 1-D/tiny/modulation F32, skip groups F16, block linears 4-bit,
    ffn.2 (FFN down) and v projections at Q6_K when qtype is Q5_K_M-like ('mixed'). 5-D tensors left out."""
    tensors = float_state_dict(variant)
    selection = {name + ".weight" for name in default_selection(variant)}
    writer = gguf.GGUFWriter(str(path), "wan" if variant.startswith("wan") else "qwen_image")
    for name, t in tensors.items():
        if t.ndim > 4 or t.ndim == 5:
            continue
        arr = t.to(torch.float32).numpy()
        if name in selection:
            q = gguf.GGMLQuantizationType.Q4_0
            if qtype == "mixed" and (".ffn.2." in name or name.endswith(".v.weight") or ".to_v." in name):
                q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
        elif t.ndim == 1 or t.numel() <= 1024 or "modulation" in name:
            writer.add_tensor(name, arr)
        else:
            writer.add_tensor(name, arr.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_type_mapping() -> None:
    assert gguf_action("Q4_0", "fp8") == "nvfp4" and gguf_action("Q4_K", "keep") == "nvfp4"
    assert gguf_action("Q6_K", "fp8") == "fp8" and gguf_action("Q8_0", "keep") == "keep"
    assert (gguf_action("F32", "fp8"), gguf_action("F16", "fp8"), gguf_action("BF16", "fp8")) == ("f32", "fp16", "bf16")


def test_from_gguf_reproduces_the_gguf_selection(tmp_path) -> None:
    path = tmp_path / "wan-Q4_0.gguf"
    write_gguf_city96(path, "wan2.2-ti2v-5b")
    preset = preset_from_gguf(path)
    assert preset.architectures == ("wan2.2-ti2v-5b",)
    views = views_for("wan2.2-ti2v-5b")
    chosen = {v.name for v in views if preset.decide(v).format == "nvfp4"}
    assert chosen == set(default_selection("wan2.2-ti2v-5b"))
    by_name = {v.name: preset.decide(v).format for v in views}
    assert by_name["blocks.0.modulation"] == "f32" and by_name["blocks.0.norm3"] == "f32"
    assert by_name["text_embedding.0"] == "fp16"
    assert by_name["patch_embedding"] == "f32"  # only its F32 bias is in the GGUF (city96 leaves 5-D out)
    assert len(preset.rules) < len(views)  # block-generalized rules


def test_from_gguf_higher_bit_layers_follow_the_option(tmp_path) -> None:
    path = tmp_path / "wan-mixed.gguf"
    write_gguf_city96(path, "wan2.2-ti2v-5b", qtype="mixed")
    fp8 = preset_from_gguf(path, higher="fp8")
    keep = preset_from_gguf(path, higher="keep")
    ffn2 = LayerView("blocks.1.ffn.2", (256, 512))
    assert fp8.decide(ffn2).format == "fp8" and keep.decide(ffn2).format == "keep"
    assert fp8.decide(LayerView("blocks.1.ffn.0", (512, 256))).format == "nvfp4"


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_preset_list_show_explain(tmp_path, capsys) -> None:
    assert main(["preset", "list", "--format", "json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)["presets"]}
    assert "smart" in names
    src = write_float(tmp_path / "m.safetensors", "wan2.2-ti2v-5b")
    assert main(["preset", "show", "wan2.2-ti2v-5b", "--on", str(src), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)["preset"]["on"]
    assert doc["counts"]["nvfp4"] == len(default_selection("wan2.2-ti2v-5b")) and doc["warnings"] == []
    assert main(["preset", "explain", "smart", "blocks.0.modulation", "--on", str(src)]) == 0
    assert "keep" in capsys.readouterr().out
    assert main(["preset", "explain", "wan2.2-t2v-a14b", "blocks.0.ffn.2", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "nvfp4" and doc["shape"] == [5120, 13824]
    assert main(["preset", "show", "nope"]) == 2


def test_cli_from_gguf_writes_a_preset_that_loads(tmp_path, capsys) -> None:
    path = tmp_path / "wan.gguf"
    write_gguf_city96(path, "wan2.2-ti2v-5b")
    out = tmp_path / "p.toml"
    assert main(["preset", "from-gguf", str(path), "-o", str(out), "--higher", "keep"]) == 0
    assert load_preset(str(out)).rules
    assert main(["preset", "from-gguf", str(path), "-o", str(out)]) == 2  # exists, no --force
    assert main(["preset", "from-gguf", str(path), "-o", str(out), "--higher", "q8"]) == 2
    assert main(["preset", "from-gguf", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x.toml")]) == 2
    assert not list(tmp_path.glob("*.nvdiag-tmp"))


def test_brackets_inside_strings_and_comments_do_not_count_as_nesting() -> None:
    deep = "[" * 100
    text = (f"# {deep}\nname = 'n{deep}'\ndescription = \"\"\"{deep}\n\\\"\"\" {deep}\"\"\"\n[[rules]]\n"
            f"match = \"*\"\nformat = \"keep\"\nreason = \"{deep}\\\"{deep}\"  # {deep}\n")
    preset = loads_preset(text.encode(), "ok.toml")
    assert preset.name == "n" + deep and preset.rules[0].reason == deep + '"' + deep


def test_a_preset_file_past_the_size_limit_is_refused_unread(tmp_path, monkeypatch) -> None:
    import converter.preset as preset_module

    monkeypatch.setattr(preset_module, "MAX_PRESET_BYTES", 64)
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * 100 + "\n")
    with pytest.raises(InputError, match="larger than"):
        load_preset(str(path))


@pytest.mark.parametrize(("written", "meant"), [("F16", "fp16"), ("float16", "fp16"), ("f16", "fp16"),
                                                ("FP32", "f32"), ("float32", "f32"), ("BF16", "bf16"),
                                                ("NVFP4", "nvfp4")])
def test_precisions_read_in_the_spellings_other_tools_use(written: str, meant: str) -> None:
    """GGUF says F16, safetensors F16, torch float16, the preset fp16: a user may write any of them."""
    default = written if meant != "nvfp4" else "F32"
    text = f'default = "{default}"\n[[rules]]\nmatch = "*"\nformat = "{written}"\nbias = "F32"\n'
    preset = loads_preset(text.encode(), "mine.toml")
    assert preset.rules[0].format == meant and preset.rules[0].bias == "f32"
    assert preset.default == (meant if meant != "nvfp4" else "f32")


def test_output_names_16_bit_as_the_dtype_inspect_prints() -> None:
    assert describe_decision("fp16") == "F16" and describe_decision("f32") == "F32"


def test_dtype_16_takes_f16_too(tmp_path) -> None:
    src = write_float(tmp_path / "src.safetensors", "wan2.2-ti2v-5b")
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--preset", "smart", "--dtype-16", "F16",
                 "--dry-run"]) == 0
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--preset", "smart", "--dtype-16", "f8",
                 "--dry-run"]) == 2
