"""What several kinds' measurements share: per-prompt scalars and their intervals, spans,
the from/into runs of a patch, patch effects as claims report them, reference ablations,
head grids and gated SAEs. Torch and the `measure/` computations are imported inside the
functions (only `measure.results`, which needs no torch, at the top)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.errors import MeasureError
from harness.expect import PATCH, SCALAR, Measurement, fmt
from harness.kinds.base import MeasureContext, index_problems, model_sizes
from harness.measure.results import Grid, PromptParts, normalized_from_means

if TYPE_CHECKING:   # torch loads inside the measurements only
    import torch


def scalar_over_prompts(ctx: MeasureContext, per_prompt: torch.Tensor, texts: tuple,
                         extras: dict | None = None) -> Measurement:
    """A per-prompt number: the mean is the value; `ci` adds a bootstrap interval."""
    extras = {"prompts": texts, **(extras or {})}
    if ctx.claim.ci:
        extras["stats"] = interval(per_prompt, ctx.claim.ci, texts)
    return Measurement(SCALAR, float(per_prompt.mean()), tuple(per_prompt.tolist()), extras)


def interval(per_prompt, level: float, texts) -> dict:
    from harness.stats import bootstrap_mean_ci

    low, high = bootstrap_mean_ci(per_prompt, level)
    order = per_prompt.argsort().tolist()
    return {"n": len(order), "mean": float(per_prompt.mean()), "ci": level, "low": low,
            "high": high, "lowest_prompts": [[texts[i], float(per_prompt[i])] for i in order[:3]]}


def answers_of(ctx: MeasureContext, **more) -> list[dict]:
    """Per-prompt values that expectations read beside the measured value (their answer)."""
    prompts = ctx.prompts or ctx.spec.claim_prompts(ctx.claim)
    return [{"answer": p.answer, **{k: v[i] for k, v in more.items()}}
            for i, p in enumerate(prompts)]


def span_mask_of(ctx: MeasureContext, model, batch):
    """The positions a sequence metric scores, per prompt, on the clean tokens."""
    from harness.measure.sequence import Span, check_spans, span_mask
    from harness.prompts import single_token_id

    span = ctx.claim.span
    if isinstance(span, str):
        chosen = Span(span)
    elif hasattr(span, "after"):
        marker = single_token_id(model.tokenizer, span.after)
        if isinstance(marker, list):
            raise MeasureError(f"span marker {span.after!r} is {len(marker)} tokens: {marker}; "
                               "use a single token")
        chosen = Span("after", marker_id=marker)
    else:
        chosen = Span("range", start=span.start, stop=span.stop)
    mask = span_mask(batch.tokens, batch.final_pos, chosen, prefix=int(ctx.prepend_bos))
    check_spans(mask, batch.texts, chosen)
    return mask


def patch_runs(ctx: MeasureContext):
    """The `from` and `into` runs of a patch claim, on one shared tokenization."""
    import torch

    from harness.measure.patching import Run

    claim = ctx.claim
    runs = []
    for ref in (claim.from_, claim.into):
        model = ctx.model(ref.model)
        batch = ctx.batch(model)
        corrupt = ref.input == "corrupt"
        tokens = batch.corrupt_tokens if corrupt else batch.tokens
        final = batch.corrupt_final_pos if corrupt else batch.final_pos
        runs.append((Run(model.key, model.bridge, tokens, final), batch))
    (from_run, from_batch), (into_run, into_batch) = runs
    if from_run.tokens.shape != into_run.tokens.shape or not torch.equal(
            from_run.final_pos.cpu(), into_run.final_pos.cpu()):
        from harness.prompts import corrupt_length_mismatches

        problems = corrupt_length_mismatches(ctx.model(claim.into.model).tokenizer,
                                             ctx.spec.claim_prompts(claim), ctx.prepend_bos)
        raise MeasureError("; ".join(problems) or (
            f"models '{claim.from_.model}' and '{claim.into.model}' tokenize the prompts to "
            "different lengths; patching pairs positions one to one and needs one tokenizer"))
    if not (torch.equal(from_batch.answer_ids, into_batch.answer_ids)
            and torch.equal(from_batch.foil_ids, into_batch.foil_ids)):
        raise MeasureError(f"models '{claim.from_.model}' and '{claim.into.model}' tokenize "
                           "the answers differently; patching needs one shared tokenizer")
    return from_run, into_run, into_batch


def site_kwargs(claim) -> dict:
    return dict(site=claim.site, layers=claim.layers, heads=claim.head_pairs(),
                positions=claim.positions, neurons=claim.neurons)


def patch_measurement(effect, metric: str, path: str | None) -> Measurement:
    """A patch effect as the claim reports it: the raw patched value with `metric: logit_diff`,
    else the normalized effect. `per_prompt` holds the same quantity for each prompt (its
    patched - into over the mean from - into: their mean is the value), so `per_prompt: all`
    judges what the mean reports; `each` gives per-prompt raw / from / into to operators that
    read them."""
    raw = float(effect.patched.mean())
    value = raw if metric == "logit_diff" else float(effect.normalized)
    per_prompt = effect.patched if metric == "logit_diff" else effect.normalized_per_prompt()
    extras = {"raw": raw, "from": float(effect.from_value.mean()),
              "into": float(effect.into_value.mean()), "normalized": float(effect.normalized),
              "per_prompt_raw": effect.patched.tolist(),
              "each": [{"raw": r, "from": f, "into": i} for r, f, i in zip(
                  effect.patched.tolist(), effect.from_value.tolist(),
                  effect.into_value.tolist())]}
    if path is not None:
        extras["path"] = path
    return Measurement(PATCH, value, tuple(per_prompt.tolist()), extras)


SEQUENCE_PATH = "sequence-hooks"   # the engine path that computed a loss/accuracy patch


def sequence_runs(ctx: MeasureContext):
    """from/into runs for a sequence metric: scored on the clean tokens' span."""
    from_run, into_run, into_batch = patch_runs(ctx)
    model = ctx.model(ctx.claim.into.model)
    return from_run, into_run, into_batch.tokens, span_mask_of(ctx, model, into_batch)


def ablation_reference(ctx: MeasureContext, model, batch, kind: str, names, seed: int):
    """Ablation values for `kind` and what the report says about the reference prompts."""
    from harness.measure.circuits import ablation_values, resample_draw

    claim = ctx.claim
    if kind == "zero":
        return ablation_values(model.bridge, "zero", names, batch.tokens, batch.final_pos), {}
    ref_name = claim.reference_prompts
    ref_batch = ctx.session.batch(ctx.spec, ctx.spec.prompt_set(ref_name), model,
                                  ctx.prepend_bos)
    draw = resample_draw(len(batch.texts), len(ref_batch.texts), seed) \
        if kind == "resample" else None
    values = ablation_values(model.bridge, kind, names, batch.tokens, batch.final_pos,
                             ref_batch.tokens, ref_batch.final_pos, draw)
    used = [ref_batch.texts[i] for i in draw] if draw is not None else list(ref_batch.texts)
    return values, {"reference": {"prompt_set": ref_name, "kind": kind, "seed": seed,
                                  "prompts": used}}


def sweep_parts(grid: Grid, metric: str) -> PromptParts:
    """A patching grid's per-prompt parts, from what the engine keeps in its extras (patched
    [*cells, prompt], from and into [prompt]): the raw patched value with `metric:
    logit_diff`, else the normalized effect, made from resampled means as from all prompts."""
    patched = grid.extras["per_prompt"].reshape(*grid.values.shape, -1).movedim(-1, 0)
    if metric == "logit_diff":
        return PromptParts({"value": patched})
    return PromptParts({"patched": patched, "from": grid.extras["from_per_prompt"],
                        "into": grid.extras["into_per_prompt"]}, normalized_from_means)


def head_grid(values: torch.Tensor, layers: list[int]) -> Grid:
    return Grid(("layer", "head"), (tuple(layers), tuple(range(values.shape[1]))), values)


def gated_sae(ctx: MeasureContext, model, batch, name: str | None = None):
    """The claim's SAE on the model's device, after its reconstruction gate on these prompts.

    Below the spec's thresholds the claim is an error that says so: an SAE read at another hook
    or model than it was trained on must never pass silently.
    """
    from harness.measure.features import reconstruction

    name = name or ctx.claim.sae
    source = ctx.spec.saes[name]
    sae = ctx.session.sae(ctx.spec, name, model.device)
    rec = ctx.session.gate((name, model.key, batch.texts, ctx.prepend_bos), lambda: reconstruction(
        model.bridge, sae, batch, ctx.prepend_bos, ctx.session.memory_budget_mb))
    gate = source.gate
    problems = []
    # written so that NaN fails: every comparison with NaN is false
    if not rec.variance_explained >= gate.min_variance_explained:
        problems.append(f"variance explained {fmt(rec.variance_explained)} < "
                        f"{fmt(gate.min_variance_explained)} (min_variance_explained)")
    if not rec.loss_increase <= gate.max_loss_increase:
        problems.append(f"next-token loss +{fmt(rec.loss_increase)} nats with the "
                        f"reconstruction spliced in > {fmt(gate.max_loss_increase)} "
                        "(max_loss_increase)")
    if problems:
        raise MeasureError(
            f"SAE '{name}' fails its reconstruction gate on model '{model.key.split('|')[0]}' at "
            f"{sae.hook} over {len(batch.texts)} prompts: {'; '.join(problems)}. An SAE read at "
            "another hook or model than it was trained on reconstructs badly: check the SAE's "
            "`hook:` (and which model it belongs to), or set `gate:` on the SAE if this "
            "reconstruction is good enough")
    return sae, rec.as_dict()


def check_features(ctx: MeasureContext, sae, features, name: str | None = None) -> None:
    bad = [f for f in features if f >= sae.d_sae]
    if bad:
        raise MeasureError(f"feature {bad[0]} is out of range: SAE '{name or ctx.claim.sae}' has "
                           f"{sae.d_sae} features (0..{sae.d_sae - 1})")


def check_indices(claim, model, name: str) -> None:
    """The claim's layers, heads and neurons fit the loaded model (the static checks' range
    check, for models the static checks could not read: a notebook's, a hub model's)."""
    problems = index_problems(claim, model_sizes(model.bridge.cfg), name)
    if problems:
        raise MeasureError(problems[0][1])


# ----------------------------------------------------------------------------- against chance

def component_pool(members, sizes: dict):
    """`against: random` over circuit components (`L1H0`, `mlp0`): each head may be any head
    of its layer, each MLP stays (a layer has one); items are the labels themselves."""
    from harness import labels
    from harness.chance import Pool

    named: dict = {}
    candidates: dict = {}
    for text in members:
        part = labels.parse_component(text)
        if isinstance(part, labels.Head):
            group = ("head", part.layer)
            candidates[group] = tuple(str(labels.Head(part.layer, h))
                                      for h in range(sizes["n_heads"]))
        else:
            group = ("part", str(part))
            candidates[group] = (str(part),)
        named[group] = named.get(group, ()) + (str(part),)   # canonical, as candidates are
    return Pool(named, candidates)


def edge_pool(texts, graph):
    """`against: random` over a circuit's edges: each random edge joins the same sender layer
    to the same receiver layer as a named one (the embedding and the logits count as layers of
    their own), any sender and input kind there; items are the edges' canonical labels."""
    from harness.chance import Pool

    def group(edge) -> tuple:
        sender = "embed" if edge.sender.kind == "embed" else edge.sender.layer
        receiver = "logits" if edge.receiver.kind == "logits" else edge.receiver.layer
        return sender, receiver

    named: dict = {}
    for text in texts:
        edge = graph.edge(text)
        named[group(edge)] = named.get(group(edge), ()) + (edge.label,)
    candidates: dict = {g: () for g in named}
    for edge in graph.edges:
        if group(edge) in candidates:
            candidates[group(edge)] += (edge.label,)
    return Pool(named, candidates)


def random_selections(ctx: MeasureContext, sizes: dict, n: int, seed: int) -> list[tuple]:
    """N random selections for the claim (`chance.draw` over its `chance_pool`)."""
    from harness.chance import draw

    return draw(ctx.claim.chance_pool(sizes), n, seed)


def remeasured(ctx: MeasureContext, claims) -> list[float]:
    """The value of each claim (copies of the context's claim naming other selections), by its
    kind's measurement: for measurements the engine cannot batch over selections."""
    from dataclasses import replace

    from harness.kinds.base import MEASUREMENTS

    return [float(MEASUREMENTS[c.measure](replace(ctx, claim=c)).value) for c in claims]


def edge_ablation(ctx: MeasureContext, model, batch, kind: str, seed: int):
    """The model's edge forward, the clean prompts' sender outputs, what ablated edges carry
    (`kind` zero / mean / resample / corrupt) and what the report says about the reference."""
    from harness.measure.edge_circuits import ablated_outputs
    from harness.measure.edge_forward import EdgeForward
    from harness.measure.patching import Run

    engine = ctx.session.engine
    run = Run(model.key, model.bridge, batch.tokens, batch.final_pos)
    clean_acts = engine.clean(run)      # verifies the fast path against the model once
    ef = EdgeForward(engine.forward(run))
    clean = ef.outputs(clean_acts)
    extras: dict = {}
    ref = {}
    if kind in ("mean", "resample"):
        from harness.measure.circuits import resample_draw

        ref_name = ctx.claim.reference_prompts
        ref_batch = ctx.session.batch(ctx.spec, ctx.spec.prompt_set(ref_name), model,
                                      ctx.prepend_bos)
        draw = resample_draw(len(batch.texts), len(ref_batch.texts), seed) \
            if kind == "resample" else None
        ref = dict(ref_tokens=ref_batch.tokens, ref_final_pos=ref_batch.final_pos, draw=draw)
        used = [ref_batch.texts[i] for i in draw] if draw is not None else list(ref_batch.texts)
        extras["reference"] = {"prompt_set": ref_name, "kind": kind, "seed": seed,
                               "prompts": used}
    if kind == "corrupt":
        corrupt_problems(ctx, model, batch)
    ablated = ablated_outputs(ef, kind, batch.tokens, corrupt_tokens=batch.corrupt_tokens, **ref)
    return ef, clean, ablated, extras


def corrupt_problems(ctx: MeasureContext, model, batch) -> None:
    """Clean and corrupt texts must tokenize to equal lengths (positions pair one to one)."""
    if batch.corrupt_tokens is not None and batch.corrupt_tokens.shape == batch.tokens.shape:
        return
    from harness.prompts import corrupt_length_mismatches

    problems = corrupt_length_mismatches(model.tokenizer, ctx.spec.claim_prompts(ctx.claim),
                                         ctx.prepend_bos)
    raise MeasureError("; ".join(problems) or "the claim's prompts need `corrupt:` texts")


def graph_edges(ef, texts, field: str = "edges") -> list:
    """Edge labels -> the model's edges; a MeasureError names the label and why it is none."""
    from harness.edge_graph import EdgeError

    out = []
    for i, text in enumerate(texts):
        try:
            out.append(ef.graph.edge(text))
        except EdgeError as exc:
            raise MeasureError(f"{field}[{i}]: {exc}") from None
    return out
