"""Sparse embeddings as pure functions: the Surprise-gated slot embedding, DeepEmbed, and a
hashed n-gram memory (model.embed; docs/FULL_STACK.md).

Slot embedding (`kind = slots`; product-key-memory style, Tiny-ONN's planned "DynSE"):
    code_t = Z[id_t]                                       # [N, d_z] learned token code
    r      = top_any_gate(code, P_emb, theta_emb, fallback_k)  # the MoE's gate over M slots
    x0_t   = sum_m w[t,m] S_m                              # convex mix of shared slots S [M, C]
One zero tap on x0 [N, C] gives g_t = dL/dx0_t. Each slot's "output" is S_m for every token,
so the Surprise has a closed form and [N, M, C] is never built:
    output_grad = output_grad_closed:  S[t,m] = w[t,m] |g_t|
    advantage:                         A[t,m] = <g_t, S_m> - <g_t, x0_t>
(`learning_cost` would be |g_t| for every slot: refused by the config.)

DeepEmbed (`deep = true`, RWKV-8): block l adds moe_out_t * D_l[id_t], D_l [V, C] init 1.

Hashed n-gram memory (`ngram = 2 | 3`, Engram-style without the ShortConv): for each order
n = 2..ngram and hash head k, idx = (XOR_j id_{t-j} * mult_{n,k,j}) mod B with fixed odd
multipliers (a pure function of the ids and NGRAM_SEED); e_t = concat_{n,k} E_{n,k}[idx];
    s_t = <RMSNorm(W_K e_t), RMSNorm(x0_t)> / sqrt(C),  alpha_t = sigmoid(sign(s) sqrt(|s|))
    x0_t <- x0_t + alpha_t W_V e_t
Positions before the row start hash the id `vocab_size` (a pad); causal by construction.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.core.gate import RouterOutput, top_any_gate

HIGHEST = jax.lax.Precision.HIGHEST
NGRAM_SEED = 20250721


class SlotRecord(NamedTuple):
    """The slot embedding's forward values for its gate loss, Surprise and metrics."""

    router: RouterOutput  # over the M slots, [N, M]
    x0: jax.Array         # [N, C] float32 mixed embedding (tap included)
    slots: jax.Array      # [M, C] float32


def slot_embed(params: dict, ids_N: jax.Array, fallback_k: int,
               tap_NxC: jax.Array | None = None) -> tuple[jax.Array, SlotRecord]:
    """(x0 [N, C] float32, record). params: codes [V, d_z], slot_prototypes [d_z, M],
    slot_thresholds [M], slots [M, C]."""
    code_NxZ = jnp.take(params["codes"], ids_N, axis=0)
    router = top_any_gate(code_NxZ, params["slot_prototypes"], params["slot_thresholds"], fallback_k)
    slots_MxC = params["slots"].astype(jnp.float32)
    x0_NxC = jnp.einsum("nm,mc->nc", router.weights, slots_MxC, precision=HIGHEST)
    if tap_NxC is not None:
        x0_NxC = x0_NxC + tap_NxC
    return x0_NxC, SlotRecord(router=router, x0=x0_NxC, slots=slots_MxC)


def slot_surprise(name: str, record: SlotRecord, g_NxC: jax.Array) -> jax.Array:
    """S [N, M] of the slot gate in closed form from g = dL/dx0 (see the module docstring)."""
    g = g_NxC.astype(jnp.float32)
    if name in ("output_grad", "output_grad_closed"):
        return record.router.weights * jnp.sqrt(jnp.sum(jnp.square(g), -1))[:, None]
    if name == "advantage":
        return (jnp.einsum("nc,mc->nm", g, record.slots, precision=HIGHEST)
                - jnp.sum(g * record.x0, -1)[:, None])
    raise ValueError(f"slot embedding has no closed-form surprise {name!r}; use output_grad, "
                     "output_grad_closed or advantage")


def deep_scale(table_VxC: jax.Array, ids_BxT: jax.Array) -> jax.Array:
    """DeepEmbed's per-token scale D_l[id_t], [B, T, C]."""
    return jnp.take(table_VxC, ids_BxT, axis=0)


def ngram_multipliers(order: int, heads: int) -> np.ndarray:
    """[heads, order] fixed odd uint32 multipliers of one n-gram order (seeded, constant)."""
    rng = np.random.default_rng(NGRAM_SEED + order)
    return (rng.integers(1, 2 ** 31, size=(heads, order), dtype=np.int64) * 2 + 1).astype(np.uint32)


def previous_ids(ids_BxT: jax.Array, lags: int, pad_id: int, history_BxS: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None) -> jax.Array:
    """[B, T, lags + 1]: id_{t-j} for j = 0..lags (pad_id before the row start).

    Without history the row itself is the context (positions 0..T-1); with a decode cache's
    token history [B, S] (absolute positions) id_{t-j} = history[pos_t - j].
    """
    cols = [ids_BxT]
    for j in range(1, lags + 1):
        if history_BxS is None:
            shifted = jnp.pad(ids_BxT, ((0, 0), (j, 0)), constant_values=pad_id)[:, :ids_BxT.shape[1]]
        else:
            pos = positions_BxT - j
            got = jnp.take_along_axis(history_BxS, jnp.maximum(pos, 0), axis=1)
            shifted = jnp.where(pos >= 0, got, pad_id)
        cols.append(shifted)
    return jnp.stack(cols, axis=-1)


def ngram_bucket_ids(ctx_BxTxJ: jax.Array, max_order: int, heads: int, buckets: int) -> jax.Array:
    """[B, T, (max_order - 1) * heads] bucket ids: orders 2..max_order, hash heads 0..heads-1."""
    ids = ctx_BxTxJ.astype(jnp.uint32)
    out = []
    for n in range(2, max_order + 1):
        mult = jnp.asarray(ngram_multipliers(n, heads))  # [K, n]
        for k in range(heads):
            h = ids[..., 0] * mult[k, 0]
            for j in range(1, n):
                h = h ^ (ids[..., j] * mult[k, j])
            out.append((h % jnp.uint32(buckets)).astype(jnp.int32))
    return jnp.stack(out, axis=-1)


def ngram_memory(params: dict, bucket_ids_NxK: jax.Array, x0_NxC: jax.Array, rms) -> jax.Array:
    """alpha_t W_V e_t [N, C] float32. params: tables [K, B, d], key [K*d, C], value [K*d, C];
    `rms(name, x)` applies the named learned RMSNorm."""
    k = bucket_ids_NxK.shape[-1]
    e_NxKxD = params["tables"][jnp.arange(k)[None, :], bucket_ids_NxK].astype(jnp.float32)
    e_NxF = e_NxKxD.reshape(e_NxKxD.shape[0], -1)
    key_NxC = e_NxF @ params["key"].astype(jnp.float32)
    c = x0_NxC.shape[-1]
    s_N = jnp.sum(rms("norm_key", key_NxC) * rms("norm_query", x0_NxC.astype(jnp.float32)), -1) / np.sqrt(c)
    alpha_N = jax.nn.sigmoid(jnp.sign(s_N) * jnp.sqrt(jnp.maximum(jnp.abs(s_N), 1e-6)))
    return alpha_N[:, None] * (e_NxF @ params["value"].astype(jnp.float32))
