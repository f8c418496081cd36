"""The MoE feed-forward layer as a pure function of a parameter dict and tokens.

    out, record = moe_layer(params, x_NxC, moe_cfg, taps)

`taps` (optional) are zero arrays added to the dense expert output Y [N, E, C] and to the
layer output out [N, C]; differentiating the main loss with respect to them yields
dL/dY and dL/dout in one reverse pass (the Surprise mechanism) without touching the
forward values. `record` keeps what the gate loss and the metrics need.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import MoEConfig
from onn_jax.experts import combine, expert_outputs
from onn_jax.gate import RouterOutput, top_any_gate, topk_gate


class MoERecord(NamedTuple):
    """Forward values of one MoE layer kept for the gate loss, Surprise and metrics."""

    router: RouterOutput
    expert_out: jax.Array  # Y [N, E, C], float32


class MoETaps(NamedTuple):
    """Zero taps whose cotangents are dL/dY and dL/dout."""

    expert_out: jax.Array  # [N, E, C] float32
    moe_out: jax.Array     # [N, C] float32


def zero_taps(num_tokens: int, num_experts: int, hidden: int) -> MoETaps:
    return MoETaps(jnp.zeros((num_tokens, num_experts, hidden), jnp.float32),
                   jnp.zeros((num_tokens, hidden), jnp.float32))


def route(params: dict, x_NxC: jax.Array, cfg: MoEConfig) -> RouterOutput:
    """Runs the configured router (`surprise`: top-any gate, `topk`: linear top-k)."""
    if cfg.router == "surprise":
        return top_any_gate(x_NxC, params["prototypes"], params["thresholds"],
                            cfg.effective_fallback_k)
    if cfg.router == "topk":
        return topk_gate(x_NxC, params["router"], cfg.top_k)
    raise ValueError(f"moe_layer has no router {cfg.router!r}")


def moe_layer(params: dict, x_NxC: jax.Array, cfg: MoEConfig,
              taps: MoETaps | None = None) -> tuple[jax.Array, MoERecord]:
    """Routes, runs all experts densely, and combines: out[t] = sum_e w[t,e] Y[t,e].

    The output is float32; the caller casts it back to the residual dtype.
    """
    router = route(params, x_NxC, cfg)
    y_NxExC = expert_outputs(params["experts"], x_NxC, cfg.expert_kind).astype(jnp.float32)
    if taps is not None:
        y_NxExC = y_NxExC + taps.expert_out
    out_NxC = combine(router.weights, y_NxExC)
    if taps is not None:
        out_NxC = out_NxC + taps.moe_out
    return out_NxC, MoERecord(router=router, expert_out=y_NxExC)
