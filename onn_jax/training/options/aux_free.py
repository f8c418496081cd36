"""Aux-loss-free balancing of the top-k router (Wang et al., 2024, "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts"; DeepSeek-V3): model.moe.aux_free_rate > 0.

A per-expert bias, added to the router logits for the top-k choice only (onn_jax.core.gate.topk_gate),
follows the load: load_e = tokens routed to e in the step's batch,

    bias_e <- bias_e + rate * sign(mean_e(load) - load_e)

The bias is router state (`router_bias` [E] per layer), not a parameter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from onn_jax.config import ModelConfig, MoEConfig
from onn_jax.training.options.base import GateOption


def aux_free_bias(bias_E: jax.Array, mask_NxE: jax.Array, rate: float) -> jax.Array:
    """bias + rate * sign(mean load - load), load = tokens routed to each expert."""
    load_E = jnp.sum(mask_NxE.astype(jnp.float32), axis=0)
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


class AuxFreeBias(GateOption):
    name = "aux_free_rate"
    stateful = True
    forward_keys = ("router_bias",)

    def enabled(self, m: MoEConfig) -> bool:
        return m.aux_free_rate > 0

    def layer_state(self, cfg: ModelConfig) -> dict:
        return {"router_bias": jnp.zeros((cfg.moe.num_experts,), jnp.float32)}

    def update(self, m, state, moe_params, record, step):
        bias = aux_free_bias(state["router_bias"], record.router.mask, m.aux_free_rate)
        return {**state, "router_bias": bias}, moe_params, {"bias_absmax": jnp.max(jnp.abs(bias))}

    def summarize(self, per_layer):
        return {"moe/aux_free_bias_absmax": jnp.max(jnp.stack([p["bias_absmax"] for p in per_layer]))}
