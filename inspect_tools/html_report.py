"""`nvdiag roundtrip --report`: one self-contained HTML page (PNG images embedded as base64).

Per-layer error bars against the expected error, and for the worst layers a heatmap of |decoded - reference| over
the top-left corner of the weight, where a layout error shows its 128x4-tile / 16-column block pattern.
matplotlib is an optional extra (`pip install 'nvdiag[report]'`); without it the command says so and exits 2.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from inspect_tools.errors import OutputError, UsageError
from inspect_tools.roundtrip import Heatmap, LayerResult, RoundtripResult

MATPLOTLIB_HINT = "--report needs matplotlib: pip install 'nvdiag[report]' (or pip install matplotlib)"
MAX_BARS = 60  # a bar chart of 400 layers is unreadable; the worst ones carry the story


def require_matplotlib() -> Any:
    """The pyplot module on the non-interactive Agg backend; UsageError (exit 2) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(MATPLOTLIB_HINT) from None
    return plt


def _png(fig: Any, plt: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def error_bars_png(layers: list[LayerResult], plt: Any) -> str:
    """Horizontal bars: measured relative error per layer (red when far above), expected error as a tick."""
    shown = [r for r in layers if r.metrics is not None][:MAX_BARS]
    fig, ax = plt.subplots(figsize=(9, max(2.0, 0.22 * len(shown) + 1)))
    y = list(range(len(shown)))
    errors = [min(r.metrics.rel_error, 10.0) for r in shown]  # the reciprocal-scale fault measures ~1e8
    colors = ["#c0392b" if r.status == "far-above" else "#2e86c1" for r in shown]
    ax.barh(y, errors, color=colors)
    ax.scatter([r.expected or 0 for r in shown], y, marker="|", s=200, color="black", label="expected")
    ax.set_yticks(y)
    ax.set_yticklabels([r.name for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("relative Frobenius error (capped at 10)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, plt)


def heatmap_png(heat: Heatmap, plt: Any) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    image = ax.imshow(heat.values.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_title(f"|decoded - reference|, top-left {heat.values.shape[0]}x{heat.values.shape[1]}", fontsize=9)
    ax.set_xlabel("input column")
    ax.set_ylabel("output row")
    fig.colorbar(image, ax=ax)
    return _png(fig, plt)


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render(result: RoundtripResult) -> str:
    plt = require_matplotlib()
    esc = html.escape
    rows = []
    for r in result.layers:
        m = r.metrics
        rows.append(
            "<tr class='{}'><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>".format(
                "bad" if r.status == "far-above" else "", esc(r.name), esc(r.format),
                _cell(m.rel_error if m else None), _cell(r.expected), _cell(m.cosine if m else None, 6),
                _cell(m.snr_db if m else None), esc(r.cause or r.status), esc(r.note or ""),
            )
        )
    heatmaps = "".join(
        f"<figure><img alt='heatmap {esc(h.layer)}' src='data:image/png;base64,{heatmap_png(h, plt)}'>"
        f"<figcaption>{esc(h.layer)}: {esc(h.cause or 'within expected error')}</figcaption></figure>"
        for h in result.heatmaps
    )
    bars = error_bars_png(result.layers, plt) if result.checked else ""
    unmatched = result.alignment.only_mine
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nvdiag roundtrip: {esc(result.path.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
tr.bad td {{ background: #fdecea; }} .verdict {{ font-size: 1.2em; font-weight: bold; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
</style></head><body>
<h1>nvdiag roundtrip</h1>
<p><b>{esc(str(result.path))}</b> against <b>{esc(str(result.ref_path))}</b></p>
<p class="verdict">{esc(result.verdict())}</p>
<p>{len(result.checked)} layers checked, {len(unmatched)} layers of PATH without a partner in REF,
{len(result.alignment.only_ref)} layers of REF without a partner in PATH.</p>
<h2>Error against expected</h2>
{f"<img alt='error bars' src='data:image/png;base64,{bars}'>" if bars else "<p>nothing measured</p>"}
<h2>Worst layers: |decoded - reference|</h2>
{heatmaps or "<p>no heatmap</p>"}
<h2>All layers</h2>
<table><tr><th>layer</th><th>format</th><th>rel. error</th><th>expected</th><th>cosine</th><th>SNR dB</th>
<th>status</th><th>note</th></tr>
{"".join(rows)}
</table></body></html>
"""


def write_report(result: RoundtripResult, target: str | Path, inputs: list[Path] | None = None) -> Path:
    """Render and write atomically: a temporary file beside `target`, then a rename. Never overwrites an input."""
    from inspect_tools.writer import check_output_path

    target = Path(target)
    check_output_path(target, inputs or [])  # also refuses a symlink or hard link to an input, and a folder
    text = render(result)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write --report {target}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
