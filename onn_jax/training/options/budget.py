"""The avg_k budget (model.moe.w_budget > 0): pulls the gate's mean expert count toward
model.moe.budget_k, for matched active compute with a top-k baseline.

Adds w_budget * (mean_t k_t - budget_k)^2 to the layer's gate loss (part `budget`), with k_t
the smooth count of experts above threshold, or with budget_fallback the expected count
including the E/2 fallback (onn_jax.core.gate_targets.avg_k_budget).
"""
from __future__ import annotations

from onn_jax.config import MoEConfig
from onn_jax.core.gate_targets import avg_k_budget
from onn_jax.training.options.base import GateOption


class AvgKBudget(GateOption):
    name = "w_budget"

    def enabled(self, m: MoEConfig) -> bool:
        return m.w_budget > 0

    def extra_losses(self, m, pre_NxE):
        fallback_k = m.effective_fallback_k if m.budget_fallback else None
        return {"budget": (m.w_budget, avg_k_budget(pre_NxE, m.budget_k, fallback_k=fallback_k))}
