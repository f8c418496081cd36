"""Flax Linen parameter holders for the sparse embeddings of onn_jax.nn.embed (model.embed)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.nn.embed import ngram_bucket_ids, ngram_memory, previous_ids, slot_embed
from onn_jax.nn.inits import torch_linear_init


class SlotEmbed(nn.Module):
    """embed/{codes [V, d_z], slot_prototypes [d_z, M], slot_thresholds [M], slots [M, C]};
    sows its SlotRecord as ("gated", "embed")."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, tap_NxC=None):
        cfg, e = self.cfg, self.cfg.embed
        normal = nn.initializers.normal(1.0)
        params = {"codes": self.param("codes", normal, (cfg.vocab_size, e.code_dim)),
                  "slot_prototypes": self.param("slot_prototypes", normal, (e.code_dim, e.num_slots)),
                  "slot_thresholds": self.param("slot_thresholds", nn.initializers.zeros, (e.num_slots,)),
                  "slots": self.param("slots", normal, (e.num_slots, cfg.hidden))}
        b, t = tokens_BxT.shape
        x0_NxC, record = slot_embed(params, tokens_BxT.reshape(-1), e.effective_fallback_k, tap_NxC)
        self.sow("gated", "embed", record)
        return x0_NxC.reshape(b, t, cfg.hidden)


class NgramMemory(nn.Module):
    """ngram/{tables [K, B, d], key [K*d, C], value [K*d, C], norm_key, norm_query}: the hashed
    n-gram memory's output alpha_t W_V e_t [B, T, C] (float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, x0_BxTxC, history_BxS=None, positions_BxT=None):
        cfg, e = self.cfg, self.cfg.embed
        k = (e.ngram - 1) * e.ngram_heads
        params = {"tables": self.param("tables", nn.initializers.normal(1.0), (k, e.ngram_buckets, e.ngram_dim)),
                  "key": self.param("key", torch_linear_init, (k * e.ngram_dim, cfg.hidden)),
                  "value": self.param("value", torch_linear_init, (k * e.ngram_dim, cfg.hidden))}
        ctx = previous_ids(tokens_BxT, e.ngram - 1, cfg.vocab_size, history_BxS, positions_BxT)
        bucket_ids = ngram_bucket_ids(ctx, e.ngram, e.ngram_heads, e.ngram_buckets)
        b, t, c = x0_BxTxC.shape
        norms = {name: nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name)
                 for name in ("norm_key", "norm_query")}
        out = ngram_memory(params, bucket_ids.reshape(b * t, k), x0_BxTxC.reshape(b * t, c),
                           lambda name, x: norms[name](x))
        return out.reshape(b, t, c)


def deep_embed_table(module: nn.Module, cfg: ModelConfig) -> jax.Array:
    """block_i/deep_embed [V, C], init 1 (DeepEmbed starts as the identity)."""
    return module.param("deep_embed", nn.initializers.ones, (cfg.vocab_size, cfg.hidden))
