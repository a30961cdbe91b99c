"""`nvdiag roundtrip --report`: one self-contained HTML page (PNG images embedded as base64).

Per-layer error bars against the expected error, and for the worst layers a heatmap of |decoded - reference| over
the top-left corner of the weight, where a layout error shows its 16-column x 32-row block pattern. Every heatmap
shares one colour scale, in units of the error a correct file gives (the format's expected error times the layer's
RMS), and the worst layer stands beside a correct encoding of the same reference, so a good file looks calm and a
broken one does not.
matplotlib is an optional extra (`pip install 'nvdiag[report]'`); without it the command says so and exits 2.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspect_tools.errors import OutputError, UsageError
from inspect_tools.roundtrip import LayerResult, RoundtripResult

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


def png_base64(fig: Any, plt: Any) -> str:
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
    return png_base64(fig, plt)


# The linear-layout signature: a block of 16 weights along a row decoded with another block's scale, the wrong block
# chosen by the 128x4 tile's row interleave (rows in groups of 32: reference_specs/formats/nvfp4.py swizzle).
BLOCK_COLS, INTERLEAVE_ROWS = 16, 32
# The shared colour scale, in units of a correct file's error: log from a tenth of it to 30 times it.
SCALE_MIN, SCALE_MAX = 0.1, 30.0
SIGNATURE_NOTE = (f"Grid lines mark {BLOCK_COLS}-column x {INTERLEAVE_ROWS}-row blocks. Bright patches of that size "
                  "are the signature of block scales in linear layout (each block of 16 weights decoded with another "
                  "block's scale); swapped nibbles light up every other column, a stale or reciprocal scale the "
                  "whole layer evenly. A correct file is dark and even at about 1.")


@dataclass
class Panel:
    """One heatmap in units of the error a correct file gives: 1 = the format's expected error for this layer."""

    title: str
    values: Any  # 2-D tensor, |decoded - reference| / (expected x RMS of the reference layer)
    ratio: float | None = None


def _unit(expected: float | None, reference: Any) -> float:
    """What |decoded - reference| is, on average, for a correct file: expected relative error x RMS of REF."""
    import torch

    rms = float(torch.linalg.vector_norm(reference, dtype=torch.float64)) / max(reference.numel(), 1) ** 0.5
    return max((expected or 0.0) * rms, 1e-30)


def panels(result: RoundtripResult, mine: Any, ref: Any) -> list[Panel]:
    """The report's heatmaps, worst layer first, each rescaled to the shared unit, plus the correct encoding of the
    worst layer's reference (the good half of the side by side). Reads each shown layer's reference once more."""
    import torch

    from inspect_tools import roundtrip as rt

    by_name = {r.name: r for r in result.layers}
    pairs = {p.mine.name: p for p in result.alignment.pairs}
    shown = sorted((h for h in result.heatmaps if h.layer in by_name and h.layer in pairs),
                   key=lambda h: -(by_name[h.layer].ratio or 0.0))
    out: list[Panel] = []
    cpu = torch.device("cpu")
    for i, heat in enumerate(shown):
        layer = by_name[heat.layer]
        reference = rt.load_reference(pairs[heat.layer].ref, ref, cpu)
        unit = _unit(layer.expected, reference)
        out.append(Panel(f"{heat.layer}: {heat.cause or 'within expected error'} (x {layer.ratio or 0:.3g})",
                         heat.values / unit, layer.ratio))
        if i == 0:
            good = _correct_encoding(pairs[heat.layer].mine, reference, heat.values.shape)
            if good is not None:
                out.insert(0, Panel(f"correct {layer.format} encoding of REF's {heat.layer}", good / unit, 1.0))
    return out


def _correct_encoding(layer: Any, reference: Any, crop: tuple[int, ...]) -> Any | None:
    """|encode(REF) decoded - REF| over the same crop: what a correct file of this layer's format shows."""
    from inspect_tools import roundtrip as rt

    fmt = rt.decoder(layer)
    if fmt is None:
        return None
    try:
        encoded = fmt.fast_quantize(reference)
        if encoded is None:
            encoded = fmt.quantize(reference)
        decoded = fmt.dequantize(encoded, tuple(reference.shape)).float()
    except (NotImplementedError, RuntimeError, ValueError):
        return None
    return (decoded - reference).abs()[: crop[0], : crop[1]].float()


def heatmap_png(items: list[Panel], plt: Any) -> str:
    """Panels side by side on one shared logarithmic colour scale, the block grid drawn over each."""
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(items), figsize=(6.2 * len(items), 3.8), squeeze=False)
    norm = LogNorm(vmin=SCALE_MIN, vmax=SCALE_MAX, clip=True)
    image = None
    for ax, panel in zip(axes[0], items, strict=True):
        values = panel.values.clamp(min=SCALE_MIN).numpy()
        image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest", norm=norm)
        rows, cols = values.shape
        for x in range(BLOCK_COLS, cols, BLOCK_COLS):
            ax.axvline(x - 0.5, color="white", alpha=0.15, linewidth=0.5)
        for y in range(INTERLEAVE_ROWS, rows, INTERLEAVE_ROWS):
            ax.axhline(y - 0.5, color="white", alpha=0.35, linewidth=0.6)
        ax.set_title(panel.title, fontsize=8)
        ax.set_xlabel(f"input column (top-left {rows}x{cols})")
        ax.set_ylabel("output row")
    bar = fig.colorbar(image, ax=list(axes[0]))
    bar.set_label("|decoded - reference| / correct file's error (1 = as good as a correct file)", fontsize=8)
    return png_base64(fig, plt)


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render(result: RoundtripResult, shown: list[Panel] | None = None) -> str:
    """The page. `shown`: the heatmap panels (see `panels`); without them the heatmaps are left out."""
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
    shown = shown or []
    heatmaps = ""
    if shown:
        # the good/bad side by side first (correct encoding beside the worst layer), then the other worst layers
        pair, rest = shown[:2], shown[2:]
        heatmaps = "".join(
            f"<figure><img alt='heatmaps' src='data:image/png;base64,{heatmap_png(group, plt)}'>"
            f"<figcaption>{esc(' | '.join(p.title for p in group))}</figcaption></figure>"
            for group in (pair, *([rest] if rest else []))
        ) + f"<p>{esc(SIGNATURE_NOTE)}</p>"
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
<h2>Worst layers against a correct file, one colour scale: |decoded - reference|</h2>
{heatmaps or "<p>no heatmap</p>"}
<h2>All layers</h2>
<table><tr><th>layer</th><th>format</th><th>rel. error</th><th>expected</th><th>cosine</th><th>SNR dB</th>
<th>status</th><th>note</th></tr>
{"".join(rows)}
</table></body></html>
"""


def write_report(result: RoundtripResult, target: str | Path, inputs: list[Path] | None = None,
                 shown: list[Panel] | None = None) -> Path:
    """Render and write atomically: a temporary file beside `target`, then a rename. Never overwrites an input."""
    from inspect_tools.writer import check_output_path

    target = Path(target)
    check_output_path(target, inputs or [])  # also refuses a symlink or hard link to an input, and a folder
    text = render(result, shown)
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
