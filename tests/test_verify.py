"""`nvdiag verify` with the real client: files load and run in ComfyUI itself (../shared/comfyui, see comfyui.md).

The expected values do not come from nvdiag: a correct file must render what comfy-kitchen's own encoding of the same
reference renders (the baseline, ratio 1), FP32 against itself must give exactly 0, and ComfyUI's own exception
messages are what a refusal must carry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inspect_tools.cli import main
from inspect_tools.comfyui.runtime import ComfyRuntime
from inspect_tools.comfyui.verify import FAR, VerifyResult, verify
from inspect_tools.layers import open_model
from inspect_tools.synthetic import (
    comfyui_dims,
    write_float,
    write_fp8_comfy,
    write_gguf,
    write_nvfp4_mixed,
    write_scaled_fp8_legacy,
)
from reference_specs.findings import Severity

WAN_VARIANTS = ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b")
# what ComfyUI's model detection must say for each target (comfy/supported_models.py)
CONFIG_CLASS = {
    "wan2.2-ti2v-5b": "WAN22_T2V",
    "wan2.2-t2v-a14b": "WAN21_T2V",
    "wan2.2-i2v-a14b": "WAN21_T2V",
    "qwen-image-2512": "QwenImage",
    "qwen-image-edit-2511": "QwenImage",
}


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory):
    """files(variant, kind, **options) -> path, written once per session at dims ComfyUI builds."""
    folder = tmp_path_factory.mktemp("verify")
    cache: dict[str, Path] = {}
    writers = {"fp32": write_float, "nvfp4": write_nvfp4_mixed, "fp8": write_fp8_comfy,
               "scaled-fp8": write_scaled_fp8_legacy, "gguf": write_gguf}

    def make(variant: str, kind: str, **options: object) -> Path:
        key = f"{variant}|{kind}|{sorted(options.items())!r}"
        if key not in cache:
            suffix = ".gguf" if kind == "gguf" else ("" if options.get("sharded") else ".safetensors")
            target = folder / f"{variant}-{kind}-{len(cache)}{suffix}"
            cache[key] = writers[kind](target, variant, dims=comfyui_dims(variant), **options)
        return cache[key]

    return make


def run(runtime: ComfyRuntime, path: Path, against: Path, compute=("w4a16",), steps: int = 2,
        **options: object) -> VerifyResult:
    with open_model(path) as mine, open_model(against) as ref:
        return verify(runtime, mine, ref, compute=compute, steps=steps, **options)


def causes(result: VerifyResult) -> set[str]:
    return {f.cause for f in result.findings if f.severity > Severity.INFO}


def problems(result: VerifyResult) -> list:
    """Findings at warning or error: what says the file is wrong (W4A4's own cost is an info)."""
    return [f for f in result.findings if f.severity > Severity.INFO]


@pytest.mark.parametrize("variant", WAN_VARIANTS)
def test_a_correct_nvfp4_file_renders_what_comfy_kitchens_own_encoding_renders(comfyui, files, variant):
    # reuse=False: the baseline runs on its own even where the file is its bytes (the tests below cover reuse)
    result = run(comfyui, files(variant, "nvfp4"), files(variant, "fp32"), compute=("w4a16", "w4a4"), reuse=False)
    report = result.file_report
    assert report.loaded and report.config_class == CONFIG_CLASS[variant]
    assert report.config["in_dim"] == comfyui_dims(variant)["in_dim"]
    assert report.quantized == {"nvfp4": 20}  # every quantized layer of the file is held quantized
    assert problems(result) == []
    for path in result.paths:
        assert 0 < path.file.error == pytest.approx(path.baseline.error, rel=1e-3)
        assert path.file.finite and min(path.file.cosine) > 0.99


# Qwen Image 2512 NVFP4 rendering like comfy-kitchen's own encoding is the demo's last step (tests/test_demo.py): one
# full-width Qwen conversion and verify per suite run (~40 s of it), not two.


def test_qwen_image_edit_2511_reaches_comfyui_as_the_edit_model(comfyui, files):
    source = files("qwen-image-edit-2511", "fp32", dtype=torch.bfloat16)
    result = run(comfyui, source, source, steps=1)
    # the __index_timestep_zero__ marker selects 2511's reference method in ComfyUI's detection
    assert result.file_report.config["default_ref_method"] == "index_timestep_zero"
    assert result.paths[0].file.error == 0.0


def test_fp32_against_itself_gives_exactly_zero(comfyui, files):
    source = files("wan2.2-ti2v-5b", "fp32")
    result = run(comfyui, source, source)
    assert result.paths[0].file.error == 0.0 and result.findings == []


@pytest.mark.parametrize("kind", ["fp8", "scaled-fp8"])
def test_fp16_and_fp8_files_give_small_errors_within_their_baseline(comfyui, files, kind):
    variant = "wan2.2-ti2v-5b"
    for path in (files(variant, "fp32", dtype=torch.float16), files(variant, kind)):
        result = run(comfyui, path, files(variant, "fp32"))
        assert result.findings == []
        assert 0 < result.paths[0].file.error < 0.05
        assert result.paths[0].ratio == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("reference", ["fp16", "fp8", "gguf", "diffusers-sharded"])
def test_any_reference_a_user_has_judges_a_correct_file_correct(comfyui, files, reference):
    variant = "wan2.2-ti2v-5b"
    ref = {"fp16": lambda: files(variant, "fp32", dtype=torch.float16),
           "fp8": lambda: files(variant, "fp8"),
           "gguf": lambda: files(variant, "gguf", qtype="Q4_0"),
           "diffusers-sharded": lambda: files(variant, "fp32", naming="diffusers", sharded=2)}[reference]()
    result = run(comfyui, files(variant, "nvfp4"), ref)
    assert result.ref_report.loaded and result.findings == []
    ratio = result.paths[0].ratio  # None for the FP8 reference: quantized itself, no values to build a baseline from
    assert ratio is None or 0.5 < ratio < 1.5  # a lossy reference's own error is accounted for


@pytest.mark.parametrize("fault", ["scale-layout-linear", "nibble-order", "scale2-reciprocal", "non-finite-scale"])
@pytest.mark.parametrize("variant", ["wan2.2-ti2v-5b", "wan2.2-i2v-a14b"])
def test_format_faults_are_found_in_the_output_and_named(comfyui, files, variant, fault):
    result = run(comfyui, files(variant, "nvfp4", faults=(fault,)), files(variant, "fp32"))
    (finding,) = [f for f in result.findings if f.rule == "V201"]
    assert finding.cause == fault
    assert result.paths[0].ratio > FAR
    assert result.paths[0].first_wrong_block(result.block_names) == "blocks.0"


def test_faults_are_found_against_a_lossy_gguf_reference_too(comfyui, files):
    variant = "wan2.2-ti2v-5b"
    result = run(comfyui, files(variant, "nvfp4", faults=("scale-layout-linear",)), files(variant, "gguf",
                                                                                             qtype="Q4_0"))
    assert causes(result) == {"scale-layout-linear"}


@pytest.mark.parametrize(("fault", "layers"), [
    ("transposed-weight", ["blocks.1.cross_attn.v"]),
    ("stale-scale", ["blocks.1.cross_attn.v", "blocks.1.cross_attn.o"]),  # scales swapped between two layers
])
def test_faults_the_output_hides_are_found_by_the_per_layer_decode(comfyui, files, fault, layers):
    variant = "wan2.2-ti2v-5b"
    result = run(comfyui, files(variant, "nvfp4", faults=(fault,), fault_layers=layers), files(variant, "fp32"))
    assert not result.paths[0].far  # on these inputs the output barely moves
    wrong = [f for f in result.findings if f.severity == Severity.ERROR]
    assert {f.cause for f in wrong} == {fault} and {f.layer for f in wrong} == set(layers)
    assert "hides it" in wrong[0].message
    assert f"looks right, but {len(layers)} layer(s) decode wrongly: {fault}" in result.verdict()


@pytest.mark.parametrize(("fault", "cause", "comfyui_says"), [
    ("missing-block-scale", "missing-block-scale", "Missing NVFP4 scales"),
    ("missing-tensor-scale", "missing-tensor-scale", "Missing NVFP4 scales"),
    ("diffusers-key-names", "diffusers-key-names", "Could not detect model type"),
    ("missing-quant-marker", "missing-quant-marker", "size mismatch"),
])
def test_files_comfyui_refuses_are_reported_with_its_own_message(comfyui, files, fault, cause, comfyui_says):
    result = run(comfyui, files("wan2.2-ti2v-5b", "nvfp4", faults=(fault,)), files("wan2.2-ti2v-5b", "fp32"))
    (finding,) = result.findings
    assert (finding.rule, finding.cause) == ("V101", cause)
    assert comfyui_says in finding.evidence["comfyui_error"]
    assert not result.file_report.loaded and "refuses" in result.verdict()


def test_an_unknown_marker_format_is_a_refusal_with_an_invalid_marker_cause(comfyui, files, tmp_path):
    good = files("wan2.2-ti2v-5b", "nvfp4")
    tensors = load_file(str(good))
    tensors["blocks.0.self_attn.q.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp5"}'), dtype=torch.uint8)
    bad = tmp_path / "bad_marker.safetensors"
    save_file(tensors, str(bad))
    result = run(comfyui, bad, files("wan2.2-ti2v-5b", "fp32"))
    assert {(f.rule, f.cause) for f in result.findings} == {("V101", "invalid-quant-marker")}
    assert "nvfp5" in result.findings[0].evidence["comfyui_error"]


def test_a_weight_derived_input_scale_is_worse_on_blackwell_than_none(comfyui, files):
    variant = "wan2.2-ti2v-5b"
    source = files(variant, "fp32")
    static = run(comfyui, files(variant, "nvfp4", input_scale="weight-derived"), source, compute=("w4a16", "w4a4"))
    dynamic = run(comfyui, files(variant, "nvfp4"), source, compute=("w4a16", "w4a4"))
    w4a16, w4a4 = static.paths
    assert w4a16.file.error == pytest.approx(dynamic.paths[0].file.error)  # input_scale is unused without W4A4
    assert w4a4.file.error > 2 * dynamic.paths[1].file.error
    assert causes(static) == {"input-scale-implausible"} and problems(dynamic) == []


def test_full_precision_markers_keep_those_layers_out_of_w4a4(comfyui, files):
    variant = "wan2.2-ti2v-5b"
    source = files(variant, "fp32")
    everything = run(comfyui, files(variant, "nvfp4"), source, compute=("w4a4",))
    marked = run(comfyui, files(variant, "nvfp4", full_precision_mm=True), source, compute=("w4a16", "w4a4"))
    assert len(marked.file_report.full_precision_mm) == 20
    w4a16, w4a4 = marked.paths
    assert w4a4.file.error == pytest.approx(w4a16.file.error)  # every layer multiplies in full precision
    assert w4a4.file.error < everything.paths[0].file.error


# --- the command ------------------------------------------------------------------------------------------------


def test_verify_command_prints_what_comfyui_made_of_the_file(comfyui, files, capsys):
    code = main(["verify", str(files("wan2.2-ti2v-5b", "nvfp4")), "--against", str(files("wan2.2-ti2v-5b", "fp32")),
                 "--comfyui", str(comfyui.root), "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "WAN22 / WAN22_T2V" in out and "nvfp4 20" in out
    assert "as well as a correct file" in out


def test_verify_command_json_and_exit_code_on_a_broken_file(comfyui, files, capsys):
    variant = "wan2.2-ti2v-5b"
    code = main(["verify", str(files(variant, "nvfp4", faults=("nibble-order",))), "--against",
                 str(files(variant, "fp32")), "--comfyui", str(comfyui.root), "--steps", "1", "--compute", "both",
                 "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["version"] == 1 and doc["file_load"]["config_class"] == "WAN22_T2V"
    assert [p["compute"] for p in doc["compute"]] == ["w4a16", "w4a4"]
    assert {f["cause"] for f in doc["findings"]} == {"nibble-order"}
    assert doc["summary"]["comfyui_version"] == comfyui.version


def test_without_comfyui_verify_says_how_to_point_at_it(files, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    code = main(["verify", str(files("wan2.2-ti2v-5b", "nvfp4")), "--against", str(files("wan2.2-ti2v-5b", "fp32")),
                 "--comfyui", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "not a ComfyUI folder" in err[0] and "COMFYUI_PATH" in err[0]


def test_a_gguf_file_is_not_something_comfyui_core_loads(comfyui, files, capsys):
    gguf = files("wan2.2-ti2v-5b", "gguf", qtype="Q4_0")
    code = main(["verify", str(gguf), "--against", str(files("wan2.2-ti2v-5b", "fp32")),
                 "--comfyui", str(comfyui.root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--against" in err[0]


# --- ComfyUI in the gate of convert and fix ---------------------------------------------------------------------


def test_convert_verify_refuses_a_broken_encoders_file(comfyui, files, tmp_path, monkeypatch, capsys):
    """An encoder that packs low nibble first once fooled a gate that re-encoded with that same encoder; with
    --verify ComfyUI stood behind it. Now the gate's own baseline is the reference codec, so the file is refused
    before ComfyUI is even asked (tests/test_independent_baselines.py); either way nothing is published."""
    from reference_specs.formats import fast_encode

    real = fast_encode.encode_nvfp4

    def low_nibble_first(weight, *args, **kwargs):
        out = real(weight, *args, **kwargs)
        packed = out["weight"]
        out["weight"] = ((packed & 0x0F) << 4) | (packed >> 4)
        return out

    monkeypatch.setattr(fast_encode, "encode_nvfp4", low_nibble_first)
    variant = "wan2.2-ti2v-5b"
    out = tmp_path / "converted.safetensors"
    argv = ["convert", str(files(variant, "fp32")), str(out), "--preset", variant]
    code = main([*argv, "--verify", "--comfyui", str(comfyui.root)])
    assert code == 1 and not out.exists()
    assert "reference codec" in capsys.readouterr().out


def test_convert_verify_is_a_second_line_behind_the_gate(comfyui, files, tmp_path, monkeypatch, capsys):
    """Should nvdiag's own gate ever miss a fault (simulated: it passes everything), ComfyUI, judged against
    comfy-kitchen's own encoding, still refuses the file."""
    import converter.pipeline as pipeline
    from converter.gate import GateReport
    from reference_specs.formats import fast_encode

    real = fast_encode.encode_nvfp4

    def low_nibble_first(weight, *args, **kwargs):
        out = real(weight, *args, **kwargs)
        out["weight"] = ((out["weight"] & 0x0F) << 4) | (out["weight"] >> 4)
        return out

    monkeypatch.setattr(fast_encode, "encode_nvfp4", low_nibble_first)
    monkeypatch.setattr(pipeline, "run_gate", lambda *args, **kwargs: GateReport(lint_ran=True))
    variant = "wan2.2-ti2v-5b"
    out = tmp_path / "converted.safetensors"
    argv = ["convert", str(files(variant, "fp32")), str(out), "--preset", variant]
    assert main([*argv, "--verify", "--comfyui", str(comfyui.root)]) == 1 and not out.exists()
    assert "ComfyUI gate" in capsys.readouterr().out


def test_fix_verify_publishes_a_repair_that_comfyui_renders_right(comfyui, files, tmp_path, capsys):
    variant = "wan2.2-ti2v-5b"
    out = tmp_path / "fixed.safetensors"
    code = main(["fix", str(files(variant, "nvfp4", faults=("scale-layout-linear",))), str(out), "--against",
                 str(files(variant, "fp32")), "--verify", "--comfyui", str(comfyui.root)])
    assert code == 0 and out.exists()
    result = run(comfyui, out, files(variant, "fp32"))
    assert problems(result) == [] and result.paths[0].ratio == pytest.approx(1.0, abs=0.01)


# --- big models: block by block ---------------------------------------------------------------------------------


def test_block_by_block_is_the_same_computation_as_the_whole_model(comfyui, files):
    variant = "wan2.2-i2v-a14b"
    with open_model(files(variant, "nvfp4")) as mine, open_model(files(variant, "fp32")) as ref:
        # reuse=False: the baseline is run from its state dict in both (not taken over from the file's run)
        whole = verify(comfyui, mine, ref, compute=("w4a16", "w4a4"), steps=2, reuse=False)
        by_block = verify(comfyui, mine, ref, compute=("w4a16", "w4a4"), steps=2, blocks_at_once=1, reuse=False)
    assert (whole.pieces, by_block.pieces) == (1, 2)
    assert by_block.block_names == whole.block_names == ["blocks.0", "blocks.1"]
    assert by_block.file_report.quantized == whole.file_report.quantized == {"nvfp4": 20}
    assert by_block.file_report.config["num_layers"] == 2
    for one, other in zip(whole.paths, by_block.paths, strict=True):
        # the baseline is a state dict in both runs: piece by piece must give exactly what the whole model gives
        assert other.baseline.error == pytest.approx(one.baseline.error, rel=1e-9)
        assert other.baseline.blocks == pytest.approx(one.baseline.blocks, rel=1e-9)
        # the whole file is read by ComfyUI from a memory map, its pieces from copies: CPU kernels round a little
        # differently on differently aligned memory (about 1e-6 of the output), nothing more
        assert other.file.error == pytest.approx(one.file.error, rel=1e-2)
        assert other.file.blocks == pytest.approx(one.file.blocks, rel=1e-2)


@pytest.mark.parametrize("blocks_at_once", [None, 1], ids=["whole", "block-by-block"])
def test_a_file_that_is_the_baseline_byte_for_byte_runs_once_for_both(comfyui, files, blocks_at_once):
    variant = "wan2.2-ti2v-5b"
    once, twice = (run(comfyui, files(variant, "nvfp4"), files(variant, "fp32"), compute=("w4a16", "w4a4"),
                       blocks_at_once=blocks_at_once, reuse=reuse) for reuse in (True, False))
    assert "served for both" in once.baseline_note and "served" not in twice.baseline_note
    assert once.baseline_report.to_json() == twice.baseline_report.to_json()
    for shared, own in zip(once.paths, twice.paths, strict=True):
        assert shared.baseline.error == shared.file.error  # one run stands for both
        # ComfyUI reads a whole file from a memory map and a state dict from copies; CPU kernels round a little
        # differently on differently aligned memory (about 1e-5 of the error): the only difference there is
        assert shared.baseline.error == pytest.approx(own.baseline.error, rel=1e-4)
        assert shared.baseline.blocks == pytest.approx(own.baseline.blocks, rel=1e-4)
    assert once.verdict() == twice.verdict() == ("ComfyUI renders this file as well as a correct file of the same "
                                                 "layer selection")


@pytest.mark.parametrize("change", ["a header key the loader may read", "one block-scale byte"])
def test_a_file_that_differs_from_the_baseline_as_comfyui_loads_it_gets_its_own_baseline_run(
        comfyui, files, tmp_path, change):
    from safetensors import safe_open

    source = files("wan2.2-ti2v-5b", "nvfp4")
    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata() or {})
    if change == "one block-scale byte":
        scales = tensors["blocks.0.ffn.0.weight_scale"].view(torch.uint8).clone()
        scales.view(-1)[0] ^= 1
        tensors["blocks.0.ffn.0.weight_scale"] = scales.view(torch.float8_e4m3fn)
    else:
        metadata["modelspec.title"] = "same tensors, one more header key"
    changed = tmp_path / "changed.safetensors"
    save_file(tensors, str(changed), metadata=metadata)
    result = run(comfyui, changed, files("wan2.2-ti2v-5b", "fp32"))
    assert "served" not in result.baseline_note and result.baseline_report is not None
    assert result.paths[0].baseline.error > 0


def test_the_header_markers_comfyui_makes_and_the_keys_it_may_read():
    from inspect_tools.comfyui.reference import header_markers

    layers = {"blocks.0.ffn.0": {"format": "nvfp4", "full_precision_matrix_mult": True}}
    quant = json.dumps({"format_version": "1.0", "layers": layers})
    # comfy/utils.py convert_old_quants: torch.tensor(list(json.dumps(v).encode('utf-8')), dtype=torch.uint8)
    expected = {"blocks.0.ffn.0.comfy_quant": b'{"format": "nvfp4", "full_precision_matrix_mult": true}'}
    assert header_markers({"_quantization_metadata": quant, "nvdiag": "{}", "format": "pt"}) == expected
    assert header_markers(None) == header_markers({"format": "pt"}) == {}
    assert header_markers({"config": "{}"}) is None  # comfy/model_detection.py reads it
    assert header_markers({"modelspec.title": "x"}) is None  # not known to be unread
    assert header_markers({"_quantization_metadata": "{not json"}) is None


def test_block_by_block_finds_a_fault_in_the_last_block_only(comfyui, files):
    variant = "wan2.2-ti2v-5b"
    broken = files(variant, "nvfp4", faults=("scale-layout-linear",),
                   fault_layers=["blocks.1.self_attn.q", "blocks.1.ffn.0"])
    with open_model(broken) as mine, open_model(files(variant, "fp32")) as ref:
        result = verify(comfyui, mine, ref, steps=2, blocks_at_once=1)
    assert causes(result) == {"scale-layout-linear"}
    assert result.paths[0].first_wrong_block(result.block_names) == "blocks.1"


def test_a_14b_expert_is_planned_in_pieces_that_fit_a_24_gb_machine(tmp_path, monkeypatch):
    """The real WAN 2.2 A14B header (sparse: 57 GB apparent, no data) under half of a 24 GB machine's memory."""
    from inspect_tools.comfyui import verify as engine
    from inspect_tools.synthetic import write_header_only

    budget = 12 * 2**30
    monkeypatch.setattr(engine, "memory_budget", lambda: budget)
    with open_model(write_header_only(tmp_path / "a14b.safetensors", "wan2.2-t2v-a14b", kind="f32")) as model:
        plan = engine.plan_pieces(model, None)
        whole = engine.plan_pieces(model, 40)
        sizes = {info.name: info.numel for info in model.reader}
    block = sum(n for k, n in sizes.items() if k.startswith("blocks.0."))
    outside = sum(n for k, n in sizes.items() if not k.startswith("blocks."))
    assert plan[0].total == 40 and plan[-1].stop == 40 and len(plan) > 1
    # FP32 model plus the state dict it is loaded from: 8 bytes a parameter, every piece within the budget
    assert all((outside + (p.stop - p.start) * block) * 8 <= budget for p in plan)
    assert len(whole) == 1 and whole[0].whole


# --- on a GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_on_cuda_gives_the_cpu_verdicts(comfyui, files):
    """ComfyUI picks its device once per process: the CUDA run is a subprocess of the real command."""
    import os
    import subprocess
    import sys

    variant = "wan2.2-ti2v-5b"
    source = files(variant, "fp32")
    verdicts = {}
    for name, path in (("good", files(variant, "nvfp4")), ("linear", files(variant, "nvfp4",
                                                                              faults=("scale-layout-linear",)))):
        argv = [sys.executable, "-c", "from inspect_tools.launch import run; run()", "verify", str(path), "--against",
                str(source), "--comfyui", str(comfyui.root), "--device", "cuda", "--compute", "both", "--format",
                "json"]
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ), timeout=600)
        doc = json.loads(done.stdout)
        assert doc["summary"]["device"] == "cuda"
        verdicts[name] = (done.returncode, {f["cause"] for f in doc["findings"] if f["severity"] != "info"},
                          [p["ratio"] for p in doc["compute"]])
    assert verdicts["good"][:2] == (0, set()) and all(abs(r - 1) < 0.05 for r in verdicts["good"][2])
    assert verdicts["linear"][:2] == (1, {"scale-layout-linear"})


def test_an_output_that_overflows_for_a_correct_file_too_is_not_blamed_on_the_file():
    """float16 compute (ComfyUI's choice for WAN on most GPUs) can overflow on synthetic inputs: when the baseline's
    output is not finite either, the comparison is inconclusive, not a fault of the file."""
    from inspect_tools.comfyui.verify import Comparison, PathResult

    def comparison(finite: bool) -> Comparison:
        return Comparison(name="x", compute="w4a16", rel_l2=[float("inf") if not finite else 0.05], cosine=[1.0],
                          psnr_db=[30.0], blocks=[0.1], finite=finite)

    both = PathResult(compute="w4a16", file=comparison(False), baseline=comparison(False))
    only_file = PathResult(compute="w4a16", file=comparison(False), baseline=comparison(True))
    assert both.overflow and not both.far
    assert not only_file.overflow and only_file.far
