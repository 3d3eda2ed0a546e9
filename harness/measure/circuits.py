"""Circuit measurements through the bridge's hooks: reference ablations (zero / mean /
resample), IOI-style path patching, and circuit faithfulness, minimality and completeness.

Components are attention heads (`L1H0`, their `attn.hook_z` output) and MLP layers (`mlp0`,
their `hook_mlp_out`). Variants (sender sets, ablation configurations) run along the batch:
the prompts are repeated once per variant and every hook selects per row, so one forward pass
measures many variants. Hook names come from `harness.sites` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from harness.errors import MeasureError
from harness.labels import Head, LabelError, LayerPart, format_label
from harness.labels import parse_component as parse_component_label
from harness.measure.general_forward import write_hooks
from harness.measure.logits import prompts_per_forward
from harness.measure.results import check_same_shape
from harness.progress import steps
from harness.sites import n_heads_of, parse_head, site

ABLATIONS = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Component:
    """An attention head (head set) or an MLP layer (head None)."""

    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return format_label(LayerPart("mlp", self.layer) if self.head is None
                            else Head(self.layer, self.head))


def parse_component(label: str, cfg=None) -> Component:
    """`L1H0` -> head 0 of layer 1; `mlp3` -> the MLP of layer 3 (checked against `cfg`)."""
    try:
        parsed = parse_component_label(label)
    except LabelError as exc:
        raise MeasureError(str(exc)) from None
    comp = Component(parsed.layer, parsed.head if isinstance(parsed, Head) else None)
    if cfg is not None:
        if not 0 <= comp.layer < cfg.n_layers:
            raise MeasureError(f"{label}: layer {comp.layer} is out of range (the model has "
                               f"{cfg.n_layers} layers)")
        if comp.head is not None and not 0 <= comp.head < cfg.n_heads:
            raise MeasureError(f"{label}: head {comp.head} is out of range (the model has "
                               f"{cfg.n_heads} heads per layer)")
        if comp.head is None and getattr(cfg, "attn_only", False):
            raise MeasureError(f"{label}: this model is attention-only; it has no MLP layers")
    return comp


def all_components(cfg, mlps: bool = True) -> list[Component]:
    heads = [Component(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    has_mlp = mlps and not getattr(cfg, "attn_only", False)
    return heads + ([Component(layer) for layer in range(cfg.n_layers)] if has_mlp else [])


def _z(layer: int) -> str:
    return site("z").hook_name(layer)


def _mlp(layer: int) -> str:
    return site("mlp_out").hook_name(layer)


def component_hooks(cfg) -> list[str]:
    names = [_z(layer) for layer in range(cfg.n_layers)]
    if not getattr(cfg, "attn_only", False):
        names += [_mlp(layer) for layer in range(cfg.n_layers)]
    return names


def _device(bridge):
    return next(bridge.parameters()).device


def cache(bridge, tokens: Int[Tensor, "batch pos"], names: Sequence[str]) -> dict[str, Tensor]:
    """The activations at `names` of one forward pass (on the CPU)."""
    wanted = set(names)
    with torch.inference_mode():
        _, acts = bridge.run_with_cache(tokens.to(_device(bridge)),
                                        names_filter=lambda n: n in wanted)
    return {n: acts[n].detach().float().cpu() for n in names}


def logit_diffs(bridge, tokens: Int[Tensor, "rows pos"], final_pos: Int[Tensor, " rows"],
                answer_ids: Int[Tensor, " rows"], foil_ids: Int[Tensor, " rows"], hooks=()
                ) -> Float[Tensor, " rows"]:
    """logit(answer) - logit(foil) at each row's final position, under forward hooks."""
    device = _device(bridge)
    with torch.inference_mode():
        logits = bridge.run_with_hooks(tokens.to(device), fwd_hooks=list(hooks),
                                       return_type="logits")
    rows = torch.arange(tokens.shape[0], device=logits.device)
    final = logits[rows, final_pos.to(logits.device)].float()
    return (final[rows, answer_ids.to(logits.device)]
            - final[rows, foil_ids.to(logits.device)]).cpu()


def _variant_chunks(bridge, n_variants: int, batch: int, n_pos: int, memory_budget_mb: float,
                   desc: str = "variants"):
    """Variants in chunks whose repeated prompts fit one forward pass of the budget, counted
    into the running claim's progress bar (`desc` names the unit)."""
    per = max(1, prompts_per_forward(bridge.cfg, n_pos, memory_budget_mb) // max(1, batch))
    done = steps(n_variants, desc)
    for start in range(0, n_variants, per):
        yield range(start, min(n_variants, start + per))
        done(min(n_variants, start + per) - start)


# ----------------------------------------------------------------------------- ablation values

def real_positions(tokens: Tensor, final_pos: Tensor) -> Bool[Tensor, "batch pos"]:
    return torch.arange(tokens.shape[1])[None, :] <= final_pos.cpu()[:, None]


def resample_draw(n_prompts: int, n_reference: int, seed: int) -> list[int]:
    """Which reference prompt replaces each prompt's activations: seeded, with replacement."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n_reference, (n_prompts,), generator=gen).tolist()


def ablation_values(bridge, kind: str, names: Sequence[str], tokens: Tensor, final_pos: Tensor,
                    ref_tokens: Tensor | None = None, ref_final_pos: Tensor | None = None,
                    draw: Sequence[int] | None = None) -> dict[str, Tensor]:
    """hook name -> the value that replaces the activation, broadcastable to [batch, pos, ...].

    zero: 0. mean: the mean over the reference prompts and their real positions. resample: the
    activations of reference prompt `draw[i]` for prompt i (equal token lengths needed).
    """
    if kind not in ABLATIONS:
        raise MeasureError(f"unknown ablation kind '{kind}'; use zero, mean or resample")
    if kind == "zero":
        acts = cache(bridge, tokens[:1], names)
        return {n: torch.zeros_like(a[:1, :1]) for n, a in acts.items()}
    if ref_tokens is None:
        raise MeasureError(f"`kind: {kind}` needs `reference:`, a prompt set to take the "
                           f"{'mean' if kind == 'mean' else 'resampled activations'} from")
    acts = cache(bridge, ref_tokens, names)
    if kind == "mean":
        real = real_positions(ref_tokens, ref_final_pos).float()
        out = {}
        for n, a in acts.items():
            w = real.reshape(*real.shape, *[1] * (a.dim() - 2))
            out[n] = ((a * w).sum((0, 1)) / w.sum((0, 1)))[None, None]
        return out
    if ref_tokens.shape[1] != tokens.shape[1]:
        raise MeasureError(f"resample ablation needs reference prompts of the same token length "
                           f"as the claim's prompts ({ref_tokens.shape[1]} vs {tokens.shape[1]} "
                           "tokens): write reference prompts with as many tokens, or use "
                           "`kind: mean`")
    index = torch.tensor(list(draw))
    return {n: a[index] for n, a in acts.items()}


# ----------------------------------------------------------------------------- circuits

def circuit_logit_diffs(bridge, tokens: Tensor, final_pos: Tensor, answer_ids: Tensor,
                        foil_ids: Tensor, kept: Sequence[set[Component]],
                        universe: Sequence[Component], values: dict[str, Tensor],
                        memory_budget_mb: float = 2048) -> Float[Tensor, "config batch"]:
    """Logit diff per configuration: components of `universe` not in `kept[c]` ablated."""
    cfg = bridge.cfg
    batch, n_pos = tokens.shape
    out = []
    for chunk in _variant_chunks(bridge, len(kept), batch, n_pos, memory_budget_mb,
                                 "circuit configurations"):
        keep_heads = torch.ones(len(chunk), cfg.n_layers, cfg.n_heads, dtype=torch.bool)
        keep_mlps = torch.ones(len(chunk), cfg.n_layers, dtype=torch.bool)
        for row, c in enumerate(chunk):
            for comp in universe:
                if comp not in kept[c]:
                    if comp.head is None:
                        keep_mlps[row, comp.layer] = False
                    else:
                        keep_heads[row, comp.layer, comp.head] = False
        hooks = _ablation_hooks(cfg, keep_heads, keep_mlps, values, batch)
        n = len(chunk)
        out.append(logit_diffs(bridge, tokens.repeat(n, 1), final_pos.repeat(n),
                               answer_ids.repeat(n), foil_ids.repeat(n), hooks).view(n, batch))
    return torch.cat(out)


def _ablation_hooks(cfg, keep_heads: Tensor, keep_mlps: Tensor, values: dict[str, Tensor],
                    batch: int) -> list:
    """Per-row replacement of ablated heads' z and MLP outputs; rows = variant x prompt."""
    hooks = []

    def rows(value: Tensor, act: Tensor) -> Tensor:
        """[1, 1, ...] broadcasts (zero, mean); [batch, pos, ...] (resample) repeats."""
        value = value.to(act.device, act.dtype)
        if value.shape[0] > 1:
            value = value.repeat(act.shape[0] // value.shape[0], *[1] * (value.dim() - 1))
        return value

    for layer in range(cfg.n_layers):
        z_name, mlp_name = _z(layer), _mlp(layer)
        if not keep_heads[:, layer].all():
            keep = keep_heads[:, layer].repeat_interleave(batch, 0)          # [rows, head]

            def hook_z(act, hook, keep=keep, name=z_name):
                mask = keep.to(act.device)[:, None, :, None]
                return torch.where(mask, act, rows(values[name], act))
            hooks.append((_z(layer), hook_z))
        if _mlp(layer) in values and not keep_mlps[:, layer].all():
            keep = keep_mlps[:, layer].repeat_interleave(batch, 0)

            def hook_mlp(act, hook, keep=keep, name=mlp_name):
                return torch.where(keep.to(act.device)[:, None, None], act,
                                   rows(values[name], act))
            hooks.append((_mlp(layer), hook_mlp))
    return hooks


@dataclass(frozen=True)
class CircuitScores:
    """Logit diffs per prompt of the configurations a circuit metric needs."""

    model: Float[Tensor, " batch"]         # nothing ablated
    ablated: Float[Tensor, " batch"]       # every component ablated
    circuit: Float[Tensor, " batch"]       # everything outside the circuit ablated
    without: Float[Tensor, "k batch"]        # circuit minus each member, then minus all
    model_without: Float[Tensor, "k batch"]  # full model minus each member, then the circuit

    def faithfulness(self) -> Float[Tensor, " batch"]:
        return (self.circuit - self.ablated) / (self.model - self.ablated)

    def minimality(self) -> Float[Tensor, " member"]:
        """Drop in (mean) faithfulness when each member is removed from the circuit."""
        scale = (self.model - self.ablated).mean()
        return (self.circuit.mean() - self.without[:-1].mean(-1)) / scale

    def completeness(self) -> Float[Tensor, " k"]:
        """IOI completeness per removed member K: |F(C \\ K) - F(M \\ K)| over F(M) - F(none),
        with the whole circuit as the last K (F(empty) vs F(M \\ C))."""
        scale = (self.model - self.ablated).mean()
        return (self.without.mean(-1) - self.model_without.mean(-1)).abs() / scale.abs()


def circuit_scores(bridge, tokens, final_pos, answer_ids, foil_ids, members: list[Component],
                   values: dict[str, Tensor], universe: list[Component],
                   memory_budget_mb: float = 2048) -> CircuitScores:
    """One batched pass over every configuration faithfulness, minimality and completeness
    need: model, all ablated, circuit, circuit minus each member, model minus each member,
    and (last) model minus the whole circuit / the empty set."""
    full, circuit = set(universe), set(members)
    kept = [full, set(), circuit]
    kept += [circuit - {m} for m in members] + [set()]
    kept += [full - {m} for m in members] + [full - circuit]
    diffs = circuit_logit_diffs(bridge, tokens, final_pos, answer_ids, foil_ids, kept, universe,
                                values, memory_budget_mb)
    n = len(members)
    return CircuitScores(model=diffs[0], ablated=diffs[1], circuit=diffs[2],
                         without=diffs[3:4 + n], model_without=diffs[4 + n:])


# ----------------------------------------------------------------------------- path patching

PATHS = ("q", "k", "v", "resid")


def path_patch(bridge, from_tokens: Tensor, into_tokens: Tensor, final_pos: Tensor,
               answer_ids: Tensor, foil_ids: Tensor, senders: Sequence[Sequence[Component]],
               path: str, receivers: Sequence[str] = (), memory_budget_mb: float = 2048
               ) -> Float[Tensor, "variant batch"]:
    """IOI-paper path patching: the into run's logit diff when sender set i (from the `from`
    run) reaches the output only through `path`.

    1. Forward the into tokens with every head's z and every MLP output frozen at its into
       value, except the senders, which take their `from` values; record the receivers'
       q/k/v input there (or, for path `resid`, read the logits: the final residual).
    2. Forward the into tokens again, normally, with only the receivers' q/k/v replaced by
       the recorded values. Receivers are head labels (`L1H0`; `L1KV0` for k and v).
    """
    cfg = bridge.cfg
    check_same_shape(from_tokens.shape, into_tokens.shape)
    targets = receiver_heads(cfg, path, receivers)
    names = component_hooks(cfg)
    source, frozen = cache(bridge, from_tokens, names), cache(bridge, into_tokens, names)
    batch, n_pos = into_tokens.shape
    out = []
    for chunk in _variant_chunks(bridge, len(senders), batch, n_pos, memory_budget_mb,
                                 "senders"):
        n = len(chunk)
        rows_tokens, rows_final = into_tokens.repeat(n, 1), final_pos.repeat(n)
        a, f = answer_ids.repeat(n), foil_ids.repeat(n)
        hooks = _frozen_hooks(cfg, [senders[c] for c in chunk], source, frozen, batch)
        recorded: dict[str, Tensor] = {}
        for layer in targets:
            name = site(path).hook_name(layer)

            def record(act, hook, name=name, recorded=recorded):
                recorded[name] = act.detach().clone()
                return act
            hooks.append((name, record))
        step1 = logit_diffs(bridge, rows_tokens, rows_final, a, f, hooks)
        if path == "resid":
            out.append(step1.view(n, batch))
            continue
        patch_hooks = []
        for layer, heads in targets.items():
            name = site(path).hook_name(layer)

            def patch(act, hook, name=name, heads=heads, recorded=recorded):
                act = act.clone()
                act[:, :, heads] = recorded[name][:, :, heads].to(act.device, act.dtype)
                return act
            patch_hooks.append((name, patch))
        out.append(logit_diffs(bridge, rows_tokens, rows_final, a, f, patch_hooks).view(n, batch))
    return torch.cat(out)


def receiver_heads(cfg, path: str, receivers: Sequence[str]) -> dict[int, list[int]]:
    """Receiver layer -> its heads of the `path` site (KV heads for k and v); checked."""
    if path not in PATHS:
        raise MeasureError(f"unknown path '{path}'; use one of {', '.join(PATHS)}")
    targets: dict[int, list[int]] = {}
    if path == "resid":
        return targets
    if not receivers:
        raise MeasureError(f"path '{path}' needs `receivers:` (heads whose {path} input "
                           "the senders' effect must pass through)")
    for label in receivers:
        try:
            layer, head = parse_head(label, path)
        except ValueError as exc:
            raise MeasureError(str(exc)) from None
        if not (0 <= layer < cfg.n_layers and 0 <= head < n_heads_of(path, cfg)):
            raise MeasureError(f"receiver {label} is not a head of this model")
        if head not in targets.setdefault(layer, []):
            targets[layer].append(head)
    return targets


def sender_masks(cfg, sender_sets: Sequence[Sequence[Component]]
                 ) -> tuple[Bool[Tensor, "variant layer head"], Bool[Tensor, "variant layer"]]:
    """Which heads and MLP layers each sender set holds."""
    heads = torch.zeros(len(sender_sets), cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    mlps = torch.zeros(len(sender_sets), cfg.n_layers, dtype=torch.bool)
    for i, senders in enumerate(sender_sets):
        for comp in senders:
            if comp.head is None:
                mlps[i, comp.layer] = True
            else:
                heads[i, comp.layer, comp.head] = True
    return heads, mlps


def _frozen_hooks(cfg, sender_sets, source: dict, frozen: dict, batch: int) -> list:
    """Hooks setting every z / MLP output to its into value, senders (per row) to `from`."""
    n = len(sender_sets)
    heads, mlps = sender_masks(cfg, sender_sets)
    hooks = []
    for name in frozen:
        layer = int(name.split(".")[1])
        is_z = name == _z(layer)
        pick = (heads[:, layer] if is_z else mlps[:, layer]).repeat_interleave(batch, 0)

        def hook(act, hook, name=name, pick=pick, is_z=is_z):
            src = source[name].to(act.device, act.dtype).repeat(n, *[1] * (act.dim() - 1))
            into = frozen[name].to(act.device, act.dtype).repeat(n, *[1] * (act.dim() - 1))
            mask = pick.to(act.device)[:, None, :, None] if is_z else \
                pick.to(act.device)[:, None, None]
            return torch.where(mask, src, into)
        hooks.append((name, hook))
    return hooks


# ----------------------------------------------------------------------------- site ablations

def site_replacement_hooks(cfg, site_name: str, values: dict[str, Tensor],
                           final_pos: Int[Tensor, " batch"], *, heads=None, positions=None,
                           neurons=None) -> list:
    """Hooks replacing a selection of `site` (per layer in `values`) with those values.

    heads: (layer, head) pairs (KV heads for k and v); positions: token columns, negative ones
    counted back from each prompt's final token; neurons: for mlp_post.
    """
    spec = site(site_name)
    if spec.axes[0] != "pos":
        raise MeasureError(f"mean and resample ablation with reference prompts work on sites "
                           f"with a position axis first, not '{site_name}'")
    hooks = []
    for name, value in values.items():
        layer = int(name.split(".")[1])

        def hook(act, hook, value=value, layer=layer):
            mask = torch.ones(act.shape, dtype=torch.bool)
            if positions is not None:
                cols = torch.zeros(act.shape[:2], dtype=torch.bool)
                for p in positions:
                    col = final_pos.cpu() + 1 + int(p) if p < 0 else torch.full(
                        (act.shape[0],), int(p))
                    cols[torch.arange(act.shape[0]), col.clamp(0, act.shape[1] - 1)] = True
                mask &= cols.reshape(*cols.shape, *[1] * (act.dim() - 2))
            if heads is not None:
                picked = torch.zeros(n_heads_of(site_name, cfg), dtype=torch.bool)
                picked[[h for lay, h in heads if lay == layer]] = True
                mask &= picked.reshape(-1, 1)      # axes (pos, head, d_head)
            if neurons is not None:
                picked = torch.zeros(act.shape[-1], dtype=torch.bool)
                picked[list(neurons)] = True
                mask &= picked
            new = value.to(act.device, act.dtype)
            return torch.where(mask.to(act.device), new.expand_as(act), act)
        hooks += write_hooks(site_name, layer, lambda act, hook=hook: hook(act, None))
    return hooks
