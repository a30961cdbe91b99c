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

# Importing the command modules registers their commands on `app` (order = order in --help).
from inspect_tools.cli import (  # noqa: E402,F401
    inspect_cmd,
    diff_cmd,
    lint_cmd,
    roundtrip_cmd,
    preset_cmd,
    convert_cmd,
    fix_cmd,
    demo_cmd,
)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, map NvdiagError to exit 2 with one line."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]
    if debug:
        os.environ["NVDIAG_DEBUG"] = "1"
    try:
        app(args=args, prog_name="nvdiag", standalone_mode=False)
    except NvdiagError as exc:
        if debug:
            raise
        print(f"nvdiag: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("nvdiag: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.Abort):
            print("nvdiag: aborted", file=sys.stderr)
            return 130
        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        raise
    return 0


def run() -> None:
    sys.exit(main())
