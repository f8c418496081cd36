"""Router state that is not a parameter: TrainState.router_state, kept by the gate options.

Some options carry state that the optimizer must not touch but the forward, the checkpoint and
evaluation need (the aux-loss-free bias, the adaptive expert count's live mask and window).
It lives in ONE train-state field, a dict keyed like the parameters' blocks ({} when no such
option is on, the faithful default):

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
Each piece comes from the options' hooks (onn_jax.training.options.base).
"""
from __future__ import annotations

from typing import Any

import jax

from onn_jax.config import ModelConfig
from onn_jax.training.options.registry import OPTIONS, enabled_options

FORWARD_KEYS = tuple(k for opt in OPTIONS for k in opt.forward_keys)


def init_router_state(cfg: ModelConfig) -> dict:
    """The router state at step 0 ({} for a model without stateful routing)."""
    options = [opt for opt in enabled_options(cfg.moe) if opt.stateful]
    if not options:
        return {}

    def layer() -> dict:  # fresh arrays per layer (a donated state must not alias buffers)
        out = {}
        for opt in options:
            out.update(opt.layer_state(cfg))
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


def update_router_state(cfg: ModelConfig, router_state: dict, params: Any, records, step: jax.Array):
    """(router_state, params, metrics) after one step; `records` are the step's MoE records (one
    per layer, the forward before the update) and `step` the step count after the update."""
    if not router_state:
        return router_state, params, {}
    options = [opt for opt in enabled_options(cfg.moe) if opt.stateful]
    new_rs, new_params, per_option = {}, dict(params), {opt.name: [] for opt in options}
    for i, record in enumerate(records):
        block = f"block_{i}"
        state, moe = dict(router_state[block]), params[block]["moe"]
        for opt in options:
            state, moe, layer_metrics = opt.update(cfg.moe, state, moe, record, step)
            per_option[opt.name].append(layer_metrics)
        new_rs[block] = state
        if moe is not params[block]["moe"]:
            new_params[block] = {**params[block], "moe": moe}
    metrics = {}
    for opt in options:
        metrics.update(opt.summarize(per_option[opt.name]))
    return new_rs, new_params, metrics
