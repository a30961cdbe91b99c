"""--device cuda: the same bytes as the CPU path (the CUDA tests are skipped where torch sees no CUDA device; the
GPU path's chunked O_DIRECT reads are tested on the CPU too)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter import buffer_pool, gpu_io, pipeline, stages
from converter.pipeline import convert
from inspect_tools import roundtrip
from inspect_tools.cuda_warm_up import CudaWarmUp
from inspect_tools.readers import chunked
from inspect_tools.roundtrip import run_roundtrip
from inspect_tools.synthetic import write_float
from reference_specs.formats import fast_encode

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VARIANT = "wan2.2-ti2v-5b"
TINY = {"dim": 64, "ffn": 128, "text_dim": 64, "freq_dim": 64, "heads": 1, "blocks": 2}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_float(tmp_path_factory.mktemp("gpu") / "src", VARIANT, TINY, naming="diffusers", sharded=2)


@needs_cuda
def test_cuda_conversion_writes_the_same_bytes_as_the_cpu(src, tmp_path) -> None:
    cpu, cuda = tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors"
    assert convert(src, cpu, VARIANT, device="cpu").written
    assert convert(src, cuda, VARIANT, device="cuda").written
    assert sha256(cpu) == sha256(cuda)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[r].reshape(-1).view(torch.uint8), b[r].cpu().reshape(-1).view(torch.uint8)) for r in a)


@needs_cuda
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


@needs_cuda
def test_roundtrip_on_cuda_gives_the_cpu_results(src, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    assert convert(src, out, VARIANT).written
    on_cpu = {r.name: r.error for r in run_roundtrip(out, src, device="cpu").layers}
    on_cuda = {r.name: r.error for r in run_roundtrip(out, src, device="cuda").layers}
    assert on_cpu.keys() == on_cuda.keys() and on_cpu
    assert all(on_cuda[n] == pytest.approx(on_cpu[n], rel=1e-5) for n in on_cpu)


def drop_cache(folder: Path) -> None:
    """Evict the files' pages so that reads of them go to the disk (the O_DIRECT path)."""
    for p in folder.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages would stay
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("cold", [True, False])
def test_chunked_reads_give_the_stored_tensors(src, monkeypatch, cold) -> None:
    """Chunks far smaller than the tensors, unaligned offsets, a cold (direct) or warm (page cache) file."""
    from inspect_tools.readers import open_checkpoint
    from inspect_tools.readers.safetensors_dtypes import DTYPES

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 2 * chunked.ALIGN)
    with open_checkpoint(src) as reader:
        if cold:
            drop_cache(src.parent)
        chunks = chunked.ChunkedReader(reader, buffer_pool.BufferPool(1 << 26), threads=3)
        try:
            for info in reader:
                tensor, buf, reads = chunks.submit(info, DTYPES[info.dtype].torch_dtype)
                assert all(r.result() is None for r in reads)
                assert torch.equal(tensor, reader.load(info.name)), info.name
                chunks.pool.release(buf)
        finally:
            chunks.close()
    if cold and hasattr(os, "O_DIRECT"):
        assert chunks.direct_bytes > 0


@pytest.mark.parametrize("threads", [True, False])
def test_the_gpu_read_path_writes_the_same_bytes(src, tmp_path, monkeypatch, threads) -> None:
    """The GPU path's stages (chunked, direct, queued ahead) without a GPU: unpinned buffers, CPU encoding."""

    class Unpinned(buffer_pool.BufferPool):
        def _allocate(self, nbytes: int) -> torch.Tensor:
            return torch.empty(nbytes, dtype=torch.uint8)

    class ChunkedStages(stages.Stages):
        def __init__(self, *args, pinned: bool = False, **kwargs) -> None:
            super().__init__(*args, pinned=True, **kwargs)

    reference = tmp_path / "reference.safetensors"
    assert convert(src, reference, VARIANT).written
    monkeypatch.setattr(stages, "BufferPool", Unpinned)
    monkeypatch.setattr(pipeline, "Stages", ChunkedStages)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * chunked.ALIGN)
    drop_cache(src.parent)
    out = tmp_path / "out.safetensors"
    assert convert(src, out, VARIANT, threads=threads).written
    assert sha256(out) == sha256(reference)


def test_a_truncated_source_is_an_input_error_on_the_gpu_read_path(tmp_path) -> None:
    from inspect_tools.errors import InputError
    from inspect_tools.readers import open_checkpoint
    from inspect_tools.readers.safetensors_dtypes import DTYPES

    one = write_float(tmp_path / "one", VARIANT, TINY, naming="diffusers")
    with open_checkpoint(one) as reader:
        last = max(reader, key=lambda i: i.offset)
        os.truncate(one, last.offset + last.nbytes - 1)
        chunks = chunked.ChunkedReader(reader, buffer_pool.BufferPool(1 << 26), threads=2)
        try:
            _, _, reads = chunks.submit(last, DTYPES[last.dtype].torch_dtype)
            with pytest.raises(InputError, match="shorter than its header"):
                [r.result() for r in reads]
        finally:
            chunks.close()


def test_the_pinned_arena_hands_out_aligned_slices_and_merges_returned_ones() -> None:
    arena = gpu_io.PinnedArena(torch.empty(8 * chunked.ALIGN, dtype=torch.uint8), registered=False)
    a, b, c = arena.take(1), arena.take(3 * chunked.ALIGN), arena.take(2 * chunked.ALIGN)
    assert [t.numel() for t in (a, b, c)] == [chunked.ALIGN, 3 * chunked.ALIGN, 2 * chunked.ALIGN]
    assert all(arena.owns(t) for t in (a, b, c)) and not arena.owns(torch.empty(1))
    assert arena.take(3 * chunked.ALIGN) is None  # only 2 pages are left
    arena.give(a)
    arena.give(c)
    assert arena.take(5 * chunked.ALIGN) is None  # holes of 1 and 4 pages, apart
    arena.give(b)
    whole = arena.take(8 * chunked.ALIGN)  # all three merged back into one
    assert whole is not None and whole.data_ptr() == a.data_ptr()


@pytest.mark.parametrize("kernels", [pipeline.encoder_kernels, roundtrip.check_kernels])
def test_the_warm_up_work_runs_on_any_device(kernels) -> None:
    """The background warm-ups swallow errors (the command's own call reports them), so a warm-up that broke would
    only be slower: each is run here in the open, on the CPU (and on the GPU where there is one)."""
    kernels(torch.device("cpu"))
    if torch.cuda.is_available():
        kernels(torch.device("cuda"))


def test_a_warm_up_joins_after_its_kernels_ran() -> None:
    ran = []
    warming = CudaWarmUp("cpu", ran.append)
    warming.join()
    assert warming.context_ready()
    # pinned memory needs a CUDA driver: without one the warm-up ends after the context, kernels not run
    assert ran == ([torch.device("cpu")] if torch.cuda.is_available() else [])


# In a fresh process: the driver started first, torch imported meanwhile, then torch's current context is the one
# the driver retained (the device's primary context), and kernels run on it.
DRIVER_FIRST = """
import ctypes
from inspect_tools import cuda_driver
cuda_driver.start()
import torch
assert float(torch.arange(4.0, device="cuda").sum()) == 6.0
cuda_driver.join()
lib = ctypes.CDLL(cuda_driver.LIBCUDA)
device, current, primary = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
assert lib.cuDeviceGet(ctypes.byref(device), torch.cuda.current_device()) == 0
assert lib.cuCtxGetCurrent(ctypes.byref(current)) == 0
assert lib.cuDevicePrimaryCtxRetain(ctypes.byref(primary), device) == 0
assert current.value == primary.value, (current.value, primary.value)
"""


@needs_cuda
def test_torch_runs_on_the_context_the_driver_started_before_its_import() -> None:
    subprocess.run([sys.executable, "-c", DRIVER_FIRST], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[1])
