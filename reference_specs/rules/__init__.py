"""Registry of lint rules. Adding a rule = one class in a module of this package + one line in RULES.

Ids are stable and never reused: NV1xx tensors and markers (header only), NV2xx scale values and layout,
NV3xx architecture.
"""

from __future__ import annotations

from reference_specs.rules.architecture import (
    DiffusersKeyNames,
    LegacyFp8Format,
    SensitiveLayerQuantized,
    UnknownArchitecture,
)
from reference_specs.rules.base import ModelView, Rule, RuleContext
from reference_specs.rules.compute_markers import FullPrecisionMmFlag
from reference_specs.rules.dtypes import WrongDtype
from reference_specs.rules.foreign_layouts import ForeignLayout
from reference_specs.rules.markers import (
    BrokenMarkerTensor,
    DoubleBracedMetadata,
    InvalidQuantMarker,
    MissingQuantMarker,
)
from reference_specs.rules.recognized_formats import NewerComfyFormat, ThirdPartyLayout
from reference_specs.rules.scale_layout import ScaleLayoutLinear, ScaleLayoutUnpadded
from reference_specs.rules.scale_values import InputScaleImplausible, NonFiniteScale, Scale2Reciprocal
from reference_specs.rules.scales_present import MissingBlockScale, MissingLegacyScale, MissingTensorScale
from reference_specs.rules.shape_reads import ShapeReadWeightQuantized
from reference_specs.rules.shapes import TransposedWeight, WrongShape
from reference_specs.rules.weight_values import NonFiniteWeight

RULES: list[Rule] = [
    MissingBlockScale(),
    MissingTensorScale(),
    MissingQuantMarker(),
    InvalidQuantMarker(),
    BrokenMarkerTensor(),
    DoubleBracedMetadata(),
    ForeignLayout(),
    NewerComfyFormat(),
    ThirdPartyLayout(),
    WrongDtype(),
    WrongShape(),
    TransposedWeight(),
    FullPrecisionMmFlag(),
    MissingLegacyScale(),
    Scale2Reciprocal(),
    NonFiniteScale(),
    InputScaleImplausible(),
    ScaleLayoutLinear(),
    ScaleLayoutUnpadded(),
    NonFiniteWeight(),
    SensitiveLayerQuantized(),
    ShapeReadWeightQuantized(),
    DiffusersKeyNames(),
    UnknownArchitecture(),
    LegacyFp8Format(),
]


def register(rule: Rule) -> Rule:
    if any(r.id == rule.id or r.name == rule.name for r in RULES):
        raise ValueError(f"rule {rule.id} {rule.name} is already registered")
    RULES.append(rule)
    return rule


def get_rule(key: str) -> Rule:
    """A rule by id (NV101, case-insensitive) or name (missing-block-scale)."""
    wanted = key.strip()
    for rule in RULES:
        if rule.id.lower() == wanted.lower() or rule.name == wanted.lower():
            return rule
    raise KeyError(f"unknown rule {key!r}")


def rules_for(key: str) -> list[Rule]:
    """Rules matching `key`: an id, an id prefix (NV2 = every NV2xx), a rule name, a cause slug, or ALL."""
    wanted = key.strip()
    if wanted.upper() == "ALL":
        return list(RULES)
    low = wanted.lower()
    return [
        r for r in RULES
        if r.id.lower().startswith(low) or r.name == low or r.cause == low
    ]


__all__ = ["RULES", "ModelView", "Rule", "RuleContext", "get_rule", "register", "rules_for"]
