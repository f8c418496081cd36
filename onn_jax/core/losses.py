"""Losses as pure functions: masked next-token CE, the hybrid Surprise gate loss, and the
Switch load-balancing / router z-losses of the top-k baseline. All math in float32.

Entry contracts (onn_jax.core.contracts): scores are floating, labels and hard targets
integer, masks shaped like the tokens ([N] or [B, T]).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from onn_jax.core.contracts import check_per_token, check_scores


def next_token_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array):
    """Mean cross entropy and accuracy over positions whose label is not masked.

    logits_BxTxV floating [B, T, V]; targets_BxT integer and mask_BxT (0/1, any dtype)
    [B, T]. Returns (loss, accuracy, number of counted positions).
    """
    chex.assert_rank(logits_BxTxV, 3, custom_message="next_token_loss: logits_BxTxV must be [B, T, V]")
    chex.assert_type(logits_BxTxV, float, custom_message="next_token_loss: logits_BxTxV must be floating")
    chex.assert_shape(targets_BxT, logits_BxTxV.shape[:2],
                      custom_message="next_token_loss: targets_BxT must be [B, T] of logits_BxTxV")
    chex.assert_type(targets_BxT, int, custom_message="next_token_loss: targets_BxT must be integer")
    chex.assert_shape(mask_BxT, logits_BxTxV.shape[:2],
                      custom_message="next_token_loss: mask_BxT must be [B, T] of logits_BxTxV")
    logits = logits_BxTxV.astype(jnp.float32)
    mask = mask_BxT.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxT)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    loss = jnp.sum(ce * mask) / denom
    correct = (jnp.argmax(logits, axis=-1) == targets_BxT).astype(jnp.float32)
    acc = jnp.sum(correct * mask) / denom
    return loss, acc, count


def hybrid_gate_loss(pre_NxE: jax.Array, surprise_NxE: jax.Array, w_ce: float = 1.0,
                     w_kl: float = 1.0, token_mask_N: jax.Array | None = None,
                     kl_temperature: float = 1.0, target_N: jax.Array | None = None):
    """w_ce * CE(pre, argmin S) + w_kl * KL(softmax(-S / kl_temperature) || softmax(pre)).

    CE is averaged over tokens; KL is summed over experts and averaged over tokens
    (PyTorch's kl_div 'batchmean'). Surprise is treated as a constant. `token_mask_N`
    (an option; faithful: None, all tokens count) restricts the mean to some tokens.
    Options (faithful: 1 and None): the soft target's temperature, and a hard target
    `target_N` [N] chosen by the caller (e.g. onn_jax.core.gate_targets.random_tie_argmin).
    pre_NxE and surprise_NxE floating [N, E]; token_mask_N [N] (any dtype); target_N [N] integer.
    Returns (loss, {"ce": ..., "kl": ...}).
    """
    check_scores("hybrid_gate_loss", "pre_NxE", pre_NxE)
    chex.assert_equal_shape([pre_NxE, surprise_NxE],
                            custom_message="hybrid_gate_loss: surprise_NxE must be [N, E] like pre_NxE")
    chex.assert_type(surprise_NxE, float, custom_message="hybrid_gate_loss: surprise_NxE must be floating")
    check_per_token("hybrid_gate_loss", "token_mask_N", token_mask_N, pre_NxE.shape[0])
    check_per_token("hybrid_gate_loss", "target_N", target_N, pre_NxE.shape[0])
    if target_N is not None:
        chex.assert_type(target_N, int, custom_message="hybrid_gate_loss: target_N must be integer")
    pre = pre_NxE.astype(jnp.float32)
    s = jax.lax.stop_gradient(surprise_NxE.astype(jnp.float32))
    log_q = jax.nn.log_softmax(pre, axis=-1)
    target = jnp.argmin(s, axis=-1) if target_N is None else target_N
    ce_N = -jnp.take_along_axis(log_q, target[:, None], axis=-1)[:, 0]
    log_p = jax.nn.log_softmax(-s if kl_temperature == 1.0 else -s / kl_temperature, axis=-1)
    kl_N = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    if token_mask_N is None:
        weights = jnp.full(ce_N.shape, 1.0 / ce_N.shape[0], jnp.float32)
    else:
        m = token_mask_N.astype(jnp.float32)
        weights = m / jnp.maximum(jnp.sum(m), 1.0)
    ce = jnp.sum(ce_N * weights)
    kl = jnp.sum(kl_N * weights)
    return w_ce * ce + w_kl * kl, {"ce": ce, "kl": kl}


def load_balancing_loss(router_logits_NxE: jax.Array, mask_NxE: jax.Array) -> jax.Array:
    """Switch Transformer auxiliary loss E * sum_e f_e * P_e.

    f_e: fraction of (token, slot) assignments that go to expert e (no gradient);
    P_e: mean router probability of expert e. Equals 1 under perfect balance.
    router_logits_NxE floating [N, E]; mask_NxE [N, E] (bool, or 0/1 of any dtype).
    """
    check_scores("load_balancing_loss", "router_logits_NxE", router_logits_NxE)
    chex.assert_equal_shape([router_logits_NxE, mask_NxE],
                            custom_message="load_balancing_loss: mask_NxE must be [N, E] like router_logits_NxE")
    num_experts = router_logits_NxE.shape[-1]
    probs = jax.nn.softmax(router_logits_NxE.astype(jnp.float32), axis=-1)
    assign = mask_NxE.astype(jnp.float32)
    frac = jnp.sum(assign, axis=0) / jnp.maximum(jnp.sum(assign), 1.0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(frac) * jnp.mean(probs, axis=0))


def router_z_loss(router_logits_NxE: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; logits floating [N, E]."""
    check_scores("router_z_loss", "router_logits_NxE", router_logits_NxE)
    z = jax.nn.logsumexp(router_logits_NxE.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(z))
