"""Runnable benchmarks: python -m benchmarks.<name>."""

# `python -c NVDIAG ARGS...` runs the nvdiag command as its console script does (inspect_tools.launch); a checkout
# older than that launcher (benchmarks.gpu --tree) runs its command-line interface directly, as its script did.
NVDIAG = ("try:\n    from inspect_tools.launch import run\nexcept ImportError:\n    from inspect_tools.cli import run\n"
          "run()")
