"""`nvdiag demo`: the main job on built-in synthetic checkpoints, start to finish, no network.

The story it tells is the user's: a sharded FP32 diffusers WAN 2.2 TI2V source, a GGUF Q4_0 file of the same model that
looks clean, and an NVFP4 mixed file that loads but is covered in block noise. Each step runs the real subcommand and
shows what it finds; steps that need ComfyUI are skipped with a note where it is not found.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer

from inspect_tools.cli import app
from inspect_tools.cli.hints import display
from inspect_tools.cli.output import console

DEMO_VARIANT = "wan2.2-ti2v-5b"
QWEN_VARIANT = "qwen-image-2512"


def comfyui_unavailable() -> str | None:
    """Why verify cannot run here (None when ComfyUI is found and imports)."""
    from inspect_tools.comfyui.runtime import ComfyUIUnavailable, load_runtime

    try:
        load_runtime(None)
    except ComfyUIUnavailable as exc:
        return str(exc)
    return None


class _Tee(io.TextIOBase):
    """stdout that is also kept, so the demo can run the command a step printed (`next: ...`) as the next step."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _step(title: str, argv: list[str], why: str, skip: str | None = None,
          printed: list[str] | None = None) -> int | None:
    """Run one nvdiag subcommand in-process, framed by a heading; returns its exit code (None when skipped).
    `printed` collects the step's output lines."""
    from inspect_tools.cli import main

    out = console()
    out.rule(f"[bold]{title}")
    out.print(f"[dim]{why}[/]")
    out.print(f"$ {shlex.join(['nvdiag', *argv])}", style="bold cyan", soft_wrap=True, markup=False)
    if skip is not None:
        out.print(f"[yellow](skipped: {skip})[/]")
        return None
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        code = main(argv)
    if printed is not None:
        printed.extend(tee.kept.getvalue().splitlines())
    out.print(f"[dim]exit code {code}[/]")
    return code


def _next_command(lines: list[str]) -> list[str] | None:
    """The argv of the `next: nvdiag ...` line a roundtrip printed."""
    line = next((line for line in lines if line.startswith("next: nvdiag ")), None)
    return shlex.split(line.removeprefix("next: "), comments=True)[1:] if line else None


def build_demo_files(folder: Path) -> dict[str, Path]:
    """Write the demo's synthetic checkpoints into `folder` and return their paths."""
    from inspect_tools.synthetic import checkpoints as factory

    paths = {
        "source": folder / "wan_ti2v_fp32_diffusers",
        "gguf": folder / "wan_ti2v_Q4_0.gguf",
        "fp8": folder / "wan_ti2v_fp8_scaled.safetensors",
        "broken": folder / "wan_ti2v_nvfp4_mixed_user.safetensors",
    }
    factory.write_float(paths["source"], DEMO_VARIANT, naming="diffusers", sharded=2)
    factory.write_gguf(paths["gguf"], DEMO_VARIANT, qtype="Q4_0")
    factory.write_fp8_comfy(paths["fp8"], DEMO_VARIANT)
    factory.write_nvfp4_mixed(paths["broken"], DEMO_VARIANT, faults=("scale-layout-linear",))
    return paths


def build_qwen_files(folder: Path) -> Path:
    """A Qwen Image 2512 BF16 source at the width ComfyUI builds (3072, text 3584), one block deep."""
    import torch

    from inspect_tools.synthetic import checkpoints as factory
    from inspect_tools.synthetic import comfyui_dims

    path = folder / "qwen_image_bf16.safetensors"
    factory.write_float(path, QWEN_VARIANT, dims=comfyui_dims(QWEN_VARIANT), dtype=torch.bfloat16)
    return path


def run_demo(folder: Path) -> int:
    out = console()
    out.print("[bold]nvdiag demo[/]: a WAN 2.2 TI2V-shaped model, scaled down, built on the spot (no downloads).")
    paths = build_demo_files(folder)
    out.print(f"files in {folder}:")
    for role, path in paths.items():
        out.print(f"  {role:7s} {path.name}")
    src, gguf, fp8, broken = (display(paths[k]) for k in ("source", "gguf", "fp8", "broken"))
    preset = display(folder / "from_gguf.toml")
    good = display(folder / "wan_ti2v_nvfp4_mixed_nvdiag.safetensors")
    codes = [
        _step("1. What is the user's file?", ["inspect", broken, "--layers", "blocks.0.self_attn.*"],
              "It loads, has the right layers and markers: nothing looks wrong from the outside."),
        _step("2. Lint it against ComfyUI's rules", ["lint", broken],
              "Header and scale checks only, megabytes read: it finds the layout, and says what it cannot see "
              "without the values the file was made from."),
        _step("3. Compare it with the GGUF file that renders cleanly", ["diff", broken, gguf],
              "Different containers and formats, aligned layer by layer; the dequantized values are compared too."),
        _step("4. Compare it with the FP8 scaled file that renders cleanly", ["diff", broken, fp8],
              "Another reference a ComfyUI user has: the same cause, found from the values."),
    ]
    printed: list[str] = []
    codes.append(_step("5. Measure what it really decodes to", ["roundtrip", broken, "--against", src],
                       "Against the FP32 sharded diffusers source: the error per layer, the cause that explains it, "
                       "and the command that repairs it.", printed=printed))
    fix = _next_command(printed)
    fixed = fix[2] if fix else display(folder / "wan_ti2v_nvfp4_mixed_user_fixed.safetensors")
    codes += [
        _step("6. Repair it with the command roundtrip printed", fix or ["fix", broken, fixed, "--against", src],
              "The cause is certain and has a lossless remedy: re-swizzle the block scales, no requantization."),
        _step("7. Check the repaired file", ["roundtrip", fixed, "--against", src],
              "Same bytes, right layout: every NVFP4 layer back within NVFP4's own error of the source."),
        _step("8. Derive the layer selection from the GGUF file",
              ["preset", "from-gguf", gguf, "-o", preset, "--force"],
              "F32 stays F32, 16-bit stays 16-bit, Q4_0/Q4_1 become NVFP4."),
        _step("9. Convert the source the right way", ["convert", src, good, "--preset", preset, "--force"],
              "ComfyUI-native names, swizzled scales, markers; gated by lint and a roundtrip before it is published."),
        _step("10. Lint the converted file", ["lint", good],
              "What the gate already checked before publishing, run again as a user would."),
    ]
    codes += _comfyui_steps(folder, src, broken, good)
    out.rule("[bold]summary")
    ran = sum(c is not None for c in codes)
    out.print(f"{ran} of {len(codes)} steps ran; files kept in {folder}")
    return 0


def _comfyui_steps(folder: Path, src: str, broken: str, good: str) -> list[int | None]:
    """The real client last: what ComfyUI itself renders from the user's file and from nvdiag's."""
    why_not = comfyui_unavailable()
    skip = f"{why_not}; then run `nvdiag demo` again" if why_not else None
    steps: list[tuple[str, list[str], str]] = [
        ("11. What ComfyUI renders from the user's file", ["verify", broken, "--against", src, "--compute", "both"],
         "ComfyUI's own loader and denoiser, on CPU: the block noise is in the output, and where it enters."),
        ("12. What ComfyUI renders from nvdiag's file", ["verify", good, "--against", src, "--compute", "both"],
         "The converted file renders exactly what comfy-kitchen's encoding of the source renders."),
    ]
    codes = [_step(title, argv, why, skip) for title, argv, why in steps]
    qwen_src = display(folder / "qwen_image_bf16.safetensors")
    qwen_out = display(folder / "qwen_image_nvfp4_nvdiag.safetensors")
    qwen = [
        ("13. Qwen Image 2512: convert a BF16 source", ["convert", qwen_src, qwen_out, "--preset", "qwen-image-2512",
                                                       "--force"],
         "Full width (ComfyUI builds Qwen Image at 3072 only), one block deep."),
        ("14. Qwen Image 2512: what ComfyUI renders", ["verify", qwen_out, "--against", qwen_src, "--steps", "1"],
         "Detected as Qwen Image, rendered as well as comfy-kitchen's own encoding."),
    ]
    if skip is None:
        build_qwen_files(folder)
    codes += [_step(title, argv, why, skip) for title, argv, why in qwen]
    return codes


@app.command("demo")
def demo_command(
    folder: Annotated[Path | None, typer.Option("--dir", help="Where to write the demo files")] = None,
    keep: Annotated[bool, typer.Option("--keep/--clean", help="Keep an existing --dir's contents")] = False,
) -> None:
    """Run the whole diagnosis on built-in synthetic checkpoints (no downloads, under a minute).

    Example:

      nvdiag demo --dir ./nvdiag-demo
    """
    target = folder or Path("nvdiag-demo")
    if target.exists() and not keep:
        _clear_demo_folder(target)
    target.mkdir(parents=True, exist_ok=True)
    raise typer.Exit(run_demo(target))


def _clear_demo_folder(target: Path, is_ours: Callable[[Path], bool] | None = None) -> None:
    """Remove only files the demo itself writes (never a user's unrelated files)."""
    is_ours = is_ours or (lambda p: p.name.startswith(("wan_ti2v_", "from_gguf", "qwen_image_")))
    for child in target.iterdir():
        if is_ours(child):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
