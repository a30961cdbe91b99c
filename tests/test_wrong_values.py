"""Readable files with wrong values (inspect_tools.synthetic.wrong_values), as a user meets them: every command the
factory names for a case exits as it must, naming the case's cause; then the single behaviours (issue 22) in
detail: a kept layer beyond FP16's range is written at BF16, not as Inf; roundtrip never calls NaN "ok"; legacy
and subnormal scales are findings that fix cannot repair; empty inputs are refused; an all-zero weight converts."""

from __future__ import annotations

import json
from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch
from safetensors import safe_open

from converter import pipeline
from inspect_tools.cli import main
from inspect_tools.synthetic.wrong_values import KEPT_LAYER, QUANTIZED_LAYER, WRONG_VALUES

PRESET = "wan2.2-ti2v-5b"


@pytest.fixture(scope="module")
def good(make_checkpoint) -> tuple[str, str]:
    """(float source, NVFP4 mixed file) of the same tiny WAN model the factory's cases are made from."""
    return str(make_checkpoint("float", name="wrong_values_float")), str(make_checkpoint("nvfp4-mixed",
                                                                                         name="wrong_values_nvfp4"))


def argv(command: str, path: str, good: tuple[str, str], out: Path) -> list[str]:
    source, nvfp4 = good
    return {
        "convert": ["convert", path, str(out), "--preset", PRESET, "--format", "json"],
        "convert_fp16": ["convert", path, str(out), "--preset", PRESET, "--dtype-16", "fp16", "--format", "json"],
        "lint": ["lint", path, "--format", "json"],
        "fix": ["fix", path, str(out), "--format", "json"],
        "roundtrip": ["roundtrip", path, "--against", source, "--format", "json"],
        "roundtrip_against": ["roundtrip", nvfp4, "--against", path, "--format", "json"],
    }[command]


CASES = [(name, command) for name, case in WRONG_VALUES.items() for command in case.commands]


@pytest.mark.parametrize(("name", "command"), CASES)
def test_every_command_answers_every_wrong_value_case(name, command, good, tmp_path, capsys) -> None:
    case = WRONG_VALUES[name]
    path = case.build(tmp_path / name)
    code = main(argv(command, str(path), good, tmp_path / "out.safetensors"))
    captured = capsys.readouterr()
    assert code == case.commands[command], (captured.out[-2000:], captured.err)
    if code == 2:  # refused input: one line naming the file, no JSON, no traceback
        assert captured.err.count("\n") == 1 and str(path) in captured.err and "Traceback" not in captured.err
        return
    doc = json.loads(captured.out)
    causes = {f["cause"] for f in doc["findings"] if f["severity"] == "error"}
    if case.cause is not None:
        assert case.cause in causes
    if code == 0:
        assert not causes


# --- 1. convert: a kept layer beyond FP16's range -------------------------------------------------------------

def test_kept_layer_beyond_fp16_range_is_written_at_bf16_with_a_warning(tmp_path, capsys) -> None:
    src = WRONG_VALUES["fp16-overflow-source"].build(tmp_path / "src")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", PRESET, "--dtype-16", "fp16"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {KEPT_LAYER} kept at BF16 instead of F16" in " ".join(err.split())
    with safe_open(str(out), "pt") as f:
        weight = f.get_tensor(f"{KEPT_LAYER}.weight")
        assert weight.dtype == torch.bfloat16 and torch.isfinite(weight).all()
        assert float(weight[0, 0]) == pytest.approx(1e5, rel=1e-2)
        assert float(weight[1, 0]) == pytest.approx(-7e4, rel=1e-2)
        assert f.get_slice("time_embedding.0.weight").get_dtype() == "F16"  # the others still follow --dtype-16
        provenance = json.loads(f.metadata()["nvdiag"])
    assert set(provenance["kept_bf16"]) == {KEPT_LAYER}
    assert main(["lint", str(out)]) == 0


def test_dry_run_plan_shows_the_bf16_decision(tmp_path, capsys) -> None:
    src = WRONG_VALUES["fp16-overflow-source"].build(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--preset", PRESET, "--dtype-16", "fp16",
                 "--dry-run", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["layer"]: r for r in doc["plan"]}
    assert rows[KEPT_LAYER]["format"] == "bf16" and rows["time_embedding.0"]["format"] == "f16"
    assert any(KEPT_LAYER in w and "BF16" in w for w in doc["convert"]["warnings"])


def test_gate_refuses_an_inf_that_a_narrowing_cast_wrote(tmp_path, monkeypatch, capsys) -> None:
    """Without the BF16 decision the cast writes Inf (what convert did before): the gate's NV206 refuses it."""
    monkeypatch.setattr(pipeline, "keep_overflowing_at_bf16", lambda plan, reader: None)
    src = WRONG_VALUES["fp16-overflow-source"].build(tmp_path / "src")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", PRESET, "--dtype-16", "fp16", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    found = [f for f in doc["findings"] if f["rule"] == "NV206"]
    assert [f["layer"] for f in found] == [KEPT_LAYER]
    assert found[0]["evidence"]["inf"] == 10 and found[0]["evidence"]["-inf"] == 10
    assert not out.exists()


def test_lint_names_the_non_finite_kept_weight(tmp_path, capsys) -> None:
    path = WRONG_VALUES["inf-in-kept-weight"].build(tmp_path / "f")
    assert main(["lint", str(path), "--format", "json"]) == 1
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert (finding["rule"], finding["cause"], finding["layer"]) == ("NV206", "non-finite-weight", KEPT_LAYER)
    assert finding["evidence"]["role"] == "weight" and finding["evidence"]["dtype"] == "F16"
    assert main(["lint", "--explain", "NV206"]) == 0
    assert "BF16" in capsys.readouterr().out


# --- 2. roundtrip: NaN on either side is never "ok" --------------------------------------------------------------

def test_roundtrip_against_a_nan_reference_names_the_reference(good, tmp_path, capsys) -> None:
    ref = WRONG_VALUES["nan-reference"].build(tmp_path / "ref")
    assert main(["roundtrip", good[1], "--against", str(ref), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (finding,) = doc["findings"]
    assert (finding["rule"], finding["cause"], finding["file"]) == ("RT104", "non-finite-weight", str(ref))
    assert finding["evidence"]["side"] == "reference" and finding["evidence"]["nan"] == 1
    layer = next(r for r in doc["layers"] if r["layer"] == QUANTIZED_LAYER)
    assert layer["status"] == "non-finite" and layer["rel_error"] is None
    assert doc["summary"]["not_comparable"] == 1
    assert "cannot be compared" in doc["summary"]["verdict"] and "within" not in doc["summary"]["verdict"]
    assert main(["roundtrip", good[1], "--against", str(ref)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "1 in REF (blocks.0.ffn.0): compare against a finite reference" in text
    assert "decode within their format's expected error" not in text


def test_roundtrip_of_a_file_with_nan_scales_names_the_file(good, tmp_path, capsys) -> None:
    path = WRONG_VALUES["fp8-nan-scale"].build(tmp_path / "f")
    assert main(["roundtrip", str(path), "--against", good[0], "--format", "json"]) == 1
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert (finding["rule"], finding["cause"], finding["file"]) == ("RT104", "non-finite-scale", str(path))
    assert finding["evidence"]["side"] == "file"


def test_roundtrip_against_a_gguf_with_a_nan_block_scale(good, tmp_path, capsys) -> None:
    ref = WRONG_VALUES["gguf-nan-block-scale"].build(tmp_path / "g")
    assert main(["roundtrip", good[1], "--against", str(ref), "--format", "json"]) == 1
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert (finding["cause"], finding["layer"], finding["evidence"]["side"]) == ("non-finite-scale",
                                                                               QUANTIZED_LAYER, "reference")
    assert main(["roundtrip", good[1], "--against", str(ref), "--fail-on", "error"]) == 1


# --- 3. legacy and subnormal scales ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "rule"), [("scaled-fp8-nan-scale-weight", "NV202"),
                                            ("scaled-fp8-zero-scale-weight", "NV202"),
                                            ("scaled-fp8-negative-scale-weight", "NV202"),
                                            ("scaled-fp8-missing-scale-weight", "NV109"),
                                            ("nvfp4-subnormal-scale2", "NV202")])
def test_bad_legacy_and_subnormal_scales_are_errors_fix_cannot_repair(name, rule, tmp_path, capsys) -> None:
    path = WRONG_VALUES[name].build(tmp_path / name)
    assert main(["lint", str(path), "--format", "json"]) == 1
    errors = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["severity"] == "error"]
    assert [(f["rule"], f["layer"]) for f in errors] == [(rule, QUANTIZED_LAYER)]
    out = tmp_path / "fixed.safetensors"
    assert main(["fix", str(path), str(out)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "1 error finding(s) cannot be repaired losslessly; nothing written" in text
    assert "nothing to repair" not in text and not out.exists()
    assert main(["fix", str(path), str(out), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (unfixable,) = [u for u in doc["plan"]["not_fixable"] if u["severity"] == "error"]
    assert unfixable["rule"] == rule and unfixable["remedy"] == "re-convert from the source with nvdiag convert"
    assert doc["written"] is False


def test_subnormal_scale_message_gives_the_threshold(tmp_path, capsys) -> None:
    path = WRONG_VALUES["nvfp4-subnormal-scale2"].build(tmp_path / "f")
    main(["lint", str(path), "--format", "json"])
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert finding["evidence"] == {"role": "weight_scale_2", "value": pytest.approx(1.401e-45, rel=1e-3),
                                   "min_normal": 2.0**-126}
    assert "subnormal" in finding["message"]


# --- 4. empty inputs ---------------------------------------------------------------------------------------------

def test_convert_refuses_a_source_without_tensors(tmp_path, capsys) -> None:
    src = WRONG_VALUES["no-tensors"].build(tmp_path / "e")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", "smart"]) == 2
    assert capsys.readouterr().err == f"nvdiag: error: {src}: holds no tensors: nothing to convert\n"
    assert not out.exists()


@pytest.mark.parametrize("name", ["no-tensors", "empty-weight-map"])
def test_roundtrip_against_an_empty_reference_compares_nothing_and_says_so(name, good, tmp_path, capsys) -> None:
    ref = WRONG_VALUES[name].build(tmp_path / name)
    assert main(["roundtrip", good[1], "--against", str(ref)]) == 2
    assert capsys.readouterr().err == f"nvdiag: error: {ref}: holds no tensors: nothing to compare against\n"


def test_roundtrip_that_pairs_nothing_fails(good, tmp_path, capsys) -> None:
    assert main(["roundtrip", good[0], "--against", good[1]]) == 2  # PATH has no quantized layer
    assert "has no quantized layer: nothing to roundtrip" in capsys.readouterr().err
    assert main(["roundtrip", good[1], "--against", good[0], "--layers", "nope.*"]) == 2
    assert "--layers 'nope.*' matches none" in capsys.readouterr().err


# --- 5. an all-zero weight ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zero-weight-source", "negative-zero-weight-source"])
def test_all_zero_weight_converts_and_decodes_to_exact_zeros(name, tmp_path, capsys) -> None:
    src = WRONG_VALUES[name].build(tmp_path / name)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--preset", PRESET]) == 0
    with safe_open(str(out), "pt") as f:
        q = f.get_tensor(f"{QUANTIZED_LAYER}.weight")
        scales = f.get_tensor(f"{QUANTIZED_LAYER}.weight_scale")
        scale_2 = f.get_tensor(f"{QUANTIZED_LAYER}.weight_scale_2")
    # comfy-kitchen (the independent codec) divides by the per-tensor scale when it quantizes: 0 would give NaN,
    # so the scale of an all-zero weight must be positive; 1.0 is what its decode turns into exact zeros
    assert float(scale_2) == 1.0
    decoded = ck.dequantize_nvfp4(q, scale_2, scales, torch.float32)
    assert torch.equal(decoded, torch.zeros_like(decoded))
    q_ck, scales_ck = ck.quantize_nvfp4(torch.zeros(512, 256), scale_2, pad_16x=True)
    assert torch.equal(q, q_ck) and torch.equal(scales.view(torch.uint8), scales_ck.view(torch.uint8))
    capsys.readouterr()
    assert main(["lint", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == []


def test_zero_block_scales_over_non_zero_codes_stay_an_error(make_checkpoint, tmp_path, capsys) -> None:
    """All-zero block scales are an all-zero layer only when the codes are zero too; otherwise scales went lost."""
    from safetensors.torch import load_file

    from inspect_tools.synthetic import save_safetensors

    tensors = load_file(str(make_checkpoint("nvfp4-mixed", name="wrong_values_nvfp4_zero_scales")))
    tensors[f"{QUANTIZED_LAYER}.weight_scale"] = torch.zeros_like(tensors[f"{QUANTIZED_LAYER}.weight_scale"])
    path = save_safetensors(tensors, tmp_path / "zeroed.safetensors")
    assert main(["lint", str(path), "--format", "json"]) == 1
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert (finding["rule"], finding["layer"], finding["message"]) == ("NV202", QUANTIZED_LAYER,
                                                                      f"block scales: all zero (of "
                                                                      f"{finding['evidence']['total']})")


def test_zero_per_tensor_scale_over_zero_codes_is_an_all_zero_layer(tmp_path, capsys) -> None:
    """Another tool's all-zero layer with weight_scale_2 = 0 decodes to zeros in ComfyUI (it only multiplies by it):
    an info, while the same zero scale over real codes stays an error."""
    from safetensors.torch import load_file

    from inspect_tools.synthetic import save_safetensors

    src = WRONG_VALUES["zero-weight-source"].build(tmp_path / "src")
    converted = tmp_path / "converted.safetensors"
    assert main(["convert", str(src), str(converted), "--preset", PRESET]) == 0
    tensors = load_file(str(converted))
    tensors[f"{QUANTIZED_LAYER}.weight_scale_2"] = torch.tensor(0.0)
    tensors["blocks.1.ffn.0.weight_scale_2"] = torch.tensor(0.0)
    path = save_safetensors(tensors, tmp_path / "zero_scale.safetensors")
    capsys.readouterr()
    assert main(["lint", str(path), "--format", "json"]) == 1
    findings = {(f["layer"], f["severity"]) for f in json.loads(capsys.readouterr().out)["findings"]}
    assert findings == {(QUANTIZED_LAYER, "info"), ("blocks.1.ffn.0", "error")}


def test_fp16_range_scan_reads_in_chunks_and_finds_a_value_in_the_last_one(tmp_path, monkeypatch) -> None:
    """The scan before the header is written is chunked (bounded memory) and still sees every row."""
    from converter import fp16_range
    from inspect_tools.readers import open_checkpoint
    from inspect_tools.synthetic import save_safetensors

    big = torch.zeros(300, 64)
    big[299, 63] = -7e4
    path = save_safetensors({"w": big, "v": torch.tensor([1.0, 2e5]), "s": torch.tensor(3.0),
                             "h": torch.full((8, 8), 59904.0, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    monkeypatch.setattr(fp16_range, "SCAN_CHUNK_BYTES", 64 * 4 * 7)  # 7 rows per read: 43 reads of "w"
    reads = []
    with open_checkpoint(path) as reader:
        real = reader.read_rows
        monkeypatch.setattr(reader, "read_rows", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
        assert fp16_range.source_abs_max(reader, "w") == 7e4
        assert len(reads) == 43 and max(b - a for a, b in zip(reads, reads[1:], strict=False)) == 7
        assert fp16_range.source_abs_max(reader, "v") == 2e5
        assert fp16_range.source_abs_max(reader, "s") == 3.0
        assert fp16_range.source_abs_max(reader, "h") == 59904.0  # BF16, fits FP16 (65504): stays F16
