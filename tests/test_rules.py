"""Every lint rule on a failing and a passing checkpoint, built with the synthetic factory's fault injection
(or, for faults it has no name for, by editing a plan before it is written)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import comfy_kitchen as ck
import pytest
import torch

from inspect_tools.lint import LintConfig, lint_paths
from inspect_tools.synthetic import apply_faults, marker_tensor, nvfp4_mixed_plan, save_safetensors
from inspect_tools.synthetic.mixed import MixedPlan
from reference_specs.findings import Finding, Severity
from reference_specs.rules import RULES, get_rule, rules_for

WAN = "wan2.2-ti2v-5b"
FFN_UP = "blocks.0.ffn.0"  # [ffn 512, dim 256] in the scaled-down WAN: non-square
ATTN_Q = "blocks.0.self_attn.q"


def rules_at(findings: list[Finding], severity: Severity = Severity.WARNING) -> set[str]:
    return {f.rule for f in findings if f.severity >= severity}


def lint(path: Path, **config: object) -> list[Finding]:
    return lint_paths([path], LintConfig(**config)).findings  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base_plan() -> MixedPlan:
    """The good WAN NVFP4 mixed plan, quantized once; each test writes a modified copy."""
    return nvfp4_mixed_plan(WAN)


@pytest.fixture
def write_plan(base_plan: MixedPlan, tmp_path: Path) -> Callable[..., Path]:
    """write_plan(*faults, edit=None, **plan_fields) -> path of the written variant of the good plan."""

    def write(*faults: str, edit: Callable[[MixedPlan], None] | None = None, **fields: object) -> Path:
        plan = dataclasses.replace(
            base_plan, tensors=dict(base_plan.tensors), quantized=list(base_plan.quantized),
            targets=list(base_plan.targets), **fields,
        )
        apply_faults(plan, faults)
        if edit is not None:
            edit(plan)
        tensors, metadata = plan.finish()
        return save_safetensors(tensors, tmp_path / "model.safetensors", metadata)

    return write


# ---- good files of every kind -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fixture", ["wan_nvfp4_mixed", "wan_float", "wan_fp8_comfy", "wan_gguf_q4_0", "qwen_nvfp4_mixed",
                "flux_nvfp4_mixed"],
)
def test_good_files_have_no_findings(fixture: str, request: pytest.FixtureRequest) -> None:
    assert lint(request.getfixturevalue(fixture)) == []


def test_legacy_scaled_fp8_is_only_an_info(wan_scaled_fp8: Path) -> None:
    findings = lint(wan_scaled_fp8)
    assert [(f.rule, f.severity) for f in findings] == [("NV304", Severity.INFO)]
    assert findings[0].evidence["scaled_fp8_marker"] is True


def test_comfy_kitchen_made_file_lints_clean(tmp_path: Path) -> None:
    """comfy-kitchen as the independent oracle: its quantizer + amax/2688 + markers is what ComfyUI loads."""
    gen = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    for i, (out_f, in_f) in enumerate([(256, 256), (512, 256), (200, 96)]):
        w = torch.randn(out_f, in_f, generator=gen) * torch.exp(0.5 * torch.randn(in_f, generator=gen))
        scale_2 = (w.abs().amax() / 2688.0).reshape(())
        q, scales = ck.quantize_nvfp4(w, scale_2, pad_16x=True)
        base = f"layers.{i}.linear"
        tensors |= {f"{base}.weight": q, f"{base}.weight_scale": scales, f"{base}.weight_scale_2": scale_2,
                    f"{base}.comfy_quant": marker_tensor({"format": "nvfp4"}), f"{base}.bias": torch.zeros(out_f)}
    path = save_safetensors(tensors, tmp_path / "ck.safetensors")
    assert rules_at(lint(path), Severity.ERROR) == set()
    assert rules_at(lint(path)) == {"NV303"}  # a made-up architecture: the only warning


# ---- one fault, one rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("missing-block-scale", {"NV101"}),
        ("missing-tensor-scale", {"NV102"}),
        ("missing-quant-marker", {"NV103"}),
        ("metadata-prefix", {"NV103", "NV104"}),  # the misnamed metadata marks nothing: both causes show
        ("wrong-dtype", {"NV105"}),
        ("scale2-reciprocal", {"NV201"}),
        ("non-finite-scale", {"NV202"}),
        ("weight-derived-input-scale", {"NV203"}),
        ("scale-layout-linear", {"NV204"}),
        ("sensitive-layer-quantized", {"NV301"}),
        ("diffusers-key-names", {"NV302"}),
    ],
)
def test_each_fault_is_named_by_its_rule(fault: str, expected: set[str], write_plan: Callable[..., Path]) -> None:
    findings = lint(write_plan(fault))
    assert rules_at(findings) == expected
    assert all(f.cause == get_rule(f.rule).cause for f in findings)


def test_metadata_prefix_finding_suggests_the_spelling_that_matches(write_plan: Callable[..., Path]) -> None:
    (finding,) = [f for f in lint(write_plan("metadata-prefix")) if f.rule == "NV104"]
    assert finding.evidence["count"] == 20
    assert finding.evidence["prefix_fixes"]["transformer." + ATTN_Q] == ATTN_Q


def test_metadata_markers_without_tensors_are_fine(write_plan: Callable[..., Path]) -> None:
    assert lint(write_plan(markers="metadata")) == []
    assert lint(write_plan(markers="both")) == []


def test_wrong_dtype_evidence_says_expected_and_found(write_plan: Callable[..., Path]) -> None:
    findings = [f for f in lint(write_plan("wrong-dtype")) if f.layer == ATTN_Q]
    assert {(f.evidence["role"], f.evidence["found"]) for f in findings} == {
        ("weight_scale", "BF16"), ("weight_scale_2", "F16")}
    assert all(f.evidence["expected"][0] in ("F8_E4M3", "F32") for f in findings)


def test_signed_byte_weight_is_a_wrong_dtype(write_plan: Callable[..., Path]) -> None:
    def to_int8(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".weight"] = plan.tensors[ATTN_Q + ".weight"].view(torch.int8)

    (finding,) = lint(write_plan(edit=to_int8))
    assert (finding.rule, finding.layer, finding.evidence["found"]) == ("NV105", ATTN_Q, "I8")


# ---- markers ------------------------------------------------------------------------------------------------

def _marker(plan: MixedPlan, tensor: torch.Tensor) -> None:
    plan.markers = "none"
    for base in plan.quantized:
        plan.tensors[base + ".comfy_quant"] = tensor.clone()


@pytest.mark.parametrize(
    ("tensor", "rule", "words"),
    [
        (marker_tensor({"format": "nvfp5"}), "NV104", "not one ComfyUI knows"),
        # no "format" at all is a defect of published files (#15400): NV110 names it, fix rebuilds it
        (marker_tensor({"group_size": 16}), "NV110", 'has no "format"'),
        (torch.tensor(list(b'{"format": '), dtype=torch.uint8), "NV104", "not UTF-8 JSON"),
        (marker_tensor({"format": "nvfp4"}).to(torch.int32), "NV104", "ComfyUI reads it as U8"),
    ],
)
def test_unreadable_or_unknown_markers(tensor: torch.Tensor, rule: str, words: str,
                                       write_plan: Callable[..., Path]) -> None:
    findings = lint(write_plan(edit=lambda p: _marker(p, tensor)))
    assert {f.rule for f in findings} == {rule}
    assert len(findings) == 20 and words in findings[0].message


def test_invalid_metadata_json_and_disagreeing_markers(write_plan: Callable[..., Path]) -> None:
    def broken(plan: MixedPlan) -> None:
        plan.extra_metadata = {"_quantization_metadata": "{not json"}

    (finding,) = lint(write_plan(edit=broken))
    assert finding.rule == "NV104" and finding.layer is None and "not valid JSON" in finding.message

    def disagree(plan: MixedPlan) -> None:
        plan.markers = "tensor"
        layers = {base: {"format": "float8_e4m3fn"} for base in plan.quantized}
        plan.extra_metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}

    findings = lint(write_plan(edit=disagree))
    assert rules_at(findings) == {"NV104"} and "says 'nvfp4' but" in findings[0].message


# ---- shapes -------------------------------------------------------------------------------------------------

def test_transposed_non_square_weight(write_plan: Callable[..., Path]) -> None:
    def transpose(plan: MixedPlan) -> None:
        plan.quantize(FFN_UP, plan.source[FFN_UP + ".weight"].T.contiguous())

    findings = lint(write_plan(edit=transpose))
    assert [(f.rule, f.layer) for f in findings if f.severity >= Severity.WARNING] == [("NV107", FFN_UP)]
    assert findings[0].evidence["expected"] == [512, 256]


def test_block_scale_and_scalar_shapes(write_plan: Callable[..., Path]) -> None:
    def reshape(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".weight_scale"] = plan.tensors[ATTN_Q + ".weight_scale"][:, :8].contiguous()
        plan.tensors[FFN_UP + ".weight_scale_2"] = plan.tensors[FFN_UP + ".weight_scale_2"].repeat(4)

    findings = {(f.rule, f.layer): f for f in lint(write_plan(edit=reshape))}
    assert set(findings) == {("NV106", ATTN_Q), ("NV106", FFN_UP)}
    assert findings[("NV106", ATTN_Q)].evidence == {"role": "weight_scale", "expected": [256, 16], "found": [256, 8]}
    assert findings[("NV106", FFN_UP)].evidence["role"] == "weight_scale_2"


def test_weight_for_another_model_size_is_a_wrong_shape(write_plan: Callable[..., Path]) -> None:
    def narrower(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".weight"] = plan.tensors[ATTN_Q + ".weight"][:, :64].contiguous()

    findings = [f for f in lint(write_plan(edit=narrower)) if f.rule == "NV106"]
    assert [f.evidence["expected"] for f in findings] == [[256, 128]]


def test_unpadded_block_scales_are_definitive_linear_layout(tmp_path: Path) -> None:
    """[out, in/16] without the 128x4 padding: NV205 from the header alone, even on i.i.d. weights."""
    from reference_specs.formats.nvfp4 import NVFP4, unswizzle

    stored = NVFP4().quantize(torch.randn(64, 256))
    stored["weight_scale"] = unswizzle(stored["weight_scale"])[:64, :16].contiguous()
    tensors = {f"lin.{k}": v for k, v in stored.items()} | {"lin.comfy_quant": marker_tensor({"format": "nvfp4"})}
    findings = lint(save_safetensors(tensors, tmp_path / "m.safetensors"), values=False)
    assert rules_at(findings, Severity.ERROR) == {"NV205"}
    assert findings[0].evidence == {"expected": [128, 16], "found": [64, 16], "layout": "linear"}


# ---- scale values -------------------------------------------------------------------------------------------

def test_reciprocal_evidence_and_compressed_tensors_naming(write_plan: Callable[..., Path]) -> None:
    (finding, *_) = [f for f in lint(write_plan("scale2-reciprocal")) if f.layer == ATTN_Q]
    assert finding.evidence["decoded_amax"] > 2688 and finding.evidence["amax_if_reciprocal"] < 100

    def compressed(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".weight_global_scale"] = 1.0 / plan.tensors.pop(ATTN_Q + ".weight_scale_2")

    assert {(f.rule, f.layer) for f in lint(write_plan(edit=compressed))} == {("NV102", ATTN_Q), ("NV201", ATTN_Q)}


@pytest.mark.parametrize("value", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_per_tensor_scales(value: float, write_plan: Callable[..., Path]) -> None:
    def poison(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".weight_scale_2"] = torch.tensor(value)

    findings = [f for f in lint(write_plan(edit=poison)) if f.severity >= Severity.WARNING]
    assert [(f.rule, f.layer) for f in findings] == [("NV202", ATTN_Q)]


def test_zero_block_scales_only_when_a_whole_layer_is_zero(write_plan: Callable[..., Path]) -> None:
    def zero_some(plan: MixedPlan) -> None:
        plan.quantize(ATTN_Q, torch.cat([torch.zeros(128, 256), plan.source[ATTN_Q + ".weight"][128:]]))

    assert lint(write_plan(edit=zero_some)) == []  # zero weight blocks give legitimate zero scales

    def zero_all(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".weight_scale"] = torch.zeros_like(plan.tensors[ATTN_Q + ".weight_scale"])

    (finding,) = lint(write_plan(edit=zero_all))
    assert finding.rule == "NV202" and finding.evidence["zero"] == finding.evidence["total"] == 256 * 16


def test_input_scale_constant_small_or_calibrated(write_plan: Callable[..., Path], base_plan: MixedPlan) -> None:
    def constant(plan: MixedPlan) -> None:
        for base in plan.quantized:
            plan.tensors[base + ".input_scale"] = torch.tensor(0.05)

    (finding,) = lint(write_plan(edit=constant))
    assert (finding.rule, finding.layer, finding.evidence["layers_with_value"]) == ("NV203", None, 20)

    def calibrated(plan: MixedPlan, low: float = 0.01) -> None:
        for i, base in enumerate(plan.quantized):
            plan.tensors[base + ".input_scale"] = torch.tensor(low * (1 + i))

    assert lint(write_plan(edit=calibrated)) == []
    tiny = [f for f in lint(write_plan(edit=lambda p: calibrated(p, 1e-8))) if f.layer == ATTN_Q]
    assert tiny[0].evidence["reason"] == "out-of-range"


# ---- architecture -------------------------------------------------------------------------------------------

def test_unknown_architecture_is_a_warning(tmp_path: Path) -> None:
    path = save_safetensors({"encoder.layers.0.weight": torch.ones(8, 8)}, tmp_path / "te.safetensors")
    (finding,) = lint(path)
    assert (finding.rule, finding.severity) == ("NV303", Severity.WARNING)


def test_header_only_mode_skips_value_rules(write_plan: Callable[..., Path]) -> None:
    path = write_plan("scale2-reciprocal", "missing-block-scale")
    assert rules_at(lint(path, values=False)) == {"NV101"}
    assert rules_at(lint(path)) == {"NV101", "NV201"}


# ---- registry -----------------------------------------------------------------------------------------------

def test_registry_ids_names_and_causes_are_unique_and_explained() -> None:
    assert len({r.id for r in RULES}) == len({r.name for r in RULES}) == len(RULES)
    assert all(r.summary and len(r.explanation) > 200 for r in RULES)
    assert all("nvdiag" in r.explanation for r in RULES)
    required = {"missing-block-scale", "missing-tensor-scale", "missing-quant-marker", "invalid-quant-marker",
                "wrong-dtype", "wrong-shape", "scale2-reciprocal", "non-finite-scale", "input-scale-implausible",
                "scale-layout-linear", "sensitive-layer-quantized", "diffusers-key-names", "unknown-architecture",
                "legacy-fp8-format"}
    assert required <= {r.cause for r in RULES}


def test_rules_for_accepts_ids_prefixes_names_and_causes() -> None:
    assert [r.id for r in rules_for("NV10")] == ["NV101", "NV102", "NV103", "NV104", "NV105", "NV106", "NV107",
                                              "NV108", "NV109"]
    assert [r.id for r in rules_for("scale-layout-linear")] == ["NV204", "NV205"]
    assert [r.id for r in rules_for("nv203")] == ["NV203"]
    assert get_rule("wrong-dtype").id == "NV105"
    assert len(rules_for("ALL")) == len(RULES)


# ---- other formats and containers ---------------------------------------------------------------------------

def test_more_good_files_lint_clean(make_checkpoint) -> None:
    assert lint(make_checkpoint("float", dtype=torch.bfloat16, name="lint_bf16")) == []
    assert lint(make_checkpoint("float", dtype=torch.float16, prefix="model.diffusion_model.", name="lint_f16")) == []
    assert lint(make_checkpoint("gguf", qtype="Q5_K_M", name="lint_q5km")) == []
    assert lint(make_checkpoint("nvfp4-mixed", prefix="model.diffusion_model.", markers="metadata",
                                name="lint_prefixed")) == []


def test_diffusers_named_wan_float_checkpoint(wan_float_sharded_diffusers: Path) -> None:
    (finding,) = lint(wan_float_sharded_diffusers)
    assert finding.rule == "NV302" and "Could not detect model type" in finding.message


def test_fp8_without_markers_needs_them(make_checkpoint) -> None:
    findings = lint(make_checkpoint("fp8-comfy", markers="none", name="lint_fp8_unmarked"))
    assert rules_at(findings) == {"NV103"} and "F8_E4M3 weight with a scale" in findings[0].message


def test_compressed_tensors_layer_is_named_twice(tmp_path: Path) -> None:
    from reference_specs.formats.compressed_tensors import NVFP4CompressedTensors

    stored = NVFP4CompressedTensors().quantize(torch.randn(128, 256))
    path = save_safetensors({f"lin.{k}": v for k, v in stored.items()}, tmp_path / "ct.safetensors")
    assert rules_at(lint(path), Severity.ERROR) == {"NV103", "NV201"}


def test_static_input_scale_far_too_large_is_a_reciprocal(write_plan: Callable[..., Path]) -> None:
    def huge(plan: MixedPlan) -> None:
        plan.tensors[ATTN_Q + ".input_scale"] = torch.tensor(500.0)

    (finding,) = lint(write_plan(edit=huge))
    assert (finding.rule, finding.evidence["role"]) == ("NV201", "input_scale")
