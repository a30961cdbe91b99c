"""`nvdiag verify --compute both`: both compute paths really run, each judged against its own baseline.

A benchmark (real-width WAN A14B, 2 blocks, BF16 reference, the file `nvdiag convert` made of it) printed the same
ratio on both paths to six digits (x0.998059), which looked as if W4A4 had not been emulated. It was: the ratio is
FILE's error over BASELINE's times the lossy reference's factor, and a file nvdiag convert writes IS the baseline
(comfy-kitchen's encoding of the same reference, bit for bit), so on every path FILE's error equals BASELINE's and
the ratio is 1 / reference_factor, the same number whatever the path costs. A BF16 reference carries about 4e-3
relative error of its own (reference_specs, plain formats), added in quadrature to NVFP4's: a factor a little
above 1, a ratio a little below. These tests pin what the ratio hides: W4A4's own error is far above W4A16's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inspect_tools.cli import main
from inspect_tools.comfyui.verify import verify
from inspect_tools.layers import open_model
from inspect_tools.synthetic import float_state_dict, save_safetensors

VARIANT = "wan2.2-ti2v-5b"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """A BF16 source (a lossy reference, as the benchmark's) and the NVFP4 file the built-in preset makes of it."""
    folder = tmp_path_factory.mktemp("compute")
    src = save_safetensors(float_state_dict(VARIANT, dtype=torch.bfloat16), folder / "src_bf16.safetensors", {})
    out = folder / "nvfp4.safetensors"
    assert main(["convert", str(src), str(out), "--preset", VARIANT]) == 0
    return src, out


@pytest.fixture(scope="module")
def both(comfyui, converted):
    src, out = converted
    with open_model(out) as mine, open_model(src) as ref:
        return verify(comfyui, mine, ref, compute=("w4a16", "w4a4"), steps=1, decode=False)


def test_both_paths_run_and_w4a4_costs_what_4_bit_activations_cost(both):
    w4a16, w4a4 = both.paths
    assert (w4a16.compute, w4a4.compute) == ("w4a16", "w4a4")
    # an unquantized W4A4 path would give exactly W4A16's error. Per layer, activations quantized like the weights
    # add their error in quadrature (about sqrt(2) x); through the blocks and the output head less of it shows,
    # but every block and the output are clearly worse
    assert w4a4.file.error > 1.05 * w4a16.file.error
    assert w4a4.baseline.error > 1.05 * w4a16.baseline.error
    assert all(a > 1.2 * b for a, b in zip(w4a4.file.blocks, w4a16.file.blocks, strict=True))


def test_the_w4a4_path_of_both_is_the_w4a4_path_alone(comfyui, converted, both):
    src, out = converted
    with open_model(out) as mine, open_model(src) as ref:
        alone = verify(comfyui, mine, ref, compute=("w4a4",), steps=1, decode=False)
    assert alone.paths[0].file.error == pytest.approx(both.paths[1].file.error, rel=1e-6)
    assert alone.paths[0].baseline.error == pytest.approx(both.paths[1].baseline.error, rel=1e-6)


def test_a_file_that_is_its_baseline_gives_one_ratio_on_every_path(both):
    """Why the benchmark saw x0.998059 twice: FILE's error equals BASELINE's on each path, so the ratio is
    1 / reference_factor on each, and a BF16 reference makes that factor slightly above 1."""
    for path in both.paths:
        assert path.file.error == path.baseline.error
        assert path.reference_factor > 1.0
        assert path.ratio == pytest.approx(1.0 / path.reference_factor, rel=1e-12)
    assert both.paths[0].ratio == pytest.approx(both.paths[1].ratio, rel=1e-12)
    assert both.paths[0].file.error != both.paths[1].file.error
