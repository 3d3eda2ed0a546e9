"""The one table of activation sites: names, bridge hook names, shapes, head axes, availability.

Spec validation, the patching engine (fast and general paths), generation hooks, SAE hook
resolution and the docs all read this table; nothing else spells a hook name. Importing it
costs no torch, so `harness validate` stays light.

Head labels (their grammar: labels.py): per-query-head sites (`z`, `q`, `pattern`) name query
heads `L3H7`; `k` and `v` name key/value heads `L3KV1` (on a grouped-query model several query
heads share one KV head; on other models KV head i is query head i's own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.errors import did_you_mean
from harness.labels import Head, LabelError, format_label, parse_label


@dataclass(frozen=True)
class Site:
    """One activation site of a transformer block.

    `axes` name the activation's dimensions after [batch]; `heads` is "query", "kv" or None;
    `needs` lists the model properties without which the site does not exist.
    """

    name: str
    hook: str                     # bridge hook name, relative to blocks.{layer}
    axes: tuple[str, ...]
    heads: str | None = None
    needs: tuple[str, ...] = ()   # "sequential" (no parallel attn/MLP), "mlp" (not attn-only)
    doc: str = ""

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    @property
    def head_axis(self) -> int | None:
        """Index of the head axis in `axes` (after batch), or None."""
        return self.axes.index("head") if "head" in self.axes else None

    @property
    def pos_axis(self) -> int:
        return self.axes.index("dest" if "dest" in self.axes else "pos")


SITE_TABLE: dict[str, Site] = {s.name: s for s in (
    Site("resid_pre", "hook_resid_pre", ("pos", "d_model"),
         doc="residual stream entering the block"),
    Site("resid_mid", "hook_resid_mid", ("pos", "d_model"), needs=("sequential", "mlp"),
         doc="residual stream between attention and MLP (not on parallel-block models)"),
    Site("resid_post", "hook_resid_post", ("pos", "d_model"),
         doc="residual stream leaving the block"),
    Site("attn_out", "hook_attn_out", ("pos", "d_model"),
         doc="attention output added to the residual stream (after any post-attention norm)"),
    Site("mlp_out", "hook_mlp_out", ("pos", "d_model"), needs=("mlp",),
         doc="MLP output added to the residual stream (after any post-MLP norm)"),
    Site("q", "attn.hook_q", ("pos", "head", "d_head"), heads="query",
         doc="queries per query head (before rotary embedding)"),
    Site("k", "attn.hook_k", ("pos", "head", "d_head"), heads="kv",
         doc="keys per key/value head (before rotary embedding)"),
    Site("v", "attn.hook_v", ("pos", "head", "d_head"), heads="kv",
         doc="values per key/value head"),
    Site("z", "attn.hook_z", ("pos", "head", "d_head"), heads="query",
         doc="per-head attention output before the output projection"),
    Site("pattern", "attn.hook_pattern", ("head", "dest", "src"), heads="query",
         doc="attention probabilities per query head"),
    Site("mlp_post", "mlp.hook_post", ("pos", "neuron"), needs=("mlp",),
         doc="MLP hidden activations (neurons) after the nonlinearity (and gate)"),
)}

SITES: tuple[str, ...] = tuple(SITE_TABLE)
HEAD_SITES: tuple[str, ...] = tuple(n for n, s in SITE_TABLE.items() if s.heads)
KV_SITES: tuple[str, ...] = tuple(n for n, s in SITE_TABLE.items() if s.heads == "kv")


def site(name: str) -> Site:
    """The table entry of `name`; an unknown name is a KeyError that lists the known ones."""
    if name not in SITE_TABLE:
        raise KeyError(f"unknown site {name!r}" + did_you_mean(name, SITES))
    return SITE_TABLE[name]


def head_label(site_name: str, layer: int, head: int) -> str:
    """`L3H7` for query-head sites, `L3KV1` for key/value sites."""
    return format_label(Head(layer, head, SITE_TABLE[site_name].heads == "kv"))


def parse_head(label: str, site_name: str) -> tuple[int, int]:
    """(layer, head) of a head label, checked against the site's kind of head.

    Raises ValueError with the fix when a query-head label names a key/value site or back.
    """
    kv = SITE_TABLE[site_name].heads == "kv"
    try:
        head = parse_label(label, ("head", "kv_head"), "head name")
    except LabelError:
        example = "L3KV1" if kv else "L10H4"
        raise ValueError(f"'{label}' is not a head name for site '{site_name}'; write "
                         f"{'L{layer}KV{head}' if kv else 'L{layer}H{head}'}, e.g. {example}"
                         ) from None
    if kv and not head.kv:
        raise ValueError(f"site '{site_name}' has key/value heads: write "
                         f"{Head(head.layer, head.head, kv=True)} for key/value head {head.head} "
                         f"of layer {head.layer} ('{label}' names a query head; query-head "
                         "labels are for z, q and pattern)")
    if not kv and head.kv:
        raise ValueError(f"site '{site_name}' has query heads: write "
                         f"{Head(head.layer, head.head)} ('{label}' names a key/value head; KV "
                         "labels are for sites k and v)")
    return head.layer, head.head


def model_traits(cfg) -> set[str]:
    """The properties `Site.needs` refers to, read from a TransformerLens config."""
    traits = set()
    if not getattr(cfg, "parallel_attn_mlp", False):
        traits.add("sequential")
    if not getattr(cfg, "attn_only", False):
        traits.add("mlp")
    return traits


# what a model lacks when it lacks a trait, for error messages
MISSING_TRAIT = {"mlp": "it is attention-only (no MLP layers)",
                 "sequential": "its attention and MLP run in parallel (no resid_mid)"}


def missing_reason(site_name: str, traits: set[str] | frozenset[str]) -> str | None:
    """Why a model with these traits has no `site_name` (None: it has it)."""
    missing = sorted(set(SITE_TABLE[site_name].needs) - set(traits))
    return "; ".join(MISSING_TRAIT[t] for t in missing) or None


def sites_for(cfg) -> tuple[str, ...]:
    """The sites a model with this config has."""
    traits = model_traits(cfg)
    return tuple(n for n, s in SITE_TABLE.items() if set(s.needs) <= traits)


def n_heads_of(site_name: str, cfg) -> int:
    """How many heads a head site has on this model (KV heads for k and v)."""
    if SITE_TABLE[site_name].heads == "kv":
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(cfg.n_heads)


# HookedTransformer-style names that SAE configs and notebooks use, mapped onto bridge names.
_HT_ALIASES = {
    "hook_resid_pre": "hook_resid_pre", "hook_resid_mid": "hook_resid_mid",
    "hook_resid_post": "hook_resid_post", "hook_attn_out": "hook_attn_out",
    "hook_mlp_out": "hook_mlp_out", "attn.hook_z": "attn.hook_z", "attn.hook_q": "attn.hook_q",
    "attn.hook_k": "attn.hook_k", "attn.hook_v": "attn.hook_v",
    "attn.hook_pattern": "attn.hook_pattern", "mlp.hook_post": "mlp.hook_post",
    "mlp.hook_pre": "mlp.hook_pre", "hook_mlp_in": "mlp.hook_in", "hook_attn_in": "attn.hook_in",
}
_BLOCK_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def resolve_hook(name: str) -> tuple[str, int | None, str | None]:
    """A HookedTransformer hook name -> (bridge hook name, layer, site name or None).

    `blocks.8.hook_resid_pre` -> ("blocks.8.hook_resid_pre", 8, "resid_pre"). Names outside
    blocks (`hook_embed`, `ln_final.hook_normalized`) pass through with layer None.
    """
    match = _BLOCK_HOOK_RE.match(name)
    if not match:
        return name, None, None
    layer, rest = int(match.group(1)), match.group(2)
    rest = _HT_ALIASES.get(rest, rest)
    site_name = next((n for n, s in SITE_TABLE.items() if s.hook == rest), None)
    return f"blocks.{layer}.{rest}", layer, site_name
