"""Routing metrics that are not inflated by a collapse (jittable, per MoE layer).

The original's gate accuracy (argmax pre == argmin S, `moe/gate_acc`) is kept, but it
misleads: with the faithful S = w |g| an inactive expert has S = 0, and a token whose loss
gradient is zero (a masked label) has S = 0 for every expert, so argmin S is expert 0 by
tie-breaking; when routing collapses onto expert 0 that "accuracy" climbs. These numbers
get no credit from the ties, and the load numbers show the collapse itself:

  gate_acc_informative  argmax pre == argmin S over tokens whose S row is not constant
                        (max S > min S), pooled over layers; 0 when no token qualifies
  load_cv               coefficient of variation (std / mean) over experts of the share of
                        tokens that activate each expert, mean over layers (0 = balanced)
  load_max_mean         max / mean of that share, mean over layers (1 = balanced, E = one expert)
  router_entropy        per-token entropy (nats) of the combine weights, mean over tokens and
                        layers (0 = one expert per token)
  fallback_share        share of tokens with no expert above its threshold, which take the
                        fallback experts (surprise router)
  target_inactive       share of tokens whose hard gate target argmin S is an inactive expert

Dead experts need a window (an expert may be idle in one batch and alive): the training
program counts them per layer from the window-averaged `moe/expert_load` (`dead_experts`).

Entry contracts (onn_jax.core.contracts): pre, S and the weights are floating [N, E], masks [N, E].
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.core.analysis import surprise_target_counts
from onn_jax.core.contracts import check_scores

# An expert is dead in a logging window if it is active for fewer than this share of tokens.
DEAD_LOAD_FLOOR = 1e-3


def informative_gate_hits(pre_NxE: jax.Array, surprise_NxE: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hits, count) of argmax pre == argmin S over tokens whose S row is not constant."""
    check_scores("informative_gate_hits", "pre_NxE", pre_NxE)
    check_scores("informative_gate_hits", "surprise_NxE", surprise_NxE)
    chex.assert_equal_shape([pre_NxE, surprise_NxE],
                            custom_message="informative_gate_hits: surprise_NxE must be [N, E] like pre_NxE")
    s = surprise_NxE.astype(jnp.float32)
    informative_N = jnp.max(s, -1) > jnp.min(s, -1)
    hit_N = jnp.argmax(pre_NxE, -1) == jnp.argmin(s, -1)
    return jnp.sum(hit_N & informative_N).astype(jnp.float32), jnp.sum(informative_N).astype(jnp.float32)


def load_balance(mask_NxE: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cv, max/mean) of the per-expert share of tokens that activate the expert; mask_NxE [N, E]."""
    chex.assert_rank(mask_NxE, 2, custom_message="load_balance: mask_NxE must be [N, E]")
    load_E = jnp.mean(mask_NxE.astype(jnp.float32), 0)
    mean = jnp.maximum(jnp.mean(load_E), 1e-12)
    return jnp.std(load_E) / mean, jnp.max(load_E) / mean


def weight_entropy(weights_NxE: jax.Array) -> jax.Array:
    """Mean over tokens of -sum_e w log w (0 log 0 = 0); weights_NxE floating [N, E]."""
    check_scores("weight_entropy", "weights_NxE", weights_NxE)
    w = weights_NxE.astype(jnp.float32)
    return jnp.mean(-jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), -1))


def routing_metrics(records, surprises, router: str) -> dict[str, jax.Array]:
    """The module docstring's metrics over the MoE layers of one step (records: one per layer;
    surprises: their S [N, E], one per record, read by the `surprise` router's metrics)."""
    mean = lambda xs: jnp.mean(jnp.stack(xs))
    balance = [load_balance(r.router.mask) for r in records]
    out = {"moe/load_cv": mean([b[0] for b in balance]),
           "moe/load_max_mean": mean([b[1] for b in balance]),
           "moe/router_entropy": mean([weight_entropy(r.router.weights) for r in records])}
    if router == "surprise":
        chex.assert_equal(len(surprises), len(records),
                          custom_message="routing_metrics: surprises must hold one S per record")
        n = records[0].router.mask.shape[0]
        hits = [informative_gate_hits(r.router.pre, s) for r, s in zip(records, surprises)]
        out["moe/gate_acc_informative"] = sum(h for h, _ in hits) / jnp.maximum(sum(c for _, c in hits), 1.0)
        out["moe/informative_share"] = mean([c / n for _, c in hits])
        out["moe/fallback_share"] = mean([jnp.mean(jnp.all(r.router.pre <= 0, -1).astype(jnp.float32))
                                          for r in records])
        out["moe/target_inactive"] = mean([surprise_target_counts(s, r.router.mask)[0] / n
                                           for r, s in zip(records, surprises)])
    return out


def dead_experts(expert_load_LxE, floor: float = DEAD_LOAD_FLOOR) -> np.ndarray:
    """[L] number of experts per layer whose (window-averaged) load is below `floor`."""
    return np.sum(np.asarray(expert_load_LxE, np.float64) < floor, axis=-1)
