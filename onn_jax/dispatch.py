"""Sparse capacity dispatch: run each expert only on its active tokens, with static shapes.

Every expert e gets a buffer of K = capacity slots. Active pairs (t, e) take the slots of
expert e in token order; pairs beyond the capacity are dropped (they add nothing to the
layer output, and their Surprise is 0). The three steps touch only the E*K slots, never the
N*E pair grid (a one-hot einsum dispatch would cost N*E*K*C multiply-adds, more than the
experts themselves):

  dispatch  x_ExKxC[e, k] = x[token_ExK[e, k]]              (a gather; empty slots read 0)
  experts   y_ExKxC = W2_e . act(W1_e . x_ExKxC)             (batched over E, bf16 matmuls)
  combine   out[t] = sum over t's slots of w[t, e] * y[e, k] (a float32 scatter-add)

Their autodiff transposes stay in slot space too: the dispatch's backward is a scatter-add
into [N, C], the combine's a gather of dL/dout per slot plus one [E, K] row of dL/dw.
On GPUs the scatter-adds use atomics, so the summation order of a token's (at most k)
terms may vary between runs in the last bits; XLA's `--xla_gpu_deterministic_ops=true`
makes them deterministic. This layout was 4.5x faster than gathering over the E pairs of
every token on an H100 (bench/kernels.py, docs/BENCHMARKS.md).

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
from onn_jax.experts import gelu_exact


class Dispatch(NamedTuple):
    """Where each active (token, expert) pair lives in its expert's slot buffer."""

    token_ExK: jax.Array  # int32 token of each slot; N (out of range) for an empty slot
    slot_NxE: jax.Array   # int32 slot of pair (t, e); K (out of range) where not kept
    kept_NxE: jax.Array   # bool: active and within the capacity


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
    return Dispatch(token_ExK=token_ExK, slot_NxE=slot_NxE, kept_NxE=kept_NxE)


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
    """x_ExKxC[e, k] = x[token_ExK[e, k]], zero for empty slots (backward: a scatter-add)."""
    return x_NxC.at[d.token_ExK].get(mode="fill", fill_value=0)


def sum_to_tokens(a_ExKxC: jax.Array, d: Dispatch) -> jax.Array:
    """out[t] = sum of a over the slots of token t, [N, C] (empty slots are dropped)."""
    n, c = d.slot_NxE.shape[0], a_ExKxC.shape[-1]
    return jnp.zeros((n, c), a_ExKxC.dtype).at[d.token_ExK.reshape(-1)].add(
        a_ExKxC.reshape(-1, c), mode="drop")


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
