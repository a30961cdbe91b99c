"""`nvdiag fix` end to end: a good synthetic NVFP4 file and the same file (same seed) with one fault; fixing the
broken one must give back the good one's tensors, lint clean, roundtrip clean, and never touch the input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converter.fix import PROVENANCE_KEY, VALUE_CAUSES, fix_checkpoint
from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.roundtrip import run_roundtrip
from inspect_tools.synthetic.writers import write_float, write_fp8_comfy, write_nvfp4_mixed
from reference_specs.findings import Severity

VARIANT = "wan2.2-ti2v-5b"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quant_layers(metadata: dict[str, str]) -> dict:
    return json.loads(metadata["_quantization_metadata"])["layers"] if "_quantization_metadata" in metadata else {}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fix")
    return {
        "good": write_nvfp4_mixed(folder / "good.safetensors", VARIANT),
        "good_metadata": write_nvfp4_mixed(folder / "good_metadata.safetensors", VARIANT, markers="metadata"),
        "ref": write_float(folder / "ref.safetensors", VARIANT),
    }


def assert_clean(path: Path, ref: Path) -> None:
    with open_model(path) as model:
        errors = [f for f in lint_model(model) if f.severity >= Severity.ERROR]
    assert errors == []
    assert run_roundtrip(path, ref).findings == []


# fault -> (good file it must give back, whether the diagnosis needs --against REF)
CASES = {
    "nibble-order": ("good", True),  # lint reads no packed data: only the roundtrip sees swapped nibbles
    "scale-layout-linear": ("good", False),
    "scale2-reciprocal": ("good", False),
    "missing-quant-marker": ("good", False),
    "wrong-dtype": ("good", False),
    "weight-derived-input-scale": ("good", False),
    "diffusers-key-names": ("good", False),
    "metadata-prefix": ("good_metadata", False),
}


@pytest.mark.parametrize("fault", sorted(CASES))
def test_fix_gives_back_the_good_file(fault: str, files: dict[str, Path], tmp_path: Path) -> None:
    good_name, needs_ref = CASES[fault]
    options = {"markers": "metadata"} if good_name == "good_metadata" else {}
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=[fault], **options)
    before = sha(broken)
    out = tmp_path / "fixed.safetensors"

    result = fix_checkpoint(broken, out, against=files["ref"] if needs_ref else None)

    assert result.written, result.verdict()
    # a repair that changes decoded values, made without a reference, is written but reported unverified (exit 1)
    unverified = not needs_ref and fault in VALUE_CAUSES
    assert result.exit_code == (1 if unverified else 0), result.verdict()
    assert ("NOT VERIFIED" in result.verdict()) == unverified
    assert sha(broken) == before
    assert_clean(out, files["ref"])
    good, good_meta = read(files[good_name])
    fixed, fixed_meta = read(out)
    assert set(fixed) == set(good)
    for key in good:
        if fault == "wrong-dtype" and key.endswith("weight_scale_2"):
            # the fault rounded F32 to F16: the F16 value is what the file holds, widened exactly
            assert raw(fixed[key]) == raw(good[key].to(torch.float16).to(torch.float32)), key
        elif fault == "scale2-reciprocal" and key.endswith("weight_scale_2"):
            assert fixed[key].dtype == torch.float32 and torch.allclose(fixed[key], good[key], rtol=2e-7, atol=0)
        else:
            assert raw(fixed[key]) == raw(good[key]) and fixed[key].dtype == good[key].dtype, key
    assert quant_layers(fixed_meta).keys() >= quant_layers(good_meta).keys()
    provenance = json.loads(fixed_meta[PROVENANCE_KEY])
    cause = "input-scale-implausible" if fault == "weight-derived-input-scale" else (
        "invalid-quant-marker" if fault == "metadata-prefix" else fault)
    assert cause in provenance["repaired"] and provenance["tool"] == "nvdiag fix"


def test_without_a_reference_a_second_fault_is_not_claimed_repaired(files: dict[str, Path], tmp_path: Path) -> None:
    """Linear scales AND swapped nibbles (a hand-renamed ModelOpt export): lint sees only the layout. fix repairs
    it, but must not call the file repaired; the reference then finds and repairs the nibbles."""
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["scale-layout-linear", "nibble-order"])
    half = tmp_path / "half.safetensors"
    result = fix_checkpoint(broken, half)
    assert result.written and result.exit_code == 1
    assert "NOT VERIFIED" in result.verdict() and "nvdiag roundtrip" in result.verdict()
    assert {f.cause for f in run_roundtrip(half, files["ref"]).findings} == {"nibble-order"}
    whole = tmp_path / "whole.safetensors"
    again = fix_checkpoint(half, whole, against=files["ref"])
    assert again.exit_code == 0 and again.written, again.verdict()
    assert_clean(whole, files["ref"])


def test_reciprocal_inversion_is_bit_exact_or_says_so(tmp_path: Path, files: dict[str, Path]) -> None:
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["scale2-reciprocal"])
    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out)
    good, _ = read(files["good"])
    fixed, meta = read(out)
    inexact = {r.layer for r in result.plan.repairs if not r.exact}
    for layer in {r.layer for r in result.plan.repairs}:
        key = f"{layer}.weight_scale_2"
        assert (raw(fixed[key]) == raw(good[key])) or layer in inexact
    assert ("not_exact" in json.loads(meta[PROVENANCE_KEY])) == bool(inexact)


def test_unfixable_causes_are_refused_with_the_reason(tmp_path: Path, files: dict[str, Path]) -> None:
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["stale-scale"])
    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out, against=files["ref"])
    assert result.exit_code == 1 and not result.written and not out.exists()
    assert {u.finding.cause for u in result.plan.unfixable} == {"stale-scale"}
    assert all("nvdiag convert" in u.remedy for u in result.plan.unfixable)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["scale2-reciprocal"])
    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out, dry_run=True)
    assert result.exit_code == 0 and not out.exists()
    plan = result.plan.to_json()["repairs"]["scale2-reciprocal"]
    assert len(plan["layers"]) == 20 and "weight_scale_2" in plan["changes"][0]


def test_only_leaves_other_errors_so_nothing_is_written(tmp_path: Path) -> None:
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["scale2-reciprocal", "wrong-dtype"])
    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out, only={"scale2-reciprocal"})
    assert result.exit_code == 1 and not out.exists()
    assert {f.cause for f in result.plan.skipped} == {"wrong-dtype"}


def test_clean_file_needs_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    result = fix_checkpoint(files["good"], tmp_path / "fixed.safetensors")
    assert result.exit_code == 0 and not result.plan.repairs and not (tmp_path / "fixed.safetensors").exists()


def test_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["nibble-order", "wrong-dtype"])
    out = tmp_path / "fixed.safetensors"
    assert main(["fix", str(broken), str(out), "--only", "wrong-dtype", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["written"] and set(doc["plan"]["repairs"]) == {"wrong-dtype"}
    # OUT exists now: refused without --force, allowed with it
    assert main(["fix", str(broken), str(out), "--only", "wrong-dtype"]) == 2
    assert main(["fix", str(broken), str(out), "--only", "wrong-dtype", "--force"]) == 0
    # OUT may not be BROKEN, also through a symlink
    link = tmp_path / "link.safetensors"
    link.symlink_to(broken)
    before = sha(broken)
    assert main(["fix", str(broken), str(link), "--force"]) == 2
    assert sha(broken) == before
    assert main(["fix", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    assert main(["fix", str(broken), str(tmp_path / "y.safetensors"), "--only", "no-such-cause"]) == 2
    capsys.readouterr()


def test_cli_dry_run_text_names_causes_and_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = write_nvfp4_mixed(tmp_path / "broken.safetensors", VARIANT, faults=["weight-derived-input-scale"])
    assert main(["fix", str(broken), str(tmp_path / "fixed.safetensors"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "input-scale-implausible" in text and "blocks.0" in text and "would repair" in text
    assert not (tmp_path / "fixed.safetensors").exists()


def test_missing_fp8_markers_are_added_from_the_tensors(tmp_path: Path, files: dict[str, Path]) -> None:
    good = write_fp8_comfy(tmp_path / "good.safetensors", VARIANT)
    broken = write_fp8_comfy(tmp_path / "broken.safetensors", VARIANT, markers="none")
    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out)
    assert result.exit_code == 0 and result.written, result.verdict()
    assert_clean(out, files["ref"])
    expected, _ = read(good)
    fixed, meta = read(out)
    assert set(fixed) == set(expected)
    assert all(raw(fixed[k]) == raw(expected[k]) for k in expected)
    assert set(quant_layers(meta).values().__iter__().__next__().values()) == {"float8_e4m3fn"}
