"""DynMoE's adaptive expert count for the top-any gate, with static shapes (issue 16).

DynMoE (Guo et al., 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient
Transformer Models") lets the number of experts follow the data: over a window of steps it
records how often each expert was activated and the representations of the tokens that
activated no expert; at the end of the window it removes the experts nobody used and adds one
expert for the unrouted tokens. Here the maximum E is allocated once and a live mask [E] says
which slots are experts; everything is jnp.where on fixed shapes, so the step stays jitted.

Window state of one MoE layer (a dict, part of TrainState.router_state; model.moe.adaptive_experts):
  live            [E] bool   the slot is an expert (masked-out slots are never routed to)
  hits            [E] f32    (token, expert) activations in the window (fallback ones included)
  unrouted_sum    [C] f32    sum of the unit-normalised gate inputs x_t / |x_t| of the tokens
                             with no live expert above its threshold (the fallback tokens)
  unrouted_count  []  f32    how many such tokens

At the end of a window (`adapt`):
  1. remove: live & hits == 0 -> not live (never the last live expert);
  2. add: if some token was unrouted and a slot is free, the lowest-index free slot becomes
     live with prototype unrouted_sum / |unrouted_sum| and threshold parameter 0;
  3. the window statistics restart from zero.
The new expert keeps the slot's FFN weights (its initial ones, or those of the expert that
last held the slot) and the slot's AdamW moments (they decay towards 0 while a slot is dead,
since a dead slot's router parameters get no gradient).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig, MoEConfig
from onn_jax.core.gate import l2_normalize
from onn_jax.training.options.base import DEAD_SURPRISE, GateContext, GateOption, LayerGate

WINDOW_KEYS = ("live", "hits", "unrouted_sum", "unrouted_count")


def init_window(m: MoEConfig, hidden: int) -> dict:
    """The layer's window state at step 0: the first `adaptive_initial` (default all) slots live."""
    n0 = m.adaptive_initial or m.num_experts
    return {"live": jnp.arange(m.num_experts) < n0,
            "hits": jnp.zeros((m.num_experts,), jnp.float32),
            "unrouted_sum": jnp.zeros((hidden,), jnp.float32),
            "unrouted_count": jnp.zeros([], jnp.float32)}


def accumulate(window: dict, mask_NxE: jax.Array, pre_NxE: jax.Array, x_NxC: jax.Array) -> dict:
    """Adds one step's routing to the window: hits per expert and the unrouted tokens."""
    unrouted_N = ~jnp.any(pre_NxE > 0, axis=-1)
    x_unit = l2_normalize(x_NxC.astype(jnp.float32), axis=-1)
    return {**window,
            "hits": window["hits"] + jnp.sum(mask_NxE.astype(jnp.float32), axis=0),
            "unrouted_sum": window["unrouted_sum"] + jnp.sum(jnp.where(unrouted_N[:, None], x_unit, 0.0), 0),
            "unrouted_count": window["unrouted_count"] + jnp.sum(unrouted_N.astype(jnp.float32))}


def adapt(window: dict, protos_CxE: jax.Array, theta_E: jax.Array):
    """End of a window: remove unused experts, add one for the unrouted tokens, reset the stats.

    Returns (window, prototypes, thresholds, {"removed": [], "added": []} counts).
    """
    live = window["live"]
    removed_E = live & (window["hits"] == 0)
    kept = live & ~removed_E
    kept = jnp.where(jnp.any(kept), kept, live)  # never remove the last live expert
    free_E = ~kept
    slot = jnp.argmax(free_E)  # lowest-index free slot
    add_E = (window["unrouted_count"] > 0) & jnp.any(free_E) & (jnp.arange(live.shape[0]) == slot)
    proto_C = l2_normalize(window["unrouted_sum"], axis=0)
    protos = jnp.where(add_E[None, :], proto_C[:, None].astype(protos_CxE.dtype), protos_CxE)
    theta = jnp.where(add_E, jnp.zeros_like(theta_E), theta_E)
    new = {"live": kept | add_E, "hits": jnp.zeros_like(window["hits"]),
           "unrouted_sum": jnp.zeros_like(window["unrouted_sum"]),
           "unrouted_count": jnp.zeros_like(window["unrouted_count"])}
    counts = {"removed": jnp.sum((live & ~kept).astype(jnp.float32)), "added": jnp.sum(add_E.astype(jnp.float32))}
    return new, protos, theta, counts


def gate_surprise(surprise_NxE: jax.Array, live_E: jax.Array) -> jax.Array:
    """S for the gate loss with masked-out experts at DEAD_SURPRISE (never a target)."""
    return jnp.where(live_E[None, :], surprise_NxE, DEAD_SURPRISE)


class AdaptiveExperts(GateOption):
    """The live mask routes (`live` is a forward key) and hides dead experts from the gate loss;
    the window advances every step and adapts every `adaptive_every` steps."""

    name = "adaptive_experts"
    stateful = True
    forward_keys = ("live",)

    def enabled(self, m: MoEConfig) -> bool:
        return m.adaptive_experts

    def layer_state(self, cfg: ModelConfig) -> dict:
        return init_window(cfg.moe, cfg.hidden)

    def shape_gate(self, ctx: GateContext, gate: LayerGate) -> LayerGate:
        return gate._replace(surprise=gate_surprise(gate.surprise, ctx.state["live"]))

    def update(self, m, state, moe_params, record, step):
        window = accumulate({k: state[k] for k in WINDOW_KEYS}, record.router.mask, record.router.pre,
                            record.expert_in)
        adapted, protos, theta, counts = adapt(window, moe_params["prototypes"], moe_params["thresholds"])
        due = (step % m.adaptive_every) == 0
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(due, x, y), a, b)
        state = {**state, **pick(adapted, window)}
        moe_params = {**moe_params, "prototypes": jnp.where(due, protos, moe_params["prototypes"]),
                      "thresholds": jnp.where(due, theta, moe_params["thresholds"])}
        return state, moe_params, {"added": jnp.where(due, counts["added"], 0.0),
                                   "removed": jnp.where(due, counts["removed"], 0.0),
                                   "live": jnp.sum(state["live"].astype(jnp.float32))}

    def summarize(self, per_layer):
        return {"moe/live_experts": jnp.mean(jnp.stack([p["live"] for p in per_layer])),
                "moe/experts_added": sum(p["added"] for p in per_layer),
                "moe/experts_removed": sum(p["removed"] for p in per_layer)}
