"""`neuron`: MLP neuron activations, the MLP's hidden activation (after its nonlinearity, the
input of its output projection: site `mlp_post`) at a position rule. One `layer` and
`neuron`: a value per prompt (their mean is the claim's); else a `[layer, neuron]` grid of
the means over prompts."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from harness.expect import GRID, SCALAR, Measurement
from harness.kinds.base import (
    Index,
    MeasureContext,
    SingleModelClaim,
    chance_measurement,
    measurement,
    model_sizes,
)
from harness.kinds.fields import Position
from harness.kinds.measuring import check_indices, random_selections, scalar_over_prompts
from harness.measure.results import Grid, PromptParts

SITE = "mlp_post"


class NeuronClaim(SingleModelClaim):
    """`layer` + `neuron`: one neuron's activation; `layers` / `neurons` (default: all): a grid."""

    measure: Literal["neuron"]
    CI_WHEN = ("single-neuron ", "")
    FREEZE = "grid|scalar"
    VALUE_KIND = GRID        # SCALAR with `layer` and `neuron`
    REPORT_EXTRAS = ("prompts", "stats")
    RESAMPLES_PROMPTS = True
    AGAINST = "neuron (single)"
    layer: int | None = None
    neuron: int | None = None
    layers: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    position: Position = "final"
    reduce: Literal["max", "mean"] = "max"   # joins several positions of one prompt

    @model_validator(mode="after")
    def _one_neuron_or_a_grid(self):
        if (self.layer is None) != (self.neuron is None):
            raise ValueError("give both `layer` and `neuron` (one neuron: a value), or neither "
                             "(a grid over `layers` and `neurons`)")
        if self.layer is not None and (self.layers or self.neurons):
            raise ValueError("give `layer` + `neuron` (a value) or `layers` / `neurons` "
                             "(a grid), not both")
        return self

    @property
    def single(self) -> bool:
        return self.layer is not None

    def value_kind(self) -> str:
        return SCALAR if self.single else GRID

    def has_intervals(self) -> bool:
        return self.single

    def reads_answers(self) -> bool:
        return False

    def accepts_against(self) -> bool:
        return self.single

    def chance_pool(self, sizes: dict):
        from harness.chance import Pool

        return Pool({self.layer: (self.neuron,)}, {self.layer: tuple(range(sizes["d_mlp"]))})

    def indices(self) -> list[Index]:
        if self.single:
            return [Index(("layer",), "layer", self.layer),
                    Index(("neuron",), "neuron", self.neuron)]
        return [Index(("layers", i), "layer", v) for i, v in enumerate(self.layers or ())] + \
            [Index(("neurons", i), "neuron", v) for i, v in enumerate(self.neurons or ())]

    def sites(self) -> list[tuple[tuple, str]]:
        return [(("measure",), SITE)]


def neuron_activations(bridge, batch, layers: list[int], neurons: list[int] | None,
                       where, reduce: str, memory_budget_mb: float):
    """[prompt, layer, neuron] activations at the hook `mlp_post`, joined over the positions
    `where` marks ([prompt, pos]) by `reduce`; prompts in slices that fit the budget."""
    import torch

    from harness.measure.features import reduce_positions
    from harness.measure.logits import prompts_per_forward
    from harness.sites import site

    hooks = [site(SITE).hook_name(layer) for layer in layers]
    device = next(bridge.parameters()).device
    step = prompts_per_forward(bridge.cfg, batch.tokens.shape[1], memory_budget_mb)
    parts = []
    with torch.inference_mode():
        for start in range(0, batch.tokens.shape[0], step):
            rows = slice(start, start + step)
            _, cache = bridge.run_with_cache(batch.tokens[rows].to(device),
                                             names_filter=lambda name: name in hooks)
            per_layer = []
            for hook in hooks:
                acts = cache[hook].float().cpu()                # [prompt, pos, d_mlp]
                if neurons is not None:
                    acts = acts[..., list(neurons)]
                per_layer.append(reduce_positions(acts, where[rows], reduce))
            parts.append(torch.stack(per_layer, 1))
            del cache
    return torch.cat(parts)


@measurement("neuron")
def _neuron(ctx: MeasureContext) -> Measurement:
    from harness.measure.features import select_positions

    claim = ctx.claim
    model = ctx.model(claim.model)
    check_indices(claim, model, claim.model)
    batch = ctx.batch(model)
    cfg = model.bridge.cfg
    layers = [claim.layer] if claim.single else list(claim.layers or range(cfg.n_layers))
    neurons = [claim.neuron] if claim.single else (list(claim.neurons) if claim.neurons
                                                   else None)
    where = select_positions(batch, ctx.prepend_bos, claim.position, model.tokenizer)
    acts = neuron_activations(model.bridge, batch, layers, neurons, where, claim.reduce,
                              ctx.session.memory_budget_mb)
    if claim.single:
        return scalar_over_prompts(ctx, acts[:, 0, 0], batch.texts)
    labels = (tuple(layers), tuple(neurons or range(acts.shape[-1])))
    return Measurement(GRID, Grid(("layer", "neuron"), labels, acts.mean(0)),
                       extras={"prompts": batch.texts}, parts=PromptParts({"value": acts}))


@chance_measurement("neuron")
def _neuron_chance(ctx: MeasureContext, n: int, seed: int) -> list[float]:
    """Random neurons of the same layer: one forward reads every neuron of it."""
    from harness.measure.features import select_positions

    claim = ctx.claim
    model = ctx.model(claim.model)
    batch = ctx.batch(model)
    selections = random_selections(ctx, model_sizes(model.bridge.cfg), n, seed)
    where = select_positions(batch, ctx.prepend_bos, claim.position, model.tokenizer)
    acts = neuron_activations(model.bridge, batch, [claim.layer], None, where, claim.reduce,
                              ctx.session.memory_budget_mb)[:, 0].mean(0)     # [d_mlp]
    return [float(acts[neuron]) for (neuron,) in selections]
