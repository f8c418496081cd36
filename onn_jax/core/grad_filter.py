"""The expert gradient filter ("2-sigma") as an optax GradientTransformation.

Faithful (docs/ALGORITHM.md, step 6): over all expert parameter gradients pooled
together, thr = mean + 2 * std (unbiased); entries strictly greater than thr become 0.
Options: `two_sided` (the same on |g|), `per_layer` statistics, `off`. Parameters that
are not expert weights pass through untouched.

With `idle_aware=True` (the faithful no-token rule, optim.idle_experts='skip') the update
takes the optax extra argument `expert_active` ([L, E] bool, onn_jax.core.optimizer): the entries
of experts that received no token are left out of mean, std and the count n (they have no
gradient in the original), and out of the zeroed fraction. Its contract (onn_jax.core.contracts):
a bool [L, E], checked at the update.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from onn_jax.core.contracts import check_expert_active


class SigmaFilterState(NamedTuple):
    zeroed_fraction: jax.Array  # fraction of expert gradient entries zeroed at the last update


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def is_expert_path(path) -> bool:
    """True for leaves under an `experts` module (onn_jax.nn.layers.Experts' stacked weights)."""
    return any(_key_name(entry) == "experts" for entry in path)


def layer_of_path(path) -> str:
    """The transformer block a leaf belongs to (its first `block_*` key), for per-layer stats."""
    for entry in path:
        name = _key_name(entry)
        if name.startswith("block_"):
            return name
    return ""


def layer_index(path) -> int | None:
    """The block number l of a leaf under `block_l` (None outside the blocks)."""
    name = layer_of_path(path)
    return int(name.split("_", 1)[1]) if name.startswith("block_") else None


def is_stacked_path(path) -> bool:
    """True for leaves of the stacked blocks (model.scan_layers: leading layer axis [L, ...])."""
    return any(_key_name(entry) == "blocks" for entry in path)


def expert_axes(path) -> int:
    """How many leading axes index experts: 1 ([E, ...]), 2 when stacked ([L, E, ...]), 0 if none."""
    return 0 if not is_expert_path(path) else 2 if is_stacked_path(path) else 1


def leaf_active(path, leaf, expert_active_LxE: jax.Array | None) -> jax.Array | None:
    """[E] bool of the experts of this expert leaf that received a token (None: all did);
    [L, E] for a stacked expert leaf [L, E, ...] (model.scan_layers)."""
    if expert_active_LxE is None or not is_expert_path(path):
        return None
    if is_stacked_path(path):
        if leaf.shape[:2] != expert_active_LxE.shape:
            raise ValueError(f"expert_active {expert_active_LxE.shape} does not fit stacked expert leaf "
                             f"{jax.tree_util.keystr(path)} of shape {leaf.shape}")
        return expert_active_LxE
    layer = layer_index(path)
    if layer is None or layer >= expert_active_LxE.shape[0] or leaf.shape[:1] != expert_active_LxE.shape[1:]:
        raise ValueError(f"expert_active {expert_active_LxE.shape} does not fit expert leaf "
                         f"{jax.tree_util.keystr(path)} of shape {leaf.shape}")
    return expert_active_LxE[layer]


def sigma_filter(mode: str = "one_sided", scope: str = "pooled", sigma: float = 2.0,
                 is_expert: Callable[[Any], bool] = is_expert_path,
                 group_of: Callable[[Any], str] = layer_of_path,
                 idle_aware: bool = False) -> optax.GradientTransformationExtraArgs:
    """Zeroes outlier expert gradient entries; see the module docstring.

    is_expert(path) selects the filtered leaves; group_of(path) names the statistics group
    when scope == 'per_layer'. Statistics are taken in float32 with two passes (mean, then the
    squared deviations), each summed per expert row first, then over the rows that count.
    """
    if mode not in ("one_sided", "two_sided", "off"):
        raise ValueError(f"unknown filter mode {mode!r}")
    if scope not in ("pooled", "per_layer"):
        raise ValueError(f"unknown filter scope {scope!r}")

    def init(params):
        del params
        return SigmaFilterState(jnp.zeros([], jnp.float32))

    def update(updates, state, params=None, *, expert_active=None, **extra_args):
        del params, extra_args
        if not idle_aware:
            expert_active = None
        check_expert_active("sigma_filter", expert_active)
        if mode == "off":
            return updates, state
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
        groups: dict[str, list[int]] = {}
        for i, (path, _) in enumerate(paths_leaves):
            if is_expert(path):
                groups.setdefault(group_of(path) if scope == "per_layer" else "", []).append(i)
        leaves = [leaf for _, leaf in paths_leaves]
        zeroed = jnp.zeros([], jnp.float32)
        total = jnp.zeros([], jnp.float32)
        for idx in groups.values():
            vals = [leaves[i].astype(jnp.float32) for i in idx]
            if mode == "two_sided":
                vals = [jnp.abs(v) for v in vals]
            rows = [None if expert_active is None else leaf_active(paths_leaves[i][0], v, expert_active)
                    for i, v in zip(idx, vals)]
            n = sum(_count(v, r) for v, r in zip(vals, rows))
            mean = sum(_masked_sum(v, r) for v, r in zip(vals, rows)) / jnp.maximum(n, 1.0)
            var = sum(_masked_sum(jnp.square(v - mean), r) for v, r in zip(vals, rows)) / jnp.maximum(n - 1, 1.0)
            thr = mean + sigma * jnp.sqrt(var)
            for i, v, r in zip(idx, vals, rows):
                drop = v > thr if r is None else (v > thr) & _broadcast_rows(r, v)
                zeroed = zeroed + _masked_sum(drop.astype(jnp.float32), r)
                leaves[i] = jnp.where(drop, jnp.zeros_like(leaves[i]), leaves[i])
            total = total + n
        frac = zeroed / jnp.maximum(total, 1.0)
        return jax.tree_util.tree_unflatten(treedef, leaves), SigmaFilterState(frac)

    return optax.GradientTransformationExtraArgs(init, update)


def _count(v: jax.Array, active: jax.Array | None) -> jax.Array:
    """The entries of leaf v that count: all, or those of the active experts (rows)."""
    if active is None:
        return jnp.asarray(float(v.size), jnp.float32)
    return jnp.sum(active, dtype=jnp.float32) * (v.size // active.size)


def _masked_sum(x: jax.Array, active: jax.Array | None) -> jax.Array:
    """The float32 sum of x over its entries, or over the rows of the active experts: first per
    expert row (a row reduction over the trailing axes, the fast shape on a GPU), then over the
    kept rows. An idle expert's row adds nothing."""
    if active is None:
        return jnp.sum(x.reshape(x.shape[0], -1) if x.ndim > 1 else x, dtype=jnp.float32)
    per_row = jnp.sum(x, axis=tuple(range(active.ndim, x.ndim)), dtype=jnp.float32)
    return jnp.sum(jnp.where(active, per_row, 0.0))


def _broadcast_rows(active_E: jax.Array, v: jax.Array) -> jax.Array:
    """An [E] ([L, E] when stacked) mask broadcast over an [E, ...] ([L, E, ...]) leaf."""
    return jnp.broadcast_to(active_E.reshape(active_E.shape + (1,) * (v.ndim - active_E.ndim)), v.shape)
