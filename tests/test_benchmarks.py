"""The benchmark helpers measure what they say: the parallel reference writer gives write_float's tensors (linears at
unit gain, for ComfyUI's fp16 compute on a GPU), a child's peak RSS is its own, and a job past its deadline is cut
short, not waited for."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import verify as bench
from inspect_tools.synthetic import write_float

TINY = {"dim": 256, "ffn": 512, "blocks": 2, "heads": 2, "text_dim": 64, "freq_dim": 32}


def test_parallel_reference_holds_write_floats_tensors_with_linears_at_unit_gain(tmp_path):
    expected = load_file(write_float(tmp_path / "float.safetensors", "wan2.2-t2v-a14b", dims=TINY,
                                     dtype=torch.float32))
    got = load_file(bench.write_reference(tmp_path / "parallel.safetensors", "wan2.2-t2v-a14b", TINY, workers=2))

    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == torch.bfloat16, key
        if tensor.dim() == 2 and key.endswith(".weight"):
            # the same values times one factor, chosen so that the squared Frobenius norm is out_features
            factor = tensor.shape[0] ** 0.5 / float(torch.linalg.vector_norm(tensor.double()))
            assert torch.allclose(got[key].float(), tensor * factor, rtol=2**-8, atol=0), key
            assert float(torch.linalg.vector_norm(got[key].double())) ** 2 == pytest.approx(tensor.shape[0], rel=1e-2)
        else:
            assert torch.equal(got[key], tensor.to(torch.bfloat16)), key


def test_a_childs_peak_rss_is_its_own_and_counts_what_it_touched():
    # 300 MB written page by page (bytearray zero-fills): resident, whatever the allocator does
    r = bench.run_child([sys.executable, "-c", "b = bytearray(300 * 2**20); print(len(b))"])

    assert r["returncode"] == 0 and r["stdout"].strip() == str(300 * 2**20)
    assert 300 <= r["peak_rss_mb"] < 600
    assert r["peak_gpu_mb"] is None and not r["cut_short"]


def test_a_job_past_its_deadline_is_cut_short():
    started = time.perf_counter()
    r = bench.run_child([sys.executable, "-c", "import time; time.sleep(60)"], limit_s=0.5)

    assert r["cut_short"] and r["returncode"] != 0
    assert time.perf_counter() - started < 10


def test_a_traceback_is_a_failure_and_findings_with_a_document_are_not():
    traceback = {"returncode": 1, "stdout": "", "stderr": "Traceback ..."}
    findings = {"returncode": 1, "stdout": '{"summary": {}}', "stderr": ""}

    assert bench.failure(traceback, (0, 1), json_out=True) is not None
    assert bench.failure(findings, (0, 1), json_out=True) is None


def test_the_sensitivity_summary_reads_an_infinite_risk_as_nvdiag_spells_it():
    # print_json writes non-finite floats as strings (JSON has no Infinity): a layer with no W4A16 error at all
    doc = {"layers": [{"layer": "blocks.0.ffn.0", "risk": "inf"}, {"layer": "blocks.0.ffn.2", "risk": 1.4}],
           "pieces": 1}

    assert bench.sensitivity_summary(doc).startswith("2 layers measured, 1 with risk > 2 (1 of them inf)")


def test_a_trace_shows_a_conversions_steps_in_order(wan_float_sharded_diffusers, tmp_path, capsys):
    from benchmarks import trace

    out, raw = tmp_path / "out.safetensors", tmp_path / "trace.json"
    assert trace.main(["--cold", "--json", str(raw), "--", "convert", str(wan_float_sharded_diffusers), str(out),
                       "--preset", "wan2.2-ti2v-5b"]) == 0

    assert out.exists() and "exit code 0" in capsys.readouterr().out
    events = json.loads(raw.read_text())["events"]
    names = [name.split(" (")[0] for _, name in events]
    steps = ["torch imported", "phase plan ends", "first layer", "last layer", "phase stream ends",
             "phase gate ends", "phase commit ends", "os._exit"]
    assert [n for n in names if n in steps] == steps  # every hook still finds its target, in the command's order
    times = [t for t, _ in events]
    assert times == sorted(times) and 0 < times[0] < times[-1]  # on the process's clock, which starts before us
    handed = [values["layers"] for _, values in json.loads(raw.read_text())["progress"] if "layers" in values]
    last = int(next(name for _, name in events if name.startswith("last layer")).split("(")[1].rstrip(")"))
    assert handed == sorted(handed) and handed[-1] <= last  # sampled every 10 ms: the count as the disk read


def test_a_trace_shows_a_roundtrips_checked_pairs(wan_nvfp4_mixed, wan_float, tmp_path):
    from benchmarks import trace

    raw = tmp_path / "trace.json"
    assert trace.main(["--json", str(raw), "--", "roundtrip", str(wan_nvfp4_mixed), "--against", str(wan_float),
                       "--format", "json"]) in (0, 1)
    events = json.loads(raw.read_text())["events"]
    names = [name.split(" (")[0] for _, name in events]
    steps = ["torch imported", "pairs start", "first pair checked", "last pair checked", "os._exit"]
    assert [n for n in names if n in steps] == steps
    last = next(name for _, name in events if name.startswith("last pair checked"))
    assert int(last.split("(")[1].rstrip(")")) > 1


def test_every_tree_runs_both_before_and_after_every_other():
    from benchmarks.gpu import run_order

    names = ["cat", "read+write", "new", "start"]
    for first in (0, 2, 4):
        orders = [run_order(names, rep) for rep in (first, first + 1)]
        assert all(sorted(order) == sorted(names) for order in orders)
        for a in names:
            for b in names:
                if a != b:  # a before b in one repetition of the two and after it in the other
                    assert {order.index(a) < order.index(b) for order in orders} == {True, False}
    assert len({run_order(names, rep)[0] for rep in range(0, 8, 2)}) == 4  # each name leads a repetition
    assert run_order([], 3) == [] and run_order(["new"], 1) == ["new"]


def test_counters_are_read_at_the_end_of_each_half_second():
    from benchmarks import trace

    samples = [(1.0, {}), (1.2, {"pairs": 1}), (1.45, {"pairs": 3}), (1.6, {"pairs": 4}), (2.7, {"pairs": 9})]
    # windows [1.0, 1.5), [1.5, 2.0), [2.0, 2.5), [2.5, 3.0): the last value seen before each window's end
    assert trace.counter_windows(samples) == {"pairs": [3, 4, 4, 9]}
    assert trace.counter_windows([]) == {}


def test_the_read_and_write_floor_writes_exactly_the_outputs_size_and_removes_it(tmp_path):
    from benchmarks import gpu

    sources = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, path in enumerate(sources):
        path.write_bytes(bytes([i]) * (3 << 20))
    target = tmp_path / "floor.bin"
    seen = []

    def keep(path: object) -> None:  # inspect the written file before the floor removes it
        seen.append(target.stat().st_size)
        original_unlink(path)

    original_unlink = type(target).unlink
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(target), "unlink", keep)
        seconds = gpu.read_and_write(sources, target, (5 << 20) + 7)
    assert seconds > 0
    assert seen == [(5 << 20) + 7]  # exactly the output's size, not rounded up to dd's block
    assert not target.exists()


def test_warm_conversions_report_each_conversions_phases(tmp_path, capsys):
    from benchmarks import warm

    warm.main(["--size-gb", "0.01", "--reps", "1", "--rounds", "1", "--device", "cpu", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    run = next(line for line in out.splitlines() if line.startswith("round 0 new"))
    assert all(f"{phase} " in run for phase in ("seconds", "stream", "gate", "commit", "encode_busy"))
    assert "medians over 1 x 1 conversions" in out


def test_the_torch_floor_moves_every_quantized_weight_and_writes_the_outputs_size(wan_float, tmp_path):
    import subprocess

    from safetensors import safe_open

    from converter.pipeline import convert

    out = tmp_path / "converted.safetensors"
    convert(wan_float, out, "wan2.2-ti2v-5b")
    with safe_open(str(out), "pt") as converted, safe_open(str(wan_float), "pt") as source:
        quantized = [k.removesuffix("_scale_2") for k in converted.keys() if k.endswith(".weight_scale_2")]
        assert {source.get_slice(k).get_dtype() for k in quantized} == {"F32"}
        expected = sum(4 * math.prod(source.get_slice(k).get_shape()) for k in quantized)
    assert quantized  # the preset quantizes this checkpoint's linears

    target = tmp_path / "floor.bin"
    done = subprocess.run([sys.executable, "-m", "benchmarks.floor", str(wan_float), str(target), "--out-bytes",
                           "12345", "--device", "cpu"], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["moved_bytes"] == expected  # the FP32 bytes of exactly the weights convert quantized
    assert target.stat().st_size == 12345
    times = report["times"]
    assert list(times) == sorted(times, key=times.get)  # each part ended after the one before
    assert {"torch imported", "weights on the device", "output durable", "end"} <= set(times)

