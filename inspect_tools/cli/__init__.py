"""The `nvdiag` command: a thin typer app. Parses, calls, renders. The only composition root.

Each subcommand lives in its own module below and registers itself on `app`; bad input never gives a traceback:
NvdiagError becomes one line on stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import os
import sys

import typer

from inspect_tools.errors import NvdiagError

app = typer.Typer(
    name="nvdiag",
    help="Diagnose, lint, compare and convert NVFP4 / FP8 mixed diffusion checkpoints for ComfyUI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



@app.callback()
def _root() -> None:
    """nvdiag: find out why an NVFP4 checkpoint decodes wrongly in ComfyUI, and write ones that do not."""


# Importing the command modules registers their commands on `app` (order = order in --help).
from inspect_tools.cli import (  # noqa: E402,F401
    convert_cmd,
    demo_cmd,
    diff_cmd,
    fix_cmd,
    inspect_cmd,
    lint_cmd,
    preset_cmd,
    roundtrip_cmd,
)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, map NvdiagError to exit 2 with one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
        os.environ["NVDIAG_DEBUG"] = "1"
    try:
        app(args=args, prog_name="nvdiag")
    except SystemExit as exc:  # typer's standalone mode ends every run with SystemExit (usage errors: 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except NvdiagError as exc:
        if debug:
            raise
        print(f"nvdiag: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nvdiag: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
