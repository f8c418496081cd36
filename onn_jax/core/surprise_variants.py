"""Surprise definitions beyond the faithful one, as pure functions of SurpriseInputs -> [N, E].

Why: with out_t = sum_e w[t,e] Y[t,e] the faithful S[t,e] = |dL/dY[t,e]| = w[t,e] |g_t|
(g_t = dL/dout_t) is zero for every inactive expert, so its argmin names an inactive expert
and says nothing about what expert e would have done for token t. The dense expert output
holds every expert's output for every token, which makes better-grounded definitions cheap.
Both below are defined for inactive experts too; like the faithful S, lower is better for
the gate loss (its hard target is argmin S, its soft target softmax(-S)).

- `advantage_surprise`: A[t,e] = <g_t, Y[t,e] - out_t>, the first-order change of the main
  loss when routing weight moves from the current mixture to expert e:
  d/de L(out_t + e (Y[t,e] - out_t)) at e = 0. Negative = expert e would lower the loss.
  Needs the dense Y: under sparse dispatch uncomputed pairs carry Y = 0 and A is wrong there.
- `learning_cost_surprise`: LC[t,e] = || d <g_t, Y_e(theta_e; x_t)> / d theta_e ||_2, the norm
  of the gradient token t would put on expert e's parameters if e received the token's whole
  cotangent g_t (unweighted by w). For a linear map y = z W the per-token gradient is the
  outer product z^T delta, whose Frobenius norm factorises as |z| |delta| (Goodfellow, 2015,
  "Efficient per-example gradient computations"), so for the GELU expert
  Y = gelu(x W1) W2 with a = gelu(x W1), delta_h = (g W2^T) * gelu'(x W1):
      LC^2 = |a|^2 |g|^2 + |x|^2 |delta_h|^2
  (SwiGLU: a = silu(h) u with u = x W3 adds |x|^2 |delta_u|^2). Cost O(N E I), no per-token
  gradient is materialised. It needs the experts' input x [N, C] and their stacked weights,
  which SurpriseInputs carries as the optional fields `expert_in` and `expert_params`.
  Other unit kinds (gated attention heads) put an object with a method
  `unit_grad_norms(x_NxC, g_NxC) -> [N, U]` in `expert_params`; it is called instead.
Like the definitions of onn_jax.core.surprise, each checks at entry the shapes and dtypes of
the fields it reads (chex).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from onn_jax.core.contracts import check_stacked_experts, check_tokens
from onn_jax.core.experts import gelu_exact
from onn_jax.core.surprise import SurpriseInputs

HIGHEST = jax.lax.Precision.HIGHEST


def advantage_surprise(inputs: SurpriseInputs) -> jax.Array:
    """A[t, e] = <g_t, Y[t, e] - out_t> in float32, out_t = sum_e w[t, e] Y[t, e].

    Reads expert_out Y [N, E, C], d_moe_out g [N, C] and weights w [N, E], floating.
    """
    fn = "advantage_surprise"
    chex.assert_rank(inputs.expert_out, 3, custom_message=f"{fn}: expert_out must be [N, E, C]")
    n, e, c = inputs.expert_out.shape
    chex.assert_shape(inputs.d_moe_out, (n, c), custom_message=f"{fn}: d_moe_out must be [N, C] of expert_out")
    chex.assert_shape(inputs.weights, (n, e), custom_message=f"{fn}: weights must be [N, E] of expert_out")
    chex.assert_type([inputs.expert_out, inputs.d_moe_out, inputs.weights], float,
                     custom_message=f"{fn}: expert_out, d_moe_out, weights must be floating")
    y_NxExC = inputs.expert_out.astype(jnp.float32)
    g_NxC = inputs.d_moe_out.astype(jnp.float32)
    out_NxC = jnp.einsum("ne,nec->nc", inputs.weights.astype(jnp.float32), y_NxExC, precision=HIGHEST)
    return jnp.einsum("nc,nec->ne", g_NxC, y_NxExC - out_NxC[:, None, :], precision=HIGHEST)


def _derivative(fn, h: jax.Array) -> jax.Array:
    """Element-wise derivative fn'(h) of an element-wise function (one forward-mode pass)."""
    return jax.jvp(fn, (h,), (jnp.ones_like(h),))[1]


def expert_grad_norms(expert_params: dict, x_NxC: jax.Array, g_NxC: jax.Array) -> jax.Array:
    """[N, E]: || d <g_t, Y_e(x_t)> / d theta_e ||_2 over all of expert e's weights.

    expert_params: stacked w1 [E, C, I], w2 [E, I, C] (and w3 [E, C, I] for SwiGLU, detected
    by its presence). Per linear layer |input| * |output cotangent| (per-example factorisation).
    x_NxC and g_NxC floating [N, C].
    """
    check_stacked_experts("expert_grad_norms", expert_params, x_NxC, "w3" in expert_params)
    chex.assert_equal_shape([x_NxC, g_NxC], custom_message="expert_grad_norms: g_NxC must be [N, C] like x_NxC")
    chex.assert_type(g_NxC, float, custom_message="expert_grad_norms: g_NxC must be floating")
    f32 = lambda a: a.astype(jnp.float32)
    x, g = f32(x_NxC), f32(g_NxC)
    h_NxExI = jnp.einsum("nc,eci->nei", x, f32(expert_params["w1"]), precision=HIGHEST)
    da_NxExI = jnp.einsum("nc,eic->nei", g, f32(expert_params["w2"]), precision=HIGHEST)  # g W2^T
    sq = lambda a: jnp.sum(jnp.square(a), axis=-1)
    x_sq_N1, g_sq_N1 = sq(x)[:, None], sq(g)[:, None]
    if "w3" in expert_params:  # SwiGLU: a = silu(h) * u, u = x W3
        u_NxExI = jnp.einsum("nc,eci->nei", x, f32(expert_params["w3"]), precision=HIGHEST)
        s_NxExI = jax.nn.silu(h_NxExI)
        a_NxExI = s_NxExI * u_NxExI
        dh_NxExI = da_NxExI * u_NxExI * _derivative(jax.nn.silu, h_NxExI)
        du_NxExI = da_NxExI * s_NxExI
        total = sq(a_NxExI) * g_sq_N1 + x_sq_N1 * (sq(dh_NxExI) + sq(du_NxExI))
    else:
        a_NxExI = gelu_exact(h_NxExI)
        dh_NxExI = da_NxExI * _derivative(gelu_exact, h_NxExI)
        total = sq(a_NxExI) * g_sq_N1 + x_sq_N1 * sq(dh_NxExI)
    return jnp.sqrt(total)


def learning_cost(inputs: SurpriseInputs, x_NxC: jax.Array, expert_params: dict) -> jax.Array:
    """LC[t, e] with the experts' input and weights given explicitly (see module docstring)."""
    return expert_grad_norms(expert_params, x_NxC, inputs.d_moe_out)


def learning_cost_surprise(inputs: SurpriseInputs) -> jax.Array:
    """LC[t, e] from SurpriseInputs that carry `expert_in` [N, C] and `expert_params`."""
    x = getattr(inputs, "expert_in", None)
    params = getattr(inputs, "expert_params", None)
    if x is None or params is None:
        raise ValueError("surprise 'learning_cost' needs SurpriseInputs.expert_in (the experts' "
                         "input x [N, C]) and SurpriseInputs.expert_params (stacked w1, w2[, w3]); "
                         "the MoE record did not provide them")
    check_tokens("learning_cost_surprise", "expert_in", x)
    chex.assert_equal_shape([x, inputs.d_moe_out],
                            custom_message="learning_cost_surprise: d_moe_out must be [N, C] like expert_in")
    if hasattr(params, "unit_grad_norms"):  # a unit kind that declares its own (heads.HeadGradNorms)
        return params.unit_grad_norms(x, inputs.d_moe_out)
    return learning_cost(inputs, x, params)


VARIANTS = {"advantage": advantage_surprise, "learning_cost": learning_cost_surprise}
