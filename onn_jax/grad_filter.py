"""The expert gradient filter ("2-sigma") as an optax GradientTransformation.

Faithful (shared/REFERENCE.md step 6): over all expert parameter gradients pooled
together, thr = mean + 2 * std (unbiased); entries strictly greater than thr become 0.
Options: `two_sided` (the same on |g|), `per_layer` statistics, `off`. Parameters that
are not expert weights pass through untouched.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SigmaFilterState(NamedTuple):
    zeroed_fraction: jax.Array  # fraction of expert gradient entries zeroed at the last update


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def is_expert_path(path) -> bool:
    """True for leaves under an `experts` module (onn_jax.model's stacked expert weights)."""
    return any(_key_name(entry) == "experts" for entry in path)


def layer_of_path(path) -> str:
    """The transformer block a leaf belongs to (its first `block_*` key), for per-layer stats."""
    for entry in path:
        name = _key_name(entry)
        if name.startswith("block_"):
            return name
    return ""


def sigma_filter(mode: str = "one_sided", scope: str = "pooled", sigma: float = 2.0,
                 is_expert: Callable[[Any], bool] = is_expert_path,
                 group_of: Callable[[Any], str] = layer_of_path) -> optax.GradientTransformation:
    """Zeroes outlier expert gradient entries; see the module docstring.

    is_expert(path) selects the filtered leaves; group_of(path) names the statistics group
    when scope == 'per_layer'. Statistics are taken in float32 with two passes.
    """
    if mode not in ("one_sided", "two_sided", "off"):
        raise ValueError(f"unknown filter mode {mode!r}")
    if scope not in ("pooled", "per_layer"):
        raise ValueError(f"unknown filter scope {scope!r}")

    def init(params):
        del params
        return SigmaFilterState(jnp.zeros([], jnp.float32))

    def update(updates, state, params=None):
        del params
        if mode == "off":
            return updates, state
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
        groups: dict[str, list[int]] = {}
        for i, (path, _) in enumerate(paths_leaves):
            if is_expert(path):
                groups.setdefault(group_of(path) if scope == "per_layer" else "", []).append(i)
        leaves = [leaf for _, leaf in paths_leaves]
        zeroed = jnp.zeros([], jnp.float32)
        total = 0
        for idx in groups.values():
            vals = [leaves[i].astype(jnp.float32) for i in idx]
            if mode == "two_sided":
                vals = [jnp.abs(v) for v in vals]
            n = sum(v.size for v in vals)
            mean = sum(jnp.sum(v) for v in vals) / n
            var = sum(jnp.sum(jnp.square(v - mean)) for v in vals) / max(n - 1, 1)
            thr = mean + sigma * jnp.sqrt(var)
            for i, v in zip(idx, vals):
                drop = v > thr
                zeroed = zeroed + jnp.sum(drop)
                leaves[i] = jnp.where(drop, jnp.zeros_like(leaves[i]), leaves[i])
            total += n
        frac = zeroed / max(total, 1)
        return jax.tree_util.tree_unflatten(treedef, leaves), SigmaFilterState(frac)

    return optax.GradientTransformation(init, update)
