"""The two parameter layouts of the transformer blocks and the converter between them.

  per-layer (model.scan_layers = false):  params["block_0"], ..., params["block_{L-1}"]
  stacked   (model.scan_layers = true):   params["blocks"], every leaf with a leading layer axis [L, ...]

The stacked layout is what `nn.scan` over the blocks reads (onn_jax.nn.transformer); leaf l of
params["blocks"] is leaf of params["block_l"], so the two hold the same numbers and convert
both ways without loss (`stack_layers` / `unstack_layers`, `to_layout`). Everything outside the
blocks (embeddings, final norm, LM head) is the same in both layouts.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STACKED_KEY = "blocks"
_BLOCK = re.compile(r"block_(\d+)$")


def block_key(i: int) -> str:
    return f"block_{i}"


def is_stacked(tree: Any) -> bool:
    """Whether a parameter-like dict holds the stacked layout."""
    return isinstance(tree, dict) and STACKED_KEY in tree


def num_block_keys(tree: dict) -> int:
    """The number of per-layer `block_i` keys (they must be block_0 .. block_{n-1})."""
    idx = sorted(int(m.group(1)) for k in tree if (m := _BLOCK.match(str(k))))
    if idx != list(range(len(idx))):
        raise ValueError(f"layer_stack: block keys are not block_0..block_{len(idx) - 1}: {idx}")
    return len(idx)


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack_layers(tree: dict) -> dict:
    """Per-layer -> stacked: block_0..block_{L-1} become one `blocks` subtree of [L, ...] leaves."""
    if is_stacked(tree):
        raise ValueError("layer_stack: the parameters are already stacked (key 'blocks')")
    n = num_block_keys(tree)
    if n == 0:
        raise ValueError("layer_stack: no block_i keys to stack")
    layers = [tree[block_key(i)] for i in range(n)]
    structure = jax.tree.structure(layers[0])
    for i, layer in enumerate(layers[1:], 1):
        if jax.tree.structure(layer) != structure:
            raise ValueError(f"layer_stack: block_{i} has a different structure than block_0")
    out = {k: v for k, v in tree.items() if not _BLOCK.match(str(k))}
    out[STACKED_KEY] = jax.tree.map(lambda *xs: _stack(xs), *layers)
    return out


def unstack_layers(tree: dict) -> dict:
    """Stacked -> per-layer: leaf [L, ...] of `blocks` becomes leaf [...] of block_0..block_{L-1}."""
    if not is_stacked(tree):
        raise ValueError("layer_stack: the parameters are not stacked (no key 'blocks')")
    stacked = tree[STACKED_KEY]
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"layer_stack: the leaves of 'blocks' disagree on the layer axis: {sizes}")
    (n,) = sizes
    out = {k: v for k, v in tree.items() if k != STACKED_KEY}
    for i in range(n):
        out[block_key(i)] = jax.tree.map(lambda x: x[i], stacked)
    return out


def to_layout(tree: dict, scan_layers: bool) -> dict:
    """`tree` in the layout model.scan_layers asks for (unchanged when it already is)."""
    if scan_layers == is_stacked(tree):
        return tree
    return stack_layers(tree) if scan_layers else unstack_layers(tree)


def layer_params(tree: dict, i: int) -> dict:
    """Block i's parameters in either layout (a slice of the stacked leaves when stacked)."""
    if is_stacked(tree):
        return jax.tree.map(lambda x: x[i], tree[STACKED_KEY])
    return tree[block_key(i)]


def unstack_records(records: Any, num_layers: int) -> tuple:
    """The scan's stacked per-layer outputs (leading layer axis) as a tuple of per-layer ones."""
    return tuple(jax.tree.map(lambda x: x[i], records) for i in range(num_layers))


def stack_tree(items) -> Any:
    """A sequence of same-structured pytrees (per-layer taps, caches) as one with a layer axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *items)
