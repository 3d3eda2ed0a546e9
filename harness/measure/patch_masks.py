"""Selections: which activations a patch replaces, as boolean masks shaped like the site.

A mask of one layer is [batch or 1, *site dims], with 1 wherever the selection does not vary
(e.g. d_head): it broadcasts against the activation. Shapes come from the site table, so every
site of every architecture is selected the same way (k and v count key/value heads).

Positions: non-negative positions are columns of the (right-padded) token tensor, as in
TransformerLens; negative positions count back from each prompt's final token (-1 = final).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from harness.errors import MeasureError, did_you_mean
from harness.labels import sweep_axes_problem
from harness.measure.forward import Dims
from harness.sites import HEAD_SITES, SITE_TABLE, SITES, head_label


@dataclass(frozen=True)
class Variants:
    """Single-layer patches of one site: variant i patches `layers[i]` where `masks[i]` is True.

    masks: [variant, batch or 1, *site dims], broadcastable to the activation.
    """

    site: str
    layers: Int[Tensor, " variant"]
    masks: Bool[Tensor, "variant ..."]

    def __len__(self) -> int:
        return len(self.layers)

    def take(self, idx: Tensor) -> Variants:
        return Variants(self.site, self.layers[idx], self.masks[idx])


def site_shape(site: str, dims: Dims, n_pos: int) -> tuple[int, ...]:
    """Mask shape of one layer's activation without the batch axis (1 = broadcast)."""
    sizes = {"pos": n_pos, "dest": n_pos, "head": dims.heads_of(site), "neuron": dims.d_mlp}
    return tuple(sizes.get(axis, 1) for axis in SITE_TABLE[site].axes)


def selection_masks(site: str, dims: Dims, final_pos: Tensor, n_pos: int, *, layers=None,
                    heads=None, positions=None, neurons=None) -> dict[int, Bool[Tensor, "b ..."]]:
    """layer -> boolean mask [batch or 1, *site dims] of the activations a selection patches."""
    check_site(site, dims)
    head_sets = _heads_by_layer(heads, site, dims) if heads is not None else None
    if head_sets is not None and site not in HEAD_SITES:
        raise MeasureError(f"heads= selects attention heads; site {site!r} has none "
                           f"(use one of {', '.join(HEAD_SITES)})")
    if neurons is not None and site != "mlp_post":
        raise MeasureError(f"neurons= applies to site 'mlp_post', not {site!r}")
    layer_list = sorted(head_sets) if head_sets is not None else layers
    if not layer_list:
        raise MeasureError("a patch needs layers= (or heads=) to say where to patch")
    layer_list = check_layers(layer_list, dims.n_layers)
    pos_mask = position_mask(positions, final_pos, n_pos)
    return {layer: _mask_for(site, dims, n_pos, pos_mask,
                             None if head_sets is None else head_sets[layer], neurons)
            for layer in layer_list}


def _mask_for(site: str, dims: Dims, n_pos: int, pos_mask: Tensor, heads, neurons) -> Tensor:
    entry, shape = SITE_TABLE[site], site_shape(site, dims, n_pos)
    mask = torch.ones((1, *shape), dtype=torch.bool, device=dims.device)
    mask = mask & _along(pos_mask.to(dims.device), 1 + entry.pos_axis, mask.dim(), batched=True)
    if heads is not None:
        head_mask = torch.zeros(shape[entry.head_axis], dtype=torch.bool, device=dims.device)
        head_mask[list(heads)] = True
        mask = mask & _along(head_mask, 1 + entry.head_axis, mask.dim())
    if neurons is not None:
        check_range("neuron", neurons, shape[-1])
        neuron_mask = torch.zeros(shape[-1], dtype=torch.bool, device=dims.device)
        neuron_mask[list(neurons)] = True
        mask = mask & neuron_mask
    return mask


def _along(values: Tensor, axis: int, ndim: int, batched: bool = False) -> Tensor:
    """Reshape a 1-d (or [batch, n] when `batched`) tensor to lie along `axis` of ndim dims."""
    shape = [1] * ndim
    shape[axis] = values.shape[-1]
    if batched:
        shape[0] = values.shape[0]
    return values.reshape(shape)


def position_mask(positions, final_pos: Tensor, n_pos: int) -> Bool[Tensor, "batch_or_1 pos"]:
    """Non-negative: token columns; negative: counted back from each prompt's final token."""
    if positions is None:
        return torch.ones(1, n_pos, dtype=torch.bool)
    batch = final_pos.shape[0]
    mask = torch.zeros(batch, n_pos, dtype=torch.bool)
    final_pos = final_pos.cpu()
    for p in positions:
        cols = final_pos + 1 + int(p) if p < 0 else torch.full((batch,), int(p))
        if (cols < 0).any() or (cols >= n_pos).any():
            raise MeasureError(f"position {p} is outside the prompts (length {n_pos})")
        mask[torch.arange(batch), cols] = True
    return mask


def _heads_by_layer(heads, site: str, dims: Dims) -> dict[int, list[int]]:
    """Heads given as (layer, head) pairs or 'L10H4' / 'L3KV1' strings -> {layer: [head, ...]}."""
    from harness.sites import parse_head

    out: dict[int, list[int]] = {}
    for h in heads:
        if isinstance(h, str):
            try:
                layer, head = parse_head(h.strip(), site)
            except ValueError as exc:
                raise MeasureError(str(exc)) from None
        else:
            layer, head = (int(x) for x in h)
        check_range("layer", [layer], dims.n_layers)
        check_range("key/value head" if SITE_TABLE[site].heads == "kv" else "head", [head],
                    dims.heads_of(site))
        out.setdefault(layer, []).append(head)
    return out


def sweep_variants(site: str, over, layer_list: list[int], dims: Dims, n_pos: int) -> Variants:
    """One variant per grid cell, in the grid's row-major order."""
    entry, shape = SITE_TABLE[site], site_shape(site, dims, n_pos)
    heads = range(shape[entry.head_axis]) if "head" in over else [None]
    positions = range(n_pos) if "pos" in over else [None]
    cells = torch.zeros(len(heads) * len(positions), *shape, dtype=torch.bool)
    for i, (h, p) in enumerate((h, p) for h in heads for p in positions):
        index: list = [slice(None)] * len(shape)
        if h is not None:
            index[entry.head_axis] = h
        if p is not None:
            index[entry.pos_axis] = p
        cells[(i, *index)] = True
    cells = cells[:, None]  # batch axis
    masks = cells.repeat(len(layer_list), *[1] * (cells.dim() - 1))
    layers = torch.tensor(layer_list).repeat_interleave(cells.shape[0])
    return Variants(site, layers, masks)


def grid_shape(over, n_layers: int, n_heads: int, n_pos: int) -> tuple[int, ...]:
    sizes = {"layer": n_layers, "head": n_heads, "pos": n_pos}
    return tuple(sizes[a] for a in over)


def head_labels(site: str, layer_list: Sequence[int], n_heads: int) -> tuple:
    return tuple(head_label(site, layer, h) for layer in layer_list for h in range(n_heads))


# ---- validation ---------------------------------------------------------------------------------
def check_site(site: str, dims: Dims | None = None) -> None:
    if site not in SITES:
        raise MeasureError(f"unknown site {site!r}" + did_you_mean(site, SITES))
    if dims is not None and site not in dims.sites:
        raise MeasureError(f"this model has no site {site!r} (a parallel attention/MLP block "
                           "has no resid_mid; an attention-only model has no MLP sites); its "
                           f"sites are {', '.join(dims.sites)}")


def check_over(site: str, over, dims: Dims | None = None) -> tuple[str, ...]:
    check_site(site, dims)
    over = tuple(over)
    problem = sweep_axes_problem(over)
    if problem:
        raise MeasureError(problem)
    if "head" in over and site not in HEAD_SITES:
        raise MeasureError(f"over={list(over)} needs a head site ({', '.join(HEAD_SITES)}), "
                           f"not {site!r}")
    return over


def check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = [int(x) for x in layers]
    check_range("layer", layers, n_layers)
    return sorted(set(layers))


def check_range(what: str, values, size: int) -> None:
    for v in values:
        if not 0 <= int(v) < size:
            raise MeasureError(f"{what} {v} is out of range: the model has {size} ({what}s "
                               f"0..{size - 1})")
