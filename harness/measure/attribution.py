"""Direct logit attribution and the logit lens of the logit difference (answer - foil).

Both read each prompt's final position of a right-padded batch. Each model is measured on its
own run: DLA divides every component by the final norm's scale of the same model's run (the
seed analysis used the RLHF model's scale for both models; that is the bug not to repeat), and
the lens applies the final norm to each accumulated residual with that residual's own scale,
so models sharing their first blocks give bit-identical lens values for those layers. Both work
on every architecture through `harness.measure.readout` (LayerNorm or RMSNorm, soft-caps).
Values are means over prompts; `extras["per_prompt"]` keeps [entry, batch].
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from harness.errors import MeasureError, did_you_mean
from harness.labels import Head, LabelError, LayerPart, format_label, parse_label
from harness.measure.readout import post_attention_norms
from harness.measure.results import Grid
from harness.prompts import PromptBatch

DLA_BY = ("component", "head", "layer")
POST_NORM_FROZEN = "post-norm scale frozen"  # the label reports give per-head DLA behind a norm


def _slices(bridge, batch: PromptBatch, engine=None, key: str | None = None):
    """The model's Forward and its clean traces in prompt slices that fit the memory budget,
    shared with a PatchingEngine's cache when one is given."""
    from harness.measure.patching import PatchingEngine, Run

    engine = engine if engine is not None else PatchingEngine()
    run = Run(key or "model", bridge, batch.tokens, batch.final_pos)
    return engine.forward(run), ((rows, sub, acts) for rows, (sub,), (acts,) in engine.slices(run))


def _at_final(acts: Tensor, final_pos: Tensor) -> Float[Tensor, "batch ..."]:
    """[batch, pos, ...] -> [batch, ...] at each prompt's final position."""
    return acts[torch.arange(acts.shape[0], device=acts.device), final_pos.to(acts.device)]


def dla(bridge, batch: PromptBatch, by: str = "component", *, engine=None,
        key: str | None = None) -> Grid:
    """Direct logit attribution of the logit diff; the entries sum to the model's logit diff.

    by="component": embed, [pos_embed,] attn0, mlp0, ..., bias (unembedding and norm biases).
    by="head": L0H0, ..., then "rest" (embeddings, attention output biases, MLPs, biases).
    by="layer": "embed" (token + position), 0 .. n_layers-1 (attention + MLP), "bias".
    Each piece goes through the model's own final norm (LayerNorm: centred; RMSNorm: not)
    with the scale of the model's own run. Where the logits are soft-capped (Gemma 2) the
    pieces decompose the raw logit difference and are scaled to sum to the capped one: a linear
    approximation, said in `extras["approximation"]`. Behind a post-attention norm (Gemma 2)
    each head goes through that norm with its scale frozen at the run's value, as the final
    norm's is, so heads still sum to the attention output; labelled "post-norm scale frozen".
    """
    if by not in DLA_BY:
        raise MeasureError(f"unknown dla by={by!r}" + did_you_mean(by, DLA_BY))
    forward, slices = _slices(bridge, batch, engine, key)
    post_norms = post_attention_norms(bridge) if by == "head" else None
    per_prompt, scale = [], []
    with torch.no_grad():
        for rows, run, acts in slices:
            readout = forward.readout
            labels, parts = _components(forward, acts, run.final_pos, by, post_norms)
            final = _at_final(acts["final"], run.final_pos).float()
            ids = torch.stack([batch.answer_ids[rows], batch.foil_ids[rows]], -1)
            directions = readout.directions(ids)
            offsets = readout.offsets(ids)
            direction, bias = directions[:, 0] - directions[:, 1], offsets[:, 0] - offsets[:, 1]
            scale.append(readout.scale(final)[:, 0])
            rows_dla = (readout.centered(parts) * direction).sum(-1) / scale[-1]  # [comp, B]
            if by == "head":
                rows_dla[-1] += bias
            else:
                rows_dla = torch.cat([rows_dla, bias[None]])
            if readout.softcap is not None:
                measured = readout.logit_diff(final, ids[:, 0], ids[:, 1])
                rows_dla = rows_dla * (measured / rows_dla.sum(0))
            per_prompt.append(rows_dla.cpu())
    per_prompt = torch.cat(per_prompt, -1)
    extras = {"per_prompt": per_prompt, "final_ln_scale": torch.cat(scale).cpu(),
              "logit_diff": per_prompt.sum(0), "by": by, "path": forward.path}
    notes = []
    if post_norms is not None:
        notes.append(f"{POST_NORM_FROZEN}: each head passes through its layer's post-attention "
                     "norm with the norm's scale fixed at this run's value")
    if forward.readout.softcap is not None:
        notes.append(f"linear: the logits are soft-capped at {forward.readout.softcap:g}; "
                     "pieces of the raw logit difference are scaled to sum to the capped one")
    if notes:
        extras["approximation"] = "; ".join(notes)
    return Grid(axes=("component",), labels=(tuple(labels),), values=per_prompt.mean(-1),
                extras=extras)


def _components(forward, acts, final_pos: Tensor, by: str, post_norms=None
                ) -> tuple[list, Float[Tensor, "component batch d_model"]]:
    """Residual-stream pieces at the final position (biases handled by the caller); checked
    to add up to the final residual, so no decomposition is silently wrong. `post_norms`: the
    post-attention norms (`readout.post_attention_norms`) heads pass through, where the model
    has them."""
    at = lambda t: _at_final(t, final_pos).float()  # noqa: E731
    final = at(acts["final"])
    pos_embed = at(acts["pos_embed"]) if "pos_embed" in acts else None
    embed = at(acts["resid_pre"][0]) - (pos_embed if pos_embed is not None else 0)
    n_layers = acts["resid_pre"].shape[0]
    attn = torch.stack([at(acts["attn_out"][layer]) for layer in range(n_layers)])
    mlp = torch.stack([at(acts["mlp_out"][layer]) for layer in range(n_layers)]) \
        if "mlp_out" in acts else torch.zeros_like(attn)
    _check_sum(final, embed + (0 if pos_embed is None else pos_embed) + attn.sum(0) + mlp.sum(0),
               "the residual stream is not the sum of the embeddings and the attention and MLP "
               "outputs")
    if by == "component":
        labels, pieces = ["embed"], [embed]
        if pos_embed is not None:
            labels, pieces = labels + ["pos_embed"], pieces + [pos_embed]
        for layer in range(n_layers):
            parts = ("attn", "mlp") if "mlp_out" in acts else ("attn",)
            labels += [format_label(LayerPart(part, layer)) for part in parts]
            pieces += [attn[layer]] + ([mlp[layer]] if "mlp_out" in acts else [])
        return labels + ["bias"], torch.stack(pieces)
    if by == "layer":
        first = embed + (0 if pos_embed is None else pos_embed)
        return ["embed", *range(n_layers), "bias"], torch.cat([first[None], attn + mlp])
    W_O, b_O = forward.head_weights()
    z = torch.stack([at(acts["z"][layer]) for layer in range(n_layers)])  # [L, B, H, dh]
    heads = torch.einsum("lbhe,lhed->lhbd", z, W_O.float())  # [L, H, B, d]
    if post_norms is not None:
        heads = _through_post_norms(heads, b_O.float(), attn, post_norms)
    else:
        _check_sum(attn, heads.sum(1) + b_O.float()[:, None],
                   "attention outputs are not the sum of per-head outputs")
    labels = [format_label(Head(layer, h)) for layer in range(n_layers)
              for h in range(heads.shape[1])]
    heads = heads.flatten(0, 1)
    return labels + ["rest"], torch.cat([heads, (final - heads.sum(0))[None]])


def _through_post_norms(heads: Float[Tensor, "layer head batch d_model"],
                        b_O: Float[Tensor, "layer d_model"],
                        attn: Float[Tensor, "layer batch d_model"], post_norms
                        ) -> Float[Tensor, "layer head batch d_model"]:
    """Each head's output through its layer's post-attention norm with the norm's scale frozen
    at the clean run's value (w * head / scale): a linear map, so the heads and the output bias
    add up to the block's attention output exactly. Which weight convention the norm uses
    (w or 1 + w, Gemma's) is read off the attention output itself; neither matching refuses."""
    pre = heads.sum(1) + b_O[:, None]                          # [L, B, d] before the norm
    out = []
    for layer, norm in enumerate(post_norms):
        normed = norm.centered(pre[layer]) / norm.scale(pre[layer])   # [B, d]
        weight = next((w for w in norm.weights
                       if _close(attn[layer], normed * w + norm.bias)), None)
        if weight is None:
            _check_sum(attn[layer], normed * norm.weights[0] + norm.bias,
                       f"layer {layer}'s attention output is not its post-attention norm of "
                       "the per-head outputs")
        out.append(norm.centered(heads[layer]) * weight / norm.scale(pre[layer]))
    return torch.stack(out)


def _close(whole: Tensor, parts: Tensor, rtol: float = 1e-3) -> bool:
    return (whole - parts).abs().max().item() <= rtol * max(1.0, whole.abs().max().item())


def _check_sum(whole: Tensor, parts: Tensor, why: str, rtol: float = 1e-3) -> None:
    if not _close(whole, parts, rtol):
        err = (whole - parts).abs().max().item()
        raise MeasureError(f"direct logit attribution refused: {why} on this model (off by "
                           f"{err:.3g})")


def logit_lens(bridge, batch: PromptBatch, incl_mid: bool = False, *, engine=None,
               key: str | None = None) -> Grid:
    """Logit diff read from the accumulated residual stream before each layer, and at the end.

    Labels: resid_pre0, [resid_mid0,] resid_pre1, ..., final (the residual after the last
    block). Each entry gets the model's final norm with its own scale, then the unembedding
    (and the soft-cap, where the model has one).
    """
    forward, slices = _slices(bridge, batch, engine, key)
    if incl_mid and "resid_mid" not in forward.dims.sites:
        raise MeasureError("incl_mid needs site resid_mid, which this model (parallel "
                           "attention and MLP) does not have")
    sites = ("resid_pre", "resid_mid") if incl_mid else ("resid_pre",)
    entries = [(site, layer) for layer in range(forward.dims.n_layers) for site in sites]
    labels = [format_label(LayerPart(site, layer)) for site, layer in entries] + ["final"]
    per_prompt = []
    with torch.no_grad():
        for rows, run, acts in slices:
            stack = [acts[site][layer] for site, layer in entries] + [acts["final"]]
            resid = torch.stack([_at_final(s, run.final_pos) for s in stack])  # [entry, B, d]
            a, f = batch.answer_ids[rows], batch.foil_ids[rows]
            n_entries = resid.shape[0]
            diff = forward.readout.logit_diff(resid.flatten(0, 1), a.repeat(n_entries),
                                              f.repeat(n_entries))
            per_prompt.append(diff.reshape(n_entries, -1).cpu())
    per_prompt = torch.cat(per_prompt, -1)
    return Grid(axes=("layer",), labels=(tuple(labels),), values=per_prompt.mean(-1),
                extras={"per_prompt": per_prompt, "n_layers": forward.dims.n_layers,
                        "path": forward.path})


def logit_lens_difference(bridge_a, bridge_b, batch: PromptBatch, incl_mid: bool = False,
                          **kw) -> Grid:
    """Lens of model a minus lens of model b, entry by entry (same tokens, same answers)."""
    a = logit_lens(bridge_a, batch, incl_mid, **kw)
    b = logit_lens(bridge_b, batch, incl_mid, **kw)
    return Grid(axes=a.axes, labels=a.labels, values=a.values - b.values,
                extras={"per_prompt": a.extras["per_prompt"] - b.extras["per_prompt"],
                        "a": a, "b": b})


def producing_layer(label, n_layers: int) -> int:
    """The layer whose output an entry is the first to include (-1: the embeddings)."""
    if isinstance(label, int):
        return label
    try:
        parsed = parse_label(label)
    except LabelError:
        parsed = None
    if isinstance(parsed, LayerPart):
        return parsed.layer - 1 if parsed.part == "resid_pre" else parsed.layer  # resid_pre3: 2's
    if isinstance(parsed, Head):
        return parsed.layer
    if parsed == "final":
        return n_layers - 1
    if parsed in ("embed", "pos_embed"):
        return -1
    raise MeasureError(f"cannot tell which layer produced entry {label!r}")


def first_differing_layer(grid_a: Grid, grid_b: Grid, atol: float = 1e-4) -> int | None:
    """First layer whose output makes the two models' lens differ by more than `atol`.

    Compares per prompt when both grids carry `extras["per_prompt"]`, else the means. None: no
    entry differs; -1: they differ already at the embeddings. `same_below: L` holds exactly
    when this returns L (lens equal up to and including resid_pre L, different after layer L).
    """
    if grid_a.labels != grid_b.labels:
        raise MeasureError("the two grids have different entries; measure both the same way")
    a = grid_a.extras.get("per_prompt", grid_a.values[:, None])
    b = grid_b.extras.get("per_prompt", grid_b.values[:, None])
    if a.shape != b.shape:
        a, b = grid_a.values[:, None], grid_b.values[:, None]
    labels = grid_a.labels[0]
    n_layers = grid_a.extras.get("n_layers") or sum(str(x).startswith("resid_pre")
                                                     for x in labels)
    for i, label in enumerate(labels):
        if not (a[i] - b[i]).abs().max() <= atol:   # NaN differs
            return producing_layer(label, n_layers)
    return None
