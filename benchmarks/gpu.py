"""GPU conversion benchmark: `python -m benchmarks.gpu [--size-gb 4] [--dir DIR] [--json FILE]`.

On a machine with CUDA, in one run:
  read      a plain read of the source files (`cat > /dev/null`), cold (the files' pages dropped from the page cache
            with posix_fadvise DONTNEED after an fsync) and warm (read again at once)
  cpu       `convert --device cpu` (warm cache)
  cuda      `convert --device cuda`, warm and cold
  identical sha256 of the cpu and cuda outputs
  roundtrip `roundtrip --device cuda` of the cuda output against the source (every quantized layer)
and prints seconds, GB/s of the source and the ratio read/convert (target: cuda conversion >= 0.8x a plain read).
Conversions run in their own subprocess (benchmarks.convert's children), so peak RSS is their own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.convert import generate, measure


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
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
        drop_cache(files)
        report["read_cold_s"] = plain_read(files)
        report["read_warm_s"] = plain_read(files)
        out_cpu, out_gpu = work / "cpu.safetensors", work / "cuda.safetensors"
        report["cpu"] = measure("nvdiag", src, out_cpu, keep=True)
        report["cuda_warm"] = measure("nvdiag-cuda", src, out_gpu, keep=True)
        report["identical"] = sha256(out_cpu) == sha256(out_gpu)
        out_gpu.unlink()
        drop_cache(files)
        report["cuda_cold"] = measure("nvdiag-cuda", src, out_gpu, keep=True)
        report["identical_cold"] = sha256(out_cpu) == sha256(out_gpu)
        report["roundtrip_cuda"] = timed_roundtrip(out_gpu, src, "cuda", None)
        report["roundtrip_cpu_sample8"] = timed_roundtrip(out_gpu, src, "cpu", 8)
        same = [n for n, e in report["roundtrip_cpu_sample8"]["errors"].items()
                if abs(e - report["roundtrip_cuda"]["errors"].get(n, float("nan"))) <= 1e-6 * max(e, 1e-12)]
        report["roundtrip_cpu_matches_cuda"] = f"{len(same)}/{report['roundtrip_cpu_sample8']['layers']}"
        for r in (report["roundtrip_cuda"], report["roundtrip_cpu_sample8"]):
            r.pop("errors")
        print(f"{report['device']}, {report['cpu_cores']} cores, source {gb:.2f} GB FP32")
        for name in ("read_cold_s", "read_warm_s"):
            print(f"{name:18s} {report[name]:7.2f} s  {gb / report[name]:6.2f} GB/s")
        for name in ("cpu", "cuda_warm", "cuda_cold"):
            r = report[name]
            print(f"convert {name:10s} {r['seconds']:7.2f} s  {gb / r['seconds']:6.2f} GB/s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB")
        print(f"cuda warm / plain warm read speed = {report['read_warm_s'] / report['cuda_warm']['seconds']:.2f}  "
              f"cuda cold / plain cold read speed = {report['read_cold_s'] / report['cuda_cold']['seconds']:.2f}  "
              "(target >= 0.8)")
        print(f"cpu and cuda outputs byte-identical: {report['identical']} (cold run: {report['identical_cold']})")
        print(f"roundtrip --device cuda: {report['roundtrip_cuda']}; cpu on 8 layers: "
              f"{report['roundtrip_cpu_sample8']}, same errors on {report['roundtrip_cpu_matches_cuda']}")
        print(json.dumps(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
