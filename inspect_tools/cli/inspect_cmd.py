"""`nvdiag inspect`: what a checkpoint is, layer by layer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from inspect_tools.cli import app
from inspect_tools.cli.hints import check_glob, no_match
from inspect_tools.cli.output import (
    FORMAT_HELP,
    TABLE_ROWS,
    OutputFormat,
    console,
    print_records,
    render,
    table_width,
)
from inspect_tools.cli.terminal_text import shown
from inspect_tools.inspect import inspect_document, metadata_summary
from inspect_tools.layers import open_model

CHECKPOINT_HELP = "A .safetensors file, a sharded *.safetensors.index.json (or its folder), or a .gguf"
# Roles shown in the "aux" column: everything but the weight itself.
MAIN_ROLES = ("weight", "value", "weight_packed", "qweight")  # qweight: Nunchaku and AutoAWQ codes


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


def summary_line(doc: dict) -> str:
    summary = doc["summary"]
    return (f"{summary['tensors']} tensors in {summary['layers']} layers, {human_bytes(summary['bytes'])}; formats: "
            + ", ".join(f"{fmt} {n}" for fmt, n in summary["formats"].items()))


def _print_text(doc: dict) -> None:
    out = console()
    arch = doc["architecture"]
    summary = doc["summary"]
    variant = arch["variant"] if arch["family"] != "unknown" else "unknown architecture"
    extras = [arch["naming"] + " names"]
    if arch.get("prefix"):
        extras.append(f"prefix {shown(repr(arch['prefix']))}")
    if arch.get("scaled_down"):
        extras.append("scaled down")
    if arch.get("config"):  # what the tensors could not say (Qwen Image Edit 2511 vs 2512)
        extras.append(f"variant from {shown(arch['config'])}")
    out.print(f"[bold]{shown(doc['path'])}[/]  ({doc['container']})")
    out.print(f"architecture: [bold]{variant}[/] ({', '.join(extras)})")
    out.print(summary_line(doc))
    if summary["compute"]:
        # on Blackwell only: older GPUs run every NVFP4 layer W4A16 whatever the marker says
        out.print("compute on Blackwell: " + ", ".join(f"{path} {n}" for path, n in summary["compute"].items()))
    if summary["quantization_metadata_layers"]:
        out.print(f"_quantization_metadata names {summary['quantization_metadata_layers']} layers")
    if summary["scaled_fp8_marker"]:
        out.print("legacy scaled_fp8 marker present")
    if doc["metadata"]:
        meta = Table(title="header metadata", show_header=True)
        meta.add_column("key", no_wrap=True)
        meta.add_column("value", overflow="fold")
        for key, value in metadata_summary(doc["metadata"]).items():
            meta.add_row(shown(key), shown(value))
        out.print(meta)
    # Only files ComfyUI loads with quantized layers get the compute column (for float or GGUF files: all "-").
    show_compute = any(layer["compute"] for layer in doc["layers"])
    header = ["layer", "format", *(["compute"] if show_compute else []), "dtype", "shape", "aux"]
    rows = []
    for layer in doc["layers"][:TABLE_ROWS]:
        tensors = layer["tensors"]
        main = next((r for r in MAIN_ROLES if r in tensors), next(iter(tensors)))
        aux = [f"{r} {t['dtype']}" for r, t in tensors.items() if r != main]
        shape = layer.get("logical_shape") or tensors[main]["shape"]  # logical [out, in] for quantized layers
        rows.append([shown(layer["name"]), layer["format"], *([layer["compute"] or "-"] if show_compute else []),
                     tensors[main]["dtype"], "x".join(str(d) for d in shape) or "scalar", ", ".join(aux) or "-"])
    # the aux list may fold between its entries; a layer name may not be split
    if table_width(header, [row[:-1] + [row[-1][:16]] for row in rows], padding=3) > out.width:
        print_records(out, header, rows, "layers")
    else:
        table = Table(title="layers", show_header=True)
        for column in header:
            table.add_column(column, overflow="fold" if column == "aux" else "ellipsis", no_wrap=column != "aux")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    if len(doc["layers"]) > TABLE_ROWS:
        out.print(f"[dim]layers: showing {TABLE_ROWS} of {len(doc['layers'])} (--layers GLOB to narrow, --format json "
                  "for all)[/]")


@app.command("inspect")
def inspect_command(
    path: Annotated[str, typer.Argument(help=CHECKPOINT_HELP)],
    fmt: Annotated[OutputFormat, typer.Option("--format", help=FORMAT_HELP)] = OutputFormat.text,
    layers: Annotated[str | None, typer.Option("--layers", help="Only layers matching this glob")] = None,
) -> None:
    """Say what a checkpoint is, layer by layer: architecture, formats, dtypes, shapes, aux tensors, metadata.

    The compute column says how ComfyUI multiplies each quantized layer on Blackwell: W4A4 (activations quantized
    to 4 bits too) or W4A16 (the marker's full_precision_matrix_mult is on); FP8 layers W8A8 / W8A16.

    Examples:

      nvdiag inspect wan2.2_ti2v_5B_nvfp4.safetensors

      nvdiag inspect ./transformer/ --layers 'blocks.0.*'

      nvdiag inspect model.gguf --format json > layers.json
    """
    check_glob(layers)
    with open_model(path) as model:
        doc = inspect_document(model, layers)
        if layers is not None and not doc["layers"]:
            raise no_match(layers, path, model.layers)
    arch = doc["architecture"]
    render(fmt, [], lambda: doc, lambda: _print_text(doc), file=doc["path"], title="nvdiag inspect",
           summary=lambda: f"{arch['variant'] if arch['family'] != 'unknown' else 'unknown architecture'}: "
           + summary_line(doc))
