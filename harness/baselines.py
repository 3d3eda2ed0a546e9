"""Stored baselines beside each spec (`<spec>.baseline.json`): read, compare, write atomically."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.errors import MeasureError
from harness.jsonfiles import (
    CorruptFile,
    adopt_legacy_companion,
    companion_path,
    companion_to_read,
    dumps,
    keep_backup,
    locked,
    not_finite,
    read_object,
)
from harness.jsonfiles import write_atomic as write_atomic  # re-exported for report, search
from harness.version import __version__


def baseline_path(spec_file: str | Path) -> Path:
    """specs/x.yaml -> specs/x.baseline.json, specs/x.yml -> specs/x.yml.baseline.json"""
    return companion_path(spec_file, "baseline")


def read_baseline(spec_file: str | Path) -> dict:
    """The stored claims of a spec's baseline, {} when there is none; CorruptFile (naming the
    file and the command that rewrites it) when it is not what the harness wrote."""
    path = companion_to_read(spec_file, "baseline")
    fix = (f"rewrite it with `harness run {spec_file} --update-baselines` (the old file is "
           "kept as .bak)")
    claims = read_object(path, fix).get("claims", {})
    if not isinstance(claims, dict) or not all(isinstance(v, dict) and "measured" in v
                                               for v in claims.values()):
        raise CorruptFile(f"{path}: `claims` is not a mapping of claim id -> {{measured: ...}}"
                          f"; {fix}")
    return claims


def stored_value(spec_file: str, claim_id: str):
    """The stored measurement of one claim; a clear error when it is missing."""
    claims = read_baseline(spec_file)
    if claim_id not in claims:
        where = companion_to_read(spec_file, "baseline")
        what = "has no entry for this claim" if where.exists() else "does not exist"
        raise MeasureError(f"baseline {where} {what}; create it with "
                           f"`harness run {spec_file} --update-baselines` (or "
                           f"`pytest {spec_file} --harness-update-baselines`)")
    return claims[claim_id]["measured"]


def update_baseline(spec_file: str | Path, verdicts, environment: dict) -> Path:
    """Write the measured values of `verdicts` into the spec's baseline; other entries stay.
    Read and write happen under one lock, so concurrent updates keep each other's entries;
    a corrupt old file is kept as `<file>.bak` and replaced."""
    path = baseline_path(spec_file)
    with locked(path):
        adopt_legacy_companion(spec_file, "baseline")
        try:
            claims = read_baseline(spec_file)
        except CorruptFile as exc:
            backup = keep_backup(path)
            print(f"{exc.args[0].split(';')[0]}; kept it as {backup} and wrote a new one",
                  file=sys.stderr)
            claims = {}
        for v in verdicts:
            if v.measured is not None and not not_finite(v.measured):
                claims[v.claim_id] = {"measured": v.measured, "measure": v.measure}
        data = {"harness_version": __version__, "environment": environment,
                "claims": dict(sorted(claims.items()))}
        write_atomic(path, dumps(data, indent=1) + "\n")
    return path


def drift(measured, stored) -> float | None:
    """Largest absolute difference between two numeric measurements (None if not numeric)."""
    a, b = _numbers(measured), _numbers(stored)
    if a is None or b is None or len(a) != len(b):
        return None
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def _numbers(value) -> list[float] | None:
    if isinstance(value, dict) and "values" in value:
        value = value["values"]
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list):
        out: list[float] = []
        for item in value:
            sub = _numbers(item)
            if sub is None:
                return None
            out += sub
        return out
    return None
