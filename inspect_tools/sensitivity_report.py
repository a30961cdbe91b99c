"""`nvdiag sensitivity --report`: one self-contained HTML page of a sensitivity result.

The picture is a per-block heatmap: one row per transformer block, one column per kind of Linear layer (q, k, v, o,
FFN, ...), for the W4A16 error and the W4A4 error side by side on one shared logarithmic colour scale, so a layer
that survives 4-bit weights but not 4-bit activations stands out as a cell that changes colour between the two maps,
and a well-behaved model looks alike in both. Cells of layers above the risk threshold are outlined. Below it, the
table of every layer. matplotlib is an optional extra, as for roundtrip's report.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from inspect_tools.html_report import png_base64, require_matplotlib
from reference_specs.models.base import BLOCK_KEY

OUTSIDE = "outside blocks"


def _split(name: str) -> tuple[str, str]:
    """Layer name -> (row, column): "blocks.3.self_attn.o" -> ("3", "self_attn.o"); no block -> (OUTSIDE, name)."""
    match = BLOCK_KEY.match(name)
    if match is None or match.group("rest") is None:
        return OUTSIDE, name
    return match.group("index"), match.group("rest")


def grid(layers: list[Any], metric: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (blocks in order, then OUTSIDE), columns (layer kinds in first-seen order) and values (NaN: no layer)."""
    cells: dict[tuple[str, str], float] = {}
    columns: list[str] = []
    for layer in sorted(layers, key=lambda x: x.layer):
        row, column = _split(layer.layer)
        cells[(row, column)] = float(getattr(layer, metric))
        if column not in columns:
            columns.append(column)
    blocks = sorted({r for r, _ in cells if r != OUTSIDE}, key=int)
    rows = blocks + ([OUTSIDE] if any(r == OUTSIDE for r, _ in cells) else [])
    values = [[cells.get((r, c), math.nan) for c in columns] for r in rows]
    return rows, columns, values


def heatmaps_png(layers: list[Any], risky: float, plt: Any) -> str:
    """W4A16 and W4A4 (dynamic) error per block and layer kind, one shared log colour scale."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    rows, columns, w16 = grid(layers, "w4a16")
    _, _, w4 = grid(layers, "w4a4_dynamic")
    _, _, risk = grid(layers, "risk")
    finite = [v for grid_ in (w16, w4) for line in grid_ for v in line if math.isfinite(v) and v > 0]
    low, high = (min(finite), max(finite)) if finite else (1e-3, 1.0)
    norm = LogNorm(vmin=low, vmax=max(high, low * 1.01))
    width = max(6.0, 0.55 * len(columns) * 2 + 2)
    fig, axes = plt.subplots(1, 2, figsize=(width, max(2.5, 0.3 * len(rows) + 1.8)), sharey=True)
    for ax, values, title in ((axes[0], w16, "W4A16 (every GPU but Blackwell)"),
                              (axes[1], w4, "W4A4, dynamic scale (Blackwell)")):
        image = ax.imshow(values, norm=norm, cmap="magma_r", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r if r == OUTSIDE else f"block {r}" for r in rows], fontsize=7)
        for i, line in enumerate(risk):
            for j, value in enumerate(line):
                if math.isfinite(value) and value > risky:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#00a0ff", linewidth=2))
    fig.colorbar(image, ax=axes, label="relative output error against full precision (log)", shrink=0.8)
    return png_base64(fig, plt)


def render(result: Any, risky: float) -> str:
    """The whole page for a SensitivityResult (inspect_tools.comfyui.sensitivity)."""
    plt = require_matplotlib()
    esc = html.escape
    picture = heatmaps_png(result.layers, risky, plt) if result.layers else ""
    rows = []
    for layer in result.layers:
        if not layer.measured:
            rows.append(f'<tr class="lost"><td>{esc(layer.layer)}</td><td colspan="5">not measurable: '
                        f"{esc(str(layer.not_measurable))}</td></tr>")
            continue
        bad = ' class="bad"' if layer.risk > risky else ""
        rows.append(f"<tr{bad}><td>{esc(layer.layer)}</td><td>{layer.w4a16:.4g}</td><td>{layer.w4a4_dynamic:.4g}"
                    f"</td><td>{layer.w4a4_static:.4g}</td><td>{layer.fp8:.4g}</td><td>{layer.risk:.3g}</td></tr>")
    at_risk = sum(1 for layer in result.layers if layer.risk > risky)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>nvdiag sensitivity: {esc(Path(result.source).name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
tr.bad td {{ background: #fdecea; }} tr.lost td {{ background: #fff6d5; }}
</style></head><body>
<h1>nvdiag sensitivity</h1>
<p><b>{esc(str(result.source))}</b>: {esc(result.architecture)}, {len(result.layers)} quantizable layers,
{esc(result.describe_inputs())}, measured with ComfyUI's quantizer</p>
<p><b>{at_risk} layer(s) at risk under W4A4</b> (risk = W4A4 error / W4A16 error above {risky:g}, outlined in blue):
they need full_precision_matrix_mult, a calibrated input_scale, or FP8/16-bit
(<code>nvdiag preset from-sensitivity REPORT.json</code>).</p>
{f"<p><b>{esc(result.advice())}</b> (blank cells in the maps)</p>" if result.advice() else ""}
<h2>Error per block and layer kind</h2>
<p>Both maps share one colour scale: a cell that darkens from the left map to the right one is a layer whose
activations do not survive 4 bits; when activations quantize as well as weights the W4A4 error is about 1.4x the
W4A16 error everywhere.</p>
{f"<img alt='per-block heatmap of W4A16 and W4A4 error' src='data:image/png;base64,{picture}'>" if picture
 else "<p>no layer measured</p>"}
<h2>All layers, most at risk first</h2>
<table><tr><th>layer</th><th>W4A16</th><th>W4A4 dynamic</th><th>W4A4 static</th><th>FP8</th><th>risk</th></tr>
{"".join(rows)}
</table></body></html>
"""
