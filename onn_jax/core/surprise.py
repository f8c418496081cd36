"""Surprise definitions: pure functions from the main loss's cotangents to S [N, E].

The train step takes one reverse pass of the main loss (never the gate losses) into zero
"taps" added to each MoE layer's dense expert output Y [N, E, C] and layer output
out [N, C], and hands the cotangents with the forward values to a surprise function.
A researcher adds a definition by writing one function with this signature and passing
it to the train step (or registering it in SURPRISE_FNS to select it by name).

Note (docs/ALGORITHM.md, section 2): with out = sum_e w[t,e] Y[t,e], dL/dY[t,e] = w[t,e] dL/dout[t],
so the faithful S[t,e] = w[t,e] |dL/dout[t]|, zero for every inactive expert.

Each definition checks, at entry, the fields it reads (chex, static shapes and dtypes only, so
free under jit): their ranks, that N, E and C agree among them, and that they are floating.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp


class SurpriseInputs(NamedTuple):
    """Everything a surprise definition may use, for one MoE layer."""

    d_expert_out: jax.Array  # [N, E, C] dL_main / dY
    d_moe_out: jax.Array     # [N, C]    dL_main / dout
    expert_out: jax.Array    # [N, E, C] Y
    weights: jax.Array       # [N, E]    combine weights
    mask: jax.Array          # [N, E]    active experts
    expert_in: jax.Array | None = None  # [N, C] the experts' input x (for `learning_cost`)
    expert_params: Any = None           # the layer's stacked expert weights {w1, w2[, w3]}


SurpriseFn = Callable[[SurpriseInputs], jax.Array]


def output_grad_surprise(inputs: SurpriseInputs) -> jax.Array:
    """Faithful: S[t, e] = || dL/dY[t, e, :] ||_2 in float32. Reads d_expert_out [N, E, C]."""
    chex.assert_rank(inputs.d_expert_out, 3, custom_message="output_grad_surprise: d_expert_out must be [N, E, C]")
    chex.assert_type(inputs.d_expert_out, float, custom_message="output_grad_surprise: d_expert_out must be floating")
    d = inputs.d_expert_out.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))


def output_grad_closed_surprise(inputs: SurpriseInputs) -> jax.Array:
    """Option: the faithful S in closed form, S[t, e] = w[t, e] * || dL/dout[t] ||_2.

    Equal to `output_grad` (up to rounding) for the faithful combine out = sum_e w Y, and
    cheaper: it needs only dL/dout [N, C], never the [N, E, C] cotangent. Under sparse
    dispatch it also gives dropped pairs their (dense-path) Surprise instead of 0.
    Reads d_moe_out [N, C] and weights [N, E].
    """
    fn = "output_grad_closed_surprise"
    chex.assert_rank(inputs.d_moe_out, 2, custom_message=f"{fn}: d_moe_out must be [N, C]")
    chex.assert_shape(inputs.weights, (inputs.d_moe_out.shape[0], None),
                      custom_message=f"{fn}: weights must be [N, E], N of d_moe_out")
    chex.assert_type([inputs.d_moe_out, inputs.weights], float,
                     custom_message=f"{fn}: d_moe_out, weights must be floating")
    d = inputs.d_moe_out.astype(jnp.float32)
    norm_N = jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))
    return inputs.weights.astype(jnp.float32) * norm_N[:, None]
