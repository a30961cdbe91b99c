"""In-process conversions on a warm page cache: `python -m benchmarks.warm [--size-gb 4] [--reps 3] [--rounds 2]
[--device cuda] [--tree NAME=DIR ...] [--dir DIR]`.

What a conversion itself costs once nothing waits for the disk or for the process's start (interpreter, torch,
CUDA): the source is generated and read into the page cache, then, per round and tree, one child process of that
tree's code converts it once untimed (imports, CUDA start, kernels) and --reps times timed, each a call of
converter.pipeline.convert, reporting its seconds and phases (ConvertResult.timings: plan, stream, gate, commit and
each streaming stage's busy seconds). The trees' order alternates from round to round; medians per tree at the end.
`benchmarks.gpu` times the whole commands from a cold cache; this isolates the per-layer work they overlap with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.convert import VARIANT, generate
from benchmarks.gpu import parse_trees, read_into_cache, run_order, source_files, tree_env

CHILD = """
import json, sys, time
from converter.pipeline import convert
src, out, device, variant, reps = sys.argv[1:6]
convert(src, out, variant, device=device, force=True)  # untimed: imports, CUDA start, kernels
for _ in range(int(reps)):
    started = time.perf_counter()
    result = convert(src, out, variant, device=device, force=True)
    print(json.dumps({"seconds": time.perf_counter() - started, **result.timings}), flush=True)
"""
SHOWN = ("seconds", "stream", "gate", "commit", "encode_busy", "write_busy", "check_busy", "read_busy")


def run_tree(tree: Path, src: Path, out: Path, device: str, reps: int) -> list[dict[str, float]]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), device, VARIANT, str(reps)], cwd=tree,
                          env=tree_env(tree), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the conversions failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3, help="timed conversions per child process")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per tree, interleaved")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="also run the nvdiag checkout in DIR (repeatable)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    trees = parse_trees(args.tree)
    work = args.dir or Path(tempfile.mkdtemp(prefix="nvdiag-warm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = generate(work / "src", args.size_gb)
        files = source_files(src)
        gb = sum(p.stat().st_size for p in files) / 1e9
        print(f"source {gb:.2f} GB FP32, {args.device}, warm page cache", flush=True)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for rnd in range(args.rounds):
            for name in run_order(list(trees), rnd):
                read_into_cache(files)
                for r in run_tree(trees[name], src, work / "out.safetensors", args.device, args.reps):
                    runs[name].append(r)
                    print(f"round {rnd} {name:10s} " + "  ".join(f"{k} {r[k]:.3f}" for k in SHOWN if k in r),
                          flush=True)
        print(f"medians over {args.rounds} x {args.reps} conversions:")
        for name, rs in runs.items():
            print(f"  {name:10s} " + "  ".join(f"{k} {statistics.median(r[k] for r in rs):.3f}"
                                                for k in SHOWN if all(k in r for r in rs))
                  + f"  ({gb / statistics.median(r['seconds'] for r in rs):.2f} GB/s)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
