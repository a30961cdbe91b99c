"""The scale-layout probe (NV204): structured weights reveal the layout, i.i.d. weights give no verdict."""

from __future__ import annotations

from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch

from inspect_tools.lint import LintConfig, lint_paths
from inspect_tools.synthetic import marker_tensor, save_safetensors
from inspect_tools.synthetic.values import linear_weight
from reference_specs.findings import Severity
from reference_specs.formats.nvfp4 import NVFP4, unswizzle
from reference_specs.rules.scale_layout import structure_score

SMALL_SHAPES = [(128, 128), (256, 256), (96, 320), (256, 1024), (1024, 256)]


def weights(shape: tuple[int, int], structured: bool, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return linear_weight(shape, gen) if structured else torch.randn(shape, generator=gen)


def write_layers(path: Path, layers: list[tuple[torch.Tensor, bool]]) -> Path:
    """One NVFP4 layer per (weight, linear_layout); linear layers get row-major (unswizzled) padded scales."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (w, linear) in enumerate(layers):
        stored = NVFP4().quantize(w)
        if linear:
            stored["weight_scale"] = unswizzle(stored["weight_scale"])
        tensors |= {f"layers.{i}.{role}": t for role, t in stored.items()}
        tensors[f"layers.{i}.comfy_quant"] = marker_tensor({"format": "nvfp4"})
    return save_safetensors(tensors, path)


def probe_findings(path: Path) -> list:
    return lint_paths([path], LintConfig(select=["NV204"])).findings


def test_structure_score_separates_structure_from_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    rows, cols = torch.randn(256, 1, generator=gen), torch.randn(1, 64, generator=gen)
    additive = torch.exp2(rows + cols + 0.1 * torch.randn(256, 64, generator=gen))
    assert structure_score(additive) > 0.9
    assert abs(structure_score(torch.rand(256, 64, generator=gen) + 0.1)) < 0.05
    assert structure_score(torch.ones(256, 64)) is None  # no variance: no opinion
    assert structure_score(torch.zeros(256, 64)) is None  # no valid (positive) scales


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_single_structured_layer_in_linear_layout_is_caught(shape: tuple[int, int], tmp_path: Path) -> None:
    w = weights(shape, structured=True)
    (finding,) = probe_findings(write_layers(tmp_path / "lin.safetensors", [(w, True)]))
    assert finding.rule == "NV204" and finding.cause == "scale-layout-linear"
    assert finding.evidence["verdict"] == "linear" and finding.evidence["layers_favouring_linear"] == 1
    score = finding.evidence["scores"][0]
    assert score["linear"] > score["swizzled"] + 0.1


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_single_structured_layer_in_swizzled_layout_passes(shape: tuple[int, int], tmp_path: Path) -> None:
    assert probe_findings(write_layers(tmp_path / "swz.safetensors", [(weights(shape, True), False)])) == []


UNPADDED_SHAPES = [(128, 128), (256, 256), (256, 1024), (1024, 256)]  # scale matrices need no padding slot


def says_undeterminable(findings: list) -> bool:
    """lint's answer when it cannot tell: one info finding pointing at roundtrip, never a silent pass."""
    return (len(findings) == 1 and findings[0].severity == Severity.INFO and findings[0].evidence["verdict"] ==
            "inconclusive" and "nvdiag roundtrip" in findings[0].message)


@pytest.mark.parametrize("linear", [False, True])
def test_iid_weights_without_padding_are_said_to_be_undeterminable(linear: bool, tmp_path: Path) -> None:
    layers = [(weights(shape, structured=False, seed=i), linear) for i, shape in enumerate(UNPADDED_SHAPES)]
    assert says_undeterminable(probe_findings(write_layers(tmp_path / "iid.safetensors", layers)))


def test_one_tile_column_is_undeterminable(tmp_path: Path) -> None:
    """in=64 gives 4 scale columns: the two readings differ by a row permutation only, so no layer is scored."""
    path = write_layers(tmp_path / "narrow.safetensors", [(weights((256, 64), True), True)])
    assert says_undeterminable(probe_findings(path))


PADDED_SHAPES = [(96, 320), (200, 72), (300, 1000)]  # rows not a multiple of 128, or in/16 not a multiple of 4
def _per_head(g: torch.Generator, shape: tuple[int, int]) -> torch.Tensor:
    gains = torch.exp(torch.randn(shape[0] // 8 + 1, generator=g)).repeat_interleave(8)[: shape[0], None]
    return torch.randn(shape, generator=g) * gains


STATISTICS_WITHOUT_STRUCTURE = {
    "gaussian": lambda g, shape: torch.randn(shape, generator=g),
    "uniform": lambda g, shape: torch.rand(shape, generator=g) * 2 - 1,
    "per-head": _per_head,
}


@pytest.mark.parametrize("stat", STATISTICS_WITHOUT_STRUCTURE)
@pytest.mark.parametrize("shape", PADDED_SHAPES)
def test_padding_slots_decide_the_layout_whatever_the_weights(stat: str, shape: tuple[int, int],
                                                              tmp_path: Path) -> None:
    """comfy-kitchen pads the swizzled scales with zeros: only the right reading has zero padding slots."""
    w = STATISTICS_WITHOUT_STRUCTURE[stat](torch.Generator().manual_seed(3), shape)
    qdata, block = ck.quantize_nvfp4(w, w.abs().amax() / 2688, pad_16x=True)
    for linear in (False, True):
        tensors = {"layers.0.weight": qdata, "layers.0.weight_scale_2": (w.abs().amax() / 2688).reshape(()),
                   "layers.0.weight_scale": unswizzle(block) if linear else block,
                   "layers.0.comfy_quant": marker_tensor({"format": "nvfp4"})}
        findings = probe_findings(save_safetensors(tensors, tmp_path / f"{linear}.safetensors"))
        if linear:
            (finding,) = findings
            assert finding.severity == Severity.ERROR and finding.evidence["basis"] == "padding"
        else:
            assert findings == []


def test_aggregate_evidence_over_many_layers(tmp_path: Path) -> None:
    layers = [(weights((256, 256), True, seed=i), True) for i in range(5)]
    layers += [(weights((256, 256), False, seed=9), True)]  # one featureless layer does not sway the verdict
    (finding,) = probe_findings(write_layers(tmp_path / "many.safetensors", layers))
    ev = finding.evidence
    assert ev["layers_scored"] == 6 and ev["layers_favouring_linear"] == 5 and ev["layers_favouring_swizzled"] == 0
    assert ev["median_difference"] < -0.1


def test_wan_fixture_with_linear_scales(make_checkpoint) -> None:
    path = make_checkpoint("nvfp4-mixed", faults=("scale-layout-linear",), name="wan_linear_scales")
    (finding,) = probe_findings(path)
    assert finding.evidence["layers_scored"] == 16 and finding.evidence["layers_favouring_linear"] >= 14
