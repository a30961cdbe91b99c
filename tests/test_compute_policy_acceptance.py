"""The compute policy's acceptance check, in ComfyUI itself, on the fixtures of all five targets: WAN 2.2 TI2V 5B,
T2V A14B and I2V A14B, Qwen Image 2512 and Qwen Image Edit 2511 (run with a reference latent, as edit workflows run
it). The Qwen fixtures are full width, one block (ComfyUI builds Qwen Image at nothing narrower): about four minutes
each on two cores, most of the acceptance's time.

Each fixture gives the attention output projection of every block activation outliers (4 input channels 50x larger,
the model's function unchanged: inspect_tools.synthetic.add_activation_outliers). The user's path is then
    nvdiag sensitivity SRC -o report.json
    nvdiag preset from-sensitivity report.json -o policy.toml
    nvdiag convert SRC policy.safetensors --preset policy.toml
and `nvdiag verify --compute both` of that file against SRC is compared with the plain NVFP4 file the built-in
preset writes (every quantized layer W4A4 on Blackwell), and with that plain file made from the same model without
the outliers ("clean": what W4A4 costs a model that has no outlier problem, an independent floor no policy
decision shapes).

The measure is the output error verify reports (relative L2 of the denoiser's output against SRC, the worst of the
noise levels), what a user sees. What must hold:
- the layers given outliers are the ones marked full_precision_matrix_mult (W4A16), and few others are;
- under W4A4 the policy file is clearly better than the all-W4A4 file: at most 0.6 of its error;
- close to W4A16: of the distance from W4A16 to all-W4A4, the policy file leaves at most a quarter;
- the policy removes what the outliers cost: W4A4 costs the policy file (its W4A4 error above its own W4A16 error)
  at most a quarter of the outliers' extra cost above what it costs the clean model. This one holds at the output and
  at the block outputs too. At the blocks the plain "quarter of the distance to W4A16" does not: there every layer
  left at W4A4 adds its 4-bit activation error (about sqrt(2) of its weight error, in quadrature), which on Qwen's
  single full-width block is most of the distance, outliers or not (clean model 0.20 against W4A16 0.14);
- the file is the size of the NVFP4 file (W4A16 is a marker, not bytes; the odd FP8 layer is small).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from inspect_tools.cli import main
from inspect_tools.synthetic import add_activation_outliers, comfyui_dims, float_state_dict, save_safetensors

TARGETS = ["wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "qwen-image-2512", "qwen-image-edit-2511"]
FILES = {"policy": "both", "all": "both", "clean": "both"}  # file: verify --compute


def outlier_layers(variant: str) -> list[str]:
    blocks = comfyui_dims(variant)["blocks"]
    if variant.startswith("wan"):
        return [f"blocks.{b}.self_attn.o" for b in range(blocks)]
    return [f"transformer_blocks.{b}.attn.to_out.0" for b in range(blocks)]


@pytest.fixture(scope="module", params=TARGETS)
def measured(request, comfyui, tmp_path_factory):
    variant = request.param
    folder = tmp_path_factory.mktemp(variant)
    state = float_state_dict(variant, dims=comfyui_dims(variant))
    clean = save_safetensors(state, folder / "clean_src.safetensors", {})
    for layer in outlier_layers(variant):
        add_activation_outliers(state, layer, gain=50.0)
    src = save_safetensors(state, folder / "src.safetensors", {})
    del state
    report, policy = folder / "report.json", folder / "policy.toml"
    assert main(["sensitivity", str(src), "--comfyui", str(comfyui.root), "-o", str(report)]) == 0
    assert main(["preset", "from-sensitivity", str(report), "-o", str(policy)]) == 0
    files = {name: folder / f"{name}.safetensors" for name in FILES}
    assert main(["convert", str(src), str(files["policy"]), "--preset", str(policy)]) == 0
    assert main(["convert", str(src), str(files["all"]), "--preset", variant]) == 0
    assert main(["convert", str(clean), str(files["clean"]), "--preset", variant]) == 0
    return variant, {"policy": src, "all": src, "clean": clean}, files


@pytest.fixture(scope="module")
def errors(measured, comfyui):
    """verify's figures per file and compute path (module scope, so without capsys: read the JSON from a pipe)."""
    _, sources, files = measured
    out = {}
    for name, path in files.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["verify", str(path), "--against", str(sources[name]), "--comfyui", str(comfyui.root),
                         "--compute", FILES[name], "--steps", "2", "--no-decode", "--format", "json"])
        assert code == 0, buffer.getvalue()[-2000:]
        out[name] = {c["compute"]: c["file"] for c in json.loads(buffer.getvalue())["compute"]}
    return out


def _marked_w4a16(path: Path) -> set[str]:
    """NVFP4 layers multiplied in full precision (FP8 layers chosen for their weights are not counted)."""
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    return {name for name, conf in layers.items()
            if conf["format"] == "nvfp4" and conf.get("full_precision_matrix_mult")}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _at(figures: dict, where: str) -> float:
    return figures["rel_l2"] if where == "output" else _mean(figures["blocks"])


def test_the_layers_with_outliers_are_the_ones_marked_w4a16(measured):
    variant, _, files = measured
    marked = _marked_w4a16(files["policy"])
    assert set(outlier_layers(variant)) <= marked
    with safe_open(str(files["policy"]), "pt") as f:
        quantized = len(json.loads(f.metadata()["_quantization_metadata"])["layers"])
    assert len(marked) <= max(len(outlier_layers(variant)) + 2, quantized // 4), sorted(marked)
    assert _marked_w4a16(files["all"]) == set()


def test_under_w4a4_the_policy_file_is_clearly_better_than_all_w4a4(errors):
    policy, every = errors["policy"]["w4a4"]["rel_l2"], errors["all"]["w4a4"]["rel_l2"]
    assert math.isfinite(policy) and policy <= 0.6 * every, (policy, every)


def test_under_w4a4_the_policy_file_is_close_to_w4a16(errors):
    """Of the distance from W4A16 to all-W4A4 at the output, the policy leaves at most a quarter."""
    w4a4, w4a16 = errors["policy"]["w4a4"]["rel_l2"], errors["policy"]["w4a16"]["rel_l2"]
    every = errors["all"]["w4a4"]["rel_l2"]
    assert every > w4a16
    assert (w4a4 - w4a16) <= 0.25 * (every - w4a16), (w4a4, w4a16, every)
    # and W4A16 itself is what the plain NVFP4 file gives: the policy costs nothing where W4A4 is not used
    assert errors["policy"]["w4a16"]["rel_l2"] == pytest.approx(errors["all"]["w4a16"]["rel_l2"], rel=0.1)


@pytest.mark.parametrize("where", ["output", "blocks"])
def test_the_policy_removes_what_the_outliers_cost_under_w4a4(errors, where):
    """W4A4's cost (W4A4 error above the same file's W4A16 error): the policy file's is at most the clean model's plus
    a quarter of what the outliers add to it."""
    def cost(name: str) -> float:
        return _at(errors[name]["w4a4"], where) - _at(errors[name]["w4a16"], where)

    policy, every, clean = cost("policy"), cost("all"), cost("clean")
    assert every > clean, (every, clean)  # the fixture has an outlier problem to remove
    assert policy <= clean + 0.25 * (every - clean), (policy, clean, every)


def test_the_policy_file_is_the_size_of_the_nvfp4_file(measured):
    _, _, files = measured
    assert files["policy"].stat().st_size <= 1.05 * files["all"].stat().st_size

