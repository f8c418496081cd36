"""Sparse capacity dispatch: run each expert only on its active tokens, with static shapes.

Every expert e gets a buffer of K = capacity slots. Active pairs (t, e) take the slots of
expert e in token order; pairs beyond the capacity are dropped (they add nothing to the
layer output, and their Surprise is 0). The three steps touch only the E*K slots, never the
N*E pair grid (a one-hot einsum dispatch would cost N*E*K*C multiply-adds, more than the
experts themselves):

  dispatch  x_ExKxC[e, k] = x[token_ExK[e, k]]              (a gather; empty slots read 0)
  experts   y_ExKxC = W2_e . act(W1_e . x_ExKxC)             (batched over E, bf16 matmuls)
  combine   out[t] = sum over t's slots of w[t, e] * y[e, k] (a float32 segment sum)

The per-token sums (the combine, and the dispatch's backward) put the slot rows in token
order (a gather through `order_P`, computed from the mask without a sort) and add them as a
sorted segment sum; their backwards are gathers. The combine's dL/dw is one [E, K] row per
slot. On GPUs XLA's segment sum may use atomics, so the order in which a token's (at most k)
terms are added can vary between runs in the last bits; `--xla_gpu_deterministic_ops=true`
makes it deterministic. On an H100 this combine was 6.5x faster than gathering over the E
pairs of every token (2.3x with its backward; bench/kernels.py, docs/BENCHMARKS.md).

With nothing dropped (capacity_factor None: K = N) the output, the Surprise of every
active pair and all gradients equal the dense path's (tests/test_dispatch.py).
The Surprise taps live in slot space ([E, K, C]); `to_pairs` maps a slot-space array back
to the dense [N, E, ...] layout (zero on pairs that were not computed).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import MoEConfig
from onn_jax.core.experts import gelu_exact


class Dispatch(NamedTuple):
    """Where each active (token, expert) pair lives in its expert's slot buffer, and the
    token-major order of the slots (for the per-token sums)."""

    token_ExK: jax.Array      # int32 token of each slot; N (out of range) for an empty slot
    slot_NxE: jax.Array       # int32 slot of pair (t, e); K (out of range) where not kept
    kept_NxE: jax.Array       # bool: active and within the capacity
    order_P: jax.Array        # int32 [E*K] flat slots e*K + k sorted by token (kept pairs first,
                              # E*K, out of range, for the unused tail)
    order_token_P: jax.Array  # int32 [E*K] the token of each entry of order_P (N for the tail)


def expert_capacity(num_tokens: int, cfg: MoEConfig) -> int:
    """Slots per expert K = ceil(capacity_factor * N * k_ref / E), clipped to [1, N].

    k_ref is the expected number of active experts per token: `top_k` for the top-k router,
    `fallback_k` (E/2 by default) for the surprise gate, whose tokens all fall back to it at
    initialisation. capacity_factor None means K = N: no pair is ever dropped.
    """
    if cfg.capacity_factor is None:
        return num_tokens
    k_ref = cfg.top_k if cfg.router == "topk" else cfg.effective_fallback_k
    k = math.ceil(cfg.capacity_factor * num_tokens * k_ref / cfg.num_experts)
    return int(min(num_tokens, max(1, k)))


def make_dispatch(mask_NxE: jax.Array, capacity: int) -> Dispatch:
    """Assigns each active pair the next free slot of its expert (token order), up to `capacity`."""
    n, e = mask_NxE.shape
    pos_NxE = jnp.cumsum(mask_NxE.astype(jnp.int32), axis=0) - 1
    kept_NxE = mask_NxE & (pos_NxE < capacity)
    slot_NxE = jnp.where(kept_NxE, pos_NxE, capacity).astype(jnp.int32)
    tokens_NxE = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, e))
    experts_NxE = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[None, :], (n, e))
    token_ExK = jnp.full((e, capacity), n, jnp.int32).at[experts_NxE, slot_NxE].set(
        tokens_NxE, mode="drop")
    # Token-major position of each kept pair: kept pairs of earlier tokens, then of this
    # token's lower experts. No sort: one unique-index scatter of N*E entries.
    kept = kept_NxE.astype(jnp.int32)
    pos_NxE = jnp.cumsum(kept.reshape(-1)).reshape(n, e) - 1
    pos_NxE = jnp.where(kept_NxE, pos_NxE, e * capacity)
    order_P = jnp.full((e * capacity,), e * capacity, jnp.int32).at[pos_NxE].set(
        experts_NxE * capacity + slot_NxE, mode="drop", unique_indices=True)
    order_token_P = token_ExK.reshape(-1).at[order_P].get(mode="fill", fill_value=n)
    return Dispatch(token_ExK=token_ExK, slot_NxE=slot_NxE, kept_NxE=kept_NxE, order_P=order_P,
                    order_token_P=order_token_P)


def slot_expert_outputs(params: dict, x_ExKxC: jax.Array, kind: str = "gelu") -> jax.Array:
    """Expert e applied to its own slots: y[e, k] = W2_e . act(W1_e . x[e, k]), [E, K, C]."""
    dt = x_ExKxC.dtype
    h_ExKxI = jnp.einsum("ekc,eci->eki", x_ExKxC, params["w1"].astype(dt))
    if kind == "gelu":
        a_ExKxI = gelu_exact(h_ExKxI)
    elif kind == "swiglu":
        a_ExKxI = jax.nn.silu(h_ExKxI) * jnp.einsum("ekc,eci->eki", x_ExKxC, params["w3"].astype(dt))
    else:
        raise ValueError(f"unknown expert kind {kind!r}")
    return jnp.einsum("eki,eic->ekc", a_ExKxI, params["w2"].astype(dt))


def dispatch_tokens(x_NxC: jax.Array, d: Dispatch) -> jax.Array:
    """x_ExKxC[e, k] = x[token_ExK[e, k]], zero for empty slots.

    Backward: dx[t] = the float32 sum of the slot cotangents of token t (`sum_to_tokens`),
    rounded once to x's dtype, as the dense path's matmul transpose does.
    """
    return _dispatch(x_NxC, d)


@jax.custom_vjp
def _dispatch(x_NxC, d):
    return x_NxC.at[d.token_ExK].get(mode="fill", fill_value=0)


def _dispatch_fwd(x_NxC, d):
    return _dispatch(x_NxC, d), d


def _dispatch_bwd(d, g_ExKxC):  # g has x's dtype
    return sum_to_tokens(g_ExKxC.astype(jnp.float32), d).astype(g_ExKxC.dtype), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def sum_to_tokens(a_ExKxC: jax.Array, d: Dispatch) -> jax.Array:
    """out[t] = sum of a over the slots of token t, [N, C]; empty slots add nothing.

    The slot rows are first put in token order (`order_P`, a gather), then summed as a
    sorted segment sum; the backward is a gather: da[e, k] = g[token_ExK[e, k]].
    """
    n, c = d.slot_NxE.shape[0], a_ExKxC.shape[-1]
    rows_PxC = a_ExKxC.reshape(-1, c).at[d.order_P].get(mode="fill", fill_value=0)
    return jax.ops.segment_sum(rows_PxC, d.order_token_P, num_segments=n, indices_are_sorted=True)


def _sum_fwd(a_ExKxC, d):
    return sum_to_tokens(a_ExKxC, d), d


def _sum_bwd(d, g_NxC):
    return g_NxC.at[d.token_ExK].get(mode="fill", fill_value=0), None


sum_to_tokens.defvjp(_sum_fwd, _sum_bwd)


def slot_weights(weights_NxE: jax.Array, d: Dispatch) -> jax.Array:
    """w[token_ExK[e, k], e] per slot, [E, K], zero for empty slots."""
    e = weights_NxE.shape[1]
    return weights_NxE.at[d.token_ExK, jnp.arange(e)[:, None]].get(mode="fill", fill_value=0)


def combine_slots(weights_NxE: jax.Array, y_ExKxC: jax.Array, d: Dispatch) -> jax.Array:
    """out[t] = sum_e w[t, e] * y[e, slot(t, e)] over kept pairs, in float32, [N, C]."""
    w_ExK = slot_weights(weights_NxE.astype(jnp.float32), d)
    return sum_to_tokens(w_ExK[..., None] * y_ExKxC.astype(jnp.float32), d)


def to_pairs(a_ExKx: jax.Array, d: Dispatch) -> jax.Array:
    """A slot-space array [E, K, ...] in the pair layout [N, E, ...]: a[e, slot(t, e)], 0 where
    not kept."""
    e = a_ExKx.shape[0]
    return a_ExKx.at[jnp.arange(e)[None, :], d.slot_NxE].get(mode="fill", fill_value=0)


def dropped_fraction(mask_NxE: jax.Array, d: Dispatch) -> jax.Array:
    """Share of active pairs that exceeded their expert's capacity (float32 scalar)."""
    active = jnp.sum(mask_NxE.astype(jnp.float32))
    dropped = active - jnp.sum(d.kept_NxE.astype(jnp.float32))
    return dropped / jnp.maximum(active, 1.0)
