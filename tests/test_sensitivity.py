"""`nvdiag sensitivity` and `nvdiag calibrate` with ComfyUI itself: the layers given activation outliers (the model's
function unchanged) are the ones ranked at risk, and calibrated input scales go through convert into ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspect_tools.cli import main
from inspect_tools.comfyui.sensitivity import RISKY, sensitivity
from inspect_tools.layers import open_model
from inspect_tools.synthetic import add_activation_outliers, float_state_dict, save_safetensors

VARIANT = "wan2.2-ti2v-5b"
SENSITIVE = "blocks.0.self_attn.o"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """WAN TI2V (ComfyUI's dims) whose blocks.0.self_attn.o sees 4 input channels 50x larger than the rest."""
    state = float_state_dict(VARIANT)
    add_activation_outliers(state, SENSITIVE, gain=50.0)
    return save_safetensors(state, tmp_path_factory.mktemp("sensitivity") / "outliers.safetensors", {})


@pytest.fixture(scope="module")
def result(comfyui, source):
    with open_model(source) as model:
        return sensitivity(comfyui, model, steps=2, prompts=2)


def test_the_layer_with_activation_outliers_is_ranked_first(result):
    first = result.layers[0]
    assert first.layer == SENSITIVE and first.risk > RISKY
    # its weights quantize as well as any other layer's: it is the activations that do not survive 4 bits
    assert first.w4a16 < 2 * sorted(layer.w4a16 for layer in result.layers)[len(result.layers) // 2]
    assert first.fp8 < first.w4a16  # FP8 (8-bit activations with a calibrated scale) keeps it


def test_the_report_lists_every_quantizable_layer_and_no_sensitive_one(result):
    names = {layer.layer for layer in result.layers}
    assert len(names) == 20  # q k v o of both attentions and the two FFN linears, in 2 blocks
    assert not any(n.startswith(("head", "time_", "text_", "patch_")) for n in names)
    doc = result.to_json()
    assert doc["kind"] == "nvdiag-sensitivity" and doc["architecture"] == VARIANT
    assert doc["layers"][0]["layer"] == SENSITIVE and doc["layers"][0]["risk"] > RISKY


def test_block_by_block_measures_the_same(comfyui, source, result):
    with open_model(source) as model:
        by_block = sensitivity(comfyui, model, steps=2, prompts=2, blocks_at_once=1)
    assert by_block.pieces == 2
    mine = {layer.layer: layer for layer in by_block.layers}
    for layer in result.layers:
        assert mine[layer.layer].w4a4_dynamic == pytest.approx(layer.w4a4_dynamic, rel=1e-4)
        assert mine[layer.layer].act_amax == pytest.approx(layer.act_amax, rel=1e-5)


def test_sensitivity_command_writes_the_report(comfyui, source, tmp_path, capsys):
    report = tmp_path / "sensitivity.json"
    code = main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--steps", "1", "--prompts", "1",
                 "-o", str(report)])
    out = capsys.readouterr().out
    assert code == 0 and "1 layer(s) at risk under W4A4" in out and SENSITIVE in out
    assert json.loads(report.read_text())["layers"][0]["layer"] == SENSITIVE
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "-o", str(report)]) == 2  # no --force


def test_calibrated_input_scales_reach_comfyui_through_convert(comfyui, source, tmp_path, capsys):
    scales = tmp_path / "input_scales.json"
    assert main(["calibrate", str(source), "-o", str(scales), "--comfyui", str(comfyui.root), "--steps", "2"]) == 0
    values = json.loads(scales.read_text())
    assert len(values) == 20 and all(v > 0 for v in values.values())
    out = tmp_path / "calibrated.safetensors"
    assert main(["convert", str(source), str(out), "--preset", VARIANT, "--input-scales", str(scales)]) == 0
    from inspect_tools.comfyui.loading import load

    loaded = load(comfyui, out)
    try:
        module = dict(loaded.patcher.model.diffusion_model.named_modules())[SENSITIVE]
        assert float(module.input_scale) == pytest.approx(values[SENSITIVE], rel=1e-6)  # ComfyUI holds it
    finally:
        loaded.release(comfyui)


def test_a_calibrated_static_scale_is_no_worse_on_blackwell_than_a_weight_derived_one(comfyui, source, tmp_path):
    """What verify --compute w4a4 says of the calibrated file: within the baseline (dynamic) error, where a
    weight-derived input_scale (a known bad practice) is far above it."""
    scales = tmp_path / "input_scales.json"
    assert main(["calibrate", str(source), "-o", str(scales), "--comfyui", str(comfyui.root)]) == 0
    out = tmp_path / "calibrated.safetensors"
    assert main(["convert", str(source), str(out), "--preset", VARIANT, "--input-scales", str(scales)]) == 0
    from inspect_tools.comfyui.verify import FAR, verify

    with open_model(out) as mine, open_model(source) as ref:
        result = verify(comfyui, mine, ref, compute=("w4a16", "w4a4"), steps=2)
    assert result.paths[1].ratio < FAR


def test_a_calibrated_scale_is_written_in_fp8s_convention_for_an_fp8_layer(comfyui, source, result, tmp_path):
    """calibrate writes NVFP4's amax/2688; ComfyUI quantizes an FP8 layer's input against E4M3's 448, so convert
    must store amax/448 there: six times the value, or the FP8 layer would clip everything above a sixth of amax."""
    from importlib import resources

    scales = tmp_path / "input_scales.json"
    # the same noise levels and contexts as `result`, whose capture is the independent record of the amax
    assert main(["calibrate", str(source), "-o", str(scales), "--comfyui", str(comfyui.root), "--steps", "2",
                 "--prompts", "2"]) == 0
    builtin = (resources.files("reference_specs.presets") / f"{VARIANT}.toml").read_text()
    preset = tmp_path / "fp8_o.toml"
    preset.write_text("name = 'fp8-o'\ndefault = 'keep'\n\n[[rules]]\nregex = '^blocks\\.\\d+\\.self_attn\\.o$'\n"
                      "format = 'fp8'\n\n" + builtin[builtin.index("[[rules]]"):])
    out = tmp_path / "fp8.safetensors"
    assert main(["convert", str(source), str(out), "--preset", str(preset), "--input-scales", str(scales)]) == 0
    given = json.loads(scales.read_text())
    seen = {layer.layer: layer.act_amax for layer in result.layers}  # what the layer's inputs reached in ComfyUI
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        fp8 = float(f.get_tensor(f"{SENSITIVE}.input_scale"))
        nvfp4 = float(f.get_tensor("blocks.0.self_attn.q.input_scale"))
        assert f.get_slice(f"{SENSITIVE}.weight").get_dtype() == "F8_E4M3"
    assert fp8 == pytest.approx(6 * given[SENSITIVE], rel=1e-6)
    assert nvfp4 == pytest.approx(given["blocks.0.self_attn.q"], rel=1e-6)
    # first principles: E4M3's largest value times the stored scale is the activation amax, with the margin on top
    assert 448 * fp8 == pytest.approx(1.25 * seen[SENSITIVE], rel=1e-3)
    assert 448 * 6 * nvfp4 == pytest.approx(1.25 * seen["blocks.0.self_attn.q"], rel=1e-3)


# ------------------------------------------------------------------------------------ the user's own activations

def _activations(path: Path, outlier_channels: list[int]) -> Path:
    """Rows for three layers of WAN TI2V (width 256): Gaussian tokens, for SENSITIVE with `outlier_channels` 50x
    larger (the channels whose weight columns the source divides by 50, as in a trained model); per-call maxima
    given for one layer."""
    import torch

    g = torch.Generator().manual_seed(3)
    rows = {name: torch.randn(192, 256, generator=g) for name in ("blocks.0.self_attn.q", SENSITIVE,
                                                                   "blocks.0.cross_attn.v")}
    rows[SENSITIVE][:, outlier_channels] *= 50.0
    calls = rows["blocks.0.self_attn.q"].split(64)
    tensors = {**rows, "blocks.0.self_attn.q.amax": torch.tensor([float(c.abs().max()) for c in calls])}
    return save_safetensors(tensors, path, {})


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory) -> Path:
    return save_safetensors(float_state_dict(VARIANT), tmp_path_factory.mktemp("plain") / "plain.safetensors", {})


@pytest.mark.parametrize("outliers", [True, False])
def test_captured_activations_replace_the_synthetic_run(comfyui, source, tmp_path, capsys, outliers):
    """The file decides: the same source is at risk with outlier rows and not with calm ones, whatever the
    synthetic run would say (it ranks SENSITIVE first)."""
    channels = add_activation_outliers(float_state_dict(VARIANT), SENSITIVE, gain=50.0) if outliers else []
    acts = _activations(tmp_path / "captured.safetensors", channels)
    report = tmp_path / "report.json"
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--activations", str(acts),
                 "-o", str(report)]) == 0
    assert "activations captured by the user (captured.safetensors)" in capsys.readouterr().out
    doc = json.loads(report.read_text())
    assert doc["inputs"]["file"] == "captured.safetensors"
    layers = {entry["layer"]: entry for entry in doc["layers"]}
    assert set(layers) == {"blocks.0.self_attn.q", SENSITIVE, "blocks.0.cross_attn.v"}
    assert (layers[SENSITIVE]["risk"] > RISKY) is outliers
    # Gaussian tokens quantize about as well as the weights: the errors add in quadrature, risk near sqrt(2)
    for name in ("blocks.0.self_attn.q", "blocks.0.cross_attn.v"):
        assert 1.1 < layers[name]["risk"] < RISKY, name
    assert len(layers["blocks.0.self_attn.q"]["act_amax_calls"]) == 3


@pytest.mark.parametrize("tensors, says", [
    ({"blocks.0.norm3": (8, 256)}, "blocks.0.norm3: not a quantizable Linear layer"),
    ({"head.head": (8, 256)}, "head.head: not a quantizable Linear layer"),
    ({"blocks.0.ffn.2": (8, 256)}, "blocks.0.ffn.2: rows must be [N, 512]"),
    ({"blocks.0.ffn.0": (8, 256), "blocks.0.ffn.0.amax": (3,)}, "must split evenly"),
    ({}, "no activation tensors"),
])
def test_activation_files_that_do_not_fit_the_source_exit_2(comfyui, plain_source, tmp_path, capsys, tensors, says):
    import torch

    acts = save_safetensors({k: torch.ones(shape) for k, shape in tensors.items()} or {"x.amax": torch.ones(1)},
                            tmp_path / "bad.safetensors", {})
    assert main(["sensitivity", str(plain_source), "--comfyui", str(comfyui.root), "--activations", str(acts)]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_html_report_maps_each_block_and_layer_kind(comfyui, source, result, tmp_path, capsys):
    from inspect_tools.sensitivity_report import grid

    rows, columns, values = grid(result.layers, "w4a4_dynamic")
    assert rows == ["0", "1"] and "self_attn.o" in columns and len(columns) == 10
    risky = {(rows[i], columns[j]) for i, line in enumerate(grid(result.layers, "risk")[2])
             for j, v in enumerate(line) if v > RISKY}
    assert ("0", "self_attn.o") in risky
    page = tmp_path / "sensitivity.html"
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--steps", "1", "--prompts", "1",
                 "--report", str(page)]) == 0
    text = page.read_text()
    assert "data:image/png;base64," in text and SENSITIVE in text and "at risk under W4A4" in text
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--report", str(page)]) == 2  # no --force
    assert "exists" in capsys.readouterr().err


# ------------------------------------------------------------------------- activations that are not finite

def _strict_json(doc: dict) -> dict:
    """The document as a strict JSON parser reads it: inf and NaN are not JSON (allow_nan=False raises on them)."""
    import json as json_

    return json_.loads(json_.dumps(doc, allow_nan=False))


@pytest.fixture(scope="module")
def overflowed(comfyui, source):
    """The synthetic run with SENSITIVE's inputs overflowing on the second of its calls (what ComfyUI's fp16 compute
    on a GPU gives when a hidden state passes 65504): one inf in that call, everything else as before."""
    import pytest as pytest_

    from inspect_tools.comfyui import sensitivity as module

    original = module._capture_hook

    def hook_with_overflow(captures, name, per_call):
        inner = original(captures, name, per_call)
        calls = []

        def hook(mod, args):
            calls.append(1)
            if name == SENSITIVE and len(calls) == 2:
                x = args[0].clone()
                x.reshape(-1, x.shape[-1])[0, 0] = float("inf")
                args = (x, *args[1:])
            return inner(mod, args)

        return hook

    with pytest_.MonkeyPatch.context() as patch:
        patch.setattr(module, "_capture_hook", hook_with_overflow)
        with open_model(source) as model:
            return sensitivity(comfyui, model, steps=2, prompts=1)


def test_a_layer_whose_activations_overflow_is_not_measurable_and_not_ranked(overflowed):
    lost = {layer.layer: layer for layer in overflowed.layers if not layer.measured}
    assert set(lost) == {SENSITIVE}
    why = lost[SENSITIVE].not_measurable
    assert why == "non-finite activations in 1 of 2 calls of the reference forward (ComfyUI computing in float32)"
    # never the riskiest: the last line, after every layer that was measured, and not counted at risk
    assert overflowed.layers[-1].layer == SENSITIVE and overflowed.layers[0].measured
    assert not lost[SENSITIVE].risk > RISKY
    assert all(layer.measured for layer in overflowed.layers[:-1])


def test_the_report_holds_no_inf_or_nan(overflowed):
    doc = _strict_json(overflowed.to_json())
    assert doc["not_measurable"] == 1
    entry = next(e for e in doc["layers"] if e["layer"] == SENSITIVE)
    assert entry["not_measurable"].startswith("non-finite activations")
    assert not {"w4a16", "w4a4_dynamic", "w4a4_static", "fp8", "risk"} & set(entry)  # not measured: not given
    assert entry["act_amax_calls"][1] is None and entry["act_amax_calls"][0] > 0  # the finite call is kept
    # every measured layer is as before: a finite risk
    assert all(isinstance(e["risk"], float) for e in doc["layers"] if e["layer"] != SENSITIVE)


def test_calibrate_leaves_a_layer_without_a_finite_maximum_dynamic(overflowed):
    from inspect_tools.comfyui.sensitivity import input_scales, uncalibrated

    scales = input_scales(overflowed)
    assert SENSITIVE not in scales and len(scales) == 19 and uncalibrated(overflowed) == [SENSITIVE]


def test_the_preset_keeps_a_layer_that_could_not_be_measured_out_of_w4a4(overflowed, tmp_path, capsys):
    from converter.preset import LayerView, load_preset

    report = tmp_path / "report.json"
    report.write_text(json.dumps(overflowed.to_json(), allow_nan=False))
    policy = tmp_path / "policy.toml"
    # --budget 0: no measured layer may leave W4A4, the one nothing is known of does all the same
    assert main(["preset", "from-sensitivity", str(report), "--budget", "0", "-o", str(policy)]) == 0
    text = policy.read_text()
    assert "1 layer(s) the report could not measure are kept out of W4A4" in text and "not measurable" in text
    preset = load_preset(str(policy))
    decided = preset.decide(LayerView(SENSITIVE, (256, 256)))
    assert decided.format == "nvfp4-w4a16" and "not measurable" in decided.reason


def test_the_text_and_html_say_which_layers_were_not_measured(overflowed, tmp_path, capsys):
    from inspect_tools.cli.sensitivity_cmd import print_text
    from inspect_tools.sensitivity_report import render

    print_text(overflowed)
    out = capsys.readouterr().out
    assert "not measurable" in out and "1 layer(s) not measurable, left out of the ranking" in out
    page = render(overflowed, RISKY)
    assert "not measurable: non-finite activations" in page


def test_non_finite_rows_in_an_activation_file_make_that_layer_not_measurable(comfyui, source, tmp_path, capsys):
    """A capture made in fp16 holds inf where the model overflowed: the layer is reported, the others measured."""
    import torch

    g = torch.Generator().manual_seed(5)
    rows = {name: torch.randn(64, 256, generator=g) for name in ("blocks.0.self_attn.q", SENSITIVE)}
    rows[SENSITIVE][7, 3] = float("inf")
    acts = save_safetensors(rows, tmp_path / "captured.safetensors", {})
    report = tmp_path / "report.json"
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--activations", str(acts),
                 "-o", str(report)]) == 0
    doc = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    first, second = doc["layers"]
    assert first["layer"] == "blocks.0.self_attn.q" and 1.1 < first["risk"] < RISKY
    assert second == {"layer": SENSITIVE, "params": 256 * 256, "act_amax": None, "act_amax_calls": [None],
                      "not_measurable": "non-finite activations in 1 of 1 calls in the activation file"}


def test_a_layer_whose_inputs_are_all_zero_has_no_relative_error(comfyui):
    """0/0 is no error and no risk: the old code reported W4A16 0 and risk inf for it, ranked first."""
    import torch

    from inspect_tools.comfyui.sensitivity import Capture, measure

    zero = Capture(amax=[0.0], rows=[torch.zeros(16, 64)])
    layer = measure(comfyui, "blocks.0.ffn.0", torch.randn(32, 64), zero)
    assert not layer.measured and "output is zero" in layer.not_measurable
    _strict_json({"layer": layer.to_json()})


# ------------------------------------------------------------------------------ capture once, measure again

def test_saved_activations_read_back_give_the_same_report(comfyui, source, tmp_path, capsys):
    """--save-activations writes what the run captured in the format --activations reads: measuring the file gives
    every number the run gave, without running the model."""
    acts, first, again = tmp_path / "acts.safetensors", tmp_path / "run.json", tmp_path / "again.json"
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--steps", "2", "--prompts", "1",
                 "--save-activations", str(acts), "-o", str(first)]) == 0
    assert f"wrote {acts}" in capsys.readouterr().out
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--activations", str(acts),
                 "-o", str(again)]) == 0
    ran, read = json.loads(first.read_text()), json.loads(again.read_text())
    assert len(ran["layers"]) == 20 and read["layers"] == ran["layers"]
    assert read["inputs"]["file"] == "acts.safetensors"
    from safetensors import safe_open

    with safe_open(str(acts), "pt") as f:
        # 2 calls (2 noise levels x 1 context); self-attention sees 2 frames x 8 x 8 patches = 128 tokens a call, all
        # kept (256 rows per layer / 2 calls); cross-attention's k and v see the 32 text tokens
        assert f.get_slice(SENSITIVE).get_shape() == [256, 256]
        assert f.get_slice("blocks.0.cross_attn.k").get_shape() == [64, 256]
        assert f.get_slice("blocks.0.ffn.2").get_shape() == [256, 512]
        assert f.get_slice(f"{SENSITIVE}.amax").get_shape() == [2]
        assert f.metadata()["steps"] == "2"


def test_the_saved_file_is_bounded_before_anything_runs(comfyui, source, tmp_path, capsys, monkeypatch):
    from inspect_tools.comfyui import sensitivity as module

    with open_model(source) as model:
        estimate = module.saved_activation_bytes(model, steps=2, prompts=1)
    # 256 rows per layer (128 a call, 2 calls) of float32 in 2 blocks of 9 layers 256 wide and one (ffn.2) 512 wide,
    # and 2 maxima per layer
    assert estimate == 4 * (256 * 2 * (9 * 256 + 512) + 20 * 2)
    monkeypatch.setattr(module, "MAX_SAVED_ACTIVATION_BYTES", estimate - 1)
    acts = tmp_path / "acts.safetensors"
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), "--steps", "2", "--prompts", "1",
                 "--save-activations", str(acts)]) == 2
    err = capsys.readouterr().err
    assert "--save-activations would write about" in err and "lower --steps or --prompts" in err
    assert not acts.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, says", [
    (["--activations", "{acts}", "--save-activations", "{out}"], "with --activations nothing is run"),
    (["--save-activations", "{out}", "-o", "{out}"], "the same path is given for two outputs"),
    (["--save-activations", "{acts}"], "exists; pass --force"),
])
def test_save_activations_refusals_exit_2(comfyui, source, tmp_path, capsys, argv, says):
    acts = save_safetensors({SENSITIVE: __import__("torch").ones(4, 256)}, tmp_path / "given.safetensors", {})
    out = tmp_path / "out.safetensors"
    argv = [a.format(acts=acts, out=out) for a in argv]
    assert main(["sensitivity", str(source), "--comfyui", str(comfyui.root), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_saved_overflow_reads_back_as_not_measurable(comfyui, source, tmp_path):
    """What could not be measured in the run cannot be in the file either: an inf maximum is kept as it is."""
    import torch

    from inspect_tools.comfyui.sensitivity import Capture, save_activations, sensitivity_from_activations

    g = torch.Generator().manual_seed(9)
    captures = {SENSITIVE: Capture(amax=[4.0, float("inf")], rows=[torch.randn(8, 256, generator=g)] * 2),
                "blocks.0.self_attn.q": Capture(amax=[5.0], rows=[torch.randn(8, 256, generator=g)])}
    path = save_activations(tmp_path / "acts.safetensors", captures, str(source), 2, 1, 0)
    with open_model(source) as model:
        result = sensitivity_from_activations(comfyui, model, str(path))
    assert [(layer.layer, layer.measured) for layer in result.layers] == [("blocks.0.self_attn.q", True),
                                                                           (SENSITIVE, False)]
    assert result.layers[1].not_measurable == "non-finite activations in 1 of 2 calls in the activation file"
    assert result.layers[0].act_amax_calls == [5.0]  # the whole call's amax, above the kept rows' own
