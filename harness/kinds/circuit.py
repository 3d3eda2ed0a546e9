"""`circuit`: a set of components (`members`) or of edges (`edges`) against the full model,
everything outside it ablated (faithfulness, minimality, completeness)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.expect import GRID, SCALAR, Measurement
from harness.kinds.base import (
    Index,
    MeasureContext,
    SingleModelClaim,
    chance_measurement,
    measurement,
    model_sizes,
)
from harness.kinds.edge_discovery import (
    CURVE_METRICS,
    EdgeDiscovery,
    discovery_problem,
    find_circuit,
)
from harness.kinds.fields import (
    ReferencePrompts,
    _components,
    _edge_labels,
    component_indices,
    edge_indices,
)
from harness.kinds.measuring import (
    ablation_reference,
    component_pool,
    edge_ablation,
    edge_pool,
    graph_edges,
    random_selections,
)
from harness.measure.results import Grid, PromptParts


class CircuitClaim(SingleModelClaim):
    """A set of components (`members`) or edges (`edges`) compared with the full model,
    everything outside it ablated."""

    measure: Literal["circuit"]
    CI_WHEN = ("", " faithfulness")
    # a found circuit freezes as its explicit edge list ("found"), MIB's curves as a number
    FREEZE = "found|cells|scalar"
    FIGURE = "curve"         # drawn for `metric: cpr | cmd` (the faithfulness curve)
    VALUE_KIND = GRID        # SCALAR for faithfulness, cpr, cmd
    RESAMPLES_PROMPTS = True
    REPORT_EXTRAS = ("prompts", "stats", "reference", "logit_diffs", "ratio_of_means",
                     "found_edges", "discovery", "curve")
    AGAINST = "members or listed edges (faithfulness)"
    members: tuple[str, ...] | None = Field(None, min_length=1)
    # "L0H0 -> L1H0:k", ...; or found: {top: N, method: eap-ig} (edge_discovery.py)
    edges: tuple[str, ...] | EdgeDiscovery | None = None
    eval_prompts: str | None = None     # a found circuit measured on another prompt set
    # always explicit: scores depend on it; corrupt (the prompts' corrupt texts) with edges
    kind: Literal["zero", "mean", "resample", "corrupt"]
    reference: str | ReferencePrompts | None = None   # prompt set for mean / resample
    seed: int = 0
    metric: Literal["faithfulness", "minimality", "completeness", "cpr", "cmd"] = \
        "faithfulness"
    sizes: tuple[float, ...] | None = None   # cpr / cmd: circuit sizes, fractions of all edges

    @field_validator("members")
    @classmethod
    def _member_names(cls, value):
        return _components(value)

    @field_validator("edges")
    @classmethod
    def _edge_names(cls, value):
        if isinstance(value, EdgeDiscovery):
            return value
        if not value:
            raise ValueError("`edges` lists at least one edge, or says how to find them: "
                             "{top: N, method: eap-ig}")
        return _edge_labels(value)

    @model_validator(mode="after")
    def _reference_for_kind(self):
        if (self.members is None) == (self.edges is None):
            raise ValueError("give the circuit as `members:` (components) or as `edges:`, "
                             "exactly one of them")
        discovery_problem(self.edges, self.metric, self.sizes, self.eval_prompts)
        if self.kind == "corrupt":
            if self.edges is None:
                raise ValueError("`kind: corrupt` ablates edges to the corrupt run's outputs: "
                                 "write the circuit as `edges:`, or use zero, mean or resample")
            if self.reference is not None:
                raise ValueError("`kind: corrupt` reads the prompts' `corrupt:` texts; "
                                 "`reference:` is for mean and resample")
            return self
        if self.kind != "zero" and self.reference is None:
            raise ValueError(f"`kind: {self.kind}` needs `reference:`, the prompt set to take "
                             "the ablated activations from")
        return self

    @property
    def reference_prompts(self) -> str | None:
        ref = self.reference
        return ref.prompts if isinstance(ref, ReferencePrompts) else ref

    @property
    def found(self) -> EdgeDiscovery | None:
        return self.edges if isinstance(self.edges, EdgeDiscovery) else None

    def value_kind(self) -> str:
        return SCALAR if self.metric in ("faithfulness", *CURVE_METRICS) else GRID

    def has_intervals(self) -> bool:
        return self.metric == "faithfulness"

    def other_prompt_sets(self) -> tuple[tuple[str, str], ...]:
        extra = (("eval_prompts", self.eval_prompts),) if self.eval_prompts else ()
        return super().other_prompt_sets() + extra

    def indices(self) -> list[Index]:
        if self.found is not None:
            return []
        if self.edges is not None:
            return edge_indices(self.edges, "edges")
        return component_indices(self.members, "members")

    def accepts_against(self) -> bool:
        return self.metric == "faithfulness" and self.found is None

    def chance_pool(self, sizes: dict):
        """Components of the same layers, or (for `edges:`, with the model's EdgeGraph in
        `sizes["edge_graph"]`) edges between the same layers."""
        if self.edges is not None:
            return edge_pool(self.edges, sizes["edge_graph"])
        return component_pool(self.members, sizes)

    def needs_corrupt(self) -> bool:
        return self.kind == "corrupt" or self.found is not None   # scores read corrupt runs

    def pairs_clean_and_corrupt(self) -> bool:
        return self.needs_corrupt()

    def cost(self, n_prompts: int) -> float:
        return super().cost(n_prompts) * (10.0 if self.found is not None else 1.0)


@measurement("circuit")
def _circuit(ctx: MeasureContext) -> Measurement:
    from harness.measure.circuits import (
        all_components,
        circuit_scores,
        component_hooks,
        parse_component,
    )

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    cfg = model.bridge.cfg
    if claim.found is not None:
        found = find_circuit(ctx, model, batch)
        if isinstance(found, Measurement):          # cpr / cmd
            return found
        from harness.measure.edge_circuits import edge_circuit_scores

        batch = found.batch
        ef, clean, ablated, extras = found.ablation
        edges = [ef.graph.edges[i] for i in found.edges]
        scores = edge_circuit_scores(ef, clean, ablated, batch, edges,
                                     ctx.session.memory_budget_mb)
        names = tuple(e.label for e in edges)
        extras.update(found.extras)
    elif claim.edges is not None:
        from harness.measure.edge_circuits import edge_circuit_scores

        ef, clean, ablated, extras = edge_ablation(ctx, model, batch, claim.kind, claim.seed)
        edges = graph_edges(ef, claim.edges)
        scores = edge_circuit_scores(ef, clean, ablated, batch, edges,
                                     ctx.session.memory_budget_mb)
        names = tuple(e.label for e in edges)
    else:
        members = [parse_component(m, cfg) for m in claim.members]
        values, extras = ablation_reference(ctx, model, batch, claim.kind,
                                            component_hooks(cfg), claim.seed)
        scores = circuit_scores(model.bridge, batch.tokens, batch.final_pos, batch.answer_ids,
                                batch.foil_ids, members, values, all_components(cfg),
                                ctx.session.memory_budget_mb)
        names = tuple(claim.members)
    extras.update({"prompts": batch.texts, "logit_diffs": {
        "model": float(scores.model.mean()), "all_ablated": float(scores.ablated.mean()),
        "circuit": float(scores.circuit.mean())}})
    if claim.metric == "faithfulness":
        per_prompt = scores.faithfulness()
        gap = scores.model.mean() - scores.ablated.mean()
        extras["ratio_of_means"] = float((scores.circuit.mean() - scores.ablated.mean()) / gap)
        if claim.ci:
            from harness.stats import bootstrap_mean_ci

            low, high = bootstrap_mean_ci(per_prompt, claim.ci)
            extras["stats"] = {"n": len(per_prompt), "mean": float(per_prompt.mean()),
                               "ci": claim.ci, "low": low, "high": high}
        return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()), extras)
    axis = "edge" if claim.edges is not None else "component"
    if claim.metric == "minimality":
        values_ = scores.minimality()
        labels = names
    else:
        values_ = scores.completeness()
        labels = names + ("circuit",)
    grid = Grid((axis,), (labels,), values_, extras=extras)
    return Measurement(GRID, grid, extras=extras, parts=_score_parts(scores, claim.metric))


def _score_parts(scores, metric: str) -> PromptParts:
    """The circuit's per-prompt logit diffs, for the bootstrap: minimality and completeness
    are made from their means over prompts (`CircuitScores`), so from resampled means too."""
    parts = {"model": scores.model, "ablated": scores.ablated, "circuit": scores.circuit,
             "without": scores.without.movedim(-1, 0)}
    if metric == "completeness":
        parts["model_without"] = scores.model_without.movedim(-1, 0)
    return PromptParts({k: v.float().cpu() for k, v in parts.items()},
                       _minimality if metric == "minimality" else _completeness)


def _minimality(means: dict):
    """`CircuitScores.minimality` on means [..., member]."""
    scale = (means["model"] - means["ablated"])[..., None]
    return (means["circuit"][..., None] - means["without"][..., :-1]) / scale


def _completeness(means: dict):
    """`CircuitScores.completeness` on means [..., k]."""
    scale = (means["model"] - means["ablated"])[..., None]
    return (means["without"] - means["model_without"]).abs() / scale.abs()


@chance_measurement("circuit")
def _circuit_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Faithfulness of random circuits: every configuration in one batched pass."""
    if ctx.claim.edges is not None:
        return _edge_circuit_chance(ctx, n, seed)
    from harness.measure.circuits import (
        all_components,
        circuit_logit_diffs,
        component_hooks,
        parse_component,
    )

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    cfg = model.bridge.cfg
    selections = random_selections(ctx, model_sizes(cfg), n, seed)
    values, _ = ablation_reference(ctx, model, batch, claim.kind, component_hooks(cfg),
                                   claim.seed)
    universe = all_components(cfg)
    kept = [set(universe), set()] + [{parse_component(m, cfg) for m in s} for s in selections]
    diffs = circuit_logit_diffs(model.bridge, batch.tokens, batch.final_pos, batch.answer_ids,
                                batch.foil_ids, kept, universe, values,
                                ctx.session.memory_budget_mb)
    full, ablated = diffs[0], diffs[1]
    return ((diffs[2:] - ablated) / (full - ablated)).mean(-1).tolist()


def _edge_circuit_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Faithfulness of random edge circuits (edges between the same layers as the named
    ones), chunked through the edge forward as the named circuit is."""
    from harness.chance import draw
    from harness.measure.edge_circuits import configuration_metrics, weights_keeping

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    ef, clean, ablated, _ = edge_ablation(ctx, model, batch, claim.kind, claim.seed)
    graph_edges(ef, claim.edges)                      # a label the model lacks: its message
    pool = claim.chance_pool({**model_sizes(model.bridge.cfg), "edge_graph": ef.graph})
    by_label = {e.label: e for e in ef.graph.edges}
    kept = [None, set()] + [{by_label[label] for label in s} for s in draw(pool, n, seed)]
    diffs = configuration_metrics(ef, clean, ablated,
                                  (len(kept), lambda a, b: weights_keeping(ef, kept[a:b])),
                                  batch, "logit_diff", ctx.session.memory_budget_mb,
                                  desc="random edge circuits")
    full, empty = diffs[0], diffs[1]
    return ((diffs[2:] - empty) / (full - empty)).mean(-1).tolist()
