"""GPU benchmark of the whole commands: `python -m benchmarks.gpu [--size-gb 4] [--reps 3] [--tree NAME=DIR ...]
[--no-roundtrip] [--cpu-gb 2] [--cpu-reps 2] [--dir DIR] [--json FILE]`.

Everything is timed as users run it: the `nvdiag` command in a fresh process (interpreter start, imports, CUDA
start and teardown included). On a machine with CUDA, in one run:
  cpu       `nvdiag convert --device cpu` (warm cache): the reference output
  cold      --reps repetitions, interleaved (the order rotates each repetition), each from a cold cache (the files'
            pages dropped with posix_fadvise DONTNEED after an fsync): a plain read (`cat > /dev/null`) of the
            source, the same read beside a durable write (dd ... conv=fsync) of as many bytes as the output has
            ("read+write": the disk work of a conversion, without the conversion), the "torch floor"
            (benchmarks/floor.py: that disk work plus torch's import, CUDA's start and the quantized weights
            moved to the GPU, in one process: no conversion on torch can be faster), and for every code tree
            `nvdiag convert --device cuda` (its output's sha256 checked against the cpu one) then `nvdiag roundtrip
            --device cuda` of that output against the source (both cold)
  cpu ratio (--cpu-gb > 0) on a source of that size, warm cache: `nvdiag convert --device cpu` and `nvdiag roundtrip
            --device cpu` of its output, --cpu-reps times per tree
Bytecode: a package manager writes every module's bytecode when it installs it, so a user's `import torch` reads
cached bytecode. A host that forbids writing it (PYTHONDONTWRITEBYTECODE, as the H200 hosts of the device tool set)
compiles torch's ~860 modules in every process instead: 2.2-2.9 s there, more than `cat` of a 4 GB source. So the
children write and read their bytecode under the work folder (PYTHONPYCACHEPREFIX), one untimed warm-up run of
each command per tree fills it, and --compile-every-start measures the host as it is set up.
The timed runs then print medians: seconds of the process, seconds the command reports for itself (and its phases:
plan, stream, gate, commit), peak RSS (the child's
ru_maxrss), cat / convert (target >= 0.85), read+write / convert (1.0 would be a conversion that costs nothing but
its disk work), roundtrip / convert (targets: cuda <= 1.1, cpu <= 1.2).
A tree is a checkout of nvdiag: `--tree base=/path/to/old/checkout` runs the old code beside this one ("new", always
run) on the same files in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import NVDIAG
from benchmarks.convert import VARIANT, generate

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "read+write"  # the baseline of read_and_write
TORCH_FLOOR = "torch floor"  # benchmarks/floor.py: a conversion's unavoidable work in a torch process
BASELINES = ("cat", FLOOR, TORCH_FLOOR)


def source_files(index: Path) -> list[Path]:
    return sorted(index.parent.glob("*.safetensors"))


def drop_cache(paths: list[Path]) -> None:
    """Evict these files' pages (only theirs) so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def read_into_cache(paths: list[Path]) -> None:
    """Read the files once, so the runs that follow find them in the page cache (the warm-cache measurements)."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(64 << 20):
                pass


def read_and_write(paths: list[Path], target: Path, nbytes: int) -> float:
    """`cat` of the source beside a durable write (fsync, as convert publishes) of `nbytes` to `target`: the disk
    work of a conversion without the conversion. Seconds until both are done. On a disk whose reads and writes share
    its bandwidth this, not `cat`, is the floor of a conversion that writes its output."""
    started = time.perf_counter()
    writer = subprocess.Popen(["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={nbytes}",
                               "iflag=count_bytes", "conv=fsync", "status=none"])
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    if writer.wait() != 0:
        raise SystemExit("dd failed: cannot measure the read+write floor")
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def torch_floor(src: Path, target: Path, nbytes: int) -> dict:
    """One process of benchmarks/floor.py (this tree's code): the source's quantized weights through the GPU and a
    durable write of `nbytes`, with torch's import and CUDA's start, and no conversion work. Its seconds and its
    own timeline (when torch was imported, the device ready, the weights moved, the output durable)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.floor", str(src), str(target), "--out-bytes",
                           str(nbytes), "--preset", VARIANT], cwd=ROOT, env=tree_env(ROOT), capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - started
    target.unlink(missing_ok=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.floor failed with {done.returncode}:\n{done.stderr[-2000:]}")
    return {"seconds": elapsed, **json.loads(done.stdout.strip().splitlines()[-1])}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a child that runs `tree`'s code: the tree first on the path, the rest (site packages, a
    ComfyUI copy) kept."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *rest])}


def run_child(tree: Path, *args: str) -> dict:
    """One `nvdiag ARGS --format json` in a fresh process of `tree`'s code: its seconds, its own peak RSS (os.wait4
    on the child) and its JSON document."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full stderr pipe would block the child
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", NVDIAG, *args, "--format", "json"], cwd=tree,
                                env=tree_env(tree), stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.stdout.close()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):
            err.seek(0)
            raise SystemExit(f"nvdiag {' '.join(args)} ({tree}) failed with {code}:\n"
                             f"{err.read().decode(errors='replace')[-2000:]}")
    return {"process_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "doc": json.loads(out)}


def convert_cmd(tree: Path, src: Path, out: Path, device: str) -> dict:
    r = run_child(tree, "convert", str(src), str(out), "--preset", VARIANT, "--device", device, "--force")
    report = r.pop("doc")["convert"]
    r["seconds"] = report["seconds"]
    r["timings"] = report.get("timings", {})  # absent in trees older than the phases in the JSON
    return r


def roundtrip_cmd(tree: Path, out: Path, src: Path, device: str) -> dict:
    r = run_child(tree, "roundtrip", str(out), "--against", str(src), "--device", device)
    summary = r.pop("doc")["summary"]
    r.update(checked=summary["checked"], wrong=summary["decode_wrongly"], worst=summary["worst_rel_error"])
    return r


def parse_trees(specs: list[str]) -> dict[str, Path]:
    trees = {"new": ROOT}
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            raise SystemExit(f"--tree {spec!r}: expected NAME=DIR")
        trees[name] = Path(folder).resolve()
    return trees


def run_order(names: list[str], rep: int) -> list[str]:
    """The order of repetition `rep`: each odd repetition the reverse of the even one before it, so that every name
    runs before and after every other in each two repetitions (a rotation alone keeps neighbours in one order: the
    second of two trees would always run right after the first); each even one rotated by one more place."""
    k = (rep // 2) % len(names) if names else 0
    rotated = names[k:] + names[:k]
    return rotated[::-1] if rep % 2 else rotated


def cold_series(src: Path, work: Path, files: list[Path], trees: dict[str, Path], reps: int, reference: str,
                roundtrip: bool, out_bytes: int) -> dict[str, list[dict]]:
    """reps interleaved cold runs of cat, of cat beside a write of the output's size (read_and_write), and of every
    tree's convert (+ roundtrip), in run_order."""
    names = [*BASELINES, *trees]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for name, tree in trees.items():  # untimed: fills the bytecode cache (and the page cache's share of the code)
        out = work / f"cuda-{name}.safetensors"
        started = time.perf_counter()
        convert_cmd(tree, src, out, "cuda")
        if roundtrip:
            roundtrip_cmd(tree, out, src, "cuda")
        out.unlink()
        print(f"warm-up {name:12s} {time.perf_counter() - started:6.2f} s (untimed)", flush=True)
    for rep in range(reps):
        for name in run_order(names, rep):
            drop_cache(files)
            if name == "cat":
                runs["cat"].append({"seconds": plain_read(files)})
                print(f"rep {rep} cat          {runs['cat'][-1]['seconds']:6.2f} s", flush=True)
                continue
            if name == FLOOR:
                runs[FLOOR].append({"seconds": read_and_write(files, work / "floor.bin", out_bytes)})
                print(f"rep {rep} {FLOOR:12s} {runs[FLOOR][-1]['seconds']:6.2f} s (cat beside a durable write of "
                      f"{out_bytes / 1e9:.2f} GB)", flush=True)
                continue
            if name == TORCH_FLOOR:
                runs[TORCH_FLOOR].append(torch_floor(src, work / "torch-floor.bin", out_bytes))
                t = runs[TORCH_FLOOR][-1]["times"]
                print(f"rep {rep} {TORCH_FLOOR:12s} {runs[TORCH_FLOOR][-1]['seconds']:6.2f} s ("
                      + ", ".join(f"{k} {v:.2f}" for k, v in t.items()) + " s into it)", flush=True)
                continue
            out = work / f"cuda-{name}.safetensors"
            r = convert_cmd(trees[name], src, out, "cuda")
            r["identical"] = sha256(out) == reference
            if roundtrip:
                drop_cache([*files, out])
                r["roundtrip"] = roundtrip_cmd(trees[name], out, src, "cuda")
            runs[name].append(r)
            rt = r.get("roundtrip")
            print(f"rep {rep} {name:12s} convert process {r['process_s']:6.2f} s (in command {r['seconds']:6.2f} s, "
                  f"peak RSS {r['peak_rss_mb']:5.0f} MB, identical {r['identical']})"
                  + (f"  roundtrip process {rt['process_s']:6.2f} s (peak RSS {rt['peak_rss_mb']:5.0f} MB, "
                     f"{rt['checked']} checked, {rt['wrong']} wrong)" if rt else ""), flush=True)
            out.unlink()
    return runs


def summarize(runs: dict[str, list[dict]], gb: float) -> dict[str, dict]:
    """Medians per tree; each ratio is taken per repetition (against the cat of its own round), then the median."""
    cats = [r["seconds"] for r in runs["cat"]]
    floors = [r["seconds"] for r in runs[FLOOR]]
    summary: dict[str, dict] = {"cat": {"median_s": statistics.median(cats), "runs_s": cats},
                                FLOOR: {"median_s": statistics.median(floors), "runs_s": floors}}
    print(f"medians over {len(cats)} cold repetitions, source {gb:.2f} GB: cat {summary['cat']['median_s']:.2f} s "
          f"({gb / summary['cat']['median_s']:.2f} GB/s), {FLOOR} {summary[FLOOR]['median_s']:.2f} s")
    if runs.get(TORCH_FLOOR):
        rs = runs[TORCH_FLOOR]
        s = summary[TORCH_FLOOR] = {
            "median_s": statistics.median(r["seconds"] for r in rs),
            "cat_over_process": statistics.median(c / r["seconds"] for c, r in zip(cats, rs, strict=True)),
            "times": {k: statistics.median(r["times"][k] for r in rs) for k in rs[0]["times"]},
            "runs_s": [r["seconds"] for r in rs]}
        print(f"  {TORCH_FLOOR:12s} process {s['median_s']:6.2f} s  cat/process {s['cat_over_process']:.2f} (no "
              "conversion that moves its weights through torch gets above this)  medians, seconds into it: "
              + ", ".join(f"{k} {v:.2f}" for k, v in s["times"].items()))
    for name, rs in runs.items():
        if name in BASELINES:
            continue
        s = summary[name] = {
            "convert_process_s": statistics.median(r["process_s"] for r in rs),
            "convert_in_command_s": statistics.median(r["seconds"] for r in rs),
            "cat_over_process": statistics.median(c / r["process_s"] for c, r in zip(cats, rs, strict=True)),
            "cat_over_in_command": statistics.median(c / r["seconds"] for c, r in zip(cats, rs, strict=True)),
            "floor_over_process": statistics.median(f / r["process_s"] for f, r in zip(floors, rs, strict=True)),
            "convert_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "identical": all(r["identical"] for r in rs),
            "convert_runs_s": [r["process_s"] for r in rs],
        }
        line = (f"  {name:12s} convert process {s['convert_process_s']:6.2f} s (in command "
                f"{s['convert_in_command_s']:6.2f} s)  cat/process {s['cat_over_process']:.2f} (target >= 0.85)  "
                f"cat/in-command {s['cat_over_in_command']:.2f}  {FLOOR}/process {s['floor_over_process']:.2f}  "
                f"peak RSS {s['convert_peak_rss_mb']:.0f} MB  "
                f"byte-identical to cpu: {s['identical']}")
        phases = [p for p in ("plan", "stream", "gate", "commit") if all(p in r["timings"] for r in rs)]
        if phases:
            s["phases_s"] = {p: statistics.median(r["timings"][p] for r in rs) for p in phases}
            line += "\n  " + " " * 12 + " phases (medians): " + "  ".join(f"{p} {v:.2f} s"
                                                                       for p, v in s["phases_s"].items())
        if all("roundtrip" in r for r in rs):
            s.update(roundtrip_process_s=statistics.median(r["roundtrip"]["process_s"] for r in rs),
                     roundtrip_over_convert=statistics.median(r["roundtrip"]["process_s"] / r["process_s"]
                                                              for r in rs),
                     roundtrip_peak_rss_mb=max(r["roundtrip"]["peak_rss_mb"] for r in rs),
                     roundtrip_runs_s=[r["roundtrip"]["process_s"] for r in rs])
            line += (f"\n  {'':12s} roundtrip process {s['roundtrip_process_s']:6.2f} s  roundtrip/convert "
                     f"{s['roundtrip_over_convert']:.2f} (target <= 1.1)  peak RSS {s['roundtrip_peak_rss_mb']:.0f} MB")
        print(line)
    return summary


def cpu_ratio(work: Path, size_gb: float, trees: dict[str, Path], reps: int) -> dict[str, dict]:
    """CPU convert and CPU roundtrip of its output, processes on a warm cache, per tree: roundtrip / convert."""
    src = generate(work / "cpu-src", size_gb)
    read_into_cache(source_files(src))
    gb = sum(p.stat().st_size for p in source_files(src)) / 1e9
    report: dict[str, dict] = {}
    for rep in range(reps):
        for name in run_order(list(trees), rep):
            tree = trees[name]
            out = work / f"cpu-{name}.safetensors"
            c = convert_cmd(tree, src, out, "cpu")
            r = roundtrip_cmd(tree, out, src, "cpu")
            entry = report.setdefault(name, {"convert_s": [], "roundtrip_s": [], "ratios": []})
            entry["convert_s"].append(c["process_s"])
            entry["roundtrip_s"].append(r["process_s"])
            entry["ratios"].append(r["process_s"] / c["process_s"])
            print(f"cpu rep {rep} {name:12s} convert process {c['process_s']:6.2f} s  roundtrip process "
                  f"{r['process_s']:6.2f} s ({r['checked']} checked, {r['wrong']} wrong)", flush=True)
            out.unlink()
    print(f"cpu, {gb:.2f} GB source, warm cache, medians:")
    for name, entry in report.items():
        entry["median_ratio"] = statistics.median(entry["ratios"])
        print(f"  {name:12s} convert {statistics.median(entry['convert_s']):6.2f} s  roundtrip "
              f"{statistics.median(entry['roundtrip_s']):6.2f} s  roundtrip/convert {entry['median_ratio']:.2f} "
              "(target <= 1.2)")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0, help="GPU source size (0: skip the GPU series)")
    parser.add_argument("--reps", type=int, default=3, help="cold repetitions of each measurement")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="also run the nvdiag checkout in DIR (repeatable)")
    parser.add_argument("--no-roundtrip", action="store_true", help="time convert only")
    parser.add_argument("--cpu-gb", type=float, default=0.0, help="also the CPU roundtrip/convert ratio at this size")
    parser.add_argument("--cpu-reps", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--compile-every-start", action="store_true",
                        help="keep the host's bytecode setting (PYTHONDONTWRITEBYTECODE: every process compiles)")
    args = parser.parse_args(argv)
    import torch

    trees = parse_trees(args.tree)
    work = args.dir or Path(tempfile.mkdtemp(prefix="nvdiag-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.compile_every_start:  # the children's bytecode is kept under the work folder (module docstring)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    report: dict = {"cpu_cores": os.cpu_count(), "torch": torch.__version__, "trees": {k: str(v) for k, v in
                                                                                       trees.items()},
                    "bytecode": "compiled in every process" if args.compile_every_start else "cached"}
    try:
        if args.size_gb > 0:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: this benchmark measures the --device cuda path")
            report["device"] = torch.cuda.get_device_name()
            t0 = time.perf_counter()
            src = generate(work / "src", args.size_gb)
            files = source_files(src)
            size = sum(p.stat().st_size for p in files)
            report.update(source_bytes=size, generate_s=time.perf_counter() - t0)
            print(f"{report['device']}, {report['cpu_cores']} cores, source {size / 1e9:.2f} GB FP32 "
                  f"(generated in {report['generate_s']:.0f} s)", flush=True)
            out_cpu = work / "cpu.safetensors"
            report["cpu"] = convert_cmd(ROOT, src, out_cpu, "cpu")
            reference = sha256(out_cpu)
            out_bytes = out_cpu.stat().st_size
            out_cpu.unlink()
            print(f"convert --device cpu (warm) process {report['cpu']['process_s']:.2f} s", flush=True)
            runs = cold_series(src, work, files, trees, args.reps, reference, not args.no_roundtrip, out_bytes)
            report["runs"] = runs
            report["summary"] = summarize(runs, size / 1e9)
            shutil.rmtree(work / "src", ignore_errors=True)
        if args.cpu_gb > 0:
            report["cpu_ratio"] = cpu_ratio(work, args.cpu_gb, trees, args.cpu_reps)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
