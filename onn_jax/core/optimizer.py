"""The optimizer: expert gradient filter -> optional clip -> AdamW, with the no-token rule.

In the original every expert is its own pair of tensors and gradients are cleared to None,
so an expert that no token of the batch reached has *no* gradient (docs/ALGORITHM.md,
"Experts that receive no token"). `optim.idle_experts` says what that means here:

  skip (faithful)  an idle expert is left out of the 2-sigma statistics (mean, std and n),
                   and AdamW skips it: no weight decay, no moment update, and its own step
                   counter does not advance (each expert keeps its bias correction 1 - b^t).
  zero_grad        the idle expert's zero gradient is pooled, decayed and moved by momentum
                   (plain optax AdamW with one step counter).

Which experts are idle is an explicit argument of the update, `expert_active` ([L, E] bool,
True where expert e of MoE layer l received a token; see `expert_activity`), passed as an
optax extra argument: `tx.update(grads, state, params, expert_active=active_LxE)`. Gradient
accumulation ORs it over its microbatches. Leaves under an `experts` module ([E, ...] stacked
weights of block_l) are the expert leaves; every other leaf is updated every step.

The learning rate is a float or an optax schedule; a schedule is called with the *global*
update count (`PerExpertAdamState.count`, the number of updates before this one, as in
optax), not with an expert's own counter.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from onn_jax.core.contracts import check_expert_active
from onn_jax.core.grad_filter import expert_axes, leaf_active

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class PerExpertAdamState(NamedTuple):
    """AdamW state with PyTorch's per-tensor step counters.

    count: global number of updates (drives a learning-rate schedule).
    counts: per leaf, the number of updates that leaf took: [E] int32 for an expert leaf
      (one counter per expert; [L, E] for a stacked leaf of model.scan_layers), [] int32 for
      every other leaf.
    mu, nu: first and second moments, float32, shaped like the parameters.
    """

    count: jax.Array
    counts: Any
    mu: Any
    nu: Any


def per_expert_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                     eps: float = 1e-8, weight_decay: float = 0.01) -> optax.GradientTransformationExtraArgs:
    """PyTorch AdamW (decoupled decay lr * wd * p) with one step counter per expert.

    Per leaf and (for expert leaves) per expert e that received a token, with t = its own
    counter + 1:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    update = -lr * (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd * p).
    An idle expert's moments and counter are kept and its update is -0.0, so
    `optax.apply_updates` leaves its parameters bitwise unchanged (x + -0.0 == x for every x).
    Without `expert_active` every expert counts as active (then it equals optax.adamw).
    The update checks (chex) that the updates have the params' shapes and that `expert_active`
    is a bool [L, E].
    """
    lr_fn = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def init(params):
        def counts(path, p):
            return jnp.zeros(p.shape[:expert_axes(path)] if p.ndim else (), jnp.int32)
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
        return PerExpertAdamState(count=jnp.zeros([], jnp.int32),
                                  counts=jax.tree_util.tree_map_with_path(counts, params),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None, *, expert_active=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("per_expert_adamw needs params (decoupled weight decay)")
        chex.assert_trees_all_equal_shapes(updates, params,
                                           custom_message="per_expert_adamw: updates must have the params' shapes")
        check_expert_active("per_expert_adamw", expert_active)
        lr = jnp.asarray(lr_fn(state.count), jnp.float32)

        def one(path, g, p, t, m, v):
            active = leaf_active(path, g, expert_active)
            step = jnp.ones_like(t) if active is None else active.astype(jnp.int32)
            t_new = t + step
            a = jnp.ones(g.shape, bool) if active is None else jnp.broadcast_to(
                active.reshape(active.shape + (1,) * (g.ndim - active.ndim)), g.shape)
            g32 = g.astype(jnp.float32)
            m_new = jnp.where(a, b1 * m + (1 - b1) * g32, m)
            v_new = jnp.where(a, b2 * v + (1 - b2) * jnp.square(g32), v)
            t_b = jnp.maximum(t_new, 1).astype(jnp.float32).reshape(t_new.shape + (1,) * (g.ndim - t_new.ndim))
            m_hat = m_new / (1 - b1 ** t_b)
            v_hat = v_new / (1 - b2 ** t_b)
            u = -lr * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * p.astype(jnp.float32))
            u = jnp.where(a, u, -0.0).astype(p.dtype)
            return u, t_new, m_new, v_new

        out = jax.tree_util.tree_map_with_path(one, updates, params, state.counts, state.mu, state.nu)
        is_out = lambda x: isinstance(x, tuple) and len(x) == 4 and not isinstance(x, PerExpertAdamState)
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=is_out)
        new_state = PerExpertAdamState(count=optax.safe_increment(state.count), counts=pick(1),
                                       mu=pick(2), nu=pick(3))
        return pick(0), new_state

    return optax.GradientTransformationExtraArgs(init, update)
