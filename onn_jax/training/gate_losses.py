"""Gate losses of every gated unit kind: the Surprise hybrid (CE to argmin S + KL), or
Switch load balancing (+ z-loss) for the top-k baselines, per layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig
from onn_jax.core.gate import RouterOutput
from onn_jax.core.losses import hybrid_gate_loss, load_balancing_loss, router_z_loss
from onn_jax.core.surprise_registry import get_surprise_fn
from onn_jax.nn.embed import slot_surprise
from onn_jax.nn.moe import MoERecord, layer_surprise
from onn_jax.nn.units import UnitRecords, UnitTaps
from onn_jax.training.options.base import LayerGate
from onn_jax.training.options.registry import extra_gate_losses


def layer_gate_loss(cfg: ModelConfig, pre_NxE: jax.Array, gate: LayerGate | None, record: MoERecord):
    """One MoE layer's gate loss: the Surprise hybrid toward `gate` (S, token set and hard target as
    the gate options shape them) plus the options' extra terms, or load balancing (+ z) for top-k."""
    m = cfg.moe
    if m.router == "surprise":
        loss, parts = hybrid_gate_loss(pre_NxE, gate.surprise, m.w_ce, m.w_kl, gate.tokens,
                                       m.kl_temperature, gate.target)
        for name, (weight, value) in extra_gate_losses(m, pre_NxE).items():
            loss, parts = loss + weight * value, {**parts, name: value}
        return loss, parts
    lb = load_balancing_loss(pre_NxE, record.router.mask)
    z = router_z_loss(pre_NxE)
    return m.lb_weight * lb + m.z_weight * z, {"lb": lb, "z": z}


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
