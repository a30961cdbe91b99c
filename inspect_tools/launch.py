"""The `nvdiag` console script: a command's input starts streaming into the page cache, and CUDA's driver starts,
before the command-line interface is even imported; then the interface runs the command as usual.

Importing the interface (typer, rich, every command module and what those import) takes 0.2-0.3 s of a fresh
process, and on a cold cache the disk is what a GPU conversion or a whole roundtrip waits for: each of those tenths
is a tenth later that the last byte arrives. So this module imports nothing but the standard library until it knows,
from the raw arguments, that this is `nvdiag convert SRC OUT ... --device cuda` or a whole `nvdiag roundtrip PATH
--against REF --device cuda` (no --layers, no --sample); then it starts what the command would start a few tenths
later: the warmer (inspect_tools.readers.prefetch) and CUDA's driver (inspect_tools.cuda_driver). The command
then finds that warmer (prefetch.started_for) and that driver (started once per process) instead of starting its
own. Anything else, or arguments it cannot read with certainty, starts nothing here.
"""

from __future__ import annotations

import sys

# Each command's options that take a value (the next argument, or after "="): which arguments are the positional
# ones depends on them. tests/test_launch.py checks these sets against the commands' own options.
VALUE_OPTIONS = {
    "convert": frozenset({"--preset", "-p", "--dtype-16", "--input-scales", "--device", "--format", "--gate-sample",
                          "--comfyui"}),
    "roundtrip": frozenset({"--against", "--layers", "--sample", "--device", "--format", "--report", "--fail-on"}),
}
HELP = frozenset({"--help", "-h"})


def parse(args: list[str]) -> tuple[str, list[str], dict[str, str], set[str]] | None:
    """(command, positional arguments, option -> its last value, flags) of `args` (the arguments after the
    program's name), for the commands in VALUE_OPTIONS; None for any other command or a request for help."""
    if not args or args[0] not in VALUE_OPTIONS:
        return None
    takes_value = VALUE_OPTIONS[args[0]]
    positional: list[str] = []
    values: dict[str, str] = {}
    flags: set[str] = set()
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--":
            positional += rest
            break
        if arg in HELP:
            return None
        name, equals, value = arg.partition("=")
        if arg.startswith("--") and equals:
            values[name] = value
        elif arg in takes_value:
            values[arg] = next(rest, "")
        elif arg.startswith("-") and not arg.startswith("--") and arg[:2] in takes_value:
            values[arg[:2]] = arg[2:]  # a short option with its value attached: -pNAME
        elif arg.startswith("-") and arg != "-":
            flags.add(arg)
        else:
            positional.append(arg)
    return args[0], positional, values, flags


def gpu_conversion_source(args: list[str]) -> str | None:
    """SRC of `convert SRC OUT ... --device cuda`; None for anything else (a dry run, the CPU, no SRC)."""
    parsed = parse(args)
    if parsed is None or parsed[0] != "convert":
        return None
    _, positional, values, flags = parsed
    if "--dry-run" in flags or values.get("--device", "cpu") != "cuda" or not positional:
        return None
    return positional[0]


def whole_gpu_roundtrip(args: list[str]) -> tuple[str, str, str] | None:
    """(PATH, REF, device) of `roundtrip PATH --against REF --device cuda[:N]` that checks every layer (the command
    warms its reads only then); None for anything else. On the CPU a roundtrip waits for its arithmetic, not for
    the disk, and the head start would cost the headers' parsing twice (0.07 s on the 2-core machine)."""
    parsed = parse(args)
    if parsed is None or parsed[0] != "roundtrip":
        return None
    _, positional, values, _ = parsed
    device = values.get("--device", "cpu")
    if ("--layers" in values or "--sample" in values or not positional or not values.get("--against")
            or not device.startswith("cuda")):
        return None
    return positional[0], values["--against"], device


def start_early(args: list[str]) -> None:
    """Start the warmer and CUDA's driver for a GPU conversion's or a whole GPU roundtrip's arguments;
    nothing for any other command. Never fails: whatever goes wrong here, the command does the same itself."""
    try:
        if (src := gpu_conversion_source(args)) is not None:
            from inspect_tools import cuda_driver
            from inspect_tools.readers import prefetch

            prefetch.warm_checkpoint(src)
            cuda_driver.start()
        elif (roundtrip := whole_gpu_roundtrip(args)) is not None:
            from inspect_tools import cuda_driver
            from inspect_tools.read_ahead import warm_roundtrip_paths

            path, against, device = roundtrip
            warm_roundtrip_paths(path, against)
            cuda_driver.start_for(device)
    except Exception:  # noqa: BLE001 - only a head start: the command reports any real problem itself
        pass


def run() -> None:
    start_early(sys.argv[1:])
    from inspect_tools.cli import run as run_command

    run_command()


if __name__ == "__main__":
    run()
