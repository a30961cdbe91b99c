"""The compute path ComfyUI takes per quantized layer on Blackwell, from the marker's full_precision_matrix_mult.

A quantized layer runs W4A4 on Blackwell (activations quantized to 4 bits too) unless the marker ComfyUI loads says
`"full_precision_matrix_mult"` with a truthy value, then W4A16. These tests write the markers themselves (JSON bytes
in `.comfy_quant` tensors, entries of the header's `_quantization_metadata`) and check what `nvdiag inspect`, `diff`
and `lint` say about them through the command line, exit codes included. Expected values are worked out from the
bytes written here, the way ComfyUI reads them: `json.loads(bytes)`, then Python truthiness of the flag, and a
metadata entry replacing the tensor of the same layer (comfy/utils.py convert_old_quants).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inspect_tools.cli import main
from inspect_tools.synthetic import write_float, write_fp8_comfy, write_nvfp4_mixed, write_scaled_fp8_legacy

WAN = "wan2.2-ti2v-5b"
# narrower than the factory's default: every file here is written in a fraction of a second
DIMS = {"dim": 128, "ffn": 256, "text_dim": 128, "freq_dim": 128}
FLAG = "full_precision_matrix_mult"
QUANT_METADATA = "_quantization_metadata"


# --- writing markers by hand ----------------------------------------------------------------------------------


def marker_bytes(conf: dict[str, Any]) -> torch.Tensor:
    """A `.comfy_quant` tensor as ComfyUI writes it: the UTF-8 bytes of the JSON conf, uint8."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(path)), metadata


def rewrite(
    path: Path,
    tensor_confs: dict[str, dict[str, Any]] | None = None,
    metadata_confs: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Replace the `.comfy_quant` tensors and/or `_quantization_metadata` entries of the named layers."""
    tensors, metadata = read_file(path)
    for layer, conf in (tensor_confs or {}).items():
        tensors[f"{layer}.comfy_quant"] = marker_bytes(conf)
    if metadata_confs:
        parsed = json.loads(metadata[QUANT_METADATA])
        parsed["layers"].update(metadata_confs)
        metadata[QUANT_METADATA] = json.dumps(parsed)
    save_file(tensors, str(path), metadata=metadata)
    return path


def tensor_markers(path: Path) -> dict[str, dict[str, Any]]:
    """layer -> conf, decoded from the file's own `.comfy_quant` bytes (what ComfyUI's json.loads sees)."""
    tensors, _ = read_file(path)
    return {
        key.removesuffix(".comfy_quant"): json.loads(bytes(t.tolist()).decode("utf-8"))
        for key, t in tensors.items()
        if key.endswith(".comfy_quant")
    }


def blackwell_path(conf: dict[str, Any]) -> str:
    """What ComfyUI does with an NVFP4 conf: `layer_conf.get(FLAG, False)` tested for truthiness."""
    return "W4A16" if conf.get(FLAG, False) else "W4A4"


# --- running the command line ---------------------------------------------------------------------------------


Run = Callable[..., tuple[int, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """run("inspect", path, ...) -> (exit code, stdout); text tables wide enough not to wrap a row."""
    monkeypatch.setenv("COLUMNS", "200")

    def run_(*args: object) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().out

    return run_


def inspect_json(run: Run, path: Path) -> dict[str, Any]:
    code, out = run("inspect", path, "--format", "json")
    assert code == 0
    return json.loads(out)


def computes(doc: dict[str, Any]) -> dict[str, str | None]:
    return {layer["name"]: layer["compute"] for layer in doc["layers"]}


def table_cells(text: str, layer: str) -> list[str]:
    """The cells of the text table's row for `layer` (or of its header row: rich draws that one with "┃")."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if layer in cells:
            return cells
    raise AssertionError(f"no row for {layer} in:\n{text}")


def lint_findings(run: Run, path: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    code, out = run("lint", path, "--format", "json", *extra)
    return code, [f for f in json.loads(out)["findings"] if f["rule"] == "NV108"]


# --- files ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compute")


@pytest.fixture(scope="module")
def w4a4(root: Path) -> Path:
    """Every quantized layer marked {"format": "nvfp4"} only: W4A4 on Blackwell."""
    return write_nvfp4_mixed(root / "w4a4.safetensors", WAN, dims=DIMS)


@pytest.fixture(scope="module")
def w4a16(root: Path) -> Path:
    """Every marker says full_precision_matrix_mult: true."""
    return write_nvfp4_mixed(root / "w4a16.safetensors", WAN, dims=DIMS, full_precision_mm=True)


@pytest.fixture(scope="module")
def mixed(root: Path) -> Path:
    """The FFN layers flagged (the usual choice: their activations carry the outliers), attention left W4A4."""
    path = write_nvfp4_mixed(root / "mixed.safetensors", WAN, dims=DIMS)
    ffn = [layer for layer in tensor_markers(path) if ".ffn." in layer]
    return rewrite(path, tensor_confs={layer: {"format": "nvfp4", FLAG: True} for layer in ffn})


# --- inspect ------------------------------------------------------------------------------------------------------


def test_inspect_json_gives_each_quantized_layer_its_blackwell_compute_path(run: Run, mixed: Path) -> None:
    written = tensor_markers(mixed)
    doc = inspect_json(run, mixed)
    got = computes(doc)
    assert {name: got[name] for name in written} == {name: blackwell_path(conf) for name, conf in written.items()}
    # no marker: ComfyUI loads a plain weight, there is no quantized compute path
    assert all(path is None for name, path in got.items() if name not in written)
    flagged = sum(bool(conf.get(FLAG)) for conf in written.values())
    assert 0 < flagged < len(written)
    assert doc["summary"]["compute"] == {"W4A4": len(written) - flagged, "W4A16": flagged}


def test_inspect_text_has_a_compute_column_and_a_summary_line(run: Run, mixed: Path) -> None:
    written = tensor_markers(mixed)
    flagged = sum(bool(conf.get(FLAG)) for conf in written.values())
    code, out = run("inspect", mixed)
    assert code == 0
    assert f"compute on Blackwell: W4A4 {len(written) - flagged}, W4A16 {flagged}" in out
    # cells: layer, format, compute, dtype, ...
    assert table_cells(out, "blocks.0.ffn.0")[1:4] == ["blocks.0.ffn.0", "nvfp4", "W4A16"]
    assert table_cells(out, "blocks.0.self_attn.q")[1:4] == ["blocks.0.self_attn.q", "nvfp4", "W4A4"]
    assert table_cells(out, "blocks.0.norm3")[1:4] == ["blocks.0.norm3", "f32", "-"]  # kept F32: not quantized


def test_files_without_quantized_layers_have_no_compute_path(run: Run, root: Path) -> None:
    path = write_float(root / "f32.safetensors", WAN, dims=DIMS)
    doc = inspect_json(run, path)
    assert set(computes(doc).values()) == {None} and doc["summary"]["compute"] == {}
    code, out = run("inspect", path)
    assert code == 0 and "compute on Blackwell" not in out
    assert "compute" not in table_cells(out, "layer")  # the header row: no column of dashes


def test_fp8_layers_are_w8a8_and_legacy_scaled_fp8_follows_its_marker_length(run: Run, root: Path) -> None:
    fp8 = write_fp8_comfy(root / "fp8.safetensors", WAN, dims=DIMS)
    written = tensor_markers(fp8)
    assert {conf["format"] for conf in written.values()} == {"float8_e4m3fn"}
    assert inspect_json(run, fp8)["summary"]["compute"] == {"W8A8": len(written)}

    # Legacy files carry no per-layer marker: ComfyUI's convert_old_quants makes one per `.scale_weight` and turns
    # the flag on when the file-level `scaled_fp8` tensor has two elements.
    legacy = write_scaled_fp8_legacy(root / "legacy.safetensors", WAN, dims=DIMS, full_precision_matrix_mult=True)
    tensors, _ = read_file(legacy)
    assert tensors["scaled_fp8"].numel() == 2
    scaled = {key.removesuffix(".scale_weight") for key in tensors if key.endswith(".scale_weight")}
    got = computes(inspect_json(run, legacy))
    assert {name for name, path in got.items() if path is not None} == scaled
    assert {got[name] for name in scaled} == {"W8A16"}


def test_comfyui_runs_the_metadata_entry_when_it_disagrees_with_the_tensor(run: Run, root: Path) -> None:
    path = write_nvfp4_mixed(root / "both.safetensors", WAN, dims=DIMS, markers="both")
    rewrite(path, metadata_confs={"blocks.1.ffn.2": {"format": "nvfp4", FLAG: True}})
    assert FLAG not in tensor_markers(path)["blocks.1.ffn.2"]  # the tensor still says W4A4
    doc = inspect_json(run, path)
    layer = next(x for x in doc["layers"] if x["name"] == "blocks.1.ffn.2")
    assert layer["compute"] == "W4A16"
    assert layer["marker"]["source"] == "both" and layer["marker"]["metadata_conf"][FLAG] is True


# --- lint -----------------------------------------------------------------------------------------------------------


def test_boolean_flags_lint_clean(run: Run, w4a16: Path, mixed: Path) -> None:
    for path in (w4a16, mixed):
        code, found = lint_findings(run, path)
        assert code == 0 and found == []


def test_tensor_and_metadata_disagreeing_on_the_flag_is_a_warning(run: Run, root: Path) -> None:
    path = write_nvfp4_mixed(root / "disagree.safetensors", WAN, dims=DIMS, markers="both")
    rewrite(path, tensor_confs={"blocks.0.ffn.0": {"format": "nvfp4", FLAG: True}},
            metadata_confs={"blocks.0.ffn.2": {"format": "nvfp4", FLAG: True}})
    code, found = lint_findings(run, path)
    assert code == 0  # a warning stays below the default --fail-on error
    assert [(f["layer"], f["severity"], f["cause"]) for f in found] == [
        ("blocks.0.ffn.0", "warning", "invalid-quant-marker"),
        ("blocks.0.ffn.2", "warning", "invalid-quant-marker"),
    ]
    by_layer = {f["layer"]: f["evidence"] for f in found}
    # the metadata entry is what ComfyUI loads, whichever side carries the flag
    assert by_layer["blocks.0.ffn.0"]["compute"] == "W4A4" and by_layer["blocks.0.ffn.2"]["compute"] == "W4A16"
    assert lint_findings(run, path, "--fail-on", "warning")[0] == 1


@pytest.mark.parametrize(
    ("value", "read_as"),
    [("false", True), ("true", True), (1, True), (0, False), (None, False)],
)
def test_a_flag_that_is_not_a_json_boolean_is_an_error(run: Run, root: Path, value: Any, read_as: bool) -> None:
    path = write_nvfp4_mixed(root / f"flag_{value}.safetensors", WAN, dims=DIMS)
    rewrite(path, tensor_confs={"blocks.1.self_attn.k": {"format": "nvfp4", FLAG: value}})
    code, found = lint_findings(run, path)
    assert code == 1
    (finding,) = found
    assert (finding["layer"], finding["severity"], finding["cause"]) == (
        "blocks.1.self_attn.k", "error", "invalid-quant-marker")
    assert finding["evidence"]["value"] == value and finding["evidence"]["read_as"] is read_as
    # inspect shows what ComfyUI will run: Python truthiness, not what the writer probably meant
    expected = "W4A16" if read_as else "W4A4"
    assert computes(inspect_json(run, path))["blocks.1.self_attn.k"] == expected


def test_explain_says_which_marker_wins(run: Run) -> None:
    code, out = run("lint", "--explain", "NV108")
    assert code == 0
    words = " ".join(out.split())  # rich wraps the text
    assert "convert_old_quants" in words and "The metadata wins" in words and "truthiness" in words


# --- diff -----------------------------------------------------------------------------------------------------------


def d142(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["rule"] == "D142"]


def test_diff_warns_where_mine_runs_w4a4_and_ref_w4a16(run: Run, w4a4: Path, mixed: Path) -> None:
    flagged = {name for name, conf in tensor_markers(mixed).items() if conf.get(FLAG)}
    code, out = run("diff", w4a4, mixed, "--format", "json")
    doc = json.loads(out)
    assert code == 0  # warnings only
    found = d142(doc)
    assert {f["layer"] for f in found} == flagged
    assert {(f["severity"], f["cause"]) for f in found} == {("warning", "activation-sensitive-w4a4")}
    assert doc["precision_plan"]["compute"]["ref"]["W4A16"] == len(flagged)
    assert "W4A16" not in doc["precision_plan"]["compute"]["mine"]
    assert run("diff", w4a4, mixed, "--fail-on", "warning")[0] == 1


def test_diff_the_other_way_round_is_only_information(run: Run, w4a4: Path, w4a16: Path) -> None:
    n = len(tensor_markers(w4a16))
    code, out = run("diff", w4a16, w4a4, "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["summary"]["warnings"] == 0
    assert len(d142(doc)) == n and {f["severity"] for f in d142(doc)} == {"info"}
    row = next(r for r in doc["layers"] if r["name"] == "blocks.0.ffn.0")
    assert (row["mine"]["compute"], row["ref"]["compute"]) == ("W4A16", "W4A4")


def test_diff_text_counts_w4a16_layers_in_the_precision_plan(run: Run, w4a4: Path, w4a16: Path) -> None:
    n = len(tensor_markers(w4a16))
    code, out = run("diff", w4a4, w4a16)
    assert code == 0
    assert table_cells(out, "computed W4A16 on Blackwell")[2:4] == ["0", str(n)]
    assert table_cells(out, "computed W4A4 on Blackwell")[2:4] == [str(n), "0"]
    assert "compute MINE W4A4, REF W4A16" in out  # the layers-that-differ table names the difference


def test_identical_flags_give_no_compute_finding(run: Run, w4a16: Path) -> None:
    code, out = run("diff", w4a16, w4a16, "--format", "json")
    assert code == 0 and d142(json.loads(out)) == []
