"""A diffusers model folder converts in one command: WAN 2.2 A14B's two experts (transformer/ = high noise,
transformer_2/ = low noise, diffusers WanPipeline) into OUT_high_noise / OUT_low_noise, one preset each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from inspect_tools.cli import main
from inspect_tools.layers import open_model
from inspect_tools.readers import open_checkpoint
from inspect_tools.synthetic import write_model_folder

A14B = "wan2.2-t2v-a14b"


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("wan") / "Wan2.2-T2V-A14B-Diffusers", A14B, experts=2)


def provenance(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["nvdiag"])


def source_tensor(folder: Path, name: str) -> torch.Tensor:
    with open_checkpoint(folder) as reader:
        return reader.load(name)


def test_two_experts_two_outputs_from_their_own_weights(wan_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "wan22_t2v_nvfp4.safetensors"
    assert main(["convert", str(wan_folder), str(out), "--preset", A14B]) == 0
    text = capsys.readouterr().out
    assert "high noise expert" in text and "low noise expert" in text
    assert not out.exists()
    for label, folder in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        written = tmp_path / f"wan22_t2v_nvfp4_{label}.safetensors"
        with open_model(written) as model:
            assert model.detection.variant == A14B and model.detection.naming == "native"
        with safe_open(str(written), "pt") as f:
            kept = f.get_tensor("head.modulation")  # F32 in the preset: the source's values exactly
        assert torch.equal(kept, source_tensor(wan_folder / folder, "scale_shift_table"))
        assert provenance(written)["preset"] == A14B


def test_one_preset_per_expert(wan_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "wan.safetensors"
    assert main(["convert", str(wan_folder), str(out), "--preset", A14B, "--preset", "smart"]) == 0
    assert provenance(tmp_path / "wan_high_noise.safetensors")["preset"] == A14B
    assert provenance(tmp_path / "wan_low_noise.safetensors")["preset"] == "smart"


def test_json_is_one_document_with_both_experts(wan_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "wan.safetensors"
    assert main(["convert", str(wan_folder), str(out), "--preset", A14B, "--dry-run", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [e["expert"] for e in doc["experts"]] == ["high_noise", "low_noise"]
    assert [Path(e["convert"]["out"]).name for e in doc["experts"]] == ["wan_high_noise.safetensors",
                                                                       "wan_low_noise.safetensors"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", A14B, "--preset", A14B, "--preset", A14B], "3 --preset options for 2 experts"),
])
def test_preset_count_must_fit(wan_folder: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert main(["convert", str(wan_folder), str(tmp_path / "o.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_existing_output_stops_the_run_before_any_work(wan_folder: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "wan_low_noise.safetensors").write_bytes(b"mine")
    assert main(["convert", str(wan_folder), str(tmp_path / "wan.safetensors"), "--preset", A14B]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan_low_noise.safetensors"]


def test_a_single_transformer_folder_writes_out_itself(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "Wan2.2-TI2V-5B-Diffusers", "wan2.2-ti2v-5b")
    out = tmp_path / "ti2v.safetensors"
    assert main(["convert", str(folder), str(out), "--preset", "wan2.2-ti2v-5b"]) == 0
    assert out.exists()
    assert main(["convert", str(folder), str(out), "--preset", "smart", "--preset", "smart", "--force"]) == 2


def test_a_low_noise_expert_alone_is_refused(wan_folder: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "half"
    (folder / "transformer_2").mkdir(parents=True)
    assert main(["convert", str(folder), str(tmp_path / "o.safetensors"), "--preset", A14B]) == 2
    assert "no transformer/" in capsys.readouterr().err


def test_other_commands_point_into_the_model_folder(wan_folder: Path, capsys) -> None:
    assert main(["inspect", str(wan_folder)]) == 2
    err = capsys.readouterr().err
    assert "a diffusers model folder: name its transformer/ or transformer_2/" in err
    assert main(["inspect", str(wan_folder / "transformer_2")]) == 0


def test_comfyui_loads_each_expert(comfyui, wan_folder: Path, tmp_path: Path) -> None:
    from inspect_tools.comfyui.loading import load

    out = tmp_path / "wan.safetensors"
    assert main(["convert", str(wan_folder), str(out), "--preset", A14B]) == 0
    for label in ("high_noise", "low_noise"):
        report = load(comfyui, tmp_path / f"wan_{label}.safetensors").report
        assert report.loaded, report.error
        assert (report.config["in_dim"], report.config["out_dim"]) == (16, 16) and report.quantized.get("nvfp4")
