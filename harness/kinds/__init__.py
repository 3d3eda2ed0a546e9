"""The claim kinds: one module per kind (or small family), each holding its spec class(es) and
its measurement. `CLAIM_CLASSES` is the one registry: the measure names, the `Claim` union
(spec.py), the SAE and searchable measures and each kind's value kind derive from it.

Adding a kind: its module here, its class(es) in CLAIM_CLASSES, an example in
docs/spec-format.md, tests. Nothing else names it."""

from __future__ import annotations

from typing import get_args

from harness.kinds.attention import AttentionClaim, HeadScoresClaim
from harness.kinds.base import MEASUREMENTS, ClaimBase  # noqa: F401  (the measurements)
from harness.kinds.circuit import CircuitClaim
from harness.kinds.edges import EdgeScoresClaim
from harness.kinds.features import (
    FeatureClaim,
    FeatureDiffClaim,
    FeatureInterventionClaim,
    TopFeaturesClaim,
)
from harness.kinds.fields import FeatureEdit, FeatureReading
from harness.kinds.generate import GenerateClaim
from harness.kinds.logits import LogitDiffClaim, TopKClaim
from harness.kinds.neuron import NeuronClaim
from harness.kinds.patching import AblateClaim, PatchClaim, PatchSweepClaim
from harness.kinds.path_patch import PathPatchClaim
from harness.kinds.readout import DlaClaim, LogitLensClaim
from harness.kinds.sequence import AccuracyClaim, LossClaim

# Every claim kind, once.
CLAIM_CLASSES: tuple[type[ClaimBase], ...] = (
    LogitDiffClaim, TopKClaim, GenerateClaim, LogitLensClaim, DlaClaim, PatchClaim,
    PatchSweepClaim, AblateClaim, LossClaim, AccuracyClaim, AttentionClaim, HeadScoresClaim,
    PathPatchClaim, CircuitClaim, FeatureClaim, TopFeaturesClaim, FeatureDiffClaim,
    FeatureInterventionClaim, NeuronClaim, EdgeScoresClaim,
)


def measure_name(cls: type[ClaimBase]) -> str:
    """The `measure:` a claim class answers to (its one-value Literal)."""
    field = cls.model_fields.get("measure")
    names = get_args(field.annotation) if field is not None else ()
    if len(names) != 1:
        raise TypeError(f"{cls.__name__} needs `measure: Literal[\"name\"]`")
    return names[0]


CLAIM_KINDS: dict[str, type[ClaimBase]] = {measure_name(c): c for c in CLAIM_CLASSES}
MEASURES: tuple[str, ...] = tuple(CLAIM_KINDS)
SAE_MEASURES: tuple[str, ...] = tuple(m for m, c in CLAIM_KINDS.items()
                                      if issubclass(c, FeatureReading | FeatureEdit))
SEARCHABLE_MEASURES: tuple[str, ...] = tuple(m for m, c in CLAIM_KINDS.items() if c.SEARCHABLE)


def kind_class(measure: str) -> type[ClaimBase]:
    """The class of a measure name as a report holds it (ClaimBase's defaults for a name no
    kind declares: a report written by another version)."""
    return CLAIM_KINDS.get(measure, ClaimBase)


