"""`roundtrip` on the shared synthetic WAN fixtures (tests/conftest.py): every reference container gives a clean
verdict for a healthy file, and every injected fault of synthetic.FAULTS comes back as its own cause."""

from __future__ import annotations

import pytest

from inspect_tools.layers import open_model
from inspect_tools.roundtrip import run_roundtrip


@pytest.mark.parametrize("reference", ["wan_float", "wan_float_sharded_diffusers", "wan_gguf_q4_0"])
def test_healthy_file_has_no_error_against_any_reference(wan_nvfp4_mixed, reference, request):
    result = run_roundtrip(wan_nvfp4_mixed, request.getfixturevalue(reference))
    assert result.findings == []
    with open_model(wan_nvfp4_mixed) as mine:
        quantized = sum(layer.is_quantized for layer in mine.layers.values())
    assert len(result.checked) == quantized > 0  # diffusers names and GGUF layers all found their partner


@pytest.mark.parametrize(
    "fault", ["scale-layout-linear", "nibble-order", "scale2-reciprocal", "stale-scale", "transposed-weight"]
)
def test_each_factory_fault_is_attributed(make_checkpoint, wan_float, fault):
    faulty = make_checkpoint("nvfp4-mixed", faults=(fault,))
    result = run_roundtrip(faulty, wan_float, layers="blocks.0.*")  # every quantized layer is faulty: a few do
    assert result.findings, f"{fault}: no finding"
    assert {f.cause for f in result.findings} == {fault}
