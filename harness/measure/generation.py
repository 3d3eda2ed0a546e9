"""Text generation for `generate` claims: batched over prompts and samples, with a KV cache,
through Hugging Face `generate` on the model's plain HF copy (inside the bridge the KV-cache path
gives wrong logits in TransformerLens 4.3, so the bridge is used for the token-loop reference).

Each row has its own seed, so a sample's text does not depend on which rows share its batch.
Generation while patching: at every step a `from` model runs on the same tokens (with its own
KV cache) and its activations replace the chosen ones of the generating model; patched activations
at earlier steps live on in the cache, exactly as when the whole sequence is rerun. Causal
tracing (`Patch.from_prompts`: the same model's clean prompt into its corrupt one) patches the
prompt positions only, from one run of the `from` model on its own prompt. Sites are
read and written through forward hooks on the HF modules that `hf_sites` locates from the
bridge and verifies against its hooks, on every architecture the bridge loads; `pattern`, and any
site a model fails that check for, run on the token loop instead.
`generate_uncached` is the token-by-token reference (one full forward per token) the tests and the
benchmark compare against.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from harness import progress
from harness.measure.hf_sites import attach, shift, site_map
from harness.sites import SITE_TABLE


@dataclass(frozen=True)
class Patch:
    """What generation while patching copies from `from_model` (a LoadedModel). `positions`
    index the prompt (negative ones count from its end) and stay fixed while tokens are added;
    without `positions` every position is patched, generated ones included.

    `from_prompts` (one per generated row, each as long as that row's prompt): the `from`
    model runs on these tokens instead (causal tracing: the clean prompt into the corrupt
    one, same model). Only prompt positions are patched then; generated positions, which
    have no counterpart in that run, are left to the generating model."""

    from_model: object
    site: str
    layers: tuple[int, ...] | None = None
    heads: tuple[tuple[int, int], ...] | None = None
    neurons: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    from_prompts: tuple[Tensor, ...] | None = None

    def rows(self, rows: Sequence[int]) -> Patch:
        """The patch for these rows of the generated batch (their own `from_prompts`)."""
        if self.from_prompts is None:
            return self
        return replace(self, from_prompts=tuple(self.from_prompts[r] for r in rows))

    def layer_heads(self) -> dict[int, list[int] | None]:
        """Layer -> heads patched there (None: the whole activation)."""
        by_layer: dict[int, list[int] | None] = {}
        for layer, head in self.heads or ():
            by_layer.setdefault(layer, []).append(head)
        for layer in self.layers or ():
            by_layer.setdefault(layer, None)
        return by_layer

    def select(self, activation: Tensor, heads, prompt_len: int, first: int) -> tuple | None:
        """The index of the patched part of an activation (bridge layout) whose positions are
        `first`, `first + 1`, ...; None when none of them is patched."""
        entry = SITE_TABLE[self.site]
        pos_dim = 1 + entry.pos_axis  # after the batch axis
        index: list = [slice(None)] * activation.ndim
        if heads is not None:
            index[1 + entry.head_axis] = heads
        if self.neurons is not None:
            index[-1] = list(self.neurons)
        positions = self.positions
        if positions is None and self.from_prompts is not None:
            positions = range(prompt_len)     # the prompt only: see the class docstring
        if positions is not None:
            n = activation.shape[pos_dim]
            wanted = sorted({p % prompt_len for p in positions})
            index[pos_dim] = [p - first for p in wanted if first <= p < first + n]
            if not index[pos_dim]:
                return None
        return _outer(index, activation.device)


def _outer(index: list, device) -> tuple:
    """Lists on several axes (positions and heads, positions and neurons) select their outer
    product, as the spec means, not the pairs that plain advanced indexing would zip."""
    lists = [i for i, item in enumerate(index) if isinstance(item, list)]
    for k, axis in enumerate(lists):
        shape = [-1] + [1] * (len(lists) - k - 1)
        index[axis] = torch.tensor(index[axis], device=device).reshape(shape)
    return tuple(index)


def patch_hooks(from_model, site: str, layers=None, heads=None, neurons=None,
                positions=None, from_prompts=None) -> Patch:
    """A `Patch` from a spec's selection."""
    return Patch(from_model, site, tuple(layers) if layers else None,
                 tuple(map(tuple, heads)) if heads else None,
                 tuple(neurons) if neurons else None, tuple(positions) if positions else None,
                 tuple(from_prompts) if from_prompts is not None else None)


# ----------------------------------------------------------------------------- cached, batched

def generate_texts(model, prompts: Sequence[Int[Tensor, " pos"]], seeds: Sequence[int],
                   max_new_tokens: int, temperature: float = 0.0, patch: Patch | None = None,
                   memory_budget_mb: float = 2048) -> list[str]:
    """One continuation per (prompt, seed) row of a LoadedModel: greedy at temperature 0, else
    sampled with the row's own seed. Returns prompt + continuation texts without special
    tokens, in row order.

    Rows of equal prompt length are generated together (no padding, so no position or mask
    subtleties), in chunks whose activations fit the memory budget. Patch sites without a
    verified HF location in either model (`hf_sites.site_map`: `pattern`, or a failed check)
    models without an HF copy and prompts that would outgrow the context use the token loop."""
    from harness.measure.logits import prompts_per_forward

    if patch is not None and patch.from_model is model and patch.from_prompts is None:
        patch = None      # a model patched with itself is itself
    if patch is not None and patch.from_prompts is not None and (
            len(patch.from_prompts) != len(prompts)
            or any(len(a) != len(b) for a, b in zip(patch.from_prompts, prompts))):
        raise ValueError("from_prompts must pair one to one with the prompts, of equal lengths")
    cfg = model.bridge.cfg
    texts: list[str | None] = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for row, tokens in enumerate(prompts):
        groups.setdefault(len(tokens), []).append(row)
    cached = model.plain_hf() is not None and (
        patch is None or (site_map(model, patch.site) is not None
                          and site_map(patch.from_model, patch.site) is not None))
    done = progress.steps(len(prompts), "samples")
    for length, rows in groups.items():
        if not cached or length + max_new_tokens > cfg.n_ctx:
            for row in rows:
                texts[row] = generate_uncached(model, prompts[row], max_new_tokens, temperature,
                                               seeds[row], patch and patch.rows([row]))
                done(1)
            continue
        per_chunk = prompts_per_forward(cfg, length + max_new_tokens, memory_budget_mb)
        if patch is not None:
            per_chunk = max(1, per_chunk // 2)
        for i in range(0, len(rows), per_chunk):
            chunk = rows[i: i + per_chunk]
            tokens = torch.stack([prompts[r] for r in chunk])
            ids = _generate_rows(model, tokens, [seeds[r] for r in chunk], max_new_tokens,
                                 temperature, patch and patch.rows(chunk))
            for r, row_ids in zip(chunk, ids):
                texts[r] = model.tokenizer.decode(row_ids.tolist(), skip_special_tokens=True)
            done(len(chunk))
    return texts


def _generate_rows(model, tokens: Int[Tensor, "rows pos"], seeds: list[int],
                   max_new_tokens: int, temperature: float, patch: Patch | None
                   ) -> Int[Tensor, "rows total"]:
    from transformers import GenerationConfig, LogitsProcessorList

    hf = model.plain_hf()
    eos = model.tokenizer.eos_token_id
    pad = model.tokenizer.pad_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=eos if pad is None else pad)
    processors = LogitsProcessorList([SeededSampler(seeds, temperature)] if temperature > 0
                                     else [])
    tokens = tokens.to(next(hf.parameters()).device)
    with torch.inference_mode(), _patching(model, patch, tokens.shape[1]):
        return hf.generate(tokens, attention_mask=torch.ones_like(tokens),
                           generation_config=config, logits_processor=processors).cpu()


class SeededSampler:
    """A logits processor that samples each row with its own generator (so a sample depends
    on its seed alone) and leaves only the chosen token: greedy decoding then picks it."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Float[Tensor, "rows vocab"]) -> Tensor:
        probs = (scores.float().cpu() / self.temperature).softmax(-1)
        chosen = [int(torch.multinomial(p, 1, generator=g)) for p, g in
                  zip(probs, self.generators)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), torch.tensor(chosen, device=scores.device)] = 0.0
        return out


@contextmanager
def _patching(model, patch: Patch | None, prompt_len: int):
    """While active, every forward of the model's HF copy first runs `patch.from_model`'s on
    the same new tokens (continuing its own KV cache) and then patches its activations in,
    through the verified site maps of both models (`hf_sites`). With `from_prompts` the
    `from` model runs once, on those prompts, and only the prompt pass is patched."""
    if patch is None:
        yield
        return
    hf, source = model.plain_hf(), patch.from_model.plain_hf()
    into, take = site_map(model, patch.site), site_map(patch.from_model, patch.site)
    state: dict = {"cache": None, "start": 0, "next": 0, "acts": {}}
    # transformers 5.x renames `past_key_values` to `cache`
    cache_arg = "cache" if "cache" in inspect.signature(source.forward).parameters \
        else "past_key_values"

    def capture(layer):
        def keep(view):
            state["acts"][layer] = view.clone()
        return keep

    def run_source(module, args, kwargs):
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        if patch.from_prompts is not None:   # ran on its own prompts before generation
            state["start"], state["next"] = state["next"], state["next"] + ids.shape[1]
            return
        out = source(input_ids=ids, use_cache=True, **{cache_arg: state["cache"]})
        cache = getattr(out, "cache", None)
        state["cache"] = cache if cache is not None else out.past_key_values
        state["start"], state["next"] = state["next"], state["next"] + ids.shape[1]

    def write(layer, heads):
        offset = shift(take, into, layer)   # as the bridges see them: folded biases differ

        def replace(view):
            index = patch.select(view, heads, prompt_len, state["start"])
            if index is None:
                return
            patched = state["acts"][layer] if offset is None else state["acts"][layer] + offset
            view[index] = patched.to(view.dtype)[index]
        return replace

    layers = patch.layer_heads()
    handles = [h for layer in layers for h in attach(source, take, layer, capture(layer),
                                                       write=False)]
    if patch.from_prompts is not None:   # one run, before generation (`source` may be `hf`)
        try:
            with torch.inference_mode():
                source(input_ids=torch.stack(patch.from_prompts).to(
                    next(source.parameters()).device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        handles = []
    handles.append(hf.register_forward_pre_hook(run_source, with_kwargs=True))
    handles += [h for layer, heads in layers.items()
                for h in attach(hf, into, layer, write(layer, heads), write=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- reference loop

def generate_uncached(model, tokens: Int[Tensor, " pos"], max_new_tokens: int,
                      temperature: float = 0.0, seed: int = 0, patch: Patch | None = None,
                      hooks_for=None) -> str:
    """The reference: one full bridge forward per new token (no cache, one row), patching
    through the bridge's hook points by rerunning the `from` model on the whole sequence.
    `hooks_for(window)` adds bridge hooks at every step (SAE feature interventions)."""
    bridge, tokenizer = model.bridge, model.tokenizer
    if patch is not None and patch.from_prompts is not None and len(patch.from_prompts) != 1:
        raise ValueError("the token loop generates one row: pass patch.rows([row])")
    generator = torch.Generator().manual_seed(seed)
    ids = tokens.tolist()
    prompt_len = len(ids)
    device = next(bridge.parameters()).device
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-bridge.cfg.n_ctx:]], device=device)
            if patch is not None and patch.from_prompts is not None:   # its own prompt
                source = patch.from_prompts[0].tolist() + ids[prompt_len:]
                source_window = torch.tensor([source[-bridge.cfg.n_ctx:]], device=device)
            else:
                source_window = window
            hooks = [] if patch is None else \
                _bridge_hooks(patch, source_window, prompt_len, len(ids) - window.shape[1])
            if hooks_for is not None:
                hooks = hooks + list(hooks_for(window))
            logits = bridge.run_with_hooks(window, fwd_hooks=hooks, return_type="logits")
            logits = logits[0, -1].float().cpu()
            if temperature > 0:
                next_id = int(torch.multinomial((logits / temperature).softmax(-1), 1,
                                                generator=generator))
            else:
                next_id = int(logits.argmax())
            ids.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _bridge_hooks(patch: Patch, window: Tensor, prompt_len: int, start: int) -> list:
    """Hooks writing `patch.from_model`'s activations on `window` (the generating window, or
    the `from` prompt followed by the generated tokens: same length) into the selection."""
    from harness.measure.general_forward import write_hooks

    site = SITE_TABLE[patch.site]
    layers = patch.layer_heads()
    names = {site.hook_name(layer) for layer in layers}
    _, cache = patch.from_model.bridge.run_with_cache(window, names_filter=lambda n: n in names)

    def replace(name, heads):
        def patched(activation):
            index = patch.select(activation, heads, prompt_len, start)
            if index is None:
                return activation
            out = activation.clone()
            out[index] = cache[name].to(activation.dtype)[index]
            return out
        return patched
    return [hook for layer, heads in layers.items()
            for hook in write_hooks(patch.site, layer, replace(site.hook_name(layer), heads))]
