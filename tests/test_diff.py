"""`nvdiag diff MINE REF` on pairs of synthetic checkpoints (scaled-down WAN 2.2 TI2V 5B and Flux)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspect_tools.cli import main
from inspect_tools.diff import DiffReport, diff_paths
from inspect_tools.synthetic import write_float, write_gguf, write_nvfp4_mixed, write_scaled_fp8_legacy
from reference_specs.findings import Severity

WAN = "wan2.2-ti2v-5b"
# narrower than the factory's default (width 128, one head): every file below is written in a fraction of a second
DIMS = {"dim": 128, "ffn": 256, "text_dim": 128, "freq_dim": 128}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference NVFP4 mixed file and its relatives, written once for the whole module."""
    root = tmp_path_factory.mktemp("diff")
    return {
        "nvfp4": write_nvfp4_mixed(root / "wan_nvfp4.safetensors", WAN, dims=DIMS),
        "nvfp4_input_scale": write_nvfp4_mixed(root / "wan_nvfp4_is.safetensors", WAN, dims=DIMS, input_scale=1e-3),
        "f32": write_float(root / "wan_f32.safetensors", WAN, dims=DIMS),
        "diffusers_sharded": write_float(root / "diffusers", WAN, dims=DIMS, naming="diffusers", sharded=2),
        "gguf_q4_0": write_gguf(root / "wan_q4_0.gguf", WAN, "Q4_0", dims=DIMS),
        "scaled_fp8": write_scaled_fp8_legacy(root / "wan_scaled_fp8.safetensors", WAN, dims=DIMS),
        "flux_nvfp4": write_nvfp4_mixed(root / "flux_nvfp4.safetensors", "flux1-dev"),
    }


def faulty(tmp_path: Path, *faults: str, **options: object) -> Path:
    return write_nvfp4_mixed(tmp_path / "mine.safetensors", WAN, dims=DIMS, faults=faults, **options)


def causes(report: DiffReport, severity: Severity | None = None) -> set[str]:
    return {f.cause for f in report.findings if severity is None or f.severity == severity}


def errors(report: DiffReport) -> list[str]:
    return [f"{f.cause}: {f.message}" for f in report.findings if f.severity == Severity.ERROR]


# --- pairs of healthy files -----------------------------------------------------------------------------------


def test_a_file_against_itself_shows_no_difference(files):
    report = diff_paths(files["nvfp4"], files["nvfp4"])
    assert report.findings == []
    assert report.only_mine == [] and report.only_ref == [] and report.disagreements == []
    assert "No difference that matters" in report.summary_text()


def test_nvfp4_mixed_against_its_f32_source_lists_the_precision_plan(files):
    report = diff_paths(files["nvfp4"], files["f32"])
    assert errors(report) == []
    assert report.only_mine == [] and report.only_ref == []
    assert report.precision["mine"]["quantized"] == len(report.disagreements) > 0
    assert all(row["ref"].startswith("f32") for row in report.disagreements)


def test_sharded_diffusers_source_pairs_every_layer_by_native_name(files):
    report = diff_paths(files["nvfp4"], files["diffusers_sharded"])
    assert report.only_mine == [] and report.only_ref == []  # no spurious "missing" layers from naming
    assert report.ref.detection.naming == "diffusers"
    assert errors(report) == []
    assert "diffusers-key-names" not in causes(report)  # REF's naming is no fault of MINE


def test_gguf_q4_0_of_the_same_model_is_paired_and_clean(files):
    report = diff_paths(files["nvfp4"], files["gguf_q4_0"])
    assert errors(report) == []
    assert report.only_ref == [] and report.only_mine == []
    patch = next(p for p in report.pairs if p.key == "patch_embedding")
    assert patch.mine.has("weight") and not patch.ref.has("weight")  # city96 leaves the 5-D conv out of the GGUF
    assert {"Q4_0", "Q4_1"} <= set(report.signatures["ref"])  # ffn.2 is Q4_1 in a city96 Q4_0 file
    # the same layers are quantized on both sides; GGUF keeps the others at F16 where MINE keeps F32
    assert report.disagreements
    assert all(row["mine"].startswith("f32") and row["ref"].startswith("16-bit") for row in report.disagreements)


def test_values_against_a_gguf_reference_stay_within_both_formats_error(files):
    report = diff_paths(files["nvfp4"], files["gguf_q4_0"], layers="blocks.1.*", values=True)
    assert report.values and all(row["status"] == "ok" for row in report.values)
    assert errors(report) == []


def test_legacy_fp8_reference_is_compared_and_flagged_as_legacy(files):
    report = diff_paths(files["nvfp4"], files["scaled_fp8"])
    assert errors(report) == []
    assert "legacy-fp8-format" in causes(report, Severity.INFO)
    assert set(report.signatures["ref"]) == {"scaled_fp8"}
    assert "scale_weight F32 scalar" in next(iter(report.signatures["ref"]["scaled_fp8"]))


def test_flux_reference_is_compared_by_layer_role(files):
    report = diff_paths(files["nvfp4"], files["flux_nvfp4"])
    assert report.mode == "role"
    assert errors(report) == []
    assert report.roles is not None
    for role in ("attn_qkv", "attn_out", "mlp_up", "mlp_down", "modulation"):
        assert role in report.roles["mine"] and role in report.roles["ref"]
    assert set(report.signatures["mine"]) == set(report.signatures["ref"]) == {"nvfp4"}


def test_reference_input_scale_that_mine_lacks_is_info_with_the_comfyui_verdict(files):
    report = diff_paths(files["nvfp4"], files["nvfp4_input_scale"])
    assert errors(report) == []
    info = [f for f in report.findings if f.cause == "input-scale-implausible"]
    assert len(info) == report.counts["mine"]["nvfp4"]["layers"]  # one per layer
    assert {f.severity for f in info} == {Severity.INFO}
    assert "dynamic" in info[0].message and "safe" in info[0].message
    verdict = next(v for v in report.verdicts if v["role"] == "input_scale")
    n = report.counts["mine"]["nvfp4"]["layers"]
    assert verdict["text"] == f"nvfp4: REF {n}/{n} layers have input_scale, MINE 0/{n}"


# --- injected differences: each one reported with its cause ---------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "cause", "severity"),
    [
        ("missing-quant-marker", "missing-quant-marker", Severity.ERROR),
        ("missing-block-scale", "missing-block-scale", Severity.ERROR),
        ("missing-tensor-scale", "missing-tensor-scale", Severity.ERROR),
        ("weight-derived-input-scale", "input-scale-implausible", Severity.WARNING),
        ("diffusers-key-names", "diffusers-key-names", Severity.ERROR),
        ("scale2-reciprocal", "scale2-reciprocal", Severity.WARNING),
        ("sensitive-layer-quantized", "sensitive-layer-quantized", Severity.WARNING),
        ("wrong-dtype", "wrong-dtype", Severity.ERROR),
        ("non-finite-scale", "non-finite-scale", Severity.ERROR),
        ("metadata-prefix", "invalid-quant-marker", Severity.WARNING),
    ],
)
def test_injected_difference_is_reported_with_its_cause(files, tmp_path, fault, cause, severity):
    report = diff_paths(faulty(tmp_path, fault), files["nvfp4"])
    assert cause in causes(report, severity), [f.to_json() for f in report.findings]


def test_diffusers_names_do_not_make_layers_look_missing(files, tmp_path):
    report = diff_paths(faulty(tmp_path, "diffusers-key-names"), files["nvfp4"])
    assert report.only_mine == [] and report.only_ref == []


def test_markers_in_header_metadata_only_are_equivalent_to_marker_tensors(files, tmp_path):
    mine = write_nvfp4_mixed(tmp_path / "meta.safetensors", WAN, dims=DIMS, markers="metadata")
    report = diff_paths(mine, files["nvfp4"])
    assert errors(report) == []
    verdict = next(v for v in report.verdicts if v["role"] == "comfy_quant")
    assert "_quantization_metadata" in verdict["verdict"]
    row = next(r for r in report.metadata if r["key"] == "_quantization_metadata")
    assert row["ref"] is None and "layers" in row["mine"]


@pytest.mark.parametrize("fault", ["scale-layout-linear", "nibble-order", "transposed-weight", "stale-scale"])
def test_values_attribute_what_headers_cannot_show(files, tmp_path, fault):
    """Same header, wrong bytes: only --values (roundtrip's decoders and attribution) sees these."""
    mine = faulty(tmp_path, fault)
    assert fault not in causes(diff_paths(mine, files["f32"]))
    report = diff_paths(mine, files["f32"], layers="blocks.0.*", values=True)
    assert report.values and all(row["layer"].startswith("blocks.0.") for row in report.values)
    assert fault in causes(report, Severity.ERROR)


# --- the command ----------------------------------------------------------------------------------------------


def test_cli_json_has_findings_and_paired_layer_rows(files, capsys):
    code = main(["diff", str(files["nvfp4_input_scale"]), str(files["nvfp4"]), "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["version"] == 1 and doc["summary"]["errors"] == 0
    assert {"signatures", "counts", "precision_plan", "scales", "metadata", "layers"} <= set(doc)
    row = next(r for r in doc["layers"] if r["name"] == "blocks.0.ffn.0")
    assert row["mine"]["format"] == row["ref"]["format"] == "nvfp4"
    assert "input_scale" in row["mine"]["tensors"] and "input_scale" not in row["ref"]["tensors"]
    finding = doc["findings"][0]
    assert set(finding) == {"rule", "cause", "severity", "file", "layer", "message", "evidence"}


def test_cli_exit_codes(files, tmp_path, capsys):
    broken = faulty(tmp_path, "missing-block-scale")
    assert main(["diff", str(broken), str(files["nvfp4"])]) == 1
    text = capsys.readouterr().out
    assert "missing-block-scale" in text and "break MINE in ComfyUI" in text
    assert main(["diff", str(files["nvfp4"]), str(files["f32"])]) == 0
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_text("hello")
    assert main(["diff", str(not_a_checkpoint), str(files["nvfp4"])]) == 2
    assert "notes.safetensors" in capsys.readouterr().err
