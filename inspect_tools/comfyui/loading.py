"""Load a checkpoint the way ComfyUI's "Load Diffusion Model" node does, and say what ComfyUI made of it.

nodes.py UNETLoader calls `comfy.sd.load_diffusion_model(path, model_options={})`; a state dict built by nvdiag (a GGUF
or diffusers reference, which ComfyUI core cannot load) goes through the function that call ends in,
`comfy.sd.load_diffusion_model_state_dict`. Everything ComfyUI logs while loading is kept: its warnings and left-over
keys are part of the diagnosis, and so is an exception (a refusal by ComfyUI is itself a finding).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inspect_tools.comfyui.runtime import ComfyRuntime

MAX_LOG_LINES = 50
MAX_LOG_CHARS = 2000


@dataclass
class LoadReport:
    """What ComfyUI made of one checkpoint."""

    source: str
    loaded: bool = False
    error: str | None = None
    error_type: str | None = None
    model_class: str | None = None  # e.g. WAN22 (model_base class)
    config_class: str | None = None  # e.g. WAN22_T2V (supported_models class)
    config: dict[str, Any] = field(default_factory=dict)
    weight_dtype: str | None = None
    compute_dtype: str | None = None
    quantized: dict[str, int] = field(default_factory=dict)  # format -> Linear layers ComfyUI holds quantized
    full_precision_mm: list[str] = field(default_factory=list)  # layers whose marker asks for W4A16 / W8A16
    quantized_layers: dict[str, str] = field(default_factory=dict)  # layer -> format
    plain_layers: list[str] = field(default_factory=list)  # Linear layers ComfyUI holds as plain weights
    left_over: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pieces: int = 1  # how many loads the model took (verify loads a big model block by block)

    @property
    def plain_linear(self) -> int:
        return len(self.plain_layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "error": self.error,
            "error_type": self.error_type,
            "model_class": self.model_class,
            "config_class": self.config_class,
            "config": {k: _plain(v) for k, v in self.config.items()},
            "weight_dtype": self.weight_dtype,
            "compute_dtype": self.compute_dtype,
            "quantized": dict(self.quantized),
            "full_precision_matrix_mult": list(self.full_precision_mm),
            "plain_linear": self.plain_linear,
            "pieces": self.pieces,
            "left_over_keys": list(self.left_over),
            "missing_keys": list(self.missing),
            "unexpected_keys": list(self.unexpected),
            "warnings": list(self.warnings),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


class _Capture(logging.Handler):
    """ComfyUI reports through the root logger; keep what it says while one model loads."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)


@contextmanager
def captured_logs() -> Iterator[_Capture]:
    root = logging.getLogger()
    handler = _Capture()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    # ComfyUI's INFO chatter would reach the user's terminal through a handler set up elsewhere: keep it here only
    others = [h for h in root.handlers if h is not handler]
    for h in others:
        root.removeHandler(h)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for h in others:
            root.addHandler(h)
        root.setLevel(old_level)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LOG_CHARS else text[: MAX_LOG_CHARS - 1] + "…"


def _key_list(message: str, prefix: str) -> list[str]:
    """'left over keys in diffusion model: dict_keys([...])' -> the keys (ComfyUI logs Python reprs)."""
    body = message[len(prefix):].strip()
    for wrapper in ("dict_keys(", "odict_keys("):
        if body.startswith(wrapper) and body.endswith(")"):
            body = body[len(wrapper): -1]
    body = body.strip("[]{}() ")
    return [k.strip().strip("'\"") for k in body.split(",") if k.strip()]


def _digest_logs(report: LoadReport, records: list[logging.LogRecord]) -> None:
    for record in records:
        message = record.getMessage()
        for prefix, target in (("left over keys in diffusion model:", report.left_over),
                               ("unet missing:", report.missing), ("unet unexpected:", report.unexpected)):
            if message.startswith(prefix):
                target.extend(_key_list(message, prefix))
                break
        else:
            if record.levelno >= logging.WARNING and len(report.warnings) < MAX_LOG_LINES:
                line = _short(message)
                if "torchaudio missing" not in line:  # ComfyUI's import-time note about audio models
                    report.warnings.append(line)


def _describe(report: LoadReport, patcher: Any, runtime: ComfyRuntime) -> None:
    model = patcher.model
    report.model_class = type(model).__name__
    report.config_class = type(model.model_config).__name__
    report.config = {k: v for k, v in model.model_config.unet_config.items() if k != "dtype"}
    report.weight_dtype = str(model.get_dtype()).replace("torch.", "")
    compute = model.manual_cast_dtype or model.get_dtype()
    report.compute_dtype = str(compute).replace("torch.", "")
    quantized_type = runtime.quant_ops.QuantizedTensor
    for name, module in model.diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(module, "in_features"):
            continue
        if isinstance(weight, quantized_type) or isinstance(getattr(weight, "data", None), quantized_type):
            fmt = getattr(module, "quant_format", None) or "unknown"
            report.quantized[fmt] = report.quantized.get(fmt, 0) + 1
            report.quantized_layers[name] = fmt
            if getattr(module, "_full_precision_mm_config", False):
                report.full_precision_mm.append(name)
        else:
            report.plain_layers.append(name)
    report.quantized = dict(sorted(report.quantized.items()))


def merge(parts: list[tuple[Any, LoadReport]], total_blocks: int) -> LoadReport:
    """One report for a model loaded piece by piece (pieces.Piece, its report): layer and key names restored to the
    whole model's, tensors outside the blocks (in every piece) counted once, the depth the whole model has."""
    first = parts[0][1]
    merged = LoadReport(source=first.source, loaded=all(r.loaded for _, r in parts), pieces=len(parts))
    for field_name in ("model_class", "config_class", "weight_dtype", "compute_dtype"):
        setattr(merged, field_name, getattr(first, field_name))
    merged.config = dict(first.config)
    if "num_layers" in merged.config:
        merged.config["num_layers"] = total_blocks
    for piece, report in parts:
        if not report.loaded and merged.error is None:
            merged.error, merged.error_type = report.error, report.error_type
        for name, fmt in report.quantized_layers.items():
            merged.quantized_layers[piece.restore(name)] = fmt
        merged.plain_layers.extend(piece.restore(n) for n in report.plain_layers)
        merged.full_precision_mm.extend(piece.restore(n) for n in report.full_precision_mm)
        for source, target in ((report.left_over, merged.left_over), (report.missing, merged.missing),
                               (report.unexpected, merged.unexpected), (report.warnings, merged.warnings)):
            target.extend(piece.restore(k) for k in source)
    for attr in ("plain_layers", "full_precision_mm", "left_over", "missing", "unexpected", "warnings"):
        setattr(merged, attr, list(dict.fromkeys(getattr(merged, attr))))
    for fmt in merged.quantized_layers.values():
        merged.quantized[fmt] = merged.quantized.get(fmt, 0) + 1
    merged.quantized = dict(sorted(merged.quantized.items()))
    return merged


@dataclass
class LoadedModel:
    report: LoadReport
    patcher: Any = None

    def release(self, runtime: ComfyRuntime) -> None:
        """Drop the model and give its memory back before the next one loads."""
        if self.patcher is not None:
            try:
                runtime.model_management.unload_all_models()
            finally:
                self.patcher = None
                gc.collect()
                runtime.model_management.soft_empty_cache()


def load(runtime: ComfyRuntime, source: Path | dict[str, Any], label: str | None = None,
         metadata: dict[str, str] | None = None) -> LoadedModel:
    """Load a file (as the node does) or an nvdiag-built native state dict; never raises for ComfyUI's refusals."""
    name = label or (str(source) if isinstance(source, Path) else "state dict")
    report = LoadReport(source=name)
    patcher = None
    with captured_logs() as logs:
        try:
            if isinstance(source, Path):
                patcher = runtime.sd.load_diffusion_model(str(source), model_options={})
            else:
                patcher = runtime.sd.load_diffusion_model_state_dict(source, model_options={}, metadata=metadata)
                if patcher is None:
                    raise RuntimeError("ERROR: Could not detect model type")
        except Exception as exc:  # ComfyUI's refusal is the diagnosis: keep its type and its own message
            report.error = _short(str(exc)) or exc.__class__.__name__
            report.error_type = exc.__class__.__name__
    _digest_logs(report, logs.records)
    if patcher is not None:
        report.loaded = True
        _describe(report, patcher, runtime)
    return LoadedModel(report=report, patcher=patcher)
