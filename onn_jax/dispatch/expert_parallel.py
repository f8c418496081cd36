"""Expert parallelism for the dropless dispatch: shard_map + all-to-all over the `expert` axis.

Used by moe.py inside the sharded step (sharding.make_sharded_train_step) when the mesh has
expert = ep > 1 and model.moe.dispatch = "dropless". Each device holds E / ep experts (the
`expert` shard of w1/w2/w3) and n = N / devices tokens (the batch is split over data, expert
and fsdp). Per device, in one shard_map:

  1. the global overflow rule of onn_jax.dispatch.dropless: pair (t, e) is kept iff active and of
     token-major rank < R = ceil(pair_budget * N) over the whole batch (an all-gather of
     per-device pair counts gives each device its rank offset), so the kept pairs are those
     of the one-device step;
  2. send rows [ep, S, C]: block d holds the kept pairs whose expert lives on expert-shard d,
     sorted by expert, then token (make_dropless on that block). S = ceil(ep_budget * n) rows
     per peer (static): a block's pairs of token-major rank >= S are dropped (the device's
     last tokens lose their highest experts on that peer first) and counted in
     moe/dropped_frac. The default ep_budget (config.MoEConfig.ep_budget) adds no drop at
     the default pair budget;
  3. all_to_all over `expert`: rows travel to the device owning their expert, are permuted
     into one expert-sorted buffer [ep * S, C] (a unique-index gather), run through the
     grouped GEMM of the local experts, permuted back and returned by a second all_to_all;
  4. the returned rows (plus the Surprise tap) are combined per token by dropless's
     deterministic per-token sum, in expert order, as on one device.

Nothing of size [N, E, C] exists: the row buffers are [ep * S, C] per device. The Surprise
tap lives on the returned rows, so S = ||dL/dy|| of each row is taken on the token's device and
mapped back to [N, E] there (`ep_rows_to_pairs`, a local gather). jax.lax.ragged_all_to_all
would avoid the static S but does not lower on XLA:CPU (jax 0.10.2: "HLO opcode
ragged-all-to-all is not supported"), where the equality tests run; all_to_all does everywhere.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from onn_jax.config import MoEConfig
from onn_jax.core.gate import RouterOutput
from onn_jax.dispatch.dropless import (
    Dropless,
    combine_rows,
    dispatch_rows,
    layout_of_rows,
    make_dropless,
    pair_budget,
    pair_rows,
    row_expert_outputs,
    token_expert_outputs,
)
from onn_jax.dispatch.grouped_gemm import resolve_gemm
from onn_jax.dispatch.token_sums import resolve_token_sum
from onn_jax.parallel.constrain import expert_mesh, shard_map


class EPRows(NamedTuple):
    """The pair layout of an expert-parallel dropless layer (global arrays, split by token).

    Row buffers ([devices * ep * S, ...], split over the batch axes) hold, on each device, the
    rows it sent, in send order, with the experts' outputs as they came back."""

    row_NxE: jax.Array   # int32 row of kept pair (t, e) in its device's send buffer; ep*S if not kept
    kept_NxE: jax.Array  # bool: kept by the global budget and by the per-peer budget






def send_rows(tokens_per_device: int, cfg: MoEConfig, ep: int) -> int:
    """S: rows a device sends to each peer, ceil(ep_budget * n) clipped to [1, n * E / ep]."""
    local_experts = cfg.num_experts // ep
    budget = cfg.ep_budget if cfg.ep_budget is not None else min(pair_budget(cfg), local_experts)
    rows = math.ceil(budget * tokens_per_device - 1e-9)
    return int(min(tokens_per_device * local_experts, max(1, rows)))


def ep_tap_rows(num_tokens: int, cfg: MoEConfig, mesh: Mesh) -> int:
    """Rows of the global row buffer (the Surprise tap): devices * ep * S."""
    ep = mesh.shape["expert"]
    return mesh.size * ep * send_rows(num_tokens // mesh.size, cfg, ep)


def _global_kept(mask_nxE: jax.Array, rows: int, axes: tuple[str, ...]) -> jax.Array:
    """dropless's overflow rule over the whole batch: active and token-major rank < rows."""
    active = mask_nxE.astype(jnp.int32)
    total = jnp.sum(active)
    totals_D = jax.lax.all_gather(total, axes)                      # pair count of each device
    me = jax.lax.axis_index(axes)
    before = jnp.sum(jnp.where(jnp.arange(totals_D.shape[0]) < me, totals_D, 0))
    rank_nxE = before + jnp.cumsum(active.reshape(-1)).reshape(active.shape) - 1
    return mask_nxE & (rank_nxE < rows)


def _send_layout(kept_nxE: jax.Array, ep: int, s: int) -> tuple[Dropless, jax.Array]:
    """The send buffer [ep * S] (block d: peer d's experts, make_dropless within the block)
    and the kept-row counts per (peer, local expert) [ep, E / ep]."""
    n, e = kept_nxE.shape
    el = e // ep
    blocks = jax.vmap(lambda m: make_dropless(m, s))(kept_nxE.reshape(n, ep, el).transpose(1, 0, 2))
    kept_dxnxL = blocks.kept_NxE
    counts_DxL = jnp.sum(kept_dxnxL, axis=1).astype(jnp.int32)
    offset_D = (jnp.arange(ep, dtype=jnp.int32) * s)[:, None, None]
    row_dxnxL = jnp.where(kept_dxnxL, blocks.row_NxE + offset_D, ep * s)
    kept2_nxE = kept_dxnxL.transpose(1, 0, 2).reshape(n, e)
    row_nxE = row_dxnxL.transpose(1, 0, 2).reshape(n, e).astype(jnp.int32)
    return layout_of_rows(kept2_nxE, row_nxE, ep * s, counts_DxL.reshape(-1)), counts_DxL


def _receive_order(counts_DxL: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
    """For received rows [ep, S] (block d from peer d, sorted by local expert, padding last):
    each row's position in one expert-sorted buffer (expert, then peer, then token; padding
    at the end), and the group sizes [E / ep] with the padding in the last group."""
    ep, el = counts_DxL.shape
    total_L = jnp.sum(counts_DxL, axis=0)
    offset_L = jnp.cumsum(total_L) - total_L                        # expert g's first row
    before_DxL = jnp.cumsum(counts_DxL, axis=0) - counts_DxL         # rows of g from earlier peers
    start_DxL = jnp.cumsum(counts_DxL, axis=1) - counts_DxL          # g's first row in block d
    q_S = jnp.arange(s, dtype=jnp.int32)
    ends_DxL = start_DxL + counts_DxL
    g_DxS = jax.vmap(lambda e: jnp.searchsorted(e, q_S, side="right"))(ends_DxL)
    valid_DxS = g_DxS < el
    g_DxS = jnp.minimum(g_DxS, el - 1)
    take = lambda a: jnp.take_along_axis(a, g_DxS, axis=1)
    pos_DxS = take(offset_L[None, :] + before_DxL - start_DxL) + q_S[None, :]
    valid = jnp.sum(total_L)
    pad_DxS = valid + jnp.cumsum(~valid_DxS.reshape(-1)).reshape(ep, s) - 1
    pos_DxS = jnp.where(valid_DxS, pos_DxS, pad_DxS).astype(jnp.int32)
    sizes_L = total_L.at[el - 1].add(ep * s - valid).astype(jnp.int32)
    return pos_DxS.reshape(-1), sizes_L


def ep_dropless_layer(params: dict, x_NxC: jax.Array, cfg: MoEConfig, tap_RxC: jax.Array | None,
                      router: RouterOutput, mesh: Mesh, axes: tuple[str, ...]):
    """(out [N, C] float32, returned rows y [devices * ep * S, C] (float32 + tap when a tap is
    given, else the compute dtype), EPRows)."""
    n_glob, c = x_NxC.shape
    ep = mesh.shape["expert"]
    s = send_rows(n_glob // mesh.size, cfg, ep)
    rows_glob = pair_rows(n_glob, cfg)
    backend = resolve_gemm(cfg.gemm, x_NxC.dtype)
    token_sum = resolve_token_sum(cfg.token_sum, c)
    tok, exp = P(axes), P("expert")

    def exchanged_rows(x_nxC, kept_nxE, experts):
        """Expert parallelism: send each peer its pairs' rows, run the local experts, send back."""
        d, counts_DxL = _send_layout(kept_nxE, ep, s)
        x_DxSxC = dispatch_rows(x_nxC, d, token_sum).reshape(ep, s, c)
        x_DxSxC = jax.lax.all_to_all(x_DxSxC, "expert", 0, 0, tiled=True)
        counts_DxL = jax.lax.all_to_all(counts_DxL, "expert", 0, 0, tiled=True)
        pos_R, sizes_L = _receive_order(counts_DxL, s)
        x_RxC = jnp.zeros((ep * s, c), x_DxSxC.dtype).at[pos_R].set(x_DxSxC.reshape(ep * s, c),
                                                                   unique_indices=True)
        y_RxC = row_expert_outputs(experts, x_RxC, sizes_L, cfg.expert_kind, backend)
        y_DxSxC = y_RxC[pos_R].reshape(ep, s, c)
        return jax.lax.all_to_all(y_DxSxC, "expert", 0, 0, tiled=True).reshape(ep * s, c), d

    def own_rows(x_nxC, kept_nxE, experts):
        """Data parallelism (ep = 1): the one-device layout of the device's own S rows (the same
        drop rule as a single peer's send block), no exchange and no permutation."""
        d = make_dropless(kept_nxE, s)
        return token_expert_outputs(experts, x_nxC, d, cfg.expert_kind, backend, token_sum), d

    def body(x_nxC, mask_nxE, weights_nxE, experts, tap=None):
        kept_nxE = _global_kept(mask_nxE, rows_glob, axes)
        y_RxC, d = (own_rows if ep == 1 else exchanged_rows)(x_nxC, kept_nxE, experts)
        if tap is not None:
            y_RxC = y_RxC.astype(jnp.float32) + tap
        return combine_rows(weights_nxE, y_RxC, d, token_sum), y_RxC, d.row_NxE, d.kept_NxE

    args = [x_NxC, router.mask, router.weights, params["experts"]]
    in_specs = [tok, tok, tok, jax.tree.map(lambda _: exp, params["experts"])]
    if tap_RxC is not None:
        args.append(tap_RxC)
        in_specs.append(tok)
    out_NxC, y_RxC, row_NxE, kept_NxE = shard_map(body, mesh, tuple(in_specs), (tok, tok, tok, tok))(*args)
    return out_NxC, y_RxC, EPRows(row_NxE=row_NxE, kept_NxE=kept_NxE)


def ep_rows_to_pairs(a_RxX: jax.Array, d: EPRows) -> jax.Array:
    """A row-buffer array in the pair layout [N, E, ...] (0 where not kept), gathered on each
    token's own device."""
    found = expert_mesh()
    if found is None:
        raise ValueError("ep_rows_to_pairs: an expert-parallel record outside the sharded step")
    mesh, axes = found
    tok = P(axes)
    gather = lambda a, row: a.at[row].get(mode="fill", fill_value=0)
    return shard_map(gather, mesh, (tok, tok), tok)(a_RxX, d.row_NxE)
