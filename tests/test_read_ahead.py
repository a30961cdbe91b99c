"""Reads moved earlier, never changed: the page-cache warmer that starts before torch is imported
(inspect_tools.readers.prefetch) and roundtrip's read-ahead (inspect_tools.read_ahead)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inspect_tools import read_ahead, roundtrip
from inspect_tools.cli import main
from inspect_tools.errors import InputError
from inspect_tools.layers import open_model
from inspect_tools.readers import open_checkpoint, prefetch
from inspect_tools.synthetic import write_float

VARIANT = "wan2.2-ti2v-5b"
TINY = {"dim": 64, "ffn": 128, "text_dim": 64, "freq_dim": 64, "heads": 1, "blocks": 2}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_float(tmp_path_factory.mktemp("ahead") / "src", VARIANT, TINY, naming="diffusers", sharded=2)


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory) -> Path:
    from converter.pipeline import convert

    out = tmp_path_factory.mktemp("ahead-out") / "out.safetensors"
    assert convert(src, out, VARIANT).written
    return out


def test_the_warmer_reads_every_tensor_of_a_checkpoint_in_file_order(src) -> None:
    warmer = prefetch.warm_checkpoint(src)
    assert warmer is not None
    warmer.stop()  # waits for the threads: the reading has ended either way
    with open_checkpoint(src) as reader:
        infos = sorted(reader.tensors.values(), key=lambda t: (str(t.file), t.offset))
        total = sum(t.nbytes for t in infos)
    warmer = prefetch.Warmer(prefetch.tensor_ranges(infos))
    warmer.join()
    assert warmer.done_bytes == total and not warmer.alive
    paths = [path for path, _, _ in warmer.ranges]
    assert paths == sorted(paths, key=str)  # one shard after the other, each from its start


def test_ranges_that_touch_are_read_as_one() -> None:
    a, b = Path("a"), Path("b")
    assert prefetch.merged([(a, 0, 10), (a, 10, 5), (a, 20, 1), (b, 21, 1), (b, 22, 0)]) == [
        (a, 0, 15), (a, 20, 1), (b, 21, 1)]


def test_a_reader_that_catches_up_stops_the_warmer(tmp_path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(4 * prefetch.READ_BYTES))
    piece = prefetch.READ_BYTES
    warmer = prefetch.Warmer([(f, 0, 4 * piece)], limit=0)  # reads nothing: the test moves its frontier by hand
    assert warmer.proc is None
    warmer._done = 2 * piece  # the first two pieces are read
    warmer.caught_up(f, piece + 1)  # a miss behind the frontier (an evicted page): warming goes on
    assert not warmer._stop.is_set()
    warmer.caught_up(tmp_path / "other.bin", 0)  # not one of its files
    assert not warmer._stop.is_set()
    warmer.caught_up(f, 2 * piece + 7)  # the reader is where the warmer would read next: it stops
    assert warmer._stop.is_set()


def test_the_warming_process_reads_its_ranges_in_order_up_to_its_limit(tmp_path) -> None:
    from inspect_tools.readers import warm_child

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(bytes(100))
    b.write_bytes(bytes(30))
    reports: list[int] = []
    assert warm_child.warm([(str(a), 10, 50), (str(b), 0, 30)], 16, 1 << 20, reports.append) == 80
    assert reports == [16, 32, 48, 50, 66, 80]  # one report per piece, pieces never cross a range
    reports.clear()
    assert warm_child.warm([(str(a), 0, 100)], 16, 40, reports.append) == 48  # stops at the first piece past 40
    assert warm_child.warm([(str(b), 0, 64)], 16, 1 << 20, reports.append) == 16  # b ends early: stops there


def test_the_warming_process_tells_cached_bytes_from_bytes_it_must_read(tmp_path) -> None:
    from inspect_tools.readers import warm_child

    f = tmp_path / "sparse.bin"
    with f.open("wb") as fh:
        fh.truncate(8 << 20)  # a hole: no page of it has been in the page cache
    fd = os.open(f, os.O_RDONLY)
    try:
        assert not warm_child.cached(fd, 12_345, 1 << 20)
        os.pread(fd, 2 << 20, 0)  # now the first 2 MiB are
        assert warm_child.cached(fd, 12_345, 1 << 20)
        assert not warm_child.cached(fd, 12_345, 4 << 20)  # partly cached is not cached
        assert not warm_child.cached(fd, (8 << 20) - 10, 20)  # past the end of the file: left to the read
    finally:
        os.close(fd)


def test_the_warming_process_does_not_copy_what_is_cached_again(tmp_path, monkeypatch) -> None:
    from inspect_tools.readers import warm_child

    f = tmp_path / "a.bin"
    f.write_bytes(bytes(100))
    reads: list[int] = []
    real = os.preadv

    def counting(fd, buffers, offset):
        reads.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    reports: list[int] = []
    monkeypatch.setattr(warm_child, "cached", lambda fd, offset, size: offset < 48)
    assert warm_child.warm([(str(f), 0, 100)], 16, 1 << 20, reports.append) == 100
    assert reports == [16, 32, 48, 64, 80, 96, 100]  # progress for every piece, cached or read
    assert reads == [48, 64, 80, 96]  # only the pieces that were not cached were read


def test_stopping_the_warmer_ends_its_process(tmp_path) -> None:
    f = tmp_path / "big.bin"
    with f.open("wb") as fh:
        fh.truncate(64 * prefetch.READ_BYTES)  # sparse: 4 GiB that take no disk
    warmer = prefetch.Warmer([(f, 0, 64 * prefetch.READ_BYTES)])
    assert warmer.alive
    warmer.stop()
    assert not warmer.alive and warmer.proc.returncode is not None
    assert warmer.done_bytes < 64 * prefetch.READ_BYTES


def test_a_warmer_whose_process_cannot_start_leaves_the_reading_to_the_command(tmp_path, monkeypatch) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(1000))
    monkeypatch.setattr(prefetch.sys, "executable", str(tmp_path / "no-such-python"))
    warmer = prefetch.Warmer([(f, 0, 1000)])
    assert warmer.proc is None and not warmer.alive and warmer.done_bytes == 0
    warmer.caught_up(f, 0)  # harmless
    warmer.stop()


def test_what_is_not_a_safetensors_checkpoint_is_not_warmed(tmp_path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    assert prefetch.warm_checkpoint(tmp_path / "x.txt") is None
    assert prefetch.warm_checkpoint(tmp_path / "missing.safetensors") is None


def test_an_offered_tensor_is_loaded_once_then_the_file_is_read_again(src) -> None:
    with open_checkpoint(src) as reader:
        info = next(t for t in reader.tensors.values() if t.dtype == "F32" and t.nbytes)
        stored = reader.load(info.name)
        ahead = stored.clone()
        assert not reader.offer(info.name, ahead.reshape(-1)[:1])  # not this tensor's shape: refused
        assert reader.offer(info.name, ahead)
        assert reader.load(info.name) is ahead
        again = reader.load(info.name)
        assert again is not ahead and torch.equal(again, stored)
        assert reader.offer(info.name, ahead)
        reader.forget(info.name)
        assert reader.load(info.name) is not ahead


def test_roundtrip_reads_ahead_and_measures_the_same(src, converted, monkeypatch) -> None:
    with open_model(converted) as mine, open_model(src) as ref:
        ahead = {r.name: (r.status, r.error) for r in roundtrip.roundtrip(mine, ref).layers}
    monkeypatch.setattr(roundtrip, "read_ahead", lambda pairs, *_: iter(pairs))  # each read where it is used
    with open_model(converted) as mine, open_model(src) as ref:
        plain = {r.name: (r.status, r.error) for r in roundtrip.roundtrip(mine, ref).layers}
    assert ahead == plain and len(ahead) > 0


def test_read_ahead_reads_what_roundtrip_loads_and_offers_it(src, converted) -> None:
    with open_model(converted) as mine, open_model(src) as ref:
        pairs = read_ahead.quantized_pairs(mine, ref)
        assert pairs == roundtrip.select_pairs(roundtrip.align_layers(mine, ref).pairs)
        assert read_ahead.UNUSED_ROLES == roundtrip.UNUSED_ROLES
        with read_ahead.ReadAhead(pairs, mine, ref, budget=0) as ahead:
            ahead.before(0)
            ref_weight = pairs[0].ref.tensors["weight"].name
            loaded = ref.reader.load(ref_weight)  # served from what was read ahead...
            assert ref.reader.load(ref_weight) is not loaded  # ...once
            assert torch.equal(loaded, ref.reader.load(ref_weight))
            ahead.after(0)
            assert 1 in ahead._pending  # the next pair is being read already


def test_a_file_cut_short_after_it_was_opened_is_still_an_input_error(src, tmp_path) -> None:
    """A read ahead that fails is not offered: the measurement's own read reports the file."""
    import shutil

    from converter.pipeline import convert

    copy = tmp_path / "src"
    shutil.copytree(src.parent, copy)
    index = copy / src.name
    out = tmp_path / "out.safetensors"
    assert convert(index, out, VARIANT).written
    with open_model(out) as mine, open_model(index) as ref:
        weight = read_ahead.quantized_pairs(mine, ref)[-1].ref.tensors["weight"].name
        last = ref.reader.tensors[weight]
        os.truncate(last.file, last.offset + 1)
        with pytest.raises(InputError, match="shorter than its header"):
            roundtrip.roundtrip(mine, ref)


def test_the_roundtrip_command_warms_and_stops(src, converted, capsys) -> None:
    assert main(["roundtrip", str(converted), "--against", str(src), "--format", "json"]) == 0
    assert prefetch._active is None  # stopped when the command ended


def test_read_ahead_falls_back_to_pageable_buffers_where_memory_cannot_be_pinned(monkeypatch) -> None:
    empty = torch.empty

    def refuse_pinning(*args, pin_memory: bool = False, **kwargs):
        if pin_memory:
            raise RuntimeError("cannot pin")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refuse_pinning)
    buffers = read_ahead._ReadBuffers(pinned=True, keep=read_ahead.READ_AHEAD_BYTES)
    assert buffers.acquire(4096).numel() == 4096 and not buffers.pinned


MB = 1 << 20


def test_a_buffer_given_back_is_handed_out_again_for_a_tensor_it_fits() -> None:
    pool = read_ahead._ReadBuffers(pinned=False, keep=64 * MB)
    buf = pool.acquire(4 * MB)
    first = buf.data_ptr()
    pool.release(buf)
    del buf  # the reader's reference: once it is gone, only the pool holds the buffer
    again = pool.acquire(3 * MB)  # fits: 4 MB wastes less than the 3 MB it holds
    assert again.data_ptr() == first and again.numel() == 4 * MB and pool.reused == 1
    pool.release(again)
    del again
    assert pool.acquire(MB + 1).data_ptr() != first  # 4 MB for 1 MB would waste more than it holds: a new one


def test_a_buffer_still_viewed_is_not_handed_out_again_until_the_view_is_gone() -> None:
    pool = read_ahead._ReadBuffers(pinned=False, keep=64 * MB)
    buf = pool.acquire(2 * MB)
    first = buf.data_ptr()
    weight = buf[4096: 4096 + MB].view(torch.float32)  # what a measurement holds: a view of the buffer
    weight.fill_(1.5)
    pool.release(buf)
    del buf
    other = pool.acquire(2 * MB)
    assert other.data_ptr() != first
    other.fill_(0)
    assert bool((weight == 1.5).all())  # the view's bytes were not handed to the next tensor
    del weight
    assert pool.acquire(2 * MB).data_ptr() == first  # now nothing views it


def test_the_free_buffers_stay_within_the_bound_and_the_oldest_go_first() -> None:
    pool = read_ahead._ReadBuffers(pinned=False, keep=5 * MB)
    bufs = [pool.acquire(2 * MB) for _ in range(3)]
    ptrs = [b.data_ptr() for b in bufs]
    for b in bufs:
        pool.release(b)
    del bufs, b
    assert pool.in_use == 0 and pool.free_bytes == 4 * MB  # the third 2 MB would pass 5 MB: the oldest was dropped
    assert {pool.acquire(2 * MB).data_ptr() for _ in range(2)} == set(ptrs[1:])


def test_small_and_pinned_buffers_are_not_kept() -> None:
    pool = read_ahead._ReadBuffers(pinned=False, keep=64 * MB)
    pool.release(pool.acquire(read_ahead.POOL_MIN_BYTES - 1))  # malloc's heap reuses these already
    assert pool.free_bytes == 0
    pinned = read_ahead._ReadBuffers(pinned=True, keep=64 * MB)  # torch's pinned allocator reuses its own blocks
    pinned.release(pinned.acquire(2 * MB))
    assert pinned.free_bytes == 0 and pinned.in_use == 0


def test_without_torchs_storage_use_count_every_buffer_is_fresh(monkeypatch) -> None:
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    pool = read_ahead._ReadBuffers(pinned=False, keep=64 * MB)
    assert not pool.reusing
    pool.release(pool.acquire(2 * MB))
    assert pool.free_bytes == 0 and pool.reused == 0


def test_read_ahead_reuses_buffers_and_a_tensor_held_past_its_pair_keeps_its_bytes(src, converted,
                                                                                  monkeypatch) -> None:
    monkeypatch.setattr(read_ahead, "POOL_MIN_BYTES", 1)  # the tiny model's tensors are kilobytes
    with open_model(converted) as mine, open_model(src) as ref:
        pairs = read_ahead.quantized_pairs(mine, ref)
        held = []
        with read_ahead.ReadAhead(pairs, mine, ref, budget=128 << 10) as ahead:  # a few pairs at a time
            for i, pair in enumerate(pairs):
                ahead.before(i)
                weight = ref.reader.load(pair.ref.tensors["weight"].name)
                if i % 3 == 0:
                    held.append((weight, weight.clone()))  # kept past after(i), as a caller's local may be
                del weight  # the others are let go: their buffers may be handed out again
                ahead.after(i)
            reused = ahead.buffers.reused
        # closed: every read has landed, so any tensor read into a held buffer would show here
        assert reused > 0 and len(held) > 2
        assert all(torch.equal(t, copy) for t, copy in held)


def test_roundtrip_measures_the_same_when_read_ahead_reuses_its_buffers(src, converted, monkeypatch) -> None:
    def measured() -> list[roundtrip.LayerResult]:
        with open_model(converted) as mine, open_model(src) as ref:
            return sorted(roundtrip.roundtrip(mine, ref).layers, key=lambda r: r.name)

    plain = measured()
    monkeypatch.setattr(read_ahead, "POOL_MIN_BYTES", 1)
    monkeypatch.setattr(read_ahead, "READ_AHEAD_BYTES", 128 << 10)  # a few pairs in flight: buffers come back
    pools: list[read_ahead._ReadBuffers] = []
    made = read_ahead._ReadBuffers.__init__

    def recorded(self, *args, **kwargs) -> None:
        made(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(read_ahead._ReadBuffers, "__init__", recorded)
    assert measured() == plain and len(plain) > 0
    assert pools and pools[0].reused > 0
