"""When a fresh process can first use CUDA: `python -m benchmarks.cuda_start [--reps 4]`.

Runs, interleaved, fresh interpreters that import torch and make their first CUDA tensor, either as torch does it
alone ("torch") or with CUDA's driver started first on a thread before torch's import ("driver first":
inspect_tools.cuda_driver, what `convert` and `roundtrip --device cuda` do). Prints, in seconds since each process
started, when torch was imported and when its first CUDA tensor and first kernel were done; medians at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys
def age():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
if sys.argv[1] == "driver first":
    from inspect_tools import cuda_driver
    cuda_driver.start()
import torch
t = {"torch imported": age()}
torch.empty(1, device="cuda")
t["first CUDA tensor"] = age()
float(torch.arange(4.0, device="cuda").sum())
t["first kernel"] = age()
print(json.dumps(t), flush=True)
os._exit(0)
"""

MODES = ("torch", "driver first")


def run_once(mode: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args(argv)
    run_once("torch")  # untimed: the page cache's share of torch and the driver
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            t = run_once(mode)
            runs[mode].append(t)
            print(f"rep {rep} {mode:12s} " + "  ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
    print(f"medians over {args.reps} fresh processes each (seconds since the process started):")
    for mode, ts in runs.items():
        medians = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
        wait = statistics.median(t["first CUDA tensor"] - t["torch imported"] for t in ts)
        print(f"  {mode:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in medians.items())
              + f"  (first CUDA tensor {wait:.2f} s after the import)")


if __name__ == "__main__":
    main()
