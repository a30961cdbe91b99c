"""`nvdiag preset from-sensitivity REPORT.json`: a sensitivity report becomes a preset.

The reports here are written by hand, in the format `nvdiag sensitivity -o` writes; the expected decision of every
layer follows from the numbers and the documented defaults (risk 2, max error 0.12), worked out by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from converter import from_sensitivity as fs
from converter.pipeline import convert
from converter.preset import LayerView, load_preset, loads_preset
from inspect_tools.cli import main
from inspect_tools.synthetic import default_selection, write_float
from inspect_tools.synthetic.bad_inputs import BAD_INPUTS

WAN = "wan2.2-ti2v-5b"


def entry(layer: str, w4a16: float, w4a4: float, fp8: float = 0.03, params: int = 65536) -> dict:
    """One report line; risk as nvdiag sensitivity computes it (w4a4_dynamic / w4a16)."""
    return {"layer": layer, "params": params, "w4a16": w4a16, "w4a4_dynamic": w4a4, "w4a4_static": w4a4 * 0.9,
            "fp8": fp8, "risk": w4a4 / w4a16 if w4a16 else float("inf")}


def report(layers: list[dict], architecture: str = WAN) -> dict:
    return {"version": 1, "kind": "nvdiag-sensitivity", "architecture": architecture,
            "source": "/models/wan2.2_ti2v_5B_fp16.safetensors", "layers": layers}


def write_report(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


# Both blocks of the synthetic WAN TI2V model, every quantizable layer. Expected, by the defaults:
#   risk <= 2 and W4A16 error <= 0.12                -> nvfp4 (W4A4 on Blackwell)
#   risk > 2, W4A16 error <= 0.12                    -> nvfp4-w4a16
#   W4A16 error > 0.12, FP8 error <= 0.12            -> fp8-w8a16
#   W4A16 error > 0.12 and FP8 error > 0.12          -> bf16
MEASURED = [
    *(entry(f"blocks.{b}.{kind}", 0.070, 0.100) for b in (0, 1)
      for kind in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                   "cross_attn.q", "cross_attn.v", "cross_attn.o")),
    entry("blocks.0.cross_attn.k", 0.200, 0.260, fp8=0.030),  # weights too coarse for 4 bits, FP8 fine
    entry("blocks.1.cross_attn.k", 0.250, 0.300, fp8=0.150),  # not even FP8
    entry("blocks.0.ffn.0", 0.075, 0.300),  # risk 4
    entry("blocks.1.ffn.0", 0.075, 0.110),  # risk 1.47
    entry("blocks.0.ffn.2", 0.080, 0.240),  # risk 3
    entry("blocks.1.ffn.2", 0.080, 0.480),  # risk 6
]
EXPECTED = {
    **{f"blocks.{b}.{kind}": "nvfp4" for b in (0, 1)
       for kind in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.v",
                    "cross_attn.o")},
    "blocks.0.cross_attn.k": "fp8-w8a16",
    "blocks.1.cross_attn.k": "bf16",
    "blocks.0.ffn.0": "nvfp4-w4a16",
    "blocks.1.ffn.0": "nvfp4",
    "blocks.0.ffn.2": "nvfp4-w4a16",
    "blocks.1.ffn.2": "nvfp4-w4a16",
}
MARKERS = {
    "nvfp4": {"format": "nvfp4"},
    "nvfp4-w4a16": {"format": "nvfp4", "full_precision_matrix_mult": True},
    "fp8-w8a16": {"format": "float8_e4m3fn", "full_precision_matrix_mult": True},
}


def test_a_report_becomes_the_preset_the_numbers_call_for(tmp_path: Path, capsys) -> None:
    path = write_report(tmp_path / "report.json", report(MEASURED))
    out = tmp_path / "measured.toml"
    assert main(["preset", "from-sensitivity", str(path), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    preset = load_preset(str(out))
    assert preset.name == "wan2.2-ti2v-5b-sensitivity" and preset.architectures == (WAN,)
    assert {name: preset.decide(LayerView(name, (256, 256))).format for name in EXPECTED} == EXPECTED
    # what the report does not measure (head, norms, modulation) gets what WAN's built-in preset gives it
    builtin = load_preset(WAN)
    for name, shape in [("head.head", (48, 256)), ("blocks.0.norm3", (256,)), ("blocks.0.modulation", (1, 6, 256))]:
        assert preset.decide(LayerView(name, shape)).format == builtin.decide(LayerView(name, shape)).format, name
    assert preset.decide(LayerView("head.head", (48, 256))).format == "bf16"
    # one rule per layer kind and decision, naming exactly the measured blocks, then the built-in preset's rules
    measured = preset.rules[: len(preset.rules) - len(builtin.rules)]
    assert [(r.regex, r.match, r.format) for r in preset.rules[len(measured):]] == [
        (r.regex, r.match, r.format) for r in builtin.rules]
    rules = {(r.regex, r.format) for r in measured}
    assert (r"^blocks\.(?:0|1)\.ffn\.2$", "nvfp4-w4a16") in rules
    assert (r"^blocks\.0\.cross_attn\.k$", "fp8-w8a16") in rules and (r"^blocks\.1\.cross_attn\.k$", "bf16") in rules
    assert len(measured) == 12
    w4a16 = next(r for r in preset.rules if r.format == "nvfp4-w4a16" and "ffn\\.2" in r.regex)
    assert "risk 3-6 > 2" in w4a16.reason
    assert "/models" not in out.read_text()  # the source's folder stays on the machine that measured it


def test_with_base_none_what_the_report_does_not_list_keeps_the_source_precision(tmp_path: Path) -> None:
    path = write_report(tmp_path / "report.json", report(MEASURED))
    out = tmp_path / "measured.toml"
    assert main(["preset", "from-sensitivity", str(path), "--base", "none", "-o", str(out)]) == 0
    preset = load_preset(str(out))
    assert preset.default == "keep" and len(preset.rules) == 12
    assert preset.decide(LayerView("head.head", (48, 256))).format == "keep"
    assert "--base none" in out.read_text()


def test_an_unknown_base_is_a_usage_error(tmp_path: Path, capsys) -> None:
    path = write_report(tmp_path / "report.json", report(MEASURED))
    assert main(["preset", "from-sensitivity", str(path), "--base", "no-such-preset"]) == 2
    assert "no built-in preset 'no-such-preset'" in capsys.readouterr().err


def test_the_measured_preset_converts_into_the_markers_it_promises(tmp_path: Path) -> None:
    src = write_float(tmp_path / "wan.safetensors", WAN)
    preset = tmp_path / "measured.toml"
    assert main(["preset", "from-sensitivity", str(write_report(tmp_path / "r.json", report(MEASURED))),
                 "-o", str(preset)]) == 0
    out = tmp_path / "out.safetensors"
    result = convert(src, out, str(preset))
    assert result.written, [f.message for f in result.gate.findings]
    with safe_open(str(out), "pt") as f:
        metadata = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        for layer in default_selection(WAN):
            decision = EXPECTED[layer]
            if decision == "bf16":
                assert f"{layer}.comfy_quant" not in f.keys() and layer not in metadata
                assert f.get_slice(f"{layer}.weight").get_dtype() == "BF16"
                continue
            marker = json.loads(f.get_tensor(f"{layer}.comfy_quant").numpy().tobytes())
            assert marker == metadata[layer] == MARKERS[decision], layer


# ------------------------------------------------------------------------------------------------ the budget

# Four layers, 1000 parameters. Wanted: cross_attn.k FP8 (fails even W4A16: first in line), ffn.2 of block 0
# W4A16 (risk 6), ffn.2 of block 1 W4A16 (risk 3), self_attn.q W4A16 (risk 2.5); the budget admits them in that
# order while their parameters fit.
BUDGETED = [
    entry("blocks.0.cross_attn.k", 0.300, 0.360, fp8=0.020, params=100),
    entry("blocks.0.ffn.2", 0.080, 0.480, params=400),
    entry("blocks.1.ffn.2", 0.080, 0.240, params=400),
    entry("blocks.0.self_attn.q", 0.080, 0.200, params=100),
]


@pytest.mark.parametrize("budget, expected", [
    (1.0, {"blocks.0.cross_attn.k": "fp8-w8a16", "blocks.0.ffn.2": "nvfp4-w4a16", "blocks.1.ffn.2": "nvfp4-w4a16",
           "blocks.0.self_attn.q": "nvfp4-w4a16"}),
    # 500 parameters: k (100) and block 0's ffn.2 (400) fit; nothing else does
    (0.5, {"blocks.0.cross_attn.k": "fp8-w8a16", "blocks.0.ffn.2": "nvfp4-w4a16", "blocks.1.ffn.2": "nvfp4",
           "blocks.0.self_attn.q": "nvfp4"}),
    # 300 parameters: k fits, neither ffn.2 does, the small self_attn.q behind them still does
    (0.3, {"blocks.0.cross_attn.k": "fp8-w8a16", "blocks.0.ffn.2": "nvfp4", "blocks.1.ffn.2": "nvfp4",
           "blocks.0.self_attn.q": "nvfp4-w4a16"}),
    (0.0, {"blocks.0.cross_attn.k": "nvfp4", "blocks.0.ffn.2": "nvfp4", "blocks.1.ffn.2": "nvfp4",
           "blocks.0.self_attn.q": "nvfp4"}),
])
def test_budget_admits_the_most_risky_layers_first(tmp_path: Path, capsys, budget: float, expected: dict) -> None:
    path = write_report(tmp_path / "report.json", report(BUDGETED))
    out = tmp_path / "p.toml"
    assert main(["preset", "from-sensitivity", str(path), "--budget", str(budget), "-o", str(out)]) == 0
    held = sum(1 for name, d in expected.items() if d == "nvfp4")
    message = capsys.readouterr().out
    assert (f"{held} held at W4A4 by --budget" in message) == (held > 0)
    preset = load_preset(str(out))
    assert {name: preset.decide(LayerView(name, (256, 256))).format for name in expected} == expected


def test_without_output_the_preset_is_printed(tmp_path: Path, capsys) -> None:
    path = write_report(tmp_path / "report.json", report(BUDGETED))
    assert main(["preset", "from-sensitivity", str(path), "--risk", "4", "--name", "mine"]) == 0
    preset = loads_preset(capsys.readouterr().out.encode(), "stdout")
    assert preset.name == "mine"
    # with --risk 4 only block 0's ffn.2 (risk 6) leaves W4A4 for W4A16
    assert preset.decide(LayerView("blocks.1.ffn.2", (256, 256))).format == "nvfp4"
    assert preset.decide(LayerView("blocks.0.ffn.2", (256, 256))).format == "nvfp4-w4a16"


@pytest.mark.parametrize("spelled", [float("inf"), None])
def test_an_exact_layer_is_not_at_risk(tmp_path: Path, spelled: float | None) -> None:
    """risk is infinite when W4A16 is exact: nvdiag sensitivity writes null there (JSON has no Infinity), older
    reports wrote Infinity; 0/0 means W4A4 is exact too."""
    exact = entry("blocks.0.ffn.0", 0.0, 0.0)
    activations_only = {**entry("blocks.1.ffn.0", 0.0, 0.05), "risk": spelled}
    path = write_report(tmp_path / "report.json", report([exact, activations_only]))
    decided = {c.layer.layer: c.decision for c in fs.preset_from_sensitivity(path).choices}
    assert decided == {"blocks.0.ffn.0": "nvfp4", "blocks.1.ffn.0": "nvfp4-w4a16"}


def unmeasured(layer: str, params: int = 65536) -> dict:
    """A report line as nvdiag sensitivity writes it for a layer whose activations were not finite."""
    return {"layer": layer, "params": params, "act_amax": None, "act_amax_calls": [None],
            "not_measurable": "non-finite activations in 1 of 1 calls of the reference forward (ComfyUI computing in "
                              "float16: an fp16 overflow?)"}


@pytest.mark.parametrize("budget", [1.0, 0.0])
def test_a_layer_the_report_could_not_measure_never_gets_w4a4(tmp_path: Path, capsys, budget: float) -> None:
    """Nothing says it is safe, so not W4A4 (whatever the budget), and nothing says it is the riskiest: the budget
    goes to it first and does not hold it back. With --budget 1 it and the risky ffn.0 of block 0 (risk 4) leave
    W4A4, with --budget 0 only it does."""
    layers = [unmeasured("blocks.0.self_attn.o"), entry("blocks.0.ffn.0", 0.075, 0.300),
              entry("blocks.1.ffn.0", 0.075, 0.110)]
    path = write_report(tmp_path / "report.json", report(layers))
    out = tmp_path / "p.toml"
    assert main(["preset", "from-sensitivity", str(path), "--budget", str(budget), "-o", str(out)]) == 0
    preset = load_preset(str(out))
    view = LayerView("blocks.0.self_attn.o", (256, 256))
    assert preset.decide(view).format == "nvfp4-w4a16"
    assert "not measurable (non-finite activations" in preset.decide(view).reason
    assert preset.decide(LayerView("blocks.0.ffn.0", (256, 256))).format == ("nvfp4-w4a16" if budget else "nvfp4")
    assert preset.decide(LayerView("blocks.1.ffn.0", (256, 256))).format == "nvfp4"  # risk 1.47
    assert "1 layer(s) the report could not measure are kept out of W4A4" in out.read_text()


# ------------------------------------------------------------------------------------------------ refusals

def _run_failing(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvdiag: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


GOOD = report([entry("blocks.0.ffn.2", 0.08, 0.1)])


def _layer(**change: object) -> dict:
    return report([{**entry("blocks.0.ffn.2", 0.08, 0.1), **change}])


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000, "not JSON"),
    (b"[]", "not an object"),
    (json.dumps({**GOOD, "kind": "nvdiag-lint"}).encode(), "kind is 'nvdiag-lint'"),
    (json.dumps({**GOOD, "version": 2}).encode(), "version 2 is not supported"),
    (json.dumps({**GOOD, "architecture": "../../etc"}).encode(), "architecture must be"),
    (json.dumps({**GOOD, "layers": {}}).encode(), "layers must be a list"),
    (json.dumps({**GOOD, "layers": []}).encode(), "layers is empty"),
    (json.dumps(report(["blocks.0.ffn.2"])).encode(), "layers[0] is not an object"),
    (json.dumps(_layer(layer="blocks.0.ffn.2; rm -rf /")).encode(), "layers[0].layer must be a layer name"),
    (json.dumps(_layer(params=True)).encode(), "params must be a positive integer"),
    (json.dumps(_layer(params=0)).encode(), "params must be a positive integer"),
    (json.dumps(_layer(w4a16=-0.1)).encode(), "w4a16 must be a finite number >= 0"),
    (json.dumps(_layer(w4a16="0.1")).encode(), "w4a16 must be a number"),
    (json.dumps(_layer(fp8=float("nan"))).encode(), "fp8 must be a finite number >= 0"),
    (json.dumps(_layer(w4a4_dynamic=float("inf"))).encode(), "w4a4_dynamic must be a finite number >= 0"),
    (json.dumps(_layer(risk=None)).encode(), "risk must be a number"),
    (json.dumps(_layer(risk=0.5)).encode(), "risk 0.5 is not w4a4_dynamic / w4a16 = 1.25"),
    (json.dumps(_layer(params=10**400)).encode(), "params must be a positive integer"),
    (json.dumps(_layer(fp8=10**400)).encode(), "too large for a float"),
    (json.dumps(report([{"layer": "blocks.0.ffn.2", "params": 10}])).encode(), "missing w4a16"),
    (json.dumps(report([entry("blocks.0.ffn.2", 0.08, 0.1)] * 2)).encode(), "listed twice"),
    (json.dumps(_layer(not_measurable="activations overflow")).encode(), "not measurable, yet it gives w4a16"),
    (json.dumps(report([{**unmeasured("blocks.0.ffn.2"), "not_measurable": ""}])).encode(),
     "not_measurable must be the reason"),
    (json.dumps(report([{**unmeasured("blocks.0.ffn.2"), "not_measurable": 3}])).encode(),
     "not_measurable must be the reason"),
])
def test_malformed_reports_exit_2_with_one_line(tmp_path: Path, capsys, content: bytes, says: str) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(content)
    out = tmp_path / "p.toml"
    line = _run_failing(["preset", "from-sensitivity", str(path), "-o", str(out)], capsys)
    assert str(path) in line and says in line, line
    assert not out.exists() and not list(tmp_path.glob("*.nvdiag-tmp"))


@pytest.mark.parametrize("name", ["named_pipe", "empty_file", "pickle_payload", "missing_path", "broken_symlink",
                                  "directory_without_checkpoint", "index_parent_path"])
def test_hostile_files_in_place_of_a_report_exit_2_unread(tmp_path: Path, capsys, name: str) -> None:
    """The checkpoint suite's bad inputs (a FIFO would block a naive read forever)."""
    bad = BAD_INPUTS[name](tmp_path / name)
    line = _run_failing(["preset", "from-sensitivity", str(bad), "-o", str(tmp_path / "p.toml")], capsys)
    assert str(tmp_path / name) in line
    assert not (tmp_path / "p.toml").exists()


def test_an_oversized_report_is_not_read(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(fs, "MAX_REPORT_BYTES", 1000)
    path = write_report(tmp_path / "report.json", report([entry(f"blocks.{i}.ffn.2", 0.08, 0.1) for i in range(20)]))
    assert "larger than 1000 bytes" in _run_failing(["preset", "from-sensitivity", str(path)], capsys)


def test_missing_report_and_bad_options_exit_2(tmp_path: Path, capsys) -> None:
    path = write_report(tmp_path / "report.json", GOOD)
    assert "report not found" in _run_failing(["preset", "from-sensitivity", str(tmp_path / "no.json")], capsys)
    assert "not a report file" in _run_failing(["preset", "from-sensitivity", str(tmp_path)], capsys)
    assert "--budget" in _run_failing(["preset", "from-sensitivity", str(path), "--budget", "1.5"], capsys)
    assert "--budget" in _run_failing(["preset", "from-sensitivity", str(path), "--budget", "nan"], capsys)
    assert "--risk" in _run_failing(["preset", "from-sensitivity", str(path), "--risk", "0.5"], capsys)
    assert "--max-error" in _run_failing(["preset", "from-sensitivity", str(path), "--max-error", "0"], capsys)


def test_never_overwrites_without_force_and_never_the_report(tmp_path: Path, capsys) -> None:
    path = write_report(tmp_path / "report.json", GOOD)
    before = path.read_bytes()
    out = tmp_path / "p.toml"
    out.write_text("# mine\n")
    assert "exists" in _run_failing(["preset", "from-sensitivity", str(path), "-o", str(out)], capsys)
    assert out.read_text() == "# mine\n"
    assert "overwrite the input" in _run_failing(["preset", "from-sensitivity", str(path), "-o", str(path),
                                                  "--force"], capsys)
    assert path.read_bytes() == before
    assert main(["preset", "from-sensitivity", str(path), "-o", str(out), "--force"]) == 0
    assert load_preset(str(out)).rules
