"""Shape and dtype contracts shared by the core's public functions (chex).

Each check reads only static shapes and dtypes, so it holds for tracers as well as arrays
(under jit, vmap, vjp and scan it runs once, at trace time, and costs nothing in the compiled
step), and it raises AssertionError whose message ends in "[<function>: <argument> must be ...]",
so a caller learns at the call which argument is wrong instead of meeting a broadcast deep inside.
"""
from __future__ import annotations

import chex
import jax


def check_tokens(fn: str, name: str, x_NxC: jax.Array) -> None:
    """x_NxC is a floating [N, C] (bfloat16 included)."""
    chex.assert_rank(x_NxC, 2, custom_message=f"{fn}: {name} must be [N, C]")
    chex.assert_type(x_NxC, float, custom_message=f"{fn}: {name} must be floating")


def check_scores(fn: str, name: str, scores_NxE: jax.Array) -> None:
    """scores_NxE (router logits, pre-activations, Surprise) is a floating [N, E]."""
    chex.assert_rank(scores_NxE, 2, custom_message=f"{fn}: {name} must be [N, E]")
    chex.assert_type(scores_NxE, float, custom_message=f"{fn}: {name} must be floating")


def check_per_token(fn: str, name: str, a_N: jax.Array | None, n: int) -> None:
    """a_N (a per-token mask, target or domain; None: absent) is [N], any dtype."""
    if a_N is not None:
        chex.assert_shape(a_N, (n,), custom_message=f"{fn}: {name} must be [N], N = {n}")


def check_stacked_experts(fn: str, params: dict, x_NxC: jax.Array, swiglu: bool) -> None:
    """Floating tokens x_NxC [N, C] and stacked expert weights w1 [E, C, I], w2 [E, I, C] and
    (SwiGLU) w3 [E, C, I] that fit them."""
    check_tokens(fn, "x_NxC", x_NxC)
    c = x_NxC.shape[1]
    chex.assert_shape(params["w1"], (None, c, None), custom_message=f"{fn}: w1 must be [E, C, I], C of x_NxC")
    e, _, i = params["w1"].shape
    chex.assert_shape(params["w2"], (e, i, c), custom_message=f"{fn}: w2 must be [E, I, C], E and I of w1")
    if swiglu:
        chex.assert_shape(params["w3"], (e, c, i), custom_message=f"{fn}: w3 must be [E, C, I] like w1")


def check_expert_active(fn: str, expert_active_LxE: jax.Array | None) -> None:
    """The optimizer's extra argument expert_active (None: absent) is a bool [L, E]."""
    if expert_active_LxE is not None:
        chex.assert_rank(expert_active_LxE, 2, custom_message=f"{fn}: expert_active must be [L, E]")
        chex.assert_type(expert_active_LxE, bool, custom_message=f"{fn}: expert_active must be bool")
