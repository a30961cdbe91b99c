"""Verify and sensitivity cost: `python -m benchmarks.verify [--model a14b|5b] [--blocks N] [--steps 3]
[--prompts 2] [--device cpu|cuda] [--jobs baseline,verify,both,sensitivity] [--comfyui DIR] [--keep DIR]
[--workers N] [--deadline S] [--json FILE]`.

Writes a WAN 2.2 model at its real width, once: `--model a14b` is T2V A14B (dim 5120, ffn 13824, 40 heads, text width
4096), `--blocks` transformer blocks deep (default 2; the real expert has 40); `--model 5b` is TI2V 5B (dim 3072, ffn
14336), all 30 blocks by default. The BF16 reference is written by --workers processes side by side (the synthetic
values of inspect_tools.synthetic, tensor by tensor, with every linear weight at unit gain (values.unit_gain: the
fixtures' own gain overflows ComfyUI's fp16 compute on a GPU at real width)); the NVFP4 file is made from it
by `nvdiag convert --preset <variant>` on the same device, as a user makes one. With --keep DIR both files are kept
there and reused by later runs. Then measures, each job in a fresh subprocess so its peak RSS is its own:
  baseline      ComfyUI loading and running the reference once: `python -c` that imports ComfyUI as nvdiag does
                (load_runtime), loads REF with comfy.sd.load_diffusion_model and runs one apply_model forward
  verify        `nvdiag verify NVFP4 --against REF --steps N --format json` (w4a16)
  both          the same with `--compute both` (w4a16 and emulated w4a4)
  sensitivity   `nvdiag sensitivity REF --steps N --prompts P --format json`
and prints a table of seconds (whole process: interpreter start-up and imports included, as a user sees them), peak
RSS, peak GPU memory (--device cuda) and the ratio of seconds to the baseline's, then the JSON (also to --json FILE,
rewritten after every job so that a run cut short keeps what it measured). Beyond the baseline's work, verify runs N
noise levels (not 1) through three models (reference, file, and the reference encoded to NVFP4 by comfy-kitchen on
the spot; the file nvdiag convert makes here is that encoding byte for byte, so its run serves for both and two
models run); sensitivity runs N x P forwards with a hook on every Linear layer, then measures each layer four ways.

Peak RSS comes from os.wait4 on each child (its own ru_maxrss). Linux carries a parent's high-water mark into a
forked child, so the driver never imports torch: the files are written by a subprocess too, and the driver stays at a
few tens of MB, far below anything measured. Peak GPU memory is the device's used memory (NVML, sampled every 20 ms
while the job runs) above what was used before it started: the job's allocations, the caching allocator's slack and
its CUDA context, what another program on that GPU would find missing.

--deadline S: no job starts after S seconds from the start, and a job still running then is killed and reported as
cut short (for machines lent by the minute). Size: about 0.7 GB of BF16 per A14B block plus 0.47 GB outside the
blocks; ComfyUI on the CPU holds the model in FP32, and verify holds the reference's values, one ComfyUI model and
the comfy-kitchen baseline at once (a model whose FP32 copy would not fit in half the free memory runs a few blocks at
a time). Seconds vary by tens of percent between runs on a shared machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import NVDIAG

MODELS = {"a14b": "wan2.2-t2v-a14b", "5b": "wan2.2-ti2v-5b"}
DEFAULT_BLOCKS = {"a14b": 2, "5b": None}  # None: the real depth
JOBS = ("baseline", "verify", "both", "sensitivity")
DEFAULT_COMFYUI = "/work/shared/comfyui"
GPU_SAMPLE_S = 0.02

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


def bench_dims(variant: str, blocks: int | None) -> dict[str, int]:
    """The variant's real dims, `blocks` deep (None: its real depth). Depth changes neither the layer shapes nor the
    per-layer work."""
    from reference_specs.models import get_profile

    profile = get_profile(variant)
    if profile is None:
        raise SystemExit(f"reference_specs has no profile {variant}")
    return {**profile.full_dims, "blocks": blocks or profile.full_dims["blocks"]}


def file_paths(folder: Path, variant: str, blocks: int) -> tuple[Path, Path]:
    # the depth is in the names so that --keep DIR can hold files of several depths side by side
    stem = f"{variant}-{blocks}blocks"
    return folder / f"{stem}-bf16.safetensors", folder / f"{stem}-nvfp4.safetensors"


# --- the reference, written in parallel (runs in a subprocess: the driver must not import torch) ---

def _header(shapes: dict[str, tuple[int, ...]]) -> tuple[bytes, dict[str, int]]:
    """A BF16 safetensors header for these tensors in this order, padded to 8 bytes, and each tensor's data offset."""
    entries, starts, offset = {}, {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        entries[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        starts[key] = offset
        offset += size
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, starts


def _fill(job: tuple[str, str, tuple[int, ...], int]) -> None:
    """Worker: one tensor's values, written in place at its offset."""
    import torch

    from inspect_tools.synthetic.values import tensor_value, unit_gain

    path, key, shape, at = job
    if math.prod(shape) == 0:
        return
    value = tensor_value(key, shape)
    if len(shape) == 2 and key.endswith(".weight"):
        value = unit_gain(value)  # ComfyUI computes WAN in fp16 on a GPU: keep the activations in a real model's range
    data = value.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < data.nbytes:
            done += os.pwrite(fd, data[done:], at + done)
    finally:
        os.close(fd)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core does the parallelism


def write_reference(path: Path, variant: str, dims: dict[str, int], workers: int) -> Path:
    """The BF16 float checkpoint write_float(path, variant, dims, torch.bfloat16) writes (same tensors, same values),
    generated by `workers` processes at once: the synthetic values take ~50 ns an element on one core, minutes for a
    5B model, seconds on 16 cores. The header comes first, then every worker writes its tensors at their offsets."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from inspect_tools.synthetic.state_dicts import shapes_for

    shapes = shapes_for(variant, dims)
    header, starts = _header(shapes)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(math.prod(s) * 2 for s in shapes.values()))
    jobs = sorted(((str(tmp), key, shape, len(header) + starts[key]) for key, shape in shapes.items()),
                  key=lambda job: -math.prod(job[2]))  # largest first: the pool ends evenly
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("fork"),
                             initializer=_worker_init) as pool:
        list(pool.map(_fill, jobs))
    os.replace(tmp, path)  # a file that exists is complete and safe to reuse
    return path


# --- measuring one job ---

class GpuPeak:
    """Peak used memory of GPU 0 while a job runs, above what was used before it (NVML, else nvidia-smi)."""

    def __init__(self) -> None:
        self.read = self._reader()
        self.base = self.read() if self.read else 0
        self.peak = self.base
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # no NVML (no driver, or no nvidia-ml-py): fall back to the command
            if shutil.which("nvidia-smi") is None:
                return None
            return lambda: int(subprocess.run(
                ["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, check=True).stdout.split()[0]) * 2**20

    def _sample(self) -> None:
        try:
            while not self._stop.wait(GPU_SAMPLE_S):
                self.peak = max(self.peak, self.read())
        except Exception as e:  # a reading that fails once fails again: say so rather than report a low peak
            self.error = f"{type(e).__name__}: {e}"

    def __enter__(self) -> GpuPeak:
        if self.read:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self.read:
            self._thread.join()
            self.peak = max(self.peak, self.read())

    @property
    def mb(self) -> float | None:
        return (self.peak - self.base) / 2**20 if self.read and self.error is None else None


def run_child(argv: list[str], gpu: bool = False, limit_s: float | None = None) -> dict:
    """Run one job to completion, or until limit_s: wall seconds, its own peak RSS, peak GPU memory when asked, exit
    code, whether it was cut short, and its output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with (GpuPeak() if gpu else _NoGpu()) as peak:
            started = time.perf_counter()
            # the child leads its own process group: cut short, the whole group goes (pool workers included)
            proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
            killed = threading.Event()

            def kill() -> None:
                killed.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended on its own meanwhile
                    pass

            timer = threading.Timer(max(limit_s, 0.0), kill) if limit_s is not None else None
            if timer:
                timer.start()
            # wait4, not Popen.wait: it hands back this child's rusage alone (RUSAGE_CHILDREN is a max over all)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
            if timer:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_gpu_mb": peak.mb,
                "returncode": proc.returncode, "cut_short": killed.is_set(),
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


class _NoGpu:
    mb = None

    def __enter__(self) -> _NoGpu:
        return self

    def __exit__(self, *_: object) -> None:
        pass


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


def failure(result: dict, ok: tuple[int, ...], json_out: bool) -> str | None:
    """Why a finished job does not count, or None. A Python traceback exits 1 as well as verify's findings do: only
    a JSON document tells them apart."""
    if result["returncode"] in ok and not (json_out and parsed(result["stdout"]) is None):
        return None
    return f"exit {result['returncode']}: {result['stderr'][-3000:]}{result['stdout'][-1000:]}"


def verify_summary(doc: dict) -> str:
    """The verdict and per-path ratios from verify's JSON, to show the run did the full job and judged the file."""
    summary = doc.get("summary", {})
    ratios = ", ".join(f"{p['compute']} x{p['ratio']}" for p in doc.get("compute", []))
    # pieces > 1: verify found too little free memory and loaded each model a few blocks at a time (slower)
    return f"{summary.get('verdict', '?')}; {ratios}; loads per model {summary.get('pieces', 1)}"


def sensitivity_summary(doc: dict) -> str:
    layers = doc.get("layers", [])
    # float(): the document spells a non-finite risk "inf" (JSON has no Infinity); 2.0 is RISKY (no torch import here)
    risky = [layer for layer in layers if float(layer.get("risk") or 0) > 2.0]
    infinite = sum(1 for layer in risky if float(layer["risk"]) == float("inf"))
    top = f"; most at risk {layers[0]['layer']} (risk {layers[0]['risk']})" if layers else ""
    return (f"{len(layers)} layers measured, {len(risky)} with risk > 2 ({infinite} of them inf){top}; "
            f"loads {doc.get('pieces', 1)}")


def status(name: str, result: dict, why: str | None) -> str:
    """One line on how the job ended and what it found (its JSON's verdict), to show it did the whole job."""
    if result["cut_short"]:
        return f"CUT SHORT at --deadline after {result['seconds']:.0f} s"
    if why is not None:
        return f"FAILED {why}"
    if name == "baseline":
        return f"weights / compute / output shape: {result['stdout'].strip()}"
    try:
        doc = parsed(result["stdout"]) or {}
        said = sensitivity_summary(doc) if name == "sensitivity" else verify_summary(doc)
    except (KeyError, TypeError, IndexError) as e:  # a document of another shape: the figures still stand
        said = f"document not summarized ({type(e).__name__}: {e})"
    return f"exit {result['returncode']}; {said}"


def commands(ref: Path, nvfp4: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """Each job's argv after the interpreter: the nvdiag ones are what `nvdiag ...` runs."""
    common = ["--comfyui", args.comfyui, "--device", args.device, "--format", "json"]
    verify = ["verify", str(nvfp4), "--against", str(ref), "--steps", str(args.steps), *common]
    return {
        "baseline": ["-c", BASELINE_SCRIPT, args.comfyui, args.device, str(ref)],
        "verify": ["-c", NVDIAG, *verify],
        "both": ["-c", NVDIAG, *verify, "--compute", "both"],
        "sensitivity": ["-c", NVDIAG, "sensitivity", str(ref), "--steps", str(args.steps), "--prompts",
                        str(args.prompts), *common],
    }


def shown(argv: list[str]) -> str:
    """How a user types the job: `nvdiag ...` (the baseline stays a script)."""
    if argv[:2] == ["-c", NVDIAG]:
        return " ".join(["nvdiag", *argv[2:]])
    return "python -c BASELINE_SCRIPT " + " ".join(argv[2:])


def make_files(work: Path, variant: str, blocks: int, args: argparse.Namespace, need_file: bool) -> dict:
    """Write the reference (and convert it) unless --keep already holds them; their cost, for the record."""
    ref, nvfp4 = file_paths(work, variant, blocks)
    made: dict = {}
    if not ref.exists():
        r = run_child([sys.executable, "-m", "benchmarks.verify", "--child-write", str(ref), variant, str(blocks),
                       str(args.workers)])
        if (why := failure(r, (0,), False)) is not None:
            raise SystemExit(f"writing {ref.name} failed ({why})")
        made["reference"] = {"seconds": r["seconds"], "workers": args.workers}
    if need_file and not nvfp4.exists():
        r = run_child([sys.executable, "-c", NVDIAG, "convert", str(ref), str(nvfp4), "--preset", variant,
                       "--device", args.device, "--format", "json"], gpu=args.device == "cuda")
        if (why := failure(r, (0,), True)) is not None:
            raise SystemExit(f"nvdiag convert to {nvfp4.name} failed ({why})")
        made["convert"] = {k: r[k] for k in ("seconds", "peak_rss_mb", "peak_gpu_mb")}
    return made


def print_table(report: dict) -> None:
    jobs = report["jobs"]
    base = jobs.get("baseline", {}).get("seconds")
    gpu = report["device"] == "cuda"
    print()
    print(f"{'job':14s} {'seconds':>9s} {'peak RSS MB':>12s}" + (f" {'peak GPU MB':>12s}" if gpu else "")
          + (f" {'x baseline':>11s}" if base else "") + "  command")
    for name, r in jobs.items():
        if "seconds" not in r:
            print(f"{name:14s} {r['status']}")
            continue
        row = f"{name:14s} {r['seconds']:9.1f} {r['peak_rss_mb']:12.0f}"
        if gpu:
            row += f" {r['peak_gpu_mb']:12.0f}" if r["peak_gpu_mb"] is not None else f" {'?':>12s}"
        if base:
            row += f" {r['seconds'] / base:11.2f}"
        print(f"{row}  {r['command']}")
        print(f"{'':14s} {r['status']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="a14b",
                        help="a14b: WAN 2.2 T2V A14B; 5b: WAN 2.2 TI2V 5B (both at their real width)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="transformer blocks (default: 2 for a14b, whose expert has 40; all 30 for 5b)")
    parser.add_argument("--steps", type=int, default=3, help="verify --steps and sensitivity --steps")
    parser.add_argument("--prompts", type=int, default=2, help="sensitivity --prompts")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--jobs", default=",".join(JOBS), help="which jobs, in this order (default: %(default)s)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI,
                        help="ComfyUI folder (default: $COMFYUI_PATH, else %(default)s)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the model files here and reuse those already there (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing the reference (default: one per core)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start after which no job starts and a running one is cut short")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here, and each nvdiag job's own JSON beside it (FILE.JOB.json)")
    parser.add_argument("--child-write", nargs=4, metavar=("PATH", "VARIANT", "BLOCKS", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_write:
        path, variant, blocks, workers = args.child_write
        write_reference(Path(path), variant, bench_dims(variant, int(blocks)), int(workers))
        return
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if unknown := [j for j in jobs if j not in JOBS]:
        parser.error(f"--jobs: unknown {', '.join(unknown)} (known: {', '.join(JOBS)})")
    if (args.blocks is not None and args.blocks < 1) or args.steps < 1 or args.prompts < 1:
        parser.error("--blocks, --steps and --prompts must be at least 1")

    started = time.perf_counter()
    variant = MODELS[args.model]
    dims = bench_dims(variant, args.blocks or DEFAULT_BLOCKS[args.model])
    work = args.keep or Path(tempfile.mkdtemp(prefix="nvdiag-bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": variant, "dims": dims, "device": args.device, "cores": os.cpu_count(),
                    "steps": args.steps, "prompts": args.prompts, "benchmark": " ".join(sys.argv), "jobs": {}}
    try:
        ref, nvfp4 = file_paths(work, variant, dims["blocks"])
        report["made"] = make_files(work, variant, dims["blocks"], args, any(j in ("verify", "both") for j in jobs))
        print(f"{variant}: {dims}")
        print(f"files in {work} ({report['made'] or 'reused'}):")
        for p in (ref, nvfp4):
            if p.exists():
                report[p.name] = p.stat().st_size
                print(f"  {p.name:48s} {p.stat().st_size / 2**20:9.0f} MB")
        warm_cache(tuple(p for p in (ref, nvfp4) if p.exists()))
        print(f"device {args.device}, cores {os.cpu_count()}, steps {args.steps}, prompts {args.prompts}, "
              f"ComfyUI {args.comfyui}", flush=True)
        argvs = commands(ref, nvfp4, args)
        for name in jobs:
            left = None if args.deadline is None else args.deadline - (time.perf_counter() - started)
            entry: dict = {"command": shown(argvs[name])}
            if left is not None and left <= 0:
                report["jobs"][name] = {**entry, "status": "not run: past --deadline"}
                continue
            r = run_child([sys.executable, *argvs[name]], gpu=args.device == "cuda", limit_s=left)
            entry.update({k: r[k] for k in ("seconds", "peak_rss_mb", "peak_gpu_mb", "returncode")})
            is_nvdiag = name != "baseline"
            # verify's exit 1 (findings) is still a complete run; the baseline script has no such outcome
            why = failure(r, (0, 1) if name in ("verify", "both") else (0,), is_nvdiag)
            entry["status"] = status(name, r, why)
            if args.json and name != "baseline" and parsed(r["stdout"]) is not None:
                # the command's own document beside the figures: what it found, not only what it cost
                args.json.with_suffix(f".{name}.json").write_text(r["stdout"])
            report["jobs"][name] = entry
            print(f"{name}: {entry['seconds']:.1f} s, peak RSS {entry['peak_rss_mb']:.0f} MB"
                  + (f", peak GPU {entry['peak_gpu_mb']:.0f} MB" if entry["peak_gpu_mb"] is not None else "")
                  + f"; {entry['status'][:2000]}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
        print_table(report)
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
