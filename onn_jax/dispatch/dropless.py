"""Dropless sparse dispatch: active (token, expert) pairs in one expert-sorted row buffer.

The buffer has R = ceil(pair_budget * N) rows for the whole batch (static; no host sync).
Row layout: the kept pairs of expert 0 (in token order), then of expert 1, ..., then padding
rows (token N, input 0), which the last expert's group absorbs so group sizes sum to R:

  dispatch  x_RxC[r] = x[token_R[r]]                       (a gather; padding rows read 0)
  experts   y_RxC = W2_g . act(W1_g . x_RxC), g = expert of r (grouped GEMM, grouped_gemm.py)
  combine   out[t] = sum over t's kept pairs, in expert order, of w[t, e] * y[row(t, e)]

Overflow rule: the active pairs are ranked in token-major order (token, then expert); those
of rank >= R are dropped (the batch's last tokens lose their highest experts first). They add
nothing to the output, their Surprise is 0, and `moe/dropped_frac` counts them. With
R = N * E (pair_budget = E) nothing can drop. Unlike a per-expert capacity, an uneven load
across experts costs nothing.

The per-token sums (combine, and the dispatch's backward) are deterministic without atomics:
each token's kept rows are added in a fixed (expert) order, by a loop over j < max_t k_t or by
one Pallas kernel that reads each row once (`model.moe.token_sum`, onn_jax.dispatch.token_sums), so a
GPU gives the same bits run to run. Their backwards are gathers. Every other index step is a
gather or a unique-index scatter.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import MoEConfig
from onn_jax.core.experts import gelu_exact
from onn_jax.dispatch.grouped_gemm import grouped_matmul, rounded_matmul, rounded_matmul_vjp
from onn_jax.dispatch.token_sums import token_sums


class Dropless(NamedTuple):
    """Where each kept pair lives in the expert-sorted row buffer, and the token-major order."""

    token_R: jax.Array     # int32 token of each row; N (out of range) for padding rows
    row_NxE: jax.Array     # int32 row of pair (t, e); R (out of range) where not kept
    kept_NxE: jax.Array    # bool: active and within the budget
    sizes_E: jax.Array     # int32 rows per expert; the last expert also owns the padding rows
    order_R: jax.Array     # int32 row of the p-th kept pair in token-major order; R for the tail
    start_N: jax.Array     # int32 token-major position of token t's first kept pair
    count_N: jax.Array     # int32 kept pairs of token t


def pair_rows(num_tokens: int, cfg: MoEConfig) -> int:
    """R = ceil(pair_budget * N) rows, clipped to [1, N * E].

    pair_budget None: top_k for the top-k router (exactly its k, never drops); fallback_k
    for the surprise gate (every token's k at initialisation, when all tokens fall back)."""
    rows = math.ceil(pair_budget(cfg) * num_tokens - 1e-9)
    return int(min(num_tokens * cfg.num_experts, max(1, rows)))


def pair_budget(cfg: MoEConfig) -> float:
    """Rows per token in force: model.moe.pair_budget, or its default (see pair_rows)."""
    if cfg.pair_budget is not None:
        return cfg.pair_budget
    return cfg.top_k if cfg.router == "topk" else cfg.effective_fallback_k


def make_dropless(mask_NxE: jax.Array, rows: int) -> Dropless:
    """Lays the active pairs of token-major rank < rows into the expert-sorted buffer."""
    n, e = mask_NxE.shape
    active = mask_NxE.astype(jnp.int32)
    rank_NxE = jnp.cumsum(active.reshape(-1)).reshape(n, e) - 1   # token-major rank
    kept_NxE = mask_NxE & (rank_NxE < rows)
    kept = kept_NxE.astype(jnp.int32)
    count_E = jnp.sum(kept, axis=0)
    offset_E = jnp.cumsum(count_E) - count_E
    pos_NxE = jnp.cumsum(kept, axis=0) - 1                          # rank within the expert
    row_NxE = jnp.where(kept_NxE, offset_E[None, :] + pos_NxE, rows).astype(jnp.int32)
    sizes_E = count_E.at[e - 1].add(rows - jnp.sum(count_E)).astype(jnp.int32)
    return layout_of_rows(kept_NxE, row_NxE, rows, sizes_E)


def layout_of_rows(kept_NxE: jax.Array, row_NxE: jax.Array, rows: int, sizes_E: jax.Array) -> Dropless:
    """The Dropless record of a buffer of `rows` rows in which kept pair (t, e) sits at row
    row_NxE[t, e] (distinct rows; `rows` where not kept): token of each row, token-major order."""
    n, e = kept_NxE.shape
    kept = kept_NxE.astype(jnp.int32)
    tokens_NxE = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, e))
    token_R = jnp.full((rows,), n, jnp.int32).at[row_NxE].set(tokens_NxE, mode="drop")
    # A kept pair's position in token-major order is its rank among the kept pairs.
    # One unique-index scatter of the kept rows.
    rank_NxE = jnp.cumsum(kept.reshape(-1)).reshape(n, e) - 1
    order_R = jnp.full((rows,), rows, jnp.int32).at[jnp.where(kept_NxE, rank_NxE, rows)].set(
        row_NxE, mode="drop")
    count_N = jnp.sum(kept, axis=1).astype(jnp.int32)
    start_N = (jnp.cumsum(count_N) - count_N).astype(jnp.int32)
    return Dropless(token_R=token_R, row_NxE=row_NxE, kept_NxE=kept_NxE, sizes_E=sizes_E,
                    order_R=order_R, start_N=start_N, count_N=count_N)


def _first_weights(kind: str) -> tuple[str, ...]:
    """The weights applied to the expert input: W1 (gelu), W1 and W3 (swiglu)."""
    if kind == "gelu":
        return ("w1",)
    if kind == "swiglu":
        return ("w1", "w3")
    raise ValueError(f"unknown expert kind {kind!r}")


def _activation(kind: str, h_RxI: jax.Array, g_RxI: jax.Array | None = None) -> jax.Array:
    """GELU(h) or silu(h) * g under jax.checkpoint: the backward keeps its inputs and recomputes
    the rest (the erf form of GELU would otherwise keep four [R, I] arrays per layer; act(h) is
    kept by the second GEMM anyway). Same values."""
    if kind == "gelu":
        return jax.checkpoint(gelu_exact)(h_RxI)
    return jax.checkpoint(lambda h, g: jax.nn.silu(h) * g)(h_RxI, g_RxI)


def row_expert_outputs(params: dict, x_RxC: jax.Array, sizes_E: jax.Array, kind: str = "gelu",
                       backend: str = "ragged_dot") -> jax.Array:
    """y[r] = W2_g . act(W1_g . x[r]) with g the expert owning row r, [R, C] in x's dtype."""
    hs = [grouped_matmul(x_RxC, params[k], sizes_E, backend) for k in _first_weights(kind)]
    return grouped_matmul(_activation(kind, *hs), params["w2"], sizes_E, backend)


def token_expert_outputs(params: dict, x_NxC: jax.Array, d: Dropless, kind: str = "gelu",
                         backend: str = "ragged_dot", token_sum: str = "loop") -> jax.Array:
    """row_expert_outputs of the dispatched rows x[token_R] (zero for padding rows), without
    keeping those rows [R, C] for the backward: it gathers them again from x [N, C], which the
    layer keeps anyway (one [R, C] array less per layer: 512 MiB at gpu_olmoe). The backward of
    the first GEMM(s) and of the gather is one custom VJP: dx[t] is the float32 sum of t's row
    cotangents, rounded once (as dispatch_rows). Same values and gradients."""
    names = _first_weights(kind)
    hs = _gathered_matmuls(x_NxC, tuple(params[k] for k in names), d, token_sum, backend)
    return grouped_matmul(_activation(kind, *hs), params["w2"], d.sizes_E, backend)


def _gather_rows(x_NxC: jax.Array, d: Dropless) -> jax.Array:
    return x_NxC.at[d.token_R].get(mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gathered_matmuls(x_NxC, ws, d, token_sum, backend):
    rows = _gather_rows(x_NxC, d)
    return tuple(rounded_matmul(backend, rows, w, d.sizes_E) for w in ws)


def _gathered_matmuls_fwd(x_NxC, ws, d, token_sum, backend):
    return _gathered_matmuls(x_NxC, ws, d, token_sum, backend), (x_NxC, ws, d)


def _gathered_matmuls_bwd(token_sum, backend, res, dhs):
    x_NxC, ws, d = res
    rows = _gather_rows(x_NxC, d)
    dx_RxC, dws = None, []
    for w, dh in zip(ws, dhs):
        dx, dw = rounded_matmul_vjp(backend, rows, w, d.sizes_E, dh)
        dx_RxC = dx if dx_RxC is None else dx_RxC + dx
        dws.append(dw)
    return sum_rows_to_tokens(dx_RxC, d, token_sum).astype(x_NxC.dtype), tuple(dws), None


_gathered_matmuls.defvjp(_gathered_matmuls_fwd, _gathered_matmuls_bwd)


def dispatch_rows(x_NxC: jax.Array, d: Dropless, token_sum: str = "loop") -> jax.Array:
    """x_RxC[r] = x[token_R[r]], zero for padding rows. Backward: dx[t] = the float32 sum of
    t's row cotangents (`sum_rows_to_tokens`), rounded once to x's dtype."""
    return _dispatch(x_NxC, d, token_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dispatch(x_NxC, d, token_sum):
    return _gather_rows(x_NxC, d)


def _dispatch_fwd(x_NxC, d, token_sum):
    return _dispatch(x_NxC, d, token_sum), d


def _dispatch_bwd(token_sum, d, g_RxC):
    return sum_rows_to_tokens(g_RxC, d, token_sum).astype(g_RxC.dtype), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def sum_rows_to_tokens(a_RxC: jax.Array, d: Dropless, token_sum: str = "loop") -> jax.Array:
    """out[t] = sum of a over t's kept rows, added in expert order, float32 [N, C]
    (onn_jax.dispatch.token_sums: a fixed order, no atomics). Backward: da[r] = g[token_R[r]]."""
    return token_sums(a_RxC, None, d.order_R, d.start_N, d.count_N, d.token_R, token_sum)


def row_weights(weights_NxE: jax.Array, d: Dropless) -> jax.Array:
    """w[t, e] of each row's pair, [R], zero for padding rows (its backward is a gather)."""
    rows = d.token_R.shape[0]
    return jnp.zeros((rows,), weights_NxE.dtype).at[d.row_NxE].set(weights_NxE, mode="drop")


def combine_rows(weights_NxE: jax.Array, y_RxC: jax.Array, d: Dropless, token_sum: str = "loop") -> jax.Array:
    """out[t] = sum_e w[t, e] * y[row(t, e)] over kept pairs, in float32, [N, C]; each row is
    read once in the `pallas` implementation (onn_jax.dispatch.token_sums)."""
    w_R = row_weights(weights_NxE.astype(jnp.float32), d)
    return token_sums(y_RxC, w_R, d.order_R, d.start_N, d.count_N, d.token_R, token_sum)


def rows_to_pairs(a_RxX: jax.Array, d: Dropless) -> jax.Array:
    """A row-space array [R, ...] in the pair layout [N, E, ...]: a[row(t, e)], 0 where not kept."""
    return a_RxX.at[d.row_NxE].get(mode="fill", fill_value=0)
