"""A claim's outcome and its measurement as the reports hold it: `Verdict`, the statuses,
`to_jsonable` (the measured value) and `report_extras` (what the JSON report keeps of the
measurement's extras, as the claim's kind declares). No torch: reports import this."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.expect import GRID, PAIR, PATCH, SAMPLES, SCALAR, Measurement
from harness.measure.results import Grid

PASSED, FAILED, ERROR, SKIPPED, XFAILED = "passed", "failed", "error", "skipped", "xfailed"


@dataclass
class Verdict:
    """The outcome of one claim, ready for any report."""

    spec: str
    file: str
    line: int | None
    claim_id: str
    measure: str
    models: tuple[str, ...]
    status: str
    expected: dict
    measured: object = None
    message: str = ""
    margin: float | None = None
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return f"{self.spec}::{self.claim_id}"


def to_jsonable(measurement: Measurement):
    value = measurement.value
    if isinstance(value, Grid):
        out = {"axes": list(value.axes), "labels": [list(lab) for lab in value.labels],
               "values": value.values.tolist()}
        if value.raw is not None:
            out["raw"] = value.raw.tolist()
        if value.method != "exact":
            out["method"] = value.method
        return out
    if measurement.kind in (SCALAR, PATCH):
        return float(value)
    if measurement.kind == SAMPLES:
        return value
    if measurement.per_prompt and len(measurement.per_prompt) > 1:
        return list(measurement.per_prompt)
    return value


def report_extras(measurement: Measurement, kind) -> dict:
    """The extras the JSON report keeps: each prompt's value, the keys the claim's kind lists
    in REPORT_EXTRAS (in that order), any other key that is not one of its PRIVATE_EXTRAS (so
    a kind's new extra is never dropped silently), and a pair's grids per model."""
    out = {}
    if measurement.per_prompt is not None and measurement.kind in (SCALAR, PATCH):
        out["per_prompt"] = list(measurement.per_prompt)
    for key in (*kind.REPORT_EXTRAS, *measurement.extras):
        if key in measurement.extras and key not in kind.PRIVATE_EXTRAS and key not in out:
            out[key] = measurement.extras[key]
    if measurement.kind == PAIR:
        out["models_measured"] = {name: to_jsonable(Measurement(GRID, grid)) for name, grid in
                                  zip(measurement.extras["names"],
                                      (measurement.extras["a"], measurement.extras["b"]))}
    return out
