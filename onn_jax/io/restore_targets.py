"""What a restore reads into: abstract targets, shape checks, orbax restore arguments.

Restoring goes into an abstract target (ShapeDtypeStructs, with shardings when given), so
a checkpoint written on one device mesh restores onto another; shapes are checked first,
and a mismatch names the parameter path and both shapes. The checkpointer and the params
export both restore this way.

orbax is imported lazily (`orbax_ckpt`, which every io module goes through), so the rest of
onn_jax works where it is not installed.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from onn_jax.io.errors import CheckpointError


def orbax_ckpt():
    """The orbax.checkpoint module, imported on first use."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onn_jax.io's checkpoints need orbax-checkpoint "
                          "(pip install orbax-checkpoint==0.12.8)") from e
    return ocp


def with_shardings(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (a matching tree, one Sharding for
    all leaves, or None = the first local device)."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_like(init_fn, *args, shardings: Any = None, **kwargs) -> Any:
    """The restore target for `init_fn(*args, **kwargs)` without computing it (jax.eval_shape)."""
    return with_shardings(jax.eval_shape(lambda: init_fn(*args, **kwargs)), shardings)


def _flat(tree: Any) -> dict[str, Any]:
    ocp = orbax_ckpt()
    return ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree), sep="/")


def check_shapes(saved_flat: Mapping[str, Any], target: Any, where: str, partial: bool = False) -> None:
    """Raises CheckpointError naming the first path whose presence or shape differs."""
    want = _flat(target)
    for path, leaf in sorted(want.items(), key=lambda kv: not kv[0].startswith("params/")):
        if path not in saved_flat:
            raise CheckpointError(f"{where}: parameter {path} {tuple(leaf.shape)} is in the model "
                                  "but not in the checkpoint (was it written with another config?)")
        have = tuple(saved_flat[path].shape)
        if have != tuple(leaf.shape):
            raise CheckpointError(f"{where}: parameter {path} has shape {have} in the checkpoint "
                                  f"but {tuple(leaf.shape)} in the model config")
    if not partial:
        extra = sorted(set(saved_flat) - set(want))
        if extra:
            raise CheckpointError(f"{where}: checkpoint holds {extra[0]} (and {len(extra) - 1} more) "
                                  "that the model does not have (was it written with another config?)")


def restore_args(target: Any, partial: bool = False):
    """orbax's PyTreeRestore arguments that put each array of `target` where its sharding says."""
    ocp = orbax_ckpt()
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


def tree_from_flat(flat: Mapping[str, Any]) -> dict:
    """Nested dict of single-device ShapeDtypeStructs from flat {a/b/c: metadata}."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree: dict = {}
    for path, meta in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)
    return tree
