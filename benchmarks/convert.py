"""Conversion benchmark: `python -m benchmarks.convert [--size-gb 2] [--dir DIR] [--keep]`.

Generates a WAN-shaped (TI2V 5B layout, fewer/narrower blocks) FP32 sharded diffusers source of about the given
size, then measures in ONE run, each in its own subprocess so peak RSS is its own:
  nvdiag   `nvdiag convert` with the wan2.2-ti2v-5b preset (plan, stream-encode, gate)
  copy     a bf16 stream copy of the same source: read every tensor, write 2-D weights as bf16 through the same
           streaming writer (the I/O floor)
  ck       a naive comfy-kitchen script: quantize each block linear with comfy_kitchen.quantize_nvfp4 (eager), keep
           everything in a dict, safetensors save_file at the end
and prints seconds, peak RSS and the ratios convert/copy and ck/convert.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANT = "wan2.2-ti2v-5b"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARD_BYTES = 256 * 2**20


def bench_dims(size_gb: float) -> dict[str, int]:
    """WAN TI2V layout at width 1536 (ffn 4.67x, as in the real 3072/14336): ~165 MB of FP32 per block."""
    dim, ffn = 1536, 7168
    per_block = (8 * dim * dim + 2 * dim * ffn) * 4
    blocks = max(1, round(size_gb * 2**30 / per_block))
    return {"dim": dim, "ffn": ffn, "blocks": blocks, "heads": dim // 128}


def generate(folder: Path, size_gb: float) -> Path:
    """Shard by shard, so generating never holds more than one shard in memory."""
    from safetensors.torch import save_file

    from inspect_tools.synthetic.state_dicts import profile_for, shapes_for
    from inspect_tools.synthetic.values import tensor_value

    profile = profile_for(VARIANT)
    shapes = shapes_for(VARIANT, bench_dims(size_gb))
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {profile.to_diffusers(k): tensor_value(k, shapes[k]).to(torch.float32).contiguous() for k in keys}
        save_file(tensors, str(folder / name))
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder / INDEX


# ------------------------------------------------------------------------------------------------ children

def run_nvdiag(src: Path, out: Path, device: str = "cpu") -> dict:
    from converter.pipeline import convert

    result = convert(src, out, VARIANT, force=True, device=device)
    if not result.written:
        raise SystemExit(f"nvdiag convert refused: {[f.message for f in result.gate.findings]}")
    return {"phases": {k: round(v, 3) for k, v in result.timings.items()}}


def run_copy(src: Path, out: Path) -> None:
    from inspect_tools.readers import open_checkpoint
    from inspect_tools.writer import SafetensorsWriter

    with open_checkpoint(src) as reader:
        infos = list(reader)
        entries = [(t.name, "BF16" if len(t.shape) == 2 else t.dtype, t.shape) for t in infos]
        with SafetensorsWriter(out, entries, {}) as writer:
            for t in infos:
                tensor = reader.load(t.name)
                writer.write(t.name, tensor.to(torch.bfloat16) if len(t.shape) == 2 else tensor)
            writer.commit()


def run_ck(src: Path, out: Path) -> None:
    """What a user script typically does: load, quantize with comfy-kitchen, collect, save_file once."""
    import comfy_kitchen as ck
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map = json.loads(src.read_text())["weight_map"]
    result: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(src.parent / shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key.startswith("blocks.") and key.endswith(".weight") and t.ndim == 2:
                    base = key[: -len(".weight")]
                    scale = (t.abs().amax() / 2688.0).to(torch.float32)
                    q, s = ck.quantize_nvfp4(t, scale, pad_16x=True)
                    result[key], result[base + ".weight_scale"], result[base + ".weight_scale_2"] = q, s, scale
                    result[base + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
                else:
                    result[key] = t
    save_file(result, str(out))


CHILDREN = {"nvdiag": run_nvdiag, "nvdiag-cuda": lambda s, o: run_nvdiag(s, o, "cuda"), "copy": run_copy,
            "ck": run_ck}


def child_main(kind: str, src: Path, out: Path) -> None:
    started = time.perf_counter()
    extra = CHILDREN[kind](src, out) or {}
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_kb() / 1024, "out_bytes": out.stat().st_size,
                      **extra}))


def peak_rss_kb() -> int:
    """This process's own peak RSS. VmHWM belongs to the address space exec created; getrusage's ru_maxrss survives
    fork and exec on Linux, so a child would report its parent's peak (here: the generator's) when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes


def measure(kind: str, src: Path, out: Path, keep: bool = False) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.convert", "--child", kind, str(src), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    if not keep:
        out.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_cache(src: Path) -> None:
    for p in src.parent.glob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated source")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, src, out = args.child
        child_main(kind, Path(src), Path(out))
        return
    work = args.dir or Path(tempfile.mkdtemp(prefix="nvdiag-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        src = generate(work / "src", args.size_gb)
        src_bytes = sum(p.stat().st_size for p in src.parent.glob("*.safetensors"))
        print(f"source: {src_bytes / 2**30:.2f} GiB FP32, {bench_dims(args.size_gb)}, "
              f"generated in {time.perf_counter() - t0:.1f} s; cpu threads {torch.get_num_threads()}, "
              f"cores {os.cpu_count()}")
        warm_cache(src)
        results = {kind: measure(kind, src, work / f"{kind}.safetensors") for kind in ("copy", "nvdiag", "ck")}
        for kind, r in results.items():
            print(f"{kind:7s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"output {r['out_bytes'] / 2**20:7.0f} MB")
        conv, copy, ck = (results[k]["seconds"] for k in ("nvdiag", "copy", "ck"))
        print(f"convert / copy = {conv / copy:.2f}   (target <= 1.5)")
        print(f"ck / convert   = {ck / conv:.2f}   (target >= 3)")
        print(json.dumps({"size_gb": args.size_gb, "source_bytes": src_bytes, "results": results,
                          "convert_over_copy": conv / copy, "ck_over_convert": ck / conv}))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
