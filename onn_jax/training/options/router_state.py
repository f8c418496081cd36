"""Router state that is not a parameter: TrainState.router_state (issue 16).

Some routers carry state that the optimizer must not touch but the forward, the checkpoint and
evaluation need: the aux-loss-free balancing bias of the top-k router and the live-expert mask
and window statistics of the adaptive expert count. It lives in ONE train-state field, a dict
keyed like the parameters' blocks ({} when no such option is on, the faithful default):

    router_state = {"block_i": {"router_bias": [E]}}                         aux_free_rate > 0
    router_state = {"block_i": {"live": [E], "hits": [E], "unrouted_sum": [C],
                                "unrouted_count": []}}                        adaptive_experts

The interface, all pure and jittable:
    init_router_state(cfg)                         the state at step 0
    forward_params(params, router_state)           params with the keys the forward reads
                                                   (FORWARD_KEYS) added under block_i/moe, for
                                                   model.apply (train, eval, generation)
    update_router_state(cfg, rs, params, records, step)  after the optimizer update: the new
                                                   state, params (the adaptive expert count
                                                   rewrites an added expert's prototype and
                                                   threshold) and metrics
Aux-loss-free balancing (Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3): load_e = tokens routed to e in the step's batch,
    bias_e <- bias_e + rate * sign(mean_e(load) - load_e)
and the bias is added to the router logits for the top-k choice only (onn_jax.core.gate.topk_gate).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from onn_jax.training.options import adaptive_experts
from onn_jax.config import ModelConfig

FORWARD_KEYS = ("router_bias", "live")


def init_router_state(cfg: ModelConfig) -> dict:
    """The router state at step 0 ({} for a model without stateful routing)."""
    m = cfg.moe
    if m.router == "dense" or not (m.aux_free_rate > 0 or m.adaptive_experts):
        return {}

    def layer() -> dict:  # fresh arrays per layer (a donated state must not alias buffers)
        out = {}
        if m.aux_free_rate > 0:
            out["router_bias"] = jnp.zeros((m.num_experts,), jnp.float32)
        if m.adaptive_experts:
            out.update(adaptive_experts.init_window(m, cfg.hidden))
        return out

    return {f"block_{i}": layer() for i in range(cfg.num_layers)}


def forward_params(params: Any, router_state: dict | None) -> Any:
    """`params` with each layer's FORWARD_KEYS of the router state under block_i/moe."""
    if not router_state:
        return params
    out = dict(params)
    for block, layer in router_state.items():
        extra = {k: jax.lax.stop_gradient(v) for k, v in layer.items() if k in FORWARD_KEYS}
        if extra:
            out[block] = {**params[block], "moe": {**params[block]["moe"], **extra}}
    return out


def aux_free_bias(bias_E: jax.Array, mask_NxE: jax.Array, rate: float) -> jax.Array:
    """bias + rate * sign(mean load - load), load = tokens routed to each expert."""
    load_E = jnp.sum(mask_NxE.astype(jnp.float32), axis=0)
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def update_router_state(cfg: ModelConfig, router_state: dict, params: Any, records, step: jax.Array):
    """(router_state, params, metrics) after one step; `records` are the step's MoE records (one
    per layer, the forward before the update) and `step` the step count after the update."""
    if not router_state:
        return router_state, params, {}
    m = cfg.moe
    new_rs, new_params, metrics = {}, dict(params), {}
    added, removed, live_n = [], [], []
    for i, rec in enumerate(records):
        block = f"block_{i}"
        layer = dict(router_state[block])
        if "router_bias" in layer:
            layer["router_bias"] = aux_free_bias(layer["router_bias"], rec.router.mask, m.aux_free_rate)
        if "live" in layer:
            window = adaptive_experts.accumulate({k: layer[k] for k in adaptive_experts.WINDOW_KEYS},
                                                 rec.router.mask, rec.router.pre, rec.expert_in)
            moe = params[block]["moe"]
            adapted, protos, theta, counts = adaptive_experts.adapt(window, moe["prototypes"], moe["thresholds"])
            due = (step % m.adaptive_every) == 0
            pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(due, x, y), a, b)
            layer.update(pick(adapted, window))
            new_params[block] = {**params[block], "moe": {**moe, "prototypes": jnp.where(due, protos, moe["prototypes"]),
                                                          "thresholds": jnp.where(due, theta, moe["thresholds"])}}
            added.append(jnp.where(due, counts["added"], 0.0))
            removed.append(jnp.where(due, counts["removed"], 0.0))
            live_n.append(jnp.sum(layer["live"].astype(jnp.float32)))
        new_rs[block] = layer
    if live_n:
        metrics = {"moe/live_experts": jnp.mean(jnp.stack(live_n)), "moe/experts_added": sum(added),
                   "moe/experts_removed": sum(removed)}
    if m.aux_free_rate > 0:
        metrics["moe/aux_free_bias_absmax"] = jnp.max(jnp.stack([jnp.max(jnp.abs(l["router_bias"]))
                                                                 for l in new_rs.values()]))
    return new_rs, new_params, metrics


def live_masks(cfg: ModelConfig, router_state: dict) -> list:
    """Per MoE layer the live mask [E] (None where the adaptive expert count is off)."""
    return [router_state.get(f"block_{i}", {}).get("live") for i in range(cfg.num_layers)]
