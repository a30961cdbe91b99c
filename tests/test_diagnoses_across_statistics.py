"""Diagnoses that hold on weights of every statistic, not only on the project's own generator.

For each weight statistic of the fixture family (inspect_tools/synthetic/values.STATISTICS: structured, Gaussian,
uniform, Student-t, per-head, weak and strong column outliers, all-equal block scales), an NVFP4 file with each
injected fault (and the faults real files combine) is checked by roundtrip against the FP32 source and against the
lower-precision references a ComfyUI user has: FP16, FP8 and GGUF Q4_0.

What is expected comes from comfy-kitchen, not from nvdiag's thresholds: a fault is expected to be found on a layer
exactly when comfy-kitchen decodes that layer of the faulty file differently from the correct file (a layout fault
on all-equal block scales changes no value, so it is no fault there).
"""

from __future__ import annotations

import functools

import comfy_kitchen as ck
import pytest
import torch

from converter.fix import fix_checkpoint
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.roundtrip import run_roundtrip
from inspect_tools.synthetic import (
    float_state_dict,
    nvfp4_mixed_plan,
    save_safetensors,
    write_float,
    write_fp8_comfy,
)
from inspect_tools.synthetic.gguf_files import write_gguf
from inspect_tools.synthetic.values import STATISTICS
from reference_specs.findings import Severity

VARIANT = "wan2.2-ti2v-5b"
LAYERS = ("blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.0.ffn.0")
FAULT_SETS = (
    (),
    ("scale-layout-linear",),
    ("nibble-order",),
    ("scale2-reciprocal",),
    ("scale-layout-linear", "nibble-order"),  # a hand-renamed ModelOpt export
    ("scale-layout-linear", "nibble-order", "scale2-reciprocal"),
)
REFERENCES = ("f32", "f16", "fp8", "q4_0")


def chosen(base: str) -> bool:
    return base in LAYERS


def ck_decode(tensors: dict[str, torch.Tensor], base: str) -> torch.Tensor:
    """comfy-kitchen's decode of one layer, as ComfyUI would run it."""
    return ck.dequantize_nvfp4(tensors[f"{base}.weight"], tensors[f"{base}.weight_scale_2"],
                               tensors[f"{base}.weight_scale"], torch.float32)


@functools.cache
def faults_comfy_kitchen_sees(statistic: str, faults: tuple[str, ...]) -> frozenset[tuple[str, str]]:
    """(layer, fault) pairs where the fault alone changes what comfy-kitchen decodes."""
    clean = nvfp4_mixed_plan(VARIANT, selection=chosen, statistic=statistic).tensors
    seen = set()
    for fault in faults:
        broken = nvfp4_mixed_plan(VARIANT, selection=chosen, statistic=statistic, faults=(fault,)).tensors
        seen |= {(base, fault) for base in LAYERS if not torch.equal(ck_decode(clean, base), ck_decode(broken, base))}
    return frozenset(seen)


@pytest.fixture(scope="module", params=list(STATISTICS))
def family(request, tmp_path_factory):
    """One statistic: its references and one NVFP4 file per fault set."""
    stat, folder = request.param, tmp_path_factory.mktemp(request.param)
    refs = {
        "f32": write_float(folder / "f32.safetensors", VARIANT, statistic=stat),
        "f16": write_float(folder / "f16.safetensors", VARIANT, dtype=torch.float16, statistic=stat),
        "fp8": write_fp8_comfy(folder / "fp8.safetensors", VARIANT, selection=chosen, statistic=stat),
        "q4_0": write_gguf(folder / "q4_0.gguf", VARIANT, statistic=stat),
    }
    files = {}
    for faults in FAULT_SETS:
        tensors, metadata = nvfp4_mixed_plan(VARIANT, selection=chosen, statistic=stat, faults=faults).finish()
        files[faults] = save_safetensors(tensors, folder / f"{'+'.join(faults) or 'correct'}.safetensors", metadata)
    return stat, refs, files


@pytest.mark.parametrize("reference", REFERENCES)
def test_every_fault_is_found_and_correct_files_are_never_flagged(family, reference) -> None:
    stat, refs, files = family
    for faults, path in files.items():
        found = {(f.layer, f.cause) for f in run_roundtrip(path, refs[reference]).findings}
        assert found == faults_comfy_kitchen_sees(stat, faults), (stat, reference, faults)


def test_fix_with_the_source_repairs_combined_faults_to_what_comfy_kitchen_decodes(family, tmp_path) -> None:
    stat, refs, files = family
    broken = files[("scale-layout-linear", "nibble-order")]
    result = fix_checkpoint(broken, tmp_path / "fixed.safetensors", against=refs["f32"])
    seen = faults_comfy_kitchen_sees(stat, ("scale-layout-linear", "nibble-order"))
    if not seen:
        return
    assert result.exit_code == 0 and result.written, result.verdict()
    correct = nvfp4_mixed_plan(VARIANT, selection=chosen, statistic=stat).tensors
    with open_model(tmp_path / "fixed.safetensors") as fixed:
        assert [f for f in lint_model(fixed) if f.severity >= Severity.ERROR] == []
        for base in LAYERS:
            layer = fixed.layers[base]
            stored = {role: layer.load(role) for role in ("weight", "weight_scale", "weight_scale_2")}
            assert torch.equal(ck_decode({f"{base}.{r}": t for r, t in stored.items()}, base),
                               ck_decode(correct, base))


def test_a_reference_with_rescaled_rows_is_not_blamed_on_the_file(family, tmp_path) -> None:
    """REF = the source with every row of the quantized layers multiplied by its own factor (a re-normalised copy):
    the correct file must not be called broken; roundtrip says REF disagrees, as a warning."""
    stat, _, files = family
    source = float_state_dict(VARIANT, statistic=stat)
    gen = torch.Generator().manual_seed(5)
    for base in LAYERS:
        weight = source[f"{base}.weight"]
        source[f"{base}.weight"] = weight * torch.exp2(torch.rand(weight.shape[0], 1, generator=gen) * 2 - 1)
    ref = save_safetensors(source, tmp_path / "rescaled.safetensors")
    result = run_roundtrip(files[()], ref)
    assert [f for f in result.findings if f.severity >= Severity.ERROR] == []
    assert {f.cause for f in result.findings} <= {"reference-mismatch"}
    assert result.wrong == []


def test_lint_never_passes_silently_on_the_layout_question(family) -> None:
    """Without a reference lint either decides the layout (no false alarm on a correct file) or says it cannot."""
    _, _, files = family
    for faults in ((), ("scale-layout-linear",)):
        with open_model(files[faults]) as model:
            probe = [f for f in lint_model(model) if f.rule == "NV204"]
        if faults:
            assert len(probe) == 1 and (probe[0].severity == Severity.ERROR or probe[0].evidence["verdict"] ==
                                        "inconclusive")
        else:
            assert all(f.severity == Severity.INFO for f in probe)
