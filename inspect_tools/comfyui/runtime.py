"""Find a ComfyUI installation and import its model-loading code, in CPU mode or on a CUDA device.

ComfyUI is the real client: nvdiag runs the user's file through ComfyUI's own `comfy.sd` code (imported from the
user's install at run time, never copied). Where it is found: `--comfyui DIR`, else the COMFYUI_PATH environment
variable, else an importable `comfy` package (nvdiag run inside ComfyUI's own Python environment).

How ComfyUI is brought up on a CPU follows shared/comfyui.md: `comfy.cli_args.args.cpu` is set before
`comfy.model_management` is first imported, and only `comfy.sd` is imported (nodes.py pulls in torchsde, av, aiohttp).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspect_tools.errors import UsageError

ENV_VAR = "COMFYUI_PATH"
HOW_TO_POINT = (
    "pass --comfyui DIR (the folder that holds comfy/ and main.py), set COMFYUI_PATH, or run nvdiag inside "
    "ComfyUI's own Python environment"
)


class ComfyUIUnavailable(UsageError):
    """No usable ComfyUI: not found, or found but its imports fail (exit 2, one line)."""


@dataclass(frozen=True)
class ComfyRuntime:
    """ComfyUI's modules as imported in this process, and where they came from."""

    root: Path
    device: str
    sd: Any  # comfy.sd
    model_management: Any  # comfy.model_management
    quant_ops: Any  # comfy.quant_ops
    version: str


def _is_comfyui_root(folder: Path) -> bool:
    return (folder / "comfy" / "sd.py").is_file() and (folder / "comfy" / "model_management.py").is_file()


def locate(explicit: str | Path | None = None) -> Path | None:
    """The ComfyUI folder to import from, or None when `comfy` is importable as it is (ComfyUI's own venv).

    Raises ComfyUIUnavailable when a folder is named but is not ComfyUI, or when nothing is found."""
    for origin, value in (("--comfyui", explicit), (ENV_VAR, os.environ.get(ENV_VAR))):
        if not value:
            continue
        folder = Path(value).expanduser()
        if not _is_comfyui_root(folder):
            raise ComfyUIUnavailable(f"{origin} {folder}: not a ComfyUI folder (no comfy/sd.py in it); {HOW_TO_POINT}")
        return folder.resolve()
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        return None
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.origin is None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))).parent
        if _is_comfyui_root(candidate):
            return None
    raise ComfyUIUnavailable(f"ComfyUI not found: {HOW_TO_POINT}")


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty `torchvision` modules for ComfyUI's import chain when torchvision is not installed.

    comfy.sd imports model families (ACE audio VAE, Cosmos) that import torchvision at module level; the WAN and
    Qwen paths never call it (shared/comfyui.md). Anything actually used raises a clear error."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing_attribute(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError(f"{spec.name}.{attr}: torchvision is not installed (nvdiag stand-in)")

            return unavailable

        module.__getattr__ = missing_attribute  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _ensure_torchvision() -> None:
    if any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
        return
    try:
        importlib.import_module("torchvision")
    except Exception:  # absent, or a build that does not match torch ("operator torchvision::nms does not exist")
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.append(_TorchvisionStandIn())


_RUNTIME: ComfyRuntime | None = None


def load_runtime(explicit: str | Path | None = None, device: str = "cpu") -> ComfyRuntime:
    """Import ComfyUI's loader once per process (ComfyUI's device choice is global, made at first import)."""
    global _RUNTIME
    root = locate(explicit)
    if _RUNTIME is not None:
        if root is not None and root != _RUNTIME.root:
            raise ComfyUIUnavailable(f"ComfyUI was already imported from {_RUNTIME.root} in this process; "
                                     f"cannot switch to {root}")
        if device != _RUNTIME.device:
            raise ComfyUIUnavailable(f"ComfyUI was already started on {_RUNTIME.device} in this process")
        return _RUNTIME
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: this torch has no CUDA device")
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _ensure_torchvision()
    # ComfyUI parses no command line when imported as a library (comfy.options.args_parsing is False by default);
    # its device choice is read from comfy.cli_args.args when comfy.model_management is first imported.
    from inspect_tools.comfyui.loading import captured_logs

    try:
        with captured_logs():  # ComfyUI's import-time notes (backends found, torchaudio missing) are not ours to print
            cli_args, sd, model_management, quant_ops = _import_comfy(device)
    except ImportError as exc:
        where = root or "the importable comfy package"
        raise ComfyUIUnavailable(
            f"ComfyUI at {where} cannot be imported: {exc} (install nvdiag's 'verify' extra or ComfyUI's "
            "requirements.txt into this Python)"
        ) from None
    found = root or Path(sd.__file__).resolve().parent.parent
    _RUNTIME = ComfyRuntime(root=found, device=device, sd=sd, model_management=model_management,
                            quant_ops=quant_ops, version=_comfyui_version(found))
    return _RUNTIME


def _import_comfy(device: str) -> tuple[Any, Any, Any, Any]:
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = device == "cpu"
    sd = importlib.import_module("comfy.sd")
    model_management = importlib.import_module("comfy.model_management")
    quant_ops = importlib.import_module("comfy.quant_ops")
    return cli_args, sd, model_management, quant_ops


def _comfyui_version(root: Path) -> str:
    commit = root / "ORACLE_COMMIT"
    if commit.is_file():
        return commit.read_text(encoding="utf-8", errors="replace").strip()[:12]
    version_file = root / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"
