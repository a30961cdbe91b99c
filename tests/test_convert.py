"""`nvdiag convert` end to end on every target architecture: GGUF -> preset -> convert -> a ComfyUI-native NVFP4
mixed file that comfy-kitchen decodes, lint and roundtrip accept, written atomically and deterministically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch
from safetensors import safe_open

from converter import encode
from converter.from_gguf import preset_from_gguf
from converter.pipeline import convert
from converter.preset import dumps_preset
from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.synthetic import default_selection, float_state_dict, write_float
from reference_specs.findings import Severity
from tests.test_preset import write_gguf_city96

TARGETS = ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "qwen-image-2512", "qwen-image-edit-2511")


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.read_bytes())
    return h.hexdigest()


def source_files(src: Path) -> list[Path]:
    return sorted(src.parent.glob("*.safetensors*")) if src.name.endswith(".json") else [src]


@pytest.fixture(scope="module", params=TARGETS)
def converted(request, tmp_path_factory):
    """A float source (WAN: sharded diffusers names; Qwen: native single file), a preset made from its GGUF Q4_0,
    and the converted file."""
    variant = request.param
    folder = tmp_path_factory.mktemp(variant)
    if variant.startswith("wan"):
        src = write_float(folder / "src", variant, naming="diffusers", sharded=2)
    else:
        src = write_float(folder / "src.safetensors", variant)
    gguf_path = folder / "ref-Q4_0.gguf"
    write_gguf_city96(gguf_path, variant)
    preset_path = folder / "from-gguf.toml"
    preset_path.write_text(dumps_preset(preset_from_gguf(gguf_path)))
    before = digest(source_files(src))
    out = folder / "out.safetensors"
    result = convert(src, out, str(preset_path))
    return variant, src, out, result, before


def test_output_is_written_native_and_detected_as_the_same_model(converted) -> None:
    variant, src, out, result, _ = converted
    assert result.written and not result.refused and out.is_file()
    with open_model(out) as model:
        assert model.detection.variant == variant and model.detection.naming == "native"
        nvfp4 = {layer.native_name for layer in model.layers.values() if layer.format == "nvfp4"}
    assert nvfp4 == set(default_selection(variant))
    assert not list(out.parent.glob("*.nvdiag-tmp"))


def test_markers_tensor_and_metadata_agree(converted) -> None:
    _, _, out, _, _ = converted
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        marked = {}
        for key in f.keys():
            if key.endswith(".comfy_quant"):
                marked[key[: -len(".comfy_quant")]] = json.loads(f.get_tensor(key).numpy().tobytes())
    quant = json.loads(meta["_quantization_metadata"])
    assert quant["format_version"] == "1.0"
    assert quant["layers"] == marked and all(c == {"format": "nvfp4"} for c in marked.values())
    provenance = json.loads(meta["nvdiag"])
    assert provenance["preset"] == "ref-Q4_0-gguf" and len(provenance["preset_sha256"]) == 64
    assert "time" not in json.dumps(provenance).lower().replace("timestep", "")


def test_nvfp4_layers_are_bit_identical_to_comfy_kitchen(converted) -> None:
    variant, _, out, _, _ = converted
    source = float_state_dict(variant)  # native names, the same values the source files hold
    with safe_open(str(out), "pt") as f:
        for name in default_selection(variant):
            w = source[f"{name}.weight"].to(torch.float32)
            s2 = f.get_tensor(f"{name}.weight_scale_2")
            assert s2.dtype == torch.float32 and s2.shape == ()
            assert torch.equal(s2, (w.abs().amax() / 2688.0).reshape(()))
            q, scales = ck.quantize_nvfp4(w, s2, pad_16x=True)
            assert torch.equal(f.get_tensor(f"{name}.weight"), q), name
            stored = f.get_tensor(f"{name}.weight_scale")
            assert stored.dtype == torch.float8_e4m3fn
            assert torch.equal(stored.view(torch.uint8), scales.view(torch.uint8)), name
            decoded = ck.dequantize_nvfp4(q, s2, scales, torch.float32)[: w.shape[0], : w.shape[1]]
            rel = (decoded - w).norm() / w.norm()
            assert rel < 0.15, (name, float(rel))


def test_f32_layers_stay_f32_and_sixteen_bit_layers_follow_the_gguf(converted) -> None:
    variant, _, out, result, _ = converted
    decided = {lp.name: lp.action for lp in result.plan.layers}
    with safe_open(str(out), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for name, action in decided.items():
        if action == "f32":
            assert all(d == "F32" for k, d in dtypes.items() if k.rsplit(".", 1)[0] == name or k == name), name
        if action == "fp16":
            assert dtypes[f"{name}.weight"] == "F16"
            # the GGUF holds every 1-D tensor at F32 (city96), biases of 16-bit weights included: per tensor
            assert dtypes.get(f"{name}.bias", "F32") == "F32", name
    assert "f32" in decided.values() and "fp16" in decided.values()


def test_lint_and_roundtrip_are_clean(converted) -> None:
    _, _, out, result, _ = converted
    assert result.gate.lint_ran and not result.gate.failed
    assert result.gate.layer_errors and all(e["rel_error"] < 0.15 for e in result.gate.layer_errors.values())
    with open_model(out) as model:
        errors = [f for f in lint_model(model) if f.severity >= Severity.ERROR]
    assert errors == []


def test_input_is_never_modified(converted) -> None:
    _, src, _, _, before = converted
    assert digest(source_files(src)) == before


# ------------------------------------------------------------------------------------------------ single cases

@pytest.fixture(scope="module")
def wan_src(tmp_path_factory) -> Path:
    return write_float(tmp_path_factory.mktemp("wan") / "src", "wan2.2-ti2v-5b", naming="diffusers", sharded=2)


# Two conversions giving the same bytes: tests/test_determinism.py (two processes, other hash seeds, relative paths).


def _swapped_nibbles(weight: torch.Tensor, device: str = "cpu", amax: float | None = None) -> dict[str, torch.Tensor]:
    out = encode.encode_nvfp4(weight, device, amax)
    w = out["weight"]
    out["weight"] = (w << 4) | (w >> 4)
    return out


def test_gate_refuses_a_broken_encoder_and_leaves_no_file(wan_src, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(encode.ENCODERS, "nvfp4", _swapped_nibbles)
    out = tmp_path / "broken.safetensors"
    result = convert(wan_src, out, "wan2.2-ti2v-5b")
    assert result.refused and not result.written and not out.exists()
    assert {f.cause for f in result.gate.findings} >= {"excess-error"}
    assert list(tmp_path.iterdir()) == []
    assert main(["convert", str(wan_src), str(out), "--preset", "wan2.2-ti2v-5b", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["errors"] > 0 and doc["convert"]["written"] is False
    assert not out.exists()


def test_gate_refusal_keeps_an_existing_output(wan_src, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    monkeypatch.setitem(encode.ENCODERS, "nvfp4", _swapped_nibbles)
    assert convert(wan_src, out, "smart", force=True).refused
    assert out.read_bytes() == b"previous"


def test_non_finite_source_is_refused_naming_the_layers(tmp_path, capsys) -> None:
    tensors = float_state_dict("wan2.2-ti2v-5b")
    tensors["blocks.0.ffn.0.weight"][3, 5] = float("nan")
    tensors["head.head.weight"][0, 0] = float("inf")
    from safetensors.torch import save_file

    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", "smart"]) == 1
    text = capsys.readouterr().out
    assert "blocks.0.ffn.0" in text and "head.head" in text and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["nan.safetensors"]


def test_json_says_where_the_seconds_went(wan_src, tmp_path, capsys) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(wan_src), str(out), "--preset", "smart", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)["convert"]
    phases = [report["timings"][phase] for phase in ("plan", "stream", "gate", "commit")]
    assert all(seconds >= 0 for seconds in phases)
    assert sum(phases) <= report["seconds"] + 0.01  # phases follow each other inside the command's seconds


def test_dry_run_prints_the_plan_and_writes_nothing(wan_src, tmp_path, capsys) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(wan_src), str(out), "--preset", "smart", "--dry-run", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not out.exists()
    rows = {r["layer"]: r for r in doc["plan"]}
    assert rows["blocks.0.self_attn.q"]["decision"] == "nvfp4"  # diffusers attn1.to_q, renamed
    assert doc["convert"]["output_bytes"] < doc["convert"]["source_bytes"]
    assert main(["convert", str(wan_src), str(out), "--preset", "smart", "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out


def test_output_path_rules(wan_src, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"x")
    assert main(["convert", str(wan_src), str(out), "--preset", "smart"]) == 2  # exists, no --force
    shard = sorted(wan_src.parent.glob("*.safetensors"))[0]
    assert main(["convert", str(wan_src), str(shard), "--preset", "smart", "--force"]) == 2
    link = tmp_path / "link.safetensors"
    link.symlink_to(shard)
    assert main(["convert", str(wan_src), str(link), "--preset", "smart", "--force"]) == 2
    assert main(["convert", str(wan_src), str(tmp_path / "no" / "o.safetensors"), "--preset", "smart"]) == 2
    assert main(["convert", str(wan_src), str(out), "--preset", "nope"]) == 2
    assert main(["convert", str(wan_src), str(out), "--preset", "smart", "--dtype-16", "fp8"]) == 2
    assert main(["convert", str(tmp_path / "missing"), str(out), "--preset", "smart"]) == 2


def test_input_scales_are_validated_and_written(wan_src, tmp_path) -> None:
    scales = tmp_path / "scales.json"
    scales.write_text(json.dumps({"blocks.0.self_attn.q": 0.05, "blocks.1.attn1.to_k.input_scale": 0.25}))
    out = tmp_path / "out.safetensors"
    result = convert(wan_src, out, "wan2.2-ti2v-5b", input_scales=scales)
    assert result.written
    with safe_open(str(out), "pt") as f:
        assert float(f.get_tensor("blocks.0.self_attn.q.input_scale")) == pytest.approx(0.05)
        assert float(f.get_tensor("blocks.1.self_attn.k.input_scale")) == 0.25
        assert "blocks.0.self_attn.k.input_scale" not in f.keys()
    for bad in ({"blocks.0.self_attn.q": -1.0}, {"blocks.0.self_attn.q": float("nan")},
                {"blocks.0.self_attn.q": 5e6}, {"no.such.layer": 0.1}, {"blocks.0.self_attn.q": "x"}):
        scales.write_text(json.dumps(bad))
        assert main(["convert", str(wan_src), str(tmp_path / "o2.safetensors"), "--preset", "smart",
                     "--input-scales", str(scales)]) == 2


def test_fp8_rules_and_dtype_16(wan_src, tmp_path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text('default = "bf16"\n[[rules]]\nmatch = "*"\nndim = 1\nformat = "f32"\n'
                      '[[rules]]\nmatch = "blocks.*.ffn.*"\nformat = "fp8"\n'
                      '[[rules]]\nregex = "^blocks\\\\.\\\\d+\\\\.(self|cross)_attn\\\\."\nformat = "nvfp4"\n')
    out = tmp_path / "out.safetensors"
    result = convert(wan_src, out, preset, dtype_16="fp16")
    assert result.written, [f.message for f in result.gate.findings]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.get_tensor("blocks.0.ffn.2.comfy_quant").numpy().tobytes()) == {"format": "float8_e4m3fn"}
        assert f.get_slice("blocks.0.ffn.2.weight").get_dtype() == "F8_E4M3"
        assert f.get_tensor("blocks.0.ffn.2.weight_scale").shape == ()
        assert f.get_slice("head.head.weight").get_dtype() == "F16"  # bf16 default, rewritten by --dtype-16
        assert f.get_slice("blocks.0.norm3.weight").get_dtype() == "F32"
