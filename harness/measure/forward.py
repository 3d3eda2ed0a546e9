"""The Forward interface: how the patching engine runs one model, and the registry of fast paths.

Every model gets the general path (`general_forward.GeneralForward`: the bridge's own hooks,
variants stacked along the batch), which works for any architecture the TransformerBridge loads.
Families with a plain-torch fast path register it here with a predicate on the bridge's config;
the engine tries the registered fast paths in order, verifies the chosen one against the bridge
once per model, and falls back to the general path when none applies or the check fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from harness.sites import SITE_TABLE

Acts = dict[str, Tensor]  # site -> [layer, batch, ...]; "final", "pos_embed": [batch, ...]


@dataclass(frozen=True)
class Dims:
    """What selections and memory estimates need to know about a model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    n_ctx: int
    sites: tuple[str, ...]          # the sites this model has
    device: torch.device
    dtype: torch.dtype

    def heads_of(self, site: str) -> int:
        return self.n_kv_heads if SITE_TABLE[site].heads == "kv" else self.n_heads

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


class Forward(Protocol):
    """One model's forward passes as the engine needs them (see GeneralForward for the contract)."""

    path: str
    dims: Dims
    readout: Any

    def trace(self, tokens: Tensor) -> Acts: ...
    def trace_nbytes(self, batch: int, n_pos: int) -> int: ...
    def read_clean(self, acts: Acts, final_pos: Tensor, answer_ids: Tensor,
                   foil_ids: Tensor) -> Tensor: ...
    def run_variants(self, tokens: Tensor, final_pos: Tensor, into: Acts, source: Acts,
                     variants, answer_ids: Tensor, foil_ids: Tensor,
                     work_bytes: int) -> Tensor: ...
    def patch_layers(self, tokens: Tensor, final_pos: Tensor, site: str,
                     masks: dict[int, Tensor], source: Acts, answer_ids: Tensor,
                     foil_ids: Tensor) -> Tensor: ...
    def patch_layers_each(self, tokens: Tensor, final_pos: Tensor, site: str,
                          masks: list[dict[int, Tensor]], source: Acts, answer_ids: Tensor,
                          foil_ids: Tensor, work_bytes: int) -> Tensor: ...
    def site_gradients(self, tokens: Tensor, final_pos: Tensor, site: str,
                       answer_ids: Tensor, foil_ids: Tensor) -> Tensor: ...
    def head_weights(self) -> tuple[Tensor, Tensor]: ...
    def verify(self, tokens: Tensor, acts: Acts) -> None: ...


@dataclass(frozen=True)
class FastPath:
    name: str
    applies: Callable[[Any], bool]        # bridge -> can this fast path run it?
    build: Callable[[Any], Forward]       # bridge -> Forward


FAST_PATHS: dict[str, FastPath] = {}


def register_fast_path(name: str, applies: Callable[[Any], bool],
                       build: Callable[[Any], Forward]) -> None:
    """Register a family's fast path; registering a name twice is an error."""
    if name in FAST_PATHS:
        raise ValueError(f"fast path {name!r} is registered twice")
    FAST_PATHS[name] = FastPath(name, applies, build)


def fast_path_for(bridge) -> FastPath | None:
    """The first registered fast path that applies (the built-in ones: patching.py)."""
    return next((fp for fp in FAST_PATHS.values() if fp.applies(bridge)), None)
