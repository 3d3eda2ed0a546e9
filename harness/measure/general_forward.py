"""The general path: patching through the bridge's own hooks, for any architecture it loads.

Clean traces are one `run_with_cache` over the site table's hooks. Patched variants are stacked
along the batch (variant-major: row = variant * batch + prompt) and run in one hooked forward
per chunk; each hooked layer replaces the activations its variants select. The forward stops at
the final norm's input (the rest of the model never runs), and the metric reads two unembedding
columns through the model's own final norm (`Readout`), so no full-vocabulary logits are made.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness import progress
from harness.errors import MeasureError
from harness.measure.forward import Acts, Dims
from harness.measure.readout import Readout
from harness.sites import SITE_TABLE, sites_for

FINAL_HOOK = "ln_final.hook_in"


class _Stop(Exception):
    """Raised by the hook that captures the final residual: nothing after it needs to run."""


class GeneralForward:
    """Forward passes of one bridge through its hooks (see `harness.measure.forward`)."""

    path = "general"

    def __init__(self, bridge):
        self.bridge = bridge
        self.readout = Readout.from_bridge(bridge)
        self.dims = _probe_dims(bridge)
        self._final_hook = FINAL_HOOK if FINAL_HOOK in bridge.hook_dict else \
            f"blocks.{self.dims.n_layers - 1}.hook_resid_post"

    # ---- clean runs -------------------------------------------------------------------------
    def _site_hooks(self) -> dict[str, list[str]]:
        return {s: [SITE_TABLE[s].hook_name(layer) for layer in range(self.dims.n_layers)]
                for s in self.dims.sites}

    def trace(self, tokens: Int[Tensor, "batch pos"]) -> Acts:
        """Every site of every layer, stacked: site -> [layer, batch, ...]; plus "final" (the
        residual entering the final norm) and, where the model has one, "pos_embed"."""
        hooks = self._site_hooks()
        extra = {"final": self._final_hook, "pos_embed": "hook_pos_embed"}
        wanted = {n for names in hooks.values() for n in names}
        wanted |= {h for h in extra.values() if h in self.bridge.hook_dict}
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(tokens.to(self.dims.device),
                                                  names_filter=lambda n: n in wanted)
        acts = {s: torch.stack([cache[n] for n in names]) for s, names in hooks.items()}
        for key, name in extra.items():
            if name in cache.cache_dict:  # rotary models have no position embedding to fire
                acts[key] = cache[name]
        del cache
        return acts

    def trace_nbytes(self, batch: int, n_pos: int) -> int:
        d = self.dims
        per_row = 0
        for s in d.sites:
            axes = SITE_TABLE[s].axes
            sizes = {"pos": 1, "dest": 1, "src": n_pos, "d_model": d.d_model, "neuron": d.d_mlp,
                     "d_head": d.d_head, "head": d.heads_of(s)}
            size = 1
            for axis in axes:
                size *= sizes[axis]
            per_row += size * d.n_layers
        per_row += 2 * d.d_model  # final, pos_embed
        return per_row * batch * n_pos * d.element_size

    def read_clean(self, acts: Acts, final_pos: Tensor, answer_ids: Tensor, foil_ids: Tensor
                   ) -> Float[Tensor, " batch"]:
        with torch.no_grad():
            return self.readout.logit_diff(_final_rows(acts["final"], final_pos),
                                           answer_ids.to(self.dims.device),
                                           foil_ids.to(self.dims.device))

    def verify(self, tokens: Tensor, acts: Acts) -> None:
        """The readout must reproduce the bridge's final-position logits (checked once)."""
        with torch.no_grad():
            logits = self.bridge(tokens.to(self.dims.device), return_type="logits")[:, -1]
        self.readout = self.readout.check(acts["final"][: len(tokens), -1], logits)

    def head_weights(self) -> tuple[Float[Tensor, "layer head d_head d_model"],
                                    Float[Tensor, "layer d_model"]]:
        """W_O per head and the attention output bias (zeros on bias-free models)."""
        W_O = self.bridge.W_O.detach()
        try:
            b_O = self.bridge.b_O.detach()
        except AttributeError:
            b_O = W_O.new_zeros(W_O.shape[0], W_O.shape[-1])
        return W_O, b_O

    # ---- patched runs -----------------------------------------------------------------------
    def _final(self, tokens: Tensor, final_pos: Tensor, fwd_hooks) -> Float[Tensor, "n d_model"]:
        """Final residual rows of a hooked forward, stopping before the final norm."""
        got: dict[str, Tensor] = {}
        rows = torch.arange(tokens.shape[0], device=self.dims.device)
        fp = final_pos.to(self.dims.device)

        def grab(act, hook):
            got["x"] = act[rows, fp]
            raise _Stop

        try:
            self.bridge.run_with_hooks(tokens.to(self.dims.device),
                                       fwd_hooks=[*fwd_hooks, (self._final_hook, grab)])
        except _Stop:
            pass
        if "x" not in got:
            raise MeasureError(f"the bridge never reached {self._final_hook}")
        return got["x"]

    def _metric(self, final: Tensor, answer_ids: Tensor, foil_ids: Tensor) -> Tensor:
        return self.readout.logit_diff(final, answer_ids.to(final.device),
                                       foil_ids.to(final.device))

    def rows_per_forward(self, n_pos: int, work_bytes: int) -> int:
        """Batch rows one hooked forward may hold within `work_bytes` (a generous estimate)."""
        d = self.dims
        per_row = (8 * d.d_model + 3 * d.d_mlp + 4 * d.n_heads * n_pos
                   + 2 * (d.n_heads + 2 * d.n_kv_heads) * d.d_head)
        return max(1, work_bytes // (n_pos * per_row * max(4, d.element_size)))

    def run_variants(self, tokens: Tensor, final_pos: Tensor, into: Acts, source: Acts,
                     variants, answer_ids: Tensor, foil_ids: Tensor, work_bytes: int
                     ) -> Float[Tensor, "variant batch"]:
        """Patched logit diff of every single-layer variant, in chunks of stacked variants."""
        batch, n_pos = tokens.shape
        chunk = max(1, self.rows_per_forward(n_pos, work_bytes) // batch)
        out = torch.empty(len(variants), batch)
        done = progress.steps(len(variants))
        with torch.no_grad():
            for start in range(0, len(variants), chunk):
                part = variants.take(torch.arange(start, min(start + chunk, len(variants))))
                n = len(part)
                hooks = [h for layer in sorted(set(part.layers.tolist()))
                         for h in self._variant_hooks(part, layer, source, batch)]
                final = self._final(_repeat(tokens, n), _repeat(final_pos, n), hooks)
                diff = self._metric(final, _repeat(answer_ids, n), _repeat(foil_ids, n))
                out[start:start + n] = diff.reshape(n, batch).float().cpu()
                done(n)
        return out

    def _variant_hooks(self, part, layer: int, source: Acts, batch: int):
        """Hooks of one layer for stacked variants: rows of variants at other layers pass."""
        site = part.site
        at_layer = (part.layers == layer).to(self.dims.device)
        masks = part.masks.to(self.dims.device)
        masks = masks.expand(len(part), batch, *masks.shape[2:])
        masks = masks & at_layer.reshape(-1, *[1] * (masks.dim() - 1))
        masks = masks.flatten(0, 1)  # [variant * batch, *site dims]
        new = source[site][layer]

        def replace(act):
            src = new.to(act.device, act.dtype).repeat(len(part), *[1] * (act.dim() - 1))
            return torch.where(masks, src, act)

        return write_hooks(site, layer, replace)

    def patch_layers(self, tokens: Tensor, final_pos: Tensor, site: str,
                     masks: dict[int, Tensor], source: Acts, answer_ids: Tensor,
                     foil_ids: Tensor) -> Float[Tensor, " batch"]:
        """One patch that may span several layers: one hooked forward."""
        def hooks_for(layer: int):
            mask, new = masks[layer].to(self.dims.device), source[site][layer]
            return write_hooks(site, layer,
                               lambda act: torch.where(mask, new.to(act.device, act.dtype), act))

        with torch.no_grad():
            final = self._final(tokens, final_pos, [h for layer in masks for h in hooks_for(layer)])
            return self._metric(final, answer_ids, foil_ids).float().cpu()

    def patch_layers_each(self, tokens: Tensor, final_pos: Tensor, site: str,
                          masks: list[dict[int, Tensor]], source: Acts, answer_ids: Tensor,
                          foil_ids: Tensor, work_bytes: int) -> Float[Tensor, "variant batch"]:
        """Patches that each span several layers (`patch_layers`'s masks, one dict per
        variant), stacked along the batch: one hooked forward per chunk of variants, a
        variant's rows passing every layer it leaves alone unchanged."""
        batch, n_pos = tokens.shape
        chunk = max(1, self.rows_per_forward(n_pos, work_bytes) // batch)
        out = torch.empty(len(masks), batch)
        done = progress.steps(len(masks))
        with torch.no_grad():
            for start in range(0, len(masks), chunk):
                part = masks[start:start + chunk]
                n = len(part)
                hooks = [h for layer in sorted({layer for m in part for layer in m})
                         for h in write_hooks(site, layer, _rows_replace(
                             _stacked(part, layer, batch, self.dims.device),
                             source[site][layer], n))]
                final = self._final(_repeat(tokens, n), _repeat(final_pos, n), hooks)
                diff = self._metric(final, _repeat(answer_ids, n), _repeat(foil_ids, n))
                out[start:start + n] = diff.reshape(n, batch).float().cpu()
                done(n)
        return out

    def site_gradients(self, tokens: Tensor, final_pos: Tensor, site: str, answer_ids: Tensor,
                       foil_ids: Tensor) -> Float[Tensor, "layer batch ..."]:
        """d (sum of logit diffs) / d activation at `site` of every layer, at the clean run."""
        shifts: list[Tensor] = []

        def shifted(act):
            shifts.append(torch.zeros_like(act, requires_grad=True))
            return act + shifts[-1]

        hooks = [h for layer in range(self.dims.n_layers)
                 for h in write_hooks(site, layer, shifted)]
        with torch.inference_mode(False), torch.enable_grad():
            final = self._final(tokens.clone(), final_pos.clone(), hooks)
            metric = self._metric(final, answer_ids.clone(), foil_ids.clone()).sum()
            grads = torch.autograd.grad(metric, shifts, allow_unused=True)
        return torch.stack([torch.zeros_like(s) if g is None else g.detach()
                            for s, g in zip(shifts, grads)])


def write_hooks(site: str, layer: int, replace) -> list[tuple[str, object]]:
    """Forward hooks that replace `site` of `layer` by `replace(activation)`.

    resid_mid is written through attn_out (resid_mid = resid_pre + attn_out): the bridge's
    hook_resid_mid on HF Llama-style layers is the MLP norm's input, so writing it would leave
    the residual stream that the MLP output is added to unpatched.
    """
    if site != "resid_mid":
        return [(SITE_TABLE[site].hook_name(layer), lambda act, hook: replace(act))]
    seen: dict[str, Tensor] = {}

    def keep_resid_pre(act, hook):
        seen["pre"] = act
        return act

    def write_through_attn_out(act, hook):
        pre = seen["pre"]
        return replace(pre + act) - pre

    return [(SITE_TABLE["resid_pre"].hook_name(layer), keep_resid_pre),
            (SITE_TABLE["attn_out"].hook_name(layer), write_through_attn_out)]


def _stacked(part: list[dict[int, Tensor]], layer: int, batch: int, device
             ) -> Tensor:
    """The variants' masks of one layer as [variant * batch, *site dims] (False for a variant
    that does not patch the layer)."""
    some = next(m[layer] for m in part if layer in m)
    shape = (batch, *some.shape[1:])
    rows = [m[layer].to(device).expand(shape) if layer in m else
            torch.zeros(shape, dtype=torch.bool, device=device) for m in part]
    return torch.stack(rows).flatten(0, 1)


def _rows_replace(mask: Tensor, new: Tensor, n: int):
    def replace(act):
        src = new.to(act.device, act.dtype).repeat(n, *[1] * (act.dim() - 1))
        return torch.where(mask, src, act)
    return replace


def _repeat(t: Tensor, n: int) -> Tensor:
    """n copies of a batch, variant-major."""
    return t.repeat(n, *[1] * (t.dim() - 1))


def _final_rows(resid: Float[Tensor, "batch pos d_model"], final_pos: Tensor
                ) -> Float[Tensor, "batch d_model"]:
    return resid[torch.arange(resid.shape[0], device=resid.device), final_pos.to(resid.device)]


def _probe_dims(bridge) -> Dims:
    """Sizes and available sites, read from one 1-token forward (configs can be wrong: e.g.
    OPT's d_mlp), so the masks always match the hooks' real shapes."""
    cfg = bridge.cfg
    device = next(bridge.parameters()).device
    candidates = {s: SITE_TABLE[s].hook_name(0) for s in sites_for(cfg)}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=device),
                                         names_filter=lambda n: n in candidates.values())
    sites = tuple(s for s, hook in candidates.items() if hook in cache)
    d_head = cache[candidates["z"]].shape[-1] if "z" in sites else int(cfg.d_head)
    n_kv = cache[candidates["k"]].shape[-2] if "k" in sites else \
        int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    d_mlp = cache[candidates["mlp_post"]].shape[-1] if "mlp_post" in sites else 0
    dtype = next(bridge.parameters()).dtype
    return Dims(n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads), n_kv_heads=int(n_kv),
                d_model=int(cfg.d_model), d_head=int(d_head), d_mlp=int(d_mlp),
                n_ctx=int(cfg.n_ctx), sites=sites, device=device, dtype=dtype)
