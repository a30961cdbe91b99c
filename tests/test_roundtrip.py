"""`roundtrip`: healthy NVFP4 files match any reference; each injected fault is named by its cause."""

from __future__ import annotations

import comfy_kitchen as ck
import pytest
import torch
from test_roundtrip_files import (
    SHAPES,
    ck_nvfp4,
    source_weights,
    write_fp16,
    write_gguf_q4_0,
    write_pair,
    write_sharded,
)

from inspect_tools.roundtrip import all_equal, measure, run_roundtrip, select_pairs
from reference_specs.formats.nvfp4 import NVFP4


def test_comfy_kitchen_file_against_its_fp32_source_has_no_finding(tmp_path):
    mine, ref = write_pair(tmp_path)
    result = run_roundtrip(mine, ref)
    assert result.findings == []
    assert len(result.checked) == len(SHAPES)
    for layer in result.checked:
        # the file is bit-identical to re-encoding the source: error equals the baseline exactly
        assert layer.metrics.rel_error == pytest.approx(layer.baseline, rel=1e-6)
        assert 0.05 < layer.metrics.rel_error < 0.15 and layer.metrics.cosine > 0.99
    assert result.verdict() == f"all {len(SHAPES)} checked layers decode within their format's expected error"


@pytest.mark.parametrize("reference", ["fp16", "q4_0", "sharded"])
def test_other_references_give_no_finding(tmp_path, reference):
    mine, _ = write_pair(tmp_path)
    ref = {"fp16": write_fp16, "q4_0": write_gguf_q4_0, "sharded": write_sharded}[reference](tmp_path)
    result = run_roundtrip(mine, ref)
    assert result.findings == []
    assert len(result.checked) == len(SHAPES)
    assert not result.alignment.only_mine


FAULTS = [
    ("linear", "scale-layout-linear"),
    ("nibbles", "nibble-order"),
    ("reciprocal", "scale2-reciprocal"),
    ("transposed", "transposed-weight"),
]


@pytest.mark.parametrize(("fault", "cause"), FAULTS)
def test_each_injected_fault_is_attributed_to_its_cause(tmp_path, fault, cause):
    mine, ref = write_pair(tmp_path, faults={"blocks.0.self_attn.q": fault, "blocks.1.self_attn.k": fault})
    result = run_roundtrip(mine, ref)
    assert {(f.layer, f.cause) for f in result.findings} == {
        ("blocks.0.self_attn.q", cause),
        ("blocks.1.self_attn.k", cause),
    }
    finding = result.findings[0]
    assert finding.rule == "RT101"
    hypotheses = finding.evidence["hypotheses"]
    assert hypotheses[cause] <= finding.evidence["expected"] * 1.5
    assert result.verdict().startswith(f"2 of {len(SHAPES)} layers decode wrongly: ")


def test_scales_swapped_between_two_layers_are_stale(tmp_path):
    mine, ref = write_pair(
        tmp_path, faults={"blocks.0.ffn.0": "stale:blocks.1.ffn.0", "blocks.1.ffn.0": "stale:blocks.0.ffn.0"}
    )
    result = run_roundtrip(mine, ref)
    assert {(f.layer, f.cause) for f in result.findings} == {("blocks.0.ffn.0", "stale-scale"),
                                                             ("blocks.1.ffn.0", "stale-scale")}
    assert result.findings[0].evidence["sign_agreement"] > 0.99


def test_only_the_worst_layers_come_first_and_sample_spreads(tmp_path):
    mine, ref = write_pair(tmp_path, faults={"blocks.1.ffn.2": "nibbles"})
    result = run_roundtrip(mine, ref)
    assert result.layers[0].name == "blocks.1.ffn.2"
    sampled = run_roundtrip(mine, ref, sample=3)
    assert len(sampled.layers) == 3  # first, middle and last quantized layer of the file
    only_ffn = run_roundtrip(mine, ref, layers="*.ffn.*")
    assert {r.name for r in only_ffn.layers} == {n for n in SHAPES if ".ffn." in n}


def test_unmatched_layers_are_listed_not_fatal(tmp_path):
    mine, ref = write_pair(tmp_path)
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in source_weights().items() if not k.startswith("blocks.1.")}, str(partial))
    result = run_roundtrip(mine, partial)
    assert result.findings == []
    assert {layer.name for layer in result.alignment.only_mine} >= {f"{n}" for n in SHAPES if n.startswith("blocks.1")}
    assert len(result.checked) == len(SHAPES) // 2


def test_our_decoder_agrees_with_comfy_kitchen():
    w = source_weights()["blocks.0.ffn.0.weight"]
    t = ck_nvfp4(w)
    ours = NVFP4().dequantize(t, tuple(w.shape))
    theirs = ck.dequantize_nvfp4(t["weight"], t["weight_scale_2"], t["weight_scale"], output_type=torch.float32)
    assert torch.equal(ours, theirs[: w.shape[0], : w.shape[1]])


def test_metrics_of_a_known_error():
    ref = torch.ones(4, 4)
    m = measure(ref * 1.1, ref)
    assert m.rel_error == pytest.approx(0.1) and m.max_abs == pytest.approx(0.1, rel=1e-5)
    assert m.cosine == pytest.approx(1.0) and m.snr_db == pytest.approx(20.0)


def test_sample_picks_first_and_last():
    class P:
        def __init__(self, i):
            self.mine = type("L", (), {"is_quantized": True, "has": lambda self, r: True, "name": f"l{i}"})()
            self.key = f"l{i}"

    pairs = [P(i) for i in range(10)]
    assert [p.key for p in select_pairs(pairs, sample=3)] == ["l0", "l4", "l9"]


@pytest.mark.parametrize("side", ["mine", "ref"])
def test_a_layer_that_cannot_be_read_names_its_file(tmp_path, side):
    """A file cut short after it was opened (the data under the header is gone): one error line naming that file."""
    from inspect_tools.errors import InputError
    from inspect_tools.layers import open_model
    from inspect_tools.roundtrip import roundtrip

    mine_path, ref_path = write_pair(tmp_path)
    with open_model(mine_path) as mine, open_model(ref_path) as ref:
        victim = mine_path if side == "mine" else ref_path
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
        with pytest.raises(InputError) as caught:
            roundtrip(mine, ref)
    assert caught.value.path == str(victim)


def test_an_undecodable_pair_names_the_file_whose_tensors_do_not_load(tmp_path, monkeypatch):
    import inspect_tools.roundtrip as rt
    from inspect_tools.errors import InputError

    mine_path, ref_path = write_pair(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[-1, 8]' is invalid")

    monkeypatch.setattr(rt, "check_pair", broken)
    with pytest.raises(InputError) as caught:  # PATH's tensors load: the failing side is REF
        run_roundtrip(mine_path, ref_path)
    assert caught.value.path == str(ref_path) and "cannot be read: shape" in caught.value.message


def test_all_equal_is_torch_equal_of_every_pair_at_once() -> None:
    a = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    b = a.clone()
    b[2, 3] ^= 1
    assert all_equal([(a, a.clone()), (a.float(), a.float())])
    assert not all_equal([(a, a.clone()), (a, b)])  # one bit of one pair
    assert not all_equal([(a, a.reshape(4, 3))])  # same bytes, another shape
    assert not all_equal([(a, a.to(torch.int8))])  # same values, another dtype
    assert all_equal([]) and all_equal([(a[:0], a[:0])])


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_metrics_measured_in_row_chunks_are_the_float64_metrics(chunk_rows, monkeypatch):
    # expected values from float64 arithmetic on the same numbers, not from measure itself
    import math

    import inspect_tools.roundtrip as rt

    torch.manual_seed(3)
    reference = torch.distributions.StudentT(3.0).sample((1000, 96))
    decoded = reference + 0.05 * torch.randn(1000, 96)
    r, d = reference.double(), decoded.double()
    monkeypatch.setattr(rt, "MEASURE_CHUNK_ELEMENTS", chunk_rows * 96)
    got = measure(decoded, reference)
    assert got.rel_error == pytest.approx(float((d - r).norm() / r.norm()), rel=1e-6)
    assert got.cosine == pytest.approx(float((d * r).sum() / (d.norm() * r.norm())), rel=1e-7)
    assert got.snr_db == pytest.approx(float(20 * torch.log10(r.norm() / (d - r).norm())), rel=1e-6)
    assert got.max_abs == float((decoded - reference).abs().max())  # a max is exact, chunked or not
    decoded[500, 3] = math.nan  # a NaN anywhere is a NaN in the metrics, whichever chunk holds it
    assert math.isnan(measure(decoded, reference).max_abs)
