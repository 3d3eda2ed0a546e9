"""Sharding a run across machines (a CI matrix, a cluster's job array) and merging the parts.

`plan` splits the claims of some specs into N deterministic, balanced parts. Claims sharing a
spec, models and prompts form one group and stay together, so each model is loaded, and each
clean run traced, on as few machines as possible. `merge_reports` joins the parts' JSON reports.
"""

from __future__ import annotations

import hashlib
import json
import re

from harness.errors import HarnessError

SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
MAX_SHARDS = 10_000   # parts of one run; far more machines than any CI matrix


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N <= MAX_SHARDS."""
    match = SHARD_RE.match(text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= MAX_SHARDS:
        raise HarnessError(f"--shard expects K/N with 1 <= K <= N <= {MAX_SHARDS:,} (e.g. 2/8 "
                           f"for the second of eight parts), got {text!r}")
    return int(match[1]), int(match[2])


def claim_cost(spec, claim) -> float:
    """A rough relative cost, to balance the parts: generation costs by tokens generated."""
    return claim.cost(len(spec.claim_prompts(claim)))   # the claim's kind estimates it


def _group_key(spec, claim) -> str:
    prompts = json.dumps([p.model_dump(mode="json") for p in spec.claim_prompts(claim)],
                         sort_keys=True, default=str)
    digest = hashlib.sha256(prompts.encode()).hexdigest()[:16]
    return f"{spec.file}|{','.join(sorted(claim.model_names()))}|{digest}"


def plan(specs, n: int) -> list[set[tuple[str, int]]]:
    """N parts of {(spec file, claim index)}: every claim in exactly one. Groups go, costliest
    first, to the least loaded part (ties: the lower part) - the same split on every machine."""
    groups: dict[str, list] = {}
    for spec in specs:
        for index, claim in enumerate(spec.claims):
            entry = groups.setdefault(_group_key(spec, claim), [0.0, set()])
            entry[0] += claim_cost(spec, claim)
            entry[1].add((str(spec.file), index))
    parts: list[set[tuple[str, int]]] = [set() for _ in range(n)]
    loads = [0.0] * n
    for _key, (cost, members) in sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0])):
        part = min(range(n), key=lambda i: (loads[i], i))
        parts[part] |= members
        loads[part] += cost
    return parts


def merge_reports(reports: list[dict]) -> dict:
    """One JSON report from the parts' reports: each spec's claims joined in file order (by
    line), spec errors kept once, the first part's environment. The merged report is at least
    as strict as every part: a part limited to its first N prompts (`--limit`) makes the whole
    limited (the smallest N), and a claim that two parts judged differently is an error, never
    settled by keeping one of them."""
    if not reports:
        raise HarnessError("harness merge needs at least one JSON report")
    by_file: dict[str, dict] = {}
    for report in reports:
        for spec in report.get("specs", []):
            entry = by_file.setdefault(spec["file"], {"spec": spec["spec"], "file": spec["file"],
                                                      "claims": []})
            if spec.get("error"):
                entry["error"] = spec["error"]
            seen = {c["id"]: c for c in entry["claims"]}
            for claim in spec["claims"]:
                first = seen.get(claim["id"])
                if first is None:
                    entry["claims"].append(claim)
                    seen[claim["id"]] = claim
                elif _verdict(first) != _verdict(claim):
                    raise HarnessError(
                        f"{spec['file']}::{claim['id']} is in two reports with different "
                        f"verdicts ({first['status']}, measured {first.get('measured')!r}; "
                        f"{claim['status']}, measured {claim.get('measured')!r}): each claim "
                        "belongs to one shard; merge one report per shard of one run")
    for entry in by_file.values():
        entry["claims"].sort(key=lambda c: c.get("line") or 0)
    merged = {"harness_version": reports[0].get("harness_version"),
              "environment": dict(reports[0].get("environment", {}), shards=len(reports)),
              "specs": list(by_file.values())}
    limits = [r["limit"] for r in reports if r.get("limit") is not None]
    if limits:
        merged["limit"] = min(limits)
    timings = [r["timing"] for r in reports if r.get("timing")]
    if timings:
        merged["timing"] = {"shards": timings}
    return merged


def _verdict(claim: dict) -> tuple:
    """What two copies of one claim's result must agree on to be the same verdict."""
    return claim.get("status"), json.dumps(claim.get("measured"), sort_keys=True)
