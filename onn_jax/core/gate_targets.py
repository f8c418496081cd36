"""Surprise gate-loss variants aimed at the diagnosed failure modes (issue 16, docs/RESEARCH.md).

All pure functions of [N, E] arrays; the gate options of onn_jax.training.options apply them by MoEConfig options.

- `random_tie_argmin`: the hard target argmin S with ties broken uniformly at random instead of
  toward the lowest index. Why: with the faithful S = w |g| every inactive expert ties at 0 and
  jnp.argmin always names the lowest-index one, so high-index experts are never a target and die.
- `nonconstant_rows`: tokens whose S row is not constant. Why: a token whose loss gradient is 0
  (a masked label, in the top layer) has S = 0 everywhere, its hard target is expert 0 and its
  soft target uniform: 86% of the builtin corpus's positions, which collapses the top layer.
- `avg_k_budget`: (mean_t sum_e sigmoid(pre / tau) - k)^2, a differentiable surrogate of
  (avg_k - k)^2. Why: the top-any gate ended at k ~ 1 or in the fallback (k = E/2); matched
  active compute with top-2 needs avg_k ~ 2. `expected_k` also counts the fallback: at E = 32
  the thresholded count alone was held near 2 while half the tokens fell into the E/2 fallback.
The temperature of the soft target and KL-only / CE-only losses are arguments of
onn_jax.core.losses.hybrid_gate_loss (kl_temperature, w_ce, w_kl).
Entry contracts (onn_jax.core.contracts): S and pre are floating [N, E], live [E].
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from onn_jax.core.contracts import check_scores

BUDGET_TAU = 0.1  # sharpness of the sigmoid that stands for "pre > 0"


def random_tie_argmin(surprise_NxE: jax.Array, key: jax.Array) -> jax.Array:
    """[N] int32: per row, an index drawn uniformly among the entries equal to the row minimum."""
    check_scores("random_tie_argmin", "surprise_NxE", surprise_NxE)
    s = surprise_NxE.astype(jnp.float32)
    tied_NxE = s == jnp.min(s, axis=-1, keepdims=True)
    u_NxE = jax.random.uniform(key, s.shape)
    return jnp.argmax(jnp.where(tied_NxE, u_NxE, -1.0), axis=-1).astype(jnp.int32)


def nonconstant_rows(surprise_NxE: jax.Array, live_E: jax.Array | None = None) -> jax.Array:
    """[N] bool: the row of S has at least two different values (among the live experts).
    live_E: [E] of any dtype (cast to bool)."""
    check_scores("nonconstant_rows", "surprise_NxE", surprise_NxE)
    if live_E is not None:
        chex.assert_shape(live_E, surprise_NxE.shape[1:],
                          custom_message="nonconstant_rows: live_E must be [E], E of surprise_NxE")
    s = surprise_NxE.astype(jnp.float32)
    if live_E is None:
        return jnp.max(s, axis=-1) > jnp.min(s, axis=-1)
    live = live_E.astype(jnp.bool_)[None, :]
    return jnp.max(jnp.where(live, s, -jnp.inf), -1) > jnp.min(jnp.where(live, s, jnp.inf), -1)


def soft_k(pre_NxE: jax.Array, tau: float = BUDGET_TAU) -> jax.Array:
    """[N]: sum_e sigmoid(pre[t, e] / tau), a smooth count of the experts above threshold."""
    check_scores("soft_k", "pre_NxE", pre_NxE)
    return jnp.sum(jax.nn.sigmoid(pre_NxE.astype(jnp.float32) / tau), axis=-1)


def expected_k(pre_NxE: jax.Array, fallback_k: int, tau: float = BUDGET_TAU) -> jax.Array:
    """[N]: the expected expert count when expert e is active with probability sigmoid(pre / tau),
    independently, and a token with none active takes fallback_k experts (as the gate does):
    soft_k + fallback_k * prod_e (1 - sigmoid(pre / tau)), the product taken in log space."""
    check_scores("expected_k", "pre_NxE", pre_NxE)
    z_NxE = pre_NxE.astype(jnp.float32) / tau
    p_none_N = jnp.exp(jnp.sum(jax.nn.log_sigmoid(-z_NxE), axis=-1))
    return soft_k(pre_NxE, tau) + fallback_k * p_none_N


def avg_k_budget(pre_NxE: jax.Array, budget_k: float, tau: float = BUDGET_TAU,
                 fallback_k: int | None = None) -> jax.Array:
    """(mean_t k_t - budget_k)^2: pulls the gate's mean expert count toward budget_k. k_t is
    soft_k (the thresholded count), or expected_k when fallback_k is given (fallback counted)."""
    check_scores("avg_k_budget", "pre_NxE", pre_NxE)
    k_N = soft_k(pre_NxE, tau) if fallback_k is None else expected_k(pre_NxE, fallback_k, tau)
    return jnp.square(jnp.mean(k_N) - budget_k)
