"""Sharding by logical axes: names per parameter, one rules table, mesh, sharded init and step.

Every parameter gets logical axis names from its path in the Linen tree (onn_jax.nn.layers' layout):

  embed/embedding [V, C]                       (vocab, embed)
  attn/{query,key,value}/kernel [C, H, D]      (embed, heads, kv)
  attn/out/kernel [H, D, C]                    (heads, kv, embed)
  norm_*/{ln,rms}/{scale,bias} [C]             (norm,)
  moe/prototypes, moe/router [C, E]            (embed, expert)
  moe/thresholds [E]                           (expert,)
  moe/experts/{w1,w3} [E, C, I], w2 [E, I, C]  (expert, embed, mlp), (expert, mlp, embed)
  moe/ffn_{w1,w3} [C, W], ffn_w2 [W, C]        (embed, mlp), (mlp, embed)
  lm_head/kernel [C, V]                        (embed, vocab)
  attn/head_prototypes, attn/head_router [C, H] (embed, heads); attn/head_thresholds [H] (heads,)
  embed/codes [V, d_z] (vocab, code); embed/slot_prototypes [d_z, M] (code, slot);
  embed/slot_thresholds [M] (slot,); embed/slots [M, C] (slot, embed)
  ngram/tables [K, B, d] (ngram, vocab, code); ngram/{key,value} [K*d, C] (code, embed)
  block_i/deep_embed [V, C]                    (vocab, embed)
  output/head [C, c_1 + n] (embed, vocab); output/tail_i/proj [C, d_i] (embed, tail);
  output/tail_i/out [d_i, V_i] (tail, vocab)   (model.output.kind = adaptive)
  blocks/... (model.scan_layers)               (layers, *the block_i leaf's names); layers replicated

RULES maps logical names to the mesh axes `data`, `expert` and `fsdp`: experts are split
along `expert`, every weight's `embed` dimension along `fsdp` (ZeRO-3 style; norms stay
replicated), and the batch along all three axes (expert parallelism splits tokens too).
Resolution (`logical_to_spec`) uses each mesh axis at most once per array, omits axes of size
1, and leaves a dimension unsharded when its size is not divisible — except the expert and
batch dimensions, where that is a configuration error.

The train step is step.train_step itself, jitted with explicit in/out shardings and a
donated state, so every mesh computes the same function as one device.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from onn_jax.config import ConfigError

MESH_AXES = ("data", "expert", "fsdp")


LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "expert", "vocab", "norm",
                "moe_batch", "code", "slot", "ngram", "tail", "layers")


Rules = Sequence[tuple[str, Any]]


# logical name -> mesh axis, tuple of mesh axes, or None (replicated). `moe_batch` names the
# token axis of the dense [N, E, C] expert tensors: tokens along data, experts along expert.
RULES: Rules = (
    ("batch", ("data", "expert", "fsdp")),
    ("moe_batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", None),
    ("kv", None),
    ("mlp", None),
    ("expert", "expert"),
    ("vocab", None),
    ("norm", None),
    ("code", None),   # model.embed: slot codes, n-gram rows
    ("slot", None),
    ("ngram", None),
    ("tail", None),    # model.output: an adaptive softmax tail's reduced width
    ("layers", None),  # model.scan_layers: the stacked blocks' leading layer axis (replicated)
)


# (path suffix, logical names); "*" matches any key. First match wins.
_PARAM_AXES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("embed", "embedding"), ("vocab", "embed")),
    (("query", "kernel"), ("embed", "heads", "kv")),
    (("key", "kernel"), ("embed", "heads", "kv")),
    (("value", "kernel"), ("embed", "heads", "kv")),
    (("attn", "out", "kernel"), ("heads", "kv", "embed")),
    (("experts", "w1"), ("expert", "embed", "mlp")),
    (("experts", "w3"), ("expert", "embed", "mlp")),
    (("experts", "w2"), ("expert", "mlp", "embed")),
    (("moe", "prototypes"), ("embed", "expert")),
    (("moe", "router"), ("embed", "expert")),
    (("moe", "thresholds"), ("expert",)),
    (("moe", "ffn_w1"), ("embed", "mlp")),
    (("moe", "ffn_w3"), ("embed", "mlp")),
    (("moe", "ffn_w2"), ("mlp", "embed")),
    (("moe", "shared_w1"), ("embed", "mlp")),
    (("moe", "shared_w3"), ("embed", "mlp")),
    (("moe", "shared_w2"), ("mlp", "embed")),
    (("lm_head", "kernel"), ("embed", "vocab")),
    (("attn", "head_prototypes"), ("embed", "heads")),   # gated heads (model.heads)
    (("attn", "head_router"), ("embed", "heads")),
    (("attn", "head_thresholds"), ("heads",)),
    (("embed", "codes"), ("vocab", "code")),             # slot embedding (model.embed.kind=slots)
    (("embed", "slot_prototypes"), ("code", "slot")),
    (("embed", "slot_thresholds"), ("slot",)),
    (("embed", "slots"), ("slot", "embed")),
    (("ngram", "tables"), ("ngram", "vocab", "code")),   # hashed n-gram memory (model.embed.ngram)
    (("ngram", "key"), ("code", "embed")),
    (("ngram", "value"), ("code", "embed")),
    (("*", "deep_embed"), ("vocab", "embed")),           # DeepEmbed (model.embed.deep)
    (("output", "head"), ("embed", "vocab")),            # adaptive softmax (model.output)
    (("output", "*", "proj"), ("embed", "tail")),
    (("output", "*", "out"), ("tail", "vocab")),
    (("*", "scale"), ("norm",)),
    (("*", "bias"), ("norm",)),
)


def path_keys(path) -> tuple[str, ...]:
    """The dict keys of a pytree path (skips tuple indices and attribute names)."""
    return tuple(str(e.key) for e in path if isinstance(e, jax.tree_util.DictKey))


def param_logical_axes(names: Sequence[str], ndim: int | None = None) -> tuple[str, ...] | None:
    """Logical axis names of the parameter at dict-key path `names`, or None if unknown."""
    names = tuple(names)
    stacked = "blocks" in names  # model.scan_layers: a leading layer axis before the table's axes
    for suffix, axes in _PARAM_AXES:
        tail = names[-len(suffix):]
        if len(tail) == len(suffix) and all(s in ("*", n) for s, n in zip(suffix, tail)):
            axes = ("layers", *axes) if stacked else axes
            if ndim is not None and ndim != len(axes):
                return None
            return axes
    return None


def logical_axes_tree(params) -> Any:
    """The tree of logical names for a parameter tree; raises for a path not in the table."""
    def one(path, leaf):
        axes = param_logical_axes(path_keys(path), np.ndim(leaf))
        if axes is None:
            raise ValueError(f"onn_jax.parallel.rules: no logical axes for parameter "
                             f"{'/'.join(path_keys(path))} of shape {np.shape(leaf)}; "
                             "add its path to onn_jax.parallel.rules._PARAM_AXES")
        return axes
    return jax.tree_util.tree_map_with_path(one, params)


def rule_axes(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise ValueError(f"onn_jax.parallel.rules: logical axis {name!r} has no rule; rules cover "
                     f"{[r[0] for r in rules]}")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims have logical `names`.

    A mesh axis already used by an earlier dim, absent from the mesh or of size 1 is skipped. A dim
    not divisible by its mesh axes' product stays unsharded, except `expert` and `batch`
    dims, which raise (the config, not the code, must change).
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in rule_axes(name, rules)
                     if mesh.shape.get(a, 1) > 1 and a not in used)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            if name == "expert":
                raise ConfigError("mesh.expert", f"the expert dimension ({size}) must be divisible "
                                  f"by the mesh axes {axes} of total size {ways}")
            if name in ("batch", "moe_batch"):
                raise ConfigError("train.batch_size", f"the batch dimension ({size}) must be "
                                  f"divisible by the mesh axes {axes} of total size {ways}")
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_shardings(params, mesh: Mesh, rules: Rules = RULES):
    """NamedShardings for a parameter tree (arrays or ShapeDtypeStructs)."""
    axes = logical_axes_tree(params)
    return jax.tree.map(lambda a, x: NamedSharding(mesh, logical_to_spec(a, np.shape(x), mesh, rules)),
                        axes, params, is_leaf=lambda a: isinstance(a, tuple))


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """Sharding of every batch array: leading (batch) dim along the `batch` rule's axes."""
    axes = tuple(a for a in rule_axes("batch", rules) if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes) if axes else P())


def check_batch(batch_size: int, mesh: Mesh, rules: Rules = RULES) -> None:
    """Raises a ConfigError unless `batch_size` divides evenly over the batch mesh axes."""
    logical_to_spec(("batch",), (batch_size,), mesh, rules)
