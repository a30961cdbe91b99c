"""`nvdiag roundtrip` from the command line: exit codes, JSON document, verdict line, HTML report."""

from __future__ import annotations

import json

import pytest
from test_roundtrip_files import SHAPES, write_pair

from inspect_tools import html_report
from inspect_tools.cli import main


def test_clean_file_exits_0_with_a_verdict(tmp_path, capsys):
    mine, ref = write_pair(tmp_path)
    assert main(["roundtrip", str(mine), "--against", str(ref)]) == 0
    assert f"all {len(SHAPES)} checked layers decode within" in capsys.readouterr().out


def test_linear_layout_exits_1_and_json_names_the_cause(tmp_path, capsys):
    mine, ref = write_pair(tmp_path, faults={"blocks.0.ffn.0": "linear"})
    assert main(["roundtrip", str(mine), "--against", str(ref), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1
    assert [(f["rule"], f["cause"], f["layer"]) for f in doc["findings"]] == [
        ("RT101", "scale-layout-linear", "blocks.0.ffn.0")
    ]
    assert doc["layers"][0]["layer"] == "blocks.0.ffn.0" and doc["layers"][0]["status"] == "far-above"
    assert doc["summary"]["errors"] == 1 and doc["summary"]["checked"] == len(SHAPES)
    assert doc["summary"]["verdict"] == (
        f"1 of {len(SHAPES)} layers decode wrongly: block scales are stored in linear layout; "
        "nvdiag fix re-swizzles them losslessly"
    )
    fixed = mine.with_name(mine.name.removesuffix(".safetensors") + "_fixed.safetensors")
    assert doc["summary"]["next"] == f"nvdiag fix {mine} {fixed} --against {ref}"


def test_unreadable_reference_exits_2(tmp_path, capsys):
    mine, _ = write_pair(tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["roundtrip", str(mine), "--against", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "Traceback" not in err


def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mine, ref = write_pair(tmp_path)
    assert main(["roundtrip", str(mine), "--against", str(ref), "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_report_is_one_self_contained_html_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    mine, ref = write_pair(tmp_path, faults={"blocks.0.self_attn.q": "linear"})
    report = tmp_path / "report.html"
    assert main(["roundtrip", str(mine), "--against", str(ref), "--report", str(report)]) == 1
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 2  # error bars + at least one heatmap
    assert "block scales are stored in linear layout" in page
    assert "src='http" not in page and not list(tmp_path.glob(".report.html.*"))


def test_report_puts_the_worst_layer_beside_a_correct_encoding_on_one_scale(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import re

    mine, ref = write_pair(tmp_path, faults={"blocks.0.self_attn.q": "linear", "blocks.0.ffn.0": "nibbles"})
    report = tmp_path / "report.html"
    assert main(["roundtrip", str(mine), "--against", str(ref), "--report", str(report)]) == 1
    page = report.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    good, worst = captions[0].split(" | ")[:2]
    assert good.startswith("correct nvfp4 encoding of REF&#x27;s ") and "(x " in worst
    ratios = [float(x) for x in re.findall(r"\(x ([\d.e+]+)\)", " | ".join(captions))]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 5  # worst first, and it is bad
    assert "16-column x 32-row blocks" in page and "correct file&#x27;s error" not in page.split("<h2>All")[1]


def test_report_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    def missing():
        raise html_report.UsageError(html_report.MATPLOTLIB_HINT)

    monkeypatch.setattr(html_report, "require_matplotlib", missing)
    mine, ref = write_pair(tmp_path)
    assert main(["roundtrip", str(mine), "--against", str(ref), "--report", str(tmp_path / "r.html")]) == 2
    assert "pip install 'nvdiag[report]'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
