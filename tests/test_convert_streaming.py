"""Streaming conversion: the layers flow through read-ahead / encode / write-behind stages whose memory in flight is
bounded whatever the model size, give the same bytes as a plain layer-after-layer run, and fail cleanly; the gate
checks row tiles and the per-tensor scale."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
import torch

from converter import buffer_pool, encode, gate, source_stream, stages
from converter.buffer_pool import BufferPool
from converter.pipeline import convert
from inspect_tools.errors import InputError
from inspect_tools.synthetic import write_float
from inspect_tools.writer import SafetensorsWriter

VARIANT = "wan2.2-ti2v-5b"
TINY = {"dim": 64, "ffn": 128, "text_dim": 64, "freq_dim": 64, "heads": 1}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[int, Path]:
    """The same tiny WAN layout with 2 and with 8 blocks (sharded, diffusers names, FP32)."""
    folder = tmp_path_factory.mktemp("streaming")
    return {n: write_float(folder / f"src{n}", VARIANT, {**TINY, "blocks": n}, naming="diffusers", sharded=2)
            for n in (2, 8)}


def test_threaded_and_sequential_runs_write_the_same_bytes(sources, tmp_path) -> None:
    threaded, sequential = tmp_path / "threaded.safetensors", tmp_path / "sequential.safetensors"
    assert convert(sources[8], threaded, VARIANT).written
    assert convert(sources[8], sequential, VARIANT, threads=False).written
    assert sha256(threaded) == sha256(sequential)


def test_the_caller_is_told_each_layer_as_it_is_written(sources, tmp_path) -> None:
    """convert renders nothing itself: the CLI draws its progress bar from these calls."""
    calls = []
    result = convert(sources[2], tmp_path / "out.safetensors", VARIANT,
                     progress=lambda done, total, name: calls.append((done, total, name)))
    planned = [lp.name for lp in result.plan.layers]
    assert calls[0] == (0, len(planned), "")
    assert [done for done, _, _ in calls] == list(range(len(planned) + 1))
    assert sorted(name for _, _, name in calls[1:]) == sorted(planned)


def test_layers_in_flight_do_not_grow_with_the_model(sources, tmp_path, monkeypatch) -> None:
    """Count layers read whose source buffers have not all gone back to the pool, with a slow writer so the reader
    runs as far ahead as the stages let it."""
    pending: dict[int, set[int]] = {}  # job number -> its buffers still out
    peak, reads = {}, [0]
    lock = threading.Lock()
    read_job, release = stages.read_job, stages.Stages.release
    write = SafetensorsWriter.write

    def counting_read(lp, stream):
        job = read_job(lp, stream)
        with lock:
            reads[0] += 1
            if job.buffers:
                pending[reads[0]] = {id(b) for b in job.buffers}
            peak[current[0]] = max(peak.get(current[0], 0), len(pending))
        return job

    def counting_release(self, buffers):
        release(self, buffers)
        with lock:
            for job in list(pending):
                pending[job] -= {id(b) for b in buffers}
                if not pending[job]:
                    del pending[job]

    def slow_write(self, name, tensor):
        time.sleep(0.001)
        write(self, name, tensor)

    monkeypatch.setattr(stages, "read_job", counting_read)
    monkeypatch.setattr(stages.Stages, "release", counting_release)
    monkeypatch.setattr(SafetensorsWriter, "write", slow_write)
    current = [0]
    for blocks in (2, 8):
        current[0], reads[0] = blocks, 0
        result = convert(sources[blocks], tmp_path / f"out{blocks}.safetensors", VARIANT)
        assert result.written and reads[0] == len(result.plan.layers) and not pending
    # one being read, QUEUE_DEPTH waiting, one encoding, QUEUE_DEPTH waiting, one being written
    bound = 2 * stages.QUEUE_DEPTH + 3
    assert 1 < peak[8] <= bound and peak[2] <= bound, peak


def test_buffer_pool_waits_for_its_budget_and_reuses_buffers() -> None:
    size = 2 * buffer_pool.POOL_MIN_BYTES
    pool = BufferPool(budget=2 * size)
    a, b = pool.acquire(size), pool.acquire(size)
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(size)))
    waiter.start()
    time.sleep(0.2)
    assert not got  # the budget is spent: the third acquire waits
    pool.release(a)
    waiter.join(timeout=5)
    assert got and got[0].data_ptr() == a.data_ptr()  # and gets the released buffer back, not a new one
    assert pool.peak == 2 * size
    pool.release(b)
    pool.release(got[0])
    assert pool.in_use == 0


def test_a_tensor_larger_than_the_budget_still_gets_a_buffer_when_nothing_else_is_in_use() -> None:
    pool = BufferPool(budget=buffer_pool.POOL_MIN_BYTES)
    assert pool.acquire(4 * buffer_pool.POOL_MIN_BYTES).numel() == 4 * buffer_pool.POOL_MIN_BYTES


def test_a_read_error_is_raised_and_leaves_no_file(sources, tmp_path, monkeypatch) -> None:
    load = source_stream.SourceStream.load
    calls = [0]

    def failing_load(self, key):
        calls[0] += 1
        if calls[0] == 5:
            raise InputError("cannot read: simulated", "shard")
        return load(self, key)

    monkeypatch.setattr(source_stream.SourceStream, "load", failing_load)
    with pytest.raises(InputError, match="simulated"):
        convert(sources[8], tmp_path / "out.safetensors", VARIANT)
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_is_raised_and_leaves_no_file(sources, tmp_path, monkeypatch) -> None:
    def failing_write(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        convert(sources[8], tmp_path / "out.safetensors", VARIANT)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_check_counts_nan_and_inf_and_gives_the_amax() -> None:
    assert encode.finite_check(torch.tensor([1.0, -3.0, 2.0])) == (0, 3.0)
    assert encode.finite_check(torch.tensor([1.0, float("nan"), float("inf")]))[0] == 2
    assert encode.finite_check(torch.arange(4, dtype=torch.int32)) == (0, 0.0)
    assert encode.finite_check(torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn)) == (0, 1.0)


WEIGHTS = {
    "heavy-tailed": lambda: torch.distributions.StudentT(2.0).sample((48, 96)),
    "all-zero": lambda: torch.zeros(32, 64),
    "tiny": lambda: torch.randn(32, 64) * 1e-6,  # an F16 copy's amax/2688 underflows F16: the float32 quotient
}


@pytest.mark.parametrize("action", ["nvfp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_an_encoder_given_the_checked_amax_writes_what_it_would_have_measured(action, dtype, weight) -> None:
    # the conversion hands the encoder the max |w| its NaN/Inf check measured, sparing it a second pass (and on the
    # GPU a second wait); the bytes must be those of the encoder's own measurement, per-tensor scale included
    torch.manual_seed(0)
    w = WEIGHTS[weight]().to(dtype)
    bad, amax = encode.finite_check(w)
    assert bad == 0
    measured, given = encode.encode(action, w), encode.encode(action, w, "cpu", amax)
    assert given.keys() == measured.keys()
    for role, tensor in measured.items():
        assert torch.equal(given[role].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), role


def test_gate_tiles_cover_start_middle_and_end_within_the_budget() -> None:
    assert gate.row_tiles(100, 64) == [(0, 100)]
    assert gate.row_tiles(1000, 64) == [(0, 128), (512, 640), (896, 1000)]
    assert gate.row_tiles(1000, 30000) == [(0, 128), (896, 1000)]  # 3 tiles would pass the element budget
    assert gate.row_tiles(1000, 10**6) == [(384, 512)]  # at least one tile, from the middle


def test_gate_measures_exactly_the_reference_error_on_a_correct_file(sources, tmp_path) -> None:
    result = convert(sources[2], tmp_path / "out.safetensors", VARIANT)
    assert result.written and result.gate.layer_errors
    assert all(e["rel_error"] == e["baseline"] for e in result.gate.layer_errors.values())


def test_gate_refuses_a_per_tensor_scale_that_is_not_the_sources(sources, tmp_path, monkeypatch) -> None:
    """A self-consistent encoding with 4x the scale decodes fine, but it is not what the plan promised."""
    from reference_specs.formats import fast_encode

    def scaled_encoder(weight, device="cpu", amax=None):
        scale = fast_encode.nvfp4_scale(weight) * 4
        return fast_encode.encode_nvfp4(weight, scale, device=device)

    monkeypatch.setitem(encode.ENCODERS, "nvfp4", scaled_encoder)
    out = tmp_path / "out.safetensors"
    result = convert(sources[2], out, VARIANT)
    assert result.refused and not out.exists()
    assert any("does not belong to this weight" in f.message for f in result.gate.findings)


def test_parallel_reads_give_the_same_tensor(sources, monkeypatch) -> None:
    from inspect_tools.readers import open_checkpoint

    monkeypatch.setattr(source_stream, "PARALLEL_READ_BYTES", 1024)
    with open_checkpoint(sources[2]) as reader:
        pool = BufferPool(budget=1 << 26)
        stream = source_stream.SourceStream(reader, pool, read_threads=3)
        try:
            for info in reader:
                tensor, _ = stream.load(info.name)
                assert torch.equal(tensor, reader.load(info.name)), info.name
        finally:
            stream.close()


def test_write_back_requests_do_not_change_the_bytes(sources, tmp_path, monkeypatch) -> None:
    reference = tmp_path / "reference.safetensors"
    assert convert(sources[2], reference, VARIANT).written
    monkeypatch.setattr(stages, "WRITEBACK_BYTES", 1)  # a request after every layer
    out = tmp_path / "out.safetensors"
    assert convert(sources[2], out, VARIANT).written
    assert sha256(out) == sha256(reference)


@pytest.fixture
def pools(monkeypatch) -> list[BufferPool]:
    """Every BufferPool a conversion creates during the test, for assertions on its budget and peak."""
    created: list[BufferPool] = []

    class Recorded(BufferPool):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(stages, "BufferPool", Recorded)
    return created


def test_the_tightest_budget_holds_and_does_not_deadlock(sources, tmp_path, monkeypatch, pools) -> None:
    """With no floor the pool may hold only two of the largest layers: the run still completes, within it."""
    monkeypatch.setattr(stages, "POOL_FLOOR_BYTES", 0)
    result = convert(sources[8], tmp_path / "out.safetensors", VARIANT)
    largest = max(lp.source_bytes for lp in result.plan.layers)
    assert result.written and pools[0].budget == 2 * largest
    assert 0 < pools[0].peak <= pools[0].budget and pools[0].in_use == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 4321])
def test_narrowing_in_place_gives_the_same_values_as_a_cast(monkeypatch, dtype: torch.dtype, n: int) -> None:
    monkeypatch.setattr(encode, "NARROW_CHUNK", 1000)  # several chunks, and a partial last one
    source = torch.randn(n, dtype=torch.float32) * 1e3
    expected = source.to(dtype)
    narrowed = encode.cast(source.clone(), "BF16" if dtype == torch.bfloat16 else "F16", reuse=True)
    assert torch.equal(narrowed.view(torch.int16), expected.view(torch.int16))


def test_a_narrowed_kept_tensor_shares_its_source_buffer() -> None:
    source = torch.randn(64, 32)
    narrowed = encode.cast(source, "BF16", reuse=True)
    assert narrowed.shape == source.shape
    assert narrowed.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def test_streamed_kept_tensors_give_the_same_bytes(sources, tmp_path, monkeypatch) -> None:
    """Kept tensors streamed in small chunks (a partial last one too) land exactly where a whole-tensor cast would."""
    reference = tmp_path / "reference.safetensors"
    assert convert(sources[2], reference, VARIANT).written
    monkeypatch.setattr(source_stream, "STREAM_MIN_BYTES", 1)  # every kept tensor is streamed
    monkeypatch.setattr(source_stream, "STREAM_CHUNK_BYTES", 100)
    for threads in (True, False):
        out = tmp_path / f"streamed-{threads}.safetensors"
        assert convert(sources[2], out, VARIANT, threads=threads).written
        assert sha256(out) == sha256(reference)


def test_the_pool_is_sized_by_the_tensors_read_whole(sources, tmp_path, monkeypatch, pools) -> None:
    monkeypatch.setattr(stages, "POOL_FLOOR_BYTES", 0)
    monkeypatch.setattr(source_stream, "STREAM_MIN_BYTES", 1)
    result = convert(sources[2], tmp_path / "out.safetensors", VARIANT)
    # only quantized weights are read whole (their biases, too, are kept tensors, streamed)
    whole = max(lp.source.tensors["weight"].nbytes for lp in result.plan.layers if lp.quantized)
    assert result.written and pools[0].budget == 2 * whole < 2 * max(lp.source_bytes for lp in result.plan.layers)


def test_a_non_finite_streamed_tensor_is_refused_with_every_bad_value_counted(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    from inspect_tools.synthetic import float_state_dict

    tensors = float_state_dict(VARIANT)
    kept = tensors["head.head.weight"]
    kept.view(-1)[[0, 7, kept.numel() - 1]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    tensors["blocks.0.ffn.0.weight"][3, 5] = float("nan")  # read whole, before the streamed one in the same run
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    monkeypatch.setattr(source_stream, "STREAM_MIN_BYTES", 1)
    monkeypatch.setattr(source_stream, "STREAM_CHUNK_BYTES", 64)
    out = tmp_path / "out.safetensors"
    result = convert(src, out, VARIANT)
    assert result.refused and not out.exists()
    assert not next(lp for lp in result.plan.layers if lp.source and lp.source.name == "head.head").quantized
    assert result.non_finite["head.head"] == 3 and result.non_finite["blocks.0.ffn.0"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["nan.safetensors"]
