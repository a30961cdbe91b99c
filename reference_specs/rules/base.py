"""What a lint rule is: a stable id, a cause, a default severity, an explanation and a check over Layers.

Rules never touch files: they see a checkpoint through `ModelView` (inspect_tools.layers.CheckpointModel satisfies
it) and read tensor values only through `Layer.load`, which inspect_tools wires to a lazy reader. Header-only rules
(`needs_values = False`) must not call `load` at all, so they stay instant on a 56 GB file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from reference_specs.causes import check_cause
from reference_specs.findings import Finding, Severity
from reference_specs.layer import Layer
from reference_specs.models import ArchitectureProfile, Detection, get_profile
from reference_specs.sampling import spread

# Layer formats that are stored as a Linear weight plus scales (ComfyUI's "mixed" formats), and the comfy_quant
# "format" names ComfyUI's QUANT_ALGOS knows (comfy/quant_ops.py; shared/research/comfyui-load-path.md Q1/Q2).
NVFP4 = "nvfp4"
COMFY_QUANT_FORMATS: frozenset[str] = frozenset(
    {
        "float8_e4m3fn",
        "float8_e5m2",
        "nvfp4",
        "mxfp8",
        "int8_tensorwise",
        "convrot_w4a4",
        "asym_w4a8_int8",
        "awq_w4a16",
    }
)
FP8_DTYPES: frozenset[str] = frozenset({"F8_E4M3", "F8_E5M2"})


class ModelView(Protocol):
    """The part of a checkpoint model rules see (inspect_tools.layers.CheckpointModel)."""

    path: Path
    layers: dict[str, Layer]
    detection: Detection
    file_markers: dict[str, Any]


@dataclass
class RuleContext:
    """Shared, per-file state of one lint run: cached architecture knowledge and loaded scale values.

    Scalars (weight_scale_2, input_scale, FP8 weight_scale) are tiny and cached; block scales are not (a 14B model
    has about 900 MB of them), each rule that needs them loads one layer at a time.
    """

    model: ModelView
    # Bytes of block scales a rule reading every layer's may read (a 14B model has ~900 MB); None = no limit.
    block_scale_budget: int | None = 256 * 2**20
    # Bytes of plain float tensors (kept layers) a rule reading their values may read; None = no limit. A converted
    # 14B model keeps ~1-3 GB at high precision, a float source is all of it: beyond this, an evenly spread sample.
    weight_budget: int | None = 1024 * 2**20
    _profile: ArchitectureProfile | None = field(default=None, init=False)
    _profile_done: bool = field(default=False, init=False)
    _expected: dict[str, tuple[int, ...]] | None = field(default=None, init=False)
    _scalars: dict[tuple[str, str], float | None] = field(default_factory=dict, init=False)

    @property
    def profile(self) -> ArchitectureProfile | None:
        if not self._profile_done:
            self._profile_done = True
            self._profile = get_profile(self.model.detection.variant)
        return self._profile

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Native tensor name -> shape the architecture expects at the detected dims; empty when unknown."""
        if self._expected is None:
            self._expected = {}
            if self.profile is not None and self.model.detection.dims:
                try:
                    shapes = self.profile.tensor_shapes(self.model.detection.dims)
                    self._expected = {k: tuple(v) for k, v in shapes.items()}
                except (KeyError, ValueError, TypeError):
                    self._expected = {}  # dims incomplete for this profile: no architecture shape checks
        return self._expected

    def expected_weight_shape(self, layer: Layer) -> tuple[int, ...] | None:
        name = layer.native_name or layer.name
        return self.expected_shapes().get(name + ".weight")

    def scalar(self, layer: Layer, role: str) -> float | None:
        """The value of a one-element tensor as a Python float, cached; None when absent or not one element."""
        key = (layer.name, role)
        if key not in self._scalars:
            info = layer.tensors.get(role)
            value = None
            if info is not None and numel(info.shape) == 1:
                import torch

                value = float(layer.load(role).reshape(-1)[0].to(torch.float64).item())
            self._scalars[key] = value
        return self._scalars[key]

    def within_budget(self, layers: list[Layer], role: str = "weight_scale") -> list[Layer]:
        """All of `layers` when their `role` tensors fit the block-scale budget, else an evenly spread subset
        that does (first and last layers included), so big files stay fast and small ones are read entirely."""
        sizes = [layer.tensors[role].nbytes if role in layer.tensors else 0 for layer in layers]
        if self.block_scale_budget is None or sum(sizes) <= self.block_scale_budget:
            return layers
        per_layer = max(sizes) or 1
        return spread(layers, max(1, self.block_scale_budget // per_layer))

    def layers_of(self, *fmts: str) -> Iterator[Layer]:
        for layer in self.model.layers.values():
            if layer.format in fmts:
                yield layer


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class Rule:
    """Base of every rule. Subclasses set the class attributes and implement `check`.

    id: stable, never reused (NV1xx structure and markers, NV2xx scale values, NV3xx architecture).
    name: kebab-case, unique. cause: a slug of reference_specs.causes. summary: one line. explanation: what ComfyUI
    does with such a file, what the user sees and how to fix it (`nvdiag lint --explain ID`).
    needs_values: False for header-only rules.
    """

    id: ClassVar[str]
    name: ClassVar[str]
    cause: ClassVar[str]
    severity: ClassVar[Severity] = Severity.ERROR
    summary: ClassVar[str]
    explanation: ClassVar[str]
    needs_values: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "cause" in cls.__dict__:
            check_cause(cls.cause)

    def check(self, model: ModelView, ctx: RuleContext) -> Iterable[Finding]:
        raise NotImplementedError

    def finding(
        self,
        message: str,
        layer: str | None = None,
        evidence: dict[str, Any] | None = None,
        severity: Severity | None = None,
    ) -> Finding:
        return Finding(
            rule=self.id,
            cause=self.cause,
            severity=self.severity if severity is None else severity,
            message=message,
            layer=layer,
            evidence=evidence or {},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "cause": self.cause,
            "severity": str(self.severity),
            "values": self.needs_values,
            "summary": self.summary,
        }
