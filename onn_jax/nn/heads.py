"""Gated attention heads as pure functions: the MoE's gate, taps and Surprise, over heads.

Per query token t (N = B*T) of one attention layer with H heads, x_t = Norm_attn(h_t):

    r       = top_any_gate(x, P_att, theta_att, fallback_k)   # or topk_gate (MoH baseline)
    a[t,h]  = causal softmax attention of head h               # unchanged (RoPE, 1/sqrt(D))
    Y[t,h]  = a[t,h] W_out[h]                                  # [N, H, C] per-head output, float32
    k_t     = sum_h mask[t,h]                                  # active heads (no gradient)
    Yt[t,h] = k_t Y[t,h] (combine `scaled`, MoH)  |  Y[t,h] (combine `softmax`)
    out_t   = sum_h w[t,h] Yt[t,h]

The zero taps are added to Yt [N, H, C] and out [N, C], so one reverse pass of the main loss
gives dL/dYt and g = dL/dout, and every surprise function of onn_jax.core.surprise_registry runs on heads
unchanged: a head layer's taps and record ARE the MoE's (`moe.MoETaps`, `moe.MoERecord`, a unit
being an expert or a head), and `moe.layer_surprise` takes its S. With all heads active and
w = 1/H, `scaled` is plain multi-head attention (tested).

The head form of `learning_cost` (per-token norm of the gradient that <g_t, Yt[t,h]> puts on
head h's own weights W_q[:, h] and W_out[h]) is `HeadGradNorms.unit_grad_norms`:

    LC^2[t,h] = s_t^2 |a[t,h]|^2 |g_t|^2 + |x_t|^2 |dq[t,h]|^2,   s_t = k_t (scaled) or 1

with dq[t,h] the gradient w.r.t. the (rotated) query of head h under the cotangent
s_t W_out[h] g_t on a[t,h]: one VJP of the attention map w.r.t. q (a query reaches only its
own output row). RoPE is a rotation, so |dq| is also the norm before it. Token t's keys and
values are shared with later queries and are left out.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import HeadsConfig
from onn_jax.core.experts import combine as weighted_sum
from onn_jax.core.gate import RouterOutput, top_any_gate, topk_gate
from onn_jax.nn.moe import MoERecord, MoETaps, zero_taps

HIGHEST = jax.lax.Precision.HIGHEST


class HeadGradNorms(NamedTuple):
    """What the head `learning_cost` needs of one attention layer (SurpriseInputs.expert_params).

    A surprise function that finds `unit_grad_norms` on expert_params calls it instead of the
    expert-FFN formula, so `learning_cost` works on every unit kind that declares it.
    """

    q_BxTxHxD: jax.Array    # rotated queries
    k_BxSxHxD: jax.Array    # rotated keys
    v_BxSxHxD: jax.Array
    q_pos_BxT: jax.Array
    kv_pos_BxS: jax.Array
    kv_valid_BxS: jax.Array | None
    w_out_HxDxC: jax.Array
    scale_N: jax.Array      # k_t (scaled) or 1 (softmax)
    attn_NxHxD: jax.Array   # a[t, h]

    def unit_grad_norms(self, x_NxC: jax.Array, g_NxC: jax.Array) -> jax.Array:
        """LC [N, H] (see the module docstring)."""
        from onn_jax.nn.attention import causal_attention  # model imports this module

        f32 = lambda a: a.astype(jnp.float32)
        b, t, h, d = self.q_BxTxHxD.shape
        g = f32(g_NxC)
        u_NxHxD = self.scale_N[:, None, None] * jnp.einsum("nc,hdc->nhd", g, f32(self.w_out_HxDxC),
                                                             precision=HIGHEST)
        attend = lambda q: causal_attention(q, f32(self.k_BxSxHxD), f32(self.v_BxSxHxD), self.q_pos_BxT,
                                            self.kv_pos_BxS, self.kv_valid_BxS)
        _, vjp = jax.vjp(attend, f32(self.q_BxTxHxD))
        (dq_BxTxHxD,) = vjp(u_NxHxD.reshape(b, t, h, d))
        sq = lambda a: jnp.sum(jnp.square(a), axis=-1)
        out_sq_NxH = jnp.square(self.scale_N)[:, None] * sq(f32(self.attn_NxHxD)) * sq(g)[:, None]
        q_sq_NxH = sq(f32(x_NxC))[:, None] * sq(dq_BxTxHxD.reshape(b * t, h, d))
        return jnp.sqrt(out_sq_NxH + q_sq_NxH)


def route_heads(params: dict, x_NxC: jax.Array, cfg: HeadsConfig, num_heads: int) -> RouterOutput:
    """The head gate: the top-any surprise gate or the linear top-k router, over heads."""
    if cfg.router == "surprise":
        return top_any_gate(x_NxC, params["head_prototypes"], params["head_thresholds"],
                            cfg.effective_fallback_k(num_heads))
    if cfg.router == "topk":
        return topk_gate(x_NxC, params["head_router"], cfg.top_k)
    raise ValueError(f"route_heads has no router {cfg.router!r}")


def head_outputs(attn_NxHxD: jax.Array, w_out_HxDxC: jax.Array) -> jax.Array:
    """Y[t, h] = a[t, h] W_out[h]: each head's slice of the output projection, float32 [N, H, C]."""
    return jnp.einsum("nhd,hdc->nhc", attn_NxHxD, w_out_HxDxC.astype(attn_NxHxD.dtype),
                      preferred_element_type=jnp.float32)


def combine_scale(router: RouterOutput, combine: str) -> jax.Array:
    """s_t per token [N]: the number of active heads (`scaled`) or 1 (`softmax`)."""
    if combine == "scaled":
        return jnp.sum(router.mask, axis=-1).astype(jnp.float32)
    return jnp.ones(router.mask.shape[:1], jnp.float32)


def gated_heads(router: RouterOutput, y_NxHxC: jax.Array, combine: str,
                taps: MoETaps | None = None) -> tuple[jax.Array, jax.Array]:
    """(out [N, C], Yt [N, H, C]): out_t = sum_h w[t,h] s_t Y[t,h], taps added to Yt and out."""
    yt_NxHxC = combine_scale(router, combine)[:, None, None] * y_NxHxC.astype(jnp.float32)
    if taps is not None:
        yt_NxHxC = yt_NxHxC + taps.expert_out
    out_NxC = weighted_sum(router.weights, yt_NxHxC)
    if taps is not None:
        out_NxC = out_NxC + taps.moe_out
    return out_NxC, yt_NxHxC


def head_layer(params: dict, x_NxC: jax.Array, attn_NxHxD: jax.Array, cfg: HeadsConfig,
               taps: MoETaps | None = None, grad_norms: HeadGradNorms | None = None
               ) -> tuple[jax.Array, MoERecord]:
    """Routes the heads, forms Y and combines: (out [N, C] float32, the layer's record).

    params: head_prototypes [C, H] and head_thresholds [H] (surprise) or head_router [C, H]
    (topk), and out [H, D, C] (W_out). `grad_norms` (queries, keys, values) is kept in the
    record for the head `learning_cost`.
    """
    h = attn_NxHxD.shape[1]
    router = route_heads(params, x_NxC, cfg, h)
    y_NxHxC = head_outputs(attn_NxHxD, params["out"])
    out_NxC, yt_NxHxC = gated_heads(router, y_NxHxC, cfg.combine, taps)
    if grad_norms is not None:
        grad_norms = grad_norms._replace(scale_N=combine_scale(router, cfg.combine))
    return out_NxC, MoERecord(router=router, expert_out=yt_NxHxC, expert_in=x_NxC, expert_params=grad_norms)


def head_taps(num_tokens: int, num_heads: int, hidden: int) -> MoETaps:
    """Zero taps of one gated attention layer: Yt [N, H, C] and out [N, C]."""
    return zero_taps(num_tokens, num_heads, hidden)
