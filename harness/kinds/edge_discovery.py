"""Circuits found rather than written: `edges: {top: N, method: eap-ig}` (or `share:` of all
edges, or `faithfulness:` for the smallest top-ranked circuit reaching a target) on a `circuit`
claim, and MIB's integrated faithfulness (`metric: cpr | cmd` over `sizes:`). The spec class
and the measurement's steps; the tensor work is in measure/ (edge_attribution, edge_discovery,
circuit_curves)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

from pydantic import Field, model_validator

from harness.expect import SCALAR, Measurement
from harness.kinds.base import Frozen

SCORE_METHODS = ("eap", "eap-ig", "exact")
SCORE_METRICS = ("logit_diff", "loss", "kl")
CURVE_METRICS = ("cpr", "cmd")


class EdgeDiscovery(Frozen):
    """How a circuit claim finds its edges: score every edge on the claim's prompts with
    `method`, then keep the `top` N, a `share` of all edges, or the fewest top-ranked edges
    whose circuit is at least `faithfulness` faithful (exactly one of the three; none with
    `metric: cpr | cmd`, which scores circuits of every size in `sizes`)."""

    method: Literal["eap", "eap-ig", "exact"] = "eap-ig"
    steps: int = Field(5, ge=1, le=1000)            # EAP-IG's interpolation steps
    score_metric: Literal["logit_diff", "loss", "kl"] = "logit_diff"
    top: int | None = Field(None, ge=1)
    share: float | None = Field(None, gt=0, le=1)
    faithfulness: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _steps_for_ig(self):
        if self.method != "eap-ig" and "steps" in self.model_fields_set:
            raise ValueError(f"`steps` is EAP-IG's number of interpolation steps; "
                             f"`method: {self.method}` takes none")
        chosen = [k for k in ("top", "share", "faithfulness") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"`edges` takes one of top, share, faithfulness; got "
                             f"{', '.join(chosen)}")
        return self

    @property
    def size_rule(self) -> str | None:
        return next((k for k in ("top", "share", "faithfulness") if getattr(self, k) is not None),
                    None)


def discovery_problem(edges, metric: str, sizes, eval_prompts) -> None:
    """Which fields go together on a circuit claim; a ValueError says what to change."""
    found = isinstance(edges, EdgeDiscovery)
    if metric in CURVE_METRICS:
        if not found:
            raise ValueError(f"`metric: {metric}` scores a discovery method over circuit sizes: "
                             "write `edges: {method: eap-ig}` (no top / share / faithfulness)")
        if edges.size_rule is not None:
            raise ValueError(f"`metric: {metric}` measures circuits of every size in `sizes`; "
                             f"drop `edges.{edges.size_rule}`")
        if sizes is not None:
            from harness.measure.circuit_curves import check_sizes

            check_sizes(sizes)
    elif sizes is not None:
        raise ValueError("`sizes` are the circuit sizes of `metric: cpr | cmd`")
    elif found and edges.size_rule is None:
        raise ValueError("a found circuit needs its size: `edges: {top: N}`, `{share: 0.05}` "
                         "or `{faithfulness: 0.9}` (with `method:`)")
    if eval_prompts is not None and not found:
        raise ValueError("`eval_prompts` measures a found circuit on another prompt set; "
                         "this circuit is written out (`members` / `edges` list)")


@dataclass
class Found:
    """A circuit found on the claim's prompts, with what measuring it on the evaluation
    prompts needs (their batch and edge ablation) and what the report keeps."""

    edges: list[int]                     # indices into the graph's edges
    batch: object
    ablation: tuple                      # kinds.measuring.edge_ablation's result
    extras: dict


def edge_scores(ctx, ef, clean, ablated, batch, found: EdgeDiscovery) -> list[float]:
    """Per-edge scores of the discovery method on the claim's prompts (mean over prompts)."""
    from harness.kinds.edges import METHODS

    scoring = SimpleNamespace(method=found.method, steps=found.steps,
                              metric=found.score_metric)
    effects = METHODS[found.method](_WithClaim(ctx, scoring), ef, clean, ablated, batch)
    return effects.mean(-1).tolist()


class _WithClaim:
    """The measure context with the scoring fields the edge_scores methods read."""

    def __init__(self, ctx, claim):
        self._ctx, self.claim = ctx, claim

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def find_circuit(ctx, model, batch):
    """Score every edge on the claim's prompts (against their corrupt texts), then keep the
    top N, a share, or the smallest faithful prefix measured on the evaluation prompts; for
    `metric: cpr | cmd` the integrated faithfulness instead (a scalar Measurement)."""
    from harness.kinds.measuring import edge_ablation
    from harness.measure import circuit_curves, edge_discovery
    from harness.measure.edge_circuits import configuration_metrics, weights_keeping

    claim, found = ctx.claim, ctx.claim.found
    ef, clean, corrupt, _ = edge_ablation(ctx, model, batch, "corrupt", claim.seed)
    scores = edge_scores(ctx, ef, clean, corrupt, batch, found)
    order = edge_discovery.ranking(scores)
    edges = ef.graph.edges
    if claim.eval_prompts is not None:
        batch = ctx.session.batch(ctx.spec, ctx.spec.prompt_set(claim.eval_prompts), model,
                                  ctx.prepend_bos)
    ablation = edge_ablation(ctx, model, batch, claim.kind, claim.seed)
    ef, clean, ablated, _ = ablation

    def logit_diffs(circuits: list[list[int]]) -> list[float]:
        kept = [None, set()] + [{edges[i] for i in c} for c in circuits]
        diffs = configuration_metrics(ef, clean, ablated, weights_keeping(ef, kept), batch,
                                      "logit_diff", ctx.session.memory_budget_mb).mean(-1)
        full, empty = float(diffs[0]), float(diffs[1])
        return [circuit_curves.faithfulness(float(d), full, empty) for d in diffs[2:]]

    discovery = {"method": found.method, "score_metric": found.score_metric,
                 "n_edges": len(edges),
                 "top_scores": {edges[i].label: scores[i] for i in order[:20]}}
    if found.method == "eap-ig":
        discovery["steps"] = found.steps
    if claim.metric in CURVE_METRICS:
        sizes = list(claim.sizes or circuit_curves.MIB_SIZES)
        counts = circuit_curves.edge_counts(sizes, len(edges))
        curve = logit_diffs([order[:n] for n in counts])
        area = (circuit_curves.cpr if claim.metric == "cpr" else circuit_curves.cmd)(sizes,
                                                                                     curve)
        extras = {"prompts": batch.texts, "discovery": discovery,
                  "curve": {"sizes": sizes, "edges": counts, "faithfulness": curve}}
        return Measurement(SCALAR, area, extras=extras)
    if found.top is not None:
        n = min(found.top, len(edges))
    elif found.share is not None:
        n = edge_discovery.share_count(found.share, len(edges))
    else:
        n, tried = edge_discovery.smallest_faithful_prefix(
            order, lambda c: logit_diffs([c])[0], found.faithfulness)
        discovery["tried"] = {str(k): v for k, v in sorted(tried.items())}
    chosen = sorted(order[:n])                      # graph order, as a person reads them
    extras = {"found_edges": [edges[i].label for i in chosen], "discovery": discovery}
    return Found(chosen, batch, ablation, extras)
