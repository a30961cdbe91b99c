"""`nvdiag inspect` (being written)."""
from inspect_tools.cli import app


@app.command("inspect")
def inspect_command(path: str) -> None:
    """Say what a checkpoint is, layer by layer."""
    raise NotImplementedError
