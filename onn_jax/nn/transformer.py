"""Flax Linen modules: embedding, pre-norm causal attention with RoPE, MoE layer, LM head.

The modules only create parameters and call the pure functions of onn_jax.nn.moe / gate /
experts, so `model.apply` is itself a pure function of (params, tokens, taps) that
`jax.vjp` can differentiate with respect to the Surprise taps.

Parameter layout (what onn_jax.parallel.rules and the expert filter key on):
  embed/embedding [V, C]
  block_i/attn/{query,key,value}/kernel [C, H, D], block_i/attn/out/kernel [H, D, C]
  block_i/attn/{head_prototypes [C, H], head_thresholds [H]} or head_router [C, H] (gated heads)
  block_i/{norm_attn,norm_moe}/{scale,bias}
  block_i/moe/{prototypes [C, E], thresholds [E]} or router [C, E]
  block_i/moe/experts/{w1 [E, C, I], w2 [E, I, C], w3 [E, C, I] for SwiGLU}
  block_i/moe/ffn/{w1, w2, w3} for the dense baseline
  lm_head/kernel [C, V]; model.output.kind = adaptive instead: output/head [C, c_1 + n],
  output/tail_i/{proj [C, d_i], out [d_i, V_i]} (onn_jax.nn.output)
  model.embed options: embed/{codes, slot_prototypes, slot_thresholds, slots} (slots),
  ngram/{tables, key, value, norm_key, norm_query}, block_i/deep_embed [V, C]
  model.scan_layers: every block_i/... leaf stacked as blocks/... [L, ...] (onn_jax.nn.layer_stack)

Decoding (onn_jax.nn.generate) passes a `DecodeCache` (keys/values of every layer at absolute
positions, static shape [B, S, H, D], and a [B, S] mask of the slots holding real tokens);
the call then also returns the updated cache. Without a cache nothing changes.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.nn.attention import DecodeCache, compute_dtype, write_positions
from onn_jax.nn.embed_layers import NgramMemory, SlotEmbed
from onn_jax.nn.inits import torch_linear_init
from onn_jax.nn.layers import Block, Norm, ScanBlock, remat_block
from onn_jax.nn.moe import MoETaps, zero_taps
from onn_jax.nn.output import AdaptiveOutput


def scanned_blocks(cfg: ModelConfig, x, positions_BxT, taps, cache, kv_valid_BxS, index_positions,
                   tokens_BxT, head_taps=None):
    """model.scan_layers: the blocks as one nn.scan named `blocks` (parameters [L, ...], one
    compiled block). Per-layer taps / caches are stacked in, per-layer records / caches are
    unstacked out, so the caller sees the tuples of the unrolled loop; gated heads' records are
    sown stacked (gated/blocks/attn/heads, read by onn_jax.nn.units.unit_records). Call inside a
    compact method."""
    from onn_jax.nn.layer_stack import stack_tree, unstack_records
    decode = cache is not None
    cls = ScanBlock if decode else remat_block(cfg.remat, ScanBlock)
    b, bc = nn.broadcast, (0 if decode else nn.broadcast)
    scan = nn.scan(cls, variable_axes={"params": 0, "gated": 0}, split_rngs={"params": True},
                   in_axes=(b, 0 if taps is not None else b, bc, b, b, 0 if head_taps is not None else b, b),
                   length=cfg.num_layers)
    layer_taps = None if taps is None else stack_tree(taps)
    layer_head_taps = None if head_taps is None else stack_tree(head_taps)
    layer_cache = stack_tree(cache.layers) if decode else None
    x, outs = scan(cfg, name="blocks")(x, positions_BxT, layer_taps, layer_cache, kv_valid_BxS,
                                       index_positions, layer_head_taps, tokens_BxT)
    per_layer = unstack_records(outs, cfg.num_layers)
    records = [o[0] for o in per_layer]
    new_layers = [o[1] for o in per_layer] if decode else []
    return x, records, new_layers


class Transformer(nn.Module):
    """The LM: tokens [B, T] -> (logits [B, T, V] float32, per-layer MoE records).

    Decoding: with `cache` (a DecodeCache) the tokens are written at `positions_BxT`
    (absolute, per row) and attend to every valid cached slot at or before their position;
    `tokens_valid_BxT` (default all True) marks padding that later tokens must not see.
    The call then returns (logits, records, updated cache).

    `unit_taps` (onn_jax.nn.units.UnitTaps) are the zero taps of the gated units beyond the MoE
    (attention heads, slot embedding); their records are sown in the "gated" collection (apply with
    mutable=["gated"] to get them; onn_jax.nn.units.unit_records reads them).

    model.output.kind = adaptive: the first output is log p(v) [B, T, V] (onn_jax.nn.output), which
    are valid logits. `return_hidden`: return the final hidden states [B, T, C] instead of logits
    (the training loss applies the output layer itself, onn_jax.nn.output.output_loss).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, taps: Sequence[MoETaps] | None = None, positions_BxT=None,
                 cache: DecodeCache | None = None, tokens_valid_BxT=None, unit_taps=None,
                 return_hidden: bool = False):
        cfg = self.cfg
        if return_hidden and cache is not None:
            raise ValueError("return_hidden is for the forward without a decode cache")
        index_positions = positions_BxT is None and cache is None
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        kv_valid_BxS, new_layers = None, []
        if cache is not None:
            if tokens_valid_BxT is None:
                tokens_valid_BxT = jnp.ones(tokens_BxT.shape, jnp.bool_)
            kv_valid_BxS = write_positions(cache.valid, tokens_valid_BxT, positions_BxT)
        if cfg.embed.kind == "slots":
            x = SlotEmbed(cfg, name="embed")(tokens_BxT, None if unit_taps is None else unit_taps.embed)
        else:
            x = nn.Embed(cfg.vocab_size, cfg.hidden, embedding_init=nn.initializers.normal(1.0),
                         name="embed")(tokens_BxT)
        history_BxS = None
        if cfg.embed.ngram:
            if cache is not None:
                history_BxS = write_positions(cache.tokens, tokens_BxT, positions_BxT)
            x = x + NgramMemory(cfg, name="ngram")(tokens_BxT, x, history_BxS,
                                                   None if cache is None else positions_BxT)
        x = x.astype(compute_dtype(cfg))
        records = []
        block_cls = remat_block(cfg.remat) if cache is None else Block
        if cfg.scan_layers:  # one nn.scan over stacked parameters (params["blocks"], [L, ...])
            all_head_taps = None if unit_taps is None else unit_taps.heads
            x, records, new_layers = scanned_blocks(cfg, x, positions_BxT, taps, cache, kv_valid_BxS,
                                                    index_positions, tokens_BxT, all_head_taps)
        for i in range(0 if cfg.scan_layers else cfg.num_layers):
            block = block_cls(cfg, name=f"block_{i}")
            layer_taps = None if taps is None else taps[i]
            head_taps = None if unit_taps is None or unit_taps.heads is None else unit_taps.heads[i]
            if cache is None:  # positional: index_positions is a static argument of nn.remat
                x, record = block(x, positions_BxT, layer_taps, None, None, index_positions,
                                  head_taps, tokens_BxT)
            else:
                x, record, layer_cache = block(x, positions_BxT, layer_taps, cache.layers[i], kv_valid_BxS,
                                               tokens_BxT=tokens_BxT)
                new_layers.append(layer_cache)
            records.append(record)
        if cfg.final_norm:
            x = Norm(cfg, name="final_norm")(x)
        if return_hidden:  # the loss applies the head itself (onn_jax.nn.output.output_loss)
            return x, tuple(records)
        if cfg.output.kind == "adaptive":  # log-probabilities: valid logits for CE, sampling, argmax
            logits = AdaptiveOutput(cfg, name="output")(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=compute_dtype(cfg),
                              kernel_init=torch_linear_init, name="lm_head")(x)
        if cache is None:
            return logits.astype(jnp.float32), tuple(records)
        return logits.astype(jnp.float32), tuple(records), DecodeCache(tuple(new_layers), kv_valid_BxS,
                                                                       history_BxS)


def model_taps(cfg: ModelConfig, batch_size: int, seq_len: int) -> tuple[MoETaps, ...] | None:
    """Zero Surprise taps for every MoE layer, or None for the dense baseline."""
    if cfg.moe.router == "dense":
        return None
    return tuple(zero_taps(batch_size * seq_len, cfg.moe.num_experts, cfg.hidden)
                 for _ in range(cfg.num_layers))


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int | None = None) -> dict:
    """Initial parameters (a plain nested dict of float32 arrays)."""
    tokens = jnp.zeros((1, seq_len or min(cfg.max_len, 8)), jnp.int32)
    if cfg.scan_layers:  # the per-layer init, stacked: the same numbers as scan_layers = false
        import dataclasses

        from onn_jax.nn.layer_stack import stack_layers
        return stack_layers(Transformer(dataclasses.replace(cfg, scan_layers=False)).init(rng, tokens)["params"])
    return Transformer(cfg).init(rng, tokens)["params"]
