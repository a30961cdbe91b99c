"""The `nvdiag` console script: a GPU conversion's source starts streaming into the page cache, and CUDA's driver
starts, before the command-line interface is even imported; then the interface runs the command as usual.

Importing the interface (typer, rich, every command module and what those import) takes 0.2-0.3 s of a fresh
process, and on a cold cache the disk is what a GPU conversion waits for: each of those tenths is a tenth later
that the last source byte arrives. So this module imports nothing but the standard library, the warmer and the CUDA
driver starter, and reads just enough of the arguments to know that this is `nvdiag convert SRC OUT ... --device
cuda`. The command itself then finds the warmer already reading (prefetch.warm_checkpoint starts it once per
source) and the driver already started (cuda_driver.start runs once per process). Anything else, or arguments it
cannot read with certainty, starts nothing here: the command does it itself, a few tenths later.
"""

from __future__ import annotations

import sys

# convert's options that take a value, as the next argument (or after "="): which arguments are SRC and OUT depends
# on them. tests/test_launch.py checks this set against the convert command's own options.
CONVERT_VALUE_OPTIONS = frozenset({"--preset", "-p", "--dtype-16", "--input-scales", "--device", "--format",
                                   "--gate-sample", "--comfyui"})
# Arguments after which the command converts nothing: nothing to read ahead for.
NO_CONVERSION = frozenset({"--dry-run", "--help", "-h"})


def gpu_conversion_source(args: list[str]) -> str | None:
    """SRC of `convert SRC OUT ... --device cuda` (the arguments after the program's name), or None when the
    arguments are anything else: another command, a dry run, help, the CPU, or no SRC."""
    if not args or args[0] != "convert":
        return None
    positional: list[str] = []
    device = "cpu"  # convert's default
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--":
            positional += rest
            break
        if arg in NO_CONVERSION:
            return None
        name, equals, value = arg.partition("=")
        if arg.startswith("--") and equals:
            if name == "--device":
                device = value
        elif arg in CONVERT_VALUE_OPTIONS:
            value = next(rest, "")
            if arg == "--device":
                device = value
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            pass  # -pNAME: the short preset option with its value attached
        elif arg.startswith("-") and arg != "-":
            pass  # a flag (--force, --verify, --debug)
        else:
            positional.append(arg)
    return positional[0] if device == "cuda" and positional else None


def start_early(args: list[str]) -> None:
    """Start the warmer and CUDA's driver for a GPU conversion's arguments; nothing for any other command."""
    src = gpu_conversion_source(args)
    if src is None:
        return
    from inspect_tools import cuda_driver
    from inspect_tools.readers import prefetch

    prefetch.warm_checkpoint(src)
    cuda_driver.start()


def run() -> None:
    start_early(sys.argv[1:])
    from inspect_tools.cli import run as run_command

    run_command()


if __name__ == "__main__":
    run()
