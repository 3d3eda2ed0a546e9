"""`harness show SPEC::CLAIM`: one claim's whole measurement as text — grids as labelled tables
(layer x head, positions labelled by their tokens), per-prompt values, samples with their
seeds. Builds text from a JSON report entry; never prints."""

from __future__ import annotations

from tabulate import tabulate

from harness.expect import fmt
from harness.kinds import kind_class
from harness.labels import Head, format_label
from harness.report_text import expected_text, trust_items, trust_text


def claim_text(spec_name: str, claim: dict) -> str:
    """Everything measured for one claim (a JSON report entry)."""
    models = ", ".join(claim.get("models", []))
    lines = [f"{spec_name}::{claim['id']}  {claim['status'].upper()}  ({claim['measure']}; "
             f"{models})", f"expected: {expected_text(claim['expected']) or '(nothing)'}"]
    if claim.get("message"):
        lines.append(f"verdict:  {claim['message']}")
    if isinstance(claim.get("approximation"), str):   # e.g. DLA's "post-norm scale frozen"
        lines.append(f"note:     {claim['approximation']}")
    measured = claim.get("measured")
    sections: list[tuple[str, str]] = []
    if isinstance(measured, dict) and "values" in measured:
        for name, grid in (claim.get("models_measured") or {}).items():
            sections.append((f"{name}", grid_table(grid)))
        title = "difference (second - first)" if claim.get("models_measured") else "measured"
        sections.append((title + (" (attribution approximation)" if measured.get("method") ==
                                  "attribution" else ""), grid_table(measured)))
    elif isinstance(measured, dict) and "texts" in measured:
        sections.append(("samples", samples_table(claim)))
    elif isinstance(measured, float):
        sections.append(("measured", fmt(measured)))
    patch = [(k, claim[k]) for k in ("from", "into", "raw", "normalized") if k in claim]
    if patch:
        sections.append(("logit diffs", tabulate([[k, fmt(v)] for k, v in patch],
                                                  tablefmt="plain")))
    if claim.get("stats"):
        s = claim["stats"]
        sections.append(("bootstrap", f"{s['ci']:.0%} interval [{fmt(s['low'])}, "
                                      f"{fmt(s['high'])}] of the mean {fmt(s['mean'])} over "
                                      f"{s['n']} prompts"))
    if trust_items(claim.get("trust")):
        sections.append(("trust", trust_text(claim["trust"])))
    per_prompt = per_prompt_table(claim)
    if per_prompt:
        sections.append(("per prompt", per_prompt))
    for title, body in sections:
        lines += ["", f"{title}:", body]
    return "\n".join(lines)


def position_labels(tokens: list) -> list[str]:
    return [f"{i} {tok!r}" if isinstance(tok, str) else str(tok) for i, tok in enumerate(tokens)]


def grid_table(grid: dict) -> str:
    """A grid as a table: rows the first axes (layer x head as LxHy), columns the last."""
    axes, labels, values = grid["axes"], grid["labels"], grid["values"]
    if len(axes) == 1:
        return tabulate([[str(lab), fmt(v)] for lab, v in zip(labels[0], values)],
                        [axes[0], "value"], tablefmt="simple")
    columns = position_labels(labels[-1]) if axes[-1] == "pos" else [str(x) for x in labels[-1]]
    if len(axes) == 2:
        rows = [[str(lab)] + [fmt(v) for v in row] for lab, row in zip(labels[0], values)]
    else:
        rows = [[format_label(Head(layer, head))] + [fmt(v) for v in values[li][hi]]
                for li, layer in enumerate(labels[0]) for hi, head in enumerate(labels[1])]
    corner = f"{' x '.join(axes[:-1])} \\ {axes[-1]}"
    return tabulate(rows, [corner, *columns], tablefmt="simple", disable_numparse=True)


def per_prompt_table(claim: dict) -> str:
    prompts = claim.get("prompts") or []
    if claim.get("per_prompt") and len(claim["per_prompt"]) > 0:
        values = claim["per_prompt"]
        rows = [[i, prompts[i] if i < len(prompts) else "", fmt(v)] for i, v in enumerate(values)]
        return tabulate(rows, ["#", "prompt", "value"], tablefmt="simple")
    listing = kind_class(claim["measure"]).PER_PROMPT_LISTING
    if listing == "tokens":
        measured = claim["measured"]
        tokens = measured if measured and isinstance(measured[0], list) else [measured]
        probs = claim.get("probabilities") or [[] for _ in tokens]
        rows = [[i, prompts[i] if i < len(prompts) else "",
                 ", ".join(f"{t!r} {p:.3f}" for t, p in zip(row, prob))]
                for i, (row, prob) in enumerate(zip(tokens, probs))]
        return tabulate(rows, ["#", "prompt", "top tokens (probability)"], tablefmt="simple")
    if listing == "texts" and not isinstance(claim.get("measured"), dict):
        texts = claim["measured"] if isinstance(claim["measured"], list) else [claim["measured"]]
        rows = [[i, prompts[i] if i < len(prompts) else "", t] for i, t in enumerate(texts)]
        return tabulate(rows, ["#", "prompt", "greedy text"], tablefmt="simple")
    return ""


def samples_table(claim: dict) -> str:
    """Each sample with the seed that reproduces it (kinds/generate.py: seed + i * samples + s)."""
    samples = claim["measured"]
    params = claim.get("params", {})
    per, seed = params.get("samples", 1), params.get("seed", 0)
    prompts = claim.get("prompts") or []
    scores = samples.get("scores") or [None] * len(samples["texts"])
    rows = []
    for n, (text, score) in enumerate(zip(samples["texts"], scores)):
        i, s = divmod(n, per)
        rows.append([n, prompts[i] if i < len(prompts) else "", seed + i * per + s,
                     "" if score is None else fmt(score), text])
    return tabulate(rows, ["#", "prompt", "seed", "score", "text"], tablefmt="simple")
