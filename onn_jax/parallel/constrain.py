"""Activation sharding by logical names, and the mesh of the enclosing sharded step.

`constrain` is a hook any model code may call: a no-op outside `activation_rules`, which
the sharded step enters while tracing. This module imports nothing of the step, so every
layer may import it.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from onn_jax.parallel.rules import RULES, Rules, logical_to_spec, rule_axes

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "onn_jax_sharding_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = RULES):
    """Within this context (while tracing), `constrain` applies the rules on `mesh`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the enclosing `activation_rules` (the sharded step), else None."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names, e.g. constrain(y_NxExC, ("moe_batch",
    "expert", "embed")); returns x unchanged outside `activation_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def batch_shards() -> int:
    """How many ways the enclosing sharded step splits the batch axis (1 outside one)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    n = 1
    for axis in rule_axes("batch", rules):
        n *= mesh.shape.get(axis, 1)
    return n


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """jax.shard_map (jax >= 0.7, so 0.10 and 0.11), else jax.experimental.shard_map."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map  # pragma: no cover
    return experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def expert_mesh() -> tuple[Mesh, tuple[str, ...]] | None:
    """(mesh, batch axes) of the enclosing sharded step when it has more than one device, else
    None. The dropless layer then runs per device in a shard_map on every mesh (ep = 1 is plain
    data parallelism): its custom kernels (Mosaic GPU GEMM, the Pallas per-token sums) cannot
    be partitioned by XLA's SPMD partitioner."""
    active = active_rules()
    if active is None or active[0].size <= 1:
        return None
    mesh, rules = active
    axes = rule_axes("batch", rules)
    if mesh.shape.get("expert", 1) > 1 and "expert" not in axes:
        raise ValueError("expert parallelism (mesh.expert > 1, dispatch='dropless') needs the "
                         f"`batch` rule to split tokens along `expert`; it is {axes}")
    return mesh, axes
