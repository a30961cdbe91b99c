"""`nvdiag convert` from FP8 sources (issue 16): ComfyUI's comfy_quant float8, the legacy scaled_fp8 files and plain
FP8 casts are dequantized (FP8 value x per-tensor scale, in float32, the way ComfyUI decodes them) and converted from
there; the output says the source was already lossy. NVFP4 sources stay refused.

Expected values come from first principles and comfy-kitchen: the test dequantizes the source itself (fp8 -> float32
times the stored scale) and quantizes that with comfy-kitchen's quantize_nvfp4."""

from __future__ import annotations

import json
from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converter import encode
from converter.pipeline import convert
from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.synthetic import default_selection, float_state_dict, write_nvfp4_mixed
from inspect_tools.synthetic.writers import write_fp8_comfy, write_scaled_fp8_legacy
from reference_specs.findings import Severity

VARIANT = "wan2.2-ti2v-5b"
# NVFP4's relative error on these weights (test_convert.py uses the same bound against float sources)
NVFP4_ERROR = 0.15
# A preset that exercises every path an FP8 layer can take: kept at 16-bit, re-quantized to FP8, quantized to NVFP4.
PRESET = """
name = "fp8-source-test"
default = "keep"
architectures = ["wan2.2-ti2v-5b"]

[[rules]]
match = "blocks.0.self_attn.*"
format = "bf16"

[[rules]]
match = "blocks.0.ffn.*"
linear = true
format = "fp8"

[[rules]]
match = "blocks.*"
linear = true
format = "nvfp4"
"""


def write_plain_fp8(path: Path) -> Path:
    """A Kijai-style *_fp8_e4m3fn file: the block linears cast to FP8 as they are, no scale, no marker (ComfyUI
    loads them as plain weights)."""
    tensors = float_state_dict(VARIANT)
    for name in default_selection(VARIANT):
        tensors[f"{name}.weight"] = tensors[f"{name}.weight"].clamp(-448, 448).to(torch.float8_e4m3fn)
    save_file(tensors, str(path))
    return path


SOURCES = {
    "comfy": lambda p: write_fp8_comfy(p, VARIANT),
    "legacy": lambda p: write_scaled_fp8_legacy(p, VARIANT),
    "plain": write_plain_fp8,
}
SCALE_ROLE = {"comfy": "weight_scale", "legacy": "scale_weight", "plain": None}


def dequantized(src: Path, name: str, scale_role: str | None) -> torch.Tensor:
    """The source layer's weight as ComfyUI decodes it: fp8 -> float32, times its per-tensor scale."""
    with safe_open(str(src), "pt") as f:
        weight = f.get_tensor(f"{name}.weight")
        assert weight.dtype == torch.float8_e4m3fn
        scale = f.get_tensor(f"{name}.{scale_role}") if scale_role else torch.ones(())
    return weight.to(torch.float32) * scale.to(torch.float32)


@pytest.fixture(scope="module", params=sorted(SOURCES))
def converted(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(f"fp8-{kind}")
    src = SOURCES[kind](folder / "src.safetensors")
    preset = folder / "preset.toml"
    preset.write_text(PRESET)
    out = folder / "out.safetensors"
    result = convert(src, out, preset)
    return kind, src, out, result


def test_fp8_source_converts_and_lints_clean(converted) -> None:
    kind, _, out, result = converted
    assert result.written and not result.refused, result.gate.findings if result.gate else result.non_finite
    assert result.gate.lint_ran and not result.gate.failed
    with open_model(out) as model:
        assert [f for f in lint_model(model) if f.severity >= Severity.ERROR] == []
        formats = {layer.native_name: layer.format for layer in model.layers.values()}
    fp8_layers = default_selection(VARIANT)
    assert {formats[n] for n in fp8_layers if n.startswith("blocks.0.self_attn.")} == {"bf16"}
    assert {formats[n] for n in fp8_layers if n.startswith("blocks.0.ffn.")} == {"float8_e4m3fn"}
    assert {formats[n] for n in fp8_layers if not n.startswith("blocks.0.")} == {"nvfp4"}
    # the FP8 source's scales, input scales and markers do not survive beside the new tensors
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in keys)


def test_nvfp4_layers_are_comfy_kitchen_of_the_dequantized_fp8_weight(converted) -> None:
    kind, src, out, _ = converted
    with safe_open(str(out), "pt") as f:
        for name in default_selection(VARIANT):
            if name.startswith("blocks.0."):
                continue
            w = dequantized(src, name, SCALE_ROLE[kind])
            s2 = f.get_tensor(f"{name}.weight_scale_2")
            assert torch.equal(s2, (w.abs().amax() / 2688.0).reshape(())), name
            q, scales = ck.quantize_nvfp4(w, s2, pad_16x=True)
            assert torch.equal(f.get_tensor(f"{name}.weight"), q), name
            assert torch.equal(f.get_tensor(f"{name}.weight_scale").view(torch.uint8), scales.view(torch.uint8)), name
            # roundtrip against the FP8 source: NVFP4's own error, no more
            decoded = ck.dequantize_nvfp4(q, s2, scales, torch.float32)[: w.shape[0], : w.shape[1]]
            assert float((decoded - w).norm() / w.norm()) < NVFP4_ERROR, name


def test_kept_and_fp8_layers_hold_the_dequantized_values(converted) -> None:
    kind, src, out, _ = converted
    with safe_open(str(out), "pt") as f:
        for name in default_selection(VARIANT):
            w = dequantized(src, name, SCALE_ROLE[kind])
            if name.startswith("blocks.0.self_attn."):  # kept at BF16: the dequantized value, rounded once
                assert torch.equal(f.get_tensor(f"{name}.weight"), w.to(torch.bfloat16)), name
            elif name.startswith("blocks.0.ffn."):  # FP8 again: within FP8's error of the FP8 source
                again = f.get_tensor(f"{name}.weight").to(torch.float32) * f.get_tensor(f"{name}.weight_scale")
                assert float((again - w).norm() / w.norm()) < 0.04, name


def test_gate_errors_are_measured_against_the_dequantized_source(converted) -> None:
    _, _, _, result = converted
    errors = result.gate.layer_errors
    assert errors and all(e["rel_error"] <= 1.5 * e["baseline"] + 1e-3 for e in errors.values())
    assert all(e["rel_error"] < NVFP4_ERROR for name, e in errors.items() if not name.startswith("blocks.0."))


def test_output_says_the_source_was_already_lossy(converted, tmp_path, capsys) -> None:
    kind, src, out, result = converted
    expected_format = {"comfy": "float8_e4m3fn", "legacy": "scaled_fp8", "plain": "f8_e4m3"}[kind]
    count = len(default_selection(VARIANT))
    assert result.plan.lossy_source == {expected_format: count}
    with safe_open(str(out), "pt") as f:
        provenance = json.loads(f.metadata()["nvdiag"])
    assert provenance["source_lossy"] == {expected_format: count}
    preset = out.parent / "preset.toml"
    again = tmp_path / "again.safetensors"
    assert main(["convert", str(src), str(again), "--preset", str(preset), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["convert"]["source_lossy"]["layers"] == count
    assert doc["convert"]["source_lossy"]["formats"] == {expected_format: count}
    assert "already lossy" in doc["convert"]["source_lossy"]["message"]
    assert main(["convert", str(src), str(tmp_path / "text.safetensors"), "--preset", str(preset)]) == 0
    text = capsys.readouterr().out
    assert "source already lossy" in text and f"{count} FP8 layers" in text


def test_a_float_source_says_nothing_of_lossy(tmp_path, capsys) -> None:
    src = tmp_path / "float.safetensors"
    save_file(float_state_dict(VARIANT), str(src))
    result = convert(src, tmp_path / "out.safetensors", "smart", dry_run=True)
    assert result.plan.lossy_source == {}


def test_gate_refuses_a_broken_encoder_on_an_fp8_source(tmp_path, monkeypatch) -> None:
    def swapped_nibbles(weight: torch.Tensor, device: str = "cpu",
                        amax: float | None = None) -> dict[str, torch.Tensor]:
        out = encode.encode_nvfp4(weight, device, amax)
        out["weight"] = (out["weight"] << 4) | (out["weight"] >> 4)
        return out

    src = write_fp8_comfy(tmp_path / "src.safetensors", VARIANT)
    monkeypatch.setitem(encode.ENCODERS, "nvfp4", swapped_nibbles)
    out = tmp_path / "out.safetensors"
    result = convert(src, out, "smart")
    assert result.refused and not out.exists()
    assert "excess-error" in {f.cause for f in result.gate.findings}


def test_an_fp8_file_with_a_nan_scale_is_refused_in_one_line(tmp_path, capsys) -> None:
    good = write_fp8_comfy(tmp_path / "good.safetensors", VARIANT)
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    name = default_selection(VARIANT)[3]
    tensors[f"{name}.weight_scale"] = torch.tensor(float("nan"))
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src), metadata=metadata)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", "smart"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "not a finite positive scale" in err
    assert not out.exists()


def test_an_nvfp4_source_is_still_refused(tmp_path, capsys) -> None:
    src = write_nvfp4_mixed(tmp_path / "nvfp4.safetensors", VARIANT)
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--preset", "smart"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already quantized (nvfp4 layers)" in err and "nvdiag fix" in err


def test_large_kept_fp8_tensors_are_streamed_dequantized(tmp_path, monkeypatch) -> None:
    """Kept tensors above STREAM_MIN_BYTES go through one small buffer, chunk by chunk: each chunk is dequantized
    with the layer's scale before it is cast (a 14B model's kept FP8 linears are that large)."""
    from converter import source_stream

    monkeypatch.setattr(source_stream, "STREAM_MIN_BYTES", 1024)
    monkeypatch.setattr(source_stream, "STREAM_CHUNK_BYTES", 4096)  # several chunks per tensor
    src = write_scaled_fp8_legacy(tmp_path / "src.safetensors", VARIANT)
    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    out = tmp_path / "out.safetensors"
    result = convert(src, out, preset)
    assert result.written
    kept = [n for n in default_selection(VARIANT) if n.startswith("blocks.0.self_attn.")]
    assert kept
    with safe_open(str(out), "pt") as f:
        for name in kept:
            w = dequantized(src, name, "scale_weight")
            assert torch.equal(f.get_tensor(f"{name}.weight"), w.to(torch.bfloat16)), name


def test_fp8_input_scales_are_dropped_with_a_warning(tmp_path) -> None:
    """An FP8 layer's static input scale scales activations into FP8's range (amax/448, or a 1.0 placeholder): not
    NVFP4's. Without one ComfyUI computes activation scales dynamically."""
    good = write_scaled_fp8_legacy(tmp_path / "good.safetensors", VARIANT)
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = default_selection(VARIANT)[:2]
    for name in names:
        tensors[f"{name}.scale_input"] = torch.tensor(1.0)
    src = tmp_path / "with_input.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "out.safetensors"
    result = convert(src, out, "smart")
    assert result.written
    assert any("2 FP8 source layers carried static input scales" in w for w in result.plan.warnings)
    with safe_open(str(out), "pt") as f:
        assert not any(k.endswith((".input_scale", ".scale_input")) for k in f.keys())


def test_the_sources_convert_dequantizes_are_the_fp8_formats_with_one_scale_or_none() -> None:
    """The formats say it (Format.convert_source), not a list in the converter: the comfy_quant FP8 pair, legacy
    scaled_fp8 and the plain casts; never NVFP4 (4-bit twice), nor a block-scaled or foreign layout."""
    from reference_specs import formats

    sources = {fmt.slug for fmt in formats._all_formats() if fmt.convert_source}
    assert sources == {"float8_e4m3fn", "float8_e5m2", "scaled_fp8", "f8_e4m3", "f8_e5m2"}
