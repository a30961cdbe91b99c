"""The `nvdiag` command: a thin typer app. Parses, calls, renders. The only composition root.

Each subcommand lives in its own module below and registers itself on `app`; bad input never gives a traceback:
NvdiagError becomes one line on stderr and exit code 2, InternalError (a bug in nvdiag, e.g. a crashed lint rule)
one line and exit code 3 (`--debug` shows the traceback).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import traceback

import typer

from inspect_tools.errors import InternalError, NvdiagError
from inspect_tools.interrupts import command_scope

app = typer.Typer(
    name="nvdiag",
    help="Diagnose, lint, compare and convert NVFP4 / FP8 mixed diffusion checkpoints for ComfyUI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"nvdiag {version('nvdiag')}")
        except PackageNotFoundError:  # a source checkout that was never installed
            print("nvdiag 0+unknown")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print nvdiag's version and exit"),
) -> None:
    """nvdiag: find out why an NVFP4 checkpoint decodes wrongly in ComfyUI, and write ones that do not."""


def _help_width(args: list[str]) -> None:
    """Piped --help gets the width the other output gets ($COLUMNS, else 120), not rich's 80, so that the examples
    are not broken in the middle of a command (typer reads its own TERMINAL_WIDTH first)."""
    if not ({"-h", "--help"} & set(args) or not args) or sys.stdout.isatty() or os.environ.get("TERMINAL_WIDTH"):
        return
    import typer.rich_utils

    columns = os.environ.get("COLUMNS", "")
    typer.rich_utils.MAX_WIDTH = int(columns) if columns.isdigit() and int(columns) >= 40 else 120


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
    sensitivity_cmd,
    verify_cmd,
)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, map NvdiagError to its exit code (2; InternalError 3) with one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
        os.environ["NVDIAG_DEBUG"] = "1"
    _help_width(args)
    old_sigint = _catch_sigint()
    try:
        with command_scope():  # a signal after an output was published no longer turns the run into a failure
            app(args=args, prog_name="nvdiag")
    except SystemExit as exc:  # typer's standalone mode ends every run with SystemExit (usage errors: 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except NvdiagError as exc:
        if debug:  # the traceback is extra: the line and the exit code stay what scripts expect
            traceback.print_exc()
        kind = "internal error" if isinstance(exc, InternalError) else "error"
        print(f"nvdiag: {kind}: {exc}{_what_to_do(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the environment, not a bug: unwritable folder, disk full, permission denied
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"nvdiag: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Interrupted):
        print("nvdiag: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
    return 0


def _what_to_do(exc: NvdiagError) -> str:
    """'; this is a safetensors file: ...' when an unreadable input's bytes say what it really is."""
    from inspect_tools.cli.hints import container_hint
    from inspect_tools.errors import InputError

    if not isinstance(exc, InputError) or not exc.path or not os.path.isfile(exc.path):
        return ""
    hint = container_hint(exc.path)
    return f"; {hint}" if hint and hint not in exc.message else ""


class _Interrupted(BaseException):
    """Ctrl-C. typer turns KeyboardInterrupt into a silent exit 130; this passes through it to main()."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted()


def _catch_sigint() -> object | None:
    """Route Ctrl-C to main() for one line on stderr (main thread only; the old handler is returned to restore)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _raise_interrupted)


def run() -> None:
    code = main()
    exit_without_teardown(code)
    sys.exit(code)


def exit_without_teardown(code: int) -> None:
    """After a command that imported torch: end the process now, without the interpreter's teardown of torch's
    modules and, on the GPU path, of its CUDA state (context, cached device and pinned memory). The system reclaims
    all of it at exit anyway, and the teardown is a fixed cost of every such command: 0.5-0.65 s on the 2-core
    development machine (`nvdiag roundtrip` of a 0.5 GB source 4.77-5.08 s -> 4.25-4.42 s), 0.6-0.8 s for a CUDA
    context with 1 GiB pinned.

    What a normal exit does that matters is kept: a command's outputs are fsynced and renamed before it returns; a
    non-daemon thread still running means a normal exit (which waits for it); exit handlers run (logging's,
    finalizers such as temporary folders' cleanup, torch's flags: 6 of them, ~8 ms, after a CPU roundtrip), except
    once CUDA started, where the measured path skips them (none of ours registers one there); the streams are
    flushed."""
    torch = sys.modules.get("torch")
    if torch is None:
        return  # nothing heavy to tear down
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    if not torch.cuda.is_initialized():
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    os._exit(code)
