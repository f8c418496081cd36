"""The registry of gate options, in the order the step applies them, and the two calls the step
makes through it: the layers' gate views and the extra gate-loss terms.

Order matters where options compose: the adaptive expert count masks dead experts' S first,
so the token set and the tie-break see the masked S.
"""
from __future__ import annotations

import jax

from onn_jax.config import ModelConfig, MoEConfig
from onn_jax.training.options.adaptive_experts import AdaptiveExperts
from onn_jax.training.options.aux_free import AuxFreeBias
from onn_jax.training.options.base import GateContext, GateOption, LayerGate
from onn_jax.training.options.budget import AvgKBudget
from onn_jax.training.options.gate_tokens import GateTokens
from onn_jax.training.options.tie_break import RandomTieBreak

OPTIONS: tuple[GateOption, ...] = (AdaptiveExperts(), GateTokens(), RandomTieBreak(), AvgKBudget(), AuxFreeBias())


def enabled_options(m: MoEConfig) -> tuple[GateOption, ...]:
    """The options model.moe turns on (none for the faithful configuration or a dense model)."""
    if m.router == "dense":
        return ()
    return tuple(opt for opt in OPTIONS if opt.enabled(m))


def layer_gates(cfg: ModelConfig, surprises, router_state: dict | None, loss_mask_N: jax.Array,
                step: jax.Array) -> tuple[LayerGate, ...]:
    """Per MoE layer, what its gate loss is trained toward: LayerGate(S) shaped by each option."""
    options = enabled_options(cfg.moe)
    gates = []
    for i, s in enumerate(surprises):
        gate = LayerGate(s)
        ctx = GateContext(cfg, i, loss_mask_N, step, (router_state or {}).get(f"block_{i}", {}))
        for opt in options:
            gate = opt.shape_gate(ctx, gate)
        gates.append(gate)
    return tuple(gates)


def extra_gate_losses(m: MoEConfig, pre_NxE: jax.Array) -> dict[str, tuple[float, jax.Array]]:
    """{part name: (weight, value)} every option adds to one layer's gate loss."""
    out = {}
    for opt in enabled_options(m):
        out.update(opt.extra_losses(m, pre_NxE))
    return out
