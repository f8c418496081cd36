"""Causal attention with RoPE as pure functions, the decode cache, and the compute dtype.

`causal_attention` is the einsum reference (also the gated heads' `learning_cost` VJP);
`attention_impl` picks cuDNN flash attention where model.attention allows it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import ConfigError, ModelConfig


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32."""
    half = x_BxTxHxD.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BxT.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def causal_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, kv_pos_BxS, kv_valid_BxS=None):
    """Softmax attention scaled by 1/sqrt(D); query t sees keys with position <= its own."""
    scale = q_BxTxHxD.shape[-1] ** -0.5
    scores = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD,
                        preferred_element_type=jnp.float32) * scale
    allowed = kv_pos_BxS[:, None, None, :] <= q_pos_BxT[:, None, :, None]
    if kv_valid_BxS is not None:
        allowed = allowed & kv_valid_BxS[:, None, None, :]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxHxD.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v_BxSxHxD)


def cuda_backend() -> bool:
    """Whether jax's default backend is a CUDA GPU (where cuDNN attention exists)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in jax.devices()[0].client.platform_version.lower()
    except Exception:  # an unknown client: assume no cuDNN
        return False


def attention_impl(cfg: ModelConfig) -> str:
    """The training attention in force, `xla` or `cudnn`, for cfg.attention on this backend.

    Raises ConfigError (field model.attention) when `cudnn` is asked for and no CUDA GPU runs.
    """
    if cfg.attention == "xla":
        return "xla"
    cudnn_fits = cfg.dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    if cfg.attention == "auto":
        return "cudnn" if cudnn_fits and cuda_backend() else "xla"
    if not cuda_backend():
        raise ConfigError("model.attention", f"'cudnn' needs a CUDA GPU; jax's backend here is "
                                             f"{jax.default_backend()!r} (use 'auto' or 'xla')")
    return "cudnn"


class KVCache(NamedTuple):
    """One attention layer's keys and values, indexed by absolute position: [B, S, H, D]."""

    key: jax.Array
    value: jax.Array


class DecodeCache(NamedTuple):
    """Every layer's KVCache and which slots hold real tokens (valid [B, S] bool)."""

    layers: tuple[KVCache, ...]
    valid: jax.Array
    tokens: jax.Array | None = None  # [B, S] ids by position (the n-gram memory's history)


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> DecodeCache:
    """An empty decode cache for `length` positions (zeros, no valid slot)."""
    shape = (batch_size, length, cfg.num_heads, cfg.head_dim)
    dt = compute_dtype(cfg)
    layers = tuple(KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.num_layers))
    tokens = jnp.zeros((batch_size, length), jnp.int32) if cfg.embed.ngram else None
    return DecodeCache(layers=layers, valid=jnp.zeros((batch_size, length), jnp.bool_), tokens=tokens)


def write_positions(cache_BxSx: jax.Array, new_BxTx: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """cache[b, positions[b, t]] = new[b, t] (per-row positions, so rows may differ)."""
    rows_Bx1 = jnp.arange(cache_BxSx.shape[0])[:, None]
    return cache_BxSx.at[rows_Bx1, positions_BxT].set(new_BxTx.astype(cache_BxSx.dtype))
