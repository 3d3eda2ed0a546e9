"""Direct logit attribution and the logit lens of the logit difference (answer - foil).

Both read each prompt's final position of a right-padded batch. Each model is measured on its
own run: DLA divides every component by the final LayerNorm scale of the same model's run (the
seed analysis used the RLHF model's scale for both models; that is the bug not to repeat), and
the lens applies the final LayerNorm to each accumulated residual with that residual's own
scale, so models sharing their first blocks give bit-identical lens values for those layers.
Values are means over prompts; `extras["per_prompt"]` keeps [entry, batch].
"""

from __future__ import annotations

import re

import torch
from jaxtyping import Float
from torch import Tensor

from harness.errors import MeasureError, did_you_mean
from harness.measure import gpt2_forward as fw
from harness.measure.gpt2_forward import FoldedGPT2
from harness.measure.results import Grid
from harness.prompts import PromptBatch

DLA_BY = ("component", "head", "layer")


def _slices(bridge, batch: PromptBatch, engine=None, key: str | None = None):
    """The model's weights and its clean traces in prompt slices that fit the memory budget,
    shared with a PatchingEngine's cache when one is given."""
    from harness.measure.patching import PatchingEngine, Run

    engine = engine if engine is not None else PatchingEngine()
    run = Run(key or "model", bridge, batch.tokens, batch.final_pos)
    return engine.model(run), ((rows, sub, acts) for rows, (sub,), (acts,) in engine.slices(run))


def _at_final(acts: Tensor, final_pos: Tensor) -> Float[Tensor, "batch ..."]:
    """[batch, pos, ...] -> [batch, ...] at each prompt's final position."""
    return acts[torch.arange(acts.shape[0], device=acts.device), final_pos.to(acts.device)]


def dla(bridge, batch: PromptBatch, by: str = "component", *, engine=None,
        key: str | None = None) -> Grid:
    """Direct logit attribution of the logit diff; the entries sum to the model's logit diff.

    by="component": embed, pos_embed, attn0, mlp0, ..., bias (the unembedding bias).
    by="head": L0H0, ..., then "rest" (embeddings, attention output biases, MLPs, unembed bias).
    by="layer": "embed" (token + position), 0 .. n_layers-1 (attention + MLP), "bias".
    """
    if by not in DLA_BY:
        raise MeasureError(f"unknown dla by={by!r}" + did_you_mean(by, DLA_BY))
    model, slices = _slices(bridge, batch, engine, key)
    per_prompt, scale = [], []
    with torch.no_grad():
        for rows, run, acts in slices:
            labels, parts = _components(model, acts, run.tokens, run.final_pos, by)
            direction, bias = model.logit_diff_direction(batch.answer_ids[rows],
                                                         batch.foil_ids[rows])
            scale.append(_ln_scale(_at_final(acts["final"], run.final_pos), model.eps))
            centered = parts - parts.mean(-1, keepdim=True)  # the final LayerNorm is linear
            rows_dla = (centered * direction).sum(-1) / scale[-1]  # given its scale: [comp, B]
            if by == "head":
                rows_dla[-1] += bias
            else:
                rows_dla = torch.cat([rows_dla, bias[None]])
            per_prompt.append(rows_dla.cpu())
    per_prompt = torch.cat(per_prompt, -1)
    return Grid(axes=("component",), labels=(tuple(labels),), values=per_prompt.mean(-1),
                extras={"per_prompt": per_prompt, "final_ln_scale": torch.cat(scale).cpu(),
                        "logit_diff": per_prompt.sum(0), "by": by})


def _components(model: FoldedGPT2, acts, tokens: Tensor, final_pos: Tensor, by: str
                ) -> tuple[list, Float[Tensor, "component batch d_model"]]:
    """Residual-stream pieces at the final position (bias handled by the caller)."""
    fp = final_pos.to(model.device)
    tokens = tokens.to(model.device)
    embed = model.W_E[_at_final(tokens, fp)]
    pos_embed = model.W_pos[fp]
    rows = torch.arange(tokens.shape[0], device=model.device)
    attn, mlp = acts["attn_out"][:, rows, fp], acts["mlp_out"][:, rows, fp]  # [L, B, d]
    n_layers = model.n_layers
    if by == "component":
        labels = ["embed", "pos_embed"]
        pieces = [embed, pos_embed]
        for layer in range(n_layers):
            labels += [f"attn{layer}", f"mlp{layer}"]
            pieces += [attn[layer], mlp[layer]]
        return labels + ["bias"], torch.stack(pieces)
    if by == "layer":
        layers = attn + mlp
        return (["embed", *range(n_layers), "bias"],
                torch.cat([(embed + pos_embed)[None], layers]))
    z = acts["z"][:, rows, fp]  # [L, B, H, dh]
    w_o = model.W_O.unflatten(1, (model.n_heads, model.d_head))  # [L, H, dh, d]
    heads = torch.einsum("lbhe,lhed->lhbd", z, w_o).flatten(0, 1)
    rest = embed + pos_embed + model.b_O.sum(0) + mlp.sum(0)
    labels = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(model.n_heads)]
    return labels + ["rest"], torch.cat([heads, rest[None]])


def _ln_scale(resid: Float[Tensor, "batch d_model"], eps: float) -> Float[Tensor, " batch"]:
    centered = resid - resid.mean(-1, keepdim=True)
    return (centered.pow(2).mean(-1) + eps).sqrt()


def logit_lens(bridge, batch: PromptBatch, incl_mid: bool = False, *, engine=None,
               key: str | None = None) -> Grid:
    """Logit diff read from the accumulated residual stream before each layer, and at the end.

    Labels: resid_pre0, [resid_mid0,] resid_pre1, ..., final (the residual after the last
    block). Each entry gets the final LayerNorm with its own scale, then the unembedding.
    """
    model, slices = _slices(bridge, batch, engine, key)
    sites = ("resid_pre", "resid_mid") if incl_mid else ("resid_pre",)
    entries = [(site, layer) for layer in range(model.n_layers) for site in sites]
    labels = [f"{site}{layer}" for site, layer in entries] + ["final"]
    per_prompt = []
    with torch.no_grad():
        for rows, run, acts in slices:
            stack = [acts[site][layer] for site, layer in entries] + [acts["final"]]
            resid = torch.stack([_at_final(s, run.final_pos) for s in stack])  # [entry, B, d]
            direction, bias = model.logit_diff_direction(batch.answer_ids[rows],
                                                         batch.foil_ids[rows])
            per_prompt.append(fw.read_logit_diff(model, resid, direction, bias).cpu())
    per_prompt = torch.cat(per_prompt, -1)
    return Grid(axes=("layer",), labels=(tuple(labels),), values=per_prompt.mean(-1),
                extras={"per_prompt": per_prompt, "n_layers": model.n_layers})


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
    text = str(label)
    for pattern, offset in ((r"resid_pre(\d+)", -1), (r"resid_mid(\d+)", 0),
                            (r"resid_post(\d+)", 0), (r"(?:attn|mlp)(\d+)", 0),
                            (r"L(\d+)H\d+", 0)):
        m = re.fullmatch(pattern, text)
        if m:
            return int(m.group(1)) + offset
    if text == "final":
        return n_layers - 1
    if text in ("embed", "pos_embed"):
        return -1
    if isinstance(label, int):
        return label
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
        if (a[i] - b[i]).abs().max() > atol:
            return producing_layer(label, n_layers)
    return None
