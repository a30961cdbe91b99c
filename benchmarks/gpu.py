"""GPU conversion benchmark: `python -m benchmarks.gpu [--size-gb 4] [--reps 3] [--variant NAME:KEY=VALUE,...]
[--roundtrip] [--dir DIR] [--json FILE]`.

On a machine with CUDA, in one run:
  cpu       `convert --device cpu` (warm cache): the reference output
  cold      --reps repetitions, interleaved (the order rotates each repetition), each from a cold cache (the source
            files' pages dropped with posix_fadvise DONTNEED after an fsync): a plain read (`cat > /dev/null`) and
            `convert --device cuda` in a fresh process for every variant, each output's sha256 checked against
            the cpu one
  roundtrip (--roundtrip) `roundtrip --device cuda` of the cuda output against the source
and prints medians: seconds inside the conversion (convert() and the output's close), seconds of the whole process
(interpreter start and imports too), peak RSS, and the median over repetitions of cat / convert (target >= 0.8).
A variant sets converter.stages switches in its child (NVDIAG_GPU_SET="GPU_EARLY_READ=0,GPU_PIN_ARENA=0"), so
old and new behaviour are compared in one run: `--variant old:GPU_EARLY_READ=0`. The variant "new" (defaults) always
runs.
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

import torch

from benchmarks.convert import child_main, generate, measure

SETTINGS_ENV = "NVDIAG_GPU_SET"


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed_roundtrip(out: Path, src: Path, device: str, sample: int | None) -> dict:
    from inspect_tools.roundtrip import run_roundtrip

    started = time.perf_counter()
    result = run_roundtrip(out, src, device=device, sample=sample)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "layers": len(result.layers), "findings": len(result.findings),
            "worst": max((r.error for r in result.layers), default=None),
            "errors": {r.name: r.error for r in result.layers}}


def apply_settings(settings: str) -> None:
    """Set converter.stages switches from "KEY=VALUE,..." (values: integers; 0/1 for the boolean switches)."""
    from converter import stages

    for item in filter(None, (part.strip() for part in settings.split(","))):
        key, _, value = item.partition("=")
        if not hasattr(stages, key):
            raise SystemExit(f"{SETTINGS_ENV}: converter.stages has no switch {key!r}")
        current = getattr(stages, key)
        setattr(stages, key, bool(int(value)) if isinstance(current, bool) else type(current)(int(value)))


def child(src: Path, out: Path) -> None:
    """One cuda conversion in this (fresh) process, with the switches of NVDIAG_GPU_SET."""
    apply_settings(os.environ.get(SETTINGS_ENV, ""))
    child_main("nvdiag-cuda", src, out)


def cold_convert(src: Path, out: Path, files: list[Path], settings: str) -> dict:
    """A cuda conversion in a fresh process from a cold cache: its own timing, and the whole process's."""
    out.unlink(missing_ok=True)
    drop_cache(files)
    env = {**os.environ, SETTINGS_ENV: settings}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--child", str(src), str(out)],
                          capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"cuda conversion ({settings or 'defaults'}) failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def parse_variants(specs: list[str]) -> dict[str, str]:
    variants = {"new": ""}
    for spec in specs:
        name, _, settings = spec.partition(":")
        variants[name] = settings
    return variants


def cold_series(src: Path, out: Path, files: list[Path], variants: dict[str, str], reps: int,
                reference: str) -> dict[str, list[dict]]:
    """reps interleaved cold runs of cat and of every variant; the order rotates so no variant always runs first."""
    names = ["cat", *variants]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            if name == "cat":
                drop_cache(files)
                runs["cat"].append({"seconds": plain_read(files)})
                continue
            r = cold_convert(src, out, files, variants[name])
            r["identical"] = sha256(out) == reference
            runs[name].append(r)
            print(f"rep {rep} {name:10s} convert {r['seconds']:6.2f} s  process {r['process_s']:6.2f} s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB  identical {r['identical']}  {r.get('phases', '')}",
                  flush=True)
        print(f"rep {rep} cat        {runs['cat'][-1]['seconds']:6.2f} s", flush=True)
    return runs


def summarize(runs: dict[str, list[dict]], gb: float) -> dict[str, dict]:
    """Medians per variant; the ratio is cat / convert per repetition (each against the cat of its own round)."""
    cats = [r["seconds"] for r in runs["cat"]]
    summary = {"cat": {"median_s": statistics.median(cats), "runs_s": cats}}
    for name, rs in runs.items():
        if name == "cat":
            continue
        summary[name] = {
            "median_s": statistics.median(r["seconds"] for r in rs),
            "median_process_s": statistics.median(r["process_s"] for r in rs),
            "median_ratio": statistics.median(c / r["seconds"] for c, r in zip(cats, rs, strict=True)),
            "median_process_ratio": statistics.median(c / r["process_s"] for c, r in zip(cats, rs, strict=True)),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "identical": all(r["identical"] for r in rs),
            "runs_s": [r["seconds"] for r in rs],
        }
    print(f"medians over {len(cats)} cold repetitions, source {gb:.2f} GB: cat {summary['cat']['median_s']:.2f} s "
          f"({gb / summary['cat']['median_s']:.2f} GB/s)")
    for name, s in summary.items():
        if name != "cat":
            print(f"  {name:10s} convert {s['median_s']:6.2f} s  process {s['median_process_s']:6.2f} s  "
                  f"cat/convert {s['median_ratio']:.2f}  cat/process {s['median_process_ratio']:.2f}  "
                  f"peak RSS {s['peak_rss_mb']:.0f} MB  byte-identical to cpu: {s['identical']}  (target >= 0.8)")
    return summary


def roundtrips(out: Path, src: Path) -> dict:
    report = {"roundtrip_cuda": timed_roundtrip(out, src, "cuda", None),
              "roundtrip_cpu_sample8": timed_roundtrip(out, src, "cpu", 8)}
    same = [n for n, e in report["roundtrip_cpu_sample8"]["errors"].items()
            if abs(e - report["roundtrip_cuda"]["errors"].get(n, float("nan"))) <= 1e-6 * max(e, 1e-12)]
    report["roundtrip_cpu_matches_cuda"] = f"{len(same)}/{report['roundtrip_cpu_sample8']['layers']}"
    for r in (report["roundtrip_cuda"], report["roundtrip_cpu_sample8"]):
        r.pop("errors")
    print(f"roundtrip --device cuda: {report['roundtrip_cuda']}; cpu on 8 layers: "
          f"{report['roundtrip_cpu_sample8']}, same errors on {report['roundtrip_cpu_matches_cuda']}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3, help="cold repetitions of each measurement")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also convert with these converter.stages switches (repeatable)")
    parser.add_argument("--roundtrip", action="store_true", help="also time roundtrip of the cuda output")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the --device cuda path")
    work = args.dir or Path(tempfile.mkdtemp(prefix="nvdiag-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        src = generate(work / "src", args.size_gb)
        files = source_files(src)
        size = sum(p.stat().st_size for p in files)
        gb = size / 1e9
        report: dict = {"device": torch.cuda.get_device_name(), "cpu_cores": os.cpu_count(),
                        "torch": torch.__version__, "source_bytes": size, "generate_s": time.perf_counter() - t0}
        print(f"{report['device']}, {report['cpu_cores']} cores, source {gb:.2f} GB FP32", flush=True)
        out_cpu, out_gpu = work / "cpu.safetensors", work / "cuda.safetensors"
        report["cpu"] = measure("nvdiag", src, out_cpu, keep=True)
        print(f"convert --device cpu (warm) {report['cpu']['seconds']:.2f} s", flush=True)
        runs = cold_series(src, out_gpu, files, parse_variants(args.variant), args.reps, sha256(out_cpu))
        report["runs"] = runs
        report["summary"] = summarize(runs, gb)
        if args.roundtrip:
            report.update(roundtrips(out_gpu, src))
        print(json.dumps(report["summary"]))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
