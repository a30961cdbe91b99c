"""ComfyUI as part of the gate of `convert --verify` and `fix --verify`: a file ComfyUI refuses, cannot run, or
renders wrongly is not published.

The gate sees the temporary file before it is renamed into place. ComfyUI picks its reader by the file name's
extension (comfy.utils.load_torch_file: anything not .safetensors goes to torch.load, a pickle reader), so the
temporary file is shown to it through a symlink named .safetensors; it is never loaded any other way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from inspect_tools.comfyui.runtime import ComfyRuntime
from inspect_tools.comfyui.verify import verify
from inspect_tools.layers import open_model
from reference_specs.findings import Finding

GATE_STEPS = 2


def comfyui_gate(runtime: ComfyRuntime, reference: str | Path | None) -> Callable[[Path], list[Finding]]:
    """A check of a written temporary file: verify against `reference` (None: against the file itself, which
    proves only that ComfyUI loads and runs it)."""

    def check(written: Path) -> list[Finding]:
        with tempfile.TemporaryDirectory(prefix="nvdiag-verify-") as folder:
            link = Path(folder) / "candidate.safetensors"
            link.symlink_to(Path(written).resolve())
            with open_model(link) as mine, open_model(reference if reference is not None else link) as ref:
                result = verify(runtime, mine, ref, compute=("w4a16",), steps=GATE_STEPS)
        for finding in result.findings:
            finding.file = str(written)
            finding.message = f"ComfyUI gate: {finding.message}"
        return result.findings

    return check
