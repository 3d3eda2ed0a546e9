"""IOI path patching on the staggered engine: a fast path's block ops and the clean traces.

Path patching (`circuits.path_patch`, the reference through the bridge's hooks) freezes every
head's z and every MLP output at its `into` value except the senders', which take their `from`
values. Frozen outputs make the residual stream additive: before layer R it is the into run's
plus, for each sender before R, the change of its sublayer's output (attention: the layer's
output with the sender heads' z from `from`, minus the into run's; MLP: from minus into). So
step 1 needs no forward pass: path `resid` reads the final residual at the final positions, and
the receivers' q/k/v are one projection of the residual before their layer. Step 2 runs the
into run from the first receiver layer with the receivers' inputs replaced, senders batched
along the batch; sender sets with nothing before the last receiver layer (nothing at all, for
`resid`) cannot reach it and read the into run's clean value.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from harness.measure.forward import Acts
from harness.measure.staggered import BlockOps, _add_attention, _chunk_size, _mlp_step, final_rows
from harness.progress import steps

QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def path_patch(ops: BlockOps, into: Acts, source: Acts, final_pos: Tensor, answer_ids: Tensor,
               foil_ids: Tensor, heads: Bool[Tensor, "variant layer head"],
               mlps: Bool[Tensor, "variant layer"], path: str, targets: dict[int, list[int]],
               work_bytes: int) -> Float[Tensor, "variant batch"]:
    """Logit diff per sender set (rows of `heads` / `mlps`) and prompt; `targets`: receiver
    layer -> heads of the `path` site (empty for path `resid`)."""
    device, batch = ops.device, final_pos.shape[0]
    final_pos, answer_ids, foil_ids = (t.to(device) for t in (final_pos, answer_ids, foil_ids))
    heads, mlps = heads.to(device), mlps.to(device)
    reach = ops.n_layers if path == "resid" else max(targets)
    reaches = heads[:, :reach].flatten(1).any(1) | mlps[:, :reach].any(1)
    with torch.no_grad():
        clean = ops.logit_diff(final_rows(into["final"], final_pos), answer_ids, foil_ids)
        out = clean.float()[None].repeat(heads.shape[0], 1)
        which = reaches.nonzero().squeeze(1)
        chunk = _chunk_size(ops, into["resid_pre"].shape[1:3], work_bytes)
        done = steps(len(which), "senders")
        for start in range(0, len(which), chunk):
            idx = which[start:start + chunk]
            n = len(idx)
            prompt = torch.arange(batch, device=device).repeat(n)
            a, f = answer_ids[prompt], foil_ids[prompt]
            if path == "resid":
                resid = _final_residuals(ops, into, source, final_pos, heads[idx], mlps[idx])
                value = ops.logit_diff(resid.flatten(0, 1), a, f)
            else:
                recorded = _receiver_inputs(ops, into, source, heads[idx], mlps[idx], path,
                                            targets)
                value = _run_receivers(ops, into, recorded, path, targets, final_pos[prompt],
                                       a, f, n)
            out[idx] = value.float().view(n, batch)
            done(n)
    return out.cpu()


def _layer_change(ops: BlockOps, layer: int, into: Acts, source: Acts, heads: Tensor,
                  mlps: Tensor, rows: Tensor | None) -> Float[Tensor, "n batch ... d_model"]:
    """How the senders of one layer change its sublayers' outputs, per sender set: at every
    position (rows None) or at the positions `rows` ([batch]) only."""
    def at(t: Tensor) -> Tensor:
        return t if rows is None else final_rows(t, rows)

    z_into, z_from = at(into["z"][layer]), at(source["z"][layer])
    attn_into = at(into["attn_out"][layer])
    change = torch.zeros(heads.shape[0], *attn_into.shape, dtype=attn_into.dtype,
                         device=attn_into.device)
    some = heads.any(1).nonzero().squeeze(1)
    if len(some):
        pick = heads[some].reshape(len(some), *[1] * (z_into.dim() - 2), -1, 1)
        z = torch.where(pick, z_from, z_into)   # [sets, batch, (pos,) head, d_head]
        change[some] = ops.attn_output(layer, z) - attn_into
    if "mlp_out" in into and bool(mlps.any()):
        mlp = (at(source["mlp_out"][layer]) - at(into["mlp_out"][layer]))
        change = change + mlps.reshape(-1, *[1] * mlp.dim()).to(mlp.dtype) * mlp
    return change


def _final_residuals(ops: BlockOps, into: Acts, source: Acts, final_pos: Tensor, heads: Tensor,
                     mlps: Tensor) -> Float[Tensor, "n batch d_model"]:
    """Step 1 for path `resid`: the final residual at each final position, per sender set."""
    resid = final_rows(into["final"], final_pos)[None].repeat(heads.shape[0], 1, 1)
    for layer in range(ops.n_layers):
        if bool(heads[:, layer].any()) or bool(mlps[:, layer].any()):
            resid += _layer_change(ops, layer, into, source, heads[:, layer], mlps[:, layer],
                                   final_pos)
    return resid


def _receiver_inputs(ops: BlockOps, into: Acts, source: Acts, heads: Tensor, mlps: Tensor,
                     path: str, targets: dict[int, list[int]]
                     ) -> dict[int, Float[Tensor, "n_batch pos receivers d_head"]]:
    """Step 1 for q/k/v: each receiver layer's input to `path` (its receiver heads), per sender
    set and prompt, with the senders before that layer added to the into run's residual."""
    n = heads.shape[0]
    change = None
    recorded = {}
    for layer in range(max(targets) + 1):
        if layer in targets:
            resid = into["resid_pre"][layer][None]
            if change is not None:
                resid = resid + change
            qkv = ops.split_qkv(ops.qkv_flat(layer, resid.expand(n, *resid.shape[1:])
                                             .flatten(0, 1)))
            recorded[layer] = qkv[QKV_INDEX[path]][:, :, targets[layer]]
        if bool(heads[:, layer].any()) or bool(mlps[:, layer].any()):
            step = _layer_change(ops, layer, into, source, heads[:, layer], mlps[:, layer], None)
            change = step if change is None else change + step
    return recorded


def _run_receivers(ops: BlockOps, into: Acts, recorded: dict[int, Tensor], path: str,
                   targets: dict[int, list[int]], final_pos: Tensor, answer_ids: Tensor,
                   foil_ids: Tensor, n: int) -> Float[Tensor, " n_batch"]:
    """Step 2: the into run from the first receiver layer, the receivers' inputs replaced."""
    first = min(targets)
    x = into["resid_pre"][first].repeat(n, 1, 1)             # [n * batch, pos, d_model]
    for layer in range(first, ops.n_layers):
        if layer == first:    # the into run's own residual: its q/k/v are in the trace
            qkv = into["qkv"][layer].repeat(n, 1, 1)
        else:
            qkv = ops.qkv_flat(layer, x)
        q, k, v = ops.split_qkv(qkv)
        if layer in targets:
            (q, k, v)[QKV_INDEX[path]][:, :, targets[layer]] = recorded[layer].to(qkv.dtype)
        x = _add_attention(ops, layer, x, ops.attend(q, k, v, layer=layer))  # x is a copy
        if not ops.parallel_block:
            x = _mlp_step(ops, layer, x, None)
    return ops.logit_diff(final_rows(x, final_pos), answer_ids, foil_ids)
