"""Gated units beyond the MoE (attention heads, embedding slots), seen by the step as lists.

Experts, heads and embedding slots are all "U gated units per token": the gate, the taps
(`moe.MoETaps`), the record (`moe.MoERecord`), the Surprise (`moe.layer_surprise` with any
onn_jax.surprise function) and the gate loss (`losses.hybrid_gate_loss`) are shared. This
module only says which units a model has, builds their zero taps, and reads their records
from the "gated" collection the model sows them into. The slot embedding's units all output
their slot vector, so its Surprise has a closed form (onn_jax.embed.slot_surprise) on a tap
on x0 [N, C] alone; its record is an embed.SlotRecord.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.analysis import fallback_count, gate_accuracy, surprise_target_counts
from onn_jax.config import ModelConfig
from onn_jax.embed import SlotRecord, slot_surprise
from onn_jax.gate import RouterOutput
from onn_jax.heads import head_taps
from onn_jax.losses import hybrid_gate_loss, load_balancing_loss
from onn_jax.moe import MoERecord, MoETaps, layer_surprise
from onn_jax.routing_metrics import routing_metrics
from onn_jax.surprise import get_surprise_fn


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
            from onn_jax.layer_stack import unstack_records
            heads = unstack_records(gated["blocks"]["attn"]["heads"][0], cfg.num_layers)
        else:
            heads = tuple(gated[f"block_{i}"]["attn"]["heads"][0] for i in range(cfg.num_layers))
    embed = gated["embed"]["embed"][0] if cfg.embed.gated else None
    return UnitRecords(heads=heads, embed=embed)


# ---- the step's view: gate inputs, Surprise, gate losses and metrics of every unit kind ------

def unit_gate_inputs(records: UnitRecords) -> tuple:
    """The gate pre-activations the gate losses differentiate: (heads' pre per layer, slot pre)."""
    return (tuple(r.router.pre for r in records.heads or ()),
            () if records.embed is None else (records.embed.router.pre,))


def unit_surprises(cfg: ModelConfig, records: UnitRecords, d_taps: UnitTaps | None) -> UnitRecords:
    """S [N, H] per gated head layer and S [N, M] of the slot embedding, from the main loss's
    tap cotangents (stop-gradient); None for the top-k router, which needs none."""
    heads = embed = None
    if records.heads and cfg.heads.router == "surprise":
        fn = get_surprise_fn(cfg.heads.surprise)
        heads = tuple(jax.lax.stop_gradient(layer_surprise(fn, r, d)) for r, d in zip(records.heads, d_taps.heads))
    if records.embed is not None:
        embed = jax.lax.stop_gradient(slot_surprise(cfg.embed.surprise, records.embed, d_taps.embed))
    return UnitRecords(heads=heads, embed=embed)


def gate_loss_of(section, pre_NxU: jax.Array, surprise_NxU: jax.Array | None, router: RouterOutput,
                 loss_mask_N: jax.Array):
    """One layer's gate loss for a MoEConfig-like section (router, w_ce, w_kl, gate_tokens,
    lb_weight): the Surprise hybrid, or Switch load balancing for `topk`. (loss, parts)."""
    if section.router == "surprise":
        mask = loss_mask_N if section.gate_tokens == "unmasked" else None
        return hybrid_gate_loss(pre_NxU, surprise_NxU, section.w_ce, section.w_kl, mask)
    lb = load_balancing_loss(pre_NxU, router.mask)
    return section.lb_weight * lb, {"lb": lb}


def unit_gate_loss(cfg: ModelConfig, gate_inputs: tuple, records: UnitRecords, surprises: UnitRecords,
                   loss_mask_N: jax.Array):
    """(w_aux-weighted sum over kinds, {kind: (unweighted sum over layers, parts per layer)})."""
    total, per_kind = jnp.zeros([], jnp.float32), {}
    head_pres, embed_pre = gate_inputs
    if records.heads:
        s = surprises.heads or (None,) * len(head_pres)
        losses, parts = zip(*(gate_loss_of(cfg.heads, g, s_, r.router, loss_mask_N)
                              for g, s_, r in zip(head_pres, s, records.heads)))
        loss = sum(losses, jnp.zeros([], jnp.float32))
        total = total + cfg.heads.w_aux * loss
        per_kind["attn"] = (loss, parts)
    if records.embed is not None:
        e = cfg.embed
        mask = loss_mask_N if e.gate_tokens == "unmasked" else None
        loss, parts = hybrid_gate_loss(embed_pre[0], surprises.embed, e.w_ce, e.w_kl, mask)
        total = total + e.w_aux * loss
        per_kind["embed"] = (loss, (parts,))
    return total, per_kind


def varying_rows(surprise_NxU: jax.Array) -> jax.Array:
    """[N] bool: tokens whose S row is not constant (argmin S means something there)."""
    return jnp.max(surprise_NxU, -1) > jnp.min(surprise_NxU, -1)


def gated_layer_metrics(prefix: str, load_key: str, section, records: tuple, surprises: tuple | None,
                        loss: jax.Array, parts: tuple, loss_mask_N: jax.Array,
                        thresholds: list | None = None) -> dict[str, jax.Array]:
    """Routing metrics of one unit kind over its layers (`attn/...`), mirroring `moe/...`:
    avg_k, load [L, U], fallback share, gate losses, gate accuracy over tokens whose S row is
    not constant (and also unmasked), mean S, share of tokens whose hard target is inactive."""
    mean = lambda xs: jnp.mean(jnp.stack(xs))
    n = records[0].router.mask.shape[0]
    out = {f"{prefix}/avg_k": mean([jnp.mean(jnp.sum(r.router.mask, -1).astype(jnp.float32)) for r in records]),
           f"{prefix}/{load_key}": jnp.stack([jnp.mean(r.router.mask.astype(jnp.float32), 0) for r in records]),
           f"{prefix}/gate_loss": loss}
    for key in parts[0]:
        out[f"{prefix}/gate_{key}"] = sum(p[key] for p in parts)
    router = getattr(section, "router", "surprise")
    out.update({f"{prefix}/{k.split('/', 1)[1]}": v  # load_cv, router_entropy, gate_acc_informative, ...
                for k, v in routing_metrics(records, surprises, router).items()})
    if router != "surprise":
        return out
    unmasked = loss_mask_N > 0
    out[f"{prefix}/fallback_frac"] = mean([fallback_count(r.router.pre) / n for r in records])
    out[f"{prefix}/gate_acc"] = mean([gate_accuracy(r.router.pre, s, varying_rows(s))
                                      for r, s in zip(records, surprises)])
    out[f"{prefix}/gate_acc_unmasked"] = mean([gate_accuracy(r.router.pre, s, varying_rows(s) & unmasked)
                                               for r, s in zip(records, surprises)])
    out[f"{prefix}/surprise_mean"] = mean([jnp.mean(s) for s in surprises])
    out[f"{prefix}/target_inactive"] = mean([surprise_target_counts(s, r.router.mask)[0] / n
                                             for r, s in zip(records, surprises)])
    if thresholds:
        out[f"{prefix}/threshold_mean"] = mean([jnp.mean(jax.nn.sigmoid(t)) for t in thresholds])
    return out


def unit_metrics(cfg: ModelConfig, params, records: UnitRecords, surprises: UnitRecords, per_kind: dict,
                 loss_mask_N: jax.Array) -> dict[str, jax.Array]:
    """`attn/*` and `embed/*` metrics (nothing when no kind beyond the MoE is gated)."""
    out = {}
    if records.heads:
        loss, parts = per_kind["attn"]
        from onn_jax.layer_stack import layer_params
        thr = [layer_params(params, i)["attn"]["head_thresholds"] for i in range(cfg.num_layers)
               ] if cfg.heads.router == "surprise" else None
        out.update(gated_layer_metrics("attn", "head_load", cfg.heads, records.heads, surprises.heads,
                                       loss, parts, loss_mask_N, thr))
    if records.embed is not None:
        loss, parts = per_kind["embed"]
        rec = records.embed
        out.update(gated_layer_metrics("embed", "slot_load", cfg.embed, (rec,), (surprises.embed,), loss, parts,
                                       loss_mask_N, [params["embed"]["slot_thresholds"]]))
        out["embed/slot_load"] = out["embed/slot_load"][0]  # [M]: one embedding layer
        out["embed/slots_used"] = jnp.sum(jnp.any(rec.router.mask, axis=0)).astype(jnp.float32)
    return out
