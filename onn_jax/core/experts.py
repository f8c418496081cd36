"""Expert FFNs over a leading expert axis, as pure functions (einsums, no loop over experts).

Parameters of E experts are stacked: w1 [E, C, I], w2 [E, I, C] (and w3 [E, C, I] for
SwiGLU). `expert_outputs` computes every expert on every token: the dense expert output
Y of shape [N, E, C] from which Surprise is taken.

Entry contracts (onn_jax.core.contracts): tokens x are a floating [N, C] (bfloat16 included)
and the weights fit x's C and each other.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from onn_jax.core.contracts import check_stacked_experts, check_tokens


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU in its exact erf form (PyTorch's default; jax.nn.gelu defaults to tanh)."""
    return jax.nn.gelu(x, approximate=False)


def expert_outputs(params: dict, x_NxC: jax.Array, kind: str = "gelu") -> jax.Array:
    """Dense expert output Y[t, e] = W2_e . act(W1_e . x_t), shape [N, E, C].

    kind `gelu`: the faithful FFN; `swiglu`: W2_e . (silu(W1_e x) * W3_e x).
    x_NxC floating [N, C]; the weights are cast to its dtype.
    """
    check_stacked_experts("expert_outputs", params, x_NxC, kind == "swiglu")
    h_NxExI = jnp.einsum("nc,eci->nei", x_NxC, params["w1"].astype(x_NxC.dtype))
    if kind == "gelu":
        a_NxExI = gelu_exact(h_NxExI)
    elif kind == "swiglu":
        u_NxExI = jnp.einsum("nc,eci->nei", x_NxC, params["w3"].astype(x_NxC.dtype))
        a_NxExI = jax.nn.silu(h_NxExI) * u_NxExI
    else:
        raise ValueError(f"unknown expert kind {kind!r}")
    return jnp.einsum("nei,eic->nec", a_NxExI, params["w2"].astype(x_NxC.dtype))


def combine(weights_NxE: jax.Array, y_NxExC: jax.Array) -> jax.Array:
    """out[t] = sum_e w[t, e] * Y[t, e], computed in float32. weights_NxE [N, E] and
    y_NxExC [N, E, C], floating."""
    chex.assert_rank(weights_NxE, 2, custom_message="combine: weights_NxE must be [N, E]")
    chex.assert_shape(y_NxExC, (*weights_NxE.shape, None),
                      custom_message="combine: y_NxExC must be [N, E, C], N and E of weights_NxE")
    chex.assert_type([weights_NxE, y_NxExC], float, custom_message="combine: weights_NxE, y_NxExC must be floating")
    return jnp.einsum("ne,nec->nc", weights_NxE.astype(jnp.float32), y_NxExC.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def dense_ffn(params: dict, x_NxC: jax.Array, kind: str = "gelu") -> jax.Array:
    """A plain FFN (the `dense` router baseline): w1 [C, I], w2 [I, C] (w3 [C, I] for SwiGLU)
    on floating tokens x_NxC [N, C]."""
    check_tokens("dense_ffn", "x_NxC", x_NxC)
    c = x_NxC.shape[1]
    chex.assert_shape(params["w1"], (c, None), custom_message="dense_ffn: w1 must be [C, I], C of x_NxC")
    chex.assert_shape(params["w2"], (params["w1"].shape[1], c), custom_message="dense_ffn: w2 must be [I, C]")
    if kind == "swiglu":
        chex.assert_shape(params["w3"], params["w1"].shape, custom_message="dense_ffn: w3 must be [C, I] like w1")
    h = x_NxC @ params["w1"].astype(x_NxC.dtype)
    if kind == "gelu":
        a = gelu_exact(h)
    elif kind == "swiglu":
        a = jax.nn.silu(h) * (x_NxC @ params["w3"].astype(x_NxC.dtype))
    else:
        raise ValueError(f"unknown expert kind {kind!r}")
    return a @ params["w2"].astype(x_NxC.dtype)
