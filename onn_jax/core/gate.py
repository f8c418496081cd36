"""Routers as pure functions of arrays: the top-any surprise gate and a top-k baseline.

The top-any gate (DynMoE style, docs/ALGORITHM.md section 1):
  1. logits[t, e] = <x_t / |x_t|, P_e / |P_e|>          cosine similarity to prototypes
  2. pre[t, e]    = logits[t, e] - sigmoid(theta_e)     learnable thresholds
  3. active       = relu(pre) > 0                       k is dynamic, 0..E per token
  4. fallback     tokens with no active expert take their top `fallback_k` by logits
  5. weights      softmax(relu(pre)) over active experts, exactly 0 elsewhere
All router math runs in float32 whatever the compute dtype.

Entry contracts (onn_jax.core.contracts): tokens are floating [N, C] (bfloat16 included),
prototypes / router weights floating [C, E] with the tokens' C, per-expert vectors [E].
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from onn_jax.core.contracts import check_tokens


class RouterOutput(NamedTuple):
    """What a router hands to the MoE layer and to its gate loss, all [N, E]."""

    logits: jax.Array   # router scores (cosine similarity, or linear logits for top-k)
    pre: jax.Array      # scores the gate loss trains (pre-activation; = logits for top-k)
    mask: jax.Array     # bool, expert active for the token (after fallback)
    weights: jax.Array  # combine weights, sum to 1 over active experts, 0 elsewhere


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) along `axis` (PyTorch F.normalize semantics).

    Written as x * rsqrt(max(|x|^2, eps^2)): the same values, and a finite gradient at x = 0
    (where the gradient of sqrt would be inf * 0 = NaN). x: any shape, floating.
    """
    chex.assert_type(x, float, custom_message="l2_normalize: x must be floating")
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_router_inputs(fn: str, x_NxC: jax.Array, w_CxE: jax.Array, w_name: str) -> None:
    """The routers' shared contract: floating tokens [N, C] and a floating [C, E] with their C."""
    check_tokens(fn, "x_NxC", x_NxC)
    chex.assert_shape(w_CxE, (x_NxC.shape[1], None), custom_message=f"{fn}: {w_name} must be [C, E], C of x_NxC")
    chex.assert_type(w_CxE, float, custom_message=f"{fn}: {w_name} must be floating")


def cosine_logits(x_NxC: jax.Array, protos_CxE: jax.Array) -> jax.Array:
    """Cosine similarity of every token to every expert prototype, float32 [N, E].

    x_NxC [N, C] and protos_CxE [C, E], both floating.
    """
    _check_router_inputs("cosine_logits", x_NxC, protos_CxE, "protos_CxE")
    x = l2_normalize(x_NxC.astype(jnp.float32), axis=-1)
    p = l2_normalize(protos_CxE.astype(jnp.float32), axis=0)
    return jnp.einsum("nc,ce->ne", x, p, precision=jax.lax.Precision.HIGHEST)


def masked_softmax(scores_NxE: jax.Array, mask_NxE: jax.Array) -> jax.Array:
    """Softmax over the entries where mask is True; exactly 0 elsewhere.

    scores_NxE floating, mask_NxE bool of the same shape. Every row must have at least one
    True entry (the gate's fallback guarantees it).
    """
    chex.assert_type(scores_NxE, float, custom_message="masked_softmax: scores_NxE must be floating")
    chex.assert_type(mask_NxE, bool, custom_message="masked_softmax: mask_NxE must be bool")
    chex.assert_equal_shape([scores_NxE, mask_NxE],
                            custom_message="masked_softmax: scores_NxE and mask_NxE must have one shape")
    neg = jnp.finfo(scores_NxE.dtype).min
    row_max = jax.lax.stop_gradient(jnp.max(jnp.where(mask_NxE, scores_NxE, neg), -1, keepdims=True))
    e = jnp.where(mask_NxE, jnp.exp(jnp.where(mask_NxE, scores_NxE - row_max, 0.0)), 0.0)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def topk_mask(scores_NxE: jax.Array, k: int) -> jax.Array:
    """Boolean [N, E] mask of each row's k largest scores."""
    _, idx_NxK = jax.lax.top_k(scores_NxE, k)
    return jnp.any(jax.nn.one_hot(idx_NxK, scores_NxE.shape[-1], dtype=jnp.bool_), axis=-2)


DEAD_SCORE = -1e9  # pre/logits of a masked-out (not live) expert: finite, so softmaxes stay finite


def top_any_gate(x_NxC: jax.Array, protos_CxE: jax.Array, theta_E: jax.Array,
                 fallback_k: int, live_E: jax.Array | None = None) -> RouterOutput:
    """The faithful top-any gate with learnable thresholds and a top-`fallback_k` fallback.

    Gradients reach the prototypes and thresholds through `weights` (via relu(pre)) and
    through `pre`; the boolean mask carries none. Fallback experts have relu(pre) = 0 and
    so share their token's weight equally.

    `live_E` (option, the adaptive expert count): experts with live False get logits and pre
    DEAD_SCORE, so they are never active, never a fallback expert and get no gradient; the
    fallback takes min(fallback_k, live experts) experts. None: every expert is live.

    x_NxC [N, C], protos_CxE [C, E], theta_E [E] floating; live_E [E] of any dtype (cast to bool).
    """
    _check_router_inputs("top_any_gate", x_NxC, protos_CxE, "protos_CxE")
    num_experts = protos_CxE.shape[1]
    chex.assert_shape(theta_E, (num_experts,), custom_message="top_any_gate: theta_E must be [E], E of protos_CxE")
    chex.assert_type(theta_E, float, custom_message="top_any_gate: theta_E must be floating")
    if live_E is not None:
        chex.assert_shape(live_E, (num_experts,), custom_message="top_any_gate: live_E must be [E], E of protos_CxE")
    logits = cosine_logits(x_NxC, protos_CxE)
    pre = logits - jax.nn.sigmoid(theta_E.astype(jnp.float32))[None, :]
    if live_E is not None:
        live = live_E.astype(jnp.bool_)[None, :]
        logits, pre = jnp.where(live, logits, DEAD_SCORE), jnp.where(live, pre, DEAD_SCORE)
    gated = jax.nn.relu(pre)
    active = gated > 0
    none_active = ~jnp.any(active, axis=-1, keepdims=True)
    fallback = topk_mask(logits, fallback_k)
    if live_E is not None:
        fallback = fallback & live
    mask = active | (none_active & fallback)
    weights = masked_softmax(gated, mask)
    return RouterOutput(logits=logits, pre=pre, mask=mask, weights=weights)


def topk_gate(x_NxC: jax.Array, router_CxE: jax.Array, k: int,
              select_bias_E: jax.Array | None = None) -> RouterOutput:
    """Baseline linear router: softmax probabilities, top-k experts, renormalised weights.

    `select_bias_E` (option, aux-loss-free balancing): added to the logits for choosing the
    top k only; the weights are still the softmax of the unbiased logits over the chosen experts.

    x_NxC [N, C], router_CxE [C, E] and select_bias_E [E], floating.
    """
    _check_router_inputs("topk_gate", x_NxC, router_CxE, "router_CxE")
    if select_bias_E is not None:
        chex.assert_shape(select_bias_E, (router_CxE.shape[1],),
                          custom_message="topk_gate: select_bias_E must be [E], E of router_CxE")
        chex.assert_type(select_bias_E, float, custom_message="topk_gate: select_bias_E must be floating")
    logits = jnp.einsum("nc,ce->ne", x_NxC.astype(jnp.float32), router_CxE.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = logits if select_bias_E is None else logits + jax.lax.stop_gradient(select_bias_E)[None, :]
    mask = topk_mask(scores, k)
    weights = masked_softmax(logits, mask)
    return RouterOutput(logits=logits, pre=logits, mask=mask, weights=weights)
