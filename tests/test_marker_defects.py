"""Marker defects seen in published files (issue 16): each is named by lint with what ComfyUI does, fix repairs it
losslessly, and ComfyUI itself refuses the broken file and loads the fixed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converter.fix import fix_checkpoint
from inspect_tools.comfyui.loading import load
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.synthetic.writers import write_fp8_comfy, write_nvfp4_mixed
from reference_specs.findings import Severity

VARIANT = "wan2.2-ti2v-5b"
LAYER = "blocks.0.self_attn.q"
PLAIN = "head.head"  # kept at source precision by the synthetic selection

# what published files hold instead of a marker: Comfy-Org/ComfyUI#16472 (empty), #15567 (NUL bytes), #15400
# (JSON without "format"); the bytes a loader reads, written as the publishers' tools wrote them
PAYLOADS = {
    "empty": torch.zeros(0, dtype=torch.uint8),
    "all-zero": torch.zeros(19, dtype=torch.uint8),  # len('{"format": "nvfp4"}'): a marker zeroed in place
    "no-format": torch.tensor(list(b'{"full_precision_matrix_mult": true}'), dtype=torch.uint8),
}


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def with_marker(good: Path, out: Path, layer: str, payload: torch.Tensor) -> Path:
    tensors, metadata = read(good)
    tensors[f"{layer}.comfy_quant"] = payload.clone()
    save_file(tensors, str(out), metadata)
    return out


def errors(path: Path) -> list:
    with open_model(path) as model:
        return [f for f in lint_model(model) if f.severity >= Severity.ERROR]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nvfp4_mixed(tmp_path_factory.mktemp("markers") / "good.safetensors", VARIANT)


@pytest.mark.parametrize("defect", sorted(PAYLOADS))
def test_a_broken_marker_on_a_quantized_layer_is_rebuilt_from_its_tensors(defect: str, good: Path,
                                                                         tmp_path: Path) -> None:
    broken = with_marker(good, tmp_path / "broken.safetensors", LAYER, PAYLOADS[defect])
    (finding,) = errors(broken)
    assert (finding.rule, finding.cause, finding.layer) == ("NV110", "invalid-quant-marker", LAYER)
    assert finding.evidence["defect"] == defect and finding.evidence["quantized"]

    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out)
    assert result.written and result.exit_code == 0, result.verdict()
    assert errors(out) == []
    fixed, _ = read(out)
    expected, _ = read(good)
    assert set(fixed) == set(expected)
    conf = json.loads(fixed[f"{LAYER}.comfy_quant"].numpy().tobytes())
    # the format the tensors prove; a format-less conf keeps what else it said
    assert conf == ({"format": "nvfp4", "full_precision_matrix_mult": True} if defect == "no-format"
                    else {"format": "nvfp4"})
    assert all(torch.equal(fixed[k], expected[k]) for k in expected if not k.endswith(".comfy_quant"))


@pytest.mark.parametrize("defect", ["empty", "all-zero"])
def test_a_placeholder_on_a_plain_layer_is_removed(defect: str, comfyui, good: Path, tmp_path: Path) -> None:
    """#16472: an int8 ConvRot text encoder's embedding, not quantized, carried an empty marker; #15410: unquantized
    layers carrying NUL placeholders. ComfyUI refuses both; without the placeholder it loads the plain weight."""
    broken = with_marker(good, tmp_path / "broken.safetensors", PLAIN, PAYLOADS[defect])
    (finding,) = errors(broken)
    assert finding.rule == "NV110" and not finding.evidence["quantized"]
    assert not load(comfyui, broken).report.loaded
    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out)
    assert result.written and result.exit_code == 0, result.verdict()
    fixed, _ = read(out)
    assert set(fixed) == set(read(good)[0])
    report = load(comfyui, out).report
    assert report.loaded and PLAIN not in report.quantized_layers and len(report.quantized_layers) == 20


@pytest.mark.parametrize("defect", sorted(PAYLOADS))
def test_comfyui_refuses_the_broken_file_and_loads_the_fixed_one(defect: str, comfyui, good: Path,
                                                                 tmp_path: Path) -> None:
    broken = with_marker(good, tmp_path / "broken.safetensors", LAYER, PAYLOADS[defect])
    refused = load(comfyui, broken).report
    assert not refused.loaded
    assert refused.error_type in ({"ValueError"} if defect == "no-format" else {"JSONDecodeError",
                                                                                  "UnicodeDecodeError"})
    out = tmp_path / "fixed.safetensors"
    assert fix_checkpoint(broken, out).written
    fixed, reference = load(comfyui, out).report, load(comfyui, good).report
    assert fixed.loaded, fixed.error
    assert len(reference.quantized_layers) == 20  # every NVFP4 layer of the synthetic file, held quantized
    assert fixed.quantized_layers == reference.quantized_layers and fixed.left_over == []


# the two spellings seen: one extra pair around the object, and every brace doubled (an unformatted template)
DOUBLED = {
    "outer": lambda text: "{" + text + "}",
    "every": lambda text: text.replace("{", "{{").replace("}", "}}"),
}


@pytest.fixture(scope="module")
def good_metadata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nvfp4_mixed(tmp_path_factory.mktemp("markers") / "good_metadata.safetensors", VARIANT,
                             markers="metadata")


def double_braced(good: Path, out: Path, spelling: str) -> Path:
    tensors, metadata = read(good)
    metadata["_quantization_metadata"] = DOUBLED[spelling](metadata["_quantization_metadata"])
    save_file(tensors, str(out), metadata)
    return out


@pytest.mark.parametrize("spelling", sorted(DOUBLED))
def test_double_braced_metadata_is_unwrapped(spelling: str, good_metadata: Path, tmp_path: Path) -> None:
    broken = double_braced(good_metadata, tmp_path / "broken.safetensors", spelling)
    found = errors(broken)
    (named,) = [f for f in found if f.rule == "NV111"]
    assert named.layer is None and named.evidence["defect"] == "double-braces"
    assert "NV104" not in {f.rule for f in found}  # one finding for one defect: NV111 says what NV104 would

    out = tmp_path / "fixed.safetensors"
    result = fix_checkpoint(broken, out)
    assert result.written and result.exit_code == 0, result.verdict()
    assert errors(out) == []
    fixed, fixed_meta = read(out)
    expected, expected_meta = read(good_metadata)
    assert set(fixed) == set(expected)  # no tensor markers added: the metadata marks the layers again
    assert json.loads(fixed_meta["_quantization_metadata"]) == json.loads(expected_meta["_quantization_metadata"])


@pytest.mark.parametrize("spelling", sorted(DOUBLED))
def test_comfyui_refuses_double_braces_and_loads_the_unwrapped_file(spelling: str, comfyui, good_metadata: Path,
                                                                   tmp_path: Path) -> None:
    broken = double_braced(good_metadata, tmp_path / "broken.safetensors", spelling)
    refused = load(comfyui, broken).report
    assert not refused.loaded and refused.error_type == "JSONDecodeError"
    out = tmp_path / "fixed.safetensors"
    assert fix_checkpoint(broken, out).written
    fixed, reference = load(comfyui, out).report, load(comfyui, good_metadata).report
    assert fixed.loaded, fixed.error
    assert len(reference.quantized_layers) == 20  # every NVFP4 layer of the synthetic file, held quantized
    assert fixed.quantized_layers == reference.quantized_layers and fixed.left_over == []


def test_scales_without_any_marker_are_dropped_by_comfyui_until_fix_adds_the_markers(comfyui, tmp_path: Path) -> None:
    """LTX-2.5's official quantized file (issue 16, ComfyUI#15511): scale tensors, no marker anywhere. ComfyUI
    loads it without complaint, holds every layer as a plain weight and throws the scales away."""
    broken = write_fp8_comfy(tmp_path / "broken.safetensors", VARIANT, markers="none")
    assert {f.rule for f in errors(broken)} == {"NV103"}
    silent = load(comfyui, broken).report
    assert silent.loaded and silent.quantized_layers == {}
    assert len(silent.unexpected) == 20 and all(k.endswith(".weight_scale") for k in silent.unexpected)

    out = tmp_path / "fixed.safetensors"
    assert fix_checkpoint(broken, out).written
    fixed = load(comfyui, out).report
    assert fixed.loaded and set(fixed.quantized_layers.values()) == {"float8_e4m3fn"}
    assert len(fixed.quantized_layers) == 20 and fixed.unexpected == []


def test_a_metadata_entry_of_the_same_name_saves_the_layer_in_comfyui(comfyui, tmp_path: Path) -> None:
    """ComfyUI 0.8.0's convert_old_quants writes the metadata's conf over the tensor: the file loads, so the broken
    tensor is a warning (loaders that read the tensor still fail), and fix still rebuilds it."""
    good = write_nvfp4_mixed(tmp_path / "good.safetensors", VARIANT, markers="both")
    broken = with_marker(good, tmp_path / "broken.safetensors", LAYER, PAYLOADS["all-zero"])
    with open_model(broken) as model:
        (finding,) = [f for f in lint_model(model) if f.rule == "NV110"]
    assert finding.severity == Severity.WARNING and finding.evidence["replaced_by_metadata"]
    assert errors(broken) == []
    assert load(comfyui, broken).report.loaded

    out = tmp_path / "fixed.safetensors"
    assert fix_checkpoint(broken, out).written
    fixed, _ = read(out)
    assert json.loads(fixed[f"{LAYER}.comfy_quant"].numpy().tobytes()) == {"format": "nvfp4"}
