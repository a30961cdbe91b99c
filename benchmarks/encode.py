"""Encoder throughput: reference NVFP4 codec vs nvdiag's fast encoder vs comfy-kitchen's eager quantizer.

    python -m benchmarks.encode [--rows 5120] [--cols 13824] [--repeat 2] [--device cpu|cuda]

Encodes one FP32 weight of a WAN-14B FFN shape with the same per-tensor scale, checks that the fast encoder's bytes
equal comfy-kitchen's, and prints M elements/s and the ratios. comfy-kitchen is optional (skipped if missing).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from reference_specs.formats.fast_encode import encode_fp8, encode_nvfp4
from reference_specs.formats.nvfp4 import NVFP4, per_tensor_scale


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: allocator, thread pool, lazy imports
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def comfy_kitchen_eager(weight: torch.Tensor, scale: torch.Tensor) -> Callable[[], object] | None:
    try:
        from comfy_kitchen.backends.eager.quantization import quantize_nvfp4
    except ImportError:
        return None
    return lambda: quantize_nvfp4(weight, scale, pad_16x=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5120)
    parser.add_argument("--cols", type=int, default=13824)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-reference", action="store_true", help="the reference codec is slow on big weights")
    args = parser.parse_args()

    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02
    scale = per_tensor_scale(weight)
    n = weight.numel() / 1e6
    print(f"weight {args.rows}x{args.cols} FP32 ({n:.1f} M elements), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")

    candidates: dict[str, Callable[[], object]] = {
        "fast nvfp4": lambda: encode_nvfp4(weight, scale, device=args.device),
        "fast fp8": lambda: encode_fp8(weight, device=args.device),
    }
    if not args.skip_reference:
        candidates["reference nvfp4"] = lambda: NVFP4().quantize(weight, scale)
    ck = comfy_kitchen_eager(weight, scale)
    if ck is not None:
        candidates["comfy-kitchen eager nvfp4"] = ck
        qdata, blocked = ck()
        fast = encode_nvfp4(weight, scale, device=args.device)
        same = torch.equal(qdata, fast["weight"]) and torch.equal(blocked.view(torch.uint8),
                                                                  fast["weight_scale"].view(torch.uint8))
        print(f"fast nvfp4 bytes identical to comfy-kitchen: {same}")

    rates = {}
    for name, fn in candidates.items():
        rates[name] = n / best_seconds(fn, args.repeat)
        print(f"{name:28s} {rates[name]:8.1f} M elements/s")
    fast = rates["fast nvfp4"]
    for name in ("reference nvfp4", "comfy-kitchen eager nvfp4"):
        if name in rates:
            print(f"fast nvfp4 / {name}: {fast / rates[name]:.1f}x")


if __name__ == "__main__":
    main()
