"""Verify cost: `python -m benchmarks.verify [--blocks 2] [--steps 3] [--device cpu|cuda] [--comfyui DIR] [--keep DIR]`.

Writes a WAN 2.2 T2V A14B model at its real width (dim 5120, ffn 13824, 40 heads, text width 4096) but only
`--blocks` transformer blocks deep, once, as a BF16 reference and as an NVFP4 mixed file made from it (block linears
NVFP4, the rest BF16); with --keep DIR the files are kept there and reused by later runs. Then measures in ONE run,
each job in a fresh subprocess so its peak RSS is its own:
  baseline      ComfyUI loading and running the reference once: `python -c` that imports ComfyUI as nvdiag does
                (load_runtime), loads REF with comfy.sd.load_diffusion_model and runs one apply_model forward
  verify        `nvdiag verify NVFP4 --against REF --steps N --format json` (w4a16)
  verify both   the same with `--compute both` (w4a16 and emulated w4a4)
and prints seconds (whole process: interpreter start-up and imports included, as a user sees them), peak RSS and the
ratio of seconds to the baseline's. Beyond the baseline's work, verify runs N noise levels (not 1) through three
models (reference, file, and the reference encoded to NVFP4 by comfy-kitchen on the spot), the file's NVFP4 weights
dequantized at every forward on the CPU; with --compute both, the file and the encoded reference run twice.

Peak RSS comes from os.wait4 on each child (its own ru_maxrss). Linux carries a parent's high-water mark into a
forked child, so the driver never imports torch: the files are written by a subprocess too, and the driver stays at a
few tens of MB, far below anything measured.

Size: about 0.7 GB of BF16 per block plus 0.47 GB outside the blocks; ComfyUI on the CPU holds the model in FP32, and
verify holds the reference's values, one ComfyUI model and the comfy-kitchen baseline at once. With --blocks 2 (1.9 GB
BF16 reference, 0.9 GB NVFP4 file) the peaks measured on the CPU were 4.0 GB writing the files, 5.7 GB for the
baseline and 7.5 GB for verify: comfortable on a 2-core, 24 GB machine, so 2 stays the default. Seconds vary by tens
of percent between runs there (a shared VM); compare ratios from one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANT = "wan2.2-t2v-a14b"
DEFAULT_COMFYUI = "/work/shared/comfyui"

# The baseline job. Same runtime set-up and loader as nvdiag verify; one noise level, one forward, no hooks beyond
# the ones forward.run always adds (they copy block outputs, which verify pays too).
BASELINE_SCRIPT = """
import sys
from pathlib import Path
from inspect_tools.comfyui import forward, loading
from inspect_tools.comfyui.runtime import load_runtime
runtime = load_runtime(sys.argv[1], device=sys.argv[2])
loaded = loading.load(runtime, Path(sys.argv[3]))
if not loaded.report.loaded:
    raise SystemExit(f"ComfyUI refused the reference: {loaded.report.error_type}: {loaded.report.error}")
out = forward.run(runtime, loaded.patcher, forward.make_inputs(loaded.patcher, 1, 0))
print(loaded.report.weight_dtype, loaded.report.compute_dtype, tuple(out[0].output.shape))
"""


def bench_dims(blocks: int) -> dict[str, int]:
    """Full WAN 2.2 T2V A14B dims, fewer blocks (depth changes neither the layer shapes nor the per-layer work)."""
    from reference_specs.models import get_profile

    profile = get_profile(VARIANT)
    if profile is None:
        raise SystemExit(f"reference_specs has no profile {VARIANT}")
    return {**profile.full_dims, "blocks": blocks}


def file_paths(folder: Path, blocks: int) -> tuple[Path, Path]:
    # the block count is in the names so that --keep DIR can hold files of several depths side by side
    stem = f"{VARIANT}-{blocks}blocks"
    return folder / f"{stem}-bf16.safetensors", folder / f"{stem}-nvfp4-mixed.safetensors"


def write_files(folder: Path, blocks: int) -> None:
    """Runs in its own subprocess (see the module docstring: the driver must stay small)."""
    import torch

    from inspect_tools.synthetic import write_float, write_nvfp4_mixed

    dims = bench_dims(blocks)
    ref, nvfp4 = file_paths(folder, blocks)
    # each writer renames a finished .tmp into place, so a file that exists is complete and safe to reuse
    if not ref.exists():
        write_float(ref, VARIANT, dims=dims, dtype=torch.bfloat16)
    if not nvfp4.exists():
        write_nvfp4_mixed(nvfp4, VARIANT, dims=dims, dtype=torch.bfloat16)


def run_child(argv: list[str]) -> dict:
    """Run one job to completion; wall seconds, its own peak RSS, exit code and the output's tail."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        # wait4, not Popen.wait: it hands back this child's rusage alone (RUSAGE_CHILDREN is a max over all of them)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": proc.returncode,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def checked(name: str, result: dict, ok: tuple[int, ...] = (0,), json_out: bool = False) -> dict:
    # a Python traceback exits 1 as well as verify's findings do: only a JSON document tells them apart
    if result["returncode"] not in ok or (json_out and parsed(result["stdout"]) is None):
        raise SystemExit(f"{name} failed ({result['returncode']}):\n{result['stderr'][-3000:]}"
                         f"\n{result['stdout'][-2000:]}")
    return result


def warm_cache(paths: tuple[Path, ...]) -> None:
    """Read the files once so that no job pays the disk for the others (reused files may be cold)."""
    for p in paths:
        with p.open("rb") as f:
            while f.read(64 * 2**20):
                pass


def parsed(stdout: str) -> dict | None:
    try:
        doc = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def verify_summary(stdout: str) -> str:
    """The verdict and per-path ratios from verify's JSON, to show the run did the full job and judged the file."""
    doc = parsed(stdout) or {}
    summary = doc.get("summary", {})
    ratios = ", ".join(f"{p['compute']} x{p['ratio']}" for p in doc.get("compute", []))
    # pieces > 1: verify found too little free memory and loaded each model a few blocks at a time (slower)
    return f"{summary.get('verdict', '?')}; {ratios}; loads per model {summary.get('pieces', 1)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (the real model has 40)")
    parser.add_argument("--steps", type=int, default=3, help="nvdiag verify --steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI,
                        help="ComfyUI folder (default: $COMFYUI_PATH, else %(default)s)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the model files here and reuse those already there (default: a temporary folder)")
    parser.add_argument("--child-write", nargs=2, metavar=("DIR", "BLOCKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_write:
        write_files(Path(args.child_write[0]), int(args.child_write[1]))
        return
    if args.blocks < 1 or args.steps < 1:
        parser.error("--blocks and --steps must be at least 1")

    work = args.keep or Path(tempfile.mkdtemp(prefix="nvdiag-bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ref, nvfp4 = file_paths(work, args.blocks)
        reused = ref.exists() and nvfp4.exists()
        written = checked("writing the model files",
                          run_child([sys.executable, "-m", "benchmarks.verify", "--child-write", str(work),
                                     str(args.blocks)]))
        how = "reused" if reused else f"written in {written['seconds']:.1f} s, peak RSS {written['peak_rss_mb']:.0f} MB"
        print(f"{VARIANT}: {bench_dims(args.blocks)}")
        print(f"files ({how}) in {work}:")
        for p in (ref, nvfp4):
            print(f"  {p.name:48s} {p.stat().st_size / 2**20:9.0f} MB")
        warm_cache((ref, nvfp4))
        print(f"device {args.device}, cores {os.cpu_count()}, steps {args.steps}, ComfyUI {args.comfyui}")

        verify = [sys.executable, "-c", "from inspect_tools.cli import run; run()", "verify", str(nvfp4),
                  "--against", str(ref), "--comfyui", args.comfyui, "--steps", str(args.steps),
                  "--device", args.device, "--format", "json"]
        jobs = {
            "baseline (load + 1 forward)": ([sys.executable, "-c", BASELINE_SCRIPT, args.comfyui, args.device,
                                             str(ref)], False),
            f"verify --steps {args.steps}": (verify, True),
            f"verify --steps {args.steps} --compute both": ([*verify, "--compute", "both"], True),
        }
        results = {}
        for name, (command, is_verify) in jobs.items():
            # verify's exit 1 (findings) is still a complete run; the baseline script has no such outcome
            results[name] = checked(name, run_child(command), (0, 1) if is_verify else (0,), json_out=is_verify)
        base = next(iter(results.values()))["seconds"]
        print()
        print(f"{'job':40s} {'seconds':>9s} {'peak RSS MB':>12s} {'x baseline':>11s}")
        for name, r in results.items():
            print(f"{name:40s} {r['seconds']:9.1f} {r['peak_rss_mb']:12.0f} {r['seconds'] / base:11.2f}")
        print()
        print(f"baseline: weights / compute / output shape: {results[next(iter(results))]['stdout'].strip()}")
        for name, r in list(results.items())[1:]:
            print(f"{name}: exit {r['returncode']}; {verify_summary(r['stdout'])}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
