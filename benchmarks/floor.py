"""The torch floor: what a conversion that moves its weights to the GPU through torch must spend, and nothing else.

`python -m benchmarks.floor SRC OUT --out-bytes N [--preset P] [--device cuda]` runs, in one fresh process, only the
work a conversion cannot avoid, each part as early and as parallel as it could possibly be:
  - the source read into the page cache from the first millisecond (the same warmer child and CUDA driver start as
    `nvdiag convert`);
  - the output's bytes (N of them, zeros) written and made durable from the first millisecond, on a thread, as if
    the output did not depend on the conversion at all;
  - torch imported and its first CUDA tensor made (no encoder can run before that);
  - every quantized weight of the plan moved through the device: pread from the page cache into pinned buffers by
    several threads, copied to the GPU, no kernel run on it;
  - exit without the interpreter's teardown (as nvdiag's commands end).
No encoding, no NaN/Inf check, no gate, no header: a conversion can only be slower. benchmarks.gpu times this
process beside `cat` ("torch floor"): where the floor itself is below a target's share of `cat`, no conversion that
moves its weights to the GPU through torch meets that target on that host. It prints one JSON line: when each part
ended, in seconds since the process started (/proc/self/stat's start time, so the interpreter's own start counts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.trace import process_age
from inspect_tools import cuda_driver
from inspect_tools.readers import prefetch

READ_THREADS = 8
PIECE_BYTES = 16 << 20
WRITE_BYTES = 64 << 20


def write_durably(path: Path, nbytes: int, times: dict[str, float]) -> None:
    """nbytes of zeros into a new file at `path`, then fsync: the disk work of writing an output of that size."""
    zeros = bytes(min(WRITE_BYTES, nbytes))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, zeros[: min(len(zeros), nbytes - done)], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    times["output durable"] = process_age()


def through_device(infos: list, device: str) -> int:
    """Every byte of these tensors read from their files into pinned memory and copied to `device`, piece by piece,
    on READ_THREADS threads, each with its own buffer and CUDA stream. Returns the bytes moved."""
    import torch

    from inspect_tools.readers.base import read_range

    pieces = [(info, start, min(PIECE_BYTES, info.nbytes - start))
              for info in infos for start in range(0, info.nbytes, PIECE_BYTES)]
    local = threading.local()

    def move(piece: tuple) -> int:
        info, start, size = piece
        if not hasattr(local, "host"):
            cuda = device.startswith("cuda")
            local.host = torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=cuda)
            local.dev = torch.empty(PIECE_BYTES, dtype=torch.uint8, device=device)
            local.stream = torch.cuda.Stream() if cuda else None
            local.fds = {}
        fd = local.fds.get(info.file)
        if fd is None:
            fd = local.fds[info.file] = os.open(info.file, os.O_RDONLY)
        read_range(fd, info, memoryview(local.host[:size].numpy()), start)
        if local.stream is None:
            local.dev[:size].copy_(local.host[:size])
        else:
            with torch.cuda.stream(local.stream):
                local.dev[:size].copy_(local.host[:size], non_blocking=True)
            local.stream.synchronize()  # the host buffer is read again by the next piece
        return size

    with ThreadPoolExecutor(READ_THREADS, "floor-read") as pool:
        return sum(pool.map(move, pieces))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the source checkpoint (a safetensors file or an index.json)")
    parser.add_argument("out", type=Path, help="where to write the output's bytes (the caller removes it)")
    parser.add_argument("--out-bytes", type=int, required=True, help="bytes of the output a conversion writes")
    parser.add_argument("--preset", default="wan2.2-ti2v-5b", help="the plan whose quantized weights are moved")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    times: dict[str, float] = {}
    if args.device.startswith("cuda"):
        prefetch.warm_checkpoint(args.src)
        cuda_driver.start()
    writer = threading.Thread(target=write_durably, args=(args.out, args.out_bytes, times))
    writer.start()
    import torch

    times["torch imported"] = process_age()
    torch.empty(1, device=args.device)
    times["device ready"] = process_age()
    from converter.pipeline import prepare

    model, plan = prepare(args.src, args.preset)
    weights = [lp.source.tensors["weight"] for lp in plan.layers if lp.quantized and lp.source is not None]
    times["plan"] = process_age()
    moved = through_device(weights, args.device)
    times["weights on the device"] = process_age()
    writer.join()
    model.close()
    prefetch.stop()
    times["end"] = process_age()
    print(json.dumps({"moved_bytes": moved, "times": times}), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
