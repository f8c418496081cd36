"""The sharded train state and step: shardings of a TrainState, sharded init, the step
jitted on a mesh (every mesh computes the same function as one device).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from onn_jax.config import ModelConfig
from onn_jax.parallel.constrain import activation_rules
from onn_jax.parallel.rules import (
    RULES,
    Rules,
    batch_sharding,
    check_batch,
    logical_to_spec,
    param_logical_axes,
    param_shardings,
    path_keys,
)


def state_shardings(state_shape, mesh: Mesh, rules: Rules = RULES):
    """Shardings of a TrainState: optimizer moments like their parameters, scalars replicated."""
    from onn_jax.training.state import TrainState
    def opt_leaf(path, x):
        axes = param_logical_axes(path_keys(path), np.ndim(x)) if np.ndim(x) else None
        spec = P() if axes is None else logical_to_spec(axes, np.shape(x), mesh, rules)
        return NamedSharding(mesh, spec)
    return TrainState(step=NamedSharding(mesh, P()),
                      params=param_shardings(state_shape.params, mesh, rules),
                      opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state_shape.opt_state),
                      router_state=jax.tree.map(lambda _: NamedSharding(mesh, P()), state_shape.router_state))


def abstract_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: Rules = RULES):
    """ShapeDtypeStructs of the TrainState carrying this mesh's shardings (restore target)."""
    from onn_jax.training.state import init_state
    shape = jax.eval_shape(functools.partial(init_state, model_cfg, tx), jax.random.key(0))
    shardings = state_shardings(shape, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shape, shardings)


def sharded_init(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
                 mesh: Mesh, rules: Rules = RULES):
    """init_state jitted with out_shardings: every array is created already sharded (a TrainState)."""
    from onn_jax.training.state import init_state
    fn = functools.partial(init_state, model_cfg, tx)
    shardings = state_shardings(jax.eval_shape(fn, rng), mesh, rules)
    return jax.jit(fn, out_shardings=shardings)(rng)


def make_sharded_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                            rules: Rules = RULES, surprise_fn: str | Callable | None = None,
                            donate: bool = True, step_fn: Callable | None = None) -> Callable:
    """step.train_step (or `step_fn` with its signature) jitted on `mesh`:
    `(state, batch) -> (state, metrics)`.

    State in and out with `state_shardings`, the batch with `batch_sharding`, metrics
    replicated; the old state is donated. The same function as step.make_train_step. With
    mesh.expert > 1 the dropless MoE layers run expert-parallel (onn_jax.dispatch.expert_parallel).
    """
    from onn_jax.training.state import init_state
    from onn_jax.training.step import train_step
    step_fn = step_fn or train_step
    shape = jax.eval_shape(functools.partial(init_state, model_cfg, tx), jax.random.key(0))
    st = state_shardings(shape, mesh, rules)

    def step(state, batch):
        check_batch(jax.tree.leaves(batch)[0].shape[0], mesh, rules)
        with activation_rules(mesh, rules):
            return step_fn(state, batch, model_cfg, tx, surprise_fn)

    return jax.jit(step, in_shardings=(st, batch_sharding(mesh, rules)),
                   out_shardings=(st, NamedSharding(mesh, P())),
                   donate_argnums=(0,) if donate else ())


def shard_batch(batch: dict, mesh: Mesh, rules: Rules = RULES) -> dict:
    """Places a host batch (every process holding the whole global batch) on the mesh."""
    sharding = batch_sharding(mesh, rules)
    check_batch(jax.tree.leaves(batch)[0].shape[0], mesh, rules)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
