"""Freeze a finding: a report's measured values -> a spec whose expectations are those values.

An exploration becomes a regression test in one call (`result.to_spec(path)`, `harness freeze
REPORT.json -o spec.yaml`). How a claim freezes follows from the shape of its measured value,
through the rule its claim class names (`FREEZE` in spec.py, one of `RULES` below): numbers
become `approx` with a tolerance, grids their argmax and top cells, patches the sign they
flip; every claim says in a comment where its numbers came from. Pure functions of the JSON
report and the source spec's YAML data, apart from `write_frozen`.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.errors import HarnessError

DROPPED = ("xfail", "search", "ci", "per_prompt", "tolerance", "skip")   # about old expectations
# `confidence` is written from the report (`trust`), where it measured one: kept on a grid or
# ranking (the share of bootstrap resamples it must hold in), dropped from a number frozen as
# `approx` (there it would gate a bootstrap interval inside the tolerance, as `ci` would)
CONFIDENCE = "confidence"
# operators that judge the claim against chance, not its value: the frozen expectation keeps
# the spec's own level (pinning the measured p-value would gate nothing the spec asked for)
KEPT_OPERATORS = ("significant",)

Frozen = tuple[dict | None, str]   # (the expectation, or None; the comment above the claim)


@dataclass(frozen=True)
class Rule:
    """How one shape of measured value (as the JSON report holds it) becomes an expectation."""

    name: str
    fits: Callable[[object], bool]             # the JSON value has this rule's shape
    freeze: Callable[[dict, float], Frozen]    # (report entry, tolerance) -> expectation, note
    needs: str | None = None                   # a key the report entry must also hold
    # the claim's fields the frozen spec rewrites (None: drop the field), from the entry
    fields: Callable[[dict], dict] | None = None


RULES: dict[str, Rule] = {}


def rule(name: str, fits: Callable[[object], bool], needs: str | None = None,
         fields: Callable[[dict], dict] | None = None):
    def register(freeze):
        RULES[name] = Rule(name, fits, freeze, needs, fields)
        return freeze
    return register


def rules_of(freeze: str) -> list[Rule]:
    """A claim class's `FREEZE` -> its rules: "grid|scalar" names a rule per shape the class's
    fields can give its value (attention: a grid, or one number with `heads`). Raises KeyError
    for a name that is no rule."""
    return [RULES[name] for name in freeze.split("|")]


def frozen_expectation(claim: dict, tolerance: float) -> Frozen:
    """The expectation that pins a claim's measured value, and a comment saying where it came
    from; None when the claim has nothing to freeze (error, skip, unscored samples, a kind
    that declares it cannot be frozen)."""
    if claim["status"] in ("error", "skipped") or claim.get("measured") is None:
        return None, f"not frozen: the claim was {claim['status']}"
    found, why = rule_for(claim)
    return found.freeze(claim, tolerance) if found else (None, f"not frozen: {why}")


def rule_for(claim: dict) -> tuple[Rule | None, str]:
    """The rule that freezes a report entry: the first of its claim class's `FREEZE` rules
    whose shape the measured value has; else None and why."""
    from harness.spec import CLAIM_KINDS

    measure = claim["measure"]
    kind = CLAIM_KINDS.get(measure)
    if kind is None:
        return None, f"this harness has no measure '{measure}'"
    names = getattr(kind, "FREEZE", None)
    if names is None:
        return None, getattr(kind, "FREEZE_WHY", "") or \
            f"measure '{measure}' declares no freeze rule"
    for found in rules_of(names):
        if found.fits(claim.get("measured")) and (found.needs is None or found.needs in claim):
            return found, ""
    return None, f"the measured value has none of the shapes '{names}' freezes"


# ----------------------------------------------------------------------------- value shapes

def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_grid(value) -> bool:
    return isinstance(value, dict) and {"axes", "labels", "values"} <= set(value)


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_texts(value) -> bool:
    return isinstance(value, str) or _is_strings(value)


def _is_token_rows(value) -> bool:
    return _is_strings(value) or (isinstance(value, list) and all(map(_is_strings, value)))


def _is_samples(value) -> bool:
    return isinstance(value, dict) and "texts" in value


def _is_features(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value)


def _on(claim: dict) -> str:
    n = len(claim.get("prompts") or claim.get("per_prompt") or [None])
    return f"on {n} prompt{'s' * (n != 1)}"


def _what(claim: dict) -> str:
    """The measure and its metric, as the comments name what was measured."""
    metric = (claim.get("params") or {}).get("metric")
    return claim["measure"] + (f" ({metric})" if isinstance(metric, str) else "")


# ----------------------------------------------------------------------------- the rules

@rule("scalar", _is_number)
def _scalar(claim: dict, tolerance: float) -> Frozen:
    """One number (the mean over prompts): `approx` within the tolerance."""
    value = _num(claim["measured"])
    return {"approx": value, "atol": tolerance}, f"measured {_what(claim)} {value} {_on(claim)}"


@rule("patch", _is_number)
def _patch(claim: dict, tolerance: float) -> Frozen:
    """A patch effect: `approx`, and the sign its raw logit diffs show — `flips_sign` when
    the patch flipped `into`'s sign to `from`'s."""
    measured = claim["measured"]
    expect = {"approx": _num(measured), "atol": tolerance}
    src, dst, raw = claim.get("from"), claim.get("into"), claim.get("raw")
    note = f"measured {_num(measured)} ({claim['params'].get('metric', 'normalized')}) " \
           f"{_on(claim)}"
    if all(map(_is_number, (src, dst, raw))):
        note += f"; logit diff from {_num(src)}, into {_num(dst)}, patched {_num(raw)}"
        if src * dst < 0 and raw * src > 0:
            expect = {"flips_sign": True, **expect}
        elif raw != 0:   # 0 has no sign (an accuracy of 0): `approx` pins it
            expect = {"sign": "positive" if raw > 0 else "negative", **expect}
    return expect, note


@rule("grid", _is_grid)
def _grid(claim: dict, tolerance: float) -> Frozen:
    """argmax and the top cells (as many as stand clear of the next one), and the max."""
    grid = claim["measured"]
    cells = ranked_cells(grid)
    values = [v for _, v in cells]
    expect: dict = {}
    if len(values) == 1 or values[0] - values[1] > tolerance / 10:
        expect["argmax"] = cell_name(grid, cells[0][0])
    k = max((k for k in range(2, min(3, len(values) - 1) + 1)
             if values[k - 1] - values[k] > tolerance / 10), default=0)
    if k:
        expect["top"] = {"k": k, "equals": [cell_name(grid, c) for c, _ in cells[:k]]}
    expect["max"] = {"between": [_num(values[0] - tolerance), _num(values[0] + tolerance)]}
    models = claim.get("models", [])
    shape = "x".join(str(len(lab)) for lab in grid["labels"])
    what = f"{' x '.join(grid['axes'])} grid ({shape})"
    if "models_measured" in claim and len(models) == 2:   # a pair: b - a
        what += f" of {models[1]} - {models[0]}"
    top = ", ".join(f"{_shown(cell_name(grid, c))} = {_num(v)}" for c, v in cells[:3])
    return expect, f"measured {what}; largest cells {top}"


@rule("cells", _is_grid)
def _cells(claim: dict, tolerance: float) -> Frozen:
    """A short labelled grid (circuit members): the grid rule, and every cell's value."""
    expect, note = _grid(claim, tolerance)
    expect["approx"] = [_num(v) for v in _flat(claim["measured"]["values"])]
    expect["atol"] = tolerance
    return expect, note


def _found_fields(claim: dict) -> dict:
    """A found circuit becomes the explicit edge list it found, measured on the prompts it
    was measured on (a spec that no longer depends on the discovery method's ranking)."""
    params = claim.get("params") or {}
    fields: dict = {"edges": list(claim["found_edges"])}
    if params.get("eval_prompts"):
        fields.update(prompts=params["eval_prompts"], eval_prompts=None)
    return fields


@rule("found", lambda v: _is_number(v) or _is_grid(v), needs="found_edges",
      fields=_found_fields)
def _found(claim: dict, tolerance: float) -> Frozen:
    """A circuit found by a discovery method: its edges pinned (`fields`), then its value as
    a number (faithfulness) or labelled cells (minimality, completeness)."""
    expect, note = (_scalar if _is_number(claim["measured"]) else _cells)(claim, tolerance)
    how = (claim.get("discovery") or {}).get("method", "a discovery method")
    return expect, (f"{len(claim['found_edges'])} edges found by {how}, pinned as a list; "
                    + note)


@rule("tokens", _is_token_rows)
def _tokens(claim: dict, tolerance: float) -> Frozen:
    """The top tokens: `equals` them (several prompts: `includes` those every prompt has)."""
    measured = claim["measured"]
    rows = measured if measured and isinstance(measured[0], list) else [measured]
    if len(rows) == 1:
        return {"equals": rows[0]}, f"measured top {len(rows[0])} tokens {_on(claim)}"
    common = [t for t in rows[0] if all(t in row for row in rows)]
    if not common:
        return None, f"not frozen: the {len(rows)} prompts share no top token"
    return {"includes": common}, f"tokens in the top {len(rows[0])} of every prompt " \
                                 f"({_on(claim)})"


@rule("text", _is_texts)
def _text(claim: dict, tolerance: float) -> Frozen:
    """Greedy text: `equals` it (several prompts: `contains` their common prefix)."""
    measured, seed = claim["measured"], claim["params"].get("seed", 0)
    texts = measured if isinstance(measured, list) else [measured]
    if len(texts) == 1:
        return {"equals": texts[0]}, f"measured greedy text (seed {seed}) {_on(claim)}"
    prefix = os.path.commonprefix(texts)
    if not prefix:
        return None, f"not frozen: the {len(texts)} generations share no prefix"
    return {"contains": prefix}, f"the prefix all {len(texts)} generations share"


@rule("samples", _is_samples)
def _samples(claim: dict, tolerance: float) -> Frozen:
    """Sampled texts scored by a reward model: their mean score within the tolerance."""
    scores, seed = claim["measured"].get("scores"), claim["params"].get("seed", 0)
    if not scores or not all(map(_is_number, scores)):
        return None, "not frozen: samples without `score_with` have no number to pin"
    mean = sum(scores) / len(scores)
    return ({"mean_score": {"between": [_num(mean - tolerance), _num(mean + tolerance)]}},
            f"measured mean score {_num(mean)} of {len(scores)} samples (seed {seed}) "
            f"{_on(claim)}")


@rule("features", _is_features)
def _features(claim: dict, tolerance: float) -> Frozen:
    """Ranked SAE features: `equals` the ranking when every feature's score stands clear of
    zero and of the next one's (by a tenth of the tolerance); else `includes` the leading
    features that do — near-ties and features barely firing are no finding to pin."""
    ranked = claim["measured"]
    scored = [s for s in claim.get("scores") or [] if isinstance(s, list) and len(s) == 2
              and _is_number(s[1])]
    shown = ", ".join(f"{i} ({_num(s)})" for i, s in scored)
    note = f"measured {_what(claim)} {_on(claim)}, ranked: {shown or ranked}"
    if ranked and len(scored) != len(ranked):   # no scores to judge gaps by: as measured
        return {"equals": ranked}, note
    scores = [abs(s) for _, s in scored]   # feature_diff's are signed changes
    clear = []
    for i, feature in enumerate(ranked):
        after = scores[i + 1] if i + 1 < len(scores) else 0.0
        if scores[i] - max(after, 0.0) <= tolerance / 10:
            break
        clear.append(feature)
    if not clear:
        return None, f"not frozen: no feature stands clear of the next ({note})"
    if clear == ranked:
        return {"equals": ranked}, note
    return {"includes": clear}, f"{note}; pinned those clear of the next by " \
                                f"{_num(tolerance / 10)}"


def ranked_cells(grid: dict) -> list[tuple[tuple[int, ...], float]]:
    """Every cell of a JSON grid as (index, value), largest first (ties in index order)."""
    out: list[tuple[tuple[int, ...], float]] = []

    def walk(values, index):
        if isinstance(values, list):
            for i, v in enumerate(values):
                walk(v, index + (i,))
        else:
            out.append((index, float(values)))
    walk(grid["values"], ())
    return sorted(out, key=lambda cv: -cv[1])


def cell_name(grid: dict, index: tuple[int, ...]):
    """How a spec names a cell: a label for one axis, a head's or neuron's label (`L3H7`,
    `L3N12`: labels.cell_label) for its cell, else {axis: label}; positions by index (counted
    from the end: the final token is -1)."""
    from harness.labels import cell_label

    axes, labels = grid["axes"], grid["labels"]
    if len(axes) == 1:
        return labels[0][index[0]]
    cell = {axis: labels[k][i] for k, (axis, i) in enumerate(zip(axes, index))}
    return cell_label(cell) or {axis: i - len(labels[k]) if axis == "pos" else cell[axis]
                                for k, (axis, i) in enumerate(zip(axes, index))}


def _flat(values) -> list[float]:
    return [x for v in values for x in _flat(v)] if isinstance(values, list) else [values]


def _shown(cell) -> str:
    return ", ".join(f"{k} {v}" for k, v in cell.items()) if isinstance(cell, dict) else str(cell)


def _num(x: float) -> float:
    return float(f"{float(x):.6g}")


# ----------------------------------------------------------------------------- spec text

def frozen_spec_text(spec_data: dict, claims: list[dict], tolerance: float, origin: str,
                     environment: dict | None = None) -> str:
    """The spec `spec_data` (YAML data) with each claim's expectation replaced by its frozen
    value from `claims` (JSON report entries, matched by id), as commented YAML."""
    by_id = {c["id"]: c for c in claims}
    env = environment or {}
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformer_lens", "device")
                         if k in env)
    header = ["# " + _comment(f"Frozen from {origin} on {datetime.date.today().isoformat()}"
                              + (f" ({versions})" if versions else "") + "."),
              f"# Every expectation is a measured value (numbers within ±{tolerance:g}); "
              "the comment above a claim says what was measured.",
              "# Re-freeze after an intended change: harness freeze REPORT.json -o THIS_FILE"]
    data = {k: v.strip() if k == "description" and isinstance(v, str) else v
            for k, v in spec_data.items() if k != "claims"}
    if "spec" in data:
        data["spec"] = f"{data['spec']}-frozen"
    parts = ["\n".join(header), _dump(data).rstrip(), "claims:"]
    for raw in spec_data.get("claims") or []:
        claim = dict(raw)
        found = by_id.get(claim.get("id"))
        if found is None:
            parts.append(_item(claim, "not frozen: the report has no such claim"))
            continue
        if found["measure"] != claim.get("measure"):   # another spec's report, or edited
            parts.append(_item(claim, f"not frozen: the report measured '{found['measure']}', "
                                      f"this claim is '{claim.get('measure')}'"))
            continue
        expect, note = frozen_expectation(found, tolerance)
        if expect is not None:
            claim = _rewritten(claim, found)
            dropped = [k for k in DROPPED if k in claim]
            for key in dropped:
                claim.pop(key)
            kept = _kept_operators(claim.pop("expect", None), expect)
            note += _confidence(claim, found)
            if kept:
                note += f" (kept {', '.join(kept)} from the spec)"
            claim["expect"] = expect          # last, where a person writes it
            if dropped:
                note += f" (dropped {', '.join(dropped)}: they qualified the old expectation)"
        parts.append(_item(claim, note))
    return "\n".join(parts) + "\n"


def _kept_operators(old, frozen: dict) -> list[str]:
    """Copy KEPT_OPERATORS from the spec's expectation into the frozen one (a dict); their
    'name: level' for the note."""
    if not isinstance(old, dict) or not isinstance(frozen, dict):
        return []
    kept = [name for name in KEPT_OPERATORS if name in old and name not in frozen]
    for name in kept:
        frozen[name] = old[name]
    return [f"{name}: {old[name]}" for name in kept]


def _confidence(claim: dict, found: dict) -> str:
    """Set the frozen claim's `confidence` from the report's trust (see CONFIDENCE); what the
    note says about it."""
    claim.pop(CONFIDENCE, None)
    trust = found.get("trust") if isinstance(found.get("trust"), dict) else {}
    level, share = trust.get(CONFIDENCE), trust.get("stability")
    if not _is_number(level):
        return ""
    if _is_number(found.get("measured")):
        return f" (dropped confidence {level:g}: the frozen value has its tolerance)"
    claim[CONFIDENCE] = level
    held = f", held in {share:.0%} of {trust.get('resamples')} resamples" \
        if _is_number(share) else ""
    return f" (confidence {level:g}{held})"


def _rewritten(claim: dict, entry: dict) -> dict:
    """The claim with the fields its freeze rule rewrites (a found circuit's edges)."""
    found, _ = rule_for(entry)
    if found is None or found.fields is None:
        return claim
    out = dict(claim)
    for key, value in found.fields(entry).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _item(claim: dict, note: str) -> str:
    body = _dump([claim]).rstrip().splitlines()
    return "\n".join([f"  # {_comment(note)}", *("  " + line for line in body)]) + "\n"


def _comment(text: str) -> str:
    """Text for one YAML comment line: the report's strings (names, labels, versions) may hold
    line breaks, which would end the comment and write YAML of their own; they and every other
    control character are shown escaped. Values go through yaml.safe_dump, never text."""
    from harness.report_text import one_line

    return one_line(text)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (descriptions) as literal blocks, as a person writes them."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s.rstrip("\n") else None))


def _dump(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=None, width=100)


def rebase_paths(spec_data: dict, old_dir: Path, new_dir: Path) -> dict:
    """Every path a spec reads relative to its folder — `path:` of models and SAEs, `file:`
    and `dataset.data_files` of prompt sources — re-pointed from `new_dir`."""
    def rebase(value: str) -> str:
        target = (old_dir / value).resolve()
        try:
            return os.path.relpath(target, new_dir.resolve())
        except ValueError:   # another drive
            return str(target)

    data = json.loads(json.dumps(spec_data))
    for group in ("models", "saes"):
        sources = data.get(group)
        for source in sources.values() if isinstance(sources, dict) else []:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = rebase(source["path"])
    sets = [data.get("prompts") or [], *(data.get("prompt_sets") or {}).values()]
    for entries in sets:
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                entry["file"] = rebase(entry["file"])
            dataset = entry.get("dataset") if isinstance(entry, dict) else None
            files = dataset.get("data_files") if isinstance(dataset, dict) else None
            if isinstance(files, str):
                dataset["data_files"] = rebase(files)
            elif isinstance(files, list):
                dataset["data_files"] = [rebase(f) if isinstance(f, str) else f for f in files]
    return data


def write_frozen(spec_data: dict, spec_dir: Path, claims: list[dict], path: Path,
                 tolerance: float, origin: str, environment: dict | None = None) -> Path:
    from harness.baselines import write_atomic

    if tolerance <= 0:
        raise HarnessError(f"tolerance must be > 0, got {tolerance}")
    path = Path(path)
    data = rebase_paths(spec_data, spec_dir, path.parent)
    write_atomic(path, frozen_spec_text(data, claims, tolerance, origin, environment))
    return path


def freeze_report(report_path: Path, out: Path, tolerance: float) -> list[Path]:
    """`harness freeze`: one frozen spec per spec of the report (its source spec is re-read
    for models and prompts). One spec: `out` is the file; several: a directory."""
    from harness.report_text import read_report
    from harness.yamlsource import read_yaml

    report = read_report(report_path)
    specs = report["specs"]
    sources = [Path(entry["file"]) for entry in specs]
    for entry, source in zip(specs, sources):
        if not source.exists():
            raise HarnessError(f"{report_path}: spec '{entry['spec']}' came from {source}, which "
                               "is gone; freeze from the directory the report was made in")
    written = []
    for entry, source, target in zip(specs, sources, frozen_targets(sources, Path(out))):
        written.append(write_frozen(read_yaml(source).data, source.parent, entry["claims"],
                                    target, tolerance, f"{report_path} (spec {source})",
                                    report.get("environment")))
    return written


def frozen_targets(sources: list[Path], out: Path) -> list[Path]:
    """Where each spec's frozen copy goes: `out` itself for one spec (inside it when `out` is a
    directory); else `out/<stem>.frozen.yaml`, where stems repeat named by the folders below
    the specs' common folder (`a-x.frozen.yaml`) and a `.yml` suffix (`x.yml.frozen.yaml`), so
    no spec's copy overwrites another's."""
    if len(sources) == 1 and not out.is_dir():
        return [out]
    if len(sources) > 1 and out.exists() and not out.is_dir():
        raise HarnessError(f"-o {out}: the report has {len(sources)} specs, so -o names a "
                           "directory (one frozen spec per spec), not a file")
    names = [f"{s.stem}.frozen.yaml" for s in sources]
    if len(set(names)) < len(names):
        common = Path(os.path.commonpath([s.resolve().parent for s in sources]))
        names = []
        for source in sources:
            rel = source.resolve().relative_to(common)
            base = rel.stem if rel.suffix == ".yaml" else rel.name
            names.append("-".join((*rel.parent.parts, base)) + ".frozen.yaml")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):   # the same spec twice in one report, or a-x vs a/x
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = name.replace(".frozen.yaml", f"-{seen[name]}.frozen.yaml")
    return [out / name for name in names]
