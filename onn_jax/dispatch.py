"""Sparse capacity dispatch: run each expert only on its active tokens, with static shapes.

Every expert e gets a buffer of K = capacity slots. Active pairs (t, e) take the slots of
expert e in token order; pairs beyond the capacity are dropped (they add nothing to the
layer output, and their Surprise is 0). The three steps, gathers and batched matmuls (a one-hot
einsum dispatch would cost N*E*K*C multiply-adds, more than the experts themselves):

  dispatch  x_ExKxC[e, k] = x[token_ExK[e, k]]              (row N is a zero pad row)
  experts   y_ExKxC = W2_e . act(W1_e . x_ExKxC)             (batched over E, bf16 matmuls)
  combine   out[t] = sum_e w[t, e] * y[e, slot(t, e)]        (float32; slot K is a zero pad)

Both ends and their custom backwards are gathers: every pair has exactly one slot, so no
transpose needs a scatter-add; the result is deterministic (no atomics) and was no slower
than the scatter-add version on an H100 (docs/BENCHMARKS.md).

With nothing dropped (capacity_factor None: K = N) the output, the Surprise of every
active pair and all gradients equal the dense path's (tests/test_dispatch.py).
The Surprise taps live in slot space ([E, K, C]); `to_pairs` maps a slot-space array back
to the dense [N, E, C] layout (zero on pairs that were not computed) for surprise
functions, which XLA fuses into their reduction instead of materialising it.
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

    token_ExK: jax.Array  # int32 token of each slot; N (the pad row) for an empty slot
    slot_NxE: jax.Array   # int32 slot of pair (t, e); K (the pad slot) where not kept
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


@jax.custom_vjp
def dispatch_tokens(x_NxC: jax.Array, d: Dispatch) -> jax.Array:
    """x_ExKxC[e, k] = x[token_ExK[e, k]], zero for empty slots.

    Its backward is a gather (dx[t] = sum_e g[e, slot(t, e)]), not the scatter-add autodiff
    would emit: each (t, e) pair has one slot, so the transpose needs no atomics.
    """
    x_pad = jnp.concatenate([x_NxC, jnp.zeros((1, x_NxC.shape[1]), x_NxC.dtype)], axis=0)
    return x_pad[d.token_ExK]


def _dispatch_fwd(x_NxC, d):
    return dispatch_tokens(x_NxC, d), d


def _dispatch_bwd(d, g_ExKxC):
    dx_NxC = jnp.sum(to_pairs(g_ExKxC.astype(jnp.float32), d), axis=1)
    return dx_NxC.astype(g_ExKxC.dtype), None


dispatch_tokens.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine_slots(weights_NxE: jax.Array, y_ExKxC: jax.Array, d: Dispatch) -> jax.Array:
    """out[t] = sum_e w[t, e] * y[e, slot(t, e)] over kept pairs, in float32, [N, C].

    Forward and backward are gathers (no scatter-add, no atomics):
    dy[e, k] = w[token, e] * g[token] and dw[t, e] = <g[t], y[e, slot(t, e)]>.
    """
    y_NxExC = to_pairs(y_ExKxC.astype(jnp.float32), d)  # a gather XLA fuses into the sum
    return jnp.sum(weights_NxE.astype(jnp.float32)[..., None] * y_NxExC, axis=1)


def _combine_fwd(weights_NxE, y_ExKxC, d):
    return combine_slots(weights_NxE, y_ExKxC, d), (weights_NxE, y_ExKxC, d)


def _combine_bwd(res, g_NxC):
    weights_NxE, y_ExKxC, d = res
    n, e = weights_NxE.shape
    g = g_NxC.astype(jnp.float32)
    w_pad = jnp.concatenate([weights_NxE.astype(jnp.float32), jnp.zeros((1, e), jnp.float32)], axis=0)
    g_pad = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), jnp.float32)], axis=0)
    w_ExK = w_pad[d.token_ExK, jnp.arange(e)[:, None]]
    dy_ExKxC = (w_ExK[..., None] * g_pad[d.token_ExK]).astype(y_ExKxC.dtype)
    dw_NxE = jnp.sum(to_pairs(y_ExKxC.astype(jnp.float32), d) * g[:, None, :], axis=-1)
    return dw_NxE.astype(weights_NxE.dtype), dy_ExKxC, None


combine_slots.defvjp(_combine_fwd, _combine_bwd)


def to_pairs(a_ExKxC: jax.Array, d: Dispatch) -> jax.Array:
    """A slot-space array in the dense pair layout [N, E, C]: a[e, slot(t, e)], 0 where not kept."""
    e = a_ExKxC.shape[0]
    a_pad = jnp.concatenate([a_ExKxC, jnp.zeros_like(a_ExKxC[:, :1])], axis=1)
    return a_pad[jnp.arange(e)[None, :], d.slot_NxE]


def dropped_fraction(mask_NxE: jax.Array, d: Dispatch) -> jax.Array:
    """Share of active pairs that exceeded their expert's capacity (float32 scalar)."""
    active = jnp.sum(mask_NxE.astype(jnp.float32))
    dropped = active - jnp.sum(d.kept_NxE.astype(jnp.float32))
    return dropped / jnp.maximum(active, 1.0)
