"""The layers of DESIGN.md point down only: the CLI composes, the converter uses inspect_tools, inspect_tools uses
reference_specs, and nothing imports a layer above it (an engine that imported the CLI could not be used without
it, and would render where its caller decides)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package (folder) -> module prefixes nothing in it may import
FORBIDDEN = {
    "reference_specs": ("inspect_tools", "converter"),
    "inspect_tools": ("converter", "inspect_tools.cli", "inspect_tools.comfyui"),
    "converter": ("inspect_tools.cli", "inspect_tools.comfyui"),
}
# The console script's entry (inspect_tools/launch.py) belongs to the CLI layer but lives outside its package:
# importing anything in inspect_tools/cli/ first imports the whole interface, and the launcher's point is to start
# a GPU conversion's reads before that.
CLI_OUTSIDE_ITS_PACKAGE = ("inspect_tools/launch.py",)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def upward_imports(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "inspect_tools" and {"cli", "comfyui"} & set(path.relative_to(ROOT / package).parts):
            continue  # the CLI is the composition root: it may import anything; the ComfyUI bridge sits on top
        if path.relative_to(ROOT).as_posix() in CLI_OUTSIDE_ITS_PACKAGE:
            continue
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_its_own(package: str) -> None:
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from inspect_tools.cli.output import console\n    import converter.stages\n")
    assert {"inspect_tools.cli.output", "converter.stages"} <= imported_modules(module)
