"""Measure what dequantization really gives, layer by layer, against a reference checkpoint of the same model.

For every quantized layer of PATH paired with a layer of REF (inspect_tools.align): decode both to float32 (PATH
through its format's reference decoder, REF as plain float, GGUF through its reader, or its own format's
decoder), measure relative Frobenius error, max abs error, cosine similarity and SNR, and compare with the
error the format is expected to give.

Expected error (documented decision): the baseline is measured, not assumed: REF's layer is re-encoded with
PATH's format and decoded again (e_fmt). When REF is itself lossy (GGUF Q4_0, FP8, NVFP4...) the decoded REF
differs from the unknown original by its own error e_ref, which is independent of PATH's error, so
expected = sqrt(e_fmt^2 + e_ref^2), with e_ref taken from REF format's `typical_rel_error` (a loose upper
bound; re-encoding REF with its own format measures nothing, its values already sit on that format's grid).
A layer beyond attribution.limit(expected) is a finding whose cause attribution.attribute names.

One layer at a time: its tensors are loaded, decoded, measured and dropped before the next.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from inspect_tools.align import Alignment, LayerPair, align_layers
from inspect_tools.attribution import (
    JOIN,
    Attribution,
    attribute,
    decisive_rereading,
    far_above,
    limit,
    ratio_of_norms,
    relative_error,
)
from inspect_tools.cuda_warm_up import CudaWarmUp
from inspect_tools.errors import InputError, UsageError
from inspect_tools.layers import CheckpointModel, open_model
from inspect_tools.read_ahead import read_ahead
from reference_specs import formats
from reference_specs.findings import Finding, Severity
from reference_specs.formats.base import Format
from reference_specs.layer import Layer
from reference_specs.rules.weight_values import non_finite_counts
from reference_specs.sampling import spread

RULE_DECODES_WRONGLY = "RT101"
RULE_TRANSPOSED_SHAPE = "RT102"
RULE_SHAPE_MISMATCH = "RT103"
RULE_NOT_COMPARABLE = "RT104"
NON_FINITE = "non-finite"
RULE_UNDECODABLE = "RT105"
# e_ref when REF's format is lossy but unknown to the registry (about Q4_0's error on Gaussian weights)
DEFAULT_LOSSY_REF_ERROR = 0.1
# Heatmap crop of |decoded - reference|: the top-left corner at full resolution, where block (16 columns) and
# swizzle-tile (128 rows x 4 blocks) patterns stay visible; a downsampled whole layer would blur them away.
HEATMAP_ROWS = 128
HEATMAP_COLS = 256
# Roles a decoder never needs; not read from disk.
UNUSED_ROLES = ("bias", "comfy_quant")
TILE_ROWS = 128  # NVFP4's swizzled block scales come in 128-row tiles

CAUSE_VERDICT: dict[str, tuple[str, str]] = {
    "scale-layout-linear": ("block scales are stored in linear layout",
                            "nvdiag fix re-swizzles them losslessly"),
    "nibble-order": ("FP4 codes are packed low-nibble-first",
                     "nvdiag fix (given the reference) swaps the nibbles losslessly"),
    "scale2-reciprocal": ("weight_scale_2 holds 2688/amax instead of amax/2688",
                          "nvdiag fix stores the reciprocal losslessly"),
    "transposed-weight": ("weights are stored transposed ([in, out])",
                          "re-quantize from the float source (nvdiag convert)"),
    "stale-scale": ("the scales do not belong to the packed data", "re-quantize these layers from the float source "
                    "(nvdiag convert)"),
    "excess-error": ("the error is far above what the format gives and no re-reading of the bytes explains it: "
                     "the values are wrong, or REF is not the weights the file was made from (a fine-tune, "
                     "another version)", "re-quantize from the float source (nvdiag convert), or compare against "
                     "the file's own source"),
    "reference-mismatch": ("REF disagrees: its rows are this layer's rows rescaled, so REF is not the weights the "
                           "file was made from (nothing wrong is proven about the file)",
                           "compare against the weights the file was made from"),
}


@dataclass(frozen=True)
class Metrics:
    rel_error: float
    max_abs: float
    cosine: float
    snr_db: float

    def to_json(self) -> dict[str, float | None]:
        return {k: _json_float(v) for k, v in self.__dict__.items()}


# Rows measured at a time on the CPU: about this many elements, so each pass over a chunk of the two operands and
# the scratch buffer stays in cache (as fast_encode's CPU chunks). Measured on the 2-core development machine, a
# 7168x1536 layer: 27 ms whole, 8 ms in chunks of 512 rows.
MEASURE_CHUNK_ELEMENTS = 1 << 19


def measure(decoded: torch.Tensor, reference: torch.Tensor) -> Metrics:
    """Error metrics of `decoded` against `reference` (same shape), in one float32 scratch buffer. torch.sum of a
    float32 tensor accumulates in float64 on the CPU (vector_norm does not: 0.1% off on 25M elements), so sums of
    squares are taken with torch.sum; no float64 copies (they once took a third of a CPU roundtrip). On the CPU the
    rows are measured a cache-sized chunk at a time and the chunks' sums added in float64; on a GPU in one piece."""
    # as rows: a weight's own rows, a vector or a scalar one row
    decoded, reference = (t.to(torch.float32).flatten(1) if t.dim() >= 2 else t.to(torch.float32).reshape(1, -1)
                          for t in (decoded, reference))
    rows, cols = reference.shape
    step = max(1, MEASURE_CHUNK_ELEMENTS // max(1, cols)) if reference.device.type == "cpu" else max(1, rows)
    buf = torch.empty_like(reference[:step])
    parts = []
    for start in range(0, rows, step):
        ref, dec = reference[start: start + step], decoded[start: start + step]
        scratch = buf[: ref.shape[0]]
        sums = [torch.mul(ref, ref, out=scratch).sum(), torch.mul(dec, dec, out=scratch).sum(),
                torch.mul(dec, ref, out=scratch).sum()]
        diff = torch.sub(dec, ref, out=scratch).abs_()
        sums.append(diff.max() if diff.numel() else torch.zeros((), device=diff.device))
        sums.append(diff.square_().sum())
        parts.append(torch.stack(sums))
    # one transfer of the results (on a GPU each float() is a wait for the device)
    table = torch.stack(parts).to(torch.float64) if parts else torch.zeros((1, 5), dtype=torch.float64)
    ref_sq, dec_sq, dot, err_sq, max_abs = torch.cat((table[:, [0, 1, 2, 4]].sum(dim=0),
                                                       table[:, 3].max().reshape(1))).tolist()
    ref_norm, dec_norm, err_norm = math.sqrt(ref_sq), math.sqrt(dec_sq), math.sqrt(err_sq)
    cosine = dot / (dec_norm * ref_norm) if dec_norm > 0 and ref_norm > 0 else (1.0 if dec_norm == ref_norm else 0.0)
    snr = math.inf if err_norm == 0 else (20 * math.log10(ref_norm / err_norm) if ref_norm > 0 else -math.inf)
    return Metrics(ratio_of_norms(err_norm, ref_norm), max_abs, cosine, snr)


def _json_float(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


@dataclass
class LayerResult:
    """What roundtrip measured for one pair. status: ok | far-above | non-finite | skipped | unreadable.

    non-finite: NaN or Inf in the decoded file layer or in the reference (non_finite says which side, how many and
    the cause), so no error can be measured: never "ok", whatever an inf/inf comparison would say.
    unreadable: malformed stored tensors, not decoded (`attribution.cause` says wrong-shape / wrong-dtype / a
    missing scale)."""

    name: str
    ref_name: str
    key: str
    format: str
    ref_format: str
    shape: tuple[int, ...] | None
    status: str = "ok"
    metrics: Metrics | None = None
    baseline: float | None = None
    ref_error: float = 0.0
    expected: float | None = None
    attribution: Attribution | None = None
    note: str | None = None
    non_finite: dict[str, Any] | None = None  # {"side": "file" | "reference", "cause", "nan", "inf", "-inf", ...}

    @property
    def error(self) -> float:
        """Sort key: the stored relative error, inf when it could not be decoded or measured."""
        if self.status == NON_FINITE:
            return math.inf
        if self.metrics is None:
            return math.inf if self.status in ("far-above", "unreadable") else -1.0
        return self.metrics.rel_error if math.isfinite(self.metrics.rel_error) else math.inf

    @property
    def ratio(self) -> float | None:
        if self.metrics is None or not self.expected:
            return None
        return self.metrics.rel_error / self.expected

    @property
    def cause(self) -> str | None:
        if self.non_finite is not None:
            return self.non_finite["cause"]
        return self.attribution.cause if self.attribution else None

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "ref_layer": self.ref_name,
            "key": self.key,
            "format": self.format,
            "ref_format": self.ref_format,
            "shape": list(self.shape) if self.shape else None,
            "status": self.status,
            **(self.metrics.to_json() if self.metrics else {"rel_error": None, "max_abs": None, "cosine": None,
                                                            "snr_db": None}),
            "baseline": _json_float(self.baseline),
            "ref_error": _json_float(self.ref_error),
            "expected": _json_float(self.expected),
            "ratio": _json_float(self.ratio, 3),
            "cause": self.cause,
            "hypotheses": self.attribution.evidence()["hypotheses"] if self.attribution else None,
            "note": self.note,
            "non_finite": self.non_finite,
        }


@dataclass
class Heatmap:
    layer: str
    cause: str | None
    values: torch.Tensor  # |decoded - reference|, top-left crop, float32 on CPU


@dataclass
class RoundtripResult:
    path: Path
    ref_path: Path
    alignment: Alignment
    layers: list[LayerResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    quantized_pairs: int = 0  # before --layers / --sample

    @property
    def checked(self) -> list[LayerResult]:
        """Layers whose error was measured."""
        return [r for r in self.layers if r.status not in ("skipped", NON_FINITE, "unreadable")]

    @property
    def unreadable(self) -> list[LayerResult]:
        return [r for r in self.layers if r.status == "unreadable"]

    @property
    def wrong(self) -> list[LayerResult]:
        return [r for r in self.layers if r.status == "far-above" and r.cause != "reference-mismatch"]

    @property
    def disagreeing(self) -> list[LayerResult]:
        """Layers where REF, not the file, is the odd one out (its rows are the file's rows rescaled)."""
        return [r for r in self.layers if r.status == "far-above" and r.cause == "reference-mismatch"]

    @property
    def not_comparable(self) -> list[LayerResult]:
        """Layers with NaN/Inf on one side: no error can be measured, and none of them is fine."""
        return [r for r in self.layers if r.status == NON_FINITE]

    def _not_comparable_verdict(self) -> str:
        sides: dict[str, list[str]] = {}
        for r in self.not_comparable:
            sides.setdefault(r.non_finite["side"] if r.non_finite else "file", []).append(r.name)
        remedy = {"file": "re-convert PATH from a finite source (nvdiag convert)",
                  "reference": "compare against a finite reference"}
        parts = [f"{len(names)} in {'REF' if side == 'reference' else 'PATH'} ({', '.join(names[:3])}"
                 f"{', ...' if len(names) > 3 else ''}): {remedy[side]}" for side, names in sorted(sides.items())]
        return f"{len(self.not_comparable)} layer(s) cannot be compared, NaN/Inf values {'; '.join(parts)}"

    def verdict(self) -> str:
        unreadable = self.unreadable
        if not unreadable:
            return self._measured_verdict()
        causes = ", ".join(sorted({r.cause or "wrong-shape" for r in unreadable}))
        head = (f"{len(unreadable)} layer{'s' if len(unreadable) > 1 else ''} cannot be decoded ({causes}: "
                "re-export them, `nvdiag lint` says what is wrong)")
        return head + ("; " + self._measured_verdict() if self.checked else "")

    def _measured_verdict(self) -> str:
        verdict = self._file_verdict()
        if not self.disagreeing:
            return verdict
        what, remedy = CAUSE_VERDICT["reference-mismatch"]
        return f"{verdict}; {len(self.disagreeing)} layer(s): {what}: {remedy}"

    def _file_verdict(self) -> str:
        checked, wrong = len(self.checked) - len(self.disagreeing), self.wrong
        if self.not_comparable:
            head = self._not_comparable_verdict()
            return head if not wrong else f"{head}; {len(wrong)} of {checked} measured layers decode wrongly"
        if not checked:
            return "nothing was compared: no layer pair could be decoded and measured (see the notes above)"
        if not wrong:
            return f"all {checked} checked layers decode within their format's expected error"
        by_cause: dict[str, int] = {}
        for r in wrong:
            by_cause[r.cause or "excess-error"] = by_cause.get(r.cause or "excess-error", 0) + 1
        ordered = sorted(by_cause.items(), key=lambda kv: -kv[1])
        head = f"{len(wrong)} of {checked} layers decode wrongly: "
        if len(ordered) == 1:
            what, remedy = CAUSE_VERDICT[ordered[0][0]]
            return head + f"{what}; {remedy}"
        return head + "; ".join(
            f"{n} layer{'s' if n > 1 else ''}: {CAUSE_VERDICT[c][0]}, {CAUSE_VERDICT[c][1]}" for c, n in ordered
        )

    def summary(self) -> dict[str, Any]:
        worst = max(self.checked, key=lambda r: r.error, default=None)
        return {
            "checked": len(self.checked),
            "decode_wrongly": len(self.wrong),
            "skipped": sum(r.status == "skipped" for r in self.layers),
            "not_comparable": len(self.not_comparable),
            "unreadable": len(self.unreadable),
            "quantized_pairs": self.quantized_pairs,
            "only_mine": len(self.alignment.only_mine),
            "only_ref": len(self.alignment.only_ref),
            "worst_layer": worst.name if worst else None,
            "worst_rel_error": _json_float(worst.metrics.rel_error) if worst and worst.metrics else None,
            "verdict": self.verdict(),
        }


# --- decoding ------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """'cpu' or 'cuda' (or 'cuda:N'); UsageError when CUDA is asked for but torch has none."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch reports no CUDA device here (use --device cpu)")
        return torch.device(device)
    if device != "cpu":
        raise UsageError(f"--device {device!r}: use cpu or cuda")
    return torch.device("cpu")


def decoder(layer: Layer) -> Format | None:
    """The registered format instance that decodes `layer`, or None for plain floats / unknown formats."""
    if not layer.is_quantized:
        return None
    try:
        fmt = formats.get(layer.format)
    except KeyError:
        return None
    return fmt() if fmt.decodes else None


def named_only(layer: Layer) -> bool:
    """A quantized layer in a format nvdiag names but does not decode (MXFP8, SVDQuant, ...: formats/recognized.py)."""
    try:
        return layer.is_quantized and not formats.get(layer.format).decodes
    except KeyError:
        return False


def load_roles(layer: Layer, device: torch.device) -> dict[str, torch.Tensor]:
    return {role: layer.load(role).to(device) for role in layer.tensors if role not in UNUSED_ROLES}


def load_reference(layer: Layer, model: CheckpointModel, device: torch.device) -> torch.Tensor:
    """REF's weight as float32 in its logical shape: GGUF and plain floats through the reader, other quantized
    formats through their own decoder."""
    fmt = decoder(layer)
    if named_only(layer):
        raise InputError(f"reference layer {layer.name} is {layer.format}, a format nvdiag names but does not decode: "
                         "compare against a file nvdiag decodes (16-bit, FP8, NVFP4, GGUF)", str(model.path))
    if model.kind == "gguf" or fmt is None:
        return model.reader.load_float(layer.tensors["weight"].name).to(device=device, dtype=torch.float32)
    problem = type(fmt).decode_problem(layer)
    if problem is None:
        try:
            shape = type(fmt).logical_shape(layer)
            return fmt.dequantize(load_roles(layer, device), shape).to(torch.float32)
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            problem = "wrong-shape", str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    # a reference that does not decode makes every comparison meaningless: refused as a bad input
    raise InputError(f"reference layer {layer.name} cannot be decoded as {layer.format}: {problem[1]} "
                     f"({problem[0]}; `nvdiag lint` on it says more)", str(model.path))


def fits(bound: tuple[int, ...] | None, shape: tuple[int, ...]) -> bool:
    """A stored logical shape `bound` can hold `shape` with at most 15 padding rows/columns (NVFP4 pads to 16)."""
    if bound is None or len(bound) != len(shape):
        return False
    return all(0 <= b - s < 16 for b, s in zip(bound, shape, strict=True))


def reference_error(layer: Layer) -> float:
    """e_ref: the error REF's own layer carries (0 for F32, a cast's rounding for F16/BF16)."""
    try:
        fmt = formats.get(layer.format)
    except KeyError:
        return DEFAULT_LOSSY_REF_ERROR if layer.is_quantized else 0.0
    if fmt.quantized and not fmt.typical_rel_error:
        return DEFAULT_LOSSY_REF_ERROR
    return fmt.typical_rel_error


def format_baseline(fmt: Format, reference: torch.Tensor, stored: dict[str, torch.Tensor] | None = None,
                    stored_error: float | None = None) -> tuple[float, bool]:
    """(e_fmt, identical): the error of re-encoding REF's layer with PATH's format (typical error if it cannot
    encode), and whether the stored tensors are exactly that re-encoding.
    NVFP4 re-encodes through the chunked fast encoder, far cheaper in memory and time than the reference codec, on
    whichever device holds the reference (so --device cuda encodes on the GPU). The fast encoder is what convert
    writes with, so it is never trusted blindly: its first row tile must be bit-identical to the reference codec's,
    else the whole baseline comes from the reference codec (a broken encoder must not lower its own bar)."""
    try:
        encoded = fmt.fast_quantize(reference)
        if encoded is not None:
            if not _agrees_with_reference_codec(fmt, reference, encoded):
                encoded = fmt.quantize(reference, encoded[fmt.tensor_scale_role])
            elif stored_error is not None and stored is not None and _same_bytes(encoded, stored):
                return stored_error, True  # the file IS the re-encoding (a correct file vs its source): no decode
        else:
            encoded = fmt.quantize(reference)
        return relative_error(fmt.dequantize(encoded, tuple(reference.shape)), reference), False
    except NotImplementedError:
        return type(fmt).typical_rel_error, False


def _same_bytes(encoded: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> bool:
    """Whether the stored NVFP4 tensors are exactly these encoded ones (codes, block scales, per-tensor scale)."""
    try:
        if any(stored[role].shape != encoded[role].shape for role in ("weight", "weight_scale")):
            return False
        device = stored["weight"].device
        pairs = [(stored[role].reshape(-1).view(torch.uint8), encoded[role].to(device).reshape(-1).view(torch.uint8))
                 for role in ("weight", "weight_scale")]
        pairs.append((stored["weight_scale_2"].to(device, torch.float32).reshape(1),
                      encoded["weight_scale_2"].to(device, torch.float32).reshape(1)))
        return all_equal(pairs)
    except (KeyError, RuntimeError):
        return False


def all_equal(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """torch.equal of every pair (same device per pair), with one wait for the device instead of one per pair."""
    if any(a.shape != b.shape or a.dtype != b.dtype for a, b in pairs):
        return False
    flags = [torch.eq(a, b).all() for a, b in pairs if a.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def _agrees_with_reference_codec(fmt: Format, reference: torch.Tensor, encoded: dict[str, torch.Tensor]) -> bool:
    """The fast encoding's first 128-row tile (codes and its swizzled block-scale tile) equals the reference codec's
    encoding of those rows with the same per-tensor scale: NVFP4 is row-local, and a 128-row tile of swizzled scales
    is contiguous, so the tile alone decides."""
    rows = min(TILE_ROWS, reference.shape[0])
    tile = fmt.quantize(reference[:rows], encoded["weight_scale_2"])
    packed, scales = tile["weight"], tile["weight_scale"].view(torch.uint8)
    device = packed.device
    return all_equal([(encoded["weight"][: packed.shape[0]].to(device), packed),
                      (encoded["weight_scale"].view(torch.uint8)[: scales.shape[0]].to(device), scales)])


# --- per layer ----------------------------------------------------------------------------------------------


def check_pair(
    pair: LayerPair, ref_model: CheckpointModel, device: torch.device, heatmap: bool = False
) -> tuple[LayerResult, Heatmap | None]:
    mine, ref = pair.mine, pair.ref
    result = LayerResult(
        name=mine.name, ref_name=ref.name, key=pair.key, format=mine.format, ref_format=ref.format, shape=None
    )
    fmt = decoder(mine)
    if fmt is None:
        why = "nvdiag names this format but does not decode it" if named_only(mine) else "no decoder for this format"
        result.status, result.note = "skipped", f"{mine.format}: {why}"
        return result, None
    if not ref.has("weight"):
        result.status, result.note = "skipped", "reference layer has no weight"
        return result, None
    problem = type(fmt).decode_problem(mine)
    if problem is not None:  # what lint reports as malformed is not decoded (index errors, nonsense numbers)
        result.status, result.note = "unreadable", f"cannot be decoded as {mine.format}: {problem[1]}"
        result.attribution = Attribution(cause=problem[0])
        return result, None
    reference = load_reference(ref, ref_model, device)
    shape = tuple(reference.shape)
    result.shape = shape
    if _non_finite(result, "reference", ref, reference, None):
        return result, None
    stored_shape = type(fmt).logical_shape(mine)
    if len(shape) != 2 or not fits(stored_shape, shape):
        result.status = "far-above" if fits(stored_shape, shape[::-1]) else "skipped"
        result.note = f"stored shape {list(stored_shape or ())} does not hold the reference shape {list(shape)}"
        if result.status == "far-above":
            result.attribution = Attribution(cause="transposed-weight")
        return result, None
    tensors = load_roles(mine, device)
    try:
        decoded: torch.Tensor | None = fmt.dequantize(tensors, shape).to(torch.float32)
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:
        decoded, result.note = None, f"stored bytes do not decode: {exc}"
    if decoded is not None:
        # measured first: with REF finite (checked above), the decode holds NaN/Inf exactly where the largest
        # difference is not finite, so a healthy layer pays no pass of its own for the check
        metrics = measure(decoded, reference)
        if not math.isfinite(metrics.max_abs) and _non_finite(result, "file", mine, decoded, tensors):
            return result, None
        result.metrics = metrics
    error = result.metrics.rel_error if result.metrics else None
    result.baseline, identical = format_baseline(fmt, reference, tensors, error)
    result.ref_error = reference_error(ref)
    result.expected = math.sqrt(result.baseline**2 + result.ref_error**2)
    if not math.isfinite(result.expected):
        result.status, result.note = NON_FINITE, "the format's expected error on this reference is not finite"
        result.non_finite = {"side": "reference", "cause": "excess-error", "expected": None}
        result.metrics = None
        return result, None
    if far_above(error, result.expected):
        result.status = "far-above"
        result.attribution = attribute(fmt, tensors, reference, result.expected, decoded, result.ref_error)
    # A file that is byte for byte the re-encoding of REF (by an encoder checked against the reference codec) is
    # what a correct conversion writes: no re-reading of those bytes can be a fault, so none is tried (they were
    # 40% of a CPU roundtrip of a correct file).
    elif (error is not None and not identical
          and (reading := decisive_rereading(fmt, tensors, reference, error)) is not None):
        result.status, result.attribution = "far-above", reading
        result.note = f"within the limit, but re-read as {' + '.join(reading.causes)} it errs " \
                      f"{reading.errors[JOIN.join(reading.causes)]:.3g}"
    crop = None
    if heatmap and decoded is not None:
        values = (decoded - reference).abs()[:HEATMAP_ROWS, :HEATMAP_COLS].float().cpu()
        crop = Heatmap(layer=mine.name, cause=result.cause, values=values)
    return result, crop


def _non_finite(result: LayerResult, side: str, layer: Layer, values: torch.Tensor,
                stored: dict[str, torch.Tensor] | None) -> bool:
    """Mark `result` non-finite when `values` (REF's weight, or PATH's decode) hold NaN/Inf; True if so.

    The cause says where the non-finite values come from: a plain float weight's own values (non-finite-weight),
    else the scales that multiply integer codes (NVFP4 codes, GGUF blocks and FP8 bytes decode to finite numbers
    unless a scale or an FP8 NaN byte is not: the stored float weight, if any, is checked to tell them apart)."""
    counts = non_finite_counts(values)
    if counts is None:
        return False
    cause = "non-finite-weight" if not layer.is_quantized else "non-finite-scale"
    if stored is not None and "weight" in stored and non_finite_counts(stored["weight"]) is not None:
        cause = "non-finite-weight"
    what = ", ".join(f"{counts[k]} {k}" for k in ("nan", "inf", "-inf") if counts[k])
    result.status = NON_FINITE
    verb = "holds" if side == "reference" and not layer.is_quantized else "decodes to"
    result.note = f"{'REF' if side == 'reference' else 'PATH'}'s {layer.name} {verb} {what} of {counts['total']} values"
    result.non_finite = {"side": side, "cause": cause, "layer": layer.name, **counts}
    return True


def finding_for(result: LayerResult, path: Path, ref_path: Path | None = None) -> Finding | None:
    if result.status == NON_FINITE and result.non_finite is not None:
        side = result.non_finite["side"]
        return Finding(
            rule=RULE_NOT_COMPARABLE, cause=result.non_finite["cause"], severity=Severity.ERROR,
            file=str(ref_path if side == "reference" and ref_path is not None else path), layer=result.name,
            message=f"cannot be compared: {result.note}",
            evidence={"ref_layer": result.ref_name, **result.non_finite},
        )
    if result.status == "far-above" and result.metrics is None and result.cause == "transposed-weight":
        return Finding(
            rule=RULE_TRANSPOSED_SHAPE, cause="transposed-weight", severity=Severity.ERROR, file=str(path),
            layer=result.name, message=result.note or "weight stored [in, out]",
            evidence={"ref_layer": result.ref_name, "ref_shape": list(result.shape or ())},
        )
    if result.status == "far-above":
        assert result.attribution is not None and result.expected is not None
        stored = result.metrics.rel_error if result.metrics else None
        what = " and ".join(CAUSE_VERDICT[c][0] for c in result.attribution.causes)
        shown = f"{stored:.3g}" if stored is not None and math.isfinite(stored) else "undecodable"
        within = f" ({result.note})" if result.note and stored is not None and stored <= limit(result.expected) else ""
        mismatch = result.attribution.cause == "reference-mismatch"
        if mismatch and result.attribution.row_factors is not None:
            low, high = result.attribution.row_factors
            what += f" (per-row factors {low:.3g} to {high:.3g})"
        return Finding(
            rule=RULE_DECODES_WRONGLY, cause=result.attribution.cause,
            severity=Severity.WARNING if mismatch else Severity.ERROR, file=str(path), layer=result.name,
            message=f"relative error {shown} vs expected {result.expected:.3g} (limit {limit(result.expected):.3g})"
            f"{within}: {what}",
            evidence={
                "ref_layer": result.ref_name,
                "stored": _json_float(stored),
                "expected": _json_float(result.expected),
                "baseline": _json_float(result.baseline),
                **result.attribution.evidence(),
            },
        )
    if result.status == "unreadable":
        assert result.attribution is not None
        return Finding(
            rule=RULE_UNDECODABLE, cause=result.attribution.cause, severity=Severity.ERROR, file=str(path),
            layer=result.name, message=result.note or "cannot be decoded", evidence={"ref_layer": result.ref_name},
        )
    if result.status == "skipped" and result.note and "does not hold" in result.note:
        return Finding(
            rule=RULE_SHAPE_MISMATCH, cause="wrong-shape", severity=Severity.WARNING, file=str(path),
            layer=result.name, message=result.note, evidence={"ref_layer": result.ref_name},
        )
    return None


# --- the whole run ------------------------------------------------------------------------------------------


def findings_for(result: LayerResult, path: Path, ref_path: Path | None = None) -> list[Finding]:
    """finding_for, plus one finding per further cause of a layer with several (each cause has its own remedy, and
    `nvdiag fix` plans repairs per finding)."""
    finding = finding_for(result, path, ref_path)
    if finding is None:
        return []
    extra = result.attribution.together_with if result.attribution and finding.rule == RULE_DECODES_WRONGLY else ()
    return [finding] + [replace(finding, cause=cause, evidence=dict(finding.evidence)) for cause in extra]


def select_pairs(pairs: list[LayerPair], layers: str | None = None, sample: int | None = None) -> list[LayerPair]:
    """Quantized pairs matching the glob (on the file name or the matched name), then `sample` of them spread
    evenly over the model (first and last included)."""
    chosen = [p for p in pairs if p.mine.is_quantized and p.mine.has("weight")]
    if layers:
        chosen = [p for p in chosen if any(fnmatch.fnmatchcase(n, layers) for n in (p.mine.name, p.key))]
    if sample is not None:
        if sample < 1:
            raise UsageError("--sample must be at least 1")
        chosen = spread(chosen, sample)
    return chosen


ProgressFn = Callable[[int, int, str], None]


def roundtrip(
    mine: CheckpointModel,
    ref: CheckpointModel,
    *,
    layers: str | None = None,
    sample: int | None = None,
    device: str = "cpu",
    heatmaps: int = 0,
    progress: ProgressFn | None = None,
) -> RoundtripResult:
    """Compare every selected quantized layer of `mine` with its partner in `ref`.

    heatmaps: how many of the worst layers keep a |decoded - reference| crop (for the HTML report).
    progress: called as progress(done, total, layer_name) after each layer.
    """
    dev = resolve_device(device)
    warming = CudaWarmUp(dev, check_kernels) if dev.type == "cuda" else None
    try:
        return _roundtrip(mine, ref, dev, layers, sample, heatmaps, progress)
    finally:
        if warming is not None:
            warming.join()


def check_kernels(device: torch.device) -> None:
    """A layer check's CUDA work once, on a tiny NVFP4 layer (roundtrip's warm-up): the fast encoding, its check
    against the reference codec, the byte comparison, the decode and the measurement."""
    from reference_specs.formats.nvfp4 import NVFP4

    weight = torch.linspace(-6.0, 6.0, 256 * 512, device=device).reshape(256, 512)
    fmt = NVFP4()
    encoded = fmt.fast_quantize(weight)
    _agrees_with_reference_codec(fmt, weight, encoded)
    _same_bytes(encoded, encoded)
    measure(fmt.dequantize(encoded, (256, 512)), weight)


def _roundtrip(mine: CheckpointModel, ref: CheckpointModel, dev: torch.device, layers: str | None,
               sample: int | None, heatmaps: int, progress: ProgressFn | None) -> RoundtripResult:
    require_tensors(mine, "nothing to check")
    require_tensors(ref, "nothing to compare against")
    alignment = align_layers(mine, ref)
    pairs = select_pairs(alignment.pairs, layers, sample)
    if not pairs or all(named_only(p.mine) for p in pairs):  # a file only nvdiag's names cover: one clear line
        raise nothing_to_compare(mine, ref, alignment, layers)
    result = RoundtripResult(
        path=mine.path, ref_path=ref.path, alignment=alignment,
        quantized_pairs=sum(p.mine.is_quantized and p.mine.has("weight") for p in alignment.pairs),
    )
    kept: list[tuple[float, Heatmap]] = []
    for i, pair in enumerate(read_ahead(pairs, mine, ref, dev)):  # I/O only: the next pairs are read meanwhile
        layer_result, crop = _check_one(pair, mine, ref, dev, heatmap=heatmaps > 0)
        result.layers.append(layer_result)
        if crop is not None:
            kept = sorted([*kept, (layer_result.ratio or 0.0, crop)], key=lambda x: -x[0])[:heatmaps]
        result.findings += findings_for(layer_result, mine.path, ref.path)
        if progress is not None:
            progress(i + 1, len(pairs), pair.mine.name)
    result.heatmaps = [h for _, h in kept]
    result.layers.sort(key=lambda r: -r.error)
    return result


def require_tensors(model: CheckpointModel, why: str) -> None:
    """An input without a single tensor (an empty file, an index with an empty weight_map) is unusable: exit 2."""
    if not model.reader.tensors:
        raise InputError(f"holds no tensors: {why}", str(model.path))


def nothing_to_compare(mine: CheckpointModel, ref: CheckpointModel, alignment: Alignment,
                       layers: str | None) -> InputError | UsageError:
    """Why no layer pair was selected, as the error that ends the run (a run that compares nothing must not pass)."""
    quantized = [layer for layer in mine.layers.values() if layer.is_quantized and layer.has("weight")]
    named = sorted({layer.format for layer in mine.layers.values() if named_only(layer)})
    if named and not any(not named_only(layer) for layer in quantized):
        return InputError(f"its quantized layers are {', '.join(named)}, which nvdiag names but does not decode: "
                          "nothing to roundtrip (nvdiag lint says what ComfyUI does with them)", str(mine.path))
    if not quantized:
        theirs = sum(layer.is_quantized and layer.has("weight") for layer in ref.layers.values())
        if theirs:
            return UsageError(f"{mine.path.name} has no quantized layer: nothing to roundtrip, but --against "
                              f"{ref.path.name} has {theirs}: "
                              f"did you swap PATH and --against? (nvdiag roundtrip {ref.path} --against {mine.path})")
        return InputError("has no quantized layer: nothing to roundtrip", str(mine.path))
    paired = [p for p in alignment.pairs if p.mine.is_quantized and p.mine.has("weight")]
    if paired and layers:
        return UsageError(f"--layers {layers!r} matches none of the {len(paired)} quantized layers paired with REF")
    return InputError(f"none of its layers pairs with one of the {len(quantized)} quantized layers of {mine.path}: "
                      "nothing compared (is it the same model?)", str(ref.path))


def _check_one(
    pair: LayerPair, mine: CheckpointModel, ref: CheckpointModel, device: torch.device, heatmap: bool
) -> tuple[LayerResult, Heatmap | None]:
    try:
        return check_pair(pair, ref, device, heatmap)
    except InputError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # truncated data, dtype views that do not fit...
        side, layer = (mine, pair.mine) if not _loads(pair.mine) else (ref, pair.ref)
        raise InputError(f"layer {layer.name} cannot be read: {exc}", str(side.path)) from None


def _loads(layer: Layer) -> bool:
    """Whether every tensor of `layer` can be read (to name the file whose layer failed)."""
    try:
        load_roles(layer, torch.device("cpu"))
    except (OSError, ValueError, RuntimeError, InputError):
        return False
    return True


def run_roundtrip(path: str | Path, against: str | Path, **options: Any) -> RoundtripResult:
    """Open both checkpoints (header only) and run `roundtrip`; closes them afterwards."""
    with open_model(path) as mine, open_model(against) as ref:
        return roundtrip(mine, ref, **options)

