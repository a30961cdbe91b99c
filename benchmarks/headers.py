"""Header-only speed: `python -m benchmarks.headers [--repeat 3]`.

Writes sparse files with a real WAN 2.2 T2V 14B header (~57 GB apparent size, a few KB on disk: the data is a hole
except the few bytes a check needs) as FP32 and as NVFP4 mixed, then times, best of `--repeat`:
  inspect / lint in-process   open_model + inspect_document, lint_paths (what the CLI does, without the start-up)
  inspect / lint CLI          `nvdiag inspect|lint FILE --format json` as a subprocess (Python start-up included)
  lint --header-only CLI      the same with header rules only: like inspect, it never imports torch (default lint
                              does when value rules read NVFP4 scales)
Target: under 1 s each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import NVDIAG

VARIANT = "wan2.2-t2v-a14b"
KINDS = ("f32", "nvfp4-mixed")


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def inspect_in_process(path: Path) -> None:
    from inspect_tools.inspect import inspect_document
    from inspect_tools.layers import open_model

    with open_model(path) as model:
        inspect_document(model)


def lint_in_process(path: Path) -> None:
    from inspect_tools.lint import lint_paths

    lint_paths([path])


def cli(command: str, path: Path, *options: str) -> None:
    # exit 1 (findings) is a normal lint outcome here; 2 would mean the file could not be read
    proc = subprocess.run([sys.executable, "-c", NVDIAG, command, str(path),
                           *options, "--format", "json"], capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"nvdiag {command} {path} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from inspect_tools.synthetic import write_header_only

    results = {}
    with tempfile.TemporaryDirectory(prefix="nvdiag-headers-") as folder:
        for kind in KINDS:
            path = write_header_only(Path(folder) / f"{VARIANT}-{kind}.safetensors", VARIANT, kind=kind)
            inspect_in_process(path)  # warm-up: imports, page cache of the header
            lint_in_process(path)
            row = {
                "apparent_gb": path.stat().st_size / 1e9,
                "inspect_in_process_s": best(lambda p=path: inspect_in_process(p), args.repeat),
                "lint_in_process_s": best(lambda p=path: lint_in_process(p), args.repeat),
                "inspect_cli_s": best(lambda p=path: cli("inspect", p), args.repeat),
                "lint_cli_s": best(lambda p=path: cli("lint", p), args.repeat),
                "lint_header_only_cli_s": best(lambda p=path: cli("lint", p, "--header-only"), args.repeat),
            }
            results[kind] = row
            print(f"{VARIANT} {kind:12s} {row['apparent_gb']:6.1f} GB apparent: "
                  f"inspect {row['inspect_in_process_s']:.3f} s in-process / {row['inspect_cli_s']:.3f} s CLI, "
                  f"lint {row['lint_in_process_s']:.3f} s / {row['lint_cli_s']:.3f} s, "
                  f"lint --header-only CLI {row['lint_header_only_cli_s']:.3f} s   (target < 1 s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
