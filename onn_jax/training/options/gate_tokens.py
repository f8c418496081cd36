"""Which tokens the MoE gate loss averages over (model.moe.gate_tokens; the faithful `all`).

- `unmasked`: the tokens whose label the main loss trains on (loss_mask), so prompt tokens
  of chat records do not pull the gate.
- `nonconstant`: tokens whose S row is not constant (among the live experts). Why: a token
  whose loss gradient is 0 (a masked label, in the top layer) has S = 0 everywhere, its hard
  target is expert 0 and its soft target uniform: 86% of the builtin corpus's positions, which
  collapses the top layer (docs/RESEARCH.md).
"""
from __future__ import annotations

from onn_jax.config import MoEConfig
from onn_jax.core.gate_targets import nonconstant_rows
from onn_jax.training.options.base import GateContext, GateOption, LayerGate


class GateTokens(GateOption):
    name = "gate_tokens"

    def enabled(self, m: MoEConfig) -> bool:
        return m.gate_tokens != "all"

    def shape_gate(self, ctx: GateContext, gate: LayerGate) -> LayerGate:
        if ctx.cfg.moe.gate_tokens == "unmasked":
            return gate._replace(tokens=ctx.loss_mask_N)
        return gate._replace(tokens=nonconstant_rows(gate.surprise, ctx.state.get("live")))
