"""Stored baselines beside each spec (`<spec>.baseline.json`): read, compare, write atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from harness import __version__
from harness.errors import MeasureError


def baseline_path(spec_file: str | Path) -> Path:
    """specs/x.yaml -> specs/x.baseline.json"""
    path = Path(spec_file)
    return path.with_name(path.stem + ".baseline.json")


def read_baseline(spec_file: str | Path) -> dict:
    """The stored claims of a spec's baseline, {} when there is none."""
    path = baseline_path(spec_file)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("claims", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise MeasureError(f"baseline {path} is not valid JSON ({exc}); regenerate it with "
                           f"`harness run {spec_file} --update-baselines`") from None


def stored_value(spec_file: str, claim_id: str):
    """The stored measurement of one claim; a clear error when it is missing."""
    claims = read_baseline(spec_file)
    if claim_id not in claims:
        where = baseline_path(spec_file)
        what = "has no entry for this claim" if where.exists() else "does not exist"
        raise MeasureError(f"baseline {where} {what}; create it with "
                           f"`harness run {spec_file} --update-baselines` (or "
                           f"`pytest {spec_file} --harness-update-baselines`)")
    return claims[claim_id]["measured"]


def update_baseline(spec_file: str | Path, verdicts, environment: dict) -> Path:
    """Write the measured values of `verdicts` into the spec's baseline; other entries stay."""
    path = baseline_path(spec_file)
    claims = read_baseline(spec_file)
    for v in verdicts:
        if v.measured is not None:
            claims[v.claim_id] = {"measured": v.measured, "measure": v.measure}
    data = {"harness_version": __version__, "environment": environment,
            "claims": dict(sorted(claims.items()))}
    write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the
    target: an interrupted write leaves the old file or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; reports are for sharing
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
