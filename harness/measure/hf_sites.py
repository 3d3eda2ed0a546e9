"""Where each activation site lives in a model's plain Hugging Face copy, so that cached
generation (HF `generate`) can read and write sites with forward hooks on every architecture.

One rule instead of a table per family: the bridge's hook for a site (`sites.py`) is an alias
of some bridge component's `hook_in` or `hook_out` (`blocks.3.attn.hook_z` is
`blocks.3.attn.o.hook_in`), and every bridge component names the HF module it wraps relative to
its parent's (`model.layers.3` > `self_attn` > `o_proj`, from the adapter's component mapping).
Following both gives the HF module and whether the site is its input or its output. Fused
projections (GPT-2's `c_attn`, NeoX's `query_key_value`, Phi-3's `qkv_proj`) have no module per
q, k, v: their output is split, in whichever layout (concatenated or interleaved per head)
reproduces the bridge. resid_mid is read as resid_pre + attn_out and written through attn_out's
output, so that it changes the residual stream and not only the MLP's input (as
`general_forward.write_hooks` does on the bridge). Not mapped, so left to the token loop:
`pattern` (HF attention modules do not hand out their probabilities under SDPA) and any site
whose bridge hook is no module boundary.

Nothing is trusted unchecked: `site_map` compares, once per model and site, the HF activation
at every layer with the bridge's hook value on the same tokens. They must agree up to a
constant offset — the bridge folds biases: its z and v lack b_V, moved into b_O — and, on
LayerNorm models, up to the mean over d_model (the bridge centers what is written to the
residual stream; no LayerNorm sees that mean). Offsets are kept and applied when one model's
activation is written into another; any other difference leaves the site unmapped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from jaxtyping import Int
from torch import Tensor

from harness.sites import SITE_TABLE, n_heads_of

LAYOUTS = ("concatenated", "interleaved")   # fused q/k/v output: [q | k | v], [head, 3, d_head]
UNMAPPED = ("pattern",)


@dataclass(frozen=True)
class Location:
    """The input or output of one HF module. `heads` splits the last axis into heads; `fused`
    = (layout, part, n_q, n_kv) picks q (0), k (1) or v (2) out of a fused projection."""

    path: str
    where: str                                    # "input" | "output"
    heads: int | None = None
    fused: tuple[str, int, int, int] | None = None


@dataclass(frozen=True)
class SiteMap:
    """A site of one model, verified against its bridge. Per layer: the block's path (its
    input is resid_pre and gives the batch shape), where the site is (resid_mid: attn_out's
    location) and the bridge's value minus the HF value (None: equal)."""

    site: str
    blocks: tuple[str, ...]
    where: tuple[Location, ...]
    offsets: tuple[Tensor | None, ...]


_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # plain HF model -> {site: map}


def site_map(model, site: str) -> SiteMap | None:
    """The verified map of `site` in a LoadedModel's plain HF copy, or None where the site
    cannot be reached there or does not reproduce the bridge (then only the bridge can)."""
    hf = model.plain_hf()
    if hf is None:              # no HF copy (TransformerLens-native checkpoints)
        return None
    known = _MAPS.setdefault(hf, {})
    if site not in known:
        try:
            known[site] = _build(model.bridge, hf, site)
        except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError):
            known[site] = None  # a layout this module does not know: the token loop is right
    return known[site]


def shift(source: SiteMap, target: SiteMap, layer: int) -> Tensor | None:
    """What to add to the source model's HF activation before writing it into the target's,
    so that both are compared as the bridge sees them."""
    a, b = source.offsets[layer], target.offsets[layer]
    if a is None and b is None:
        return None
    return (0 if a is None else a) - (0 if b is None else b)


# ----------------------------------------------------------------------------- hooks

def attach(hf, smap: SiteMap, layer: int, fn: Callable[[Tensor], None], write: bool) -> list:
    """Forward hooks that call `fn` on the site's activation at `layer` in the bridge's layout
    (HF values, a view). With `write`, `fn` may change it in place and the change replaces the
    activation in the model. Returns the handles."""
    seen: dict = {}
    block = hf.get_submodule(smap.blocks[layer])
    location = smap.where[layer]
    mid = smap.site == "resid_mid"

    def at_block(module, args, kwargs):
        hidden, _ = _first_input(args, kwargs)
        seen["pre"], seen["shape"] = hidden, hidden.shape[:2]

    def apply(tensor: Tensor) -> Tensor | None:
        work = seen["pre"] + tensor if mid else (tensor.clone() if write else tensor)
        fn(_view(work, location, seen["shape"]))
        if not write:
            return None
        return work - seen["pre"] if mid else work

    handles = [block.register_forward_pre_hook(at_block, with_kwargs=True)]
    module = hf.get_submodule(location.path)
    if location.where == "input":
        def pre(mod, args, kwargs):
            tensor, key = _first_input(args, kwargs)
            new = apply(tensor)
            if new is None:
                return None
            if key is None:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, key: new}
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    else:
        def post(mod, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            new = apply(tensor)
            if new is None:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        handles.append(module.register_forward_hook(post))
    return handles


def _first_input(args: tuple, kwargs: dict) -> tuple[Tensor, str | None]:
    """A module's main input and its keyword (None: passed by position)."""
    if args:
        return args[0], None
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return kwargs[key], key


def _view(tensor: Tensor, location: Location, shape) -> Tensor:
    """The activation in the bridge's layout ([batch, pos, ...]), sharing `tensor`'s storage.
    OPT runs its MLP on [batch * pos, d] rows: those are unflattened with the block's shape."""
    if tensor.ndim == 2:
        tensor = tensor.unflatten(0, tuple(shape))
    if location.fused is not None:
        layout, part, n_q, n_kv = location.fused
        d_head = tensor.shape[-1] // (n_q + 2 * n_kv)
        if layout == "interleaved":
            return tensor.unflatten(-1, (n_q, 3, d_head))[..., part, :]
        sizes = (n_q, n_kv, n_kv)
        tensor = tensor.narrow(-1, sum(sizes[:part]) * d_head, sizes[part] * d_head)
    if location.heads:
        tensor = tensor.unflatten(-1, (location.heads, -1))
    return tensor


# ----------------------------------------------------------------------------- locating

def _build(bridge, hf, site: str) -> SiteMap | None:
    if site in UNMAPPED:
        return None
    entry = SITE_TABLE[site]
    n_layers = int(bridge.cfg.n_layers)
    names = [entry.hook_name(layer) for layer in range(n_layers)]
    if any(name not in bridge.hook_dict for name in names):
        return None
    located = [_locate(bridge, hf, site, layer) for layer in range(n_layers)]
    if any(found is None for found in located):
        return None
    tokens = _probe_tokens(bridge, hf)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    expected = [cache[name] for name in names]
    centered = getattr(bridge.cfg, "normalization_type", None) in ("LN", "LNPre") \
        and entry.axes[-1] == "d_model"
    blocks = tuple(block for block, _ in located)
    for choice in range(len(located[0][1])):
        smap = SiteMap(site, blocks, tuple(c[choice] for _, c in located), (None,) * n_layers)
        got = read_all(hf, smap, tokens)
        offsets = [_offset(e, g, centered) for e, g in zip(expected, got)]
        if all(o is not False for o in offsets):
            return replace(smap, offsets=tuple(offsets))
    return None


def read_all(hf, smap: SiteMap, tokens: Int[Tensor, "batch pos"]) -> list[Tensor]:
    """The site's activation at every layer of one HF forward (bridge layout)."""
    got: dict[int, Tensor] = {}
    handles = [h for layer in range(len(smap.blocks))
               for h in attach(hf, smap, layer, lambda v, layer=layer: got.__setitem__(
                   layer, v.clone()), write=False)]
    try:
        with torch.inference_mode():
            hf(input_ids=tokens.to(next(hf.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [got[layer] for layer in range(len(smap.blocks))]


def _probe_tokens(bridge, hf) -> Int[Tensor, "2 pos"]:
    """Fixed pseudo-random tokens: two rows of up to 8 positions."""
    vocab = min(int(bridge.cfg.d_vocab), int(hf.config.vocab_size))
    n_pos = min(8, int(bridge.cfg.n_ctx))
    tokens = torch.randint(0, vocab, (2, n_pos), generator=torch.Generator().manual_seed(0))
    return tokens.to(next(bridge.parameters()).device)


def _offset(expected: Tensor, got: Tensor, centered: bool) -> Tensor | None | bool:
    """bridge - HF when it is the same at every row and position (None when ~0); False when
    the two differ otherwise."""
    if expected.shape != got.shape:
        return False
    e, g = expected.float(), got.float().to(expected.device)
    if centered:
        e, g = e - e.mean(-1, keepdim=True), g - g.mean(-1, keepdim=True)
    diff = e - g
    offset = diff.mean((0, 1))
    rtol = 1e-4 if expected.dtype == torch.float32 or expected.dtype == torch.float64 else 3e-2
    tol = rtol * float(e.abs().max()) + 1e-6
    if not float((diff - offset).abs().max()) <= tol:   # NaN never agrees
        return False
    return None if float(offset.abs().max()) <= tol else offset.to(expected.dtype)


def _locate(bridge, hf, site: str, layer: int) -> tuple[str, list[Location]] | None:
    """(block path, candidate locations) of `site` at `layer`, from the bridge's aliases and
    component names; None when the hook is no HF module's input or output."""
    block = bridge.blocks[layer]
    hook = "hook_attn_out" if site == "resid_mid" else SITE_TABLE[site].hook
    found = _resolve([block], hook)
    if found is None:
        return None
    chain, where, point = found
    if bridge.hook_dict.get(f"blocks.{layer}.{hook}") is not point:
        return None
    entry = SITE_TABLE["attn_out" if site == "resid_mid" else site]
    heads = n_heads_of(site, bridge.cfg) if entry.heads else None
    path = _hf_path(chain)
    if _module(hf, path) is not None:
        return block.name, [Location(path, where, heads)]
    attn, leaf = (chain[-2], chain[-1]) if len(chain) > 1 else (None, None)
    fused = getattr(attn, "_modules", {}).get("qkv")
    parts = [getattr(attn, name, None) for name in ("q", "k", "v")]
    if fused is None or leaf not in parts or where != "output":
        return None
    fused_path = _hf_path(chain[:-1] + [fused])
    if _module(hf, fused_path) is None:
        return None
    n_q, n_kv = n_heads_of("q", bridge.cfg), n_heads_of("k", bridge.cfg)
    layouts = LAYOUTS if n_q == n_kv else LAYOUTS[:1]
    part = parts.index(leaf)
    return block.name, [Location(fused_path, "output", heads, (layout, part, n_q, n_kv))
                        for layout in layouts]


def _resolve(chain: list, name: str):
    """Follow `name` (relative to chain[-1]) through submodules and hook aliases down to a
    component's hook_in / hook_out: (components from the block down, where, the HookPoint)."""
    component = chain[-1]
    head, _, tail = name.partition(".")
    if tail:
        child = component._modules.get(head)
        return None if child is None else _resolve(chain + [child], tail)
    target = (getattr(component, "hook_aliases", None) or {}).get(head)
    if target is not None:
        for option in target if isinstance(target, list) else [target]:
            found = _resolve(chain, option)
            if found is not None:
                return found
        return None
    if head in ("hook_in", "hook_out") and head in component._modules:
        return chain, "input" if head == "hook_in" else "output", component._modules[head]
    return None


def _hf_path(chain: list) -> str:
    """The HF module path of the last component: its ancestors' HF names joined (a block's
    name is already `model.layers.3`; containerless components such as OPT's MLP have none)."""
    return ".".join(c.name for c in chain if getattr(c, "name", None))


def _module(hf, path: str):
    try:
        return hf.get_submodule(path)
    except AttributeError:
        return None
