"""Timeline of one nvdiag command as a process: `python -m benchmarks.trace [--cold] [--json FILE] -- ARGS...`.

Runs `nvdiag ARGS` in a fresh interpreter and prints when, in seconds since that process started, the things that
decide a GPU command's wall time happened: torch's import, the warmer's start and stop (and how much it had read),
the CUDA warm-up's context and kernels, convert's first and last layer and phase marks (with its streaming stages'
busy seconds), roundtrip's first and last checked pair, and the process's exit; then, per half second, the
machine's disk reads (/proc/vmstat pgpgin, sampled every 10 ms), which shows where the disk sat idle, and the
command's progress at the end of each half second (layers handed out or pairs checked, the warmer's bytes), which
shows whether the command waited for the disk or the disk for the command. --cold first evicts
the page cache of every input file the arguments name (a file, or the shards beside an index.json).

It hooks nvdiag's internals by name (converter.pipeline.PhaseClock, inspect_tools.readers.prefetch.Warmer,
inspect_tools.cuda_warm_up.CudaWarmUp, converter.stages.Stages, inspect_tools.roundtrip._roundtrip and _check_one)
as their modules are imported, so that nothing is imported earlier than the command itself would;
tests/test_benchmarks.py keeps those names honest. A hook whose target is gone is skipped. Everything is timed from
the process's own start (/proc/self/stat), so interpreter start-up counts.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.01
WINDOW_S = 0.5


def process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat's start time, clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def disk_read_bytes() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("pgpgin "):
                return int(line.split()[1]) * 1024
    return 0


class Tracer:
    """Events and disk samples of this process, on a clock that starts with the process."""

    def __init__(self) -> None:
        self._offset = process_age() - time.perf_counter()
        self.events: list[tuple[float, str]] = []
        self.disk: list[tuple[float, int]] = []
        # progress counters the hooks keep (layers handed out, pairs checked, the warmer's bytes), sampled with the
        # disk: they show whether the command waited for the disk or the disk for the command
        self.counters: dict[str, float] = {}
        self.progress: list[tuple[float, dict[str, float]]] = []
        self.warmer: object | None = None
        threading.Thread(target=self._sample, name="trace-disk", daemon=True).start()

    def now(self) -> float:
        return round(time.perf_counter() + self._offset, 4)

    def event(self, name: str) -> None:
        self.events.append((self.now(), name))

    def _sample(self) -> None:
        while True:
            now = self.now()
            self.disk.append((now, disk_read_bytes()))
            if self.warmer is not None:
                self.counters["warmer GB"] = getattr(self.warmer, "done_bytes", 0) / 1e9
            self.progress.append((now, dict(self.counters)))
            time.sleep(SAMPLE_S)

    def dump(self, path: str) -> None:
        Path(path).write_text(json.dumps({"events": self.events, "disk": self.disk,
                                               "progress": self.progress}))


def _wrap(cls: object, name: str, around: Callable) -> None:
    original = getattr(cls, name, None)
    if original is not None:
        setattr(cls, name, around(original))


def hooks(tracer: Tracer) -> dict[str, Callable]:
    """module name -> what to patch in it once it is imported."""
    ev = tracer.event

    def pipeline(m):
        def mark(original):
            def traced(self, phase):
                ev(f"phase {phase} ends")
                result = original(self, phase)
                if phase == "gate":  # by then the streaming stages' busy seconds are in
                    ev("busy " + " ".join(f"{k}={v:.2f}" for k, v in self.timings.items() if k.endswith("_busy")))
                return result
            return traced
        _wrap(m.PhaseClock, "mark", mark)

    def prefetch(m):
        def start(original):
            def traced(self):
                ev("warmer starts")
                tracer.warmer = self
                original(self)
            return traced

        def stop(original):
            def traced(self, wait=True):
                if not self._stop.is_set():
                    ev(f"warmer stopped ({self.done_bytes / 1e9:.2f} GB read)")
                return original(self, wait)
            return traced
        _wrap(m.Warmer, "_start_child", start)
        _wrap(m.Warmer, "stop", stop)

    def cuda_warm_up(m):
        def context(original):
            def traced(self):
                ev("cuda context starts")
                original(self)
                ev("cuda context ready")
            return traced

        def kernels(original):
            def traced(self):
                original(self)
                ev("cuda kernels ready")
            return traced
        _wrap(m.CudaWarmUp, "_start_context", context)
        _wrap(m.CudaWarmUp, "_run_kernels", kernels)

    def stages(m):
        def jobs(original):
            def traced(self):
                count = 0
                for job in original(self):
                    if count == 0:
                        ev("first layer")
                    count += 1
                    tracer.counters["layers"] = count
                    yield job
                ev(f"last layer ({count})")
            return traced
        _wrap(m.Stages, "jobs", jobs)

    def roundtrip(m):
        checked = [0]

        def pairs(original):
            def traced(*args, **kwargs):
                ev("pairs start")
                result = original(*args, **kwargs)
                ev(f"last pair checked ({checked[0]})")
                return result
            return traced

        def one(original):
            def traced(*args, **kwargs):
                result = original(*args, **kwargs)
                checked[0] += 1
                tracer.counters["pairs"] = checked[0]
                if checked[0] == 1:
                    ev("first pair checked")
                return result
            return traced
        _wrap(m, "_roundtrip", pairs)
        _wrap(m, "_check_one", one)

    def cli(m):
        exit_now = os._exit

        def traced_exit(code):
            ev("os._exit")
            tracer.dump(OUT)
            exit_now(code)
        os._exit = traced_exit

    return {"converter.pipeline": pipeline, "inspect_tools.readers.prefetch": prefetch,
            "inspect_tools.cuda_warm_up": cuda_warm_up, "converter.stages": stages,
            "inspect_tools.roundtrip": roundtrip, "inspect_tools.cli": cli}


class _Hook(importlib.abc.MetaPathFinder):
    """Notes torch's import and patches the hooked modules right after they are executed."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.patches = hooks(tracer)

    def find_spec(self, name, path, target=None):
        if name != "torch" and name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            if name == "torch":
                self.tracer.event("torch import starts")
            execute(module)
            if name == "torch":
                self.tracer.event("torch imported")
            else:
                self.patches[name](module)
        spec.loader.exec_module = exec_module
        return spec


OUT = ""


def child(out: str, args: list[str]) -> None:
    """In the traced process: run the command with the hooks in place; the trace is written however it ends."""
    global OUT
    OUT = out
    tracer = Tracer()
    sys.meta_path.insert(0, _Hook(tracer))
    tracer.event("tracer ready")
    sys.argv = ["nvdiag", *args]
    try:
        try:
            from inspect_tools.launch import run
        except ImportError:  # a checkout older than the launcher
            from inspect_tools.cli import run
        run()
    finally:
        tracer.event("exit")
        tracer.dump(out)


def input_files(args: list[str]) -> list[Path]:
    files: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_file() and p.name.endswith(".index.json"):
            files += sorted(p.parent.glob("*.safetensors"))
        elif p.is_file():
            files.append(p)
    return files


def read_rates(disk: list[tuple[float, int]]) -> list[float]:
    """GB read per second in each WINDOW_S window from the first sample on."""
    rates = []
    start, base = disk[0]
    edge = start + WINDOW_S
    for t, v in disk:
        if t >= edge:
            rates.append((v - base) / (t - (edge - WINDOW_S)) / 1e9)
            base, edge = v, edge + WINDOW_S
    return rates


def counter_windows(progress: list[tuple[float, dict[str, float]]]) -> dict[str, list[float]]:
    """Each counter's value at the end of each WINDOW_S window, from the first sample on."""
    if not progress:
        return {}
    names = sorted({name for _, values in progress for name in values})
    windows: dict[str, list[float]] = {name: [] for name in names}
    edge = progress[0][0] + WINDOW_S
    last: dict[str, float] = {}
    for t, values in progress:
        while t >= edge:
            for name in names:
                windows[name].append(last.get(name, 0.0))
            edge += WINDOW_S
        last = values
    for name in names:
        windows[name].append(last.get(name, 0.0))
    return windows


def report(trace: dict, wall: float, returncode: int) -> str:
    lines = [f"exit code {returncode}, {wall:.2f} s as seen from outside"]
    lines += [f"{t:7.2f} s  {name}" for t, name in trace["events"]]
    if trace["disk"]:
        read = (trace["disk"][-1][1] - trace["disk"][0][1]) / 1e9
        rates = " ".join(f"{r:.1f}" for r in read_rates(trace["disk"]))
        lines.append(f"disk: {read:.2f} GB read; GB/s per {WINDOW_S} s from {trace['disk'][0][0]:.2f} s: {rates}")
    for name, values in counter_windows(trace.get("progress", [])).items():
        lines.append(f"{name} at the end of each window: " + " ".join(f"{v:.3g}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="evict the inputs' pages from the page cache first")
    parser.add_argument("--json", type=Path, help="also keep the raw trace (events, disk samples) here")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the nvdiag command line")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if not args:
        parser.error("give the nvdiag command after --")
    if opts.cold:
        from benchmarks.gpu import drop_cache  # here, not at the top: the traced child must import nothing early

        drop_cache(input_files(args))
    with tempfile.TemporaryDirectory() as tmp:
        out = opts.json or Path(tmp) / "trace.json"
        started = time.perf_counter()
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        done = subprocess.run([sys.executable, "-m", "benchmarks.trace", "--child", str(out), *args],
                              stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": path})
        wall = time.perf_counter() - started
        print(report(json.loads(Path(out).read_text()), wall, done.returncode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
