"""Autoregressive generation with a KV cache: temperature and nucleus (top-p) sampling.

    new_ids = generate(params, model_cfg, prompt_ids, max_new_tokens=64, temperature=0.0)

The prompt is run once (prefill) into a static-shape cache [B, S, H, D] per layer; then one
token per step inside `lax.scan`, the whole thing under one `jax.jit`. Routing is per
token, so running the MoE layer on one token at a time is exact (with sparse dispatch the
capacity limit is lifted for generation: a dropped pair would depend on the batch).
Prompts of different lengths share a batch: they are right-padded, padding is masked out
of attention, and each row continues from its own length at its own positions.
temperature 0 is greedy decoding; sampling is deterministic for a given seed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.config import ModelConfig
from onn_jax.nn.attention import init_cache
from onn_jax.nn.transformer import Transformer

PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompilations)


def top_p_filter(logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches top_p; the
    others get -inf. The most likely token is always kept, so a tiny top_p is greedy."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature, top_p) -> jax.Array:
    """Next token per row: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (none when top_p >= 1).

    temperature and top_p may be traced scalars, so one compiled program serves them all.
    """
    logits = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    scaled = jnp.where(top_p < 1.0, top_p_filter(scaled, top_p), scaled)
    drawn_B = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn_B, greedy_B)


def decode_config(cfg: ModelConfig) -> ModelConfig:
    """The model config used for generation: sparse dispatch without a capacity limit."""
    if cfg.moe.capacity_factor is None:
        return cfg
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def generate_tokens(params, prompt_BxP: jax.Array, lengths_B: jax.Array, rng: jax.Array, *,
                    cfg: ModelConfig, max_new_tokens: int, temperature=0.0, top_p=1.0,
                    eos_id=-1, vocab_limit=None) -> jax.Array:
    """New tokens [B, max_new_tokens] after right-padded prompts of lengths `lengths_B`.

    After a row emits `eos_id` (-1: none), the rest of the row is `eos_id`. Ids >= vocab_limit
    (None: model.vocab_size) are never produced: a model whose vocab_size exceeds its
    tokenizer's (vocab 32000 with the byte tokenizer) cannot emit an id the tokenizer cannot
    decode. Compiled once per (cfg, shapes, max_new_tokens); temperature, top_p, eos_id and
    vocab_limit are traced.
    """
    limit = cfg.vocab_size if vocab_limit is None else vocab_limit

    def sample(logits_BxV, key):
        allowed_V = jnp.arange(logits_BxV.shape[-1]) < limit
        return sample_logits(jnp.where(allowed_V, logits_BxV.astype(jnp.float32), -jnp.inf), key,
                             temperature, top_p)

    model = Transformer(decode_config(cfg))
    b, p = prompt_BxP.shape
    cache = init_cache(cfg, b, p + max_new_tokens)
    positions_BxP = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits_BxPxV, _, cache = model.apply({"params": params}, prompt_BxP, positions_BxT=positions_BxP,
                                         cache=cache, tokens_valid_BxT=positions_BxP < lengths_B[:, None])
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    keys = jax.random.split(rng, max_new_tokens)
    first_B = sample(last_BxV, keys[0])
    done_B = first_B == eos_id

    def step(carry, key):
        cache, token_B, pos_B, done_B = carry
        logits_Bx1xV, _, cache = model.apply({"params": params}, token_B[:, None],
                                             positions_BxT=pos_B[:, None], cache=cache)
        nxt_B = jnp.where(done_B, eos_id, sample(logits_Bx1xV[:, 0], key))
        done_B = done_B | (nxt_B == eos_id)
        return (cache, nxt_B, pos_B + 1, done_B), nxt_B

    _, rest_NxB = jax.lax.scan(step, (cache, first_B, lengths_B.astype(jnp.int32), done_B), keys[1:])
    return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)


def _check_args(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token (e.g. BOS)")
        bad = [t for t in ids if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside model.vocab_size {cfg.vocab_size}")
        if len(ids) + max_new_tokens > cfg.max_len:
            raise ValueError(f"prompt {i} length {len(ids)} + max_new_tokens {max_new_tokens} exceeds "
                             f"model.max_len {cfg.max_len}")


def generate_batch(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   eos_id: int | None = None, vocab_limit: int | None = None) -> list[list[int]]:
    """New token ids for each prompt, each list cut before its first `eos_id`; only ids below
    `vocab_limit` (the tokenizer's vocab size; None: model.vocab_size) are generated."""
    _check_args(cfg, prompts, max_new_tokens, temperature, top_p)
    if vocab_limit is not None and not 1 <= vocab_limit <= cfg.vocab_size:
        raise ValueError(f"vocab_limit must be in [1, model.vocab_size {cfg.vocab_size}], got {vocab_limit!r}")
    longest = max(len(ids) for ids in prompts)
    width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, cfg.max_len - max_new_tokens)
    prompt_BxP = np.zeros((len(prompts), width), np.int32)
    for i, ids in enumerate(prompts):
        prompt_BxP[i, :len(ids)] = ids
    lengths_B = np.array([len(ids) for ids in prompts], np.int32)
    out = generate_tokens(params, jnp.asarray(prompt_BxP), jnp.asarray(lengths_B), jax.random.key(seed),
                          cfg=cfg, max_new_tokens=max_new_tokens, temperature=jnp.float32(temperature),
                          top_p=jnp.float32(top_p), eos_id=jnp.int32(-1 if eos_id is None else eos_id),
                          vocab_limit=jnp.int32(cfg.vocab_size if vocab_limit is None else vocab_limit))
    rows = np.asarray(jax.device_get(out)).tolist()
    if eos_id is not None:
        rows = [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
    return rows


def generate(params, cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, vocab_limit: int | None = None) -> list[int]:
    """New token ids after one prompt (cut before `eos_id`); temperature 0 is greedy; only ids
    below `vocab_limit` (None: model.vocab_size)."""
    return generate_batch(params, cfg, [list(prompt_ids)], max_new_tokens, temperature, top_p, seed,
                          eos_id, vocab_limit)[0]
