"""Gated units beyond the MoE (attention heads, embedding slots), seen by the step as lists.

Experts, heads and embedding slots are all "U gated units per token": the gate, the taps
(`moe.MoETaps`), the record (`moe.MoERecord`), the Surprise (`moe.layer_surprise` with any
onn_jax.core.surprise_registry function) and the gate loss (`losses.hybrid_gate_loss`) are shared. This
module only says which units a model has, builds their zero taps, and reads their records
from the "gated" collection the model sows them into. The slot embedding's units all output
their slot vector, so its Surprise has a closed form (onn_jax.nn.embed.slot_surprise) on a tap
on x0 [N, C] alone; its record is an embed.SlotRecord.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.nn.embed import SlotRecord
from onn_jax.nn.heads import head_taps
from onn_jax.nn.moe import MoERecord, MoETaps


class UnitTaps(NamedTuple):
    """Zero taps of the gated units beyond the MoE (None where a kind is off)."""

    heads: tuple[MoETaps, ...] | None = None  # per layer: Yt [N, H, C], out [N, C]
    embed: jax.Array | None = None            # x0 [N, C] of the slot embedding


class UnitRecords(NamedTuple):
    """Their forward records (None where a kind is off)."""

    heads: tuple[MoERecord, ...] | None = None
    embed: SlotRecord | None = None


def unit_taps(cfg: ModelConfig, batch_size: int, seq_len: int) -> UnitTaps | None:
    """Zero taps for the model's gated heads and slot embedding, or None when nothing beyond
    the MoE is gated."""
    if not (cfg.heads.gated or cfg.embed.gated):
        return None
    n = batch_size * seq_len
    heads = tuple(head_taps(n, cfg.num_heads, cfg.hidden) for _ in range(cfg.num_layers)) if cfg.heads.gated else None
    embed = jnp.zeros((n, cfg.hidden), jnp.float32) if cfg.embed.gated else None
    return UnitTaps(heads=heads, embed=embed)


def unit_records(cfg: ModelConfig, gated: dict) -> UnitRecords:
    """The records sown into the "gated" collection by model.apply(..., mutable=["gated"])."""
    heads = None
    if cfg.heads.gated:
        if "blocks" in gated:  # model.scan_layers: one record stacked over the layers
            from onn_jax.nn.layer_stack import unstack_records
            heads = unstack_records(gated["blocks"]["attn"]["heads"][0], cfg.num_layers)
        else:
            heads = tuple(gated[f"block_{i}"]["attn"]["heads"][0] for i in range(cfg.num_layers))
    embed = gated["embed"]["embed"][0] if cfg.embed.gated else None
    return UnitRecords(heads=heads, embed=embed)
