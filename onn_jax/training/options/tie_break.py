"""The hard target's tie-break (model.moe.gate_tie_break; the faithful `low_index`).

`random`: argmin S with ties broken uniformly at random (keyed by the step and the layer)
instead of toward the lowest index. Why: with the faithful S = w |g| every inactive expert
ties at 0 and jnp.argmin always names the lowest-index one, so high-index experts are never
a target and die.
"""
from __future__ import annotations

import jax

from onn_jax.config import MoEConfig
from onn_jax.core.gate_targets import random_tie_argmin
from onn_jax.training.options.base import GateContext, GateOption, LayerGate


class RandomTieBreak(GateOption):
    name = "gate_tie_break"

    def enabled(self, m: MoEConfig) -> bool:
        return m.gate_tie_break == "random"

    def shape_gate(self, ctx: GateContext, gate: LayerGate) -> LayerGate:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), ctx.step), ctx.layer)
        return gate._replace(target=random_tie_argmin(gate.surprise, key))
