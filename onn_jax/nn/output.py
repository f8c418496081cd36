"""Adaptive softmax output (model.output.kind = adaptive; Grave et al. 2017, "Efficient softmax
approximation for GPUs").

Ids are ranked by training frequency (`frequency_order`; rank r is id order[r]). With cutoffs
c_1 < ... < c_n (the head holds ranks [0, c_1), tail i ranks [c_i, c_{i+1}), c_{n+1} = V):

    head:    z_0 = h W_head                        W_head [C, c_1 + n]: c_1 frequent ids + n cluster logits
    tail i:  z_i = (h P_i) O_i                     P_i [C, d_i], d_i = max(1, C // div**i); O_i [d_i, c_{i+1} - c_i]
    log p(v | h) = log_softmax(z_0)[r]                                       r = rank(v) < c_1
                 = log_softmax(z_0)[c_1 + i - 1] + log_softmax(z_i)[r - c_i]   c_i <= r < c_{i+1}

so sum_v p(v | h) = 1 exactly. The training loss (`adaptive_ce`) needs only the label's term:
per position the head's log-softmax at the label (or at its cluster) plus, for a tail label,
its cluster's log-softmax at the label. Every tail cluster's logits are computed for every
position (dense over positions): jit needs static shapes, and gathering only the positions whose
label falls in a cluster would need a capacity (drops, or capacity N: no saving). What is saved
is the tail's FLOPs (the d_i-wide projection), not memory; [N, V] log-probabilities are never
assembled in the loss. `adaptive_log_probs` builds them (id order) for generation and export.

Parameters (module `AdaptiveOutput`, path `output/...`): head [C, c_1 + n], tail_i/{proj [C, d_i],
out [d_i, c_{i+1} - c_i]}, PyTorch Linear init (as lm_head), no biases.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.config import ModelConfig
from onn_jax.nn.inits import torch_linear_init

# ---------------------------------------------------------------- frequency ranks (NumPy)

def count_labels(targets: np.ndarray, loss_mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """counts [V] int64: how often each id is a trained-on label (loss_mask > 0)."""
    ids = np.asarray(targets)[np.asarray(loss_mask) > 0].astype(np.int64)
    return np.bincount(ids.reshape(-1), minlength=vocab_size)[:vocab_size]


def frequency_order(counts_V: np.ndarray) -> np.ndarray:
    """ids by falling count, ties by id (a stable sort of -count): order[r] = id of rank r."""
    return np.argsort(-np.asarray(counts_V, np.int64), kind="stable").astype(np.int32)


# ---------------------------------------------------------------- the clusters

class Clusters(NamedTuple):
    """The static layout: head ids, tail rank ranges and widths, the id <-> rank maps."""

    head_size: int                         # c_1 (V with no cutoffs)
    tails: tuple[tuple[int, int, int], ...]  # (start rank, end rank, projection width d_i)
    order: np.ndarray                      # [V] id of each rank
    rank: np.ndarray                       # [V] rank of each id


def clusters(cfg: ModelConfig) -> Clusters:
    """The clusters of cfg.output (order: cfg.output.order, or the identity when empty)."""
    v, o = cfg.vocab_size, cfg.output
    bounds = tuple(o.cutoffs) + (v,)
    tails = tuple((lo, hi, max(1, cfg.hidden // o.div ** i))
                  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1))
    order = np.asarray(o.order if o.order else range(v), np.int32)
    rank = np.empty(v, np.int32)
    rank[order] = np.arange(v, dtype=np.int32)
    return Clusters(bounds[0], tails, order, rank)


def _dot(x, w, dtype):
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _logits(params: dict, h_NxC: jax.Array, cl: Clusters, dtype):
    """Head logits [N, c_1 + n] and each tail's logits [N, V_i], float32."""
    z_head = _dot(h_NxC, params["head"], dtype)
    z_tails = [_dot(_dot(h_NxC, params[f"tail_{i}"]["proj"], dtype), params[f"tail_{i}"]["out"], dtype)
               for i in range(1, len(cl.tails) + 1)]
    return z_head, z_tails


def adaptive_log_probs(params: dict, h_NxC: jax.Array, cfg: ModelConfig, dtype=jnp.float32) -> jax.Array:
    """log p(v | h) [N, V] float32, ids in id order (for generation, eval by logits, export)."""
    cl = clusters(cfg)
    z_head, z_tails = _logits(params, h_NxC, cl, dtype)
    lp_head = jax.nn.log_softmax(z_head, axis=-1)
    parts = [lp_head[:, :cl.head_size]]
    for i, z in enumerate(z_tails):
        parts.append(lp_head[:, cl.head_size + i, None] + jax.nn.log_softmax(z, axis=-1))
    lp_rank_NxV = jnp.concatenate(parts, axis=-1)
    return lp_rank_NxV[:, cl.rank]  # column v = rank(v)


def adaptive_ce(params: dict, h_NxC: jax.Array, labels_N: jax.Array, cfg: ModelConfig, dtype=jnp.float32):
    """(ce_N = -log p(label | h), pred_N = argmax_v log p(v | h)) without assembling [N, V].

    pred (for the accuracy metric, no gradient) is the best of the head's best id and each
    cluster's best: log p(cluster) + max z_i - logsumexp z_i."""
    cl = clusters(cfg)
    rank_N = jnp.asarray(cl.rank)[labels_N]
    z_head, z_tails = _logits(params, h_NxC, cl, dtype)
    lse_head_N = jax.nn.logsumexp(z_head, axis=-1)
    pick = lambda z, i: jnp.take_along_axis(z, i[:, None], axis=-1)[:, 0]
    lp_N = pick(z_head, jnp.minimum(rank_N, cl.head_size - 1)) - lse_head_N
    z_ids = jax.lax.stop_gradient(z_head[:, :cl.head_size])
    best_N = jnp.max(z_ids, axis=-1) - lse_head_N
    best_rank_N = jnp.argmax(z_ids, axis=-1)
    for i, ((lo, hi, _), z) in enumerate(zip(cl.tails, z_tails)):
        cluster_lp_N = z_head[:, cl.head_size + i] - lse_head_N
        lse_N = jax.nn.logsumexp(z, axis=-1)
        inside_N = (rank_N >= lo) & (rank_N < hi)
        label_lp_N = cluster_lp_N + pick(z, jnp.clip(rank_N - lo, 0, hi - lo - 1)) - lse_N
        lp_N = jnp.where(inside_N, label_lp_N, lp_N)
        cand_N = jax.lax.stop_gradient(cluster_lp_N + jnp.max(z, axis=-1) - lse_N)
        better_N = cand_N > best_N
        best_N = jnp.where(better_N, cand_N, best_N)
        best_rank_N = jnp.where(better_N, lo + jnp.argmax(z, axis=-1), best_rank_N)
    return -lp_N, jnp.asarray(cl.order)[best_rank_N]


def output_loss(cfg: ModelConfig, params: dict, h_BxTxC: jax.Array, targets_BxT: jax.Array,
                mask_BxT: jax.Array):
    """The adaptive softmax's (mean CE over unmasked labels, accuracy, counted labels, per-position
    CE [B, T]), as losses.next_token_loss for logits. `h` are the final hidden states
    (Transformer(..., return_hidden=True)); the parameters are params["output"]."""
    b, t, c = h_BxTxC.shape
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    ce_N, pred_N = adaptive_ce(params["output"], h_BxTxC.reshape(b * t, c), targets_BxT.reshape(-1), cfg, dtype)
    mask = mask_BxT.astype(jnp.float32)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    ce_BxT = ce_N.reshape(b, t)
    acc = jnp.sum((pred_N.reshape(b, t) == targets_BxT).astype(jnp.float32) * mask) / denom
    return jnp.sum(ce_BxT * mask) / denom, acc, count, ce_BxT


# ---------------------------------------------------------------- the Flax module

class AdaptiveTail(nn.Module):
    """Tail cluster i's projection proj [C, d_i] and output out [d_i, V_i]."""

    hidden: int
    width: int
    size: int

    @nn.compact
    def __call__(self) -> dict:
        return {"proj": self.param("proj", torch_linear_init, (self.hidden, self.width)),
                "out": self.param("out", torch_linear_init, (self.width, self.size))}


class AdaptiveOutput(nn.Module):
    """Holds the adaptive softmax parameters; returns log p(v | h) [B, T, V] float32 (valid
    logits: softmax of them is p, so next-token CE, sampling and argmax work unchanged)."""

    cfg: ModelConfig

    def params_dict(self) -> dict:
        cl, c = clusters(self.cfg), self.cfg.hidden
        params = {"head": self.param("head", torch_linear_init, (c, cl.head_size + len(cl.tails)))}
        for i, (lo, hi, width) in enumerate(cl.tails, start=1):
            params[f"tail_{i}"] = AdaptiveTail(c, width, hi - lo, name=f"tail_{i}")()
        return params

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array) -> jax.Array:
        b, t, c = x_BxTxC.shape
        lp_NxV = adaptive_log_probs(self.params_dict(), x_BxTxC.reshape(b * t, c), self.cfg, x_BxTxC.dtype)
        return lp_NxV.reshape(b, t, -1)
