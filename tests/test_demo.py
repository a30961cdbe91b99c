"""`nvdiag demo` end to end, as a newcomer runs it: every step runs, ComfyUI's verdicts are the story's."""

from __future__ import annotations

from inspect_tools.cli import main


def test_the_demo_runs_every_step_and_ends_with_what_comfyui_renders(comfyui, tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "14 of 14 steps ran" in out
    # the user's file: ComfyUI renders block noise and nvdiag names the cause; nvdiag's own files render right
    assert "ComfyUI renders this file wrongly: scale-layout-linear" in out
    assert out.count("ComfyUI renders this file as well as a correct file of the same layer selection") == 2
    # the Qwen Image 2512 steps: ComfyUI builds QwenImage from nvdiag's file (2512: no reference-method override),
    # holds all 12 NVFP4 layers quantized, and renders it as well as comfy-kitchen's encoding of the source
    flat = " ".join(out.split())  # rich wraps at the terminal's width
    assert "qwen_image_nvfp4_nvdiag.safetensors: QwenImage / QwenImage (num_layers 1, in_channels 64)" in flat
    assert "quantized Linear layers: nvfp4 12; plain Linear layers: 8" in flat
    assert "default_ref_method" not in flat
    assert {p.name for p in tmp_path.iterdir()} >= {"qwen_image_nvfp4_nvdiag.safetensors",
                                                    "wan_ti2v_nvfp4_mixed_user_fixed.safetensors"}


def test_without_comfyui_the_demo_says_how_to_get_the_last_steps(tmp_path, capsys, monkeypatch):
    from inspect_tools.cli import demo_cmd

    monkeypatch.setattr(demo_cmd, "comfyui_unavailable", lambda: "ComfyUI not found: pass --comfyui DIR")
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "10 of 14 steps ran" in out
    assert out.count("(skipped: ComfyUI not found") == 4
    # the issue-20 story: diff finds the noise against GGUF and FP8 by default, lint says what it could not check,
    # roundtrip names the cause and prints the repair, and the demo runs that very command
    lines = out.splitlines()
    assert out.count("FAIL: 20 error(s)") == 2 and "not checked: nibble order" in out
    hint = next(line for line in lines if line.startswith("next: nvdiag fix "))
    assert "$ " + hint.removeprefix("next: ") in lines
    assert "repaired scale-layout-linear (20)" in out
