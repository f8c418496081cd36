"""Non-finite guard around the train step: a step whose loss, gradients or new parameters are
not finite leaves the parameters and the optimizer state unchanged.

    step = make_guarded_step(model_cfg, tx, mesh)      # jitted, sharded, donates the state
    state, metrics = step(state, batch)                # metrics["train/skipped"] is 0 or 1

Inside the jit the candidate new state is computed as usual (onn_jax.training.step.train_step), then
`ok = isfinite(total loss) & isfinite(global grad norm) & all(isfinite(new params))` picks,
leaf by leaf with `jnp.where`, the new or the old params, opt_state and router_state. The step counter
always advances: it counts batches consumed, so checkpoint cadence and the data position stay
aligned with the loop; AdamW's own count (in opt_state) does not advance on a skipped step.
No host synchronisation happens here: the caller reads `train/skipped` when it likes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from onn_jax.config import ModelConfig

SKIPPED = "train/skipped"


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every element of every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def guarded_train_step(state, batch, cfg: ModelConfig, tx: optax.GradientTransformation,
                       surprise_fn: str | Callable | None = None, step_fn: Callable | None = None):
    """`step_fn(state, batch, cfg, tx, surprise_fn)` (default onn_jax.training.step.train_step), with the
    update dropped when it is not finite. Adds `train/skipped` (int32 0/1) to the metrics."""
    if step_fn is None:
        from onn_jax.training.step import train_step as step_fn
    new, metrics = step_fn(state, batch, cfg, tx, surprise_fn)
    ok = (jnp.isfinite(metrics["train/total_loss"]) & jnp.isfinite(metrics["train/grad_norm"])
          & all_finite(new.params))
    keep = lambda n, o: jnp.where(ok, n, o)
    out = new.replace(params=jax.tree.map(keep, new.params, state.params),
                      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                      router_state=jax.tree.map(keep, new.router_state, state.router_state))
    metrics = dict(metrics)
    metrics[SKIPPED] = (~ok).astype(jnp.int32)
    return out, metrics


def make_guarded_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh=None,
                      surprise_fn: str | Callable | None = None, donate: bool = True,
                      accum_steps: int = 1) -> Callable:
    """The jitted guarded step. With a mesh: the shardings of
    onn_jax.training.sharded.make_sharded_train_step (state in/out, batch, replicated metrics).
    accum_steps > 1: the gradient from that many microbatches (onn_jax.training.accumulate)."""
    guarded = guarded_train_step
    if accum_steps > 1:
        from onn_jax.training.step import train_step
        guarded = functools.partial(guarded_train_step,
                                    step_fn=functools.partial(train_step, accum_steps=accum_steps))
    if mesh is None:
        fn = functools.partial(guarded, cfg=model_cfg, tx=tx, surprise_fn=surprise_fn)
        return jax.jit(fn, donate_argnums=(0,) if donate else ())
    from onn_jax.training.sharded import make_sharded_train_step
    return make_sharded_train_step(model_cfg, tx, mesh, surprise_fn=surprise_fn, donate=donate,
                                   step_fn=guarded)
