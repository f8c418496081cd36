"""Surprise definitions by name: `model.moe.surprise` (and the head gate's) selects one.

A new definition is one function of SurpriseInputs -> S [N, E], registered here by name
(`SURPRISE_FNS[name] = fn`) or passed to the train step directly.
"""
from __future__ import annotations

from onn_jax.core.surprise import SurpriseFn, output_grad_closed_surprise, output_grad_surprise
from onn_jax.core.surprise_variants import advantage_surprise, learning_cost_surprise

SURPRISE_FNS: dict[str, SurpriseFn] = {
    "output_grad": output_grad_surprise,
    "output_grad_closed": output_grad_closed_surprise,
    "advantage": advantage_surprise,
    "learning_cost": learning_cost_surprise,
}


def get_surprise_fn(name_or_fn: str | SurpriseFn) -> SurpriseFn:
    """Looks a surprise definition up by name; a callable is returned unchanged."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return SURPRISE_FNS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown surprise {name_or_fn!r}; known: {sorted(SURPRISE_FNS)}") from None
