"""Exact gradient accumulation: k microbatches whose summed gradient is the one-batch gradient.

    grads, metrics = accumulated_grads(compute_grads, params, batch, cfg, k)

The one-batch step's losses are means over the whole batch: the main loss over its unmasked
labels (count L), the Surprise gate loss over its N tokens (or, with gate_tokens='unmasked',
over its L unmasked labels). Microbatch j (L_j labels, N_j = N / k tokens) therefore enters
with its main loss times L_j / L (known from the loss mask before the forward) and its gate
loss times N_j / N (or L_j / L). Scaling the main loss scales dL/dY, so each microbatch's
Surprise is exactly the one-batch Surprise of its tokens, for every surprise definition
(the forward has no interaction between batch rows). The microbatches run in a jax.lax.scan
inside the jitted step; the 2-sigma filter and AdamW then act once on the summed gradient.

Microbatch j holds rows j, j + k, j + 2k, ... of the batch, so a batch sharded along its rows
gives every device an equal share of each microbatch.

Exact only where the one-batch losses are sums over rows: not for the top-k router's
load-balancing loss (a product of two batch means; here the k-microbatch mean of it) nor for
sparse dispatch with a capacity_factor (the capacity is per microbatch).

Metrics equal the one-batch metrics where they are batch means or sums: main loss/accuracy,
loss tokens, gate loss (ce, kl), total loss, avg_k, expert load, gate accuracy (both),
surprise mean, threshold mean, router entropy, fallback share, target inactive, informative
share, idle experts (`moe/expert_active` is OR-ed over microbatches, so the optimizer's no-token
rule sees the batch's experts). NOT_BATCH_VALUES (ratios or spreads of counts, and the top-k
`moe/gate_lb`) are means over microbatches, not the one-batch values. Gated heads / embedding
slots (model.heads, model.embed) take the MoE gate's share for their gate losses: exact when
their gate_tokens equals model.moe.gate_tokens.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.parallel.constrain import constrain

# How each microbatch metric combines into the batch metric: weighted by the microbatch's
# share of the labels ("labels"), of the gate loss's tokens ("gate"), summed ("sum"), or a
# plain mean over the equal-sized microbatches (every other key).
LABEL_WEIGHTED = ("train/main_loss", "train/main_acc", "moe/gate_acc_unmasked")
GATE_WEIGHTED = ("moe/gate_loss", "moe/gate_ce", "moe/gate_kl", "moe/gate_z", "moe/gate_lb")
SUMMED = ("train/loss_tokens",)
# Which experts received a token ([L, E] bool, for the optimizer's no-token rule): an expert
# is active in the batch when it is active in any microbatch.
ANY = ("moe/expert_active",)
# Ratios and spreads of batch counts: the mean over microbatches, not the one-batch value.
NOT_BATCH_VALUES = ("moe/dropped_frac", "moe/gate_lb", "moe/load_cv", "moe/load_max_mean",
                    "moe/gate_acc_informative")


def split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...], microbatch j holding rows j, j+k, j+2k, ... (strided)."""
    def one(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"optim.accum_steps ({k}) must divide the batch size ({b})")
        x = x.reshape((b // k, k) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(one, batch)


def accumulated_grads(compute_grads: Callable, params: Any, batch: dict[str, jax.Array], cfg: ModelConfig, k: int,
                      surprise_fn=None) -> tuple[Any, dict[str, jax.Array]]:
    """The one-batch (grads, metrics) of `compute_grads` (onn_jax.training.step.compute_grads, passed
    in by the step), from k microbatches."""
    micro = split_microbatches(batch, k)
    labels_K = jnp.sum(micro["loss_mask"].astype(jnp.float32).reshape(k, -1), axis=1)
    label_share_K = labels_K / jnp.maximum(jnp.sum(labels_K), 1.0)
    if cfg.moe.gate_tokens == "unmasked" and cfg.moe.router == "surprise":
        gate_share_K = label_share_K
    else:
        gate_share_K = jnp.full((k,), 1.0 / k, jnp.float32)

    def body(grads_sum, xs):
        mb, main_share, gate_share = xs
        grads, metrics = compute_grads(params, mb, cfg, surprise_fn, main_share=main_share,
                                       gate_share=gate_share)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics_K = jax.lax.scan(body, zeros, (micro, label_share_K, gate_share_K))
    return grads, combine_metrics(metrics_K, label_share_K, gate_share_K, cfg.moe.w_aux)


def combine_metrics(metrics_K: dict[str, jax.Array], label_share_K: jax.Array,
                    gate_share_K: jax.Array, w_aux: float) -> dict[str, jax.Array]:
    """Batch metrics from per-microbatch metrics stacked along a leading axis of size k."""
    def weighted(x, w_K):
        return jnp.tensordot(w_K.astype(x.dtype), x, axes=1)

    out = {}
    for key, x in metrics_K.items():
        if key in ANY:
            out[key] = jnp.any(x, axis=0)
        elif key in LABEL_WEIGHTED:
            out[key] = weighted(x, label_share_K)
        elif key in GATE_WEIGHTED:
            out[key] = weighted(x, gate_share_K)
        elif key in SUMMED:
            out[key] = jnp.sum(x, axis=0)
        else:
            out[key] = jnp.mean(x, axis=0)
    if "train/total_loss" in out:
        gate = out.get("moe/gate_loss", jnp.zeros([], jnp.float32))
        out["train/total_loss"] = out["train/main_loss"] + w_aux * gate
    return out
