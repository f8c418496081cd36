"""Routing metrics of the step: `moe/*` over the MoE layers, `attn/*` and `embed/*` over
the gated heads and the slot embedding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.core.analysis import fallback_count, gate_accuracy, surprise_target_counts
from onn_jax.core.routing_metrics import routing_metrics
from onn_jax.dispatch.capacity import dropped_fraction
from onn_jax.nn.layer_stack import layer_params
from onn_jax.nn.units import UnitRecords
from onn_jax.training.options.base import DEAD_SURPRISE


def moe_metrics(cfg: ModelConfig, params, records, surprises, parts,
                loss_mask_N: jax.Array) -> dict[str, jax.Array]:
    """Routing metrics averaged over MoE layers, plus per-layer expert load [L, E]."""
    if not records:
        return {}
    mean = lambda xs: jnp.mean(jnp.stack(xs))
    out = {
        "moe/avg_k": mean([jnp.mean(jnp.sum(r.router.mask, -1).astype(jnp.float32)) for r in records]),
        "moe/expert_load": jnp.stack([jnp.mean(r.router.mask.astype(jnp.float32), 0) for r in records]),
    }
    if records[0].dispatch is not None:
        out["moe/dropped_frac"] = mean([dropped_fraction(r.router.mask, r.dispatch) for r in records])
    out.update(routing_metrics(records, surprises, cfg.moe.router))
    for key in parts[0]:
        out[f"moe/gate_{key}"] = sum(p[key] for p in parts)
    if cfg.moe.router == "surprise":
        out["moe/gate_acc"] = mean([gate_accuracy(r.router.pre, s) for r, s in zip(records, surprises)])
        out["moe/gate_acc_unmasked"] = mean([gate_accuracy(r.router.pre, s, loss_mask_N)
                                             for r, s in zip(records, surprises)])
        live_mean = lambda s: jnp.sum(jnp.where(s < DEAD_SURPRISE, s, 0.0)) / jnp.sum(s < DEAD_SURPRISE)
        out["moe/surprise_mean"] = mean([live_mean(s) for s in surprises])
        out["moe/threshold_mean"] = mean([jnp.mean(jax.nn.sigmoid(layer_params(params, i)["moe"]["thresholds"]))
                                          for i in range(cfg.num_layers)])
    return out


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
        from onn_jax.nn.layer_stack import layer_params
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
