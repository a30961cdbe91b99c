"""--device cuda: the same bytes as the CPU path (skipped where torch sees no CUDA device)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from converter.pipeline import convert
from inspect_tools.roundtrip import run_roundtrip
from inspect_tools.synthetic import write_float
from reference_specs.formats import fast_encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VARIANT = "wan2.2-ti2v-5b"
TINY = {"dim": 64, "ffn": 128, "text_dim": 64, "freq_dim": 64, "heads": 1, "blocks": 2}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_float(tmp_path_factory.mktemp("gpu") / "src", VARIANT, TINY, naming="diffusers", sharded=2)


def test_cuda_conversion_writes_the_same_bytes_as_the_cpu(src, tmp_path) -> None:
    cpu, cuda = tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors"
    assert convert(src, cpu, VARIANT, device="cpu").written
    assert convert(src, cuda, VARIANT, device="cuda").written
    assert sha256(cpu) == sha256(cuda)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[r].reshape(-1).view(torch.uint8), b[r].cpu().reshape(-1).view(torch.uint8)) for r in a)


def test_fast_encoders_are_byte_identical_on_cuda() -> None:
    """Magnitudes over many decades, ties exactly between E2M1 steps, padding: the per-tensor scale (amax / 2688)
    and every block scale must round as on the CPU (a division by a Python number on CUDA would not)."""
    g = torch.Generator().manual_seed(0)
    steps = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    ties = steps[torch.randint(len(steps), (300, 200), generator=g)] * torch.sign(torch.randn(300, 200, generator=g))
    weights = [ties, torch.randn(257, 13 * 16 + 5, generator=g)]
    weights += [torch.randn(64, 96, generator=g) * 10.0 ** float(e) for e in range(-6, 5)]
    for weight in weights:
        assert _same(fast_encode.encode_nvfp4(weight), fast_encode.encode_nvfp4(weight.cuda(), device="cuda"))
        assert _same(fast_encode.encode_fp8(weight), fast_encode.encode_fp8(weight.cuda(), device="cuda"))


def test_roundtrip_on_cuda_gives_the_cpu_results(src, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    assert convert(src, out, VARIANT).written
    on_cpu = {r.name: r.error for r in run_roundtrip(out, src, device="cpu").layers}
    on_cuda = {r.name: r.error for r in run_roundtrip(out, src, device="cuda").layers}
    assert on_cpu.keys() == on_cuda.keys() and on_cpu
    assert all(on_cuda[n] == pytest.approx(on_cpu[n], rel=1e-5) for n in on_cpu)
